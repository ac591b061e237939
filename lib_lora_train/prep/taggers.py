"""Pluggable taggers behind one interface: `tagger.tag(rgb_image) -> [(tag, score), ...]`, best first.

- "none": no tags (captions are written by hand or come from the folder name);
- "wd14": a WD14 (SmilingWolf) ONNX model the user points at, with its selected_tags.csv, run with onnxruntime
  (optional: imported only when used; nothing is ever downloaded);
- "deepbooru" and "blip": the WebUI's own models, reached through a `HostTaggers` object the WebUI tab provides.
  `StubHostTaggers` is a deterministic stand-in for tests and for running without the WebUI.
"""
from __future__ import annotations

import csv
import os
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
from PIL import Image

from ..errors import ConfigError, ModelError

TagScores = list[tuple[str, float]]
TAGGERS = ("none", "wd14", "deepbooru", "blip")


@runtime_checkable
class Tagger(Protocol):
    name: str

    def tag(self, image: Image.Image) -> TagScores:
        """Tags for one RGB image, best first, already thresholded."""


class NoTagger:
    name = "none"

    def tag(self, image: Image.Image) -> TagScores:
        return []


@runtime_checkable
class HostTaggers(Protocol):
    """What the host (the WebUI tab) provides from its own models."""

    def deepbooru_tags(self, image: Image.Image) -> TagScores:
        """Every tag DeepBooru scores for the image, with its score (the tagger applies the threshold)."""

    def blip_caption(self, image: Image.Image) -> str:
        """A BLIP caption sentence."""


def _check_threshold(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} must be a number from 0 to 1, got {value!r}")
    return float(value)


class DeepBooruTagger:
    """The WebUI's DeepBooru with a score threshold (the WebUI's default is 0.5)."""
    name = "deepbooru"

    def __init__(self, host: HostTaggers, threshold: float = 0.5):
        self.host = host
        self.threshold = _check_threshold("threshold", threshold)

    def tag(self, image: Image.Image) -> TagScores:
        scored = [(str(t), float(s)) for t, s in self.host.deepbooru_tags(image) if float(s) >= self.threshold]
        return sorted(scored, key=lambda ts: -ts[1])


class BlipTagger:
    """The WebUI's BLIP caption: one sentence, written as the caption's single "tag"."""
    name = "blip"

    def __init__(self, host: HostTaggers):
        self.host = host

    def tag(self, image: Image.Image) -> TagScores:
        caption = self.host.blip_caption(image).strip()
        return [(caption, 1.0)] if caption else []


class StubHostTaggers:
    """A deterministic HostTaggers for tests and demos: tags from simple colour and shape measurements."""

    COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "white": (245, 245, 245),
               "black": (15, 15, 15), "yellow": (230, 210, 40)}

    def __init__(self) -> None:
        self.calls = 0

    def deepbooru_tags(self, image: Image.Image) -> TagScores:
        self.calls += 1
        return self._scores(image)

    def _scores(self, image: Image.Image) -> TagScores:
        a = np.asarray(image.convert("RGB").resize((32, 32), Image.Resampling.BOX), dtype=np.float64)
        mean = a.reshape(-1, 3).mean(axis=0)
        out = []
        for name, rgb in self.COLOURS.items():
            dist = float(np.linalg.norm(mean - np.array(rgb)) / 441.7)
            out.append((f"{name}_background" if name in ("white", "black") else f"{name}_theme", 1.0 - dist))
        w, h = image.size
        out.append(("landscape_orientation" if w > h else "portrait_orientation" if h > w else "square", 0.9))
        out.append(("detailed", float(min(1.0, a.std() / 64.0))))
        return out

    def blip_caption(self, image: Image.Image) -> str:
        self.calls += 1
        best = max(self._scores(image)[:6], key=lambda ts: ts[1])[0].split("_")[0]
        return f"a picture with a mostly {best} colour"


