"""TrainingData: items, regularization balancing, batches per epoch, validation split and the summary."""
import collections
import json
import os

import pytest

from lib_lora_train.dataset import DatasetParams, SubsetParams, TrainingData, datasets_from_folders
from lib_lora_train.errors import DataError

# Image files are empty placeholders: sizes come from the injected reader (the name encodes them), so these
# tests exercise the bookkeeping without decoding anything.


def touch_images(folder, n, size=(512, 512), captions=None, ext=".png", start=0):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        name = f"img{i:03d}_{size[0]}x{size[1]}"
        (folder / (name + ext)).write_bytes(b"")
        if captions is not None:
            (folder / (name + ".txt")).write_text(captions[i % len(captions)], encoding="utf-8")
    return folder


def size_from_name(path):
    w, h = os.path.splitext(os.path.basename(path))[0].split("_")[-1].split("x")
    return int(w), int(h)


def data_for(datasets, seed=0):
    return TrainingData(datasets, seed, size_reader=size_from_name)


def folder_data(tmp_path, general=None, reg=True, seed=0):
    general = {"resolution": "512", **(general or {})}
    [ds] = datasets_from_folders(str(tmp_path / "train"), str(tmp_path / "reg") if reg else None, general)
    return data_for([ds], seed)


def test_reg_trimmed_to_train_samples_in_glob_order_with_warning(tmp_path):
    touch_images(tmp_path / "train" / "10_x", 20)          # 200 samples
    touch_images(tmp_path / "reg" / "1_cls", 300)           # 300 reg samples: 100 dropped
    data = folder_data(tmp_path, {"train_batch_size": 2})
    reg = [it for it in data.items if it.is_reg]
    assert len(reg) == 200 and all(it.num_repeats == 1 for it in reg)
    assert [os.path.basename(it.path) for it in reg] == sorted(os.listdir(tmp_path / "reg" / "1_cls"))[:200]
    assert any("some of the regularization images are not used" in w for w in data.warnings)
    s = data.summary()
    assert s["num_train_images"] == 200 and s["num_reg_images"] == 300       # reg counted before balancing
    assert data.samples_per_epoch == 400 and data.num_batches_per_epoch == 200   # trainers.md §1.9 example


def test_reg_repeats_grow_cyclically_when_short(tmp_path):
    touch_images(tmp_path / "train" / "2_x", 5)             # 10 samples
    touch_images(tmp_path / "reg" / "1_cls", 3)             # 3 reg samples
    data = folder_data(tmp_path)
    assert [it.num_repeats for it in data.items if it.is_reg] == [4, 3, 3]
    assert not any("not used" in w for w in data.warnings)
    assert data.summary()["num_reg_images"] == 3


def test_reg_with_repeats_may_overshoot_by_the_last_image_like_sd_scripts(tmp_path):
    touch_images(tmp_path / "train" / "10_x", 1)            # 10 samples
    touch_images(tmp_path / "reg" / "3_cls", 5)             # 15: images are taken with 3 repeats until >= 10
    data = folder_data(tmp_path)
    reg = [it for it in data.items if it.is_reg]
    assert [it.num_repeats for it in reg] == [3, 3, 3, 3] and data.samples_per_epoch == 22


def test_captions_class_token_fallback_and_warning(tmp_path):
    touch_images(tmp_path / "train" / "3_sks dog", 2, captions=["Red, blue"])
    touch_images(tmp_path / "train" / "3_sks dog", 2, start=2)          # no caption files
    touch_images(tmp_path / "train" / "1_", 1)                          # no class tokens either
    data = folder_data(tmp_path, reg=False)
    caps = {os.path.relpath(it.path, tmp_path / "train"): it.caption for it in data.items}
    assert caps == {"1_/img000_512x512.png": "",
                    "3_sks dog/img000_512x512.png": "Red, blue", "3_sks dog/img001_512x512.png": "Red, blue",
                    "3_sks dog/img002_512x512.png": "sks dog", "3_sks dog/img003_512x512.png": "sks dog"}
    assert any("no .txt caption file for 2 of 4 images" in w and "'sks dog'" in w for w in data.warnings)
    assert any("empty caption" in w for w in data.warnings)


