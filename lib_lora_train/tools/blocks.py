"""SD1 U-Net block numbering, as data: sd-scripts' 25 training slots and the LoRA Block Weight (LBW) vectors.

Two numberings of the same blocks are in use:

* sd-scripts (networks/lora.py, block-weight training): 25 slots, 0..11 = IN00..IN11 (down side, slot 0 is
  conv_in and never has a LoRA), 12 = the middle block, 13..24 = OUT00..OUT11 (up side). A down-block module
  `down_blocks_i_{resnets|attentions}_j` sits in slot 1 + 3i + j, its downsampler in 1 + 3i + 2; an up-block module
  `up_blocks_i_{resnets|attentions}_j` in 13 + 3i + j, its upsampler in 13 + 3i + 2.
* hako-mikan's LoRA Block Weight strings (also sd-scripts' svd_merge_lora --lbws): 26 values BASE (the text
  encoder), IN00..IN11, M00, OUT00..OUT11 -- i.e. LBW index = slot + 1 -- or the 17-value short form listing only
  the blocks a LierLa LoRA has. Expanding 17 to 26 fills the unlisted blocks with 1.0, as svd_merge_lora does
  (SuperMerger fills 0; use the 26-value form to control the conv-only blocks of a LoCon exactly).

Modules outside the 25 slots (time embedding, conv_out, ...) have no block: block_index() gives -1 (as sd-scripts)
and their LBW ratio is 1. conv_in is IN00 for LBW (it is input_blocks.0 in the ldm layout).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Sequence

from ..errors import ConfigError

NUM_SLOTS = 25                      # sd-scripts SD1: 12 down + 1 mid + 12 up
NUM_DOWN = NUM_UP = 12
MID_SLOT = 12
SLOT_NAMES = tuple([f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)])
LBW26 = ("BASE",) + SLOT_NAMES
LBW17 = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00") + tuple(f"OUT{i:02d}" for i in range(3, 12))
SDXL_LBW_LENGTHS = (12, 20)

# hako-mikan sd-webui-lora-block-weight default presets (17-value form).
LBW_PRESETS: dict[str, tuple[float, ...]] = {
    "NONE": (0,) * 17,
    "ALL": (1,) * 17,
    "INS": (1, 1, 1, 1) + (0,) * 13,
    "IND": (1, 0, 0, 0, 1, 1, 1) + (0,) * 10,
    "INALL": (1,) * 7 + (0,) * 10,
    "MIDD": (1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0),
    "OUTD": (1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0),
    "OUTS": (1,) + (0,) * 11 + (1,) * 5,
    "OUTALL": (1,) + (0,) * 7 + (1,) * 9,
    "ALL0.5": (0.5,) * 17,
}


@dataclass(frozen=True)
class BlockRow:
    slot: int          # sd-scripts slot (0..24)
    name: str          # LBW name (IN00 .. OUT11)
    unet_part: str     # what the slot holds in the diffusers SD1 U-Net
    lierla: bool       # a LoRA-LierLa (attention-only) network has modules here
    c3lier: bool       # a LoRA-C3Lier / LoCon network has modules here


def _rows() -> tuple[BlockRow, ...]:
    rows = [BlockRow(0, "IN00", "conv_in (never adapted by networks.lora)", False, False)]
    for i in range(4):
        for j in range(2):
            attn = i < 3
            part = f"down_blocks.{i}.resnets.{j}" + (f" + attentions.{j}" if attn else "")
            rows.append(BlockRow(1 + 3 * i + j, SLOT_NAMES[1 + 3 * i + j], part, attn, True))
        if i < 3:
            rows.append(BlockRow(3 + 3 * i, SLOT_NAMES[3 + 3 * i], f"down_blocks.{i}.downsamplers.0", False, True))
    rows.append(BlockRow(12, "M00", "mid_block (resnets 0-1 + attentions.0)", True, True))
    for i in range(4):
        for j in range(3):
            attn = i > 0
            part = f"up_blocks.{i}.resnets.{j}" + (f" + attentions.{j}" if attn else "")
            if j == 2 and i < 3:
                part += " + upsamplers.0"
            rows.append(BlockRow(13 + 3 * i + j, SLOT_NAMES[13 + 3 * i + j], part, attn, True))
    return tuple(sorted(rows, key=lambda r: r.slot))


# Which block is which: for a table or picture in a UI (the engine does not render it).
BLOCK_TABLE: tuple[BlockRow, ...] = _rows()

_RE_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")


def block_index(lora_name: str) -> int:
    """sd-scripts' SD1 slot (0..24) of a U-Net module name, -1 for text-encoder or block-less modules."""
    if not lora_name.startswith("lora_unet_"):
        return -1
    m = _RE_UPDOWN.search(lora_name)
    if m:
        side, i, kind, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
        idx = 3 * i + (2 if kind in ("upsamplers", "downsamplers") else j)
        return 1 + idx if side == "down" else NUM_DOWN + 1 + idx
    if "mid_block_" in lora_name:
        return MID_SLOT
    return -1