class WD14Tagger:
    """A local WD14 ONNX tagger: `model_path` (.onnx) and `tags_csv` (selected_tags.csv: name, category).

    General tags (category 0) use `threshold`, character tags (4) `character_threshold`; rating tags (9) are
    left out unless `include_ratings`. The image is flattened onto white, padded to a square with white,
    resized to the model's input size and given as BGR 0-255 floats, as these models were trained.
    """
    name = "wd14"

    def __init__(self, model_path: str, tags_csv: str, *, threshold: float = 0.35,
                 character_threshold: float = 0.85, include_ratings: bool = False,
                 providers: Sequence[str] | None = None):
        self.threshold = _check_threshold("threshold", threshold)
        self.character_threshold = _check_threshold("character_threshold", character_threshold)
        self.include_ratings = include_ratings
        for path, what in ((model_path, "WD14 model (.onnx)"), (tags_csv, "WD14 tags file (selected_tags.csv)")):
            if not path or not os.path.isfile(path):
                raise ConfigError(f"{what} not found: {path!r}; point at a local file (nothing is downloaded)")
        self.tags, self.categories = read_tags_csv(tags_csv)
        try:
            import onnxruntime as ort
        except ImportError:
            raise ConfigError("the WD14 tagger needs onnxruntime, which is not installed: pip install onnxruntime "
                              "(or onnxruntime-gpu)") from None
        try:
            self.session = ort.InferenceSession(model_path, providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ModelError(f"cannot load the WD14 model {model_path}: {exc}") from None
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        shape = list(inp.shape)
        if len(shape) != 4:
            raise ModelError(f"{model_path}: expected a 4-D image input, got shape {shape}")
        self.channels_last = shape[3] == 3 or shape[1] != 3
        side = shape[1] if self.channels_last else shape[2]
        self.size = side if isinstance(side, int) and side > 0 else 448
        out = self.session.get_outputs()[0]
        n_out = out.shape[-1] if out.shape else None
        if isinstance(n_out, int) and n_out != len(self.tags):
            raise ModelError(f"{model_path} scores {n_out} tags but {tags_csv} lists {len(self.tags)}; use the CSV "
                             f"that belongs to this model")

    def prepare(self, image: Image.Image) -> np.ndarray:
        rgba = image.convert("RGBA")
        flat = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        side = max(flat.size)
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(flat, ((side - flat.size[0]) // 2, (side - flat.size[1]) // 2))
        if side != self.size:
            square = square.resize((self.size, self.size), Image.Resampling.BICUBIC)
        arr = np.asarray(square, dtype=np.float32)[:, :, ::-1]  # RGB -> BGR
        arr = np.ascontiguousarray(arr)[None]
        return arr if self.channels_last else np.ascontiguousarray(arr.transpose(0, 3, 1, 2))

    def tag(self, image: Image.Image) -> TagScores:
        probs = self.session.run(None, {self.input_name: self.prepare(image)})[0][0]
        if len(probs) != len(self.tags):
            raise ModelError(f"the WD14 model gave {len(probs)} scores for {len(self.tags)} tags")
        out = []
        for tag, cat, p in zip(self.tags, self.categories, probs.tolist()):
            if cat == 9:
                keep = self.include_ratings and p >= self.threshold
            elif cat == 4:
                keep = p >= self.character_threshold
            else:
                keep = p >= self.threshold
            if keep:
                out.append((tag, float(p)))
        return sorted(out, key=lambda ts: -ts[1])


def read_tags_csv(path: str) -> tuple[list[str], list[int]]:
    """Tag names and categories from a WD14 selected_tags.csv (columns tag_id,name,category,count)."""
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the tags file {path}: {exc}") from None
    if not rows:
        raise ConfigError(f"the tags file {path} is empty")
    header = [c.strip().lower() for c in rows[0]]
    if "name" in header:
        ni, ci, rows = header.index("name"), (header.index("category") if "category" in header else None), rows[1:]
    else:
        ni, ci = (1, 2) if len(rows[0]) >= 3 else (0, None)
    tags, cats = [], []
    for i, row in enumerate(rows):
        if not row:
            continue
        try:
            tags.append(row[ni].strip())
            cats.append(int(row[ci]) if ci is not None else 0)
        except (IndexError, ValueError):
            raise ConfigError(f"{path}, row {i + 2}: expected tag_id,name,category,count, got {row!r}") from None
    if not tags:
        raise ConfigError(f"the tags file {path} lists no tags")
    return tags, cats


def make_tagger(name: str, *, host: HostTaggers | None = None, model: str | None = None,
                tags_csv: str | None = None, threshold: float | None = None,
                character_threshold: float = 0.85, include_ratings: bool = False) -> Tagger:
    """A tagger by name: none | wd14 (model + tags_csv) | deepbooru / blip (need the WebUI's `host`)."""
    if name == "none":
        return NoTagger()
    if name == "wd14":
        if not model or not tags_csv:
            raise ConfigError("the WD14 tagger needs a local model file (.onnx) and its tags CSV "
                              "(selected_tags.csv); nothing is downloaded")
        return WD14Tagger(model, tags_csv, threshold=0.35 if threshold is None else threshold,
                          character_threshold=character_threshold, include_ratings=include_ratings)
    if name in ("deepbooru", "blip"):
        if host is None:
            raise ConfigError(f"the {name} tagger uses the WebUI's own model: it is only available inside the "
                              f"WebUI (use wd14 with a local model, or none, elsewhere)")
        return DeepBooruTagger(host, 0.5 if threshold is None else threshold) if name == "deepbooru" \
            else BlipTagger(host)
    raise ConfigError(f"unknown tagger {name!r}; use one of {', '.join(TAGGERS)}")
