"""Auto-tagging a dataset: run a tagger on every image and write one caption file per image.

The whole run is one undo level of the tag editor (the same history), and every caption is written atomically.
Images that cannot be read are listed with their reason; the others go on.
"""
from __future__ import annotations

import re
import threading
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from PIL import Image

from ..dataset.images import exif_orientation
from ..errors import ConfigError
from .history import Change, read_text, write_text
from .imageio import DEFAULT_MAX_PIXELS, ImageProblem, decode, open_image, orient, to_rgb
from .taggers import TagScores, Tagger
from .tags import TagDataset, dedupe_tags, split_tags, tag_key

EXISTING = ("overwrite", "keep", "append", "prepend")
_ESCAPE = re.compile(r"(?<!\\)([()])")


@dataclass
class TagOptions:
    existing: str = "overwrite"     # overwrite | keep (skip images that have a caption) | append | prepend
    use_spaces: bool = True         # black_hair -> black hair (kaomoji like ^_^ keep their underscore)
    escape_brackets: bool = True    # (tag) -> \(tag\), so the prompt parser does not read a weight
    exclude: Sequence[str] = ()     # tags never written (matched ignoring case, _ / space, escapes)
    max_tags: int | None = None     # keep the best N

    def validate(self) -> None:
        if self.existing not in EXISTING:
            raise ConfigError(f"existing must be one of {', '.join(EXISTING)}, got {self.existing!r}")
        if self.max_tags is not None and (isinstance(self.max_tags, bool) or not isinstance(self.max_tags, int)
                                          or self.max_tags < 1):
            raise ConfigError(f"max_tags must be a positive integer or unset, got {self.max_tags!r}")


def _is_kaomoji(tag: str) -> bool:
    # ^_^, o_o, >_<, <o>_<o>: short, or without two letters in a row
    return len(tag) <= 3 or not re.search(r"[a-zA-Z]{2}", tag)


def format_tags(scores: TagScores, options: TagOptions) -> list[str]:
    """Tagger output -> the tags to write, in the tagger's order."""
    exclude = {tag_key(t) for item in options.exclude for t in split_tags(item)}
    out = []
    for tag, _score in scores:
        tag = tag.strip()
        if not tag or tag_key(tag) in exclude:
            continue
        if options.use_spaces and not _is_kaomoji(tag):
            tag = tag.replace("_", " ")
        if options.escape_brackets:
            tag = _ESCAPE.sub(r"\\\1", tag)
        out.append(tag)
    out = dedupe_tags(out)
    return out[:options.max_tags] if options.max_tags else out


@dataclass
class TagItem:
    image: str
    caption: str | None = None       # the caption file written or kept
    status: str = "written"          # written | kept | unchanged | skipped
    tags: list[str] = field(default_factory=list)
    reason: str | None = None


@dataclass
class TagRunResult:
    tagger: str
    items: list[TagItem]
    level: int | None                # the undo level of this run

    def to_dict(self) -> dict:
        counts: dict[str, int] = {}
        for it in self.items:
            counts[it.status] = counts.get(it.status, 0) + 1
        return {"tagger": self.tagger, "level": self.level, "counts": counts,
                "items": [asdict(i) for i in self.items]}

    def summary_text(self) -> str:
        d = self.to_dict()["counts"]
        parts = ", ".join(f"{n} {k}" for k, n in sorted(d.items()))
        lines = [f"tagger {self.tagger}: {parts or 'no images'}"]
        lines += [f"  skipped {it.image}: {it.reason}" for it in self.items if it.status == "skipped"]
        return "\n".join(lines)


def _load_rgb(path: str, max_pixels: int) -> Image.Image:
    with open_image(path, max_pixels) as img:
        orientation = exif_orientation(img)
        decode(img)
        rgb, _ = to_rgb(img)
        return orient(rgb, orientation).copy()


def tag_images(root: str, tagger: Tagger, options: TagOptions | None = None, *, images: Sequence[str] | None = None,
               caption_extension: str = ".txt", max_pixels: int = DEFAULT_MAX_PIXELS,
               progress: Callable[[int, int, TagItem], None] | None = None,
               stop: threading.Event | None = None) -> TagRunResult:
    """Tag the images of `root` (a folder of images, a training folder or a project), writing `<image>.txt`."""
    opts = options or TagOptions()
    opts.validate()
    ds = TagDataset(root, caption_extension=caption_extension)
    paths = ds.images() if images is None else [ds.resolve_image(i) for i in images]
    items, changes, writes = [], [], []
    for n, path in enumerate(paths, 1):
        cap_path = ds.caption_path(path)
        item = TagItem(path, cap_path)
        if stop is not None and stop.is_set():
            item.status, item.reason = "skipped", "stopped"
        else:
            _tag_one(item, tagger, opts, max_pixels, changes, writes, ds)
        items.append(item)
        if progress is not None:
            progress(n, len(paths), item)
    level = ds.history.record("tag", f"auto-tag with {tagger.name} ({len(writes)} captions)", changes).id \
        if changes else None
    for cap_path, text in writes:
        write_text(cap_path, text)
    return TagRunResult(tagger.name, items, level)


def _tag_one(item: TagItem, tagger: Tagger, opts: TagOptions, max_pixels: int, changes: list, writes: list,
             ds: TagDataset) -> None:
    try:
        before = read_text(item.caption)
    except (OSError, UnicodeDecodeError) as exc:
        item.status, item.reason = "skipped", f"its caption file cannot be read or is not UTF-8 ({exc}); not touched"
        return
    old = split_tags(before.partition("\n")[0]) if before else []
    if opts.existing == "keep" and old:
        item.status, item.tags = "kept", old
        return
    try:
        rgb = _load_rgb(item.image, max_pixels)
        new = format_tags(tagger.tag(rgb), opts)
    except ImageProblem as p:
        item.status, item.reason = "skipped", p.message
        return
    except Exception as exc:  # noqa: BLE001 - one image's failure must not stop the run
        item.status, item.reason = "skipped", f"the tagger failed ({type(exc).__name__}: {exc})"
        return
    if not new:
        # nothing scored above the threshold (or the "none" tagger): never blank a caption for that
        item.status, item.tags = "unchanged", old
        item.reason = "the tagger gave no tags"
        return
    if opts.existing == "append":
        tags = dedupe_tags(old + new)
    elif opts.existing == "prepend":
        tags = dedupe_tags(new + old)
    else:
        tags = new
    rest = before.partition("\n")[2] if before else ""
    text = ", ".join(tags) + "\n" + rest
    item.tags = tags
    if before == text:
        item.status = "unchanged"
        return
    changes.append(Change(ds.history.rel(item.caption), before, text))
    writes.append((item.caption, text))
