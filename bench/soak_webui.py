"""Soak inside a real WebUI: many short runs back to back through our HTTP API; does the WebUI process grow?

    # starts the WebUI (A1111 / Forge / reForge folder) on --port, runs the soak, stops it:
    flock -s /tmp/bigmem.lock python3 bench/soak_webui.py --webui /path/to/stable-diffusion-webui \\
        --ckpt /path/to/sd15.safetensors --port 7860
    # or measure a WebUI that is already running (its server process id and address):
    python3 bench/soak_webui.py --url http://127.0.0.1:7860 --pid 12345 --runs 5 --out -

Only the Python standard library is needed here (the WebUI runs in its own venv). A project is made through the
API (POST /projects + a multipart upload of 4 generated 64 px images with captions); then each run is POST /runs
(the loaded model, 64 px, --steps steps of batch 1, latents cached, no validation pass), polled until it ends, its files deleted again (DELETE /runs/{id}/files,
so the WebUI's LoRA folder does not grow), and the WebUI process's resident memory (VmRSS), open file descriptors
(/proc/<pid>/fd) and threads are recorded. The slope of each over the runs (least squares, the first `--warmup`
runs left out: the model's first load, allocator and import warm-up) is the growth per run; the target is flat
within noise: well under 1 MiB of RSS, 0 file handles and 0 threads per run. Linux only (/proc).
When it started the WebUI, the project folder it made and the project's output folder are removed at the end.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from soak import proc_status, report, write_section  # noqa: E402

V1 = "/lora-train/v1"


def call(base: str, method: str, path: str, body=None, *, data: bytes | None = None, ctype="application/json",
         timeout=600):
    if body is not None:
        data = json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method, headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")[:2000]


def png(color: tuple[int, int, int], size: int = 64) -> bytes:
    """A plain-colour RGB PNG with a gradient row pattern (standard library only)."""
    rows = b"".join(b"\x00" + bytes(((color[0] + y) % 256, color[1], (color[2] + 3 * y) % 256)) * size
                    for y in range(size))

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def multipart(files: list[tuple[str, bytes, str]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, payload, ctype in files:
        out.write(f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
                  f"Content-Type: {ctype}\r\n\r\n".encode())
        out.write(payload + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def start_webui(args) -> subprocess.Popen:
    env = dict(os.environ, TRANSFORMERS_OFFLINE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(args.threads))
    if os.path.isdir(os.path.join(args.webui, "hf_home")):
        env.setdefault("HF_HOME", os.path.join(args.webui, "hf_home"))
    python = os.path.join(args.webui, "venv", "bin", "python")
    cmd = [python, "launch.py", "--api", "--skip-prepare-environment", "--skip-torch-cuda-test",
           "--skip-version-check", "--use-cpu", "all", "--no-half", "--precision", "full", "--no-download-sd-model",
           "--ckpt-dir", os.path.dirname(os.path.abspath(args.ckpt)), "--ckpt", os.path.abspath(args.ckpt),
           "--port", str(args.port)]
    log = open(args.log, "w", encoding="utf-8")
    print("starting:", " ".join(cmd), f"(log: {args.log})", flush=True)
    return subprocess.Popen(["nice", *cmd], cwd=args.webui, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_api(base: str, proc: subprocess.Popen | None, timeout: float) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the WebUI exited (code {proc.returncode}) before its API answered")
        try:
            if call(base, "GET", V1 + "/projects", timeout=10)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(2)
    raise SystemExit(f"no answer from {base}{V1}/projects within {timeout:.0f} s")


def server_pid(proc: subprocess.Popen) -> int:
    """`nice` execs the python, so the child is the server itself (launch.py runs the WebUI in its process)."""
    return proc.pid


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--webui", help="the WebUI's folder (with venv/ and launch.py): start it here")
    ap.add_argument("--ckpt", help="checkpoint to load (with --webui)")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for the WebUI it starts")
    ap.add_argument("--log", default="soak_webui.log", help="the started WebUI's console output")
    ap.add_argument("--url", help="a running WebUI instead (with --pid)")
    ap.add_argument("--pid", type=int, help="the running WebUI's server process id")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1, help="training steps per run (batch 1)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results_soak.md"),
                    help="markdown report ('-': print only)")
    args = ap.parse_args(argv)
    if bool(args.webui) == bool(args.url):
        ap.error("give either --webui (with --ckpt) or --url (with --pid)")
    if args.webui and not args.ckpt:
        ap.error("--webui needs --ckpt")
    if args.url and not args.pid:
        ap.error("--url needs --pid")

    # a background job's SIGINT is ignored: stop on SIGTERM too, through the `finally` below
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    proc = start_webui(args) if args.webui else None
    base = args.url.rstrip("/") if args.url else f"http://127.0.0.1:{args.port}"
    pid = server_pid(proc) if proc else args.pid
    project = f"soak_{uuid.uuid4().hex[:6]}"
    project_dir = output_dir = None
    t_start = time.time()
    try:
        wait_api(base, proc, 900)
        print(f"API up after {time.time() - t_start:.0f} s; server pid {pid}: {proc_status(pid)}", flush=True)
        end = time.time() + 300
        while True:      # the WebUI may answer GETs before its app_started callbacks have added our routes
            st, r = call(base, "POST", V1 + "/projects", {"name": project, "trigger": "zkz"})
            if st not in (404, 405) or time.time() > end:
                break
            time.sleep(2)
        assert st == 201, (st, r)
        project_dir = (r or {}).get("path")
        files = [(f"{i}.png", png((60 * i, 200 - 40 * i, 90)), "image/png") for i in range(4)]
        files += [(f"{i}.txt", f"zkz, colour {i}".encode(), "text/plain") for i in range(4)]
        body, ctype = multipart(files)
        st, r = call(base, "POST", f"{V1}/projects/{project}/images?repeats=1&resolution=64", data=body, ctype=ctype)
        assert st == 200, (st, r)
        # a few steps: the WebUI's full-size model on a CPU takes tens of seconds per step; no validation pass
        config = {"resolution": 64, "max_train_steps": args.steps, "train_batch_size": 1, "network_dim": 2,
                  "network_alpha": 1, "learning_rate": 1e-3, "seed": 1, "cache_latents": True,
                  "validation_fallback": False}
        rows = []
        t0 = time.time()
        for i in range(args.runs):
            t_run = time.time()
            st, r = call(base, "POST", V1 + "/runs", {"project": project, "config": config})
            assert st == 200, (st, r)
            run_id = r["id"]
            while True:
                st, info = call(base, "GET", f"{V1}/runs/{run_id}")
                assert st == 200, (st, info)
                if info["status"] not in ("queued", "running"):
                    break
                time.sleep(1)
            assert info["status"] == "done", (info["status"], info.get("error"))
            outputs = [o.get("name") for o in info.get("outputs") or []]
            output_dir = os.path.dirname(info.get("record_path") or "") or output_dir
            st, deleted = call(base, "DELETE", f"{V1}/runs/{run_id}/files")
            assert st == 200, (st, deleted)
            rows.append({"run": i + 1, "seconds": time.time() - t_run, **proc_status(pid)})
            print(f"run {i + 1:3d} ({rows[-1]['seconds']:.0f} s, {info.get('step')} steps, loss "
                  f"{info.get('loss')}, outputs {outputs}, deleted {len(deleted)} files): rss "
                  f"{rows[-1]['rss_mib']:.1f} MiB, fds {rows[-1]['fds']}, threads {rows[-1]['threads']}", flush=True)
        host = "the WebUI" if not args.webui else os.path.basename(os.path.abspath(args.webui))
        ckpt = os.path.basename(args.ckpt) if args.ckpt else "the loaded model"
        text, _ = report(f"## Soak inside the WebUI: {args.runs} runs back to back through /lora-train/v1, one "
                         f"WebUI process", f"{host}, {ckpt} (the loaded model, tensors shared), CPU, "
                         f"OMP_NUM_THREADS={args.threads if args.webui else '?'}; 4 images at 64 px, "
                         f"{args.steps} step(s) of batch 1 per run (all 4 latents cached), each run's files deleted through the API "
                         f"after it; the WebUI server process measured from /proc/{{pid}}; "
                         f"{time.time() - t0:.0f} s for the runs ({(time.time() - t0) / args.runs:.0f} s per run).",
                         rows, args.warmup)
        print(text)
        if args.out != "-":
            write_section(args.out, "webui", text)
    finally:
        if proc is not None:
            print("stopping the WebUI", flush=True)
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)
            for d in (project_dir, output_dir):     # the project and its (emptied) output folder
                if d and os.path.isdir(d) and os.path.basename(d) == project:
                    shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
