"""Drift: how far the prompts WITHOUT the trigger moved away from the base model, per epoch, and an epoch to keep.

Validation loss says how well an epoch denoises held-out images of the concept; it says nothing about what the LoRA
did to everything else. Drift measures that: a few control prompts (by default the run's own captions with the
trigger word(s) taken out) are drawn on fixed seeds by the base model and by every epoch file at one weight, and the
pictures are compared pixel by pixel.

The distance: both images reduced to 32x32 RGB (box filter) in [0, 1], then the mean absolute difference. Why this
one: with the same seed the base and the LoRA start from the same noise, so their pictures line up pixel by pixel
and a plain difference measures what changed; reducing to 32x32 first keeps composition and colour (what a user
notices as "my other prompts look different") and discards sampler-level texture noise; it needs no model (no
CLIP / LPIPS download, works offline, costs microseconds) and reads as a fraction of the full range (0 = identical,
0.1 = on average a tenth of full brightness per channel).

The scale it is judged on: the base model's own spread, the mean distance between its pictures of the same prompt
at different seeds. A LoRA that moves the control pictures by far less than changing the seed does has left them
alone; one that moves them by about as much has changed what the model draws for them. The suggestion is the
lowest-validation-loss epoch whose drift stays under DRIFT_MAX_RATIO x spread (the reasoning is printed).
"""
from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..errors import ConfigError, Interrupted

DRIFT_SIZE = 32              # both pictures are compared at 32x32
DRIFT_MAX_RATIO = 0.5        # drift under half the base's seed-to-seed spread counts as "left alone"
DRIFT_SEEDS = 2              # seeds per control prompt (two at least: the spread needs a pair)
MAX_CONTROL_PROMPTS = 2      # derived control prompts: the most frequent captions without the trigger
DRIFT_WEIGHT = 1.0           # the LoRA weight the control prompts are drawn at


def image_distance(a: Any, b: Any, size: int = DRIFT_SIZE) -> float:
    """Mean absolute difference of two pictures reduced to size x size RGB in [0, 1] (0 = identical)."""
    from PIL import Image

    def arr(im: Any) -> np.ndarray:
        im = im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im))
        return np.asarray(im.convert("RGB").resize((size, size), Image.BOX), dtype=np.float64) / 255.0

    return float(np.abs(arr(a) - arr(b)).mean())


# ---------------------------------------------------------------------------------------------- control prompts
def trigger_words(record: Mapping[str, Any], trigger: str | None = None) -> list[str]:
    """The words to take out of captions: the trigger phrase(s) (comma-separated) and each folder's name token."""
    from .runs import _FOLDER, trigger_word
    words = []
    phrase = trigger if trigger is not None else trigger_word(dict(record))
    for part in str(phrase or "").split(","):
        if part.strip():
            words.append(part.strip())
    cfg = record.get("config") or {}
    if cfg.get("metadata_trigger_phrase"):
        words += [p.strip() for p in str(cfg["metadata_trigger_phrase"]).split(",") if p.strip()]
    for name in ((record.get("dataset") or {}).get("dataset_dirs") or {}):
        m = _FOLDER.match(str(name))
        if m and m.group(1).split():
            words.append(m.group(1).split()[0])          # "10_sks dog": "sks" is the trigger, "dog" the class
    return list(dict.fromkeys(w for w in words if w))


def strip_trigger(caption: str, words: Sequence[str]) -> str:
    """The caption without the trigger: tags equal to a trigger dropped, trigger words cut out of longer tags."""
    tags = []
    low = [w.lower() for w in words]
    for tag in caption.replace("\n", ",").split(","):
        t = tag.strip()
        if not t or t.lower() in low:
            continue
        for w in words:
            t = re.sub(rf"(?<!\w){re.escape(w)}(?!\w)", " ", t, flags=re.IGNORECASE)
        t = " ".join(t.split())
        if t:
            tags.append(t)
    return ", ".join(tags)


