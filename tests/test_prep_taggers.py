"""Taggers behind one interface (WD14 through onnxruntime on a tiny model built here, the host's DeepBooru / BLIP
through a test double, none) and writing captions with the options: existing captions, spaces, escapes,
exclusions, max tags; one undo level per run."""
import os
import subprocess
import sys

import pytest
from PIL import Image

from lib_lora_train.errors import ConfigError, ModelError
from lib_lora_train.prep.autotag import TagOptions, format_tags, tag_images
from lib_lora_train.prep.corpus import write_odd_files
from lib_lora_train.prep.taggers import (BlipTagger, DeepBooruTagger, HostTaggers, NoTagger, StubHostTaggers,
                                         Tagger, make_tagger, read_tags_csv)
from lib_lora_train.prep.tags import TagDataset
from lib_lora_train.prep.wd14_tiny import write_tiny_wd14

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def wd14_files(tmp_path):
    pytest.importorskip("onnxruntime")
    model, csv_path = str(tmp_path / "model.onnx"), str(tmp_path / "selected_tags.csv")
    write_tiny_wd14(model, csv_path)
    return model, csv_path


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "data" / "10_sks"
    folder.mkdir(parents=True)
    Image.new("RGB", (300, 300), (230, 20, 20)).save(folder / "red.png")
    Image.new("RGB", (300, 300), (20, 20, 230)).save(folder / "blue.png")
    Image.new("RGB", (300, 300), (10, 10, 10)).save(folder / "dark.png")
    return folder


def test_wd14_tags_by_threshold_and_category(wd14_files):
    model, csv_path = wd14_files
    tagger = make_tagger("wd14", model=model, tags_csv=csv_path)
    assert isinstance(tagger, Tagger) and tagger.size == 64
    red = dict(tagger.tag(Image.new("RGB", (80, 80), (230, 20, 20))))
    assert "red_theme" in red and "blue_theme" not in red
    assert "general" not in red                      # rating tags are left out by default
    assert "some_character" not in red               # character score 0.62 < 0.85
    blue = [t for t, _ in tagger.tag(Image.new("RGB", (80, 80), (20, 20, 230)))]
    assert "blue_theme" in blue and "red_theme" not in blue
    scores = [s for _, s in tagger.tag(Image.new("RGB", (80, 80), (230, 20, 20)))]
    assert scores == sorted(scores, reverse=True)
    loose = make_tagger("wd14", model=model, tags_csv=csv_path, threshold=0.0, character_threshold=0.5,
                        include_ratings=True)
    tags = [t for t, _ in loose.tag(Image.new("RGB", (80, 80), "white"))]
    assert {"general", "some_character", "white_background"} <= set(tags)


def test_wd14_errors(tmp_path, wd14_files, monkeypatch):
    model, csv_path = wd14_files
    with pytest.raises(ConfigError, match="not found"):
        make_tagger("wd14", model=str(tmp_path / "missing.onnx"), tags_csv=csv_path)
    with pytest.raises(ConfigError, match="local model"):
        make_tagger("wd14")
    short = tmp_path / "short.csv"
    short.write_text("tag_id,name,category,count\n1,only_one,0,5\n")
    with pytest.raises(ModelError, match="scores 7 tags"):
        make_tagger("wd14", model=model, tags_csv=str(short))
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="cannot load"):
        make_tagger("wd14", model=str(garbage), tags_csv=csv_path)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)   # as if it were not installed
    with pytest.raises(ConfigError, match="pip install onnxruntime"):
        make_tagger("wd14", model=model, tags_csv=csv_path)


