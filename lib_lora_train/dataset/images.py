"""Image files: listing, header-only sizes, and loading one image resized and cropped to its bucket.

Pillow + numpy + torch only (no cv2, no torchvision). Unlike sd-scripts, the EXIF orientation is applied (both
to the size read from the header and to the pixels), and transparent pixels are flattened onto white instead
of keeping whatever colour the transparent pixels happen to store.
"""
from __future__ import annotations

import os
import random
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # these rotate by 90 degrees: width and height swap
_ORIENTATION_OPS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

_PIL_FILTERS = {
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "linear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "cubic": Image.Resampling.BICUBIC,
    # BOX averages exactly the source area under each output pixel, like cv2.INTER_AREA when shrinking
    "area": Image.Resampling.BOX,
    "box": Image.Resampling.BOX,
}


def is_image_file(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_images(directory: str) -> list[str]:
    """Image files directly inside `directory` (not recursive), sorted by path like sd-scripts' glob."""
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(e.path for e in entries if is_image_file(e.name) and e.is_file())


def _orientation(img: Image.Image) -> int:
    # PNG keeps EXIF in a chunk that Pillow only reaches by decoding when it was not seen in the header
    if img.format == "PNG" and "exif" not in img.info:
        return 1
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # a broken EXIF block must not stop training; the pixels are still fine
        return 1


def read_image_size(path: str) -> tuple[int, int]:
    """(width, height) as displayed (EXIF orientation applied), read from the header without decoding."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            if _orientation(img) in _TRANSPOSED_ORIENTATIONS:
                w, h = h, w
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None
    if w <= 0 or h <= 0:
        raise DataError(f"image has no pixels: {path}")
    return w, h


def load_image(path: str) -> Image.Image:
    """Decode to RGB: EXIF orientation applied, transparency flattened onto white."""
    try:
        with Image.open(path) as img:
            # the same orientation rule as read_image_size, so sizes and pixels always agree
            op = _ORIENTATION_OPS.get(_orientation(img))
            img.load()
            if op is not None:
                img = img.transpose(op)
            has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
            if has_alpha:
                rgba = img.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(white, rgba).convert("RGB")
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot load image {path}: {exc}") from None


def resize_filter(src_size: Sequence[int], dst_size: Sequence[int], interpolation: str | None) -> Image.Resampling:
    """sd-scripts' choice: area when shrinking (or same size) on both sides, lanczos otherwise."""
    if interpolation is None:
        shrinking = src_size[0] >= dst_size[0] and src_size[1] >= dst_size[1]
        interpolation = "area" if shrinking else "lanczos"
    try:
        return _PIL_FILTERS[interpolation]
    except KeyError:
        raise DataError(f"unknown resize_interpolation '{interpolation}'; use one of "
                        + ", ".join(_PIL_FILTERS)) from None


def resize_and_crop(img: Image.Image, resized_size: Sequence[int], bucket: Sequence[int], crop: Sequence[int],
                    interpolation: str | None = None) -> Image.Image:
    """Resize to `resized_size` (covering the bucket), then cut the bucket out at `crop` = (left, top)."""
    rw, rh = int(resized_size[0]), int(resized_size[1])
    if img.size != (rw, rh):
        img = img.resize((rw, rh), resize_filter(img.size, (rw, rh), interpolation))
    bw, bh = int(bucket[0]), int(bucket[1])
    left, top = int(crop[0]), int(crop[1])
    if left < 0 or top < 0 or left + bw > rw or top + bh > rh:
        raise DataError(f"crop {left},{top} of {bw}x{bh} does not fit inside the resized {rw}x{rh} image")
    if (left, top, bw, bh) != (0, 0, rw, rh):
        img = img.crop((left, top, left + bw, top + bh))
    return img


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor [3, H, W] in [-1, 1]."""
    arr = np.asarray(img, dtype=np.uint8)
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1).float()
    return t / 127.5 - 1.0


def load_image_tensor(path: str, resized_size: Sequence[int], bucket: Sequence[int], crop: Sequence[int], *,
                      flip: bool = False, interpolation: str | None = None,
                      expected_size: Sequence[int] | None = None) -> torch.Tensor:
    """Load `path` ready for the VAE: resized, cropped to the bucket, optionally mirrored; [3, H, W] in [-1, 1].

    `expected_size` is the (width, height) recorded when the dataset was scanned; a different size means the
    file changed since then and the bucket no longer fits it.
    """
    img = load_image(path)
    if expected_size is not None and tuple(img.size) != tuple(expected_size):
        raise DataError(f"image {path} is now {img.size[0]}x{img.size[1]} but was "
                        f"{expected_size[0]}x{expected_size[1]} when the dataset was scanned; scan it again")
    img = resize_and_crop(img, resized_size, bucket, crop, interpolation)
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(img)


def load_item_tensor(item, flip: bool = False, crop: Sequence[int] | None = None) -> torch.Tensor:
    """`load_image_tensor` for an ImageItem (crop overrides the item's centre crop, e.g. for random_crop)."""
    return load_image_tensor(item.path, item.resized_size, item.bucket, crop if crop is not None else item.crop,
                             flip=flip, interpolation=item.resize_interpolation, expected_size=item.original_size)


def random_crop_offsets(item, rng: random.Random) -> tuple[int, int]:
    """A random (left, top) for `random_crop` subsets, drawn from the caller's per-step generator."""
    extra_w = item.resized_size[0] - item.bucket[0]
    extra_h = item.resized_size[1] - item.bucket[1]
    return (rng.randint(0, extra_w) if extra_w > 0 else 0, rng.randint(0, extra_h) if extra_h > 0 else 0)


# Public names for the preparation tools (lib_lora_train.prep), which must rotate images exactly as training does.
exif_orientation = _orientation
ORIENTATION_OPS = _ORIENTATION_OPS
TRANSPOSED_ORIENTATIONS = _TRANSPOSED_ORIENTATIONS
