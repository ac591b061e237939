"""`import`, `export` and `presets` subcommands (registered by lib_lora_train/cli.py)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import ConfigError

EXIT_OK, EXIT_BAD_INPUT = 0, 2


def _refuse_existing(paths: list[str], force: bool) -> None:
    taken = [p for p in paths if os.path.exists(p)]
    if taken and not force:
        raise ConfigError(f"{', '.join(taken)} already exist{'s' if len(taken) == 1 else ''}; nothing was written "
                          f"(--force replaces)")


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)
    os.replace(tmp, path)


def cmd_import(args: argparse.Namespace, rest: list[str]) -> int:
    from . import import_settings
    result = import_settings(args.file)
    rep = result.report
    stem = os.path.splitext(args.out)[0] if args.out else None
    names = {name: f"{os.path.basename(stem)}.{name.replace('sample_', '')}" for name in result.extra_files} \
        if stem else {}
    if args.out and result.config:
        out_dir = os.path.dirname(os.path.abspath(args.out))
        targets = [os.path.abspath(args.out)] + [os.path.join(out_dir, n) for n in names.values()]
        _refuse_existing(targets, args.force)
        os.makedirs(out_dir, exist_ok=True)
        for name, text in result.extra_files.items():
            _atomic_write(os.path.join(out_dir, names[name]), text)
        _atomic_write(os.path.abspath(args.out), result.toml(names))
        rep.notes.append(f"written: {os.path.abspath(args.out)}"
                         + "".join(f", {os.path.join(out_dir, n)}" for n in names.values()))
    if args.json:
        print(json.dumps(rep.to_dict(), indent=2, default=str))
    else:
        print(rep.text(), file=sys.stderr if not args.out and result.config else sys.stdout)
        if not args.out and result.config:
            print(result.toml())
            for name, text in result.extra_files.items():
                print(f"# {name} (written beside the TOML with --out):\n" + "".join(f"# {ln}\n" for ln in
                                                                                   text.splitlines()))
    return EXIT_OK if rep.can_start else EXIT_BAD_INPUT


def cmd_export(args: argparse.Namespace, rest: list[str]) -> int:
    from .export import export_run
    exp = export_run(args.run)
    if args.sd_scripts_toml:
        _refuse_existing([args.sd_scripts_toml], args.force)
        _atomic_write(args.sd_scripts_toml, exp.toml())
        print(f"written: {args.sd_scripts_toml}", file=sys.stderr)
    if args.command or not args.sd_scripts_toml:
        if not args.sd_scripts_toml:
            print(exp.toml())
        print(exp.command(args.sd_scripts_toml if args.sd_scripts_toml and not args.flags else None))
    for key, why in exp.left_out.items():
        print(f"# not in sd-scripts: {key} = {why}", file=sys.stderr)
    return EXIT_OK


def cmd_presets(args: argparse.Namespace, rest: list[str]) -> int:
    from .. import presets
    dirs = [args.dir] if args.dir else None
    found = presets.all_presets(dirs)
    families = [args.family] if args.family else list(presets.FAMILIES)
    if args.json:
        out = {}
        for name, p in found.items():
            out[name] = {"description": {f: p.describe(f) for f in families if f in p.families},
                         "source": p.source, "repeats": p.repeats,
                         "families": {f: p.values(f) for f in families if f in p.families}}
        print(json.dumps(out, indent=2))
        return EXIT_OK
    print("Presets (use: preset = \"NAME\" in a run TOML, --preset NAME, \"preset\" in an API config; several "
          "apply in order: character+sdxl-8gb; explicit keys win). User presets: NAME.toml files in "
          + (", ".join(presets.user_dirs(dirs)) or f"a folder named in ${presets.ENV_DIRS}"))
    for name, p in found.items():
        print(f"\n{name}  ({p.source}){'  suggested repeats: ' + str(p.repeats) if p.repeats else ''}")
        for fam in families:
            if fam in p.families:
                vals = p.values(fam)
                if p.describe(fam):
                    print(f"  {fam}: {p.describe(fam)}")
                print(f"  {' ' * len(fam)}  " + ", ".join(f"{k}={v}" for k, v in vals.items()))
    return EXIT_OK


def register(sub) -> None:
    i = sub.add_parser("import", help="read a kohya_ss .json, lora-scripts train.ps1 / train.sh or sd-scripts .toml "
                                      "and write this engine's run TOML, with a report of every field",
                       description="Exit 0: a run can start from the result; 2: it cannot (the report says why).")
    i.add_argument("file")
    i.add_argument("--out", help="write the run TOML here (refuses to replace a file unless --force)")
    i.add_argument("--force", action="store_true", help="replace existing output files")
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    i.set_defaults(func=cmd_import)
    e = sub.add_parser("export", help="a run (NAME.run.json or a run TOML) as sd-scripts' --config_file TOML and "
                                      "the accelerate command that trains it in sd-scripts")
    e.add_argument("run", help="a run record (NAME.run.json) or a run TOML")
    e.add_argument("--sd-scripts-toml", dest="sd_scripts_toml", help="write sd-scripts' TOML here")
    e.add_argument("--command", action="store_true", help="print the accelerate launch command")
    e.add_argument("--flags", action="store_true", help="the command with every option as a flag (no TOML)")
    e.add_argument("--force", action="store_true", help="replace an existing --sd-scripts-toml file")
    e.set_defaults(func=cmd_export)
    p = sub.add_parser("presets", help="list the presets (built-in and user) with their values per model family")
    p.add_argument("--family", choices=("sd1", "sd2", "sdxl"))
    p.add_argument("--dir", help="a folder of user presets (NAME.toml), besides $LORA_TRAIN_PRESETS")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_presets)
