"""The engine beside sd-scripts itself: same checkpoint, data and settings, alternating runs.

    python bench/vs_sd_scripts.py --ckpt MODEL.safetensors [--family sd15|sdxl] [--sd-scripts DIR]
                                  [--python SD_SCRIPTS_VENV/bin/python] [--tokenizers DIR] [--rounds 2]

sd-scripts is run from its own checkout and virtual environment, outside this project (never vendored):

    git clone https://github.com/kohya-ss/sd-scripts SD_SCRIPTS && cd SD_SCRIPTS   # measured at 48d368fa
    python -m venv SD_SCRIPTS_VENV && SD_SCRIPTS_VENV/bin/pip install -r requirements.txt   # + torch, torchvision

and found through --sd-scripts / --python or LORA_TRAIN_SD_SCRIPTS / LORA_TRAIN_SD_SCRIPTS_PYTHON (as
bench/interop_check.py). Offline, sd-scripts needs its CLIP tokenizers in a local cache: --tokenizers DIR (passed
as its --tokenizer_cache_dir; LORA_TRAIN_SD_SCRIPTS_TOKENIZERS). The engine is `python -m lib_lora_train train`
with this project's Python (--engine-python, default: the one running this script).

Each run is a fresh process, with this script's niceness (start it with `nice` on a shared machine) and one torch
thread (OMP_NUM_THREADS / MKL_NUM_THREADS = 1 unless --threads):
- per step, wall and CPU: a run of --short and one of --long steps (12 and 24); (long - short) / (long - short
  steps) cancels start-up and the end (saving) exactly. CPU is the process's own user + system time from wait4(),
  which on a shared, loaded machine is the fairer number; wall counts the time other processes held the cores.
- to the first step: launch until the progress bar (tqdm, both programs) shows step 1 done, read from the child's
  stderr as it arrives; so it includes one step.
- peak memory: the process's RSS high-water mark (ru_maxrss from wait4) of the long run.
Runs alternate per round (engine first in odd rounds, sd-scripts first in even ones); the table shows the median
over rounds; every run is listed below it.

Settings on both sides: the given checkpoint, --resolution px square, batch 1, networks.lora dim --dim alpha 1 on
the U-Net and text encoder(s) (--unet-only: the U-Net only; for SDXL the text encoders' outputs then cached on both
sides),
AdamW lr 1e-4, seed 0, cached latents, --precision fp32 (`mixed_precision no`) or bf16 (`mixed_precision bf16`),
optional --gradient-checkpointing, SDPA attention (sd-scripts --sdpa; the engine always uses it), no data-loader
workers, no samples, one save at the end. Data: --data DIR (an sd-scripts folder such as 1_x/), or by default
--images random images of the resolution with captions, written once (seeded) under the work folder, 1 repeat.
With 24 images the runs stay in one epoch, so per-epoch work (the engine's validation) is part of both runs and
cancels in the per-step difference; it is counted in the time to the first step and the totals.

CUDA variants (SD 1.5 at 512 px, SDXL at 1024 px, bf16 with and without gradient checkpointing):
    --device cuda --precision bf16 --resolution 512 [--gradient-checkpointing]
    --device cuda --precision bf16 --resolution 1024 --family sdxl --ckpt SDXL.safetensors [--gradient-checkpointing]
Writes --out (markdown) and prints the table. SDXL on CPU needs ~20 GiB: run it alone.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_data(folder: str, n: int, px: int) -> str:
    """n random px*px RGB PNGs + captions in folder/1_bench (seeded: the same files every time)."""
    import numpy as np
    from PIL import Image
    sub = os.path.join(folder, "1_bench")
    os.makedirs(sub, exist_ok=True)
    rng = np.random.default_rng(0)
    words = ["red", "green", "blue", "square", "circle", "photo", "drawing", "sks"]
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (px, px, 3), dtype=np.uint8)).save(os.path.join(sub, f"img{i}.png"))
        with open(os.path.join(sub, f"img{i}.txt"), "w", encoding="utf-8") as fh:
            fh.write(", ".join(rng.choice(words, 3, replace=False)) + ", sks style")
    return folder


def engine_cmd(a, data: str, out: str, steps: int) -> list[str]:
    cfg = {
        "pretrained_model_name_or_path": a.ckpt, "train_data_dir": data, "caption_extension": ".txt",
        "resolution": f"{a.resolution},{a.resolution}", "output_dir": out, "output_name": "bench",
        "network_module": "networks.lora", "network_dim": a.dim, "network_alpha": 1,
        "max_train_steps": steps, "train_batch_size": 1, "learning_rate": 1e-4, "optimizer_type": "AdamW",
        "mixed_precision": "no" if a.precision == "fp32" else a.precision, "seed": 0, "cache_latents": True,
        "max_data_loader_n_workers": 0, "device": a.device, "gradient_checkpointing": a.gradient_checkpointing,
    }
    if a.unet_only:   # as sd_scripts_cmd: the text encoders' outputs cached for SDXL only
        cfg.update(network_train_unet_only=True, cache_text_encoder_outputs=a.family == "sdxl")
    path = os.path.join(out, "run.toml")
    os.makedirs(out, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for k, v in cfg.items():
            fh.write(f"{k} = {json.dumps(v)}\n")
    return [a.engine_python, "-m", "lib_lora_train", "train", "--config", path]


def sd_scripts_cmd(a, data: str, out: str, steps: int) -> list[str]:
    script = "sdxl_train_network.py" if a.family == "sdxl" else "train_network.py"
    cmd = [a.python, os.path.join(a.sd_scripts, script),
           "--pretrained_model_name_or_path", a.ckpt, "--train_data_dir", data, "--caption_extension", ".txt",
           "--resolution", f"{a.resolution},{a.resolution}", "--output_dir", out, "--output_name", "bench",
           "--save_model_as", "safetensors", "--network_module", "networks.lora", "--network_dim", str(a.dim),
           "--network_alpha", "1", "--max_train_steps", str(steps), "--train_batch_size", "1",
           "--learning_rate", "1e-4", "--optimizer_type", "AdamW",
           "--mixed_precision", "no" if a.precision == "fp32" else a.precision, "--sdpa", "--seed", "0",
           "--cache_latents", "--max_data_loader_n_workers", "0"]
    if a.tokenizers:
        cmd += ["--tokenizer_cache_dir", a.tokenizers]
    if a.unet_only:
        cmd += ["--network_train_unet_only"] + (["--cache_text_encoder_outputs"] if a.family == "sdxl" else [])
    if a.gradient_checkpointing:
        cmd += ["--gradient_checkpointing"]
    return cmd


def _cpu_seconds(pid: int) -> float | None:
    """utime + stime of a running process (Linux /proc), in seconds."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def training_bar_steps(text: bytes, steps: int) -> list[int]:
    """The step counts a training progress bar of `steps` steps shows in `text` (tqdm output, both programs).
    Only training bars: sd-scripts' says "steps: …", the engine's counts in "step" units; a latent-caching bar
    over as many images as there are steps ("1/24 [… it/s]") would otherwise pass for step 1."""
    bar = re.compile(rb"(steps:[^\r\n]*?)?\|\s*(\d+)/%d \[([^\]\r\n]*)\]" % steps)
    return [int(m.group(2)) for m in bar.finditer(text) if m.group(1) or b"step" in m.group(3)]


