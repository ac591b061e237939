"""Aspect-ratio buckets with sd-scripts' arithmetic (`model_util.make_bucket_resolutions`, `BucketManager`).

Three modes, as in sd-scripts:
- predefined buckets (enable_bucket): the bucket with the closest aspect ratio; the image is scaled to cover it
  and centre-cropped. An image whose exact size is a bucket uses that bucket;
- per-image buckets (enable_bucket + bucket_no_upscale): large images are shrunk to the max area keeping their
  aspect ratio, and the bucket is that size floored to `steps`; small images are never enlarged;
- no bucketing: one (W, H) bucket; every image covers it and is centre-cropped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import DataError

Size = tuple[int, int]


def make_bucket_resolutions(max_reso: Size, min_size: int = 256, max_size: int = 1024,
                            divisible: int = 64) -> list[Size]:
    """The predefined bucket set: the largest square of the area, then every width step with its height."""
    max_area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(max_area) // divisible) * divisible
    resos = {(side, side)}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


def adjust_bucket_limits(resolution: Size, min_reso: int, max_reso: int, steps: int) -> tuple[int, int, list[str]]:
    """Round min down and max up to multiples of `steps` and check the resolution fits (sd-scripts rules)."""
    notes = []
    if min_reso % steps:
        new = min_reso - min_reso % steps
        notes.append(f"min_bucket_reso adjusted to a multiple of bucket_reso_steps: {min_reso} -> {new}")
        min_reso = new
    if max_reso % steps:
        new = max_reso + steps - max_reso % steps
        notes.append(f"max_bucket_reso adjusted to a multiple of bucket_reso_steps: {max_reso} -> {new}")
        max_reso = new
    if min(resolution) < min_reso:
        raise DataError(f"min_bucket_reso ({min_reso}) must not exceed the smaller side of resolution "
                        f"{resolution[0]}x{resolution[1]}; lower min_bucket_reso or raise the resolution")
    if max(resolution) > max_reso:
        raise DataError(f"max_bucket_reso ({max_reso}) must be at least the larger side of resolution "
                        f"{resolution[0]}x{resolution[1]}; raise max_bucket_reso or lower the resolution")
    return min_reso, max_reso, notes


@dataclass(frozen=True)
class Placement:
    """Where one image goes: its bucket, the size it is resized to, and the (left, top) of the crop."""
    bucket: Size
    resized_size: Size
    crop: Size
    ar_error: float  # bucket aspect ratio minus image aspect ratio


def center_crop(resized: Size, bucket: Size) -> Size:
    return ((resized[0] - bucket[0]) // 2, (resized[1] - bucket[1]) // 2)


class BucketAssigner:
    """Assigns images to buckets; create one per dataset."""

    def __init__(self, resolution: Size, *, enable_bucket: bool = False, no_upscale: bool = False,
                 min_size: int = 256, max_size: int = 1024, steps: int = 64) -> None:
        self.resolution = (int(resolution[0]), int(resolution[1]))
        self.max_area = self.resolution[0] * self.resolution[1]
        self.steps = steps
        self.per_image = bool(enable_bucket and no_upscale)
        if not enable_bucket:
            self.predefined = [self.resolution]
        elif no_upscale:
            self.predefined = []
        else:
            self.predefined = make_bucket_resolutions(self.resolution, min_size, max_size, steps)
        self._predefined_set = set(self.predefined)
        self._ratios = [w / h for w, h in self.predefined]

    def _round(self, x: float) -> int:
        n = int(x + 0.5)
        return n - n % self.steps

    def _cover(self, width: int, height: int) -> tuple[Size, Size]:
        ratio = width / height
        reso = (width, height)
        if reso not in self._predefined_set:
            # first bucket with the smallest aspect-ratio error (numpy argmin semantics)
            best = min(range(len(self._ratios)), key=lambda i: abs(self._ratios[i] - ratio))
            reso = self.predefined[best]
        if ratio > reso[0] / reso[1]:  # wider than the bucket: match heights
            scale = reso[1] / height
        else:
            scale = reso[0] / width
        return reso, (int(width * scale + 0.5), int(height * scale + 0.5))

    def _shrink_only(self, width: int, height: int) -> tuple[Size, Size]:
        ratio = width / height
        if width * height > self.max_area:
            rw = math.sqrt(self.max_area * ratio)
            rh = self.max_area / rw
            # round either side to steps; keep the variant whose aspect ratio is closer (sd-scripts rule)
            w_r = self._round(rw)
            h_in_w = self._round(w_r / ratio)
            err_w = abs(w_r / h_in_w - ratio) if h_in_w else math.inf
            h_r = self._round(rh)
            w_in_h = self._round(h_r * ratio)
            err_h = abs(w_in_h / h_r - ratio) if h_r else math.inf
            if err_w < err_h:
                resized = (w_r, int(w_r / ratio + 0.5))
            else:
                resized = (int(h_r * ratio + 0.5), h_r)
        else:
            resized = (width, height)
        bucket = (resized[0] - resized[0] % self.steps, resized[1] - resized[1] % self.steps)
        return bucket, resized

    def assign(self, width: int, height: int) -> Placement:
        if width <= 0 or height <= 0:
            raise DataError(f"image size {width}x{height} is not valid")
        if self.per_image:
            bucket, resized = self._shrink_only(width, height)
            if bucket[0] < self.steps or bucket[1] < self.steps:
                raise DataError(f"a {width}x{height} image is too small or too thin for bucket_reso_steps "
                                f"{self.steps} with bucket_no_upscale (its bucket would be "
                                f"{bucket[0]}x{bucket[1]}); enlarge or remove it")
        else:
            bucket, resized = self._cover(width, height)
        crop = center_crop(resized, bucket)
        return Placement(bucket, resized, crop, bucket[0] / bucket[1] - width / height)
