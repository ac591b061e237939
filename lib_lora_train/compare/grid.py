"""The compare grid: a run's epoch files x LoRA weights (x prompts), one labelled picture plus the loss table.

Rows are epochs (their file names), columns are weights (default 0.4, 0.6, 0.8, 1.0; a weight of 0 is the base
model without the LoRA, drawn once and repeated). With several prompts, each prompt gets its own sub-grid, titled
with the prompt, stacked top to bottom. Every cell uses the same seed, so only the epoch and the weight differ.
Cells are made by diffusers' DPM-Solver++ 2M with Karras sigmas unless another sampler is asked for.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from PIL import Image

from ..errors import ConfigError, Interrupted, ModelError
from .drift import DriftReport
from .failed import FailedCell, bad_image_reason, failed_tile, is_nan_image, short_reason
from .ranking import Ranking, ranking_from_record, table_text
from .runs import EpochFile, RunInfo, open_run, trigger_word

DEFAULT_WEIGHTS = (0.4, 0.6, 0.8, 1.0)
DEFAULT_STEPS = 20        # the WebUI's default
DEFAULT_CFG = 7.0         # the WebUI's default
PNG_KEY = "lora_compare"  # the PNG text chunk holding labels and the loss table as JSON


@dataclass
class CompareGrid:
    image: Image.Image
    row_labels: list[str]              # one per epoch, top to bottom
    col_labels: list[str]              # one per weight, left to right
    epochs: list[int]
    files: list[str]
    weights: list[float]
    prompts: list[str]
    seed: int
    infotext: str
    ranking: Ranking
    cells: list[list[list[Image.Image]]] = field(repr=False, default_factory=list)   # [prompt][epoch][weight]
    failed: list[FailedCell] = field(default_factory=list)   # cells drawn as "failed" tiles, with the reason
    drift: DriftReport | None = None   # how far the control prompts (no trigger) moved from the base, per epoch

    @property
    def table(self) -> list[dict[str, Any]]:
        return self.ranking.to_dict()["rows"]

    def to_dict(self) -> dict[str, Any]:
        """Everything but the pictures (an API adds the PNG as base64)."""
        return {"row_labels": self.row_labels, "col_labels": self.col_labels, "epochs": self.epochs,
                "files": self.files, "weights": self.weights, "prompts": self.prompts, "seed": self.seed,
                "infotext": self.infotext, "validation": self.ranking.to_dict(),
                "failed": [f.to_dict() for f in self.failed],
                "drift": self.drift.to_dict() if self.drift is not None else None}

    def png_bytes(self) -> bytes:
        """The PNG with its text chunks, e.g. for an API answer in base64."""
        from PIL.PngImagePlugin import PngInfo
        info = PngInfo()
        for k, v in self.png_text().items():
            info.add_text(k, v)
        buf = io.BytesIO()
        self.image.save(buf, format="PNG", pnginfo=info)
        return buf.getvalue()

    def png_text(self) -> dict[str, str]:
        text = {"parameters": self.infotext, PNG_KEY: json.dumps(self.to_dict(), ensure_ascii=False),
                "validation_table": table_text(self.ranking)}
        if self.drift is not None:
            from .drift import drift_table_text
            text["drift_table"] = drift_table_text(self.drift)
        return text


def parse_weights(values: Sequence[float | str] | None) -> list[float]:
    if not values:
        return list(DEFAULT_WEIGHTS)
    out = []
    for v in values:
        for part in str(v).replace(",", " ").split():
            try:
                w = float(part)
            except ValueError:
                raise ConfigError(f"weights: {part!r} is not a number") from None
            if not -4.0 <= w <= 4.0:
                raise ConfigError(f"weights: {w} is outside -4..4")
            out.append(w)
    return out


def weight_label(w: float) -> str:
    return "0 (no LoRA)" if w == 0 else f"weight {w:g}"


def _prompt_specs(prompts: Sequence[str] | None, run: RunInfo, *, negative_prompt, steps, width, height, seed,
                  sampler, cfg_scale):
    from ..sampling.prompts import DEFAULT_SCALE, DEFAULT_STEPS as LINE_STEPS, parse_prompt_line
    lines = [p for p in (prompts or []) if p and p.strip()]
    if not lines:
        trigger = trigger_word(run.record)
        if not trigger:
            raise ConfigError("no prompt given and the run has no trigger word (no captions, no "
                              "metadata_trigger_phrase); pass a prompt")
        lines = [trigger]
    specs = []
    rw, rh = run.resolution
    for i, line in enumerate(lines):
        s = parse_prompt_line(line, index=i)
        # a prompt line's own flags (--n --w --h --s --d --l --ss) win over the grid's settings
        specs.append(dataclasses.replace(
            s, negative_prompt=s.negative_prompt if s.negative_prompt is not None else (negative_prompt or None),
            width=s.width or width or rw, height=s.height or height or rh,
            steps=s.steps if s.steps != LINE_STEPS else int(steps),
            scale=s.scale if s.scale != DEFAULT_SCALE else float(cfg_scale),
            seed=s.seed if s.seed is not None else seed, sampler=s.sampler or sampler))
    return specs


def _row_label(run: RunInfo, epoch: int, path: str, ranking: Ranking, drift: DriftReport | None = None) -> str:
    row = next((r for r in ranking.rows if r.epoch == epoch), None)
    lines = [os.path.splitext(os.path.basename(path))[0], f"epoch {epoch}"]
    if row is not None and row.validation_loss is not None:
        lines.append(f"val {row.validation_loss:.4f}")
    d = drift.by_epoch().get(epoch) if drift is not None and drift.available else None
    if d is not None and d.drift is not None:
        lines.append(f"drift {d.drift:.3f}")
    suggested = drift.suggested_epoch == epoch if d is not None else (row is not None and row.suggested)
    if suggested:
        lines.append("* suggested")
    return "\n".join(lines)


Renderer = Callable[[list, EpochFile, float], list[Image.Image]]


class MergingRenderer:
    """The engine's own cells: the epoch file merged into `model` at the weight, then diffusers' pipeline.

    A host with its own sampler (the WebUI: `<lora:NAME:W>` through its processing) passes its own renderer
    `render(specs, epoch_file, weight) -> one image per spec` to compare_grid instead.
    """

    def __init__(self, model, clip_skip: int | None = None):
        self.model, self.clip_skip = model, clip_skip
        self._lora = None
        self._path: str | None = None

    def __call__(self, specs, ef: EpochFile, weight: float) -> list[Image.Image]:
        from ..networks import read_network_file
        from ..sampling.pipeline import generate
        from .apply import MergedLora
        if self._path != ef.path:
            self.close()
            tensors, _ = read_network_file(ef.path)
            self._lora, self._path = MergedLora(self.model, tensors, name=ef.name), ef.path
        self._lora.set_weight(weight)
        return generate(self.model, specs, clip_skip=self.clip_skip, device=self.model.unet.device)

    def close(self) -> None:
        if self._lora is not None:
            self._lora.restore()
        self._lora, self._path = None, None


def compare_grid(run: RunInfo | str, *, model=None, render: Renderer | None = None,
                 epochs: Sequence[int] | None = None, weights: Sequence[float] | None = None,
                 prompts: Sequence[str] | None = None, negative_prompt: str | None = None, seed: int | None = None,
                 steps: int = DEFAULT_STEPS, width: int | None = None, height: int | None = None,
                 sampler: str | None = None, cfg_scale: float = DEFAULT_CFG, clip_skip: int | None = None,
                 device: str = "auto", progress: Callable[[int, int], None] | None = None,
                 stop: threading.Event | None = None, drift: bool = False,
                 control_prompts: Sequence[str] | None = None, drift_seeds: int | None = None,
                 drift_weight: float | None = None) -> CompareGrid:
    """Render the grid of a run (a RunInfo, a run folder or a .run.json path).

    Cells come from `render` when given, else from the engine's MergingRenderer on `model` (an SDModel a host
    already holds; else the run's base model is loaded). `epochs`: which epoch files (default all); a weight of
    0 is the base model, drawn once. `progress(done, total)` after each cell; `stop` ends the grid between cells
    with Interrupted. Size defaults to the run's resolution; seed None (or < 0) = one random seed for all cells.
    `drift`: also draw the control prompts (`control_prompts`, default: the run's captions without the trigger,
    compare/drift.py) with the base and each chosen epoch, and suggest an epoch by validation loss and drift.
    """
    from ..sampling.grid import make_grid
    from ..sampling.pipeline import sampler_key

    run = open_run(run) if isinstance(run, str) else run
    weights = parse_weights(weights)
    sampler_key(sampler)                       # an unknown sampler fails before any work
    if steps < 1 or steps > 150:
        raise ConfigError(f"steps: expected 1..150, got {steps}")
    if not run.files:
        gone = f" (listed but missing: {', '.join(run.missing)})" if run.missing else ""
        raise ConfigError(f"{run.record_path}: the run has no epoch files to compare{gone}")
    chosen = run.files
    if epochs:
        wanted = [int(e) for e in epochs]
        absent = [e for e in wanted if run.file_for(e) is None]
        if absent:
            have = ", ".join(str(f.epoch) for f in run.files)
            raise ConfigError(f"epochs: no file for epoch {', '.join(map(str, absent))}; this run has files for "
                              f"epochs {have}")
        chosen = [run.file_for(e) for e in sorted(set(wanted))]
    seed = secrets.randbelow(2 ** 31) if seed is None or int(seed) < 0 else int(seed)
    clip_skip = clip_skip if clip_skip is not None else run.config.get("clip_skip")
    specs = _prompt_specs(prompts, run, negative_prompt=negative_prompt, steps=steps, width=width, height=height,
                          seed=seed, sampler=sampler, cfg_scale=cfg_scale)
    ranking = ranking_from_record(run.record, files={f.epoch: f.path for f in run.files})

    own = None
    if render is None:
        model = model if model is not None else _load_base(run, device)
        render = own = MergingRenderer(model, clip_skip)
    from .drift import DRIFT_SEEDS, default_control_prompts
    controls = [p for p in (control_prompts or []) if p and p.strip()] or \
        (default_control_prompts(run.record) if drift else [])
    n_seeds = int(drift_seeds or DRIFT_SEEDS)
    drift_total = len(controls) * n_seeds * (len(chosen) + 1) if drift and controls else 0
    total = len(chosen) * len(weights) * len(specs) + drift_total
    done = 0
    cells: list[list[list[Image.Image]]] = [[[None] * len(weights) for _ in chosen] for _ in specs]
    base_images: list[Image.Image] | None = None
    failed: list[FailedCell] = []
    try:
        for r, ef in enumerate(chosen):
            for c, w in enumerate(weights):
                if stop is not None and stop.is_set():
                    raise Interrupted(f"compare grid stopped after {done} of {total} cells")
                if w == 0 and base_images is not None:
                    images = base_images                   # the base model: the same picture in every row
                else:
                    images = _render_cell(render, specs, ef, w, failed)
                    if w == 0 and not any(f.epoch == ef.epoch and f.weight == 0 for f in failed):
                        base_images = images
                for p, img in enumerate(images):
                    cells[p][r][c] = img
                done += len(specs)
                if progress is not None:
                    progress(done, total)
        report = None
        if drift:
            report = _drift(render, chosen, controls, specs[0], n_seeds, drift_weight, ranking, done, total,
                            progress, stop)
    finally:
        if own is not None:
            own.close()

    row_labels = [_row_label(run, ef.epoch, ef.path, ranking, report) for ef in chosen]
    col_labels = [weight_label(w) for w in weights]
    title_base = f"{run.output_name}: epochs x LoRA weight"
    parts = [make_grid(cells[p], row_labels, col_labels, title=f"{title_base} | {spec.prompt}")
             for p, spec in enumerate(specs)]
    image = _stack(parts)
    infotext = _infotext(specs[0], run, chosen, weights, seed, clip_skip, model, len(specs))
    return CompareGrid(image=image, row_labels=row_labels, col_labels=col_labels,
                       epochs=[ef.epoch for ef in chosen], files=[ef.path for ef in chosen], weights=weights,
                       prompts=[s.prompt for s in specs], seed=seed, infotext=infotext, ranking=ranking, cells=cells,
                       failed=failed, drift=report)


def _drift(render: Renderer, chosen, controls, spec, n_seeds, weight, ranking, done, total, progress, stop):
    """The drift report of the chosen epochs (one the failed cells did not spoil: a failure is reported)."""
    from .drift import DRIFT_WEIGHT, measure_drift, suggest, unavailable
    if not controls:
        return unavailable("the run's captions hold nothing but the trigger and it has no class prompt; pass "
                           "control prompts")

    def step(d: int, _t: int) -> None:
        if progress is not None:
            progress(done + d, total)
    w, h = spec.size()
    try:
        report = measure_drift(render, chosen, controls, seed=int(spec.seed), n_seeds=n_seeds,
                               weight=DRIFT_WEIGHT if weight is None else float(weight),
                               negative_prompt=spec.negative_prompt, steps=spec.steps, width=w, height=h,
                               sampler=spec.sampler, cfg_scale=spec.scale, progress=step, stop=stop)
    except Interrupted:
        raise
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - the grid stands without the drift numbers
        return unavailable(f"drawing the control prompts failed: {short_reason(exc)}")
    return suggest(report, ranking)


def _render_cell(render: Renderer, specs, ef: EpochFile, weight: float, failed: list[FailedCell]) -> list:
    """One (epoch, weight) cell per prompt; a cell whose sampler raised or gave a NaN image becomes a "failed"
    tile and an entry in `failed` (the rest of the grid is still drawn)."""
    try:
        images = list(render(specs, ef, weight))
        if len(images) != len(specs):
            raise ValueError(f"renderer gave {len(images)} images for {len(specs)} prompts")
    except Interrupted:
        raise
    except Exception as exc:  # noqa: BLE001 - one cell's failure is shown in that cell
        reason = short_reason(exc)
        failed.extend(FailedCell(reason, ef.epoch, float(weight), s.prompt, ef.path) for s in specs)
        return [failed_tile(s.size(), reason) for s in specs]
    out = []
    for spec, img in zip(specs, images):
        if is_nan_image(img):
            failed.append(FailedCell(bad_image_reason([img]) or "", ef.epoch, float(weight), spec.prompt, ef.path))
            img = failed_tile(img.size, failed[-1].reason)
        out.append(img)
    return out


def _load_base(run: RunInfo, device: str):
    from ..models import load_sd_model
    from ..training.loop import resolve_device
    base = run.base_model
    if not base:
        raise ConfigError(f"{run.record_path}: the record names no base model; pass one")
    if not os.path.exists(base):
        raise ModelError(f"the run's base model {base} is not there any more; pass the checkpoint to use")
    return load_sd_model(base, device=resolve_device(device))


def _stack(parts: list[Image.Image]) -> Image.Image:
    if len(parts) == 1:
        return parts[0]
    out = Image.new("RGB", (max(p.width for p in parts), sum(p.height for p in parts)), (255, 255, 255))
    y = 0
    for p in parts:
        out.paste(p, (0, y))
        y += p.height
    return out


def _infotext(spec, run: RunInfo, chosen, weights, seed, clip_skip, model, n_prompts) -> str:
    from ..sampling.pipeline import infotext
    w, h = spec.size()
    text = infotext(spec, seed, w, h, spec.sampler, clip_skip, getattr(getattr(model, "info", None), "name", None))
    extra = (f", Script: LoRA compare, Y Type: LoRA epoch, Y Values: \"{', '.join(str(f.epoch) for f in chosen)}\""
             f", X Type: LoRA weight, X Values: \"{', '.join(f'{x:g}' for x in weights)}\""
             f", LoRA: {run.output_name}")
    if n_prompts > 1:
        extra += f", Prompts: {n_prompts}"
    return text + extra


def save_compare_grid(grid: CompareGrid, path: str) -> str:
    """Write the grid PNG with its infotext, labels and loss table (atomic); also `<path>.json` beside it."""
    from ..fsutil import atomic_write_json
    from ..sampling.grid import save_png_with_text
    save_png_with_text(grid.image, path, grid.png_text())
    atomic_write_json(os.path.splitext(path)[0] + ".json", grid.to_dict())
    return path
