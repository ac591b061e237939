"""A tiny WD14-shaped ONNX tagger written from scratch, for tests and demos (no `onnx` package needed).

Same interface as the real models: input [batch, S, S, 3] float32 BGR 0-255, output [batch, tags] sigmoid
scores, plus a selected_tags.csv. The "network" is mean colour -> linear -> sigmoid, so a test knows which tags
an image must get. The protobuf bytes are encoded here by hand (ONNX's schema: onnx.proto3).
"""
from __future__ import annotations

import csv
import struct
from typing import Sequence

from ..fsutil import atomic_write, atomic_write_bytes

# (tag, category, weights on the mean B, G, R in 0-255, bias): red / blue / bright / dark images
DEFAULT_TAGS = (
    ("red_theme", 0, (-0.05, -0.05, 0.1), -6.0),
    ("blue_theme", 0, (0.1, -0.05, -0.05), -6.0),
    ("white_background", 0, (0.04, 0.04, 0.04), -24.0),
    ("dark", 0, (-0.04, -0.04, -0.04), 6.0),
    ("simple_(background)", 0, (0.0, 0.0, 0.0), 3.0),
    ("general", 9, (0.0, 0.0, 0.0), 5.0),
    ("some_character", 4, (0.0, 0.0, 0.0), 0.5),
)


def _varint(n: int) -> bytes:
    if n < 0:
        raise ValueError("negative varints are not needed here")
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _int(field: int, n: int) -> bytes:
    return _varint(field << 3) + _varint(n)


def _bytes(field: int, data: bytes | str) -> bytes:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return _varint((field << 3) | 2) + _varint(len(data)) + data


def _tensor(name: str, dims: Sequence[int], values: Sequence[float]) -> bytes:
    raw = struct.pack(f"<{len(values)}f", *values)
    return b"".join(_int(1, d) for d in dims) + _int(2, 1) + _bytes(8, name) + _bytes(9, raw)


def _value_info(name: str, dims: Sequence[int | str]) -> bytes:
    shape = b"".join(_bytes(1, _int(1, d) if isinstance(d, int) else _bytes(2, d)) for d in dims)
    tensor_type = _int(1, 1) + _bytes(2, shape)          # elem_type FLOAT, shape
    return _bytes(1, name) + _bytes(2, _bytes(1, tensor_type))


def _node(op: str, inputs: Sequence[str], outputs: Sequence[str], attrs: bytes = b"") -> bytes:
    return (b"".join(_bytes(1, i) for i in inputs) + b"".join(_bytes(2, o) for o in outputs)
            + _bytes(3, op.lower() + "_" + outputs[0]) + _bytes(4, op) + attrs)


def _attr_ints(name: str, values: Sequence[int]) -> bytes:
    return _bytes(5, _bytes(1, name) + b"".join(_int(8, v) for v in values) + _int(20, 7))   # INTS


def _attr_int(name: str, value: int) -> bytes:
    return _bytes(5, _bytes(1, name) + _int(3, value) + _int(20, 2))                          # INT


def tiny_wd14_model(tags: Sequence[tuple[str, int, Sequence[float], float]] = DEFAULT_TAGS,
                    size: int = 64, input_name: str = "input_1:0") -> bytes:
    """The ONNX model bytes."""
    n = len(tags)
    weights = [w for c in range(3) for w in (t[2][c] for t in tags)]     # [3, n] row-major
    bias = [float(t[3]) for t in tags]
    nodes = (_bytes(1, _node("ReduceMean", [input_name], ["mean"], _attr_ints("axes", [1, 2]) + _attr_int("keepdims", 0)))
             + _bytes(1, _node("MatMul", ["mean", "W"], ["logits0"]))
             + _bytes(1, _node("Add", ["logits0", "b"], ["logits"]))
             + _bytes(1, _node("Sigmoid", ["logits"], ["predictions_sigmoid"])))
    graph = (nodes + _bytes(2, "tiny_wd14")
             + _bytes(5, _tensor("W", [3, n], weights)) + _bytes(5, _tensor("b", [n], bias))
             + _bytes(11, _value_info(input_name, ["batch", size, size, 3]))
             + _bytes(12, _value_info("predictions_sigmoid", ["batch", n])))
    return (_int(1, 7) + _bytes(2, "lib_lora_train") + _bytes(7, graph)
            + _bytes(8, _bytes(1, "") + _int(2, 13)))


def write_tiny_wd14(model_path: str, csv_path: str,
                    tags: Sequence[tuple[str, int, Sequence[float], float]] = DEFAULT_TAGS, size: int = 64) -> None:
    """Write the model and its selected_tags.csv (tag_id,name,category,count)."""
    atomic_write_bytes(model_path, tiny_wd14_model(tags, size))

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["tag_id", "name", "category", "count"])
            for i, (name, cat, _w, _b) in enumerate(tags):
                w.writerow([1000 + i, name, cat, 100 - i])
    atomic_write(csv_path, write)
