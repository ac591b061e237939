"""Pick the best epoch: the epoch x weight grid (shape, labels, order, weights), the CLI, the ranking text."""
import json
import os

import pytest
import torch
from PIL import Image

from lib_lora_train.cli import main as cli_main
from lib_lora_train.compare import open_run, rank_epochs, ranking_from_record, table_text, trigger_word
from lib_lora_train.compare.apply import MergedLora
from lib_lora_train.compare.grid import PNG_KEY, compare_grid, save_compare_grid
from lib_lora_train.compare.runs import find_record
from lib_lora_train.config import config_from_dict
from lib_lora_train.errors import ConfigError
from lib_lora_train.models import encode_prompts, load_sd_model, write_tiny_checkpoint
from lib_lora_train.networks import create_network, network_config_from_args, read_network_file
from lib_lora_train.sampling.grid import make_grid
from lib_lora_train.sampling.pipeline import generate
from lib_lora_train.sampling.prompts import PromptSpec
from lib_lora_train.training.loop import train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny run: 2 epochs at 64 px, an epoch file and the final file, trained hard enough to show."""
    root = tmp_path_factory.mktemp("run")
    ckpt = root / "tiny.safetensors"
    write_tiny_checkpoint(str(ckpt), seed=0)
    folder = root / "data" / "2_zkz"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"zkz, tag{i}", encoding="utf-8")
    cfg = config_from_dict(dict(pretrained_model_name_or_path=str(ckpt), train_data_dir=str(root / "data"),
                                output_dir=str(root / "out"), output_name="cmp", resolution="64", network_dim=4,
                                network_alpha=4, learning_rate=2e-2, max_train_epochs=2, save_every_n_epochs=1,
                                train_batch_size=2, seed=2, cache_latents=True, device="cpu",
                                save_precision="float"))
    train(cfg)
    return root / "out"


def test_run_files_trigger_word_and_record_lookup(run, tmp_path):
    info = open_run(str(run))
    assert [(f.epoch, f.name, f.kind) for f in info.files] == [(1, "cmp-000001", "epoch"), (2, "cmp", "final")]
    assert trigger_word(info.record) == "zkz"
    assert trigger_word({"config": {"metadata_trigger_phrase": "my thing"}}) == "my thing"
    assert trigger_word({"dataset": {"dataset_dirs": {"10_sks dog": {}}}}) == "sks dog"
    assert trigger_word({}) is None
    assert find_record(str(run / "cmp.run.json")).endswith("cmp.run.json")
    with pytest.raises(ConfigError, match="no run record"):
        find_record(str(tmp_path))
    (tmp_path / "a.run.json").write_text("{}")
    (tmp_path / "b.run.json").write_text("{}")
    with pytest.raises(ConfigError, match="2 runs"):
        find_record(str(tmp_path))


def test_merged_lora_matches_the_network_at_that_weight_and_restores_exactly(run):
    model = load_sd_model(open_run(str(run)).base_model)
    tensors, _ = read_network_file(run / "cmp.safetensors")
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])

    def unet_out():
        with torch.no_grad():
            cond = encode_prompts(model, ["zkz"], None)
            return model.unet(x, t, cond).sample

    base = unet_out()
    with MergedLora(model, tensors) as lora:
        lora.set_weight(0.6)
        merged = unet_out()
    assert all(torch.equal(before[k], v) for k, v in model.unet.state_dict().items())
    net = create_network(network_config_from_args("networks.lora", 4, 4, []), model.unet, model.text_encoder)
    net.load_tensors(tensors)
    net.apply_to()
    net.multiplier = 0.6
    hooked = unet_out()
    net.remove()
    assert not torch.allclose(merged, base, atol=1e-4)
    assert torch.allclose(merged, hooked, atol=1e-4)


def test_grid_shape_labels_order_and_png(run, tmp_path):
    info = open_run(str(run))
    grid = compare_grid(info, weights=[0, 1.0], steps=2, seed=11, prompts=["zkz --n blurry"])
    assert grid.epochs == [1, 2] and grid.weights == [0.0, 1.0]
    assert grid.col_labels == ["0 (no LoRA)", "weight 1"]
    assert grid.row_labels[0].splitlines()[:2] == ["cmp-000001", "epoch 1"]
    assert grid.row_labels[1].splitlines()[:2] == ["cmp", "epoch 2"]
    assert all("val " in lab for lab in grid.row_labels)                 # the validation loss is on the rows
    cells = grid.cells[0]
    assert len(cells) == 2 and all(len(r) == 2 for r in cells)
    assert cells[0][0].tobytes() == cells[1][0].tobytes()                # weight 0: the base model in every row
    assert cells[0][1].tobytes() != cells[0][0].tobytes()                # the LoRA changes the picture
    assert cells[0][1].tobytes() != cells[1][1].tobytes()                # and epochs differ
    # the cell of (epoch 2, weight 1) is what that file gives at that weight, with the same seed
    model = load_sd_model(info.base_model)
    with MergedLora(model, read_network_file(run / "cmp.safetensors")[0]) as lora:
        lora.set_weight(1.0)
        again = generate(model, [PromptSpec("zkz", "blurry", 64, 64, 2, 11, 7.0)])[0]
    assert again.tobytes() == cells[1][1].tobytes()
    expected = make_grid(cells, grid.row_labels, grid.col_labels, title=f"cmp: epochs x LoRA weight | zkz")
    assert grid.image.size == expected.size and grid.image.tobytes() == expected.tobytes()
    assert "Seed: 11" in grid.infotext and "Negative prompt: blurry" in grid.infotext

    path = save_compare_grid(grid, str(tmp_path / "g.png"))
    with Image.open(path) as im:
        text = dict(im.text)
    meta = json.loads(text[PNG_KEY])
    assert meta["row_labels"] == grid.row_labels and meta["weights"] == [0.0, 1.0]
    assert [r["epoch"] for r in meta["validation"]["rows"]] == [0, 1, 2]
    assert "Steps: 2" in text["parameters"] and "suggested" in text["validation_table"]
    assert json.loads((tmp_path / "g.json").read_text())["epochs"] == [1, 2]


def test_host_renderer_cells_land_in_order_and_stop_ends_the_grid(run):
    """A host's own sampler (the WebUI) plugs in as `render`; colours say which (epoch, weight) a cell is."""
    import io
    import threading
    from lib_lora_train.errors import Interrupted
    calls = []

    def render(specs, ef, w):
        calls.append((ef.epoch, w, [s.prompt for s in specs], specs[0].seed, specs[0].size()))
        return [Image.new("RGB", (64, 64), (40 * ef.epoch, int(200 * w), 10 * i)) for i, _ in enumerate(specs)]

    grid = compare_grid(str(run), render=render, weights=[0, 0.5, 1], seed=9, prompts=["zkz", "other"])
    assert calls == [(1, 0.0, ["zkz", "other"], 9, (64, 64)), (1, 0.5, ["zkz", "other"], 9, (64, 64)),
                     (1, 1.0, ["zkz", "other"], 9, (64, 64)), (2, 0.5, ["zkz", "other"], 9, (64, 64)),
                     (2, 1.0, ["zkz", "other"], 9, (64, 64))]          # weight 0 is drawn once
    _, layout = make_grid(grid.cells[0], grid.row_labels, grid.col_labels, title="cmp: epochs x LoRA weight | zkz",
                          return_layout=True)
    assert (layout.rows, layout.cols) == (2, 3)
    for r, epoch in enumerate([1, 2]):
        for c, w in enumerate([0, 0.5, 1]):
            x0, y0, x1, y1 = layout.cell_box(r, c)
            expected = (40, 0, 0) if w == 0 else (40 * epoch, int(200 * w), 0)
            assert grid.image.getpixel(((x0 + x1) // 2, (y0 + y1) // 2)) == expected
    with Image.open(io.BytesIO(grid.png_bytes())) as im:
        assert json.loads(im.text[PNG_KEY])["col_labels"] == ["0 (no LoRA)", "weight 0.5", "weight 1"]
    stop = threading.Event()
    stop.set()
    with pytest.raises(Interrupted, match="stopped after 0 of"):
        compare_grid(str(run), render=render, stop=stop, seed=1)


def test_several_prompts_stack_sub_grids(run):
    grid = compare_grid(str(run), weights=[1.0], steps=1, seed=3, epochs=[2], prompts=["zkz", "zkz, tag1"])
    assert len(grid.cells) == 2 and grid.prompts == ["zkz", "zkz, tag1"]
    one = make_grid(grid.cells[0], grid.row_labels, grid.col_labels, title="x")
    assert grid.image.height >= 2 * one.height - 20 and grid.image.width == one.width


def test_cli_writes_grid_and_prints_table(run, tmp_path, capsys):
    out = tmp_path / "cli.png"
    code = cli_main(["compare", str(run), "--weights", "0.5", "1", "--steps", "1", "--seed", "4",
                     "--epochs", "1", "--out", str(out), "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["png"] == str(out) and os.path.exists(out) and data["col_labels"] == ["weight 0.5", "weight 1"]
    assert data["validation"]["suggested_epoch"] in (1, 2)
    assert cli_main(["compare", str(run), "--table"]) == 0
    printed = capsys.readouterr().out
    assert "val loss" in printed and "<- suggested" in printed and "cmp-000001.safetensors" in printed
    assert cli_main(["compare", str(run), "--epochs", "7", "--steps", "1"]) == 2
    assert "no file for epoch 7" in capsys.readouterr().err
    assert cli_main(["compare", str(run), "--weights", "x"]) == 2


# ---------------------------------------------------------------- ranking text for synthetic curves

def test_ranking_overfitting():
    r = rank_epochs({0: 1.0, 1: 0.90, 2: 0.85, 3: 0.88, 4: 0.93}, {1: 0.9, 2: 0.8, 3: 0.7, 4: 0.6},
                    source="held_out")
    assert r.verdict == "overfitting" and r.suggested_epoch == 2
    assert [row.epoch for row in r.ranked()] == [2, 3, 1, 4]           # epoch 0 (the base) is never ranked
    assert "overfitting" in r.explanation and "training loss kept falling" in r.explanation
    assert "Keep epoch 2" in r.explanation
    assert "<- suggested" in table_text(r).splitlines()[3]


def test_ranking_undertrained_and_trained():
    r = rank_epochs({1: 0.95, 2: 0.9, 3: 0.85}, {1: 0.9, 2: 0.8, 3: 0.7})
    assert r.verdict == "undertrained" and r.suggested_epoch == 3
    assert "more epochs" in r.explanation.lower() and "still falling" in r.explanation
    flat = rank_epochs({1: 0.9, 2: 0.8, 3: 0.8, 4: 0.8001})
    assert flat.verdict == "trained" and flat.suggested_epoch == 2      # a tie goes to the earlier epoch


def test_ranking_only_suggests_epochs_with_files_and_says_when_nothing_is_held_out():
    r = rank_epochs({1: 0.7, 2: 0.8, 3: 0.9}, files={2: "a-000002.safetensors", 3: "a.safetensors"},
                    source="training_images")
    assert r.suggested_epoch == 2 and r.rows[0].rank is None
    assert "not overfitting" in r.explanation.replace("but not", "not")
    empty = rank_epochs({}, {1: 0.5})
    assert empty.verdict == "no_data" and empty.suggested_epoch is None and "cannot be ranked" in empty.explanation


def test_ranking_from_record_reads_validation_and_epochs():
    record = {"validation": [{"epoch": 0, "step": 0, "loss": 1.0, "at": "start"},
                             {"epoch": 1, "step": 2, "loss": 0.9, "at": "step"},
                             {"epoch": 1, "step": 4, "loss": 0.8, "at": "epoch"},
                             {"epoch": 2, "step": 8, "loss": 0.85, "at": "epoch"}],
              "epochs": [{"epoch": 1, "avg_loss": 0.7, "step": 4}, {"epoch": 2, "avg_loss": 0.6, "step": 8}],
              "validation_source": {"source": "held_out"}}
    r = ranking_from_record(record)
    assert [(row.epoch, row.validation_loss, row.step) for row in r.rows] == [(0, 1.0, 0), (1, 0.8, 4),
                                                                                (2, 0.85, 8)]
    assert r.suggested_epoch == 1 and r.verdict == "overfitting" and r.source == "held_out"
