"""A dataset project folder and importing images into it.

    <project>/project.json     name, trigger word, purpose (character | style), created
    <project>/source/          byte copies of what was imported (uploads vanish; lets you preprocess again)
    <project>/img/N_name/      the training folder: processed copies + captions (train_data_dir = img/)
    <project>/reg/N_class/     regularisation images (reg_data_dir = reg/)
    <project>/.tag_history/    undo levels of the tag editor

The user's originals are only ever read.
"""
from __future__ import annotations

import os
import shutil
import threading
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Callable, Sequence

from ..dataset.config import parse_folder_name
from ..dataset.images import list_images
from ..errors import ConfigError, DataError
from ..fsutil import atomic_write, atomic_write_json
from .check import GUIDANCE, check_dataset, lint_files
from .preprocess import PreprocessItem, PreprocessOptions, PreprocessResult, collect_sources, preprocess
from .repeats import RepeatSuggestion, folder_name, rename_repeats, suggest_repeats
from .report import CheckReport

PROJECT_FILE = "project.json"
PROJECT_VERSION = 1


@dataclass
class Project:
    root: str
    name: str
    trigger: str = ""
    purpose: str | None = None        # character | style | None
    created: str = ""
    version: int = PROJECT_VERSION

    @property
    def train_dir(self) -> str:
        return os.path.join(self.root, "img")

    @property
    def reg_dir(self) -> str:
        return os.path.join(self.root, "reg")

    @property
    def source_dir(self) -> str:
        return os.path.join(self.root, "source")

    @property
    def history_dir(self) -> str:
        return os.path.join(self.root, ".tag_history")

    def folders(self, reg: bool = False) -> list[str]:
        """The `N_name` folders of img/ (or reg/), sorted."""
        base = self.reg_dir if reg else self.train_dir
        if not os.path.isdir(base):
            return []
        return sorted(e.path for e in os.scandir(base) if e.is_dir() and not e.name.startswith(".")
                      and parse_folder_name(e.name) is not None)

    def find_folder(self, name: str, reg: bool = False) -> str | None:
        """The folder whose class name (after `N_`) is `name`, whatever its repeats."""
        for path in self.folders(reg):
            parsed = parse_folder_name(os.path.basename(path))
            if parsed is not None and parsed[1] == name:
                return path
        return None

    def set_repeats(self, folder: str, repeats: int) -> str:
        """Rename one of this project's folders to the new repeat count; returns its new path."""
        path = folder if os.path.isabs(folder) else os.path.join(self.train_dir, folder)
        if not os.path.isdir(path) and not os.path.isabs(folder):
            path = os.path.join(self.reg_dir, folder)
        real = os.path.realpath(path)
        if os.path.dirname(real) not in (os.path.realpath(self.train_dir), os.path.realpath(self.reg_dir)):
            raise ConfigError(f"{folder} is not a folder of the project {self.root} (only the project's own folders "
                              f"are renamed)")
        return rename_repeats(path, repeats)

    def save(self) -> None:
        data = {k: v for k, v in asdict(self).items() if k != "root"}
        atomic_write_json(os.path.join(self.root, PROJECT_FILE), data)


def is_project(path: str) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), PROJECT_FILE))


def _check_purpose(purpose: str | None) -> None:
    if purpose is not None and purpose not in GUIDANCE:
        raise ConfigError(f"purpose must be one of {', '.join(GUIDANCE)} (or unset), got {purpose!r}")


def create_project(root: str, name: str, *, trigger: str = "", purpose: str | None = None) -> Project:
    """A new project folder (or the existing project at `root`, unchanged)."""
    root = os.fspath(root)
    if is_project(root):
        return open_project(root)
    _check_purpose(purpose)
    folder_name(1, name)  # the name becomes a folder name: validate it now
    if os.path.isdir(root) and os.listdir(root):
        raise ConfigError(f"{root} is not empty and is not a project; choose a new or empty folder")
    project = Project(root, name.strip(), trigger.strip(), purpose,
                      datetime.now(timezone.utc).isoformat(timespec="seconds"))
    for d in (project.train_dir, project.source_dir):
        os.makedirs(d, exist_ok=True)
    project.save()
    return project


