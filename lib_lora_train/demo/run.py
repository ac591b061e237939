"""`make demo`: train a LoRA on the built-in tiny model and toy dataset, then draw a before/after grid.

The base model (tiny_base.safetensors, rebuilt by `python -m lib_lora_train.demo.pretrain`) was pre-trained on a
small synthetic world of coloured shapes. The toy dataset teaches it "zkz", a magenta star it has never seen.
The grid's first column is the base model; the others are the saved epochs of the LoRA.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from ..config import config_from_dict

BASE_MODEL = Path(__file__).with_name("tiny_base.safetensors")

# One place for the demo's training choices, so the README and the code cannot drift apart.
DEMO_SETTINGS = {
    "output_name": "zkz",
    "resolution": "64",
    "network_module": "networks.lora",
    "network_dim": 8,
    "network_alpha": 8,
    "learning_rate": 1e-2,
    "text_encoder_lr": 2e-3,
    "optimizer_type": "AdamW",
    "lr_scheduler": "constant",
    "max_train_epochs": 6,
    "save_every_n_epochs": 2,
    "train_batch_size": 4,
    "cache_latents": True,
    "seed": 0,
    "save_precision": "fp16",
    "device": "cpu",
    "overwrite": True,
}


def run_demo(out: str | os.PathLike = "demo_out", *, bar: bool = True, settings: dict | None = None) -> dict:
    from ..cli import ProgressPrinter
    from ..models import load_sd_model
    from ..networks import create_network, network_config_from_args, read_network_file
    from ..sampling.grid import make_grid, save_png_with_text
    from ..sampling.pipeline import generate
    from ..sampling.prompts import parse_prompt_line
    from ..training.loop import train
    from .toy import demo_prompts, make_toy_dataset

    torch.set_num_threads(1)   # tiny models: one thread beats two on a 2-core machine
    out = Path(out).resolve()
    base = BASE_MODEL
    if not base.exists():
        # The pre-trained base is not built yet: fall back to random weights, and say so.
        from ..models import write_tiny_checkpoint
        base = out / "tiny_random_base.safetensors"
        if not base.exists():
            write_tiny_checkpoint(str(base), seed=0)
        print(f"note: {BASE_MODEL.name} is missing (build it with `python -m lib_lora_train.demo.pretrain`); "
              f"using a tiny RANDOM-weight base model, so the grid shows a change, not a recognisable star")
    data_root = make_toy_dataset(out / "data")
    values = {**DEMO_SETTINGS, **(settings or {}),
              "pretrained_model_name_or_path": str(base), "train_data_dir": str(data_root),
              "output_dir": str(out / "lora")}
    cfg = config_from_dict(values)
    t0 = time.time()
    result = train(cfg, sink=ProgressPrinter(bar=bar))
    train_seconds = time.time() - t0

    # Before/after: the same prompts and seeds, without the LoRA and with each saved epoch.
    model = load_sd_model(str(base))
    net_cfg = network_config_from_args(cfg.network_module, cfg.network_dim, cfg.network_alpha, cfg.network_args)
    network = create_network(net_cfg, model.unet, model.text_encoder)
    specs = [parse_prompt_line(line) for line in demo_prompts()]
    epochs = sorted(p for p in result.outputs if p != str(Path(cfg.output_dir) / f"{cfg.output_name}.safetensors"))
    columns = [("base model (no LoRA)", None)] + [(f"epoch {int(Path(p).stem.rsplit('-', 1)[1])}", p) for p in epochs] \
        + [("final LoRA", str(Path(cfg.output_dir) / f"{cfg.output_name}.safetensors"))]
    cells: list[list] = [[] for _ in specs]
    network.apply_to()
    try:
        for _, path in columns:
            if path is None:
                network.multiplier = 0.0
            else:
                network.load_tensors(read_network_file(path)[0])
                network.multiplier = 1.0
            for row, img in enumerate(generate(model, specs, device="cpu", eval_modules=[network])):
                cells[row].append(img)
    finally:
        network.remove()
    grid = make_grid(cells, row_labels=[s.prompt for s in specs], col_labels=[c for c, _ in columns],
                     title="LoRA demo: 'zkz' (a magenta star) was never seen by the base model")
    grid_path = out / "before_after.png"
    save_png_with_text(grid, grid_path, {"parameters": json.dumps({"prompts": [s.prompt for s in specs]})})

    summary = {"lora_files": result.outputs, "run_record": result.record_path, "grid": str(grid_path),
               "train_seconds": round(train_seconds, 1), "steps": result.steps}
    print(f"\nLoRA files:   {', '.join(result.outputs)}")
    print(f"run record:   {result.record_path}")
    print(f"sample grid:  {grid_path}")
    print(f"trained {result.steps} steps in {train_seconds:.1f} s")
    return summary
