"""Latent cache: each (image, bucket) is encoded by the VAE once, kept in memory, optionally kept on disk.

A disk entry is one safetensors file in `cache_dir` (never beside the user's images) named by a hash of what
determines the latent: absolute path, file size and mtime, bucket, resized size, crop, resize filter and the
VAE identity (which includes the model family and latent scale), and ends in the family (`_sdxl`, as sd-scripts
names its SDXL cache files), so an SDXL cache is never read for another family or VAE. The file also stores the
image's original size, which with the bucket fixes SDXL's size conditioning. An unchanged image in an unchanged
bucket reuses its file across runs; a changed one gets a new
name and is encoded again. Files are written to a temporary name and renamed, so a crash never leaves a
truncated file under a valid name, and a file that fails to load or has the wrong shape is simply re-encoded.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..fsutil import atomic_write_bytes
from ..errors import DataError, ModelError
from .images import load_item_tensor

EncodeFn = Callable[[torch.Tensor], torch.Tensor]
CACHE_FORMAT = "lib_lora_train.latents.v2"   # v2: the SDXL size conditioning is stored with the latents


@dataclass
class CacheStats:
    memory_hits: int = 0   # already in memory when prepare() asked
    disk_hits: int = 0     # read back from cache_dir
    encoded: int = 0       # images run through the VAE (each counts once even with the flipped copy)

    def as_dict(self) -> dict[str, int]:
        return {"memory_hits": self.memory_hits, "disk_hits": self.disk_hits, "encoded": self.encoded}


def _file_identity(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None
    return st.st_size, st.st_mtime_ns


def _atomic_write(path: str, data: bytes) -> None:
    # no fsync: a damaged cache file is simply encoded again
    atomic_write_bytes(path, data, sync=False)


def _size_tensor(item) -> torch.Tensor:
    """(width, height) of the original image: with the bucket it fixes SDXL's size conditioning (dataset/sizes.py)."""
    return torch.tensor([int(v) for v in item.original_size], dtype=torch.int64)


