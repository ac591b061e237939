"""Tag editor operations over a dataset's caption files (what BooruDatasetTagManager does by hand).

A caption is comma-separated tags on its first line (what training reads); further lines are kept untouched.
Tags are matched ignoring case, `_` versus space and bracket escapes (`black_hair` matches `Black hair`); the
frequency table shows them as written. Every batch edit is one undo level on disk; every write is atomic. A
caption file that is not UTF-8 is never rewritten (it is listed in `skipped`).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from ..dataset.images import list_images
from ..errors import ConfigError, DataError
from .history import DEFAULT_LEVELS, Change, History, UndoResult, read_text, write_text


def split_tags(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def join_tags(tags: Iterable[str]) -> str:
    return ", ".join(tags)


def tag_key(tag: str) -> str:
    """What two spellings of one tag share: lower case, `_` as space, `\\(` as `(`, single spaces."""
    t = tag.strip().lower().replace("\\(", "(").replace("\\)", ")").replace("_", " ")
    return " ".join(t.split())


def _tags_arg(tags: str | Sequence[str]) -> list[str]:
    items = [tags] if isinstance(tags, str) else list(tags)
    return [t for item in items for t in split_tags(item)]


def dedupe_tags(tags: Sequence[str]) -> list[str]:
    seen, out = set(), []
    for t in tags:
        k = tag_key(t)
        if k not in seen:
            seen.add(k)
            out.append(t)
    return out


@dataclass(frozen=True)
class TagFilter:
    """Images whose tags include all of `all_of`, at least one of `any_of` (when given), none of `none_of`."""
    all_of: tuple[str, ...] = ()
    any_of: tuple[str, ...] = ()
    none_of: tuple[str, ...] = ()

    @classmethod
    def of(cls, all_of: Iterable[str] = (), any_of: Iterable[str] = (), none_of: Iterable[str] = ()) -> "TagFilter":
        return cls(tuple(_tags_arg(list(all_of))), tuple(_tags_arg(list(any_of))), tuple(_tags_arg(list(none_of))))

    def matches(self, tags: Iterable[str]) -> bool:
        keys = {tag_key(t) for t in tags}
        return (all(tag_key(t) in keys for t in self.all_of)
                and (not self.any_of or any(tag_key(t) in keys for t in self.any_of))
                and not any(tag_key(t) in keys for t in self.none_of))


@dataclass
class Caption:
    image: str
    path: str                   # the caption file (may not exist yet)
    tags: list[str]
    rest: str = ""              # lines after the first, kept as they are
    exists: bool = False
    error: str | None = None    # unreadable / not UTF-8: never edited

    def matches_filter(self, where: TagFilter) -> bool:
        return where.matches(self.tags)

    def text(self, tags: Sequence[str] | None = None) -> str:
        line = join_tags(self.tags if tags is None else tags)
        return line + "\n" + (self.rest if self.rest else "")


@dataclass
class EditResult:
    op: str
    description: str
    changed: list[str] = field(default_factory=list)     # images whose caption changed
    matched: int = 0                                    # images the operation applied to
    skipped: list[str] = field(default_factory=list)     # captions that cannot be edited (not UTF-8, ...)
    level: int | None = None                            # undo level id; None when nothing changed
    keep_tokens: int | None = None                      # trigger: the keep_tokens that keeps it first

    def to_dict(self) -> dict:
        return {"op": self.op, "description": self.description, "changed": self.changed, "matched": self.matched,
                "skipped": self.skipped, "level": self.level, "keep_tokens": self.keep_tokens}


class TagDataset:
    """The captions of a folder of images, a training folder (its `N_name` subfolders) or a project."""

    def __init__(self, root: str, *, caption_extension: str = ".txt", history_dir: str | None = None,
                 max_levels: int = DEFAULT_LEVELS):
        from .project import is_project, open_project
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise DataError(f"not a folder: {root}")
        if is_project(root):
            project = open_project(root)
            root, history_dir = project.train_dir, history_dir or project.history_dir
        self.root = root
        self.caption_extension = caption_extension if caption_extension.startswith(".") else "." + caption_extension
        self.history = History(root, history_dir, max_levels)

    # ------------------------------------------------------------ reading
    def images(self) -> list[str]:
        """Images directly in the root and in each of its (non-hidden) subfolders, sorted."""
        found = list_images(self.root)
        for entry in sorted(os.scandir(self.root), key=lambda e: e.name):
            if entry.is_dir() and not entry.name.startswith("."):
                found += list_images(entry.path)
        return found

    def caption_path(self, image: str) -> str:
        return os.path.splitext(image)[0] + self.caption_extension

    def _read(self, image: str) -> Caption:
        path = self.caption_path(image)
        try:
            text = read_text(path)
        except UnicodeDecodeError:
            return Caption(image, path, [], exists=True, error="not UTF-8 text")
        except OSError as exc:
            return Caption(image, path, [], exists=True, error=str(exc))
        if text is None:
            return Caption(image, path, [])
        first, _, rest = text.partition("\n")
        return Caption(image, path, split_tags(first), rest, exists=True)

    def captions(self, where: TagFilter | None = None, images: Sequence[str] | None = None) -> list[Caption]:
        chosen = self.images() if images is None else [self.resolve_image(i) for i in images]
        caps = [self._read(i) for i in chosen]
        return [c for c in caps if where is None or c.matches_filter(where)]

    def resolve_image(self, image: str) -> str:
        path = image if os.path.isabs(image) else os.path.join(self.root, image)
        if not os.path.isfile(path):
            raise DataError(f"image not found: {image}")
        return path

    def read(self, image: str) -> str:
        """One image's caption (first line), "" when it has none."""
        cap = self._read(self.resolve_image(image))
        if cap.error:
            raise DataError(f"cannot read the caption of {image}: {cap.error}")
        return join_tags(cap.tags)

    def frequency(self, where: TagFilter | None = None) -> list[tuple[str, int]]:
        """(tag as written, number of images that have it), most frequent first, then by name."""
        counts: dict[str, int] = {}
        for cap in self.captions(where):
            for tag in dict.fromkeys(cap.tags):
                counts[tag] = counts.get(tag, 0) + 1
        return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))

    def filter(self, where: TagFilter) -> list[str]:
        return [c.image for c in self.captions(where)]

    # ------------------------------------------------------------ editing
    def _apply(self, op: str, description: str, caps: list[Caption], new_tags: list[list[str]],
               **extra) -> EditResult:
        result = EditResult(op, description, **extra)
        changes, writes = [], []
        for cap, tags in zip(caps, new_tags):
            if cap.error:
                result.skipped.append(cap.image)
                continue
            result.matched += 1
            if list(tags) == cap.tags and (cap.exists or not tags):
                continue  # nothing to change (the file is not rewritten just to reformat it)
            after = cap.text(tags)
            try:
                before = read_text(cap.path)  # the exact text, so undo restores it exactly
            except (OSError, UnicodeDecodeError):
                result.skipped.append(cap.image)
                continue
            if before == after or (before is None and not tags):
                continue
            changes.append(Change(self.history.rel(cap.path), before, after))
            writes.append((cap.path, after))
            result.changed.append(cap.image)
        if changes:
            result.level = self.history.record(op, description, changes).id
            for path, text in writes:
                write_text(path, text)
        return result

    def write(self, image: str, caption: str) -> EditResult:
        """Set one image's caption (first line); one undo level."""
        cap = self._read(self.resolve_image(image))
        return self._apply("write", f"caption of {os.path.basename(cap.image)}", [cap], [split_tags(caption)])

    def remove(self, tags: str | Sequence[str], *, where: TagFilter | None = None,
               images: Sequence[str] | None = None) -> EditResult:
        """Remove these tags from all images (or the filtered / chosen ones)."""
        keys = {tag_key(t) for t in _tags_arg(tags)}
        if not keys:
            raise ConfigError("no tags to remove")
        caps = self.captions(where, images)
        new = [[t for t in c.tags if tag_key(t) not in keys] for c in caps]
        return self._apply("remove", f"remove {join_tags(_tags_arg(tags))}", caps, new)

    def add(self, tags: str | Sequence[str], *, position: str = "end", where: TagFilter | None = None,
            images: Sequence[str] | None = None) -> EditResult:
        """Add tags (at the start or end) where they are missing."""
        add = dedupe_tags(_tags_arg(tags))
        if not add:
            raise ConfigError("no tags to add")
        if position not in ("start", "end"):
            raise ConfigError(f"position must be 'start' or 'end', got {position!r}")
        caps = self.captions(where, images)
        new = []
        for c in caps:
            have = {tag_key(t) for t in c.tags}
            missing = [t for t in add if tag_key(t) not in have]
            new.append(missing + c.tags if position == "start" else c.tags + missing)
        return self._apply("add", f"add {join_tags(add)}", caps, new)

    def replace(self, old: str, new: str, *, regex: bool = False, where: TagFilter | None = None,
                images: Sequence[str] | None = None) -> EditResult:
        """Plain: every tag equal to `old` becomes `new` (which may be several tags, or empty to delete it).
        Regex: `re.sub(old, new, tag)` on each tag; a tag that becomes empty is dropped. Duplicates that appear
        are merged (the first is kept)."""
        if regex:
            try:
                pattern = re.compile(old)
            except re.error as exc:
                raise ConfigError(f"invalid regular expression {old!r}: {exc}") from None
        elif not tag_key(old):
            raise ConfigError("the tag to replace is empty")
        caps = self.captions(where, images)
        out = []
        for c in caps:
            tags: list[str] = []
            for t in c.tags:
                if regex:
                    try:
                        tags += split_tags(pattern.sub(new, t))
                    except (re.error, IndexError) as exc:
                        raise ConfigError(f"invalid replacement {new!r}: {exc}") from None
                elif tag_key(t) == tag_key(old):
                    tags += split_tags(new)
                else:
                    tags.append(t)
            out.append(dedupe_tags(tags))
        kind = "regex " if regex else ""
        return self._apply("replace", f"replace {kind}{old!r} with {new!r}", caps, out)

    def set_trigger(self, trigger: str, *, where: TagFilter | None = None,
                    images: Sequence[str] | None = None) -> EditResult:
        """Put the trigger word(s) first in every caption (moved if present elsewhere); `keep_tokens` in the
        result is the value that keeps them first when captions are shuffled."""
        words = dedupe_tags(split_tags(trigger))
        if not words:
            raise ConfigError("the trigger word is empty")
        keys = {tag_key(w) for w in words}
        caps = self.captions(where, images)
        new = [words + [t for t in c.tags if tag_key(t) not in keys] for c in caps]
        return self._apply("trigger", f"trigger {join_tags(words)} first", caps, new, keep_tokens=len(words))

    def undo(self) -> UndoResult:
        """Undo the last batch edit."""
        return self.history.undo()