def open_project(root: str) -> Project:
    root = os.fspath(root)
    import json
    try:
        with open(os.path.join(root, PROJECT_FILE), encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise DataError(f"{root} is not a project folder (no {PROJECT_FILE})") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {os.path.join(root, PROJECT_FILE)}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise DataError(f"{os.path.join(root, PROJECT_FILE)} is not a project file (no name)")
    return Project(root, data["name"], data.get("trigger") or "", data.get("purpose"), data.get("created", ""),
                   int(data.get("version", PROJECT_VERSION)))


@dataclass
class ImportResult:
    folder: str                                # the N_name folder the images went into
    check: CheckReport                         # the lint of what was imported
    preprocess: PreprocessResult
    copies: list[str] = field(default_factory=list)   # byte copies kept in source/
    suggestion: RepeatSuggestion | None = None

    def to_dict(self) -> dict:
        return {"folder": self.folder, "check": self.check.to_dict(), "preprocess": self.preprocess.to_dict(),
                "copies": self.copies, "suggestion": asdict(self.suggestion) if self.suggestion else None}


def _copy_sources(sources: Sequence[str], dest: str, caption_extension: str) -> list[str]:
    """Byte copies of the sources (and their captions) into `dest`, numbered on a name clash."""
    os.makedirs(dest, exist_ok=True)
    copies = []
    for src in sources:
        if not os.path.isfile(src):
            continue
        stem, ext = os.path.splitext(os.path.basename(src))
        candidate, k = stem, 2
        while (os.path.exists(os.path.join(dest, candidate + ext))
               or os.path.exists(os.path.join(dest, candidate + caption_extension))):
            candidate, k = f"{stem}-{k}", k + 1
        for path, out_ext in ((src, ext), (os.path.splitext(src)[0] + caption_extension, caption_extension)):
            if path is not src and not os.path.isfile(path):
                continue
            target = os.path.join(dest, candidate + out_ext)
            try:
                atomic_write(target, lambda tmp, p=path: shutil.copyfile(p, tmp))
            except OSError:
                continue  # unreadable: the check names it; the copy is only a convenience
            if path is src:
                copies.append(target)
    return copies


def _import(project: Project, sources: str | Sequence[str], *, reg: bool, name: str, repeats: int | None,
            recursive: bool, options: PreprocessOptions | None, keep_copies: bool,
            progress: Callable[[int, int, PreprocessItem], None] | None,
            stop: threading.Event | None) -> ImportResult:
    opts = options or PreprocessOptions()
    opts.validate()
    base = project.reg_dir if reg else project.train_dir
    paths = collect_sources(sources, recursive=recursive, caption_extension=opts.caption_extension,
                            exclude=[project.root])
    if not paths:
        raise DataError(f"nothing to import from {sources}")
    root = os.fspath(sources) if isinstance(sources, (str, os.PathLike)) else ""
    report = lint_files(paths, caption_extension=opts.caption_extension, max_pixels=opts.max_pixels,
                        workers=opts.workers, root=root, stop=stop)
    existing = project.find_folder(name, reg)
    n_new = sum(1 for f in report.files if f.usable)
    suggestion = None
    if existing is not None:
        folder = existing if repeats is None else project.set_repeats(existing, repeats)
    else:
        if repeats is None:
            suggestion = suggest_repeats(n_new) if not reg else RepeatSuggestion(1, n_new, "1 repeat for "
                                                                                 "regularisation images")
            repeats = suggestion.repeats
        folder = os.path.join(base, folder_name(repeats, name))
    if repeats is not None and existing is None:
        os.makedirs(folder, exist_ok=True)
    copies = []
    if keep_copies:
        sub = os.path.join(project.source_dir, "reg" if reg else "img", os.path.basename(folder).split("_", 1)[1])
        copies = _copy_sources(paths, sub, opts.caption_extension)
    result = preprocess(paths, folder, opts, progress=progress, stop=stop)
    return ImportResult(folder, report, result, copies, suggestion)


def import_images(project: Project, sources: str | Sequence[str], *, name: str | None = None,
                  repeats: int | None = None, recursive: bool = False, options: PreprocessOptions | None = None,
                  keep_copies: bool = True, progress: Callable[[int, int, PreprocessItem], None] | None = None,
                  stop: threading.Event | None = None) -> ImportResult:
    """Import a folder (optionally recursive) or a list of files (uploads): check them, keep byte copies in
    source/, and preprocess them into img/<repeats>_<name> (an existing folder of that name is reused; without
    `repeats` a new folder gets the suggested count). Originals are only read."""
    return _import(project, sources, reg=False, name=name or project.name, repeats=repeats, recursive=recursive,
                   options=options, keep_copies=keep_copies, progress=progress, stop=stop)


def add_reg_images(project: Project, sources: str | Sequence[str], class_name: str, *, repeats: int = 1,
                   recursive: bool = False, options: PreprocessOptions | None = None, keep_copies: bool = True,
                   progress: Callable[[int, int, PreprocessItem], None] | None = None,
                   stop: threading.Event | None = None) -> ImportResult:
    """Regularisation (class) images into reg/<repeats>_<class_name>, preprocessed like the training images."""
    return _import(project, sources, reg=True, name=class_name, repeats=repeats, recursive=recursive,
                   options=options, keep_copies=keep_copies, progress=progress, stop=stop)


def project_images(project: Project) -> list[str]:
    return [p for folder in project.folders() for p in list_images(folder)]


def check_path(path: str, reg_dir: str | None = None, **kwargs) -> CheckReport:
    """`check_dataset` for a training folder, or for a project folder (its img/ and reg/ with its purpose)."""
    if is_project(path):
        project = open_project(path)
        kwargs.setdefault("purpose", project.purpose)
        reg = reg_dir or (project.reg_dir if os.path.isdir(project.reg_dir) else None)
        return check_dataset(project.train_dir, reg, **kwargs)
    return check_dataset(path, reg_dir, **kwargs)