def lbw_index(lora_name: str) -> int | None:
    """Index into a 26-value LBW vector: 0 (BASE) for the text encoder, slot + 1 for the U-Net, None if none."""
    if lora_name.startswith("lora_te"):
        return 0
    if lora_name.startswith("lora_unet_conv_in"):
        return 1
    slot = block_index(lora_name)
    return None if slot < 0 else slot + 1


def _numbers(text: str, what: str) -> list[float]:
    text = text.strip()
    try:
        if text.startswith("["):
            values = json.loads(text)
            if not isinstance(values, list):
                raise ValueError
        else:
            values = [v for v in re.split(r"[,\s]+", text) if v]
        return [float(v) for v in values]
    except (ValueError, TypeError):
        raise ConfigError(f"{what} {text!r}: expected a preset name ({', '.join(LBW_PRESETS)}), "
                          f"17 or 26 comma-separated numbers, or a JSON list") from None


def parse_block_weights(spec: str | Sequence[float] | None, *, what: str = "block weights") -> tuple[float, ...] | None:
    """A LBW spec -> 26 ratios (BASE, IN00..IN11, M00, OUT00..OUT11), or None for "no per-block ratios".

    spec: a preset name (ALL, INALL, MIDD, OUTALL, ... case-insensitive), "1,0,0.5,..." / "[1, 0, ...]" with 17
    or 26 values, or a sequence of numbers.
    """
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return None
    if isinstance(spec, str):
        preset = {k.upper(): v for k, v in LBW_PRESETS.items()}.get(spec.strip().upper())
        values = list(preset) if preset is not None else _numbers(spec, what)
    else:
        values = [float(v) for v in spec]
    if any(not math.isfinite(v) for v in values):
        raise ConfigError(f"{what}: values must be finite numbers")
    n = len(values)
    if n == 26:
        return tuple(values)
    if n == 17:
        full = [1.0] * 26
        for name, v in zip(LBW17, values):
            full[LBW26.index(name)] = v
        return tuple(full)
    if n in SDXL_LBW_LENGTHS:
        raise ConfigError(f"{what}: {n} values is an SDXL block vector; SD1 takes 17 (LoRA) or 26 (LoCon) values")
    raise ConfigError(f"{what}: {n} values given; SD1 takes 17 values ({','.join(LBW17)}) or 26 "
                      f"({','.join(LBW26)}), or a preset name ({', '.join(LBW_PRESETS)})")


def block_ratio(lora_name: str, weights: Sequence[float] | None) -> float:
    """The LBW ratio of one module (1.0 without weights or for a module outside every block)."""
    if weights is None:
        return 1.0
    idx = lbw_index(lora_name)
    return 1.0 if idx is None else float(weights[idx])


# ---------------------------------------------------------------- block-weight training (sd-scripts semantics)

