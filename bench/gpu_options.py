"""The speed options (README "Speed options (GPU)") one at a time against the settings from before them: time per
step, CPU time per step and peak GPU memory of the same short run, on one loaded model.

    .venv/bin/python bench/gpu_options.py --checkpoint /path/sd15.safetensors --resolution 512 --precision bf16
    .venv/bin/python bench/gpu_options.py --quick          # tiny random model, CPU or GPU: checks the script runs

Each variant trains the same LoRA (dim 8, UNet only, AdamW, cached latents, batch --batch) for --warmup + --steps
steps on the same generated images; only the step's time is measured: one device synchronisation when step
--warmup is reported and one at the last step (a synchronisation per step would undo async_loss). Variants run
in turn, --rounds times, in alternating order; the median per variant is printed as a table.

"before": the engine as it was before these options (foreach AdamW, which is PyTorch's own default on CUDA, the
loss read at once, pageable copies). Not measured on CUDA in this project yet.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BEFORE = dict(optimizer_kernel="foreach", async_loss=False, pin_memory=False, channels_last=False,
              torch_compile=False)
VARIANTS = {
    "before": {},
    "fused AdamW": dict(optimizer_kernel="fused"),
    "async_loss": dict(async_loss=True),
    "pin_memory": dict(pin_memory=True),
    "channels_last": dict(channels_last=True),
    "torch_compile": dict(torch_compile=True),
    "all (defaults + channels_last + compile)": dict(optimizer_kernel="auto", async_loss=None, pin_memory=True,
                                                     channels_last=True, torch_compile=True),
}


def make_images(root: str, n: int, px: int) -> str:
    import torch
    from PIL import Image
    folder = os.path.join(root, "data", "1000_bench")    # one epoch holds every step: no epoch-end work timed
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        arr = (torch.rand(px, px, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(os.path.join(folder, f"{i:03d}.png"))
        with open(os.path.join(folder, f"{i:03d}.txt"), "w", encoding="utf-8") as fh:
            fh.write(f"bench, photo {i}")
    return os.path.dirname(folder)


def run_variant(name, opts, model, args, data, work, device) -> dict:
    import torch
    from lib_lora_train.config import config_from_dict
    from lib_lora_train.training.loop import train
    total = args.warmup + args.steps
    marks = {}

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def sink(event):
        if event.kind == "step" and event.data["step"] in (args.warmup, total):
            sync()
            marks[event.data["step"]] = (time.perf_counter(), time.process_time())

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    values = dict(pretrained_model_name_or_path="host", train_data_dir=data, output_dir=os.path.join(work, "out"),
                  output_name="bench", overwrite=True, resolution=str(args.resolution), network_dim=8,
                  network_alpha=8, network_train_unet_only=True, optimizer_type="AdamW", learning_rate=1e-4,
                  max_train_steps=total, train_batch_size=args.batch, cache_latents=True, seed=1, device=device,
                  validation_fallback=False,
                  mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[args.precision],
                  gradient_checkpointing=args.gradient_checkpointing,
                  dynamo_backend=args.dynamo_backend, **{**BEFORE, **opts})
    train(config_from_dict(values), model=model, sink=sink)
    (w0, c0), (w1, c1) = marks[args.warmup], marks[total]
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda" else float("nan")
    return dict(step_s=(w1 - w0) / args.steps, cpu_s=(c1 - c0) / args.steps, peak_mb=peak)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a .safetensors checkpoint (default: a tiny random SD1-shaped one)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="bf16")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=5, help="untimed steps (torch.compile compiles in them)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--dynamo-backend", default="inductor")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from the table")
    p.add_argument("--quick", action="store_true", help="tiny model, 64 px, fp32, 2+3 steps, one round (on a CPU "
                   "without the compile variants unless --variants names them)")
    args = p.parse_args(argv)
    import torch
    from lib_lora_train.models import load_sd_model, write_tiny_checkpoint
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.quick:
        args.resolution, args.precision, args.warmup, args.steps, args.rounds = 64, "fp32", 2, 3, 1
        if device == "cpu" and args.variants == ",".join(VARIANTS):   # tracing the UNet takes minutes on a CPU
            args.variants = ",".join(n for n in VARIANTS if "compile" not in n and "all" not in n)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    with tempfile.TemporaryDirectory() as work:
        ckpt = args.checkpoint
        if not ckpt:
            ckpt = write_tiny_checkpoint(os.path.join(work, "tiny.safetensors"), seed=0)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
        model = load_sd_model(ckpt, device=device, dtype=dtype)
        data = make_images(work, max(args.batch, 4), args.resolution)
        results = {n: [] for n in names}
        for r in range(args.rounds):
            for name in (names if r % 2 == 0 else list(reversed(names))):
                results[name].append(run_variant(name, VARIANTS[name], model, args, data, work, device))
                print(f"round {r + 1} {name}: {results[name][-1]}", file=sys.stderr, flush=True)
    print(f"device {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}), torch "
          f"{torch.__version__}, {args.precision}, {args.resolution} px, batch {args.batch}, "
          f"{args.steps} timed steps after {args.warmup}, {args.rounds} round(s), median")
    base = statistics.median(x["step_s"] for x in results[names[0]])
    print(f"| variant | s/step | vs {names[0]} | CPU s/step | peak GPU MiB |\n|---|---|---|---|---|")
    for name in names:
        step = statistics.median(x["step_s"] for x in results[name])
        cpu = statistics.median(x["cpu_s"] for x in results[name])
        peak = max(x["peak_mb"] for x in results[name])
        print(f"| {name} | {step:.4f} | x{step / base:.3f} | {cpu:.4f} | {peak:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
