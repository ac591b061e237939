"""A finished (or stopped) run as the Compare view sees it: its record, epoch files, base model, trigger word."""
from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..record import RECORD_SUFFIX, read_run_record


@dataclass
class EpochFile:
    epoch: int
    path: str
    step: int | None = None
    kind: str = "epoch"           # "epoch" | "final"

    @property
    def name(self) -> str:
        return os.path.splitext(os.path.basename(self.path))[0]


@dataclass
class RunInfo:
    record_path: str
    record: dict[str, Any]
    files: list[EpochFile] = field(default_factory=list)   # by epoch, one per epoch, only files that exist
    missing: list[str] = field(default_factory=list)       # listed in the record but gone (pruned, moved)

    @property
    def output_name(self) -> str:
        return str(self.record.get("output_name") or os.path.basename(self.record_path)[:-len(RECORD_SUFFIX)])

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.record.get("config") or {})

    @property
    def base_model(self) -> str | None:
        return self.config.get("pretrained_model_name_or_path") or None

    @property
    def resolution(self) -> tuple[int, int]:
        from ..config import parse_resolution
        try:
            return parse_resolution(self.config.get("resolution", 512))
        except ConfigError:
            return 512, 512

    def file_for(self, epoch: int) -> EpochFile | None:
        return next((f for f in self.files if f.epoch == epoch), None)


def find_record(path: str) -> str:
    """The run.json named by `path`: the file itself, or the only run record in a folder."""
    if os.path.isfile(path):
        if not path.endswith(RECORD_SUFFIX):
            raise ConfigError(f"{path} is not a run record (expected a file ending in {RECORD_SUFFIX} or a "
                              f"folder holding one)")
        return path
    if not os.path.isdir(path):
        raise ConfigError(f"run not found: {path}")
    found = sorted(n for n in os.listdir(path) if n.endswith(RECORD_SUFFIX))
    if not found:
        raise ConfigError(f"{path} holds no run record (*{RECORD_SUFFIX}); point at the folder a training run "
                          f"wrote its LoRA files to")
    if len(found) > 1:
        raise ConfigError(f"{path} holds {len(found)} runs ({', '.join(found)}); name one of the "
                          f"{RECORD_SUFFIX} files")
    return os.path.join(path, found[0])


def open_run(path: str) -> RunInfo:
    """Read a run record and find its epoch files (kind "epoch" and "final"; step files are left out)."""
    record_path = find_record(path)
    try:
        record = read_run_record(record_path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read run record {record_path}: {exc}") from None
    folder = os.path.dirname(os.path.abspath(record_path))
    by_epoch: dict[int, EpochFile] = {}
    missing = []
    for out in record.get("outputs") or []:
        if out.get("kind") not in ("epoch", "final") or out.get("epoch") is None:
            continue
        # the record's folder wins over the stored absolute path, so a moved run folder still works
        path_here = os.path.join(folder, os.path.basename(str(out.get("path"))))
        path_use = path_here if os.path.exists(path_here) else str(out.get("path"))
        if not os.path.exists(path_use):
            missing.append(os.path.basename(path_use))
            continue
        ep = EpochFile(int(out["epoch"]), path_use, out.get("step"), out.get("kind"))
        old = by_epoch.get(ep.epoch)
        if old is None or (old.kind != "final" and ep.kind == "final"):
            by_epoch[ep.epoch] = ep
    return RunInfo(record_path, record, [by_epoch[e] for e in sorted(by_epoch)], missing)


_FOLDER = re.compile(r"^\d+_(.+)$")


def trigger_word(record: dict[str, Any]) -> str | None:
    """The run's trigger: metadata_trigger_phrase, else the most frequent caption tag (the one every caption
    starts with, usually), else the class token of the first `N_name` folder."""
    cfg = record.get("config") or {}
    if cfg.get("metadata_trigger_phrase"):
        return str(cfg["metadata_trigger_phrase"]).strip() or None
    dataset = record.get("dataset") or {}
    counts: Counter[str] = Counter()
    for freq in (dataset.get("tag_frequency") or {}).values():
        for tag, n in (freq or {}).items():
            if tag.strip():
                counts[tag.strip()] += int(n)
    if counts:
        top = max(counts.values())
        return next(t for t, n in counts.items() if n == top)   # first seen among the most frequent
    for name in (dataset.get("dataset_dirs") or {}):
        m = _FOLDER.match(name)
        if m and m.group(1).strip():
            return m.group(1).strip()
    return None
