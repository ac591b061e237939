"""Preprocessing throughput: 1024x1024 JPEGs to 512 buckets, one process against all cores.

Both variants run the same call, `lib_lora_train.prep.preprocess(src, out, PreprocessOptions(...))`, on the same
files with the same options; only `workers` differs (1 = a plain loop in this process, N = a process pool).
Rounds alternate between the variants so a change of load on the machine hits both; the median round of each
is reported, and the outputs of the two are compared byte for byte (results must not depend on the workers).

    python bench/preprocess.py                  # 48 images, 5 rounds, prints a Markdown section
    python bench/preprocess.py --write          # ... and writes it into bench/results_preprocess.md
    python bench/preprocess.py --quick          # 12 images, 2 rounds (smoke run)
"""
from __future__ import annotations

import argparse
import hashlib
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

RESULTS = os.path.join(ROOT, "bench", "results_preprocess.md")


def make_sources(folder: str, n: int, size: int = 1024) -> list[str]:
    """Photo-like JPEGs: shapes plus fine noise (so neither decoding nor PNG encoding is trivially cheap)."""
    import numpy as np
    from PIL import Image

    from lib_lora_train.prep.corpus import picture
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(1234)
    paths = []
    for i in range(n):
        arr = np.asarray(picture(i, (size, size)), dtype=np.int16) + rng.integers(-18, 19, (size, size, 3))
        path = os.path.join(folder, f"photo{i:03d}.jpg")
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the pool's workers)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    return total


def run_once(src: str, out: str, workers: int, fmt: str) -> tuple[float, float, dict[str, str]]:
    from lib_lora_train.prep.preprocess import PreprocessOptions, preprocess
    shutil.rmtree(out, ignore_errors=True)
    c0, t0 = cpu_seconds(), time.perf_counter()
    res = preprocess(src, out, PreprocessOptions(resolution=512, mode="bucket", format=fmt, workers=workers))
    dt, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    if res.skipped:
        raise SystemExit(f"unexpected skipped files: {[i.reason for i in res.skipped]}")
    digests = {}
    for p in res.written:
        with open(p, "rb") as fh:
            digests[os.path.basename(p)] = hashlib.sha256(fh.read()).hexdigest()
    return dt, cpu, digests


START, END = "<!-- bench/preprocess.py: start -->", "<!-- bench/preprocess.py: end -->"


def write_section(text: str) -> None:
    """Replace the generated section of the results file (notes written around it are kept)."""
    block = f"{START}\n{text}{END}\n"
    try:
        with open(RESULTS, encoding="utf-8") as fh:
            old = fh.read()
    except FileNotFoundError:
        old = ("# Preprocessing benchmark\n\nThe section between the markers is written by "
               "`python bench/preprocess.py --write`; see the script's docstring for the method.\n\n")
    if START in old and END in old:
        new = old[:old.index(START)] + block + old[old.index(END) + len(END) + 1:]
    else:
        new = old + block
    with open(RESULTS, "w", encoding="utf-8") as fh:
        fh.write(new)


def load() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workers", type=int, default=None, help="pool size (default: all cores)")
    ap.add_argument("--format", default="png", choices=("png", "jpg", "webp"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--write", action="store_true", help=f"write the section into {os.path.relpath(RESULTS, ROOT)}")
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.rounds = 12, 2

    from lib_lora_train.prep.parallel import available_cores
    cores = available_cores()
    pool = args.workers or cores
    tmp = tempfile.mkdtemp(prefix="bench_preprocess_")
    try:
        src = os.path.join(tmp, "src")
        make_sources(src, args.images)
        load_before = load()
        run_once(src, os.path.join(tmp, "warm"), 1, args.format)         # page cache and imports warm
        times: dict[int, list[float]] = {1: [], pool: []}
        cpus: dict[int, list[float]] = {1: [], pool: []}
        digests: dict[int, dict[str, str]] = {}
        for r in range(args.rounds):
            order = (1, pool) if r % 2 == 0 else (pool, 1)
            for w in order:
                dt, cpu, d = run_once(src, os.path.join(tmp, f"out{w}"), w, args.format)
                times[w].append(dt)
                cpus[w].append(cpu)
                digests[w] = d
                print(f"round {r + 1}: workers={w} {dt:.2f} s ({args.images / dt:.1f} images/s)", file=sys.stderr)
        load_after = load()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    single, multi = statistics.median(times[1]), statistics.median(times[pool])
    cpu1, cpun = statistics.median(cpus[1]), statistics.median(cpus[pool])
    same = digests[1] == digests[pool]
    lines = [
        f"## 1024x1024 JPEG -> 512 buckets ({args.format}), {args.images} images, {args.rounds} rounds",
        "",
        f"- machine: {platform.machine()}, {cores} cores available, Python {platform.python_version()}; "
        f"load average (1/5/15 min) before {load_before}, after {load_after}",
        "",
        "| variant | median wall time | images/s | median CPU time | wall time of each round (s) |",
        "| --- | --- | --- | --- | --- |",
        f"| one process (workers=1) | {single:.2f} s | {args.images / single:.1f} | {cpu1:.2f} s | "
        f"{', '.join(f'{t:.2f}' for t in times[1])} |",
        f"| process pool (workers={pool}) | {multi:.2f} s | {args.images / multi:.1f} | {cpun:.2f} s | "
        f"{', '.join(f'{t:.2f}' for t in times[pool])} |",
        "",
        f"- speed-up (wall): **{single / multi:.2f}x** (target 1.8x on 2 cores)",
        f"- CPU work of the pool relative to one process: {cpun / cpu1:.2f}x (the pool's overhead: process "
        f"start-up, passing results back)",
        f"- outputs identical between the two variants: {'yes' if same else 'NO'}",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        write_section(text)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