LR_PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")


def lr_weight_preset(spec: str, n: int = NUM_DOWN) -> list[float]:
    """sd-scripts' named lr-weight curves over n blocks, with an optional "+offset" (e.g. "cosine+.25")."""
    name, _, offset_text = spec.strip().partition("+")
    name = name.strip()
    try:
        offset = float(offset_text) if offset_text.strip() else 0.0
    except ValueError:
        raise ConfigError(f"lr weight preset {spec!r}: the part after '+' must be a number") from None
    steps = [i / (n - 1) for i in range(n)]
    if name == "sine":
        curve = [math.sin(math.pi * s / 2) for s in steps]
    elif name == "cosine":
        curve = [math.sin(math.pi * s / 2) for s in reversed(steps)]
    elif name == "linear":
        curve = steps
    elif name == "reverse_linear":
        curve = list(reversed(steps))
    elif name == "zeros":
        curve = [0.0] * n
    else:
        raise ConfigError(f"unknown lr weight preset {name!r}; use one of {', '.join(LR_PRESETS)} "
                          f"(optionally with +offset) or {n} comma-separated numbers")
    return [v + offset for v in curve]


def _lr_list(key: str, value: str, n: int) -> list[float]:
    text = str(value).strip()
    if "," not in text:
        if n == 1:
            items = [text]
        else:
            return lr_weight_preset(text, n)
    else:
        items = text.split(",")
    try:
        values = [float(s) if s.strip() else 0.0 for s in items]   # an empty entry is 0, as in sd-scripts
    except ValueError:
        raise ConfigError(f"network_args {key}={value!r}: expected {n} comma-separated numbers"
                          + ("" if n == 1 else f" or a preset ({', '.join(LR_PRESETS)}, optionally +offset)")) \
            from None
    if len(values) != n:
        where = {"down_lr_weight": "IN00..IN11 (slots 0-11; IN00 = conv_in has no LoRA)",
                 "up_lr_weight": "OUT00..OUT11 (slots 13-24)", "mid_lr_weight": "the middle block (slot 12)"}[key]
        raise ConfigError(f"network_args {key}: {len(values)} values given, expected {n} for {where}")
    return values


def block_lr_weights(down: str | None, mid: str | None, up: str | None, zero_threshold: float = 0.0
                     ) -> list[float] | None:
    """The 25 per-slot lr multipliers from down/mid/up_lr_weight (None when none is given).

    A weight at or below zero_threshold becomes 0; a block with weight 0 gets no LoRA module at all.
    """
    if down is None and mid is None and up is None:
        return None
    d = _lr_list("down_lr_weight", down, NUM_DOWN) if down is not None else [1.0] * NUM_DOWN
    m = _lr_list("mid_lr_weight", mid, 1) if mid is not None else [1.0]
    u = _lr_list("up_lr_weight", up, NUM_UP) if up is not None else [1.0] * NUM_UP
    weights = d + m + u
    return [w if w > zero_threshold else 0.0 for w in weights]


def slot_values(key: str, value: str, kind: type) -> list:
    """25 per-slot ints (dims) or floats (alphas) from a comma list, with a clear error for a wrong length."""
    items = [s for s in str(value).replace(" ", "").split(",")]
    try:
        values = [kind(s) for s in items]
    except ValueError:
        raise ConfigError(f"network_args {key}={value!r}: expected {NUM_SLOTS} comma-separated "
                          f"{'integers' if kind is int else 'numbers'}") from None
    if len(values) != NUM_SLOTS:
        raise ConfigError(f"network_args {key}: {len(values)} values given, expected {NUM_SLOTS} (one per SD1 "
                          f"block: IN00..IN11, M00, OUT00..OUT11; IN00 is conv_in and never gets a LoRA)")
    if kind is int and any(v < 0 for v in values):
        raise ConfigError(f"network_args {key}: ranks must be >= 0 (0 = no LoRA in that block)")
    return values
