"""The History section's pure functions: table rows from run records, a run's notes, and deleting one run's
files (only that run's, only inside the project's output folder).

Notes live beside the record as `<output_name>.notes.txt`: run.json belongs to the engine, which may be writing
it while the run goes on.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from typing import Any

from ..errors import ConfigError
from ..fsutil import atomic_write_bytes
from ..hosts.base import inside, safe_child
from ..hosts.outputs import preview_path, sidecar_path
from ..record import EVENTS_SUFFIX, RECORD_SUFFIX, list_runs
from .presets import network_type_of

HEADERS = ("Run", "Status", "Started", "Images", "Repeats", "Epochs", "Dim", "Alpha", "Batch size", "U-Net LR",
           "Text encoder LR", "Optimizer", "Network", "Steps", "Duration", "Last loss", "Files")
NOTES_SUFFIX = ".notes.txt"
_MODEL_EXTS = (".safetensors", ".ckpt", ".pt")
_SIDE_EXTS = (".json", ".preview.png")


def _num(v: Any) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def duration_text(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or seconds < 0:
        return ""
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m" if h else (f"{m}m {s:02d}s" if m else f"{s}s")


def status_text(rec: dict[str, Any]) -> str:
    """The Status column: a run whose process was killed or crashed says so (it never reads "running" forever)."""
    status = str(rec.get("status", ""))
    return f"{status} (crashed)" if rec.get("crashed") and status in ("interrupted", "failed") else status


def run_row(rec: dict[str, Any]) -> list[Any]:
    cfg = rec.get("config") or {}
    ds = rec.get("dataset") or {}
    dirs = ds.get("dataset_dirs") or {}
    images = sum(int(d.get("img_count") or 0) for d in dirs.values()) if dirs else ""
    repeats = "/".join(sorted({str(d.get("n_repeats")) for d in dirs.values()})) if dirs else ""
    net = rec.get("network") or {}
    steps = rec.get("steps") or {}
    total = steps.get("total_steps")
    step = rec.get("step")
    te = "" if cfg.get("network_train_unet_only") else _num(
        cfg.get("text_encoder_lr") if cfg.get("text_encoder_lr") is not None else cfg.get("learning_rate"))
    unet = _num(cfg.get("unet_lr") if cfg.get("unet_lr") is not None else cfg.get("learning_rate"))
    started = rec.get("started") or rec.get("created")
    files = [os.path.basename(str(o.get("path"))) for o in rec.get("outputs") or [] if o.get("path")]
    loss = rec.get("last_loss")
    return [
        rec.get("output_name", ""), status_text(rec),
        time.strftime("%Y-%m-%d %H:%M", time.localtime(started)) if isinstance(started, (int, float)) else "",
        images, repeats, _num(steps.get("epochs") or cfg.get("max_train_epochs")),
        _num(net.get("dim", cfg.get("network_dim"))), _num(net.get("alpha", cfg.get("network_alpha"))),
        _num(cfg.get("train_batch_size")), unet, te, cfg.get("optimizer_type", ""),
        network_type_of(cfg.get("network_module"), cfg.get("network_args")),
        f"{step or 0}/{total}" if total else _num(step), duration_text(rec.get("seconds")),
        f"{loss:.4f}" if isinstance(loss, (int, float)) else "", ", ".join(files),
    ]


def run_rows(records: list[dict[str, Any]]) -> list[list[Any]]:
    return [run_row(r) for r in records]


def find_record(output_dir: str, output_name: str) -> dict[str, Any]:
    safe_child(output_dir, output_name, what="run")
    for rec in list_runs(output_dir):
        if rec.get("output_name") == output_name:
            return rec
    raise ConfigError(f"no run called '{output_name}' in {output_dir}")


def notes_path(output_dir: str, output_name: str) -> str:
    return safe_child(output_dir, output_name, what="run") + NOTES_SUFFIX


def read_notes(output_dir: str, output_name: str) -> str:
    try:
        with open(notes_path(output_dir, output_name), encoding="utf-8") as fh:
            return fh.read()
    except FileNotFoundError:
        return ""


def write_notes(output_dir: str, output_name: str, text: str) -> str:
    path = notes_path(output_dir, output_name)
    if not os.path.isfile(path[:-len(NOTES_SUFFIX)] + RECORD_SUFFIX):
        raise ConfigError(f"no run called '{output_name}' in {output_dir}")
    atomic_write_bytes(path, (text or "").encode("utf-8"))
    return path


def _own_names(name: str) -> re.Pattern:
    n = re.escape(name)
    model = "|".join(re.escape(e) for e in _MODEL_EXTS + _SIDE_EXTS)
    return re.compile(rf"^{n}(?:-\d+|-step\d+)?(?:{model})$|^{n}(?:-\d+|-step\d+)?-state$|"
                      rf"^{n}(?:{re.escape(RECORD_SUFFIX)}|{re.escape(EVENTS_SUFFIX)}|{re.escape(NOTES_SUFFIX)})$")


def _record_files(output_dir: str, rec: dict[str, Any]) -> set[str]:
    """Paths a record names: its outputs with their card files, its samples, its state folder."""
    found: set[str] = set()
    for o in rec.get("outputs") or []:
        p = o.get("path")
        if p:
            found.update({os.path.abspath(str(p)), sidecar_path(os.path.abspath(str(p))),
                          preview_path(os.path.abspath(str(p)))})
    for s in rec.get("samples") or []:
        for p in s.get("paths") or []:
            found.add(os.path.abspath(str(p)))
    if rec.get("resume_state"):
        found.add(os.path.abspath(str(rec["resume_state"])))
    return found


def run_files(output_dir: str, output_name: str, records: list[dict[str, Any]] | None = None) -> list[str]:
    """Every existing file or state folder of one run, all inside `output_dir`; never another run's files."""
    out_dir = os.path.abspath(output_dir)
    safe_child(out_dir, output_name, what="run")
    records = list_runs(out_dir) if records is None else records
    mine = [r for r in records if r.get("output_name") == output_name]
    others = [r for r in records if r.get("output_name") != output_name]
    pattern = _own_names(output_name)
    candidates: set[str] = set()
    if os.path.isdir(out_dir):
        candidates.update(os.path.join(out_dir, e) for e in os.listdir(out_dir) if pattern.match(e))
    for rec in mine:
        candidates.update(_record_files(out_dir, rec))
    protected: set[str] = set()
    for rec in others:
        protected.update(_record_files(out_dir, rec))
        other = str(rec.get("output_name") or "")
        if other:
            protected.update(os.path.join(out_dir, other + s) for s in (RECORD_SUFFIX, EVENTS_SUFFIX, NOTES_SUFFIX))
    keep = []
    for p in sorted(candidates - protected):
        # the entry itself must lie in the output folder (a link is removed as a link, never followed)
        parent = os.path.dirname(p)
        if not inside(parent, [out_dir]) or not os.path.lexists(p):
            continue
        if os.path.isdir(p) and not os.path.islink(p) and not p.endswith("-state"):
            continue
        keep.append(p)
    return keep


def delete_run(output_dir: str, output_name: str, *, active: bool = False) -> list[str]:
    """Delete one run's files (see run_files); refuses while the run is active. Returns what was deleted."""
    if active:
        raise ConfigError(f"run '{output_name}' is still training; stop it first")
    find_record(output_dir, output_name)
    paths = run_files(output_dir, output_name)
    out_dir = os.path.realpath(output_dir)
    deleted = []
    for p in paths:
        if os.path.realpath(os.path.dirname(p)) != out_dir and not inside(os.path.dirname(p), [out_dir]):
            continue
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.unlink(p)
        deleted.append(p)
    return deleted
