"""Dataset parameters: sd-scripts N_name folders and the dataset_config TOML/JSON schema."""
import json

import pytest
from PIL import Image

from lib_lora_train.dataset import (DatasetParams, SubsetParams, TrainingData, datasets_from_config_file,
                                    datasets_from_folders)
from lib_lora_train.errors import ConfigError, DataError

GENERAL = {"resolution": "512", "train_batch_size": 2}


def make_images(folder, n, size=(64, 48), ext=".png", captions=None):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, (i * 20 % 256, 90, 160)).save(folder / f"img{i:02d}{ext}")
        if captions is not None:
            (folder / f"img{i:02d}{captions[0]}").write_text(captions[1], encoding="utf-8")
    return folder


def test_folder_layout_repeats_class_tokens_and_cli_defaults(tmp_path):
    make_images(tmp_path / "train" / "10_sks dog", 3)
    make_images(tmp_path / "train" / "2_a_b", 1)
    make_images(tmp_path / "reg" / "1_dog", 4)
    general = {**GENERAL, "shuffle_caption": True, "keep_tokens": 1, "flip_aug": True, "enable_bucket": True,
               "unrelated_training_option": 3}
    [ds] = datasets_from_folders(str(tmp_path / "train"), str(tmp_path / "reg"), general)
    assert ds.resolution == (512, 512) and ds.batch_size == 2 and ds.enable_bucket
    got = [(s.num_repeats, s.class_tokens, s.is_reg) for s in ds.subsets]
    # sorted by folder name; "2_a_b" keeps the rest of the name as class tokens
    assert got == [(10, "sks dog", False), (2, "a_b", False), (1, "dog", True)]
    assert all(s.shuffle_caption and s.keep_tokens == 1 and s.flip_aug for s in ds.subsets)
    assert all(s.caption_extension == ".txt" for s in ds.subsets)  # our default, not sd-scripts' ".caption"


def test_folders_without_prefix_or_with_bad_repeats_are_skipped_with_warnings(tmp_path):
    root = tmp_path / "train"
    make_images(root / "5_good", 2)
    make_images(root / "mychar", 3)        # no N_ prefix
    make_images(root / "abc_x", 1)         # non-numeric prefix
    make_images(root / "0_zero", 1)        # repeats < 1
    make_images(root / "-1_neg", 1)
    (root / "notes.txt").write_text("not a folder")
    Image.new("RGB", (8, 8)).save(root / "stray.png")
    [ds] = datasets_from_folders(str(root), None, GENERAL)
    assert [s.num_repeats for s in ds.subsets] == [5]
    text = "\n".join(ds.warnings)
    assert "1 images directly in" in text and "are not used" in text
    assert "'mychar'" in text and "rename it to 10_mychar" in text
    assert "'abc_x'" in text and "'0_zero'" in text and "'-1_neg'" in text
    # the warnings travel on to TrainingData
    data = TrainingData([ds], seed=0, size_reader=lambda p: (64, 48))
    assert any("mychar" in w for w in data.warnings)


def test_images_in_the_parent_folder_explain_the_fix(tmp_path):
    root = make_images(tmp_path / "mychar", 3)
    with pytest.raises(DataError) as err:
        datasets_from_folders(str(root), None, GENERAL)
    msg = str(err.value)
    assert "PARENT" in msg and "10_mychar" in msg and "contains 3 images directly" in msg


def test_pointing_at_the_N_name_folder_itself_suggests_its_parent(tmp_path):
    root = make_images(tmp_path / "10_mychar", 2)
    with pytest.raises(DataError) as err:
        datasets_from_folders(str(root), None, GENERAL)
    assert "PARENT" in str(err.value) and str(tmp_path) in str(err.value)


def test_only_unprefixed_folders_or_empty_folders_or_missing_dir_fail_clearly(tmp_path):
    make_images(tmp_path / "a" / "mychar", 2)
    with pytest.raises(DataError, match="rename it to 10_mychar"):
        datasets_from_folders(str(tmp_path / "a"), None, GENERAL)
    (tmp_path / "b" / "10_empty").mkdir(parents=True)
    with pytest.raises(DataError, match="No images found"):
        datasets_from_folders(str(tmp_path / "b"), None, GENERAL)
    with pytest.raises(DataError, match="does not exist"):
        datasets_from_folders(str(tmp_path / "nope"), None, GENERAL)
    make_images(tmp_path / "c" / "1_x", 1)
    with pytest.raises(DataError, match="reg_data_dir"):
        datasets_from_folders(str(tmp_path / "c"), str(tmp_path / "nope"), GENERAL)


def test_resolution_is_required_and_general_types_are_checked(tmp_path):
    make_images(tmp_path / "t" / "1_x", 1)
    with pytest.raises(DataError, match="resolution is required"):
        datasets_from_folders(str(tmp_path / "t"), None, {})
    with pytest.raises(ConfigError, match="keep_tokens"):
        datasets_from_folders(str(tmp_path / "t"), None, {**GENERAL, "keep_tokens": "two"})
    [ds] = datasets_from_folders(str(tmp_path / "t"), None, {"resolution": "512,768", "caption_extension": "cap"})
    assert ds.resolution == (512, 768) and ds.subsets[0].caption_extension == ".cap"


