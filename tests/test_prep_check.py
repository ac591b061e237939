"""The dataset check: every broken or odd file named with its reason, folder mistakes with their fix, originals
untouched, and an exit code that agrees with what the engine would do."""
import hashlib
import os

import pytest
from PIL import Image, ImageFile

from lib_lora_train.dataset import datasets_from_folders
from lib_lora_train.errors import DataError
from lib_lora_train.prep.check import check_counts, check_dataset, find_near_duplicates, lint_files
from lib_lora_train.prep.corpus import picture, write_good_images, write_layout_mistakes, write_odd_files
from lib_lora_train.prep.project import check_path, create_project
from lib_lora_train.prep.report import ERROR, CheckReport, FileReport


def hashes(root):
    out = {}
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                with open(path, "rb") as fh:
                    out[path] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def odd_dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("odd"))
    folder = os.path.join(root, "10_odd")
    expect = write_odd_files(folder)
    write_good_images(folder, 3, start_seed=50)
    os.symlink(os.path.join(root, "gone.png"), os.path.join(folder, "link.png"))
    before = hashes(root)
    report = check_dataset(root, workers=2)
    return root, folder, expect, before, report


def test_every_odd_file_is_named_with_its_reason(odd_dataset):
    root, folder, expect, _before, report = odd_dataset
    for path, codes in expect.items():
        got = report.codes(path)
        assert codes <= got, (os.path.basename(path), codes, got)
        for issue in report.file(path).issues:
            assert issue.message and issue.path == path
    # every entry of the folder is in the report, good ones without problems
    listed = {f.path for f in report.files}
    assert listed == {os.path.join(folder, n) for n in os.listdir(folder)}
    for name in ("img050.png", "img051.png", "img052.png"):
        assert report.file(os.path.join(folder, name)).issues == []
    assert report.codes(os.path.join(folder, "link.png")) == {"broken_link"}


def test_odd_files_block_training_and_originals_unchanged(odd_dataset):
    root, folder, _expect, before, report = odd_dataset
    assert hashes(root) == before
    assert report.exit_code == 2 and not report.can_train
    errors = {i.path for i in report.by_severity(ERROR)}
    for bad in ("empty.png", "text.jpg", "truncated.jpg", "truncated.png", "corrupt.png", "huge.png", "bomb.png",
                "captioned_empty.txt", "latin1.txt"):
        assert os.path.join(folder, bad) in errors
    # odd-but-usable files are not errors
    for fine in ("cmyk.jpg", "palette.png", "transparent.png", "rotated.jpg", "small.png", "dup_a.png"):
        assert report.file(os.path.join(folder, fine)).usable
    text = report.summary_text()
    assert "truncated.jpg" in text and "training cannot start" in text
    d = report.to_dict()
    assert d["exit_code"] == 2 and d["can_train"] is False
    assert {f["path"] for f in d["files"]} == {f.path for f in report.files}


def test_rotation_and_size_are_reported_as_displayed(odd_dataset):
    _root, folder, _e, _b, report = odd_dataset
    rep = report.file(os.path.join(folder, "rotated.jpg"))
    assert rep.size == (300, 400)  # stored 400x300 with orientation 6
    assert report.file(os.path.join(folder, "small.png")).size == (120, 90)


def test_truncated_found_even_when_the_host_relaxed_pillow(tmp_path):
    write_odd_files(str(tmp_path / "5_x"))
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        report = check_dataset(str(tmp_path), workers=2, with_summary=False)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old
    assert "truncated" in report.codes(str(tmp_path / "5_x" / "truncated.jpg"))


def test_good_dataset_can_train_with_summary(tmp_path):
    write_good_images(str(tmp_path / "10_sks"), 20)
    report = check_dataset(str(tmp_path), purpose="character", workers=1)
    assert report.exit_code == 0, report.summary_text()
    assert not report.by_severity(ERROR)
    assert report.counts["usable_train_images"] == 20
    assert "count_low" not in report.codes() and "count_high" not in report.codes()
    # the summary carries the engine's steps formula
    assert "20 images × 10 repeats = 200 samples" in report.summary["formula"]
    assert "training can start" in report.summary_text()


LAYOUT_EXIT = {"good_plus_loose": 0}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    return write_layout_mistakes(str(tmp_path_factory.mktemp("layouts")))


@pytest.mark.parametrize("case", ["image_folder", "no_prefix", "non_numeric", "zero_repeats", "loose_images",
                                  "good_plus_loose", "no_underscore"])
