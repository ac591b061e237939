"""Bucket set and assignment (sd-scripts arithmetic), caption files and caption processing."""
import random

import pytest

from lib_lora_train.dataset import (BucketAssigner, SubsetParams, adjust_bucket_limits, make_bucket_resolutions,
                                    process_caption, read_caption)
from lib_lora_train.errors import DataError

BUCKETS_512 = [(256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
               (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256),
               (1024, 256)]


def test_bucket_set_for_512_defaults_and_1024():
    assert make_bucket_resolutions((512, 512), 256, 1024, 64) == BUCKETS_512
    big = make_bucket_resolutions((1024, 1024), 256, 2048, 64)
    assert len(big) == 41
    assert all(w * h <= 1024 * 1024 and w % 64 == 0 and h % 64 == 0 for w, h in big)


def test_bucket_limits_are_rounded_and_checked():
    assert adjust_bucket_limits((512, 512), 300, 1000, 64)[:2] == (256, 1024)
    with pytest.raises(DataError, match="min_bucket_reso"):
        adjust_bucket_limits((512, 512), 576, 1024, 64)
    with pytest.raises(DataError, match="max_bucket_reso"):
        adjust_bucket_limits((1024, 1024), 256, 768, 64)


def test_cover_and_center_crop_with_predefined_buckets():
    a = BucketAssigner((512, 512), enable_bucket=True, min_size=256, max_size=1024, steps=64)
    p = a.assign(1000, 600)                    # ratio 1.667 -> closest bucket 640x384 (1.667)
    assert p.bucket == (640, 384)
    assert p.resized_size[1] == 384 and p.resized_size[0] >= 640     # covers the bucket
    assert p.crop == ((p.resized_size[0] - 640) // 2, 0)
    p = a.assign(300, 1000)                    # 0.3 -> 256x832 (0.308): narrower, so widths match
    assert (p.bucket, p.resized_size, p.crop) == ((256, 832), (256, 853), (0, 10))
    assert abs(p.ar_error - (256 / 832 - 0.3)) < 1e-12
    p = a.assign(300, 900)                     # 0.333 -> 256x832 too, but wider: heights match
    assert (p.bucket, p.resized_size, p.crop) == ((256, 832), (277, 832), (10, 0))


def test_exact_size_uses_its_bucket_and_no_bucket_mode_has_one():
    a = BucketAssigner((512, 512), enable_bucket=True, min_size=256, max_size=1024, steps=64)
    p = a.assign(448, 576)
    assert (p.bucket, p.resized_size, p.crop) == ((448, 576), (448, 576), (0, 0))
    single = BucketAssigner((512, 512))
    for size in [(100, 80), (2000, 3000), (512, 512)]:
        p = single.assign(*size)
        assert p.bucket == (512, 512) and min(p.resized_size[0] - 512, p.resized_size[1] - 512) == 0


def test_no_upscale_buckets_shrink_large_images_and_never_enlarge_small_ones():
    a = BucketAssigner((512, 512), enable_bucket=True, no_upscale=True, steps=64)
    p = a.assign(300, 200)                     # small: kept, floored to steps
    assert p.resized_size == (300, 200) and p.bucket == (256, 192) and p.crop == (22, 4)
    p = a.assign(2000, 1000)                   # large: area <= 512*512, aspect kept
    w, h = p.resized_size
    assert w * h <= 512 * 512 * 1.02 and abs(w / h - 2.0) < 0.02
    assert p.bucket == (w - w % 64, h - h % 64)
    with pytest.raises(DataError, match="too small or too thin"):
        a.assign(40, 400)


# ---------------------------------------------------------------- caption files

def test_caption_file_lookup_fallbacks_and_errors(tmp_path):
    img = tmp_path / "a.png"
    img.write_bytes(b"")
    sub = SubsetParams(image_dir=str(tmp_path), caption_extension=".txt")
    assert read_caption(str(img), sub) is None
    (tmp_path / "a.caption").write_text("from caption ext", encoding="utf-8")
    assert read_caption(str(img), SubsetParams(image_dir="x", caption_extension="caption")) == "from caption ext"
    (tmp_path / "a.txt").write_text("\ufefffirst line, tag\nsecond line\n", encoding="utf-8")
    assert read_caption(str(img), sub) == "first line, tag"
    wild = SubsetParams(image_dir="x", enable_wildcard=True)
    assert read_caption(str(img), wild) == "first line, tag\nsecond line"
    (tmp_path / "a.txt").write_bytes(b"")
    with pytest.raises(DataError, match="empty.*a.txt"):
        read_caption(str(img), sub)
    (tmp_path / "a.txt").write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8.*a.txt"):
        read_caption(str(img), sub)


# ---------------------------------------------------------------- processing

def sub(**kw):
    return SubsetParams(image_dir="x", **kw)


def run(caption, subset, seed=0, **kw):
    return process_caption(caption, subset, rng=random.Random(seed), **kw)


CAP = "sks, red hair, blue eyes, smile, outdoors, hat"


def test_no_options_leave_the_caption_and_keep_tokens_alone_does_nothing():
    assert run(CAP, sub()) == CAP
    assert run(CAP, sub(keep_tokens=2)) == CAP      # sd-scripts: keep_tokens needs shuffle/warmup/dropout


def test_shuffle_keeps_the_first_keep_tokens_and_uses_only_the_given_rng():
    s = sub(shuffle_caption=True, keep_tokens=2)
    outs = {run(CAP, s, seed) for seed in range(30)}
    assert len(outs) > 5
    for out in outs:
        tags = out.split(", ")
        assert tags[:2] == ["sks", "red hair"] and sorted(tags) == sorted(CAP.split(", "))
    assert run(CAP, s, 7) == run(CAP, s, 7)


def test_tag_dropout_is_seeded_and_never_drops_fixed_tags():
    s = sub(caption_tag_dropout_rate=0.5, keep_tokens=1)
    outs = [run(CAP, s, seed) for seed in range(40)]
    assert all(o.startswith("sks") for o in outs)
    lengths = {len(o.split(", ")) for o in outs}
    assert len(lengths) > 2 and max(lengths) <= 6
    assert outs[3] == run(CAP, s, 3)
    assert run(CAP, sub(caption_tag_dropout_rate=1.0, keep_tokens=1)) == "sks"


def test_caption_dropout_rate_and_every_n_epochs():
    assert run(CAP, sub(caption_dropout_rate=1.0, caption_prefix="pre")) == ""
    s = sub(caption_dropout_every_n_epochs=3)
    assert [run(CAP, s, epoch=e) == "" for e in range(1, 7)] == [False, False, True, False, False, True]
    half = sub(caption_dropout_rate=0.5)
    dropped = sum(run(CAP, half, seed) == "" for seed in range(200))
    assert 60 < dropped < 140


def test_keep_tokens_separator_fixed_prefix_and_suffix():
    s = sub(shuffle_caption=True, keep_tokens_separator="|||")
    for seed in range(10):
        out = run("1girl, solo ||| a, b, c, d ||| best quality, masterpiece", s, seed)
        tags = out.split(", ")
        assert tags[:2] == ["1girl", "solo"] and tags[-2:] == ["best quality", "masterpiece"]
        assert sorted(tags[2:-2]) == ["a", "b", "c", "d"]


def test_prefix_suffix_secondary_separator_and_custom_separator():
    assert run("a, b", sub(caption_prefix="sks", caption_suffix="photo")) == "sks a, b photo"
    assert run("x;;;y, z", sub(secondary_separator=";;;")) == "x,y, z"
    out = run("a; b; c", sub(caption_separator=";", shuffle_caption=True, keep_tokens=1))
    assert out.startswith("a, ") and sorted(out.split(", ")) == ["a", "b", "c"]


def test_wildcards_lines_and_escaped_braces():
    s = sub(enable_wildcard=True)
    outs = {run("a {red|blue|green} ball, {{literal}}", s, seed) for seed in range(40)}
    assert outs == {f"a {c} ball, {{literal}}" for c in ("red", "blue", "green")}
    lines = {run("line one\nline two", s, seed) for seed in range(40)}
    assert lines == {"line one", "line two"}
    assert run("line one\nline two", sub()) == "line one"


def test_token_warmup_truncates_before_shuffling():
    s = sub(token_warmup_step=4, token_warmup_min=1)
    tags = "t0, t1, t2, t3, t4, t5, t6, t7, t8"
    counts = [len(run(tags, s, step=k).split(", ")) for k in range(6)]
    assert counts == [1, 3, 5, 7, 9, 9]
    frac = sub(token_warmup_step=0.5, token_warmup_min=1)     # a fraction of max_steps
    assert len(run(tags, frac, step=0, max_steps=8).split(", ")) == 1
    assert len(run(tags, frac, step=4, max_steps=8).split(", ")) == 9
