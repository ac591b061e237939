"""`make demo`: train a LoRA on the built-in tiny model and toy dataset, then draw a before/after grid.

The base model (tiny_base.safetensors, rebuilt by `python -m lib_lora_train.demo.pretrain`) was pre-trained on a
small synthetic world of coloured shapes. The toy dataset teaches it "zkz", a magenta star it has never seen,
with prior preservation: pictures of the base's own world (with their captions) as sd-scripts regularisation
data, so that the LoRA learns the star without redrawing the rest of the world. The grid's first column is the
base model; the others are the saved epochs of the LoRA. Under it, the drift of the control prompt (how far
"red circle, white background" moved from the base's picture, compare/drift.py) per epoch.
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
    # The "concept" preset's recipe (lib_lora_train/presets/builtin.toml, tuned on bench/quality), shortened to 12
    # epochs and at batch 8 in one step: 600 updates. The old demo's dim 8 at 3e-3 constant with prior weight 1
    # learned the colour but the star's shape in 0.29 of samples and moved the control prompt 1.1-1.4x its spread.
    "output_name": "zkz",
    "resolution": "64",
    "network_module": "networks.lora",
    "network_dim": 64,
    "network_alpha": 32,
    "learning_rate": 2e-3,
    "network_train_unet_only": True,    # the text encoder stays the base's: prompts without "zkz" encode alike
    "optimizer_type": "AdamW",
    "lr_scheduler": "cosine",
    "min_snr_gamma": 5,
    "max_train_epochs": 12,             # 50 steps each: 200 star samples + 200 world samples, batch 8
    "save_every_n_epochs": 3,
    "train_batch_size": 8,
    "prior_loss_weight": 2.0,
    "cache_latents": True,
    "seed": 0,
    "save_precision": "fp16",
    "device": "cpu",
    "overwrite": True,
}
REG_IMAGES = 48          # world pictures for prior preservation (sd-scripts balances them to the training count)
DRIFT_SEEDS = 2          # seeds of the control prompt for the drift numbers


def _settings(out: Path, base: Path, data_root: Path, reg_root: Path | None, settings: dict | None) -> dict:
    values = {**DEMO_SETTINGS, **(settings or {}), "pretrained_model_name_or_path": str(base),
              "train_data_dir": str(data_root), "output_dir": str(out / "lora")}
    if reg_root is not None:
        values["reg_data_dir"] = str(reg_root)
    return values


def run_demo(out: str | os.PathLike = "demo_out", *, bar: bool = True, settings: dict | None = None,
             prior_preservation: bool = True, drift: bool = True) -> dict:
    from ..terminal import ProgressPrinter
    from ..compare.drift import drift_table_text, measure_drift, suggest
    from ..compare.grid import MergingRenderer
    from ..compare.ranking import ranking_from_record
    from ..compare.runs import open_run
    from ..models import load_sd_model
    from ..sampling.grid import make_grid, save_png_with_text
    from ..sampling.prompts import parse_prompt_line
    from ..training.loop import train
    from .toy import CONTROL_PROMPT, SAMPLE_SIZE, demo_prompts, make_reg_dataset, make_toy_dataset

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
    reg_root = make_reg_dataset(out / "reg", REG_IMAGES) if prior_preservation else None
    cfg = config_from_dict(_settings(out, base, data_root, reg_root, settings))
    t0 = time.time()
    result = train(cfg, sink=ProgressPrinter(bar=bar))
    train_seconds = time.time() - t0

    # Before/after: the same prompts and seeds, without the LoRA and with each saved epoch.
    t1 = time.time()
    run = open_run(result.record_path)
    model = load_sd_model(str(base))
    render = MergingRenderer(model)
    specs = [parse_prompt_line(line) for line in demo_prompts()]
    report = None
    try:
        columns = [("base model (no LoRA)", run.files[0], 0.0)] + \
            [(f"final LoRA (epoch {ef.epoch})" if ef.kind == "final" else f"epoch {ef.epoch}", ef, 1.0)
             for ef in run.files]
        cells: list[list] = [[] for _ in specs]
        for _, ef, weight in columns:
            for row, img in enumerate(render(specs, ef, weight)):
                cells[row].append(img)
        if drift:
            report = measure_drift(render, run.files, [CONTROL_PROMPT], seed=specs[-1].seed, n_seeds=DRIFT_SEEDS,
                                   width=SAMPLE_SIZE, height=SAMPLE_SIZE, steps=specs[-1].steps,
                                   cfg_scale=specs[-1].scale)
            suggest(report, ranking_from_record(run.record, files={f.epoch: f.path for f in run.files}))
    finally:
        render.close()
    labels = [c for c, _, _ in columns]
    if report is not None:
        by = report.by_epoch()
        labels = [labels[0] + "\ndrift 0"] + [f"{c}\ndrift {by[ef.epoch].drift:.3f}" for c, ef, _ in columns[1:]]
    grid = make_grid(cells, row_labels=[s.prompt for s in specs], col_labels=labels,
                     title="LoRA demo: 'zkz' (a magenta star) was never seen by the base model")
    grid_path = out / "before_after.png"
    save_png_with_text(grid, grid_path, {"parameters": json.dumps({"prompts": [s.prompt for s in specs]})})
    sample_seconds = time.time() - t1

    summary = {"lora_files": result.outputs, "run_record": result.record_path, "grid": str(grid_path),
               "train_seconds": round(train_seconds, 1), "sample_seconds": round(sample_seconds, 1),
               "steps": result.steps, "drift": report.to_dict() if report is not None else None}
    print(f"\nLoRA files:   {', '.join(result.outputs)}")
    print(f"run record:   {result.record_path}")
    print(f"sample grid:  {grid_path}")
    print(f"trained {result.steps} steps in {train_seconds:.1f} s; grid and drift in {sample_seconds:.1f} s")
    if report is not None:
        print(f"\nDrift of the control prompt {CONTROL_PROMPT!r} from the base model, per epoch:")
        print(drift_table_text(report))
        print(report.explanation)
    return summary
