"""Drift (compare/drift.py): the image distance, control prompts from a run's captions, drift on the tiny model (0
for the base and a zero LoRA, growing with the LoRA's weight), the suggestion by loss and drift, and its wiring
into the grid and the CLI."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from lib_lora_train.compare.drift import (DRIFT_MAX_RATIO, DriftReport, DriftRow, default_control_prompts,
                                          drift_table_text, image_distance, measure_drift, seed_spread,
                                          strip_trigger, suggest)
from lib_lora_train.compare.grid import MergingRenderer
from lib_lora_train.compare.ranking import rank_epochs
from lib_lora_train.compare.runs import EpochFile
from lib_lora_train.errors import ConfigError
from lib_lora_train.models import load_sd_model, write_tiny_checkpoint
from lib_lora_train.networks import create_network, network_config_from_args
from lib_lora_train.networks.io import save_network_file


def test_image_distance_is_a_mean_absolute_difference_in_unit_range():
    black, white = Image.new("RGB", (64, 64)), Image.new("RGB", (64, 64), (255, 255, 255))
    assert image_distance(black, black) == 0.0
    assert image_distance(black, white) == 1.0
    half = np.zeros((64, 64, 3), np.uint8)
    half[:, :32] = 255                          # left half white: exactly half the pixels differ by 1
    assert image_distance(Image.fromarray(half), black) == 0.5
    assert image_distance(Image.fromarray(half), white) == image_distance(white, Image.fromarray(half))
    # different sizes are compared at the same reduced size
    assert image_distance(Image.new("RGB", (128, 96), (255, 255, 255)), white) == 0.0


def test_control_prompts_come_from_the_captions_without_the_trigger(tmp_path):
    assert strip_trigger("zkz, white background", ["zkz"]) == "white background"
    assert strip_trigger("a photo of sks dog, smiling", ["sks"]) == "a photo of dog, smiling"
    assert strip_trigger("zkz", ["zkz"]) == ""
    assert strip_trigger("zkzq, tag", ["zkz"]) == "zkzq, tag"          # whole words only
    data = tmp_path / "data" / "4_zkz"
    data.mkdir(parents=True)
    for i, cap in enumerate(["zkz, white background", "zkz, blue background", "zkz, white background", "zkz"]):
        (data / f"{i}.txt").write_text(cap + "\n", encoding="utf-8")
    rec = {"config": {"train_data_dir": str(tmp_path / "data")}, "dataset": {"dataset_dirs": {"4_zkz": {}}}}
    assert default_control_prompts(rec) == ["white background", "blue background"]    # most frequent first
    assert default_control_prompts(rec, limit=1) == ["white background"]
    # the class prompt of prior preservation wins
    assert default_control_prompts({**rec, "config": {**rec["config"], "reg_images_prompt": "a star"}}) == ["a star"]
    # the folder is gone: the record's tag counts
    gone = {"config": {"train_data_dir": str(tmp_path / "nowhere")},
            "dataset": {"tag_frequency": {"4_zkz": {"zkz": 4, "smile": 1, "outdoors": 3}}}}
    assert default_control_prompts(gone) == ["outdoors, smile"]
    # `N_trigger class` folders give the class
    assert default_control_prompts({"dataset": {"dataset_dirs": {"10_sks dog": {}}}}) == ["dog"]
    assert default_control_prompts({"dataset": {"dataset_dirs": {"10_zkz": {}}}}) == []


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model, a zero LoRA (as created) and a random one, both as files."""
    root = tmp_path_factory.mktemp("drift")
    ckpt = root / "tiny.safetensors"
    write_tiny_checkpoint(str(ckpt), seed=0)
    model = load_sd_model(str(ckpt))
    net = create_network(network_config_from_args("networks.lora", 4, 4, None), model.unet, model.text_encoder)
    zero = net.save_tensors(torch.float32)
    g = torch.Generator().manual_seed(0)
    rand = {k: (torch.randn(v.shape, generator=g) * 0.3 if k.endswith("lora_up.weight") else v)
            for k, v in zero.items()}
    assert any(k.endswith("lora_up.weight") for k in zero) and all(
        float(v.abs().max()) == 0 for k, v in zero.items() if k.endswith("lora_up.weight"))
    save_network_file(root / "zero.safetensors", zero, {})
    save_network_file(root / "rand.safetensors", rand, {})
    return model, EpochFile(1, str(root / "zero.safetensors")), EpochFile(2, str(root / "rand.safetensors"))


def _measure(model, files, weight, **kw):
    render = MergingRenderer(model)
    try:
        return measure_drift(render, files, ["red circle", "a tree"], seed=5, weight=weight, steps=3, width=64,
                             height=64, cfg_scale=5.0, **kw)
    finally:
        render.close()


def test_drift_is_zero_for_the_base_and_a_zero_lora_and_grows_with_weight(tiny):
    model, zero, rand = tiny
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    r = _measure(model, [zero], 1.0)
    assert [row.drift for row in r.rows] == [0.0]               # a zero LoRA draws exactly the base's pictures
    assert r.spread is not None and r.spread > 0                # two seeds of the base differ
    assert r.prompts == ["red circle", "a tree"] and r.seeds == [5, 6]
    at0 = _measure(model, [rand], 0.0)
    assert [row.drift for row in at0.rows] == [0.0]             # weight 0: the base model
    drifts = [_measure(model, [rand], w).rows[0].drift for w in (0.25, 1.0, 4.0)]
    assert 0 < drifts[0] < drifts[1] < drifts[2], drifts
    # the model is given back as it was
    for k, v in model.unet.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_measure_drift_refuses_bad_input(tiny):
    model, zero, _ = tiny
    with pytest.raises(ConfigError, match="control prompt"):
        measure_drift(lambda s, e, w: [], [zero], ["  "], seed=1)
    with pytest.raises(ConfigError, match="2 seeds"):
        measure_drift(lambda s, e, w: [], [zero], ["x"], seed=1, n_seeds=1)
    with pytest.raises(ValueError, match="renderer gave"):
        measure_drift(lambda s, e, w: [], [zero], ["x"], seed=1)


