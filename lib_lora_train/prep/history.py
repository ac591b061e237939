"""Undo history of caption edits, kept on disk so a page reload (or a new process) can still undo.

One level = one batch edit: a JSON file with each touched caption's text before and after. The level is written
before the captions (both atomically), so an edit cut off half-way can still be undone. Undo restores "before"
only where a file still holds the "after" text: a caption changed by hand since then is left alone and reported.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone

from ..errors import ConfigError
from ..fsutil import atomic_write_bytes

MIN_LEVELS = 20
DEFAULT_LEVELS = 50
_LEVEL_FILE = re.compile(r"^(\d{6,})\.json$")


@dataclass
class Change:
    path: str               # relative to the dataset root, "/" separated
    before: str | None      # None: the file did not exist
    after: str | None


@dataclass
class Level:
    id: int
    op: str
    description: str
    time: str
    changes: list[Change] = field(default_factory=list)


@dataclass
class UndoResult:
    level: Level | None                         # None: nothing to undo
    restored: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)   # changed by hand since the edit: left as they are


def write_json(path: str, obj: object) -> None:
    """Atomic JSON in ASCII: paths that are not valid UTF-8 (surrogate-escaped by Python) still round-trip."""
    atomic_write_bytes(path, (json.dumps(obj, indent=1, ensure_ascii=True) + "\n").encode("ascii"))


def read_text(path: str) -> str | None:
    """A caption's text, or None when there is no file. Raises UnicodeDecodeError for non-UTF-8 files."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return None
    return data.decode("utf-8-sig")


def write_text(path: str, text: str | None) -> None:
    if text is None:
        if os.path.exists(path):
            os.unlink(path)
        return
    atomic_write_bytes(path, text.encode("utf-8"))


class History:
    def __init__(self, root: str, folder: str | None = None, max_levels: int = DEFAULT_LEVELS):
        if isinstance(max_levels, bool) or not isinstance(max_levels, int) or max_levels < MIN_LEVELS:
            raise ConfigError(f"the undo history keeps at least {MIN_LEVELS} levels, got {max_levels!r}")
        self.root = root
        self.folder = folder or os.path.join(root, ".tag_history")
        self.max_levels = max_levels

    def _ids(self) -> list[int]:
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for m in map(_LEVEL_FILE.match, names) if m)

    def _path(self, level_id: int) -> str:
        return os.path.join(self.folder, f"{level_id:06d}.json")

    def levels(self) -> list[Level]:
        """Oldest first."""
        out = []
        for i in self._ids():
            level = self._load(i)
            if level is not None:
                out.append(level)
        return out

    def _load(self, level_id: int) -> Level | None:
        try:
            with open(self._path(level_id), encoding="utf-8") as fh:
                d = json.load(fh)
            return Level(d["id"], d["op"], d["description"], d["time"],
                         [Change(c["path"], c["before"], c["after"]) for c in d["changes"]])
        except (OSError, ValueError, KeyError, TypeError):
            return None  # a damaged level cannot be undone; it is skipped

    def record(self, op: str, description: str, changes: list[Change]) -> Level:
        ids = self._ids()
        level = Level((ids[-1] + 1) if ids else 1, op, description,
                      datetime.now(timezone.utc).isoformat(timespec="seconds"), changes)
        write_json(self._path(level.id), {
            "id": level.id, "op": op, "description": description, "time": level.time,
            "changes": [{"path": c.path, "before": c.before, "after": c.after} for c in changes]})
        for old in (ids + [level.id])[:-self.max_levels]:
            try:
                os.unlink(self._path(old))
            except FileNotFoundError:
                pass
        return level

    def abs(self, rel: str) -> str:
        return os.path.join(self.root, *rel.split("/"))

    def rel(self, path: str) -> str:
        return os.path.relpath(path, self.root).replace(os.sep, "/")

    def undo(self) -> UndoResult:
        """Undo the newest level (damaged level files are dropped on the way)."""
        for level_id in reversed(self._ids()):
            level = self._load(level_id)
            if level is None:
                os.unlink(self._path(level_id))
                continue
            result = UndoResult(level)
            for c in level.changes:
                path = self.abs(c.path)
                try:
                    current = read_text(path)
                except (OSError, UnicodeDecodeError):
                    result.conflicts.append(c.path)
                    continue
                if current == c.before:
                    continue  # the edit never reached this file (cut off half-way)
                if current != c.after:
                    result.conflicts.append(c.path)
                    continue
                write_text(path, c.before)
                result.restored.append(c.path)
            os.unlink(self._path(level_id))
            return result
        return UndoResult(None)
