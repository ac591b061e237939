"""`python -m lib_lora_train compare RUN_DIR_OR_RECORD [...]`: the epoch x weight grid and the loss table.

`register(subparsers)` adds the subcommand to the main parser (lib_lora_train/cli.py). Errors in the input
(ConfigError / DataError / ModelError) are turned into exit code 2 by the main CLI; a first Ctrl-C stops the
grid between cells (exit 3) without writing anything.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

from .grid import DEFAULT_CFG, DEFAULT_STEPS, DEFAULT_WEIGHTS


def _install_sigint(stop: threading.Event) -> None:
    from ..sigint import install_sigint
    install_sigint(stop, "stopping after the current cell")


def default_out_path(run) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.join(os.path.dirname(os.path.abspath(run.record_path)), f"{run.output_name}-compare-{stamp}.png")


def cmd_compare(args: argparse.Namespace, rest: list[str] | None = None) -> int:
    from .grid import compare_grid, save_compare_grid
    from .ranking import ranking_from_record, table_text
    from .runs import open_run

    run = open_run(args.run)
    if args.table:
        ranking = ranking_from_record(run.record, files={f.epoch: f.path for f in run.files})
        if args.json:
            print(json.dumps({"record": run.record_path, "validation": ranking.to_dict()}, ensure_ascii=True))
        else:
            print(table_text(ranking))
            print()
            print(ranking.explanation)
        return 0

    if args.threads:
        import torch
        torch.set_num_threads(args.threads)   # tiny models on a busy machine: 1 thread can be many times faster
    model = None
    if args.model:
        from ..models import load_sd_model
        from ..training.loop import resolve_device
        model = load_sd_model(args.model, device=resolve_device(args.device))
    stop = threading.Event()
    _install_sigint(stop)

    def progress(done: int, total: int) -> None:
        if not args.json or args.progress:
            print(f"cell {done}/{total}", file=sys.stderr, flush=True)

    grid = compare_grid(run, model=model, epochs=args.epochs, weights=args.weights, prompts=args.prompt,
                        negative_prompt=args.negative_prompt, seed=args.seed, steps=args.steps, width=args.width,
                        height=args.height, sampler=args.sampler, cfg_scale=args.cfg_scale,
                        clip_skip=args.clip_skip, device=args.device, progress=progress, stop=stop,
                        drift=not args.no_drift, control_prompts=args.control_prompt, drift_seeds=args.drift_seeds,
                        drift_weight=args.drift_weight)
    out = args.out or default_out_path(run)
    save_compare_grid(grid, out)
    if args.json:
        print(json.dumps({"png": os.path.abspath(out), **grid.to_dict()}, ensure_ascii=True))
    else:
        print(f"grid: {os.path.abspath(out)}  ({len(grid.epochs)} epochs x {len(grid.weights)} weights"
              f"{f' x {len(grid.prompts)} prompts' if len(grid.prompts) > 1 else ''}, seed {grid.seed})")
        print()
        print(table_text(grid.ranking))
        print()
        print(grid.ranking.explanation)
        if grid.drift is not None:
            from .drift import drift_table_text
            print()
            print("Drift of the prompts without the trigger from the base model:")
            print(drift_table_text(grid.drift))
            if grid.drift.available:
                print()
                print(grid.drift.explanation)
    return 0


def register(subparsers) -> None:
    c = subparsers.add_parser(
        "compare", help="grid of a run's epoch files x LoRA weights, with the validation-loss table",
        description="Draw every epoch file of a run at several LoRA weights with the same seed (rows: epochs, "
                    "columns: weights), save the grid as a PNG with its infotext, and print the epochs ranked "
                    "by validation loss with a suggested epoch. The prompt defaults to the run's trigger word; "
                    "a prompt may carry sd-scripts flags (--n --w --h --s --d --l --ss). Unless --no_drift, "
                    "control prompts without the trigger are drawn too, with the base model and each epoch on "
                    "fixed seeds, and their drift from the base is shown beside the validation loss; the "
                    "suggested epoch is then the lowest-loss one that did not drift.")
    c.add_argument("run", help="a training output folder holding one <name>.run.json, or the .run.json file")
    c.add_argument("--weights", nargs="+", help=f"LoRA weights (default {' '.join(map(str, DEFAULT_WEIGHTS))}); "
                                                f"0 adds the base model without the LoRA")
    c.add_argument("--prompt", action="extend", nargs="+", help="prompt(s); one sub-grid each "
                                                                "(default: the trigger word)")
    c.add_argument("--negative_prompt", default=None)
    c.add_argument("--seed", type=int, default=None, help="one seed for every cell (default: random, printed)")
    c.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"sampling steps (default {DEFAULT_STEPS})")
    c.add_argument("--width", type=int, default=None, help="default: the run's resolution")
    c.add_argument("--height", type=int, default=None)
    c.add_argument("--sampler", default=None, help="default DPM++ 2M Karras (sd-scripts names: euler_a, ddim, ...)")
    c.add_argument("--cfg_scale", type=float, default=DEFAULT_CFG, help=f"default {DEFAULT_CFG:g}")
    c.add_argument("--clip_skip", type=int, default=None, help="default: the run's clip_skip")
    c.add_argument("--epochs", nargs="+", type=int, help="epoch numbers to draw (default: every epoch file)")
    c.add_argument("--model", help="base checkpoint to use instead of the one named in the run record")
    c.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    c.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    c.add_argument("--out", help="grid PNG path (default: <run folder>/<name>-compare-<time>.png); a .json with "
                                 "the labels and the table is written beside it")
    c.add_argument("--control_prompt", action="extend", nargs="+",
                   help="prompt(s) without the trigger to measure drift on (default: the run's most frequent "
                        "captions with the trigger word taken out, or its reg_images_prompt)")
    c.add_argument("--no_drift", action="store_true", help="do not measure drift (fewer pictures to draw)")
    c.add_argument("--drift_seeds", type=int, default=None,
                   help="seeds per control prompt, from --seed on (default 2; at least 2)")
    c.add_argument("--drift_weight", type=float, default=None, help="LoRA weight for drift (default 1)")
    c.add_argument("--table", action="store_true", help="only print the validation-loss table (no grid)")
    c.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    c.add_argument("--progress", action="store_true", help=argparse.SUPPRESS)
    c.set_defaults(func=cmd_compare)