def _caption_files(record: Mapping[str, Any]) -> list[str]:
    cfg = record.get("config") or {}
    root = cfg.get("train_data_dir")
    ext = str(cfg.get("caption_extension") or ".txt")
    out = []
    if not root or not os.path.isdir(str(root)):
        return out
    for sub in sorted(os.listdir(root)):
        folder = os.path.join(root, sub)
        if os.path.isdir(folder) and re.match(r"^\d+_", sub):
            out += [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if n.endswith(ext)]
    return out


def default_control_prompts(record: Mapping[str, Any], *, trigger: str | None = None,
                            limit: int = MAX_CONTROL_PROMPTS) -> list[str]:
    """Control prompts for a run: the class prompt when it has one; else its most frequent captions with the
    trigger word(s) taken out (read from the training folder when it is still there, else from the record's tag
    counts); else the class word of an `N_trigger class` folder. Empty when none of these exists."""
    cfg = record.get("config") or {}
    for key in ("reg_images_prompt", "class_prompt"):
        if str(cfg.get(key) or "").strip():
            return [str(cfg[key]).strip()]
    words = trigger_words(record, trigger)
    counts: Counter[str] = Counter()
    for path in _caption_files(record):
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read().strip().splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        stripped = strip_trigger(text[0], words) if text else ""
        if stripped:
            counts[stripped] += 1
    if counts:
        return [p for p, _ in sorted(counts.items(), key=lambda kv: -kv[1])[:limit]]   # stable: first seen wins ties
    tags: Counter[str] = Counter()
    for freq in ((record.get("dataset") or {}).get("tag_frequency") or {}).values():
        for tag, n in (freq or {}).items():
            t = strip_trigger(tag, words)
            if t:
                tags[t] += int(n)
    if tags:
        return [", ".join(t for t, _ in sorted(tags.items(), key=lambda kv: -kv[1])[:3])]
    for name in ((record.get("dataset") or {}).get("dataset_dirs") or {}):
        parts = re.sub(r"^\d+_", "", str(name)).split()
        if len(parts) > 1:
            return [" ".join(parts[1:])]
    return []


# ---------------------------------------------------------------------------------------------- measuring
@dataclass
class DriftRow:
    epoch: int
    drift: float | None = None       # mean image distance of the control pictures from the base's
    ratio: float | None = None       # drift / the base's seed-to-seed spread
    within: bool | None = None       # ratio <= the threshold
    file: str | None = None


@dataclass
class DriftReport:
    prompts: list[str] = field(default_factory=list)     # the control prompts (no trigger)
    seeds: list[int] = field(default_factory=list)
    weight: float = DRIFT_WEIGHT
    spread: float | None = None      # the base's mean distance between seeds of the same prompt
    threshold: float = DRIFT_MAX_RATIO
    rows: list[DriftRow] = field(default_factory=list)   # by epoch
    suggested_epoch: int | None = None
    explanation: str = ""
    metric: str = f"mean |difference| of {DRIFT_SIZE}x{DRIFT_SIZE} RGB in [0, 1], same seed"
    available: bool = True           # False: not measured (the note in `explanation` says why)

    def by_epoch(self) -> dict[int, DriftRow]:
        return {r.epoch: r for r in self.rows}

    def to_dict(self) -> dict[str, Any]:
        return {"prompts": list(self.prompts), "seeds": list(self.seeds), "weight": self.weight,
                "spread": self.spread, "threshold": self.threshold, "rows": [asdict(r) for r in self.rows],
                "suggested_epoch": self.suggested_epoch, "explanation": self.explanation, "metric": self.metric,
                "available": self.available}


def unavailable(why: str) -> DriftReport:
    return DriftReport(available=False, explanation=f"Drift was not measured: {why}")


