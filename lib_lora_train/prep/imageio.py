"""Guarded image reading for the preparation tools: every failure becomes an `ImageProblem` with a code and words.

Nothing here changes Pillow's global settings (the WebUI shares them): the pixel limit is checked from the header
before any pixel is decoded, Pillow's own decompression-bomb refusal is caught, and truncated files are detected
by decoding (never by setting LOAD_TRUNCATED_IMAGES). EXIF orientation follows the engine's rule exactly
(`dataset.images.exif_orientation`), so a preprocessed copy looks the way training would have seen the original.
"""
from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from typing import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..dataset.images import IMAGE_EXTENSIONS, ORIENTATION_OPS, TRANSPOSED_ORIENTATIONS, exif_orientation

DEFAULT_MAX_PIXELS = 80_000_000      # ~8900 x 8900; a 48 MP phone photo still passes
MIN_SHORT_SIDE = 256                 # below this an image is too small to train at 512
# Pillow opens these, but training (sd-scripts' extensions) ignores them; preprocess converts them
CONVERTIBLE_EXTENSIONS = (".gif", ".tif", ".tiff", ".jfif", ".jpe", ".tga", ".ppm", ".pgm", ".pbm", ".pnm",
                          ".ico", ".avif", ".heic", ".jp2", ".psd")
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0)}
# modes converted without a note (plain 8-bit colour or grey)
_PLAIN_MODES = ("RGB", "L")


class ImageProblem(Exception):
    """A file that cannot be used: `code` is stable for machines, the message says why and what to do."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def is_training_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def is_convertible_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in CONVERTIBLE_EXTENSIONS


def _mp(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} MP"


@contextmanager
def open_image(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[Image.Image]:
    """Open (header only) with the pixel limit checked; raises ImageProblem instead of any Pillow error."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ImageProblem("unreadable", f"unreadable: {exc.strerror or exc}") from None
    if not os.path.isfile(path):
        raise ImageProblem("unreadable", "unreadable: not a regular file")
    if st.st_size == 0:
        raise ImageProblem("empty_file", "0-byte file (an interrupted copy or download?): delete it or copy it again")
    try:
        with warnings.catch_warnings():
            # our own limit below decides; Pillow's hard limit (2x its warning level) still raises
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise ImageProblem("decompression_bomb", f"decompression bomb, skipped: {exc}") from None
    except UnidentifiedImageError:
        raise ImageProblem("not_image", "not an image (Pillow cannot identify the contents; is it another kind "
                                        "of file with an image extension?)") from None
    except OSError as exc:
        raise ImageProblem("unreadable", f"unreadable: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - broken headers raise SyntaxError, struct.error, ValueError, ...
        raise ImageProblem("unreadable", f"unreadable header ({type(exc).__name__}: {exc})") from None
    try:
        w, h = img.size
        if w <= 0 or h <= 0:
            raise ImageProblem("unreadable", f"the header gives no pixels ({w}x{h})")
        if w * h > max_pixels:
            raise ImageProblem("too_large", f"too large: {w}x{h} ({_mp(w * h)}) is over the {_mp(max_pixels)} "
                                            f"limit, skipped; downscale it first or raise the limit")
        yield img
    finally:
        img.close()


def displayed_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) after the EXIF orientation, the size training reads."""
    w, h = img.size
    return (h, w) if exif_orientation(img) in TRANSPOSED_ORIENTATIONS else (w, h)


def decode(img: Image.Image, min_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode the pixels (first frame). `min_size` (stored orientation) lets JPEG decode at a reduced scale that
    is still at least that large (libjpeg's DCT scaling: much faster, and the decoder still reads the whole file,
    so truncation is still found)."""
    if min_size is not None and img.format == "JPEG":
        img.draft(img.mode, (max(1, int(min_size[0])), max(1, int(min_size[1]))))
    try:
        img.load()
    except Image.DecompressionBombError as exc:
        raise ImageProblem("decompression_bomb", f"decompression bomb, skipped: {exc}") from None
    except MemoryError:
        raise ImageProblem("too_large", "not enough memory to decode it, skipped; downscale it first") from None
    except OSError as exc:
        if "truncated" in str(exc).lower():
            raise ImageProblem("truncated", "truncated file (the end of the image data is missing: an interrupted "
                                            "copy or download?): copy it again") from None
        raise ImageProblem("unreadable", f"the pixel data cannot be decoded ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - decoders raise SyntaxError, EOFError, ValueError, ...
        raise ImageProblem("unreadable", f"the pixel data cannot be decoded ({type(exc).__name__}: {exc})") from None
    return img


def orient(img: Image.Image, orientation: int) -> Image.Image:
    op = ORIENTATION_OPS.get(orientation)
    return img.transpose(op) if op is not None else img


def has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)


def alpha_min(img: Image.Image) -> int:
    """Smallest alpha value (255: fully opaque); decoded image."""
    if img.mode == "P":
        img = img.convert("RGBA")
    band = img.getchannel("A") if "A" in img.getbands() else img.getchannel("a")
    return int(band.getextrema()[0])


def _high_bit_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit integer or float grey to 8 bits by scaling (convert() would clip everything above 255)."""
    arr = np.asarray(img)
    if arr.dtype.kind == "f":
        top = float(np.nanmax(arr)) if arr.size else 1.0
        scale = 255.0 if top <= 1.0 else (255.0 / 65535.0 if top > 255.0 else 1.0)
        out = np.nan_to_num(arr.astype(np.float64) * scale)
    else:
        arr = arr.astype(np.int64)
        out = arr / 257.0 if arr.max(initial=0) > 255 else arr
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "L")


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> tuple[Image.Image, list[str]]:
    """A decoded image as 8-bit RGB, transparency flattened onto `background`; notes say what was converted."""
    notes: list[str] = []
    mode = img.mode
    if has_alpha(img):
        rgba = img.convert("RGBA")
        if int(rgba.getchannel("A").getextrema()[0]) < 255:
            name = {v: k for k, v in BACKGROUNDS.items()}.get(tuple(background), str(tuple(background)))
            notes.append(f"transparency flattened onto {name}")
        base = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        return Image.alpha_composite(base, rgba).convert("RGB"), notes
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        notes.append(f"{mode} (high bit depth) scaled to 8-bit")
        return _high_bit_to_l(img).convert("RGB"), notes
    if mode not in _PLAIN_MODES:
        notes.append(f"converted from {mode} to RGB")
    return (img if mode == "RGB" else img.convert("RGB")), notes


def frame_count(img: Image.Image) -> int:
    if not getattr(img, "is_animated", False):
        return 1
    try:
        return int(getattr(img, "n_frames", 1))
    except Exception:  # noqa: BLE001 - counting frames reads the file; a broken tail just means "animated"
        return 2


def perceptual_hash(rgb: Image.Image) -> tuple[int, bytes]:
    """dHash (64 bits: is each pixel brighter than its right neighbour on a 9x8 grey thumbnail) plus an 8x8 grey
    thumbnail; the thumbnail keeps flat images of different colours (dHash 0 for all of them) apart."""
    grey = rgb.convert("L")
    small = np.asarray(grey.resize((9, 8), Image.Resampling.BOX), dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    value = 0
    for b in bits:
        value = (value << 1) | int(b)
    thumb = np.asarray(grey.resize((8, 8), Image.Resampling.BOX), dtype=np.uint8).tobytes()
    return value, thumb
