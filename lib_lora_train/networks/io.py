"""Network files: atomic .safetensors writing with sd-scripts' sshs_* hashes, and reading back."""
from __future__ import annotations

import hashlib
import os
from typing import Mapping

import torch

from ..fsutil import atomic_write_bytes
from ..errors import ConfigError, ModelError

_LEGACY_OFFSET = 0x100000   # sd-webui-additional-networks' old hash: 64 KiB at 1 MiB
_LEGACY_SIZE = 0x10000


def _serialize(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    from safetensors.torch import save

    # always a dict, even empty: sd-scripts passes {} and the header (part of the legacy hash) then differs
    return save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, dict(metadata))


def _data_region_sha256(data: bytes) -> str:
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(memoryview(data)[8 + n:]).hexdigest()


def network_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) exactly as sd-scripts' precalculate_safetensors_hashes.

    Both are taken from an in-memory serialization carrying only the ss_* metadata (training metadata is
    immutable; user metadata may change later). The model hash covers only the tensor data after the header,
    so it equals the WebUI's addnet hash of the final file whatever metadata that file has.
    """
    data = _serialize(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    legacy = hashlib.sha256(data[_LEGACY_OFFSET:_LEGACY_OFFSET + _LEGACY_SIZE]).hexdigest()[:8]
    return _data_region_sha256(data), legacy


def addnet_hash(path: str | os.PathLike) -> str:
    """The WebUI's addnet hash of a .safetensors file: sha256 of everything after the header."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_network_file(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                      *, overwrite: bool = False) -> dict[str, str]:
    """Write tensors + metadata (+ sshs_model_hash / sshs_legacy_hash) to path atomically; returns the hashes.

    The file is written to a temporary file in the same folder, fsynced and renamed over path, so a reader
    never sees a partial file. An existing file is refused unless overwrite=True.
    """
    path = os.fspath(path)
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise ConfigError(f"metadata values must be strings: {bad[:5]}")
    if not overwrite and os.path.exists(path):
        raise ConfigError(f"{path} exists already (set overwrite to replace it)")
    model_hash, legacy_hash = network_hashes(tensors, metadata)
    meta = dict(metadata)
    meta["sshs_model_hash"] = model_hash
    meta["sshs_legacy_hash"] = legacy_hash
    data = _serialize(tensors, meta)

    atomic_write_bytes(path, data, overwrite=overwrite,
                       exists_error=lambda p: ConfigError(f"{p} exists already (set overwrite to replace it)"))
    return {"sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash}




def read_network_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a .safetensors network file, on the CPU."""
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise ModelError(f"network file not found: {path}") from None
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ModelError(f"cannot read network file {path}: {e}") from e
    return tensors, metadata
