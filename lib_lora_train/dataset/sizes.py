"""SDXL size conditioning of a sample, computed the way sd-scripts computes it.

sd-scripts does not record the crop it actually made: it records Stability AI's "crop" of the image fitted
*inside* the bucket (`(bucket - fitted) // 2` on each axis), for centre and random crops alike; for a mirrored
sample the left edge becomes `bucket_width - right`. A LoRA is conditioned the same way here, so it sees the
numbers an sd-scripts run would have used. The values depend only on the image's original size, its bucket and
the flip, so cached latents carry them unchanged.
"""
from __future__ import annotations

from ..models.conditioning import SizeInfo


def crop_ltrb(bucket: tuple[int, int], original_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of the original image fitted inside the bucket, centred (sd-scripts' rule)."""
    bw, bh = bucket
    ow, oh = original_size
    image_ar, bucket_ar = ow / oh, bw / bh
    if bucket_ar > image_ar:          # the bucket is wider: heights match
        fit_w, fit_h = bh * image_ar, float(bh)
    else:
        fit_w, fit_h = float(bw), bw / image_ar
    left, top = (bw - fit_w) // 2, (bh - fit_h) // 2
    return left, top, left + fit_w, top + fit_h


def size_info(item, flipped: bool = False) -> SizeInfo:
    """The SizeInfo of one dataset sample (an ImageItem with original_size and bucket, both (w, h))."""
    bw, bh = (int(v) for v in item.bucket)
    left, top, right, _ = crop_ltrb((bw, bh), tuple(item.original_size))
    if flipped:
        left = bw - right
    ow, oh = (int(v) for v in item.original_size)
    return SizeInfo((oh, ow), (int(top), int(left)), (bh, bw))


def batch_sizes(batch) -> list[SizeInfo]:
    return [size_info(s.item, s.flipped) for s in batch.samples]