def test_summary_shapes_tag_frequency_dirs_and_bucket_info(tmp_path):
    touch_images(tmp_path / "train" / "10_x", 3, size=(512, 512), captions=["Tag A, tag b", "tag a"])
    touch_images(tmp_path / "train" / "10_x", 2, size=(1024, 512), start=3)
    touch_images(tmp_path / "reg" / "1_cls", 4, captions=["person"])
    data = folder_data(tmp_path, {"enable_bucket": True, "train_batch_size": 2})
    s = data.summary()
    assert s["tag_frequency"] == {"10_x": {"tag a": 3, "tag b": 2, "x": 2}, "1_cls": {"person": 4}}
    assert s["dataset_dirs"] == {"10_x": {"n_repeats": 10, "img_count": 5}}
    assert s["reg_dataset_dirs"] == {"1_cls": {"n_repeats": 1, "img_count": 4}}
    info = s["bucket_info"]
    assert info["buckets"] == {"0": {"resolution": [512, 512], "count": 30 + 50},
                               "1": {"resolution": [704, 320], "count": 20}}
    expected_err = 2 * abs(704 / 320 - 2.0) / 9      # 9 images (5 train + 4 reg), per image, not per repeat
    assert abs(info["mean_img_ar_error"] - expected_err) < 1e-9
    assert json.loads(json.dumps(s))["bucket_info"] == info
    ds = s["datasets"][0]
    assert ds["resolution"] == (512, 512) and ds["batch_size_per_device"] == 2 and ds["min_bucket_reso"] == 256
    assert [sub["image_dir"] for sub in ds["subsets"]] == ["10_x", "1_cls"]
    assert s["num_batches_per_epoch"] == 40 + 10       # ceil(80/2) + ceil(20/2)
    # without bucketing sd-scripts stores no bucket info
    assert folder_data(tmp_path).summary()["bucket_info"] is None


def test_duplicate_dir_names_across_datasets_are_renamed_and_tags_counted_once(tmp_path):
    folder = touch_images(tmp_path / "a", 2, captions=["one"])
    sub = SubsetParams(image_dir=str(folder), num_repeats=2)
    data = data_for([DatasetParams(resolution=(512, 512), subsets=[sub]),
                     DatasetParams(resolution=(768, 768), validation_split=0.5,
                                   subsets=[SubsetParams(image_dir=str(folder))])])
    s = data.summary()
    assert s["dataset_dirs"] == {"a": {"n_repeats": 2, "img_count": 2}, "a (2)": {"n_repeats": 1, "img_count": 1}}
    assert s["datasets"][1]["tag_frequency"] == {"a": {"one": 1}}
    assert s["tag_frequency"] == {"a": {"one": 2}}          # the first dataset using the folder wins
    assert [it.bucket for it in data.items] == [(512, 512)] * 2 + [(768, 768)]


def check_epoch(data, epoch):
    batches = data.batches_for_epoch(epoch)
    assert len(batches) == data.num_batches_per_epoch
    seen = collections.Counter()
    for b in batches:
        bs = data.datasets[b.dataset_index].batch_size
        assert 1 <= len(b.samples) <= bs
        assert all(s.item.bucket == b.bucket and s.item.dataset_index == b.dataset_index for s in b.samples)
        seen.update(id(s.item) for s in b.samples)
    assert all(seen[id(it)] == it.num_repeats for it in data.items)
    assert sum(seen.values()) == data.samples_per_epoch
    return batches


