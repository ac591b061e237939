"""Tag editor: frequency table, filters, remove / add / replace / trigger, per-image captions, and the on-disk
undo history (20+ levels, survives a new process, never overwrites a caption changed by hand)."""
import os

import pytest

from lib_lora_train.dataset.captions import read_caption_file
from lib_lora_train.errors import ConfigError
from lib_lora_train.prep.corpus import write_good_images
from lib_lora_train.prep.history import History
from lib_lora_train.prep.tags import TagDataset, TagFilter, split_tags, tag_key

CAPTIONS = {
    "img000": "sks, black_hair, smile, 1girl",
    "img001": "sks, black hair, open_mouth, 1girl",
    "img002": "1girl, red eyes, smile",
    "img003": "1boy, black_hair",
}


@pytest.fixture
def ds(tmp_path):
    folder = tmp_path / "10_sks"
    write_good_images(str(folder), 5, captions=False)
    for stem, text in CAPTIONS.items():
        (folder / f"{stem}.txt").write_text(text, encoding="utf-8")
    return TagDataset(str(tmp_path))                  # the training folder (parent of N_name)


def caps(ds):
    return {os.path.basename(c.image)[:-4]: c.tags for c in ds.captions()}


def snapshot(ds):
    out = {}
    for img in ds.images():
        p = ds.caption_path(img)
        out[p] = open(p, "rb").read() if os.path.exists(p) else None
    return out


def test_frequency_table_counts_images(ds):
    freq = dict(ds.frequency())
    assert freq["1girl"] == 3 and freq["smile"] == 2 and freq["sks"] == 2 and freq["black_hair"] == 2
    assert freq["black hair"] == 1 and freq["1boy"] == 1
    assert ds.frequency()[0] == ("1girl", 3)
    assert dict(ds.frequency(TagFilter.of(all_of=["smile"]))) == {"1girl": 2, "smile": 2, "sks": 1,
                                                                 "black_hair": 1, "red eyes": 1}


def test_filters_and_or_not(ds):
    names = lambda f: sorted(os.path.basename(p)[:-4] for p in ds.filter(f))  # noqa: E731
    assert names(TagFilter.of(all_of=["black hair", "1girl"])) == ["img000", "img001"]
    assert names(TagFilter.of(any_of=["smile", "1boy"])) == ["img000", "img002", "img003"]
    assert names(TagFilter.of(none_of=["1girl"])) == ["img003", "img004"]
    assert names(TagFilter.of(all_of=["1girl"], none_of=["Smile"])) == ["img001"]


def test_remove_all_and_filtered(ds):
    res = ds.remove("black_hair")            # matches black hair too
    assert sorted(os.path.basename(p)[:-4] for p in res.changed) == ["img000", "img001", "img003"]
    c = caps(ds)
    assert c["img000"] == ["sks", "smile", "1girl"] and c["img003"] == ["1boy"]
    res = ds.remove(["1girl"], where=TagFilter.of(all_of=["smile"]))
    c = caps(ds)
    assert c["img000"] == ["sks", "smile"] and c["img002"] == ["red eyes", "smile"]
    assert c["img001"] == ["sks", "open_mouth", "1girl"]       # not in the filter: untouched
    assert len(res.changed) == 2 and res.level is not None


def test_add_start_end_without_duplicates(ds):
    ds.add("solo, 1girl", where=TagFilter.of(all_of=["1girl"]))
    c = caps(ds)
    assert c["img000"] == ["sks", "black_hair", "smile", "1girl", "solo"]
    assert "img003" not in [k for k, v in c.items() if "solo" in v]
    ds.add(["masterpiece"], position="start", images=[ds.images()[4]])
    assert caps(ds)["img004"] == ["masterpiece"]     # a new caption file for an uncaptioned image
    with pytest.raises(ConfigError):
        ds.add("  , ")


