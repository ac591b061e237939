"""Command line: `python -m lib_lora_train <command> ...`.

Exit codes: 0 done, 2 bad config or input, 3 interrupted with a resumable state, 1 anything else.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from typing import Any

from .errors import ConfigError, DataError, Interrupted, LoraTrainError, ModelError
from .terminal import ProgressPrinter

EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 3


def _install_sigint(stop: threading.Event) -> None:
    """First Ctrl-C: stop at the next step with a saved state. Second: abort at once."""
    from .sigint import install_sigint
    install_sigint(stop, "stopping at the next step and saving a resumable state")


def _config_from_args(args: argparse.Namespace, rest: list[str]):
    from .config import config_from_dict, load_config, parse_cli_overrides
    overrides = parse_cli_overrides(rest)
    if args.config:
        return load_config(args.config, overrides)
    return config_from_dict(overrides)


def cmd_train(args: argparse.Namespace, rest: list[str]) -> int:
    from .training.loop import train
    cfg = _config_from_args(args, rest)
    stop = threading.Event()
    _install_sigint(stop)
    result = train(cfg, sink=ProgressPrinter(bar=not args.no_bar), stop=stop)
    if os.environ.get("RANK", "0") != "0":
        return EXIT_OK              # torchrun / accelerate launch: process 0 reports the run
    print(json.dumps({"status": result.status, "outputs": result.outputs, "record": result.record_path,
                      "state": result.state_dir, "steps": result.steps}, indent=2))
    return EXIT_OK


def cmd_steps(args: argparse.Namespace, rest: list[str]) -> int:
    from .training.data_setup import plan_for_config
    cfg = _config_from_args(args, rest)
    plan = plan_for_config(cfg, num_processes=args.num_processes)
    if args.json:
        print(json.dumps({"total_steps": plan.total_steps, "epochs": plan.epochs,
                          "steps_per_epoch": plan.steps_per_epoch, "formula": plan.formula}))
    else:
        print(plan.formula)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace, rest: list[str]) -> int:
    from .demo.run import run_demo
    run_demo(args.out, bar=not args.no_bar)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lib_lora_train",
                                description="Train LoRA / LyCORIS networks for Stable Diffusion 1.x "
                                            "(sd-scripts-compatible options and files).")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a network; options use sd-scripts' names (--key value)",
                       description="Options: sd-scripts names, from --config run.toml and/or as --key value flags "
                                   "(e.g. --network_dim 32 --network_args conv_dim=8 conv_alpha=4).")
    t.add_argument("--config", help="run.toml with sd-scripts argument names")
    t.add_argument("--no-bar", action="store_true", help="print lines instead of a progress bar")
    t.set_defaults(func=cmd_train)
    s = sub.add_parser("steps", help="print how many steps a config will train, and why")
    s.add_argument("--config")
    s.add_argument("--json", action="store_true")
    s.add_argument("--num_processes", type=int, default=None,
                   help="processes (GPUs) of a torchrun / accelerate launch run (default: WORLD_SIZE, else 1)")
    s.set_defaults(func=cmd_steps)
    d = sub.add_parser("demo", help="train on the built-in tiny model and toy dataset, make a before/after grid")
    d.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    d.add_argument("--no-bar", action="store_true")
    d.set_defaults(func=cmd_demo)
    from .prep.cli import register as register_prep
    register_prep(sub)
    from .tools.cli import register as register_tools
    register_tools(sub)
    from .ui.app import register as register_ui
    register_ui(sub)
    from .compare.cli import register as register_compare
    register_compare(sub)
    from .interop.cli import register as register_interop
    register_interop(sub)
    from .prep.regimages_cli import register as register_reg_images
    register_reg_images(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("train", "steps"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args, rest)
    except Interrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ConfigError, DataError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except LoraTrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # noqa: BLE001 - the exit code says "anything else"
        import traceback
        traceback.print_exc()
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR


def run(argv: list[str] | None = None) -> Any:
    sys.exit(main(argv))
