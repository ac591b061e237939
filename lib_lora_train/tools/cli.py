"""CLI subcommands merge / merge-lora / extract / resize / inspect, with sd-scripts' flag names.

`register(subparsers)` adds them to the main parser (lib_lora_train/cli.py); each handler has the signature
(args, rest) -> exit code, like the other commands. Progress goes to stderr, the result to stdout (JSON with
--json). A first Ctrl-C stops the tool before it writes anything (exit 3); outputs are written atomically.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
from typing import Any

from ..events import LOG, WARNING, Event
from .common import PROGRESS

_PRECISIONS = ["float", "fp16", "bf16"]


class _Printer:
    """Progress of a tool on stderr: one line per stage change and every ~10%, warnings and log lines."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self._last: tuple[str, int] | None = None

    def __call__(self, event: Event) -> None:
        d = event.data
        if event.kind == WARNING:
            print(f"warning: {d['message']}", file=sys.stderr, flush=True)
        elif self.quiet:
            return
        elif event.kind == LOG:
            print(d["message"], file=sys.stderr, flush=True)
        elif event.kind == PROGRESS and d.get("total"):
            pct = int(100 * d["done"] / d["total"])
            step = (d["stage"], pct // 10)
            if step != self._last or d["done"] == d["total"]:
                if step != self._last:
                    print(f"{d['stage']}: {d['done']}/{d['total']}", file=sys.stderr, flush=True)
                self._last = step


def _stop_event() -> threading.Event:
    from ..sigint import install_sigint
    return install_sigint(threading.Event(), "stopping (nothing is written)")


def _emit(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    if args.json:
        print(json.dumps(payload, indent=2, ensure_ascii=False, default=str))
    else:
        print(text)


def _inputs(args: argparse.Namespace):
    from ..errors import ConfigError
    from .merge import LoraInput

    models = args.models or []
    ratios = args.ratios if args.ratios else [1.0] * len(models)
    if len(ratios) != len(models):
        raise ConfigError(f"{len(models)} models but {len(ratios)} ratios: give one ratio per model")
    lbws = args.lbws or []
    if lbws and len(lbws) != len(models):
        raise ConfigError(f"{len(models)} models but {len(lbws)} --lbws: give one block-weight spec per model")
    rank = getattr(args, "dylora_rank", None)
    return [LoraInput(m, float(r), lbws[i] if lbws else None, rank) for i, (m, r) in enumerate(zip(models, ratios))]


def cmd_merge(args: argparse.Namespace, rest: list[str]) -> int:
    if not args.sd_model:     # sd-scripts' merge_lora.py without --sd_model merges the LoRAs with each other
        return cmd_merge_lora(args, rest)
    from .merge import merge_into_checkpoint

    res = merge_into_checkpoint(args.sd_model, _inputs(args), args.save_to, merge_precision=args.precision,
                                save_precision=args.save_precision, no_metadata=args.no_metadata,
                                overwrite=args.overwrite, strict=args.strict, sink=_Printer(args.quiet),
                                stop=_stop_event())
    skipped = sum(len(v) for v in res.report.skipped.values())
    _emit(args, res.to_json(), f"saved {res.path} ({len(res.report.changed_keys)} tensors changed"
          + (f", {skipped} modules skipped" if skipped else "") + f") sha256 {res.sha256}")
    return 0


def _lora_summary(res) -> str:
    s = res.summary
    extra = "".join(f", {k} {v:.4g}" if isinstance(v, float) else f", {k} {v}" for k, v in s.items()
                    if k not in ("inputs",) and v is not None)
    return f"saved {res.path} (sshs_model_hash {res.hashes['sshs_model_hash'][:12]}{extra})"


def cmd_merge_lora(args: argparse.Namespace, rest: list[str]) -> int:
    from .merge_lora import merge_loras_to_file

    res = merge_loras_to_file(_inputs(args), args.save_to, new_rank=args.new_rank,
                              new_conv_rank=args.new_conv_rank, concat=args.concat, shuffle=args.shuffle,
                              clamp=args.clamp_quantile, device=args.device, save_precision=args.save_precision,
                              no_metadata=args.no_metadata, overwrite=args.overwrite, sink=_Printer(args.quiet),
                              stop=_stop_event())
    _emit(args, res.to_json(), _lora_summary(res))
    return 0


def cmd_extract(args: argparse.Namespace, rest: list[str]) -> int:
    from ..errors import ConfigError
    from .extract import extract_lora_to_file

    if args.v2 or args.sdxl:    # sd-scripts' flags: the family is read from the checkpoint; they must agree
        from .checkpoint import CheckpointSource
        from .families import checkpoint_family
        with CheckpointSource(args.model_org) as src:
            found = checkpoint_family(src.keys)
        wanted = "sdxl" if args.sdxl else "sd2"
        if found != wanted:
            from ..networks.names import FAMILY_LABELS
            raise ConfigError(f"--{'sdxl' if args.sdxl else 'v2'} was given but {args.model_org} is an "
                              f"{FAMILY_LABELS[found]} checkpoint (the family is read from the file; the flag is not "
                              f"needed)")
    res = extract_lora_to_file(args.model_org, args.model_tuned, args.save_to, dim=args.dim, conv_dim=args.conv_dim,
                               clamp_quantile=args.clamp_quantile, min_diff=args.min_diff, device=args.device,
                               load_precision=args.load_precision, save_precision=args.save_precision,
                               v_parameterization=bool(args.v_parameterization), no_metadata=args.no_metadata,
                               overwrite=args.overwrite, sink=_Printer(args.quiet), stop=_stop_event())
    text = _lora_summary(res)
    if args.verbose:
        text += "\n" + "\n".join(f"{m['name']:75s} | rank {m['rank']}, sum(S) kept {m['sum_retained']:.1%}, "
                                 f"fro kept {m['fro_retained']:.1%}, error {m['rel_error']:.2%}"
                                 for m in res.modules)
    _emit(args, res.to_json(), text)
    return 0


def cmd_resize(args: argparse.Namespace, rest: list[str]) -> int:
    from ..errors import ConfigError
    from .resize import resize_lora_to_file

    if args.dynamic_method and args.dynamic_param is None:
        raise ConfigError("--dynamic_method needs --dynamic_param")
    res = resize_lora_to_file(args.model, args.save_to, new_rank=args.new_rank, new_conv_rank=args.new_conv_rank,
                              dynamic_method=args.dynamic_method, dynamic_param=args.dynamic_param,
                              device=args.device, save_precision=args.save_precision, overwrite=args.overwrite,
                              sink=_Printer(args.quiet), stop=_stop_event())
    text = _lora_summary(res)
    if args.verbose:
        text += "\n" + "\n".join(
            f"{m['name']:75s} | sum(S) retained: {m['sum_retained']:.1%}, fro retained: {m['fro_retained']:.1%}, "
            f"max(S) ratio: {m['max_ratio']:0.1f}, dim: {m['new_rank']}, alpha: {m['new_alpha']}"
            for m in res.modules if "new_rank" in m)
    _emit(args, res.to_json(), text)
    return 0


def cmd_inspect(args: argparse.Namespace, rest: list[str]) -> int:
    from .inspect import edit_metadata, format_inspection, inspect_lora

    edits = {k: v for k, v in (("title", args.set_title), ("trigger_words", args.set_trigger_words),
                                ("description", args.set_description)) if v is not None}
    if edits or args.save_to or args.in_place:
        meta = edit_metadata(args.file, save_to=args.save_to, in_place=args.in_place, overwrite=args.overwrite,
                             **edits)
        target = args.file if args.in_place else args.save_to
        _emit(args, {"path": target, "metadata": meta},
              f"saved {target} (sshs_model_hash {meta['sshs_model_hash'][:12]})")
        return 0
    ins = inspect_lora(args.file, norms=not args.no_norms, top_tags=args.top_tags)
    _emit(args, ins.to_json(modules=not args.summary), format_inspection(ins, modules=args.modules))
    return 0 if ins.hash.get("status") != "MISMATCH" or not args.strict else 1


def _common(p: argparse.ArgumentParser, *, json_flag: bool = True) -> None:
    if json_flag:
        p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress lines (warnings are still printed)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file (never an input)")


def _merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", required=True, help="network files to merge")
    p.add_argument("--ratios", type=float, nargs="*", help="one ratio per model (default 1)")
    p.add_argument("--lbws", nargs="*", help="per-block ratios per model: a preset (ALL, INALL, MIDD, OUTALL, ...), "
                                             "17 or 26 comma-separated values, or a JSON list")
    p.add_argument("--dylora_rank", type=int, help="merge only the first N ranks (DyLoRA)")
    p.add_argument("--save_to", required=True, help="output .safetensors file")
    p.add_argument("--save_precision", choices=_PRECISIONS, help="float / fp16 / bf16")
    p.add_argument("--no_metadata", action="store_true", help="do not write modelspec / input metadata")


def _lora_merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--new_rank", type=int, help="SVD merge to this rank")
    p.add_argument("--new_conv_rank", type=int, help="rank of k×k convs (default: new_rank)")
    p.add_argument("--concat", action="store_true", help="stack the ranks (rank = sum of the inputs' ranks)")
    p.add_argument("--shuffle", action="store_true", help="with --concat: shuffle the rank order")
    p.add_argument("--clamp_quantile", type=float, help="clamp the SVD factors at this quantile (sd-scripts: 0.99; "
                                                         "default: no clamp, exact)")
    p.add_argument("--device", help="device for the SVDs (e.g. cuda)")


def register(subparsers) -> None:
    """Add the tool subcommands to an argparse subparsers object."""
    m = subparsers.add_parser("merge", help="merge LoRAs into a checkpoint (sd-scripts merge_lora.py flags)",
                              description="With --sd_model: merge networks into the checkpoint and save a new "
                                          "single-file checkpoint. Without it: merge the networks with each other "
                                          "(as merge-lora).")
    m.add_argument("--sd_model", help="base checkpoint (.safetensors / .ckpt)")
    _merge_args(m)
    m.add_argument("--precision", choices=_PRECISIONS, default="float", help="merge precision (default float)")
    m.add_argument("--strict", action="store_true", help="fail if a network module has no layer in the model")
    m.add_argument("--v2", action="store_true", help=argparse.SUPPRESS)
    _lora_merge_args(m)
    _common(m)
    m.set_defaults(func=cmd_merge)

    ml = subparsers.add_parser("merge-lora", help="merge LoRAs into one LoRA (SVD to --new_rank, or --concat)")
    _merge_args(ml)
    ml.add_argument("--precision", choices=_PRECISIONS, default="float", help=argparse.SUPPRESS)
    _lora_merge_args(ml)
    _common(ml)
    ml.set_defaults(func=cmd_merge_lora)

    e = subparsers.add_parser("extract", help="extract a LoRA from a tuned and a base checkpoint (SVD)")
    e.add_argument("--model_org", required=True, help="base checkpoint")
    e.add_argument("--model_tuned", required=True, help="tuned checkpoint (the LoRA is tuned - base)")
    e.add_argument("--save_to", required=True)
    e.add_argument("--dim", type=int, default=4, help="rank (default 4)")
    e.add_argument("--conv_dim", type=int, help="rank of 3x3 convs (default: not extracted)")
    e.add_argument("--clamp_quantile", type=float, default=0.99)
    e.add_argument("--min_diff", type=float, default=0.01, help="text encoder left out when no weight differs more")
    e.add_argument("--device", help="device for the SVDs (e.g. cuda)")
    e.add_argument("--load_precision", choices=_PRECISIONS)
    e.add_argument("--save_precision", choices=_PRECISIONS)
    e.add_argument("--v_parameterization", action="store_true", default=None)
    e.add_argument("--no_metadata", action="store_true")
    e.add_argument("--v2", action="store_true", help=argparse.SUPPRESS)
    e.add_argument("--sdxl", action="store_true", help=argparse.SUPPRESS)
    e.add_argument("--verbose", action="store_true", help="one line per module")
    _common(e)
    e.set_defaults(func=cmd_extract)

    r = subparsers.add_parser("resize", help="reduce a LoRA's rank (fixed or dynamic, sd-scripts resize_lora.py)")
    r.add_argument("--model", required=True)
    r.add_argument("--save_to", required=True)
    r.add_argument("--new_rank", type=int, default=4)
    r.add_argument("--new_conv_rank", type=int)
    r.add_argument("--dynamic_method", choices=["sv_ratio", "sv_fro", "sv_cumulative"])
    r.add_argument("--dynamic_param", type=float)
    r.add_argument("--device")
    r.add_argument("--save_precision", choices=_PRECISIONS)
    r.add_argument("--verbose", action="store_true", help="retained energy per module")
    _common(r)
    r.set_defaults(func=cmd_resize)

    i = subparsers.add_parser("inspect", help="show a LoRA's modules, metadata, norms and hash; edit its title")
    i.add_argument("file")
    i.add_argument("--modules", action="store_true", help="list every module (text output)")
    i.add_argument("--summary", action="store_true", help="JSON without the module list")
    i.add_argument("--no_norms", action="store_true", help="skip the update norms")
    i.add_argument("--top_tags", type=int, default=20)
    i.add_argument("--strict", action="store_true", help="exit 1 when the hashes do not match")
    i.add_argument("--set_title")
    i.add_argument("--set_trigger_words")
    i.add_argument("--set_description")
    i.add_argument("--save_to", help="write the edited file here")
    i.add_argument("--in_place", action="store_true", help="rewrite the input file itself (atomically)")
    _common(i)
    i.set_defaults(func=cmd_inspect)