def write_toml(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_toml_precedence_subset_dataset_general_cli_default(tmp_path):
    for name in ("a", "b"):
        make_images(tmp_path / name, 1)
    cfg = write_toml(tmp_path / "ds.toml", f"""
[general]
shuffle_caption = true
keep_tokens = 1
caption_extension = ".caption"

[[datasets]]
resolution = [640, 512]
batch_size = 4
keep_tokens = 2
validation_split = 0.25

  [[datasets.subsets]]
  image_dir = '{tmp_path / "a"}'
  num_repeats = 3
  keep_tokens = 3
  class_tokens = "sks"

  [[datasets.subsets]]
  image_dir = '{tmp_path / "b"}'
  is_reg = true
""")
    general = {"resolution": "512", "train_batch_size": 1, "flip_aug": True, "keep_tokens": 9,
               "caption_extension": ".txt", "dataset_repeats": 7}
    [ds] = datasets_from_config_file(cfg, general)
    a, b = ds.subsets
    assert ds.resolution == (640, 512) and ds.batch_size == 4 and ds.validation_split == 0.25
    assert (a.keep_tokens, b.keep_tokens) == (3, 2)              # subset > dataset
    assert a.shuffle_caption and b.shuffle_caption                # file [general]
    assert a.caption_extension == b.caption_extension == ".caption"  # file [general] > caller's general
    assert a.flip_aug and b.flip_aug                              # caller's general > default
    assert (a.num_repeats, b.num_repeats) == (3, 7)               # dataset_repeats is the CLI name
    assert b.is_reg and not a.is_reg and a.class_tokens == "sks" and b.class_tokens is None
    assert a.caption_dropout_rate == 0.0 and ds.bucket_reso_steps == 64   # defaults


def test_json_config_and_relative_image_dir_next_to_the_file(tmp_path):
    make_images(tmp_path / "imgs", 1)
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({"datasets": [{"resolution": 256, "subsets": [{"image_dir": "imgs"}]}]}))
    [ds] = datasets_from_config_file(str(cfg), {})
    assert ds.resolution == (256, 256)
    assert ds.subsets[0].image_dir == str(tmp_path / "imgs")


@pytest.mark.parametrize("text, expect", [
    ('[general]\nshufle_caption = true\n', "unknown key 'shufle_caption' at the general level; did you mean "
                                           "'shuffle_caption'"),
    ('[[datasets]]\nbatch_sise = 2\n[[datasets.subsets]]\nimage_dir = "x"\n', "did you mean 'batch_size'"),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\nnum_repeat = 2\n', "did you mean 'num_repeats'"),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\nbatch_size = 2\n', "belongs in [general] or [[datasets]]"),
    ('[general]\nimage_dir = "x"\n', "belongs in [[datasets.subsets]]"),
    ('[general]\nprior_loss_weight = 1.0\n', "training argument"),
    ('[[datasets]]\n[[datasets.subsets]]\nnum_repeats = 2\n', "image_dir is required"),
    ('[[datasets]]\n[[datasets.subsets]]\nmetadata_file = "m.json"\n', "not supported yet"),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\nnum_repeats = "2"\n', "'num_repeats' must be an integer"),
    ('[[datasets]]\nresolution = [512]\n[[datasets.subsets]]\nimage_dir = "x"\n', "'resolution' must be"),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\nresize_interpolation = "fancy"\n', "lanczos"),
    ('[[datasets]]\nbucket_reso_steps = 12\n[[datasets.subsets]]\nimage_dir = "x"\n', "multiple of 8"),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\ncaption_dropout_rate = 1.5\n', "[0, 1]"),
    ('[surprise]\na = 1\n', "unknown key 'surprise'"),
    ('[general]\n', "no [[datasets]]"),
    ('[[datasets]]\nresolution = 512\n', "no [[datasets.subsets]]"),
    ('[[datasets]\n', "cannot parse"),
])
def test_schema_errors_name_the_key_level_and_fix(tmp_path, text, expect):
    cfg = write_toml(tmp_path / "ds.toml", text)
    with pytest.raises(DataError) as err:
        datasets_from_config_file(cfg, {"resolution": "512"})
    assert expect in str(err.value)


def test_duplicate_subsets_are_ignored_with_a_warning_but_other_datasets_may_reuse_a_folder(tmp_path):
    make_images(tmp_path / "a", 2)
    cfg = write_toml(tmp_path / "ds.toml", f"""
[general]
resolution = 512
[[datasets]]
  [[datasets.subsets]]
  image_dir = '{tmp_path / "a"}'
  num_repeats = 2
  [[datasets.subsets]]
  image_dir = '{tmp_path / "a"}/'
  num_repeats = 5
[[datasets]]
resolution = 768
  [[datasets.subsets]]
  image_dir = '{tmp_path / "a"}'
""")
    first, second = datasets_from_config_file(cfg, {})
    assert [s.num_repeats for s in first.subsets] == [2]
    assert any("duplicate" in w for w in first.warnings)
    assert len(second.subsets) == 1 and second.resolution == (768, 768) and not second.warnings


def test_params_dataclasses_normalise():
    sub = SubsetParams(image_dir="x", caption_extension="txt")
    assert sub.caption_extension == ".txt"
    assert DatasetParams(resolution=640).resolution == (640, 640)
