"""Caption files and per-step caption processing, in sd-scripts' order (`BaseDataset.process_caption`).

Every random draw comes from the `random.Random` the caller passes (the trainer seeds one per step), so a run
can be resumed and replayed exactly.
"""
from __future__ import annotations

import math
import os
import random
import re

from ..errors import DataError
from .config import SubsetParams

_WILDCARD = re.compile(r"\{([^}]+)\}")


def caption_candidates(image_path: str, subset: SubsetParams) -> list[str]:
    """`<image without extension><caption_extension>`; for face-crop outputs (`name_x_y_w_h.png`, only read with
    face_crop_aug_range) also the name without the last four `_` fields, as sd-scripts does."""
    base = os.path.splitext(image_path)[0]
    paths = [base + subset.caption_extension]
    if subset.face_crop_aug_range is not None:
        folder, stem = os.path.split(base)
        tokens = stem.split("_")
        if len(tokens) >= 5:
            paths.append(os.path.join(folder, "_".join(tokens[:-4])) + subset.caption_extension)
    return paths


def read_caption_file(path: str, enable_wildcard: bool = False) -> str:
    """The first line (stripped), or with wildcards every non-empty line joined by newlines."""
    try:
        with open(path, encoding="utf-8-sig") as fh:
            lines = fh.readlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"caption file is not UTF-8 text: {path} ({exc.reason} at byte {exc.start}); "
                        f"re-save it as UTF-8") from None
    if not lines:
        raise DataError(f"caption file is empty: {path}; write a caption into it or delete it "
                        f"(then the folder's class tokens are used)")
    if enable_wildcard:
        return "\n".join(line.strip() for line in lines if line.strip())
    return lines[0].strip()


def read_caption(image_path: str, subset: SubsetParams) -> str | None:
    """The caption from the image's caption file, or None when there is no caption file."""
    for path in caption_candidates(image_path, subset):
        if os.path.isfile(path):
            return read_caption_file(path, subset.enable_wildcard)
    return None


def count_tags(captions, into: dict[str, int] | None = None) -> dict[str, int]:
    """Tag counts for `ss_tag_frequency`: comma-split, stripped, lower-cased, once per caption."""
    freq = {} if into is None else into
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip().lower()
            if tag:
                freq[tag] = freq.get(tag, 0) + 1
    return freq


def _expand_wildcards(caption: str, rng: random.Random) -> str:
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    # `{{` and `}}` stand for literal braces: hide them behind markers that cannot occur in the text
    open_mark, close_mark = "\x00(", "\x00)"
    while open_mark in caption or close_mark in caption:
        open_mark, close_mark = open_mark + "(", close_mark + ")"
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)
    caption = _WILDCARD.sub(lambda m: rng.choice(m.group(1).split("|")), caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")


def _split_tags(caption: str, subset: SubsetParams) -> tuple[list[str], list[str], list[str]]:
    """(fixed prefix, flexible, fixed suffix) tags."""
    sep = subset.caption_separator
    keep_sep = subset.keep_tokens_separator
    if keep_sep and keep_sep in caption:
        fixed_part, flex_part = caption.split(keep_sep, 1)
        suffix: list[str] = []
        if keep_sep in flex_part:
            flex_part, suffix_part = flex_part.split(keep_sep, 1)
            suffix = [t.strip() for t in suffix_part.split(sep) if t.strip()]
        fixed = [t.strip() for t in fixed_part.split(sep) if t.strip()]
        flex = [t.strip() for t in flex_part.split(sep) if t.strip()]
        return fixed, flex, suffix
    # sd-scripts keeps empty tags on this path ("a,,b" stays three tags)
    tags = [t.strip() for t in caption.strip().split(sep)]
    if subset.keep_tokens > 0:
        return tags[:subset.keep_tokens], tags[subset.keep_tokens:], []
    return [], tags, []


def warmup_tag_count(n_flex: int, subset: SubsetParams, step: int, max_steps: int) -> int | None:
    """How many flexible tags token warmup keeps at `step`, or None when warmup is over or off."""
    warmup = subset.token_warmup_step
    if warmup < 1:  # a fraction of the run
        warmup = math.floor(warmup * max_steps)
    if warmup and step < warmup:
        return math.floor(step * ((n_flex - subset.token_warmup_min) / warmup)) + subset.token_warmup_min
    return None


def process_caption(caption: str, subset: SubsetParams, *, epoch: int = 1, step: int = 0, max_steps: int = 0,
                    rng: random.Random) -> str:
    """The caption the text encoder sees this step.

    `epoch` is 1-based (as sd-scripts counts for caption_dropout_every_n_epochs); `step` is the global step
    (for token warmup) and `max_steps` the run's total (token_warmup_step < 1 is a fraction of it).
    """
    if subset.caption_prefix:
        caption = subset.caption_prefix + " " + caption
    if subset.caption_suffix:
        caption = caption + " " + subset.caption_suffix

    dropped = subset.caption_dropout_rate > 0 and rng.random() < subset.caption_dropout_rate
    every = subset.caption_dropout_every_n_epochs
    if dropped or (every > 0 and epoch % every == 0):
        return ""

    if subset.enable_wildcard:
        caption = _expand_wildcards(caption, rng)
    else:
        caption = caption.split("\n")[0]

    if subset.shuffle_caption or subset.token_warmup_step > 0 or subset.caption_tag_dropout_rate > 0:
        fixed, flex, suffix = _split_tags(caption, subset)
        keep = warmup_tag_count(len(flex), subset, step, max_steps)
        if keep is not None:
            flex = flex[:keep]  # truncated before shuffling, as sd-scripts does
        if subset.shuffle_caption:
            rng.shuffle(flex)
        if subset.caption_tag_dropout_rate > 0:
            flex = [t for t in flex if rng.random() >= subset.caption_tag_dropout_rate]
        caption = ", ".join(fixed + flex + suffix)

    if subset.secondary_separator:
        caption = caption.replace(subset.secondary_separator, subset.caption_separator)
    return caption
