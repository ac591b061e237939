"""Import every given settings file, export each importable one back to sd-scripts, and have sd-scripts' own
argument parser (run beside the project, never vendored) accept the exported TOML and the flags command.

    python bench/interop_check.py FILE... [--sd-scripts DIR] [--python SD_SCRIPTS_VENV/bin/python]

Prints one line per file and the totals; --json writes the details. Needs the sd-scripts checkout and a Python
that can import its train_network.py (its own venv); without them only the import half runs, and says so.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Runs inside sd-scripts' venv: its parser judges the exported TOML and the command's flags.
CHECKER = r'''
import json, sys, tomllib
sd_dir, jobs_file = sys.argv[1], sys.argv[2]
sys.path.insert(0, sd_dir)
from library import train_util
parsers = {}
results = []
for job in json.load(open(jobs_file)):
    script, toml_path, flags = job["script"], job["toml"], job["flags"]
    if script not in parsers:
        parsers[script] = __import__(script[:-3]).setup_parser()
    parser = parsers[script]
    dests = {a.dest: a for a in parser._actions}
    problems = []
    with open(toml_path, "rb") as fh:
        data = tomllib.load(fh)
    flat = {}
    for k, v in data.items():
        flat.update(v if isinstance(v, dict) else {k: v})
    for k, v in flat.items():
        a = dests.get(k)
        if a is None:
            problems.append(f"{k}: not an option of {script}")
            continue
        if a.nargs == 0:
            if not isinstance(v, bool):
                problems.append(f"{k}: a switch, got {v!r}")
            continue
        for item in (v if isinstance(v, list) else [v]):
            try:
                x = a.type(str(item)) if a.type else item
            except Exception as exc:
                problems.append(f"{k}: {item!r} rejected by its type: {exc}")
                continue
            if a.choices and x not in a.choices:
                problems.append(f"{k}: {x!r} not in {a.choices}")
    try:
        sys.argv = [script, "--config_file", toml_path]   # read_config_from_file re-parses sys.argv, as when run
        ns = parser.parse_args()
        train_util.verify_command_line_training_args(ns)
        ns = train_util.read_config_from_file(ns, parser)
    except SystemExit as exc:
        problems.append(f"--config_file: parser exited {exc.code}")
    try:
        parser.parse_args(flags)
    except SystemExit as exc:
        problems.append(f"flags: parser exited {exc.code}")
    results.append({"problems": problems, "keys": len(flat)})
print(json.dumps(results))
'''


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--sd-scripts", default=os.environ.get("LORA_TRAIN_SD_SCRIPTS", ""))
    ap.add_argument("--python", default=os.environ.get("LORA_TRAIN_SD_SCRIPTS_PYTHON", ""))
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    from lib_lora_train.interop import import_settings
    from lib_lora_train.interop.export import export_run
    can_parse = os.path.isfile(os.path.join(args.sd_scripts, "train_network.py")) and os.path.exists(args.python)
    if not can_parse:
        print(f"sd-scripts not found at {args.sd_scripts} / {args.python}: only the import half runs")
    rows, jobs, started, parsed = [], [], 0, 0
    with tempfile.TemporaryDirectory() as tmp:
        for i, path in enumerate(args.files):
            res = import_settings(path)
            rep = res.report
            row = {"file": os.path.basename(path), "family": rep.family, "can_start": rep.can_start,
                   "reasons": rep.reasons(), "counts": rep.counts(),
                   "unsupported": [f"{e.field}={e.old!r}" for e in rep.entries if e.status == "unsupported"]}
            rows.append(row)
            if not rep.can_start:
                continue
            started += 1
            run_toml = os.path.join(tmp, f"run{i}.toml")
            with open(run_toml, "w", encoding="utf-8") as fh:
                fh.write(res.toml())
            exp = export_run(run_toml)
            sd_toml = os.path.join(tmp, f"sd{i}.toml")
            with open(sd_toml, "w", encoding="utf-8") as fh:
                fh.write(exp.toml())
            row["script"] = exp.script
            jobs.append((row, {"script": exp.script, "toml": sd_toml,
                               "flags": shlex.split(exp.command().split(exp.script, 1)[1])}))
        if can_parse and jobs:
            jobs_file = os.path.join(tmp, "jobs.json")
            with open(jobs_file, "w", encoding="utf-8") as fh:
                json.dump([j for _, j in jobs], fh)
            out = subprocess.run([args.python, "-c", CHECKER, args.sd_scripts, jobs_file], cwd=args.sd_scripts,
                                 capture_output=True, text=True, timeout=1200)
            try:
                results = json.loads(out.stdout.strip().splitlines()[-1])
            except (IndexError, json.JSONDecodeError):
                raise SystemExit(f"the sd-scripts checker failed: {out.stderr[-2000:]}")
            for (row, _), result in zip(jobs, results):
                row["sd_scripts"] = result
                parsed += not result["problems"]
    for row in rows:
        tail = ""
        if "sd_scripts" in row:
            p = row["sd_scripts"]["problems"]
            tail = f"; sd-scripts parser: {'accepts ' + str(row['sd_scripts']['keys']) + ' keys' if not p else p}"
        mark = "starts" if row["can_start"] else "cannot start: " + "; ".join(row["reasons"])
        extra = f" (not supported, run goes without: {', '.join(row['unsupported'])})" if row["unsupported"] and \
            row["can_start"] else ""
        print(f"{row['file']}: {row['family']}, {mark}{extra}{tail}")
    print(f"\n{len(rows)} files: {started} start a run directly, {len(rows) - started} do not; "
          + (f"sd-scripts' parser accepted {parsed} of {started} exported TOMLs" if can_parse else
             "sd-scripts' parser not run"))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