def test_replace_plain_regex_empty_and_multiple(ds):
    ds.replace("black hair", "dark_hair")
    c = caps(ds)
    assert c["img000"][1] == "dark_hair" and c["img001"][1] == "dark_hair" and c["img003"][1] == "dark_hair"
    ds.replace("smile", "")                              # empty: removed
    assert all("smile" not in v for v in caps(ds).values())
    ds.replace("1girl", "1girl, solo")                   # one tag into two
    assert caps(ds)["img002"] == ["1girl", "solo", "red eyes"]
    ds.replace(r"^(\w+) eyes$", r"\1_eyes", regex=True)
    assert caps(ds)["img002"] == ["1girl", "solo", "red_eyes"]
    ds.replace(r"_", " ", regex=True)
    assert caps(ds)["img000"] == ["sks", "dark hair", "1girl", "solo"]
    with pytest.raises(ConfigError, match="regular expression"):
        ds.replace("([", "x", regex=True)


def test_trigger_first_and_keep_tokens(ds):
    res = ds.set_trigger("sks")
    assert res.keep_tokens == 1
    for tags in caps(ds).values():
        assert tags[0] == "sks" and tags.count("sks") == 1
    assert caps(ds)["img000"] == ["sks", "black_hair", "smile", "1girl"]
    res = ds.set_trigger("ohwx, woman")
    assert res.keep_tokens == 2 and caps(ds)["img002"][:2] == ["ohwx", "woman"]


def test_per_image_read_write_and_engine_reads_the_result(ds):
    img = ds.images()[2]
    assert ds.read(img) == "1girl, red eyes, smile"
    ds.write(os.path.relpath(img, ds.root), "solo,  smile ,")
    assert ds.read(img) == "solo, smile"
    ds.remove(["solo", "smile"], images=[img])
    # an emptied caption is still a file the engine reads (as an empty caption), not an empty file it rejects
    assert read_caption_file(ds.caption_path(img)) == ""
    for i in ds.images()[:4]:
        read_caption_file(ds.caption_path(i))


def test_undo_25_levels_persisted_and_exact(ds, tmp_path):
    states = [snapshot(ds)]
    for k in range(25):
        ds.add(f"tag{k}", where=TagFilter.of(any_of=["1girl"]) if k % 2 else None)
        states.append(snapshot(ds))
    assert len(ds.history.levels()) == 25
    fresh = TagDataset(str(tmp_path))        # "a page reload": a new object reads the history from disk
    for k in range(25, 0, -1):
        res = fresh.undo()
        assert res.level is not None and not res.conflicts
        assert snapshot(fresh) == states[k - 1], k
    assert fresh.undo().level is None
    assert not os.path.exists(ds.caption_path(ds.images()[4]))   # a caption the edits created is gone again
    # no temp files were left behind anywhere
    leftovers = [n for _d, _s, files in os.walk(tmp_path) for n in files if n.endswith(".tmp")]
    assert leftovers == []


def test_undo_leaves_hand_edits_alone(ds):
    img0, img1 = ds.images()[0], ds.images()[1]
    ds.remove("1girl")
    with open(ds.caption_path(img0), "w", encoding="utf-8") as fh:
        fh.write("edited by hand")
    res = ds.undo()
    assert res.conflicts == [os.path.relpath(ds.caption_path(img0), ds.root).replace(os.sep, "/")]
    assert open(ds.caption_path(img0), encoding="utf-8").read() == "edited by hand"
    assert "1girl" in ds.read(img1)


def test_history_prunes_and_needs_20_levels(tmp_path):
    with pytest.raises(ConfigError):
        History(str(tmp_path), max_levels=5)
    folder = tmp_path / "imgs"
    write_good_images(str(folder), 1, captions=False)
    ds = TagDataset(str(folder), max_levels=20)
    for k in range(23):
        ds.add(f"t{k}")
    levels = ds.history.levels()
    assert len(levels) == 20 and levels[0].id == 4 and levels[-1].id == 23
    assert os.path.isdir(folder / ".tag_history")


def test_non_utf8_caption_never_rewritten(ds, tmp_path):
    bad = tmp_path / "10_sks" / "img004.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    res = ds.add("new")
    assert any(p.endswith("img004.png") for p in res.skipped)
    assert bad.read_bytes() == "caf\xe9".encode("latin-1")


def test_helpers():
    assert split_tags(" a, ,b ,c,") == ["a", "b", "c"]
    assert tag_key("Black_Hair") == tag_key("black hair") == "black hair"
    assert tag_key(r"simple \(background\)") == tag_key("simple_(background)")
