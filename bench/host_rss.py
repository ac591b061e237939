"""What a training run adds to a host's resident memory (RSS), with the engine alone: the model is loaded once
and held as a WebUI holds it, and each run is a job in a worker thread on that model, as in the WebUI.

Per run: the RSS before, its peak (the kernel's high-water mark, reset at the run's start), after the run and after the
job manager's hand-back of freed memory (lib_lora_train/heap.py); in GiB and as a share of the model's weights.
The allocator decides much of it (README "Performance", "Inside the WebUI"), so run it under each:

    python bench/host_rss.py --checkpoint sd2v.safetensors                      # glibc malloc
    LD_PRELOAD=$(ldconfig -p | grep -o '/.*libtcmalloc_minimal.so.4' | head -1) \\
        python bench/host_rss.py --checkpoint sd2v.safetensors                  # tcmalloc, as webui.sh does
    python bench/host_rss.py --checkpoint sd2v.safetensors --set gradient_checkpointing=true

A full-size random-weight checkpoint: bench/real/make_random_checkpoint.py (fp32 SD 2.x needs about 6 GiB of
RAM here, SDXL about 15). Linux only (/proc).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import threading
import time

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from lib_lora_train.config import config_from_dict  # noqa: E402
from lib_lora_train.heap import release_free_memory  # noqa: E402
from lib_lora_train.models import load_sd_model  # noqa: E402
from lib_lora_train.training.loop import train  # noqa: E402
from train_step import Memory  # noqa: E402  (bench/: the same peak reading as make bench)

MIB_PER_GIB = 1024.0


def write_images(folder: str, n: int = 8, side: int = 64) -> None:
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(f"{folder}/{i}.png")
        with open(f"{folder}/{i}.txt", "w") as fh:
            fh.write(f"x, picture {i}")


def one_run(cfg, model) -> dict:
    """The run in a worker thread as the WebUI's job manager runs it; the peak is the kernel's RSS high-water mark
    from the run's start (train_step.Memory), the rest RSS in MiB."""
    mem, out = Memory(torch.device("cpu")), {}

    def job() -> None:
        t0 = time.time()
        train(cfg, model=model)
        out["seconds"] = time.time() - t0
        gc.collect()
        out["after"] = Memory.rss_mb()
        release_free_memory()
        out["after_release"] = Memory.rss_mb()

    mem.start()
    worker = threading.Thread(target=job)
    worker.start()
    worker.join()
    mem.stop()
    return {"before": mem.base_mb, "peak": mem.base_mb + mem.peak_mb, "method": mem.method, **out}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a training option (JSON value), e.g. network_train_unet_only=true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    extra = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    model = load_sd_model(args.checkpoint, dtype=torch.float32)
    weights = sum(p.numel() * p.element_size() for part in (model.unet, model.vae, *model.text_encoders)
                  for p in part.parameters())
    gc.collect()
    release_free_memory()
    print(f"allocator: {os.environ.get('LD_PRELOAD') or 'glibc malloc'}; weights {weights / 2 ** 30:.2f} GiB; "
          f"options {extra or 'defaults'}")
    with tempfile.TemporaryDirectory() as tmp:
        write_images(f"{tmp}/data/1_x")
        for r in range(args.runs):
            cfg = config_from_dict({
                "pretrained_model_name_or_path": args.checkpoint, "train_data_dir": f"{tmp}/data",
                "output_dir": f"{tmp}/out{r}", "resolution": "64", "train_batch_size": 2, "network_dim": 8,
                "network_alpha": 1, "learning_rate": 1e-4, "optimizer_type": "AdamW", "max_train_steps": args.steps,
                "cache_latents": True, "device": "cpu", "seed": 0, **extra})
            m = one_run(cfg, model)
            add = m["peak"] - m["before"]
            print(f"run {r + 1}: peak +{add / MIB_PER_GIB:.2f} GiB ({add * 2 ** 20 / weights:.0%} of the weights; "
                  f"{m['method']}), after the run +{(m['after'] - m['before']) / MIB_PER_GIB:.2f}, after the hand-back "
                  f"+{(m['after_release'] - m['before']) / MIB_PER_GIB:.2f}, {m['seconds']:.1f} s", flush=True)


if __name__ == "__main__":
    main()