def test_folder_mistakes_with_their_fix(layouts, case):
    path, codes = layouts[case]
    report = check_dataset(path, workers=1, with_summary=False)
    assert codes <= report.codes(), (case, report.codes())
    assert report.exit_code == LAYOUT_EXIT.get(case, 2)
    messages = " ".join(i.message for i in report.issues)
    fixes = {
        "image_folder": os.path.dirname(path),         # the parent to point at
        "no_prefix": "rename it to 10_mychar",
        "non_numeric": "10_mychar",
        "zero_repeats": "rename it to 10_mychar",
        "loose_images": os.path.join(path, "10_loose_images"),
        "good_plus_loose": "5_mychar",
        "no_underscore": "rename it to 10_mychar",
    }
    assert fixes[case] in messages, messages
    # the check and the engine agree on whether this layout can be read at all
    try:
        datasets_from_folders(path, None, {"resolution": 512})
        engine_ok = True
    except DataError:
        engine_ok = False
    assert engine_ok == (report.exit_code == 0)
    # and the images are still checked one by one
    assert report.counts["images"] >= 2


def test_image_counts_against_the_guide():
    def codes(n, purpose):
        r = CheckReport("x")
        check_counts(n, purpose, r)
        return {(i.code, i.severity) for i in r.issues}
    assert codes(10, "character") == {("count_low", "warning")}
    assert codes(30, "character") == set()
    assert codes(60, "character") == {("count_high", "warning")}
    assert codes(60, "style") == set()
    assert codes(90, "style") == {("count_high", "warning")}
    assert codes(5, None) == {("count_outside_guide", "warning")}
    assert codes(40, None) == {("count_guide", "info")}


def test_near_duplicates_but_not_flat_colours():
    def rep(img, name):
        from lib_lora_train.prep.imageio import perceptual_hash
        r = FileReport(name, "image")
        r.phash = perceptual_hash(img)
        return r
    base = picture(7, (300, 300))
    reports = [rep(Image.new("RGB", (64, 64), "white"), "white"), rep(Image.new("RGB", (64, 64), "black"), "black"),
               rep(base, "a"), rep(base.resize((200, 200)), "a_small"), rep(picture(8, (300, 300)), "other")]
    groups = find_near_duplicates(reports)
    assert [[r.path for r in g] for g in groups] == [["a", "a_small"]]


def test_caption_blank_missing_and_reg_folder(tmp_path):
    imgs = write_good_images(str(tmp_path / "img" / "10_sks"), 3, captions=False)
    (tmp_path / "img" / "10_sks" / "img000.txt").write_text("   \n")
    write_good_images(str(tmp_path / "reg" / "1_person"), 2, start_seed=90)
    report = check_dataset(str(tmp_path / "img"), str(tmp_path / "reg"), workers=1)
    assert "caption_blank" in report.codes(str(tmp_path / "img" / "10_sks" / "img000.txt"))
    assert "caption_missing" in report.codes(str(tmp_path / "img" / "10_sks"))
    assert report.exit_code == 0
    # reg images are checked too
    assert any(f.path.startswith(str(tmp_path / "reg")) for f in report.files)
    assert len(imgs) == 3


def test_check_path_on_a_project_uses_its_folders_and_purpose(tmp_path):
    project = create_project(str(tmp_path / "proj"), "sks", purpose="style")
    write_good_images(os.path.join(project.train_dir, "5_sks"), 4)
    report = check_path(project.root, workers=1)
    assert report.root == project.train_dir
    assert "count_low" in report.codes() and "50-80" in " ".join(i.message for i in report.issues)


def test_lint_files_for_import(tmp_path):
    expect = write_odd_files(str(tmp_path))
    images = [p for p in expect if not p.endswith(".txt")]
    report = lint_files(images, workers=2)
    assert [f.path for f in report.files] == images
    for path in images:
        assert expect[path] - {"ignored_file", "not_training_format"} <= report.codes(path) | {"not_image"}
    assert "not_image" in report.codes(str(tmp_path / "notes.pdf"))


def test_broken_files_in_ignored_folders_do_not_block_training(tmp_path):
    write_good_images(str(tmp_path / "10_sks"), 3)
    (tmp_path / "loose.png").write_bytes(b"")                      # in the parent: training ignores it
    (tmp_path / "drafts").mkdir()
    (tmp_path / "drafts" / "bad.jpg").write_bytes(b"junk")          # only read if renamed to N_drafts
    (tmp_path / "drafts" / "ok.png").write_bytes(open(str(tmp_path / "10_sks" / "img000.png"), "rb").read())
    report = check_dataset(str(tmp_path), workers=1, with_summary=False)
    assert report.exit_code == 0, report.summary_text()
    loose = report.file(str(tmp_path / "loose.png")).issues[0]
    assert loose.code == "empty_file" and loose.severity == "warning" and "not read by training" in loose.message
    assert "folder_no_repeat_prefix" in report.codes(str(tmp_path / "drafts"))
