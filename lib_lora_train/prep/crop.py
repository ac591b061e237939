"""Target sizes and crop positions: bucket (keep the aspect ratio), centre, and focal-point crops.

The focal crop outside the WebUI needs no downloaded model: a saliency map made of edge energy (detail), colour
distance from the border colour (a subject on a plain background) and a skin-tone term (faces), all with numpy.
After the image is resized to cover the target, the crop can only slide along one axis, so the best window is
found exactly with a cumulative sum; a small pull towards the centre settles flat images. Inside the WebUI the
host passes its own focal-point crop as a `FocalHook`.
"""
from __future__ import annotations

import math
from typing import Callable, Union

import numpy as np
from PIL import Image

from .imageio import ImageProblem

Size = tuple[int, int]
# the host's focal-point crop: gets the image already resized to cover `target` and returns either the crop of
# exactly `target` size or its (left, top) corner
FocalHook = Callable[[Image.Image, Size], Union[Image.Image, Size]]

SIZE_STEP = 64


def bucket_geometry(width: int, height: int, resolution: int, step: int = SIZE_STEP) -> tuple[Size, Size]:
    """(resized, final) for bucket mode: downscale only, so the long side fits `resolution`; then each side is
    floored to a multiple of `step` by a centre crop of less than `step` pixels."""
    scale = min(1.0, resolution / max(width, height))
    rw = max(1, int(width * scale + 0.5))
    rh = max(1, int(height * scale + 0.5))
    fw, fh = rw - rw % step, rh - rh % step
    if fw < step or fh < step:
        raise ImageProblem("too_small", f"too small or too thin for training: {width}x{height} gives less than "
                                        f"{step} px on a side (sizes are multiples of {step})")
    return (rw, rh), (fw, fh)


def cover_geometry(width: int, height: int, target: Size) -> Size:
    """The size that covers `target` keeping the aspect ratio (up- or downscaling)."""
    scale = max(target[0] / width, target[1] / height)
    return (max(target[0], int(width * scale + 0.5)), max(target[1], int(height * scale + 0.5)))


def center_offset(resized: Size, target: Size) -> Size:
    return ((resized[0] - target[0]) // 2, (resized[1] - target[1]) // 2)


# ---------------------------------------------------------------- saliency


def _box_blur(a: np.ndarray, r: int) -> np.ndarray:
    """Mean over a (2r+1)^2 window, edges clamped, via cumulative sums."""
    if r < 1:
        return a
    p = np.pad(a, r, mode="edge")
    c = np.cumsum(np.cumsum(p, axis=0), axis=1)
    c = np.pad(c, ((1, 0), (1, 0)))
    k = 2 * r + 1
    h, w = a.shape
    s = c[k:k + h, k:k + w] - c[0:h, k:k + w] - c[k:k + h, 0:w] + c[0:h, 0:w]
    return s / (k * k)


def _unit(a: np.ndarray) -> np.ndarray:
    top = float(np.percentile(a, 99)) if a.size else 0.0
    return np.clip(a / top, 0.0, 1.0) if top > 1e-9 else np.zeros_like(a)


def saliency_map(rgb: Image.Image, max_side: int = 192, *, edges_weight: float = 1.0,
                 contrast_weight: float = 1.0, skin_weight: float = 0.75) -> np.ndarray:
    """A float map (rows x cols of a small copy of `rgb`) where larger means "keep this in the crop"."""
    w, h = rgb.size
    scale = min(1.0, max_side / max(w, h))
    small = rgb if scale >= 1.0 else rgb.resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                                Image.Resampling.BOX)
    a = np.asarray(small.convert("RGB"), dtype=np.float32) / 255.0
    rows, cols = a.shape[:2]
    lum = a @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    gx = np.zeros_like(lum)
    gy = np.zeros_like(lum)
    gx[:, 1:-1] = lum[:, 2:] - lum[:, :-2]
    gy[1:-1, :] = lum[2:, :] - lum[:-2, :]
    radius = max(1, round(max(rows, cols) / 48))
    edges = _box_blur(np.hypot(gx, gy), radius)

    # the background colour is what the border mostly is
    bw = max(1, round(min(rows, cols) * 0.04))
    border = np.concatenate([a[:bw].reshape(-1, 3), a[-bw:].reshape(-1, 3),
                             a[:, :bw].reshape(-1, 3), a[:, -bw:].reshape(-1, 3)])
    contrast = _box_blur(np.linalg.norm(a - np.median(border, axis=0), axis=2), radius)

    # skin tones in YCbCr (a classic fixed range), a cheap stand-in for a face detector
    r, g, b = a[..., 0] * 255, a[..., 1] * 255, a[..., 2] * 255
    cb = 128 - 0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 128 + 0.5 * r - 0.418688 * g - 0.081312 * b
    skin = ((cb >= 77) & (cb <= 127) & (cr >= 133) & (cr <= 173) & (r > 60)).astype(np.float32)
    skin = _box_blur(skin, radius * 2)

    return (edges_weight * _unit(edges) + contrast_weight * _unit(contrast) + skin_weight * skin).astype(np.float64)


def best_window(profile: np.ndarray, window: float, centre_pull: float = 0.05) -> float:
    """Start (in profile units, may be fractional) of the `window`-long span with the largest sum; ties and flat
    profiles go to the centre."""
    n = len(profile)
    if window >= n:
        return 0.0
    k = max(1, int(round(window)))
    c = np.concatenate([[0.0], np.cumsum(profile)])
    sums = c[k:] - c[:-k]                                # start 0 .. n-k
    starts = np.arange(len(sums), dtype=np.float64)
    mid = (n - k) / 2.0
    total = float(sums.max()) if sums.size else 0.0
    scale = total if total > 1e-12 else 1.0   # a flat (all-zero) profile still goes to the centre
    score = sums - centre_pull * scale * np.abs(starts - mid) / max(mid, 1.0)
    best = int(np.argmax(score))                         # first maximum: deterministic
    return float(best) * (n - window) / max(n - k, 1) if n != k else 0.0


def focal_offset(resized: Image.Image, target: Size) -> Size:
    """(left, top) of the `target` crop of `resized` (which covers it) that keeps the most salient part."""
    rw, rh = resized.size
    tw, th = target
    if rw == tw and rh == th:
        return (0, 0)
    sal = saliency_map(resized)
    rows, cols = sal.shape
    if rw > tw:  # slides horizontally
        unit = cols / rw
        start = best_window(sal.sum(axis=0), tw * unit)
        return (min(rw - tw, max(0, int(math.floor(start / unit + 0.5)))), (rh - th) // 2)
    unit = rows / rh
    start = best_window(sal.sum(axis=1), th * unit)
    return ((rw - tw) // 2, min(rh - th, max(0, int(math.floor(start / unit + 0.5)))))


def apply_focal_hook(hook: FocalHook, resized: Image.Image, target: Size) -> Image.Image:
    """Call the host's crop and check what it gives back."""
    out = hook(resized, target)
    if isinstance(out, Image.Image):
        if out.size != tuple(target):
            raise ImageProblem("focal_crop", f"the host's focal crop returned {out.size[0]}x{out.size[1]}, "
                                             f"expected {target[0]}x{target[1]}")
        return out.convert("RGB")
    try:
        left, top = int(out[0]), int(out[1])
    except (TypeError, ValueError, IndexError):
        raise ImageProblem("focal_crop", f"the host's focal crop returned {out!r}; expected an image or "
                                         f"(left, top)") from None
    left = min(max(0, left), resized.size[0] - target[0])
    top = min(max(0, top), resized.size[1] - target[1])
    return resized.crop((left, top, left + target[0], top + target[1]))
