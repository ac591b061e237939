"""Compare on an SDXL run's files (the engine's grid: the LoRA merged into both text encoders and the sgm-named
U-Net layers), a LoRA of another family refused with a clear reason, and failed cells (an error, a NaN image)
drawn as "failed" tiles and listed in the grid and the API result instead of coming out black."""
import json

import pytest
import torch
from PIL import Image

from lib_lora_train.compare.grid import compare_grid
from lib_lora_train.compare_api import CompareRequest, engine_compare
from lib_lora_train.models import load_sd_model, tiny_sd1_state_dict, write_tiny_checkpoint
from lib_lora_train.networks import create_network, network_config_from_args, save_network_file


def _random_lora(model, family, seed):
    encoders = list(getattr(model, "text_encoders", None) or [model.text_encoder])
    net = create_network(network_config_from_args("networks.lora", 4, 4, []), model.unet,
                         encoders if family == "sdxl" else encoders[0], family=family)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return net.save_tensors()


def _record(folder, name, ckpt, files):
    outputs = [{"name": stem, "path": str(folder / f"{stem}.safetensors"), "epoch": e, "step": 10 * e,
                "kind": "final" if e == len(files) else "epoch"} for e, stem in enumerate(files, 1)]
    record = {"run_id": f"{name}-id", "output_name": name, "created": 1, "status": "done", "outputs": outputs,
              "config": {"resolution": "64", "metadata_trigger_phrase": "zkz",
                         "pretrained_model_name_or_path": str(ckpt)},
              "epochs": [{"epoch": e, "avg_loss": 0.2, "step": 10 * e} for e in range(1, len(files) + 1)],
              "validation": [{"epoch": e, "step": 10 * e, "loss": 0.3 - 0.01 * e, "at": "epoch"}
                             for e in range(1, len(files) + 1)],
              "validation_source": {"source": "held_out"}}
    path = folder / f"{name}.run.json"
    path.write_text(json.dumps(record), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def sdxl_run(tmp_path_factory):
    """A tiny SDXL base and a run of two epoch files (random LoRAs in sd-scripts' SDXL names), plus a run whose
    file is an SD 1.x LoRA (another family) on the same base."""
    root = tmp_path_factory.mktemp("sdxl")
    ckpt = root / "tiny_sdxl.safetensors"
    write_tiny_checkpoint(str(ckpt), seed=0, family="sdxl")
    model = load_sd_model(str(ckpt))
    for stem, seed in (("cmp-000001", 1), ("cmp", 2)):
        save_network_file(str(root / f"{stem}.safetensors"), _random_lora(model, "sdxl", seed), {})
    sd1 = load_sd_model(tiny_sd1_state_dict(seed=0))
    save_network_file(str(root / "sd1lora.safetensors"), _random_lora(sd1, "sd1", 3), {})
    return {"model": model, "record": _record(root, "cmp", ckpt, ["cmp-000001", "cmp"]),
            "wrong": _record(root, "sd1lora", ckpt, ["sd1lora"])}


def test_engine_grid_of_an_sdxl_run_and_the_model_restored(sdxl_run):
    model = sdxl_run["model"]
    encoders = model.text_encoders
    assert len(encoders) == 2
    before = {k: v.clone() for part in (model.unet, *encoders) for k, v in part.state_dict().items()}
    grid = compare_grid(sdxl_run["record"], model=model, weights=[0, 1.0], steps=2, seed=5, prompts=["zkz"])
    assert grid.epochs == [1, 2] and grid.failed == []
    cells = grid.cells[0]
    assert cells[0][0].tobytes() == cells[1][0].tobytes()              # weight 0: the base model in every row
    assert cells[0][1].tobytes() != cells[0][0].tobytes() != cells[1][1].tobytes()
    after = {k: v for part in (model.unet, *encoders) for k, v in part.state_dict().items()}
    assert all(torch.equal(before[k], after[k]) for k in before)    # every merged weight put back


def test_a_lora_of_another_family_fails_its_cells_with_the_reason(sdxl_run):
    res = engine_compare(CompareRequest(record_path=sdxl_run["wrong"], weights=[1.0], seed=1, steps=1),
                         model=sdxl_run["model"], save=False)
    assert len(res.failed) == 1 and res.failed[0].epoch == 1 and res.failed[0].weight == 1.0
    assert "SD 1.x / 2.x LoRA but the base model is SDXL" in res.failed[0].reason
    d = res.to_dict()
    assert d["failed"][0]["reason"] == res.failed[0].reason and d["failed"][0]["file"].endswith("sd1lora.safetensors")
    colours = set(res.image.convert("RGB").getdata())
    assert (96, 96, 96) in colours and (220, 40, 40) in colours       # a grey "failed" tile, not a black cell


def test_host_renderer_errors_and_nan_images_become_failed_tiles(sdxl_run):
    def render(specs, ef, w):
        if (ef.epoch, w) == (1, 1.0):
            raise RuntimeError("CUDA out of memory (pretend)")
        shade = 0 if (ef.epoch, w) == (2, 0.5) else 120              # (2, 0.5): what NaN latents decode to
        return [Image.new("RGB", (64, 64), (shade, shade, shade)) for _ in specs]

    grid = compare_grid(sdxl_run["record"], render=render, weights=[0.5, 1.0], seed=3, prompts=["zkz", "other"])
    got = sorted((f.epoch, f.weight, f.prompt, f.reason.split(" ")[0]) for f in grid.failed)
    assert got == [(1, 1.0, "other", "RuntimeError:"), (1, 1.0, "zkz", "RuntimeError:"),
                   (2, 0.5, "other", "NaN"), (2, 0.5, "zkz", "NaN")]
    for p in range(2):
        for (r, c) in ((0, 1), (1, 0)):
            tile = grid.cells[p][r][c]
            assert tile.size == (64, 64) and tile.convert("RGB").getextrema()[0][1] > 0      # not black
        assert grid.cells[p][0][0].getpixel((5, 5)) == (120, 120, 120)                    # good cells kept
    assert [f["weight"] for f in grid.to_dict()["failed"]] and "out of memory" in json.dumps(grid.to_dict())
