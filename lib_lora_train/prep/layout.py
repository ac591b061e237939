"""Folder mistakes in a training folder, each with the exact fix in words.

The rules are the engine's (`dataset.config`): `train_data_dir` is the parent of `<repeats>_<name>` folders,
only images directly inside those folders are read, the repeat count is the integer before the first `_` and
must be at least 1. The engine's own reader (`datasets_from_folders`) is asked at the end, so this check and
training can never disagree on whether the layout can be trained.
"""
from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..dataset.config import datasets_from_folders, parse_folder_name
from ..dataset.images import list_images
from ..errors import LoraTrainError
from .report import ERROR, INFO, WARNING, CheckReport


@dataclass
class Layout:
    """What a training folder holds, as the check sees it."""
    image_folders: list[str] = field(default_factory=list)     # every folder whose files get checked
    train_folders: list[tuple[str, int]] = field(default_factory=list)  # (path, repeats) training would read
    reg_folders: list[tuple[str, int]] = field(default_factory=list)


@contextmanager
def quiet_engine_logs():
    """The engine logs its dataset warnings; the check reports them itself, so do not print them twice."""
    names = ["lib_lora_train.dataset"] + [n for n in list(logging.root.manager.loggerDict)
                                          if n.startswith("lib_lora_train.dataset.")]
    loggers = [logging.getLogger(n) for n in names]
    before = [lg.disabled for lg in loggers]
    for lg in loggers:
        lg.disabled = True
    try:
        yield
    finally:
        for lg, was in zip(loggers, before):
            lg.disabled = was


def _rename_hint(name: str) -> str:
    m = re.match(r"^(\d+)([^\d_].*)$", name)
    if m:  # "10mychar": only the underscore is missing
        return f"{m.group(1)}_{m.group(2)}"
    m = re.match(r"^(-?\d+)_(.*)$", name)
    if m:  # "0_mychar": a repeat count below 1
        return f"10_{m.group(2)}"
    head, sep, rest = name.partition("_")
    if sep and rest:  # "ten_mychar": the prefix is a word
        return f"10_{rest} (or 10_{name} if '{head}' is part of the name)"
    return f"10_{name}"


def _has_images(path: str) -> int:
    return len(list_images(path))


def _scan(base: str, is_reg: bool, arg: str, report: CheckReport, layout: Layout) -> None:
    kind = "regularisation" if is_reg else "training"
    usable: list[tuple[str, int]] = []
    problems = []  # folder issues whose severity depends on whether anything usable is left
    try:
        entries = sorted((e for e in os.scandir(base) if e.is_dir() and not e.name.startswith(".")),
                         key=lambda e: e.name)
    except OSError as exc:
        report.add("folder_unreadable", ERROR, f"{arg} {base} cannot be read: {exc}", base)
        return
    for entry in entries:
        n = _has_images(entry.path)
        parsed = parse_folder_name(entry.name)
        if n:
            layout.image_folders.append(entry.path)
        for sub in sorted(os.scandir(entry.path), key=lambda e: e.name) if os.access(entry.path, os.R_OK) else []:
            if sub.is_dir() and not sub.name.startswith(".") and _has_images(sub.path):
                report.add("folder_nested", WARNING,
                           f"{_has_images(sub.path)} images in {sub.path} are not read (training reads only the "
                           f"files directly inside {entry.name}); move them up into {entry.path}", sub.path)
        if parsed is None:
            if n:
                problems.append(("folder_no_repeat_prefix", entry.path,
                                 f"folder '{entry.name}' ({n} images) has no numeric repeat prefix, so training "
                                 f"ignores it; rename it to {_rename_hint(entry.name)} (the number is how many "
                                 f"times each image is repeated per epoch)"))
            continue
        repeats = parsed[0]
        if repeats < 1:
            problems.append(("folder_bad_repeats", entry.path,
                             f"folder '{entry.name}' has {repeats} repeats; it must be at least 1, so training "
                             f"ignores it: rename it to {_rename_hint(entry.name)}"))
            continue
        if n == 0:
            report.add("folder_empty", WARNING if not is_reg else INFO,
                       f"folder '{entry.name}' has no images ({', '.join(_exts())} directly inside)", entry.path)
            continue
        usable.append((entry.path, repeats))

    direct = list_images(base)
    if direct:
        layout.image_folders.insert(0, base)
    name = os.path.basename(os.path.normpath(base))
    parent = os.path.dirname(os.path.abspath(base))
    severity = WARNING if usable or is_reg else ERROR
    for code, path, message in problems:
        report.add(code, severity, message, path)
    if direct and not usable:
        parsed = parse_folder_name(name)
        if parsed is not None and parsed[0] >= 1:
            report.add("folder_is_image_folder", ERROR if not is_reg else WARNING,
                       f"{arg} points at the image folder '{name}' itself ({len(direct)} images); point it at "
                       f"its parent folder {parent} instead (the parent of <repeats>_<name> folders)", base)
            if not is_reg:
                # the user's intent is clear: check the folder as the image folder it is
                layout.train_folders.append((base, parsed[0]))
        else:
            report.add("images_in_parent", ERROR if not is_reg else WARNING,
                       f"{len(direct)} images lie directly in {base}, but training reads only <repeats>_<name> "
                       f"subfolders: move them into a new folder {os.path.join(base, '10_' + name)} "
                       f"(10 = repeats per epoch)", base)
    elif direct:
        report.add("images_in_parent", WARNING,
                   f"{len(direct)} images lie directly in {base} and are not used (only <repeats>_<name> "
                   f"subfolders are read); move them into one of {', '.join(os.path.basename(p) for p, _ in usable)}",
                   base)
    if not usable and not direct and not problems:
        report.add("no_images", ERROR if not is_reg else WARNING,
                   f"no {kind} images found: {base} must contain folders named <repeats>_<name> (e.g. 10_mychar) "
                   f"with images ({', '.join(_exts())}) directly inside", base)
    target = layout.reg_folders if is_reg else layout.train_folders
    target.extend(usable)


def _exts() -> list[str]:
    from ..dataset.images import IMAGE_EXTENSIONS
    return list(IMAGE_EXTENSIONS)


def check_layout(train_dir: str, reg_dir: str | None, report: CheckReport) -> Layout:
    """Add the folder issues of `train_dir` (and `reg_dir`) to `report`; return the folders to check."""
    layout = Layout()
    for base, is_reg, arg in ((train_dir, False, "train_data_dir"), (reg_dir, True, "reg_data_dir")):
        if base is None:
            continue
        if not os.path.isdir(base):
            report.add("not_found", ERROR, f"{arg} {base} does not exist or is not a folder", base)
            continue
        _scan(base, is_reg, arg, report, layout)

    # the engine decides whether this layout trains; report its verdict if ours missed it
    if os.path.isdir(train_dir) and not any(i.severity == ERROR for i in report.issues):
        try:
            with quiet_engine_logs():
                datasets_from_folders(train_dir, reg_dir if reg_dir and os.path.isdir(reg_dir) else None,
                                      {"resolution": 512, "enable_bucket": True})
        except LoraTrainError as exc:
            report.add("folder_layout", ERROR, str(exc), train_dir)
    return layout
