"""Repeat counts and regularisation folders, and the dataset summary with the engine's steps formula in words.

The steps come from the engine (`dataset.steps.plan_steps_for_datasets`, sd-scripts' arithmetic); nothing here
counts steps on its own.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from ..dataset.config import datasets_from_folders, parse_folder_name
from ..dataset.images import list_images
from ..dataset.steps import plan_steps_for_datasets
from ..errors import ConfigError, DataError
from .layout import quiet_engine_logs

# lora-scripts (a popular sd-scripts GUI) picks the repeats of a folder it creates from the image count
SUGGESTION_RULE = ((10, 7), (50, 5), (100, 3))
SUGGESTION_SOURCE = ("lora-scripts' rule for a new image folder: 7 repeats for up to 10 images, 5 up to 50, "
                     "3 up to 100, 1 above")


@dataclass
class RepeatSuggestion:
    repeats: int
    images: int
    reason: str


def suggest_repeats(n_images: int) -> RepeatSuggestion:
    """Repeats for a folder of `n_images` images, with where the number comes from."""
    if n_images < 0:
        raise ConfigError(f"image count must not be negative, got {n_images}")
    repeats = next((r for limit, r in SUGGESTION_RULE if n_images <= limit), 1)
    return RepeatSuggestion(repeats, n_images, f"{repeats} repeats for {n_images} images ({SUGGESTION_SOURCE})")


def check_repeats(repeats: object) -> int:
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"repeats must be a whole number of at least 1, got {repeats!r}")
    return repeats


def folder_name(repeats: int, name: str) -> str:
    """`<repeats>_<name>`, the sd-scripts folder name (the name gives the class tokens)."""
    check_repeats(repeats)
    name = name.strip()
    if not name or any(c in name for c in "/\\") or name in (".", ".."):
        raise ConfigError(f"folder name must be a plain name without slashes, got {name!r}")
    return f"{repeats}_{name}"


def rename_repeats(folder: str, repeats: int) -> str:
    """Rename `N_name` (or `name`) to `<repeats>_name`; returns the new path. For folders the project owns."""
    check_repeats(repeats)
    folder = os.path.normpath(folder)
    if not os.path.isdir(folder):
        raise DataError(f"not a folder: {folder}")
    base = os.path.basename(folder)
    parsed = parse_folder_name(base)
    name = parsed[1] if parsed is not None else base
    target = os.path.join(os.path.dirname(folder), folder_name(repeats, name))
    if os.path.normcase(os.path.abspath(target)) == os.path.normcase(os.path.abspath(folder)):
        return folder
    if os.path.exists(target):
        raise DataError(f"cannot rename {base} to {os.path.basename(target)}: that folder already exists")
    os.rename(folder, target)
    return target


@dataclass
class FolderInfo:
    name: str
    path: str
    repeats: int
    images: int
    is_reg: bool
    samples: int                      # images x repeats (before the engine balances reg images)
    suggestion: RepeatSuggestion | None = None


@dataclass
class DatasetSummary:
    folders: list[FolderInfo]
    total_steps: int
    epochs: int
    steps_per_epoch: int
    formula: str                      # the engine's steps formula in words
    settings: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        lines = []
        for f in self.folders:
            kind = "reg " if f.is_reg else ""
            line = f"  {kind}{f.name}: {f.images} images × {f.repeats} repeats = {f.samples} samples"
            if f.suggestion is not None and f.suggestion.repeats != f.repeats:
                line += f" (suggested: {f.suggestion.reason})"
            lines.append(line)
        lines.append(f"steps: {self.formula}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["text"] = self.text
        return d


def dataset_summary(train_dir: str, reg_dir: str | None = None, *, resolution: int = 512,
                    batch_size: int = 1, enable_bucket: bool = True, max_train_epochs: int | None = None,
                    max_train_steps: int | None = None, gradient_accumulation_steps: int = 1,
                    seed: int = 0) -> DatasetSummary:
    """Folders with their repeats (and suggestions) plus the engine's step plan for these settings."""
    general = {"resolution": resolution, "train_batch_size": batch_size, "enable_bucket": enable_bucket}
    with quiet_engine_logs():
        datasets = datasets_from_folders(train_dir, reg_dir, general)
        plan = plan_steps_for_datasets(datasets, seed, max_train_epochs=max_train_epochs,
                                       max_train_steps=max_train_steps,
                                       gradient_accumulation_steps=gradient_accumulation_steps)
    folders = []
    for ds in datasets:
        for sub in ds.subsets:
            n = len(list_images(sub.image_dir))
            folders.append(FolderInfo(os.path.basename(os.path.normpath(sub.image_dir)), sub.image_dir,
                                      sub.num_repeats, n, sub.is_reg, n * sub.num_repeats,
                                      None if sub.is_reg else suggest_repeats(n)))
    settings = {"resolution": resolution, "batch_size": batch_size, "enable_bucket": enable_bucket,
                "max_train_epochs": max_train_epochs, "max_train_steps": max_train_steps,
                "gradient_accumulation_steps": gradient_accumulation_steps}
    return DatasetSummary(folders, plan.total_steps, plan.epochs, plan.steps_per_epoch, plan.formula, settings)
