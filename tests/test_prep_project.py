"""Project folders, import (folder, recursive, uploads), repeats with their suggestion, regularisation folders,
and the summary with the engine's steps formula."""
import hashlib
import os

import pytest

from lib_lora_train.dataset import datasets_from_folders, plan_steps_for_datasets
from lib_lora_train.errors import ConfigError, DataError
from lib_lora_train.prep.corpus import picture, write_good_images, write_odd_files
from lib_lora_train.prep.preprocess import PreprocessOptions
from lib_lora_train.prep.project import (add_reg_images, create_project, import_images, is_project, open_project,
                                         project_images)
from lib_lora_train.prep.repeats import dataset_summary, folder_name, rename_repeats, suggest_repeats


def tree_hashes(root):
    return {os.path.join(d, n): hashlib.sha256(open(os.path.join(d, n), "rb").read()).hexdigest()
            for d, _s, files in os.walk(root) for n in files}


def test_repeat_suggestion_says_where_it_comes_from():
    assert [suggest_repeats(n).repeats for n in (1, 10, 11, 50, 51, 100, 101, 500)] == [7, 7, 5, 5, 3, 3, 1, 1]
    s = suggest_repeats(30)
    assert "lora-scripts" in s.reason and "30 images" in s.reason
    with pytest.raises(ConfigError):
        folder_name(0, "x")
    with pytest.raises(ConfigError):
        folder_name(3, "a/b")


def test_project_create_open(tmp_path):
    p = create_project(str(tmp_path / "p"), "mychar", trigger="sks", purpose="character")
    assert is_project(p.root) and os.path.isdir(p.train_dir)
    again = open_project(p.root)
    assert (again.name, again.trigger, again.purpose) == ("mychar", "sks", "character")
    assert create_project(p.root, "other").name == "mychar"          # existing project: opened, unchanged
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        create_project(str(tmp_path / "full"), "y")
    with pytest.raises(ConfigError, match="purpose"):
        create_project(str(tmp_path / "q"), "y", purpose="landscape")
    with pytest.raises(DataError):
        open_project(str(tmp_path / "full"))


def test_import_folder_recursive_keeps_originals_and_captions(tmp_path):
    src = tmp_path / "mine"
    write_good_images(str(src), 4)
    write_good_images(str(src / "more"), 2, start_seed=40)
    write_odd_files(str(src / "odd"))
    before = tree_hashes(src)
    p = create_project(str(tmp_path / "proj"), "mychar")
    res = import_images(p, str(src), recursive=True, options=PreprocessOptions(workers=2))
    assert tree_hashes(src) == before                                  # originals never touched
    assert os.path.basename(res.folder) == f"{res.suggestion.repeats}_mychar"
    assert res.suggestion.repeats == 5                                 # 6 good + 13 usable odd = 19 images
    skipped = {os.path.basename(i.source) for i in res.preprocess.skipped}
    assert {"empty.png", "truncated.jpg", "bomb.png"} <= skipped
    assert "truncated" in res.check.codes(str(src / "odd" / "truncated.jpg"))
    written = project_images(p)
    assert len(written) == len(res.preprocess.items) - len(skipped)
    assert open(os.path.join(res.folder, "img000.txt"), encoding="utf-8").read() == "sks, tag0, shape"
    # byte copies kept in the project
    assert len(res.copies) == len(res.preprocess.items)
    assert hashlib.sha256(open(res.copies[0], "rb").read()).hexdigest() in before.values()
    d = res.to_dict()
    assert d["folder"] == res.folder and d["suggestion"]["repeats"] == 5


def test_import_uploads_into_existing_folder_and_set_repeats(tmp_path):
    uploads = [str(p) for p in (tmp_path / f"u{i}.png" for i in range(3))]
    for i, path in enumerate(uploads):
        picture(100 + i).save(path)
    p = create_project(str(tmp_path / "proj"), "sks")
    first = import_images(p, uploads[:2], repeats=8, options=PreprocessOptions(workers=1))
    assert os.path.basename(first.folder) == "8_sks" and first.suggestion is None
    second = import_images(p, uploads[2:], options=PreprocessOptions(workers=1))
    assert second.folder == first.folder and len(project_images(p)) == 3
    new = p.set_repeats("8_sks", 3)
    assert os.path.basename(new) == "3_sks" and len(project_images(p)) == 3
    with pytest.raises(ConfigError):
        p.set_repeats(str(tmp_path), 2)                                  # not the project's folder


def test_reg_folders_and_summary_formula(tmp_path):
    p = create_project(str(tmp_path / "proj"), "sks")
    src = tmp_path / "train"
    write_good_images(str(src), 4)
    import_images(p, str(src), repeats=10, options=PreprocessOptions(workers=1))
    reg_src = tmp_path / "regsrc"
    write_good_images(str(reg_src), 6, start_seed=60, captions=False)
    reg = add_reg_images(p, str(reg_src), "person", repeats=2, options=PreprocessOptions(workers=1))
    assert os.path.basename(reg.folder) == "2_person" and os.path.dirname(reg.folder) == p.reg_dir

    summary = dataset_summary(p.train_dir, p.reg_dir, batch_size=2, max_train_epochs=3)
    engine = plan_steps_for_datasets(datasets_from_folders(p.train_dir, p.reg_dir,
                                                           {"resolution": 512, "train_batch_size": 2,
                                                            "enable_bucket": True}), 0, max_train_epochs=3)
    assert summary.formula == engine.formula and summary.total_steps == engine.total_steps
    assert "4 images × 10 repeats = 40 samples" in summary.formula and "(+40 reg" in summary.formula
    text = summary.text
    assert "10_sks: 4 images × 10 repeats" in text and "reg 2_person: 6 images × 2 repeats" in text
    assert "suggested: 7 repeats" in text                                # 10 differs from the suggestion
    assert summary.to_dict()["text"] == text


def test_rename_repeats(tmp_path):
    d = tmp_path / "10_a"
    d.mkdir()
    (tmp_path / "3_a").mkdir()
    with pytest.raises(DataError, match="already exists"):
        rename_repeats(str(d), 3)
    assert os.path.basename(rename_repeats(str(d), 4)) == "4_a"
    plain = tmp_path / "b"
    plain.mkdir()
    assert os.path.basename(rename_repeats(str(plain), 2)) == "2_b"