def control_specs(prompts: Sequence[str], seeds: Sequence[int], *, negative_prompt: str | None, steps: int,
                  width: int, height: int, sampler: str | None, cfg_scale: float) -> list:
    """One PromptSpec per (prompt, seed), prompt-major."""
    from ..sampling.prompts import PromptSpec
    return [PromptSpec(prompt=p, negative_prompt=negative_prompt or None, width=width, height=height, steps=steps,
                       scale=cfg_scale, seed=int(s), sampler=sampler)
            for p in prompts for s in seeds]


def seed_spread(images: Sequence[Any], n_prompts: int, n_seeds: int) -> float | None:
    """Mean distance between the base's pictures of the same prompt at different seeds (None with one seed)."""
    if n_seeds < 2:
        return None
    d = [image_distance(images[p * n_seeds + i], images[p * n_seeds + j])
         for p in range(n_prompts) for i in range(n_seeds) for j in range(i + 1, n_seeds)]
    return float(np.mean(d))


def measure_drift(render: Callable[[list, Any, float], list], files: Sequence[Any], prompts: Sequence[str], *,
                  seed: int, n_seeds: int = DRIFT_SEEDS, weight: float = DRIFT_WEIGHT,
                  negative_prompt: str | None = None, steps: int = 20, width: int = 512, height: int = 512,
                  sampler: str | None = None, cfg_scale: float = 7.0,
                  progress: Callable[[int, int], None] | None = None, stop: Any = None) -> DriftReport:
    """Draw the control prompts with the base (weight 0) and with each epoch file at `weight`, and measure.

    `render(specs, epoch_file, weight) -> one image per spec` is the same renderer the grid uses (the engine's
    merge, or a host's own sampler). Seeds are seed, seed+1, ...; the validation part of the suggestion is added
    by `suggest` once the ranking is known."""
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise ConfigError("drift: no control prompt (the run's captions hold nothing but the trigger); pass one")
    if n_seeds < 2:
        raise ConfigError(f"drift: needs at least 2 seeds per control prompt (the spread between seeds is its "
                          f"scale), got {n_seeds}")
    if not files:
        raise ConfigError("drift: no epoch files")
    seeds = [int(seed) + i for i in range(n_seeds)]
    specs = control_specs(prompts, seeds, negative_prompt=negative_prompt, steps=steps, width=width,
                          height=height, sampler=sampler, cfg_scale=cfg_scale)
    total, done = len(specs) * (len(files) + 1), 0

    def draw(ef: Any, w: float) -> list:
        nonlocal done
        if stop is not None and stop.is_set():
            raise Interrupted(f"drift stopped after {done} of {total} pictures")
        images = list(render(specs, ef, w))
        if len(images) != len(specs):
            raise ValueError(f"renderer gave {len(images)} images for {len(specs)} prompts")
        done += len(specs)
        if progress is not None:
            progress(done, total)
        return images

    base = draw(files[0], 0.0)
    spread = seed_spread(base, len(prompts), n_seeds) or 0.0
    report = DriftReport(prompts=prompts, seeds=seeds, weight=float(weight), spread=spread)
    for ef in files:
        images = draw(ef, float(weight))
        d = float(np.mean([image_distance(a, b) for a, b in zip(base, images)]))
        ratio = d / max(spread, 1e-6)   # a base that draws every seed alike: any change is drift
        report.rows.append(DriftRow(ef.epoch, d, ratio, None if ratio is None else ratio <= DRIFT_MAX_RATIO,
                                    getattr(ef, "path", None)))
    return report