def test_tags_csv_forms(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("tag_id,name,category,count\n1,a,0,5\n2,b,4,3\n")
    assert read_tags_csv(str(p)) == (["a", "b"], [0, 4])
    p.write_text("1,a,9,5\n")
    assert read_tags_csv(str(p)) == (["a"], [9])
    p.write_text("tag_id,name,category,count\n1,a,x,5\n")
    with pytest.raises(ConfigError, match="row 2"):
        read_tags_csv(str(p))


def test_engine_imports_without_onnxruntime():
    code = ("import sys; sys.modules['onnxruntime'] = None; import lib_lora_train.prep, lib_lora_train.prep.cli; "
            "from lib_lora_train.prep import make_tagger; print(type(make_tagger('none')).__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "NoTagger"


def test_host_taggers_through_the_interface():
    host = StubHostTaggers()
    assert isinstance(host, HostTaggers)
    red = Image.new("RGB", (200, 100), (220, 40, 40))
    db = DeepBooruTagger(host, threshold=0.8)
    tags = db.tag(red)
    assert tags[0][0] == "red_theme" and all(s >= 0.8 for _, s in tags)
    assert ("landscape_orientation", 0.9) in tags
    assert len(DeepBooruTagger(host, threshold=0.0).tag(red)) > len(tags)
    assert BlipTagger(host).tag(red) == [("a picture with a mostly red colour", 1.0)]
    assert NoTagger().tag(red) == []
    with pytest.raises(ConfigError, match="only available inside the WebUI"):
        make_tagger("deepbooru")
    assert isinstance(make_tagger("blip", host=host), BlipTagger)
    with pytest.raises(ConfigError):
        make_tagger("magic")
    with pytest.raises(ConfigError):
        DeepBooruTagger(host, threshold=1.5)


def test_format_options():
    scores = [("black_hair", 0.9), ("^_^", 0.8), ("simple_(background)", 0.7), ("Smile", 0.6), ("o_o", 0.5),
              ("black hair", 0.4)]
    assert format_tags(scores, TagOptions()) == ["black hair", "^_^", r"simple \(background\)", "Smile", "o_o"]
    assert format_tags(scores, TagOptions(use_spaces=False, escape_brackets=False)) == [
        "black_hair", "^_^", "simple_(background)", "Smile", "o_o"]
    assert format_tags(scores, TagOptions(exclude=["black hair", "smile"], max_tags=2)) == [
        "^_^", r"simple \(background\)"]


def test_tag_images_modes_and_one_undo_level(images, wd14_files):
    model, csv_path = wd14_files
    tagger = make_tagger("wd14", model=model, tags_csv=csv_path)
    (images / "red.txt").write_text("sks, mine", encoding="utf-8")
    root = str(images.parent)

    res = tag_images(root, tagger, TagOptions(existing="keep"))
    by = {os.path.basename(i.image): i for i in res.items}
    assert by["red.png"].status == "kept" and (images / "red.txt").read_text() == "sks, mine"
    assert "blue theme" in (images / "blue.txt").read_text()
    assert by["dark.png"].status == "written" and "dark" in (images / "dark.txt").read_text()

    tag_images(root, tagger, TagOptions(existing="append"))
    assert (images / "red.txt").read_text().startswith("sks, mine, red theme")
    tag_images(root, tagger, TagOptions(existing="prepend", use_spaces=False))
    first = (images / "red.txt").read_text().split(", ")
    assert first[0] == "red_theme" and "sks" in first and first.count("red_theme") == 1
    tag_images(root, tagger, TagOptions(existing="overwrite", max_tags=1))
    assert (images / "red.txt").read_text().strip() == "red theme"

    ds = TagDataset(root)
    assert [lv.op for lv in ds.history.levels()] == ["tag"] * 4
    ds.undo()
    assert "sks" in (images / "red.txt").read_text()
    for _ in range(3):
        ds.undo()
    assert (images / "red.txt").read_text() == "sks, mine"
    assert not (images / "blue.txt").exists()


def test_none_tagger_and_bad_files_never_blank_or_crash(tmp_path):
    folder = tmp_path / "5_x"
    write_odd_files(str(folder))
    before = (folder / "latin1.txt").read_bytes()
    res = tag_images(str(tmp_path), StubHostTaggers_deepbooru())
    statuses = {os.path.basename(i.image): i.status for i in res.items}
    for bad in ("empty.png", "text.jpg", "truncated.jpg", "truncated.png", "corrupt.png", "huge.png", "bomb.png"):
        assert statuses[bad] == "skipped", bad
    assert statuses["latin1.png"] == "skipped" and (folder / "latin1.txt").read_bytes() == before
    assert statuses["transparent.png"] == "written"
    (folder / "palette.txt").write_text("keep me", encoding="utf-8")
    res = tag_images(str(tmp_path), NoTagger())
    assert (folder / "palette.txt").read_text() == "keep me"
    assert {i.status for i in res.items} <= {"unchanged", "skipped"} and res.level is None


def StubHostTaggers_deepbooru():
    return DeepBooruTagger(StubHostTaggers(), threshold=0.5)
