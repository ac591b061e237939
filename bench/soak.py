"""Soak: many short runs back to back through the HTTP API in one long-lived process; does anything grow?

    .venv/bin/python bench/soak.py                 # 30 runs on the standalone host (the embedded tiny model)
    .venv/bin/python bench/soak.py --runs 5 --out -  # quick look, print only

One process holds a StandaloneHost, its JobManager and the /lora-train/v1 API (FastAPI's TestClient calls the
routes in-process, as the page's server would). A project is made through the API (create + multipart upload);
then each run is POST /runs, polled to "done", and after it the process's resident memory (VmRSS), open file
descriptors (/proc/self/fd) and threads (/proc/self/status) are recorded. The slope of each over the runs (least
squares, first `--warmup` runs left out: allocator and import warm-up) is the growth per run; the target is flat
within noise: well under 1 MiB of RSS, 0 file handles and 0 threads per run. Linux only (/proc).
"""
from __future__ import annotations

import argparse
import gc
import io
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def proc_status(pid="self") -> dict:
    """Resident memory (MiB), threads and open file descriptors of a process, from /proc/<pid>."""
    out = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "Threads"):
                out[key] = int(value.split()[0])
    return {"rss_mib": out["VmRSS"] / 1024, "threads": out["Threads"], "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def slope(ys: list[float]) -> float:
    n = len(ys)
    if n < 2:
        return 0.0
    mx, my = (n - 1) / 2, sum(ys) / n
    return sum((i - mx) * (y - my) for i, y in enumerate(ys)) / sum((i - mx) ** 2 for i in range(n))


def report(title: str, about: str, rows: list[dict], warmup: int) -> tuple[str, dict]:
    """The markdown table of `rows` (run, rss_mib, fds, threads) and the slopes over the runs after `warmup`."""
    kept = rows[warmup:] if len(rows) > warmup + 1 else rows
    slopes = {k: slope([r[k] for r in kept]) for k in ("rss_mib", "fds", "threads")}
    lines = [title, "", about, "", "| after run | RSS MiB | open fds | threads |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['run']} | {r['rss_mib']:.1f} | {r['fds']} | {r['threads']} |" for r in rows]
    lines += ["", f"Slope over runs {kept[0]['run']}-{kept[-1]['run']} (least squares, per run): "
              f"RSS {slopes['rss_mib'] * 1024:+.1f} KiB, open fds {slopes['fds']:+.3f}, threads "
              f"{slopes['threads']:+.3f}. Target: flat within noise (RSS well under 1 MiB per run, 0 fds, 0 threads)."]
    return "\n".join(lines) + "\n", slopes


def write_section(path: str, key: str, text: str) -> None:
    """Put `text` into the markdown file `path` between `<!-- soak:key -->` markers, keeping the other sections
    (bench/soak.py and bench/soak_webui.py share bench/results_soak.md)."""
    begin, end = f"<!-- soak:{key} -->", f"<!-- /soak:{key} -->"
    old = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            old = fh.read()
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    if begin in old and end in old:
        new = old[:old.index(begin)] + block + old[old.index(end) + len(end):].lstrip("\n")
    else:
        new = (old.rstrip() + "\n\n" if old.strip() else "") + block
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(new)
    os.replace(tmp, path)


def png(color) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buf, format="PNG")
    return buf.getvalue()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results_soak.md"),
                    help="markdown report ('-': print only)")
    args = ap.parse_args(argv)

    import torch
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lib_lora_train.api import mount
    from lib_lora_train.hosts.standalone import StandaloneHost
    from lib_lora_train.jobs import JobManager

    torch.set_num_threads(1)
    data = tempfile.mkdtemp(prefix="lora_soak_")
    host = StandaloneHost(data)
    jobs = JobManager(host)
    app = FastAPI()
    mount(app, jobs)
    client = TestClient(app)
    v1 = "/lora-train/v1"
    assert client.post(v1 + "/projects", json={"name": "soak", "trigger": "zkz"}).status_code == 201
    files = [("files", (f"{i}.png", png((60 * i, 200 - 40 * i, 90)), "image/png")) for i in range(4)]
    files += [("files", (f"{i}.txt", f"zkz, colour {i}".encode(), "text/plain")) for i in range(4)]
    r = client.post(v1 + "/projects/soak/images", files=files, params={"repeats": 1, "resolution": 64})
    assert r.status_code == 200, r.text
    config = {"max_train_epochs": 1, "train_batch_size": 2, "network_dim": 2, "network_alpha": 1,
              "learning_rate": 1e-3, "seed": 1, "cache_latents": True}

    rows = []
    t0 = time.time()
    for i in range(args.runs):
        r = client.post(v1 + "/runs", json={"project": "soak", "config": config})
        assert r.status_code == 200, r.text
        run_id = r.json()["id"]
        while True:
            info = client.get(f"{v1}/runs/{run_id}").json()
            if info["status"] not in ("queued", "running"):
                break
            time.sleep(0.05)
        assert info["status"] == "done", info.get("error")
        gc.collect()
        rows.append({"run": i + 1, "seconds": time.time() - t0, **proc_status()})
        print(f"run {i + 1:3d}: rss {rows[-1]['rss_mib']:.1f} MiB, fds {rows[-1]['fds']}, "
              f"threads {rows[-1]['threads']}", flush=True)

    text, _ = report(f"# Soak: {args.runs} runs back to back through the HTTP API, one process (standalone host)",
                     f"tiny embedded model, 4 images at 64 px, 1 epoch (2 steps) per run; torch {torch.__version__}, "
                     f"Python {sys.version.split()[0]}; {time.time() - t0:.0f} s in all.", rows, args.warmup)
    print(text)
    if args.out != "-":
        write_section(args.out, "standalone", text)
    shutil.rmtree(data, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