# ---------------------------------------------------------------------------------------------- the suggestion
def suggest(report: DriftReport, ranking: Any = None) -> DriftReport:
    """Fill in `suggested_epoch` and `explanation`: the lowest-validation-loss epoch whose drift is under the
    threshold; without validation losses, the last epoch under it (the most training that left the rest alone)."""
    if not report.available or not report.rows:
        return report
    limit = report.threshold
    spread_txt = f"{report.spread:.4f}" if report.spread is not None else "?"
    rule = (f"Drift = how far the control prompts ({'; '.join(repr(p) for p in report.prompts)}, seeds "
            f"{', '.join(map(str, report.seeds))}, LoRA weight {report.weight:g}) moved from the base model's "
            f"pictures ({report.metric}). The base's own seed-to-seed spread is {spread_txt}; drift under "
            f"{limit:g} x spread counts as leaving the prompts alone.")
    rows = report.by_epoch()
    ok = [r for r in report.rows if r.within]
    val = {}
    for r in getattr(ranking, "rows", None) or []:
        if r.validation_loss is not None and r.epoch in rows:
            val[r.epoch] = r.validation_loss
    rising = _rising(report.rows)
    if not ok:
        least = min(report.rows, key=lambda r: (r.drift, r.epoch))
        report.suggested_epoch = least.epoch
        report.explanation = (f"Suggested: epoch {least.epoch}, the least drift ({least.drift:.4f}, "
                              f"{least.ratio or 0:.2f} x spread) - but every epoch moved the control prompts more "
                              f"than {limit:g} x spread: the LoRA changed what the model draws without the trigger. "
                              f"Use a lower weight, a lower learning rate or fewer steps, or prior preservation "
                              f"(regularisation images). {rule}")
        return report
    if val:
        ordered = sorted(val, key=lambda e: (val[e], e))
        best_val = ordered[0]
        pick = next((e for e in ordered if rows[e].within), None)
        if pick is not None:
            report.suggested_epoch = pick
            r = rows[pick]
            if pick == best_val:
                head = (f"Suggested: epoch {pick}: the lowest validation loss ({val[pick]:.4f}) and its drift "
                        f"{r.drift:.4f} ({r.ratio:.2f} x spread) is under the threshold.")
            else:
                b = rows[best_val]
                head = (f"Suggested: epoch {pick} (validation loss {val[pick]:.4f}, drift {r.drift:.4f} = "
                        f"{r.ratio:.2f} x spread). Epoch {best_val} has the lowest validation loss "
                        f"({val[best_val]:.4f}) but its drift {b.drift:.4f} ({b.ratio:.2f} x spread) is over the "
                        f"threshold: it learned the concept at the cost of the other prompts.")
            report.explanation = head + (f" Drift rises with the epochs ({_curve(report.rows)})." if rising
                                         else "") + " " + rule
            return report
    pick = max(ok, key=lambda r: r.epoch)
    report.suggested_epoch = pick.epoch
    why = ("no epoch with a validation loss is under it" if val else "no validation loss was recorded")
    report.explanation = (f"Suggested: epoch {pick.epoch}, the last epoch whose drift stays under the threshold "
                          f"({pick.drift:.4f} = {pick.ratio:.2f} x spread; {why}): the most training that left the "
                          f"other prompts alone." + (f" Drift rises with the epochs ({_curve(report.rows)})."
                                                     if rising else "") + " " + rule)
    return report


def _rising(rows: Sequence[DriftRow]) -> bool:
    d = [r.drift for r in rows if r.drift is not None]
    return len(d) >= 2 and all(b >= a for a, b in zip(d, d[1:])) and d[-1] > d[0]


def _curve(rows: Sequence[DriftRow]) -> str:
    return ", ".join(f"epoch {r.epoch}: {r.drift:.4f}" for r in rows if r.drift is not None)


def drift_table_text(report: DriftReport) -> str:
    """Plain-text drift table (one line per epoch, the suggested one marked)."""
    if not report.available:
        return report.explanation
    lines = [f"{'epoch':>5}  {'drift':>7}  {'x spread':>8}  ok  file"]
    for r in report.rows:
        mark = "  <- suggested" if r.epoch == report.suggested_epoch else ""
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}"
        within = "-" if r.within is None else ("yes" if r.within else "no")
        lines.append(f"{r.epoch:>5}  {r.drift:>7.4f}  {ratio:>8}  {within:>3} "
                     f"{os.path.basename(r.file) if r.file else '-'}{mark}")
    return "\n".join(lines)
