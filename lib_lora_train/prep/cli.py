"""The dataset-preparation subcommands: check, preprocess, tag, tags {list,remove,add,replace,trigger,undo}.

`register(subparsers)` adds them to the main parser (`lib_lora_train.cli`). Each handler takes
`(args, rest)` and returns an exit code: 0 done, 2 bad input; `check` returns 0 when training can start and 2
when it cannot. `--json` prints one JSON object on stdout instead of the human summary.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from ..errors import ConfigError, DataError, ModelError

EXIT_OK, EXIT_BAD_INPUT = 0, 2


def _emit(args: argparse.Namespace, data: dict, text: str) -> None:
    # ASCII JSON and backslash-escaped text: file names that are not valid UTF-8 must not crash the output
    if getattr(args, "json", False):
        print(json.dumps(data, ensure_ascii=True, default=str))
    else:
        print(text.encode("utf-8", "backslashreplace").decode("utf-8"))


def _guard(handler: Callable[[argparse.Namespace], int]) -> Callable[..., int]:
    """Bad input becomes a message and exit code 2 (also when called without the main CLI's own handling)."""
    def run(args: argparse.Namespace, rest: list[str] | None = None) -> int:
        try:
            return handler(args)
        except (ConfigError, DataError, ModelError) as exc:
            if getattr(args, "json", False):
                print(json.dumps({"error": str(exc)}, ensure_ascii=True))
            else:
                print(f"error: {exc}".encode("utf-8", "backslashreplace").decode("utf-8"), file=sys.stderr)
            return EXIT_BAD_INPUT
    run.__name__ = handler.__name__
    return run


def _csv(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def _size(value: str) -> tuple[int, int]:
    try:
        w, _, h = value.lower().partition("x")
        return (int(w), int(h or w))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT like 512x768, got {value!r}") from None


# ---------------------------------------------------------------- handlers


@_guard
def cmd_check(args: argparse.Namespace) -> int:
    from .project import check_path
    report = check_path(args.dir, args.reg, purpose=args.purpose, max_pixels=args.max_pixels,
                        min_side=args.min_side, workers=args.workers, caption_extension=args.caption_extension)
    _emit(args, report.to_dict(), report.summary_text(show_info=args.all))
    return report.exit_code


@_guard
def cmd_preprocess(args: argparse.Namespace) -> int:
    from .preprocess import PreprocessOptions, preprocess
    opts = PreprocessOptions(resolution=args.resolution, mode=args.mode, size=args.size, background=args.background,
                             flip=args.flip, format=args.format, quality=args.quality,
                             copy_captions=not args.no_captions, caption_extension=args.caption_extension,
                             max_pixels=args.max_pixels, workers=args.workers)
    result = preprocess(args.src, args.out, opts, recursive=args.recursive)
    _emit(args, result.to_dict(), result.summary_text())
    return EXIT_OK if result.written else EXIT_BAD_INPUT


@_guard
def cmd_tag(args: argparse.Namespace) -> int:
    from .autotag import TagOptions, tag_images
    from .taggers import make_tagger
    tagger = make_tagger(args.tagger, model=args.model, tags_csv=args.tags_csv, threshold=args.threshold,
                         character_threshold=args.character_threshold, include_ratings=args.ratings)
    opts = TagOptions(existing=args.existing, use_spaces=not args.underscores, escape_brackets=not args.no_escape,
                      exclude=_csv(args.exclude), max_tags=args.max_tags)
    result = tag_images(args.dir, tagger, opts, caption_extension=args.caption_extension)
    _emit(args, result.to_dict(), result.summary_text())
    return EXIT_OK


def _dataset(args: argparse.Namespace):
    from .tags import TagDataset
    return TagDataset(args.dir, caption_extension=args.caption_extension)


def _where(args: argparse.Namespace):
    from .tags import TagFilter
    f = TagFilter.of(_csv(getattr(args, "with_tags", None)), _csv(getattr(args, "any_tags", None)),
                     _csv(getattr(args, "without_tags", None)))
    return f if (f.all_of or f.any_of or f.none_of) else None


def _edit_text(result: Any) -> str:
    text = f"{result.description}: {len(result.changed)} of {result.matched} captions changed"
    if result.level is not None:
        text += f" (undo level {result.level})"
    if result.skipped:
        text += f"; {len(result.skipped)} not editable: " + ", ".join(result.skipped[:5])
    if result.keep_tokens is not None:
        text += (f"\nset keep_tokens = {result.keep_tokens} so shuffle_caption keeps the trigger first")
    return text


@_guard
def cmd_tags(args: argparse.Namespace) -> int:
    ds = _dataset(args)
    where = _where(args)
    action = args.action
    if action == "list":
        freq = ds.frequency(where)
        n_images = len(ds.captions(where))
        shown = freq[:args.top] if args.top else freq
        data = {"images": n_images, "tags": [{"tag": t, "count": c} for t, c in freq]}
        text = "\n".join([f"{n_images} images, {len(freq)} distinct tags"]
                         + [f"  {c:5d}  {t}" for t, c in shown])
        _emit(args, data, text)
        return EXIT_OK
    if action == "undo":
        res = ds.undo()
        if res.level is None:
            _emit(args, {"undone": None}, "nothing to undo")
            return EXIT_OK
        data = {"undone": {"id": res.level.id, "op": res.level.op, "description": res.level.description},
                "restored": res.restored, "conflicts": res.conflicts}
        text = f"undid level {res.level.id} ({res.level.description}): {len(res.restored)} captions restored"
        if res.conflicts:
            text += f"; {len(res.conflicts)} changed since then and left as they are: " + ", ".join(res.conflicts)
        _emit(args, data, text)
        return EXIT_OK
    if action == "remove":
        result = ds.remove(args.tags, where=where)
    elif action == "add":
        result = ds.add(args.tags, position="start" if args.start else "end", where=where)
    elif action == "replace":
        result = ds.replace(args.old, args.new, regex=args.regex, where=where)
    elif action == "trigger":
        result = ds.set_trigger(args.word, where=where)
    else:  # argparse only lets the actions above through
        raise ConfigError(f"unknown tags action {action!r}")
    _emit(args, result.to_dict(), _edit_text(result))
    return EXIT_OK


# ---------------------------------------------------------------- parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")
    p.add_argument("--caption-extension", default=".txt", help="caption file extension (default .txt)")


def _filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--with", dest="with_tags", metavar="TAGS", help="only images with all of these (comma list)")
    p.add_argument("--any", dest="any_tags", metavar="TAGS", help="only images with at least one of these")
    p.add_argument("--without", dest="without_tags", metavar="TAGS", help="only images with none of these")


def register(subparsers: Any) -> None:
    """Add check, preprocess, tag and tags to the main parser's subparsers."""
    from .imageio import DEFAULT_MAX_PIXELS, MIN_SHORT_SIDE

    c = subparsers.add_parser(
        "check", help="check a dataset before training (exit 0: training can start, 2: it cannot)",
        description="Check a training folder (the parent of N_name folders) or a project folder: every file with "
                    "a reason for each problem, folder mistakes with their fix, near-duplicates and image counts. "
                    "Exit code 0: training can start; 2: it cannot (an error was found).")
    c.add_argument("dir", help="train_data_dir (parent of N_name folders) or a project folder")
    c.add_argument("--reg", help="reg_data_dir (regularisation images), checked too")
    c.add_argument("--purpose", choices=("character", "style"), help="compare the image count with the guide")
    c.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="larger images are skipped")
    c.add_argument("--min-side", type=int, default=MIN_SHORT_SIDE, help="smaller short sides are flagged")
    c.add_argument("--workers", type=int, help="processes (default: all cores)")
    c.add_argument("--all", action="store_true", help="also show the information lines")
    _common(c)
    c.set_defaults(func=cmd_check)

    p = subparsers.add_parser(
        "preprocess", help="resize / crop images into a training folder",
        description="Flatten transparency, apply EXIF rotation, convert to RGB and resize: bucket keeps the aspect "
                    "ratio (downscale only, sides multiples of 64), center and focal crop to a square or --size. "
                    "Originals are never changed; captions beside them are copied. Exit 0 when at least one image "
                    "was written, 2 otherwise.")
    p.add_argument("src", help="a folder of images (or one image)")
    p.add_argument("--out", required=True, help="output folder, e.g. project/img/10_name")
    p.add_argument("--resolution", type=int, default=512, help="512, 768, 1024 or another multiple of 64")
    p.add_argument("--mode", choices=("bucket", "center", "focal"), default="bucket")
    p.add_argument("--size", type=_size, help="crop size WIDTHxHEIGHT for center / focal (default: square)")
    p.add_argument("--background", choices=("white", "black"), default="white", help="for transparent pixels")
    p.add_argument("--flip", action="store_true", help="also write mirrored copies")
    p.add_argument("--format", choices=("png", "jpg", "webp"), default="png")
    p.add_argument("--quality", type=int, default=95, help="jpg / webp quality")
    p.add_argument("--recursive", action="store_true", help="include sub-folders")
    p.add_argument("--no-captions", action="store_true", help="do not copy caption files")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    p.add_argument("--workers", type=int, help="processes (default: all cores)")
    _common(p)
    p.set_defaults(func=cmd_preprocess)

    t = subparsers.add_parser(
        "tag", help="auto-tag images into .txt captions",
        description="Write one caption per image with a tagger: wd14 (a local ONNX model and its tags CSV, run "
                    "with onnxruntime; never downloaded) or none; deepbooru and blip work inside the WebUI only.")
    t.add_argument("dir", help="a folder of images, a training folder or a project")
    t.add_argument("--tagger", choices=("wd14", "deepbooru", "blip", "none"), required=True)
    t.add_argument("--model", help="wd14: the .onnx model file")
    t.add_argument("--tags-csv", help="wd14: its selected_tags.csv")
    t.add_argument("--threshold", type=float, help="score threshold (wd14 0.35, deepbooru 0.5)")
    t.add_argument("--character-threshold", type=float, default=0.85, help="wd14 character tags")
    t.add_argument("--ratings", action="store_true", help="wd14: also write rating tags")
    t.add_argument("--existing", choices=("overwrite", "keep", "append", "prepend"), default="overwrite",
                   help="what to do with captions that exist")
    t.add_argument("--underscores", action="store_true", help="keep underscores (default: spaces)")
    t.add_argument("--no-escape", action="store_true", help="do not escape ( ) as \\( \\)")
    t.add_argument("--exclude", help="tags never written (comma list)")
    t.add_argument("--max-tags", type=int, help="keep the best N tags")
    _common(t)
    t.set_defaults(func=cmd_tag)

    g = subparsers.add_parser("tags", help="edit captions: list, remove, add, replace, trigger, undo",
                              description="Tag editor. Every edit is one undo level (kept on disk).")
    actions = g.add_subparsers(dest="action", required=True)

    def action(name: str, help_text: str, filters: bool = True) -> argparse.ArgumentParser:
        sp = actions.add_parser(name, help=help_text)
        sp.add_argument("dir", help="a folder of images, a training folder or a project")
        _common(sp)
        if filters:
            _filters(sp)
        return sp

    action("list", "tag frequency table").add_argument("--top", type=int, help="show only the N most frequent")
    action("remove", "remove tags").add_argument("tags", nargs="+",
                                                 help="tags (quote tags with spaces; commas also separate)")
    d = action("add", "add tags where missing")
    d.add_argument("tags", nargs="+")
    d.add_argument("--start", action="store_true", help="add at the start (default: end)")
    x = action("replace", "replace a tag (plain) or a pattern in each tag (--regex)")
    x.add_argument("old")
    x.add_argument("new", help="replacement; empty removes the tag")
    x.add_argument("--regex", action="store_true")
    action("trigger", "put the trigger word first (prints the keep_tokens to use)").add_argument("word")
    action("undo", "undo the last edit", filters=False)
    g.set_defaults(func=cmd_tags)
