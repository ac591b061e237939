"""Where a run's time goes: cProfile over one engine run (start-up, steps, the end), as a readable top list.

    python bench/profile_train.py --ckpt MODEL.safetensors [--steps 3] [--resolution 64] [--out FILE.md]

The run is the one bench/vs_sd_scripts.py times (networks.lora dim 8 on U-Net + text encoder, AdamW, fp32, cached
latents, batch 1, one torch thread, random images), in this process. Prints and writes (--out, appended): the
moments of the run's events (from the call: model loaded, START, each STEP, DONE), process CPU time at each, and
the functions with the most cumulative and own time, filtered to the lines that say where the time goes.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--top", type=int, default=35)
    ap.add_argument("--unet-only", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("--label", default="")
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0, c0 = time.perf_counter(), time.process_time()
    marks: list[tuple[str, float, float]] = []

    def mark(what: str) -> None:
        marks.append((what, time.perf_counter() - t0, time.process_time() - c0))

    prof = cProfile.Profile(time.process_time)   # CPU time: the machine may be shared and loaded
    prof.enable()
    import torch
    torch.set_num_threads(1)
    from vs_sd_scripts import make_data
    from lib_lora_train.config import config_from_dict
    from lib_lora_train.training.loop import train
    mark("imports done")
    work = tempfile.mkdtemp(prefix="profile_train_")
    data = make_data(os.path.join(work, "data"), a.images, a.resolution)
    cfg = config_from_dict({
        "pretrained_model_name_or_path": os.path.abspath(a.ckpt), "train_data_dir": data,
        "caption_extension": ".txt", "resolution": f"{a.resolution},{a.resolution}",
        "output_dir": os.path.join(work, "out"), "output_name": "bench", "network_module": "networks.lora",
        "network_dim": 8, "network_alpha": 1, "max_train_steps": a.steps, "train_batch_size": 1,
        "learning_rate": 1e-4, "optimizer_type": "AdamW", "mixed_precision": "no", "seed": 0,
        "cache_latents": True, "network_train_unet_only": a.unet_only})

    def sink(ev):
        if ev.kind in ("start", "done", "validation", "saved", "step"):
            mark(ev.kind + (f" {ev.data.get('step')}" if ev.kind == "step" else "")
                 + (f" ({ev.data.get('at')})" if ev.kind == "validation" else ""))
        elif ev.kind == "log":
            mark("log: " + str(ev.data.get("message", ""))[:70].replace("|", "/"))
    train(cfg, sink=sink)
    prof.disable()
    mark("returned")

    lines = [f"### profile: {os.path.basename(a.ckpt)}, {a.resolution} px, {a.steps} steps"
             + (f" ({a.label})" if a.label else ""), "", "| moment | wall (s) | process CPU (s) |",
             "| --- | ---: | ---: |"]
    lines += [f"| {w} | {t:.2f} | {c:.2f} |" for w, t, c in marks]
    for key in ("cumulative", "tottime"):
        buf = io.StringIO()
        st = pstats.Stats(prof, stream=buf)
        st.sort_stats(key).print_stats(a.top)
        body = buf.getvalue()
        keep = body[body.find("ncalls"):] if "ncalls" in body else body
        lines += ["", f"top {a.top} by {key} (cProfile, process CPU time, all threads):", "```",
                  keep.rstrip().replace(ROOT + "/", ""), "```"]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "a", encoding="utf-8") as fh:
            fh.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
