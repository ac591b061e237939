"""Grid cells that failed: what counts as failed, and the tile drawn in their place.

A cell fails when its sampler raised (out of memory, the WebUI's "A tensor with all NaNs was produced", a LoRA of
another family) or when it came back as a NaN image: NaNs turn into an all-black picture on the way to 8-bit
pixels (in diffusers and in the WebUI with --disable-nan-check). Such a cell must not look like a dark result,
so it is drawn as a grey tile with a red cross and the word "failed", and listed with its reason in the grid's
result (`failed`), for the API and the tab.
"""
from __future__ import annotations

import textwrap
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Optional

from PIL import Image, ImageDraw

NAN_REASON = "NaN image (the sampler produced NaNs: an all-black picture)"


@dataclass
class FailedCell:
    reason: str
    epoch: Optional[int] = None
    weight: Optional[float] = None
    prompt: Optional[str] = None
    file: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_nan_image(image: Any) -> bool:
    """All pixels exactly 0 in every channel: what a NaN latent decodes to."""
    try:
        extrema = image.convert("RGB").getextrema()
    except Exception:  # noqa: BLE001 - not a picture at all: failed too
        return True
    return all(hi == 0 for _lo, hi in extrema)


def bad_image_reason(images: Iterable[Any]) -> Optional[str]:
    images = list(images or [])
    if not images:
        return "no image"
    return NAN_REASON if any(is_nan_image(im) for im in images) else None


def short_reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__


def failed_tile(size: tuple[int, int], reason: str = "") -> Image.Image:
    """A grey tile with a red cross, "failed" and the start of the reason (as far as it fits)."""
    w, h = max(8, int(size[0])), max(8, int(size[1]))
    tile = Image.new("RGB", (w, h), (96, 96, 96))
    draw = ImageDraw.Draw(tile)
    red = (220, 40, 40)
    width = max(1, min(w, h) // 32)
    draw.line([(0, 0), (w - 1, h - 1)], fill=red, width=width)
    draw.line([(0, h - 1), (w - 1, 0)], fill=red, width=width)
    lines = ["failed"] + (textwrap.wrap(reason, max(8, w // 7))[: max(0, h // 12 - 2)] if reason else [])
    y = 2
    for line in lines:
        box = draw.textbbox((0, 0), line)
        tw, th = box[2] - box[0], box[3] - box[1]
        draw.rectangle([(w - tw) // 2 - 2, y - 1, (w + tw) // 2 + 2, y + th + 3], fill=(40, 40, 40))
        draw.text(((w - tw) // 2, y), line, fill=(255, 255, 255))
        y += th + 5
        if y > h - 8:
            break
    return tile