@pytest.mark.parametrize("batch", [1, 2, 3])
@pytest.mark.parametrize("layout", ["one", "repeats+reg", "buckets", "two-datasets"])
def test_batches_cover_each_sample_repeats_times_and_match_num_batches(tmp_path, batch, layout):
    general = {"resolution": "512", "train_batch_size": batch, "enable_bucket": True}
    touch_images(tmp_path / "train" / "3_x", 4)
    if layout != "one":
        touch_images(tmp_path / "train" / "1_y", 3, size=(900, 400))
    if layout in ("repeats+reg", "buckets"):
        touch_images(tmp_path / "reg" / "2_r", 5, size=(400, 900) if layout == "buckets" else (512, 512))
    [ds] = datasets_from_folders(str(tmp_path / "train"), str(tmp_path / "reg") if layout != "one" and
                                 (tmp_path / "reg").exists() else None, general)
    datasets = [ds]
    if layout == "two-datasets":
        datasets.append(DatasetParams(resolution=(256, 256), batch_size=batch + 1, subsets=[
            SubsetParams(image_dir=str(tmp_path / "train" / "1_y"), num_repeats=5)]))
    data = data_for(datasets)
    for epoch in (1, 2):
        check_epoch(data, epoch)


def test_batch_order_is_a_function_of_seed_and_epoch_only(tmp_path):
    touch_images(tmp_path / "train" / "4_x", 6)
    touch_images(tmp_path / "train" / "2_y", 5, size=(900, 400))
    general = {"train_batch_size": 2, "enable_bucket": True, "flip_aug": True}

    def order(data, epoch):
        return [[(os.path.basename(s.item.path), s.flipped) for s in b.samples]
                for b in data.batches_for_epoch(epoch)]

    a, b = folder_data(tmp_path, general, reg=False), folder_data(tmp_path, general, reg=False)
    a.batches_for_epoch(5)                                     # no hidden state between calls
    assert order(a, 1) == order(b, 1) and order(a, 2) == order(b, 2)
    assert order(a, 1) != order(a, 2)
    assert order(folder_data(tmp_path, general, reg=False, seed=1), 1) != order(a, 1)
    # batches of different buckets are interleaved, not served bucket after bucket
    assert len({tuple(b.bucket for b in a.batches_for_epoch(e)) for e in range(1, 6)}) > 1
    flips = [f for batch in order(a, 1) for _, f in batch]
    assert 0 < sum(flips) < len(flips)
    no_flip = folder_data(tmp_path, {**general, "flip_aug": False}, reg=False)
    assert not any(s.flipped for b in no_flip.batches_for_epoch(1) for s in b.samples)


def test_validation_split_holds_out_train_images_only_deterministically(tmp_path):
    touch_images(tmp_path / "train" / "2_x", 8)
    touch_images(tmp_path / "reg" / "1_r", 4)
    general = {"validation_split": 0.25, "validation_seed": 3}
    data = folder_data(tmp_path, general)
    val = data.validation_items()
    train = [it for it in data.items if not it.is_reg]
    assert len(val) == 2 and len(train) == 6 and not any(it.is_reg for it in val)
    assert {it.path for it in val}.isdisjoint({it.path for it in train})
    assert len([it for it in data.items if it.is_reg]) == 4
    assert data.summary()["num_train_images"] == 12 and data.summary()["num_validation_images"] == 2
    again = folder_data(tmp_path, general)
    assert [it.path for it in again.validation_items()] == [it.path for it in val]
    other = folder_data(tmp_path, {**general, "validation_seed": 4})
    held = [{it.path for it in folder_data(tmp_path, {**general, "validation_seed": k}).validation_items()}
            for k in range(6)]
    assert len({frozenset(h) for h in held}) > 1 and other.validation_items()
    assert sum(len(b.samples) for b in data.validation_batches()) == 2
    assert folder_data(tmp_path).validation_items() == []


def test_prior_loss_weight_and_empty_data(tmp_path):
    touch_images(tmp_path / "train" / "1_x", 2)
    touch_images(tmp_path / "reg" / "1_r", 2)
    data = folder_data(tmp_path)
    data.set_prior_loss_weight(0.5)
    assert sorted((it.is_reg, it.loss_weight) for it in data.items) == [(False, 1.0)] * 2 + [(True, 0.5)] * 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="No data found"):
        data_for([DatasetParams(subsets=[SubsetParams(image_dir=str(tmp_path / "empty"))])])
