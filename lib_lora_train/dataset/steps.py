"""How many steps and epochs a run has: sd-scripts' arithmetic (`train_network.py`), plus the words for it.

`plan_steps` is the one function that decides; the UI's live estimate uses `plan_steps_for_datasets`.
- epoch mode (max_train_epochs set): total = epochs × ceil(batches / processes / grad-accum);
- step mode (default 1600 steps): epochs = ceil(total / ceil(ceil(batches / processes) / grad-accum)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import ConfigError, DataError
from .config import DatasetParams

DEFAULT_MAX_TRAIN_STEPS = 1600


@dataclass(frozen=True)
class StepPlan:
    total_steps: int
    epochs: int
    steps_per_epoch: int            # optimizer steps per epoch on each process
    num_batches_per_epoch: int
    gradient_accumulation_steps: int
    num_processes: int
    mode: str                       # "epochs" | "steps"
    samples_per_epoch: int | None
    formula: str


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def _data_words(summary: dict) -> str:
    parts, reg_raw, train_samples = [], 0, 0
    for ds in summary["datasets"]:
        for sub in ds["subsets"]:
            if sub["is_reg"]:
                reg_raw += sub["img_count"] * sub["num_repeats"]
            else:
                parts.append(f"{sub['img_count']} images × {sub['num_repeats']} repeats")
                train_samples += sub["img_count"] * sub["num_repeats"]
    samples = summary["samples_per_epoch"]
    words = " + ".join(parts) if parts else "0 images"
    words += f" = {train_samples} samples"
    reg_used = samples - train_samples
    if reg_raw:
        trimmed = f", {reg_raw - reg_used} of {reg_raw} unused" if reg_raw > reg_used else ""
        words += f" (+{reg_used} reg{trimmed})"
    sizes = sorted({ds["batch_size_per_device"] for ds in summary["datasets"]})
    n_buckets = sum(len(ds["bucket_info"]["buckets"]) if ds["bucket_info"] else 1 for ds in summary["datasets"])
    words += f" → {summary['num_batches_per_epoch']} batches of {'/'.join(map(str, sizes))}"
    if n_buckets > 1:
        words += f" in {n_buckets} buckets"
    return words


def plan_steps(num_batches_per_epoch: int, *, gradient_accumulation_steps: int = 1, num_processes: int = 1,
               max_train_epochs: int | None = None, max_train_steps: int | None = None,
               data_summary: dict | None = None) -> StepPlan:
    """Total steps and epochs; `data_summary` (TrainingData.summary()) only adds words to `formula`."""
    if num_batches_per_epoch < 1:
        raise DataError("the dataset has no batches (no images were found), so no steps can be planned")
    ga = _positive("gradient_accumulation_steps", gradient_accumulation_steps)
    procs = _positive("num_processes", num_processes)
    batches = num_batches_per_epoch
    # what each process iterates over (accelerate shards the batches evenly, rounding up)
    per_process = math.ceil(batches / procs)
    steps_per_epoch = math.ceil(per_process / ga)
    head = _data_words(data_summary) if data_summary else f"{batches} batches"
    div = f"{batches} batches" + (f" / {procs} processes" if procs > 1 else "") + f" / grad-accum {ga}"
    if max_train_epochs is not None:
        epochs = _positive("max_train_epochs", max_train_epochs)
        total = epochs * steps_per_epoch  # = E × ceil(batches / processes / GA), as in sd-scripts
        formula = (f"{head} per epoch; ceil({div}) = {steps_per_epoch} steps/epoch × {epochs} epochs "
                   f"= {total} steps")
        mode = "epochs"
    else:
        total = _positive("max_train_steps",
                          DEFAULT_MAX_TRAIN_STEPS if max_train_steps is None else max_train_steps)
        epochs = math.ceil(total / steps_per_epoch)
        formula = (f"{head} per epoch; ceil({div}) = {steps_per_epoch} steps/epoch; {total} steps "
                   f"(max_train_steps) → {epochs} epochs")
        mode = "steps"
    samples = data_summary.get("samples_per_epoch") if data_summary else None
    return StepPlan(total, epochs, steps_per_epoch, batches, ga, procs, mode, samples, formula)


def plan_steps_for_data(data, **kwargs: Any) -> StepPlan:
    """plan_steps for a scanned TrainingData, with the data described in the formula."""
    summary = data.summary()
    return plan_steps(summary["num_batches_per_epoch"], data_summary=summary, **kwargs)


def plan_steps_for_datasets(datasets: Sequence[DatasetParams], seed: int = 0, **kwargs: Any) -> StepPlan:
    """Scan (image headers and captions only) and plan; for live estimates in a UI."""
    from .data import TrainingData  # local: data imports the image stack, steps alone should not

    return plan_steps_for_data(TrainingData(datasets, seed), **kwargs)
