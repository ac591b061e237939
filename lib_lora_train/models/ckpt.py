"""Reading and writing single-file checkpoints, and the hashes A1111 / sd-scripts record for them.

`.ckpt` files are pickles: they are only opened with torch's weights-only unpickler, so a file that needs to
run code to load is refused instead of trusted.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..fsutil import atomic_write
from ..errors import ModelError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth")

_LEGACY_OFFSET = 0x100000   # the old A1111 hash reads 64 KiB at 1 MiB
_LEGACY_LENGTH = 0x10000


@dataclass(frozen=True)
class FileHashes:
    sha256: str   # whole file (A1111 "sha256", sd-scripts ss_new_sd_model_hash)
    legacy: str   # 8 hex of 64 KiB at 1 MiB (A1111 "model hash", ss_sd_model_hash)


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` / `.ckpt` / `.pt` / `.pth` file, on the CPU, top-level `state_dict` unwrapped."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"checkpoint not found: {p}")
    suffix = p.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return _read_safetensors(p)
    if suffix in PICKLE_SUFFIXES:
        return _read_pickle(p)
    raise ModelError(f"unsupported checkpoint type '{suffix}' ({p.name}); use .safetensors or .ckpt")


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        return dict(f.metadata() or {})


def _read_safetensors(p: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(p), device="cpu")
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise ModelError(f"cannot read safetensors file {p.name}: {e}") from e


def _read_pickle(p: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # Raised by the weights-only unpickler for any global it does not allow (functions, classes, ...).
        reason = str(e).strip().splitlines()
        detail = next((line for line in reason if "GLOBAL" in line or "Unsupported" in line), reason[0] if reason else "")
        raise ModelError(
            f"{p.name} holds pickled objects other than tensors and was not loaded: loading it would run code "
            f"stored in the file, which this engine refuses. Convert it to .safetensors with a tool you trust "
            f"and load that instead. ({detail.strip()})"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise ModelError(f"cannot read checkpoint {p.name}: {e}") from e
    return _unwrap_state_dict(obj, p.name)


def _unwrap_state_dict(obj: object, label: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ModelError(f"{label} does not hold a state dict (found {type(obj).__name__})")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise ModelError(f"{label} holds no tensors")
    return tensors


# ---------------------------------------------------------------- hashes

def legacy_hash(path: str | os.PathLike) -> str:
    """Old A1111 model hash: sha256 of the 64 KiB at offset 1 MiB, first 8 hex (empty read for small files)."""
    with open(path, "rb") as f:
        f.seek(_LEGACY_OFFSET)
        return hashlib.sha256(f.read(_LEGACY_LENGTH)).hexdigest()[:8]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_hashes(path: str | os.PathLike) -> FileHashes:
    return FileHashes(sha256=sha256_file(path), legacy=legacy_hash(path))


# ---------------------------------------------------------------- writing

def save_checkpoint(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor],
                    metadata: Mapping[str, str] | None = None, *, overwrite: bool = False) -> Path:
    """Write a `.safetensors` file atomically: a temp file in the same folder, fsync, then os.replace."""
    from safetensors.torch import save_file

    p = Path(path)
    if p.suffix.lower() != ".safetensors":
        raise ModelError(f"checkpoints are written as .safetensors, not '{p.suffix}' ({p.name})")
    if p.exists() and not overwrite:
        raise ModelError(f"{p} already exists; pass overwrite=True to replace it")
    meta = dict(metadata or {})
    bad = [k for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise ModelError(f"safetensors metadata keys and values must be strings: {bad[:5]}")
    tensors = _independent_tensors(state_dict)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(p, lambda tmp: save_file(tensors, tmp, metadata=meta or None), overwrite=overwrite,
                 exists_error=lambda q: ModelError(f"{q} already exists; pass overwrite=True to replace it"))
    return p


def _independent_tensors(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share storage (views, tied weights): give each its own contiguous copy."""
    seen: set[tuple[str, int]] = set()
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            raise ModelError(f"state dict entry '{k}' is not a tensor ({type(v).__name__})")
        t = v.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        storage = (t.device.type, t.untyped_storage().data_ptr())
        if storage in seen or not t.is_contiguous():
            t = t.contiguous().clone()
        seen.add((t.device.type, t.untyped_storage().data_ptr()))
        out[k] = t
    return out