class LatentCache:
    def __init__(self, encode_fn: EncodeFn, vae_id: str, *, cache_dir: str | None = None,
                 batch_size: int = 1, family: str = "sd", downscale: int = 8) -> None:
        if batch_size < 1:
            raise DataError(f"vae_batch_size must be at least 1, got {batch_size}")
        self.encode_fn = encode_fn
        self.vae_id = str(vae_id)
        self.family = str(family)
        self.downscale = int(downscale)      # pixels per latent cell
        self.cache_dir = os.path.abspath(cache_dir) if cache_dir else None
        self.batch_size = int(batch_size)
        self.stats = CacheStats()
        # item key -> (latent, flipped latent or None)
        self._memory: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}

    # ------------------------------------------------------------ keys and files
    def cache_name(self, item) -> str:
        size, mtime_ns = _file_identity(item.path)
        ident = (CACHE_FORMAT, os.path.abspath(item.path), size, mtime_ns, tuple(item.bucket),
                 tuple(item.resized_size), tuple(item.crop), item.resize_interpolation, self.vae_id)
        return f"{hashlib.sha256(repr(ident).encode('utf-8')).hexdigest()}_{self.family}.safetensors"

    def _disk_path(self, item) -> str | None:
        return os.path.join(self.cache_dir, self.cache_name(item)) if self.cache_dir else None

    def _expected_shape(self, item) -> tuple[int, int]:
        return item.bucket[1] // self.downscale, item.bucket[0] // self.downscale

    def _load_disk(self, item, want_flip: bool) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        path = self._disk_path(item)
        if path is None or not os.path.isfile(path):
            return None
        try:
            with open(path, "rb") as fh:
                tensors = st_load(fh.read())
        except Exception:  # unreadable or truncated: encode again and overwrite
            return None
        latent, flipped = tensors.get("latents"), tensors.get("latents_flipped")
        if latent is None or latent.dim() != 3 or tuple(latent.shape[1:]) != self._expected_shape(item):
            return None
        if want_flip and (flipped is None or flipped.shape != latent.shape):
            return None
        if not torch.equal(tensors.get("original_size", torch.zeros(0)), _size_tensor(item)):
            return None    # the image's size conditioning would differ: encode again
        return latent, flipped

    def _save_disk(self, item, latent: torch.Tensor, flipped: torch.Tensor | None) -> None:
        path = self._disk_path(item)
        if path is None:
            return
        os.makedirs(self.cache_dir, exist_ok=True)  # type: ignore[arg-type]
        tensors = {"latents": latent.contiguous(), "original_size": _size_tensor(item)}
        if flipped is not None:
            tensors["latents_flipped"] = flipped.contiguous()
        meta = {"format": CACHE_FORMAT, "image": os.path.abspath(item.path), "vae": self.vae_id,
                "family": self.family,
                "bucket": f"{item.bucket[0]}x{item.bucket[1]}"}
        _atomic_write(path, st_save(tensors, metadata=meta))

    # ------------------------------------------------------------ public
    def prepare(self, items: Iterable, flip_aug: bool | None = None,
                on_progress: Callable[[int, int], None] | None = None) -> None:
        """Make sure every item has its latent (and its mirrored latent when `flip_aug`; None = each item's
        subset.flip_aug). Missing ones are encoded in batches of `batch_size`, grouped by bucket."""
        todo: dict[tuple, tuple[object, bool]] = {}
        for item in items:
            want_flip = bool(item.subset.flip_aug if flip_aug is None else flip_aug)
            key = item.key
            if key in todo:
                todo[key] = (todo[key][0], todo[key][1] or want_flip)
            else:
                todo[key] = (item, want_flip)
        missing: dict[tuple, list[tuple[object, bool]]] = {}
        for key, (item, want_flip) in todo.items():
            held = self._memory.get(key)
            if held is not None and (held[1] is not None or not want_flip):
                self.stats.memory_hits += 1
                continue
            loaded = self._load_disk(item, want_flip)
            if loaded is not None:
                self._memory[key] = loaded
                self.stats.disk_hits += 1
                continue
            missing.setdefault((tuple(item.bucket), want_flip), []).append((item, want_flip))
        total = sum(len(v) for v in missing.values())
        done = 0
        for (_, want_flip), group in sorted(missing.items(), key=lambda kv: kv[0]):
            for start in range(0, len(group), self.batch_size):
                chunk = [it for it, _ in group[start:start + self.batch_size]]
                self._encode_chunk(chunk, want_flip)
                done += len(chunk)
                if on_progress is not None:
                    on_progress(done, total)

    def _encode_chunk(self, chunk: list, want_flip: bool) -> None:
        images = torch.stack([load_item_tensor(it) for it in chunk])
        latents = self._encode(images, chunk)
        flipped = self._encode(torch.flip(images, dims=[3]), chunk) if want_flip else None
        for i, item in enumerate(chunk):
            lat = latents[i].clone()
            flp = flipped[i].clone() if flipped is not None else None
            self._memory[item.key] = (lat, flp)
            self._save_disk(item, lat, flp)
            self.stats.encoded += 1

    def _encode(self, images: torch.Tensor, chunk: list) -> torch.Tensor:
        with torch.no_grad():
            out = self.encode_fn(images)
        out = out.detach().to("cpu")
        h, w = self._expected_shape(chunk[0])
        if out.dim() != 4 or out.shape[0] != len(chunk) or tuple(out.shape[2:]) != (h, w):
            raise ModelError(f"the VAE returned latents of shape {tuple(out.shape)} for {len(chunk)} images of "
                             f"{chunk[0].bucket[0]}x{chunk[0].bucket[1]}; expected [{len(chunk)}, C, {h}, {w}]")
        if torch.isnan(out).any():
            raise ModelError(f"NaN in the latents of {chunk[0].path} (batch of {len(chunk)}); the VAE overflows in "
                             f"half precision — run it in float32 (no_half_vae)")
        return out

    def get(self, item, flipped: bool = False) -> torch.Tensor:
        held = self._memory.get(item.key)
        if held is None:
            raise DataError(f"no cached latent for {item.path} in bucket {item.bucket[0]}x{item.bucket[1]}; "
                            f"call prepare() with this item first")
        if flipped:
            if held[1] is None:
                raise DataError(f"no mirrored latent cached for {item.path}; prepare() with flip_aug=True")
            return held[1]
        return held[0]

    def __contains__(self, item) -> bool:
        return item.key in self._memory

    def __len__(self) -> int:
        return len(self._memory)
