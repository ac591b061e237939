"""Rank a run's epochs by validation loss, suggest one, and say in plain words what the curve shows.

Reading a curve (the explanation the Compare view and `compare` print):
- both losses still falling at the last epoch: the LoRA is probably undertrained; more epochs (or a higher
  learning rate) would likely help;
- training loss falling while validation loss rises: overfitting; the LoRA learns its training images by heart
  and generalises worse; the epoch at the bottom of the validation curve is the one to keep;
- a flat validation curve near its minimum: trained enough; pick by the grid among the lowest epochs.
A validation loss measured on the training images themselves (nothing held out) can show under-training but not
overfitting, and the text says so.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

# Changes smaller than this fraction of the loss are "flat": the diffusion loss is dominated by noise that no
# LoRA can predict, so real differences between epochs are small but, at fixed noise, still meaningful.
TOLERANCE = 0.002

VERDICTS = ("overfitting", "undertrained", "trained", "no_data")


@dataclass
class EpochRow:
    epoch: int                       # 0 = before training (the base model)
    step: int | None = None
    validation_loss: float | None = None
    train_loss: float | None = None  # the epoch's average training loss
    file: str | None = None          # the LoRA file of this epoch, when one was kept
    rank: int | None = None          # 1 = lowest validation loss among the epochs with a file
    suggested: bool = False


@dataclass
class Ranking:
    rows: list[EpochRow] = field(default_factory=list)    # by epoch
    suggested_epoch: int | None = None
    verdict: str = "no_data"
    explanation: str = ""
    source: str | None = None        # "held_out" | "training_images" | None

    def ranked(self) -> list[EpochRow]:
        """Rows with a rank, best first."""
        return sorted((r for r in self.rows if r.rank is not None), key=lambda r: r.rank)

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [asdict(r) for r in self.rows], "suggested_epoch": self.suggested_epoch,
                "verdict": self.verdict, "explanation": self.explanation, "source": self.source}


def _rel(a: float, b: float) -> float:
    return (a - b) / max(abs(b), 1e-12)


def rank_epochs(validation: Mapping[int, float], train: Mapping[int, float] | None = None, *,
                files: Mapping[int, str] | None = None, steps: Mapping[int, int] | None = None,
                source: str | None = None) -> Ranking:
    """Rank epochs (1-based; 0 = before training) by validation loss; only epochs with a file can be suggested
    when `files` is given."""
    train = dict(train or {})
    files = dict(files) if files is not None else None
    steps = dict(steps or {})
    epochs = sorted(set(validation) | set(train) | set(files or {}))
    rows = [EpochRow(e, steps.get(e), validation.get(e), train.get(e), (files or {}).get(e)) for e in epochs]
    ranking = Ranking(rows=rows, source=source)
    candidates = [r for r in rows if r.validation_loss is not None and r.epoch > 0
                  and (files is None or r.file is not None)]
    if not candidates:
        ranking.explanation = ("No validation loss was recorded for these epochs, so they cannot be ranked; "
                               "judge by the grid. Runs record it by default; set validation_split to hold out "
                               "images.")
        return ranking
    for i, r in enumerate(sorted(candidates, key=lambda r: (r.validation_loss, r.epoch)), start=1):
        r.rank = i
    best = min(candidates, key=lambda r: (r.validation_loss, r.epoch))
    best.suggested = True
    ranking.suggested_epoch = best.epoch
    ranking.verdict, ranking.explanation = _read_curve(rows, best, source)
    return ranking


def _trend(values: list[float]) -> float:
    """Least-squares slope per epoch, relative to the mean (0 with fewer than two values)."""
    n = len(values)
    if n < 2:
        return 0.0
    xm, ym = (n - 1) / 2, sum(values) / n
    slope = sum((i - xm) * (v - ym) for i, v in enumerate(values)) / sum((i - xm) ** 2 for i in range(n))
    return slope / max(abs(ym), 1e-12)


def _read_curve(rows: list[EpochRow], best: EpochRow, source: str | None) -> tuple[str, str]:
    val = [r for r in rows if r.validation_loss is not None and r.epoch > 0]
    last = val[-1]
    train_after = [r.train_loss for r in rows if r.train_loss is not None and r.epoch >= best.epoch]
    train_all = [r.train_loss for r in rows if r.train_loss is not None]
    caveat = ""
    if source == "training_images":
        caveat = (" Note: nothing was held out, so this validation loss was measured on training images. It "
                  "shows how well the LoRA fits them and can reveal under-training, but not overfitting: a LoRA "
                  "that memorises its images scores well here. Set validation_split (e.g. 0.1) to hold images "
                  "out and see overfitting.")
    head = f"Suggested: epoch {best.epoch} (lowest validation loss, {best.validation_loss:.4f})."

    rise = _rel(last.validation_loss, best.validation_loss)
    if best.epoch < last.epoch and rise > TOLERANCE:
        train_note = ""
        if len(train_after) >= 2 and _trend(train_after) < -TOLERANCE / 2:
            train_note = " while the training loss kept falling"
        text = (f"{head} After epoch {best.epoch} the validation loss rose from {best.validation_loss:.4f} to "
                f"{last.validation_loss:.4f} by epoch {last.epoch}{train_note}: that is overfitting. The LoRA "
                f"keeps learning its training images by heart and gets worse on images it has not seen; later "
                f"epochs tend to copy the training pictures and resist other prompts. Keep epoch {best.epoch}, "
                f"or train fewer epochs / with a lower learning rate next time.")
        return "overfitting", text + caveat

    prev = val[-2] if len(val) >= 2 else None
    val_falling = prev is not None and _rel(prev.validation_loss, last.validation_loss) > TOLERANCE
    train_falling = len(train_all) >= 2 and _trend(train_all[-3:]) < -TOLERANCE / 2
    if best.epoch == last.epoch and val_falling:
        both = " and the training loss" if train_falling else ""
        text = (f"{head} The validation loss{both} {'were' if both else 'was'} still falling at the last epoch "
                f"({prev.validation_loss:.4f} at epoch {prev.epoch} -> {last.validation_loss:.4f} at epoch "
                f"{last.epoch}): the LoRA is probably undertrained. More epochs (or a somewhat higher learning "
                f"rate) would likely help; an undertrained LoRA shows its subject weakly, needs a high weight, "
                f"and the grid's cells change little between epochs.")
        return "undertrained", text + caveat
    text = (f"{head} The validation loss has flattened near its lowest value, which means the LoRA is trained "
            f"enough: neither still improving (undertrained) nor rising again (overfitting). Epochs whose loss "
            f"is within a fraction of a percent are equally good by this measure; pick among them by the grid.")
    return "trained", text + caveat


def ranking_from_record(record: Mapping[str, Any], files: Mapping[int, str] | None = None) -> Ranking:
    """The ranking of a run record (run.json): its per-epoch validation and training losses."""
    validation: dict[int, float] = {}
    steps: dict[int, int] = {}
    for v in record.get("validation") or []:
        if v.get("at") in ("epoch", "start") and v.get("loss") is not None:
            validation[int(v["epoch"])] = float(v["loss"])
            if v.get("step") is not None:
                steps[int(v["epoch"])] = int(v["step"])
    train = {int(e["epoch"]): float(e["avg_loss"]) for e in record.get("epochs") or []
             if e.get("avg_loss") is not None}
    for e in record.get("epochs") or []:
        steps.setdefault(int(e["epoch"]), e.get("step"))
    source = (record.get("validation_source") or {}).get("source")
    return rank_epochs(validation, train, files=files, steps=steps, source=source)


def table_text(ranking: Ranking) -> str:
    """The validation-loss table as plain text (one line per epoch, the suggested one marked)."""
    lines = [f"{'epoch':>5}  {'step':>6}  {'val loss':>9}  {'train loss':>10}  {'rank':>4}  file"]
    for r in ranking.rows:
        def num(v: float | None) -> str:
            return "-" if v is None else f"{v:.4f}"
        name = os.path.basename(r.file) if r.file else ("(base model)" if r.epoch == 0 else "-")
        mark = "  <- suggested" if r.suggested else ""
        lines.append(f"{r.epoch:>5}  {'-' if r.step is None else r.step:>6}  {num(r.validation_loss):>9}  "
                     f"{num(r.train_loss):>10}  {'-' if r.rank is None else r.rank:>4}  {name}{mark}")
    return "\n".join(lines)