def test_seed_spread_pairs_pictures_of_the_same_prompt():
    black, white, grey = (Image.new("RGB", (8, 8), c) for c in ((0, 0, 0), (255, 255, 255), (51, 51, 51)))
    # prompt-major: prompt 0 seeds (black, white), prompt 1 seeds (black, grey)
    assert seed_spread([black, white, black, grey], 2, 2) == pytest.approx((1.0 + 0.2) / 2, abs=1e-12)
    assert seed_spread([black], 1, 1) is None


def report(drifts, spread=0.1):
    return DriftReport(prompts=["red circle"], seeds=[1, 2], spread=spread,
                       rows=[DriftRow(e, d, d / spread, d / spread <= DRIFT_MAX_RATIO) for e, d in drifts.items()])


def test_suggestion_skips_epochs_that_drifted():
    # validation loss keeps falling, but drift rises: the last epochs learned at the cost of the other prompts
    ranking = rank_epochs({1: 0.30, 2: 0.25, 3: 0.22, 4: 0.20}, files={e: f"e{e}" for e in range(1, 5)})
    assert ranking.suggested_epoch == 4
    r = suggest(report({1: 0.01, 2: 0.03, 3: 0.07, 4: 0.12}), ranking)
    assert r.suggested_epoch == 2
    assert "Epoch 4 has the lowest validation loss" in r.explanation and "Drift rises" in r.explanation
    assert "<- suggested" in drift_table_text(r).splitlines()[2]


def test_suggestion_with_overfitting_and_no_drift_keeps_the_loss_minimum():
    ranking = rank_epochs({1: 0.30, 2: 0.20, 3: 0.24, 4: 0.28}, {1: 0.3, 2: 0.2, 3: 0.15, 4: 0.1},
                          files={e: f"e{e}" for e in range(1, 5)})
    assert ranking.verdict == "overfitting"
    r = suggest(report({1: 0.01, 2: 0.02, 3: 0.02, 4: 0.03}), ranking)
    assert r.suggested_epoch == 2 and r.explanation.startswith("Suggested: epoch 2: the lowest validation loss")


def test_suggestion_when_every_epoch_drifted_or_no_loss_was_recorded():
    r = suggest(report({1: 0.09, 2: 0.08, 3: 0.2}), rank_epochs({1: 0.3, 2: 0.2, 3: 0.1}))
    assert r.suggested_epoch == 2 and "every epoch moved the control prompts" in r.explanation
    r = suggest(report({1: 0.01, 2: 0.02, 3: 0.2}), None)          # no validation loss: the last one under it
    assert r.suggested_epoch == 2 and "no validation loss was recorded" in r.explanation


def test_grid_and_cli_show_drift(tmp_path):
    from lib_lora_train.cli import main as cli_main
    from lib_lora_train.compare.grid import compare_grid
    from lib_lora_train.config import config_from_dict
    from lib_lora_train.training.loop import train

    ckpt = tmp_path / "tiny.safetensors"
    write_tiny_checkpoint(str(ckpt), seed=0)
    folder = tmp_path / "data" / "2_zkz"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"zkz, tag{i}", encoding="utf-8")
    cfg = config_from_dict(dict(pretrained_model_name_or_path=str(ckpt), train_data_dir=str(tmp_path / "data"),
                                output_dir=str(tmp_path / "out"), output_name="cmp", resolution="64", network_dim=2,
                                network_alpha=2, learning_rate=2e-2, max_train_epochs=2, save_every_n_epochs=1,
                                train_batch_size=2, seed=2, device="cpu", save_precision="float"))
    train(cfg)
    done = []
    grid = compare_grid(str(tmp_path / "out"), weights=[1.0], seed=3, steps=2, drift=True,
                        progress=lambda d, t: done.append((d, t)))
    assert grid.drift.prompts == ["tag0", "tag1"] and [r.epoch for r in grid.drift.rows] == [1, 2]
    assert all(r.drift is not None and r.drift >= 0 for r in grid.drift.rows)
    assert grid.drift.suggested_epoch in (1, 2) and grid.drift.explanation.startswith("Suggested: epoch")
    assert all("drift " in label for label in grid.row_labels)
    assert done[-1][0] == done[-1][1] == 2 + 2 * 2 * 3          # grid cells + control pictures (base + 2 epochs)
    assert json.loads(json.dumps(grid.to_dict()))["drift"]["rows"][0]["epoch"] == 1
    assert "drift_table" in grid.png_text()
    plain = compare_grid(str(tmp_path / "out"), weights=[1.0], seed=3, steps=2)
    assert plain.drift is None

    out = tmp_path / "g.png"
    assert cli_main(["compare", str(tmp_path / "out"), "--weights", "1", "--seed", "3", "--steps", "2",
                     "--control_prompt", "a tree", "--out", str(out)]) == 0
    meta = json.loads(Image.open(out).text["lora_compare"])
    assert meta["drift"]["prompts"] == ["a tree"] and meta["drift"]["seeds"] == [3, 4]
    assert cli_main(["compare", str(tmp_path / "out"), "--weights", "1", "--seed", "3", "--steps", "2",
                     "--no_drift", "--out", str(out)]) == 0
    assert json.loads(Image.open(out).text["lora_compare"])["drift"] is None