def run_one(cmd: list[str], cwd: str, steps: int, threads: int, log: str) -> dict:
    """Launch; watch stderr for the progress bar (tqdm, both programs) and note wall and process CPU time at each
    step it shows; wait4() for the total CPU time and peak RSS."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONUNBUFFERED="1", PYTHONPATH=ROOT)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen: dict[int, tuple[float, float | None]] = {}    # step -> (wall, process CPU) when the bar showed it
    tail = b""
    with open(log, "wb") as fh:
        while True:
            chunk = os.read(proc.stderr.fileno(), 4096)
            if not chunk:
                break
            fh.write(chunk)
            now = time.perf_counter() - t0
            tail = (tail + chunk)[-8192:]
            for k in training_bar_steps(tail[-len(chunk) - 160:], steps):
                if k >= 1 and k not in seen:
                    seen[k] = (now, _cpu_seconds(proc.pid))
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[1] if len(cmd) > 1 else cmd[0]} failed (exit {proc.returncode}); log: {log}\n"
                         + tail.decode(errors="replace")[-3000:])
    # wait4's usage is the program's own (and that of any children it reaped)
    first = seen.get(1, (None, None))
    bar_steps = sorted(k for k in seen if k >= 2 and k - 1 in seen)
    per_bar = [seen[k][1] - seen[k - 1][1] for k in bar_steps if seen[k][1] is not None and seen[k - 1][1] is not None]
    return {"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "rss_gib": ru.ru_maxrss / 2 ** 20, "first": first[0],
            "first_cpu": first[1], "bar_cpu": statistics.median(per_bar) if per_bar else None,
            "bar_wall": statistics.median([seen[k][0] - seen[k - 1][0] for k in bar_steps]) if bar_steps else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--family", choices=["sd15", "sdxl"], default="sd15")
    ap.add_argument("--sd-scripts", default=os.environ.get("LORA_TRAIN_SD_SCRIPTS", ""))
    ap.add_argument("--python", default=os.environ.get("LORA_TRAIN_SD_SCRIPTS_PYTHON", ""),
                    help="the Python of sd-scripts' own venv")
    ap.add_argument("--tokenizers", default=os.environ.get("LORA_TRAIN_SD_SCRIPTS_TOKENIZERS", ""))
    ap.add_argument("--engine-python", default=sys.executable)
    ap.add_argument("--data", help="an sd-scripts data folder (default: --images random images)")
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--dim", type=int, default=8)
    ap.add_argument("--short", type=int, default=12)
    ap.add_argument("--long", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="OMP/MKL threads (0: leave the environment)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--unet-only", action="store_true")
    ap.add_argument("--only", choices=["engine", "sd-scripts"], help="run one side only")
    ap.add_argument("--together", action="store_true",
                    help="run the two sides at the same time (judge by CPU time then, not wall)")
    ap.add_argument("--work", help="folder for data, outputs and logs (default: a temporary one)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results_vs_sd_scripts.md"))
    ap.add_argument("--label", default="", help="a line for the results file (machine, load, ...)")
    a = ap.parse_args(argv)
    a.ckpt = os.path.abspath(a.ckpt)
    sides = ["engine", "sd-scripts"] if a.only is None else [a.only]
    if "sd-scripts" in sides and not (os.path.isfile(os.path.join(a.sd_scripts, "train_network.py"))
                                      and os.path.exists(a.python)):
        raise SystemExit(f"sd-scripts not found at '{a.sd_scripts}' / '{a.python}': give --sd-scripts and --python "
                         "(or LORA_TRAIN_SD_SCRIPTS / LORA_TRAIN_SD_SCRIPTS_PYTHON); see this file's docstring")
    work = a.work or tempfile.mkdtemp(prefix="vs_sd_scripts_")
    data = a.data or make_data(os.path.join(work, "data"), a.images, a.resolution)
    runs: list[dict] = []

    def one(rnd: int, side: str, steps: int) -> None:
        out = os.path.join(work, f"r{rnd}_{side}_{steps}")
        cmd = (engine_cmd if side == "engine" else sd_scripts_cmd)(a, data, out, steps)
        cwd = ROOT if side == "engine" else a.sd_scripts
        os.makedirs(out, exist_ok=True)
        load = os.getloadavg()[0]
        r = run_one(cmd, cwd, steps, a.threads, os.path.join(out, "stderr.log"))
        r.update(side=side, steps=steps, round=rnd, load=load)
        runs.append(r)
        nan = float("nan")
        print(f"round {rnd + 1} {side:10s} {steps:3d} steps: wall {r['wall']:7.1f} s  cpu {r['cpu']:7.1f} s"
              f"  step 1 done at {r['first'] or nan:6.1f} s / {r['first_cpu'] or nan:6.1f} s CPU"
              f"  per step (bar) {r['bar_cpu'] or nan:.3f} s CPU  peak RSS {r['rss_gib']:.2f} GiB"
              f"  (load {load:.1f})", flush=True)
        with open(os.path.join(work, "runs.json"), "w", encoding="utf-8") as fh:
            json.dump(runs, fh, indent=1)

    step_counts = (a.short, a.long) if a.long != a.short else (a.long,)
    for rnd in range(a.rounds):
        order = sides if rnd % 2 == 0 else sides[::-1]
        for steps in step_counts:
            if a.together:      # both sides at once: for a machine so loaded that turns would not finish
                import threading
                jobs = [threading.Thread(target=one, args=(rnd, side, steps)) for side in order]
                for j in jobs:
                    j.start()
                for j in jobs:
                    j.join()
            else:
                for side in order:
                    one(rnd, side, steps)
    write_results(a, runs, sides)
    return 0


def summarise(a, runs: list[dict], side: str) -> dict:
    med = statistics.median
    nan = float("nan")
    mine = [r for r in runs if r["side"] == side]
    per_wall, per_cpu, fixed = [], [], []
    for rnd in sorted({r["round"] for r in mine}):
        s = [r for r in mine if r["round"] == rnd and r["steps"] == a.short]
        l = [r for r in mine if r["round"] == rnd and r["steps"] == a.long]
        if s and l and a.long != a.short:
            n = a.long - a.short
            per_wall.append((l[0]["wall"] - s[0]["wall"]) / n)
            per_cpu.append((l[0]["cpu"] - s[0]["cpu"]) / n)
            fixed.append(s[0]["wall"] - a.short * per_wall[-1])

    def m(key):
        vals = [r[key] for r in mine if r.get(key) is not None]
        return med(vals) if vals else nan
    return {"wall": med(per_wall) if per_wall else nan, "cpu": med(per_cpu) if per_cpu else nan,
            "fixed": med(fixed) if fixed else nan, "first": m("first"), "first_cpu": m("first_cpu"),
            "bar_cpu": m("bar_cpu"), "bar_wall": m("bar_wall"), "rss": max(r["rss_gib"] for r in mine)}


def write_results(a, runs: list[dict], sides: list[str]) -> None:
    res = {s: summarise(a, runs, s) for s in sides}
    what = (f"{a.family.upper()} `{os.path.basename(a.ckpt)}`, {a.resolution} px, batch 1, LoRA dim {a.dim} "
            f"alpha 1 ({'U-Net only' if a.unet_only else 'U-Net + text encoder'}), AdamW, {a.precision}"
            f"{', gradient checkpointing' if a.gradient_checkpointing else ''}, cached latents, {a.device}, "
            f"{a.threads or 'default'} torch thread(s), {a.rounds} round(s) of "
            + (f"{a.short}- and {a.long}-step runs" if a.short != a.long else f"{a.long}-step runs")
            + f", {a.data or f'{a.images} random images'}")
    lines = [f"### {what}", ""]
    if a.label:
        lines += [a.label, ""]
    cols = [("per step, wall (s)", "wall", 3), ("per step, CPU (s)", "cpu", 3),
            ("per step from the bar, CPU (s)", "bar_cpu", 3), ("launch → step 1 done, wall (s)", "first", 1),
            ("launch → step 1 done, CPU (s)", "first_cpu", 1), ("fixed cost, wall (s)", "fixed", 1),
            ("peak RSS (GiB)", "rss", 2)]
    lines += ["| | " + " | ".join(c[0] for c in cols) + " |", "| --- |" + " ---: |" * len(cols)]
    for s in sides:
        lines.append(f"| {'ours' if s == 'engine' else 'sd-scripts'} | "
                     + " | ".join(f"{res[s][k]:.{d}f}" for _, k, d in cols) + " |")
    if len(sides) == 2:
        e, k = res["engine"], res["sd-scripts"]
        lines.append("| ours / sd-scripts | " + " | ".join(f"{e[c] / k[c]:.2f}×" for _, c, _ in cols) + " |")
    lines += ["", "Per step: (long run − short run) / (difference in steps), so start-up and the end cancel; per "
              "step from the bar: median CPU time between two consecutive steps shown by the program's own progress "
              "bar. Step 1 done: when the progress bar first shows step 1 (wall since launch, and the process's CPU "
              "time then). Fixed cost: the short run's wall time minus its steps at the per-step rate (start-up + "
              "final save + exit)." + (" The two sides ran at the same time (`--together`)." if a.together else ""),
              "", "| round | side | steps | wall (s) | CPU (s) | step 1 done at (s) | its CPU (s) "
              "| per step (bar), CPU (s) | peak RSS (GiB) | load |",
              "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    nan = float("nan")
    for r in runs:
        lines.append(f"| {r['round'] + 1} | {r['side']} | {r['steps']} | {r['wall']:.1f} | {r['cpu']:.1f} | "
                     f"{r['first'] or nan:.1f} | {r['first_cpu'] or nan:.1f} | {r['bar_cpu'] or nan:.3f} | "
                     f"{r['rss_gib']:.2f} | {r['load']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(a.out, "a", encoding="utf-8") as fh:
        fh.write("\n" + text)


if __name__ == "__main__":
    sys.exit(main())
