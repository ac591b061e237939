"""Training-step time and peak memory: lib_lora_train's train() against a minimal diffusers + peft LoRA loop.

Both sides train the same UNet-only LoRA (sd-scripts' LierLa layer set, same rank / alpha / optimizer / batch /
resolution) on the same tiny SD1-shaped checkpoint, with cached latents and the frozen text encoder run every
step. Each variant runs in its own subprocess so its memory is its own; variants alternate across rounds so a
change of load on the machine hits both. See bench/README.md for what is measured and why it is fair.

    python bench/train_step.py                 # sizes 16 and 64 (128 px and 512 px), writes bench/results.md
    python bench/train_step.py --quick         # smoke run, well under a minute
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

RESULT_TAG = "BENCH_RESULT "
CAPTIONS = ["bench, a photo of a thing, red", "bench, a photo of a thing, blue"]


# ============================================================================ memory
class Memory:
    """Peak memory of the training steps only: reset at the start, read after the last timed step.

    CPU: the kernel's RSS high-water mark (VmHWM), reset through /proc/self/clear_refs where allowed, minus the
    RSS at the reset; without the reset, ru_maxrss (peak since process start) minus that RSS, an upper bound.
    CUDA: torch.cuda.max_memory_allocated minus the memory allocated at the reset.
    """

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.base_mb = 0.0
        self.peak_mb = 0.0
        self.method = ""

    @staticmethod
    def _status_kb(field: str) -> int | None:
        try:
            with open("/proc/self/status") as fh:
                m = re.search(rf"^{field}:\s+(\d+)\s+kB", fh.read(), re.M)
            return int(m.group(1)) if m else None
        except OSError:
            return None

    @classmethod
    def rss_mb(cls) -> float:
        kb = cls._status_kb("VmRSS")
        return kb / 1024 if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def start(self) -> None:
        import torch
        if self.cuda:
            torch.cuda.synchronize()
            self.base_mb = torch.cuda.memory_allocated() / 2 ** 20
            torch.cuda.reset_peak_memory_stats()
            self.method = "cuda max_memory_allocated - allocated at start"
            return
        self.base_mb = self.rss_mb()
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")   # resets VmHWM to the current RSS (Linux >= 4.0)
            self.method = "VmHWM (reset at start) - RSS at start"
        except OSError:
            self.method = "ru_maxrss - RSS at start (upper bound: no peak reset)"

    def stop(self) -> None:
        import torch
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2 ** 20 - self.base_mb
            return
        hwm = self._status_kb("VmHWM") if self.method.startswith("VmHWM") else None
        peak = hwm / 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.peak_mb = peak - self.base_mb


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


# ============================================================================ shared setup
def lierla_module_names(unet) -> list[str]:
    """Linear and 1x1-conv layers inside Transformer2DModel blocks (sd-scripts' LierLa set), full paths."""
    import torch
    names = []
    for path, mod in unet.named_modules():
        if type(mod).__name__ != "Transformer2DModel":
            continue
        for sub, child in mod.named_modules():
            if not sub:
                continue
            if isinstance(child, torch.nn.Linear) or (
                    isinstance(child, torch.nn.Conv2d) and tuple(child.kernel_size) == (1, 1)):
                names.append(f"{path}.{sub}")
    return names


def load_model(spec: dict):
    import torch
    from lib_lora_train.models import load_sd_model
    device = torch.device(spec["device"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[spec["precision"]]
    model = load_sd_model(spec["ckpt"], device=device, dtype=dtype)
    if dtype == torch.float16 and device.type == "cpu":
        model.vae.to(torch.float32)
    return model, device, dtype


def _mark() -> tuple[float, float]:
    """(wall clock, CPU time of this process): CPU time is what the step cost, whatever else the machine ran."""
    return time.perf_counter(), time.process_time()


def _step_durations(marks: list[tuple[float, float]], skip: int) -> dict:
    wall = [b[0] - a[0] for a, b in zip(marks, marks[1:])][skip:]
    cpu = [b[1] - a[1] for a, b in zip(marks, marks[1:])][skip:]
    return dict(durations=wall, cpu_durations=cpu)


# ============================================================================ engine variant
def run_engine(spec: dict) -> dict:
    import torch
    from safetensors.torch import load_file
    from lib_lora_train.config import config_from_dict
    from lib_lora_train.training.loop import train

    model, device, _ = load_model(spec)
    rss_loaded = Memory.rss_mb()
    total = spec["warmup"] + spec["steps"]
    mem = Memory(device)
    marks, losses = [], []

    def sink(event) -> None:
        if event.kind == "start":
            mem.start()
        elif event.kind == "step":
            _sync(device)
            marks.append(_mark())
            losses.append(event.data["loss"])
            if event.data["step"] == total:
                mem.stop()

    out_dir = os.path.join(spec["work"], f"engine-{spec['latent']}-{os.getpid()}")
    cfg = config_from_dict(dict(
        pretrained_model_name_or_path=spec["ckpt"], train_data_dir=spec["data"], output_dir=out_dir,
        output_name="bench", resolution=str(spec["latent"] * 8), network_module="networks.lora",
        network_dim=spec["rank"], network_alpha=spec["alpha"], network_train_unet_only=True,
        learning_rate=spec["lr"], optimizer_type="AdamW", max_grad_norm=spec["max_grad_norm"],
        lr_scheduler="constant", max_train_steps=total, train_batch_size=spec["batch"], seed=1,
        cache_latents=True, device=spec["device"],
        mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[spec["precision"]]))
    train(cfg, model=model, sink=sink)

    tensors = load_file(os.path.join(out_dir, "bench.safetensors"))
    modules = {k.rsplit(".lora_down.weight", 1)[0] for k in tensors if k.endswith(".lora_down.weight")}
    trainable = sum(t.numel() for k, t in tensors.items() if ".lora_" in k)
    times = _step_durations(marks, spec["warmup"] - 1)   # marks[i] ends step i+1
    return dict(**times, peak_mb=mem.peak_mb, base_mb=mem.base_mb, mem_method=mem.method,
                modules=len(modules), trainable=trainable, losses=losses, rss_loaded_mb=rss_loaded)


# ============================================================================ floor variant
def _load_images(spec: dict):
    import numpy as np
    import torch
    from PIL import Image
    folder = os.path.join(spec["data"], os.listdir(spec["data"])[0])
    names = sorted(n for n in os.listdir(folder) if n.endswith(".png"))
    images = []
    for n in names:
        arr = np.asarray(Image.open(os.path.join(folder, n)).convert("RGB"), dtype=np.uint8)
        images.append(torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1.0)
    return images


def run_floor(spec: dict) -> dict:
    """The smallest sensible LoRA loop: diffusers UNet + peft adapters, AdamW, grad clipping, nothing else."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    model, device, dtype = load_model(spec)
    rss_loaded = Memory.rss_mb()
    unet, vae, te, tok, sched = model.unet, model.vae, model.text_encoder, model.tokenizer, model.noise_scheduler
    amp = dtype if dtype != torch.float32 else None

    # cached latents, as the engine's cache_latents does: one VAE pass per image before training
    with torch.no_grad():
        latents = []
        for img in _load_images(spec):
            dist = vae.encode(img[None].to(device, vae.dtype)).latent_dist
            latents.append(((dist.mean + dist.std * torch.randn_like(dist.mean)) * model.info.latent_scale)[0].float())

    names = lierla_module_names(unet)
    unet.add_adapter(LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], init_lora_weights=True,
                                target_modules=names))
    lora_layers = [m for m in unet.modules() if isinstance(m, LoraLayer)]
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()    # trainable weights in fp32, as the engine keeps its network
    optimizer = torch.optim.AdamW(params, lr=spec["lr"])
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 and device.type == "cuda" else None
    sched.alphas_cumprod = sched.alphas_cumprod.to(device)

    total, b = spec["warmup"] + spec["steps"], spec["batch"]
    mem = Memory(device)
    mem.start()
    marks, losses = [_mark()], []
    for step in range(total):
        idx = [(step * b + j) % len(latents) for j in range(b)]
        lat = torch.stack([latents[i] for i in idx]).to(device)
        ids = tok([CAPTIONS[i % len(CAPTIONS)] for i in idx], padding="max_length", truncation=True,
                  max_length=tok.model_max_length, return_tensors="pt").input_ids.to(device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            with torch.no_grad():
                cond = te(ids)[0]
            noise = torch.randn_like(lat)
            t = torch.randint(0, sched.config.num_train_timesteps, (b,), device=device)
            noisy = sched.add_noise(lat, noise, t)
            pred = unet(noisy.to(unet.dtype), t, cond.to(unet.dtype)).sample
        loss = F.mse_loss(pred.float(), noise.float())
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, spec["max_grad_norm"])
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        _sync(device)
        marks.append(_mark())
    mem.stop()
    times = _step_durations(marks, spec["warmup"])
    return dict(**times, peak_mb=mem.peak_mb, base_mb=mem.base_mb, mem_method=mem.method,
                modules=len(lora_layers), target_names=len(names), trainable=sum(p.numel() for p in params),
                losses=losses, rss_loaded_mb=rss_loaded)


def worker_main(spec: dict) -> None:
    import torch
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    result = (run_engine if spec["variant"] == "engine" else run_floor)(spec)
    result["threads"] = torch.get_num_threads()
    result["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(RESULT_TAG + json.dumps(result), flush=True)


# ============================================================================ parent
def versions() -> dict:
    import importlib.metadata as im
    out = {"python": platform.python_version()}
    for pkg in ("torch", "diffusers", "transformers", "peft", "lycoris-lora"):
        try:
            out[pkg.replace("-lora", "")] = im.version(pkg)
        except im.PackageNotFoundError:
            out[pkg] = "-"
    return out


def make_inputs(work: str, args, latent: int) -> str:
    """B random images of latent*8 px with captions, in one sd-scripts folder repeated for every step."""
    import torch
    from PIL import Image
    total = args.warmup + args.steps
    root = os.path.join(work, f"data-{latent}")
    folder = os.path.join(root, f"{total}_bench")
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(latent)
    px = latent * 8
    for i in range(args.batch):
        arr = (torch.rand(px, px, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(os.path.join(folder, f"{i:03d}.png"))
        with open(os.path.join(folder, f"{i:03d}.txt"), "w", encoding="utf-8") as fh:
            fh.write(CAPTIONS[i % len(CAPTIONS)])
    return root


def run_worker(spec: dict, timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{spec['variant']} worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT_TAG):])


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "-"


def resolve_device(name: str) -> str:
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: PyTorch sees no CUDA device")
    return name


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default=None,
                   help="comma list of fp32,bf16,fp16 (default: fp32 on CPU, fp32,bf16 on CUDA)")
    p.add_argument("--sizes", default="16,64", help="latent sizes (image px = 8x), comma separated")
    p.add_argument("--steps", type=int, default=5, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them (at least 1)")
    p.add_argument("--rounds", type=int, default=2, help="engine/floor pairs per size, order alternating")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=8.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads in the workers (0: torch's default). 1 by default: with other load on the "
                        "machine, multi-threaded CPU kernels stall on each other and times vary several-fold")
    p.add_argument("--unet-channels", default="64,128,256,256")
    p.add_argument("--unet-layers", type=int, default=1)
    p.add_argument("--text-hidden", type=int, default=256, help="text width = UNet cross-attention width")
    p.add_argument("--out", default=None, help="markdown file (default bench/results.md; --quick: print only)")
    p.add_argument("--quick", action="store_true", help="smoke run: latent 16, 2+1 steps, one round")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.sizes, a.steps, a.warmup, a.rounds = "16", 2, 1, 1
    elif a.out is None:
        a.out = os.path.join(ROOT, "bench", "results.md")
    if a.warmup < 1 or a.steps < 1 or a.rounds < 1:
        p.error("--warmup, --steps and --rounds must be at least 1")
    return a


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return 0
    import torch
    from lib_lora_train.models import write_tiny_checkpoint
    from lib_lora_train.models.tiny import tiny_module_configs, tiny_sizes

    device = resolve_device(args.device)
    precisions = (args.precision or ("fp32,bf16" if device == "cuda" else "fp32")).split(",")
    sizes = [int(s) for s in args.sizes.split(",")]
    channels = tuple(int(c) for c in args.unet_channels.split(","))
    tiny = dict(unet_channels=channels, unet_layers=args.unet_layers, text_hidden=args.text_hidden,
                text_intermediate=4 * args.text_hidden, text_layers=4)
    load_before = load_average()
    t0 = time.time()
    rows, details = [], []
    with tempfile.TemporaryDirectory(prefix="bench-train-step-") as work:
        ckpt = os.path.join(work, "bench.safetensors")
        write_tiny_checkpoint(ckpt, seed=0, **tiny)
        from accelerate import init_empty_weights
        from diffusers import UNet2DConditionModel
        with init_empty_weights():
            unet_params = sum(p.numel() for p in UNet2DConditionModel(**tiny_module_configs(
                tiny_sizes(**tiny))[0]).parameters())
        for precision in precisions:
            for latent in sizes:
                data = make_inputs(work, args, latent)
                runs = {"engine": [], "floor": []}
                for r in range(args.rounds):
                    order = ("engine", "floor") if r % 2 == 0 else ("floor", "engine")
                    for variant in order:
                        spec = dict(variant=variant, ckpt=ckpt, data=data, work=work, latent=latent,
                                    device=device, precision=precision, batch=args.batch, rank=args.rank,
                                    alpha=args.alpha, lr=args.lr, max_grad_norm=1.0, steps=args.steps,
                                    warmup=args.warmup, threads=args.threads)
                        res = run_worker(spec, timeout=3600)
                        runs[variant].append(res)
                        print(f"[{precision} latent {latent} round {r + 1}] {variant}: "
                              f"{1000 * median(res['durations']):.1f} ms/step "
                              f"(CPU {1000 * median(res['cpu_durations']):.1f}), peak {res['peak_mb']:.0f} MB, "
                              f"{res['modules']} modules, threads {res['threads']}", flush=True)
                e, f = runs["engine"], runs["floor"]
                if e[0]["modules"] != f[0]["modules"] or e[0]["trainable"] != f[0]["trainable"]:
                    raise RuntimeError(f"not the same work: engine adapts {e[0]['modules']} modules "
                                       f"({e[0]['trainable']} params), peft {f[0]['modules']} "
                                       f"({f[0]['trainable']} params)")
                e_ms = 1000 * median([median(x["durations"]) for x in e])
                f_ms = 1000 * median([median(x["durations"]) for x in f])
                e_cpu = 1000 * median([median(x["cpu_durations"]) for x in e])
                f_cpu = 1000 * median([median(x["cpu_durations"]) for x in f])
                e_mb = median([x["peak_mb"] for x in e])
                f_mb = median([x["peak_mb"] for x in f])
                rows.append(dict(precision=precision, latent=latent, e_ms=e_ms, f_ms=f_ms, e_cpu=e_cpu, f_cpu=f_cpu, e_mb=e_mb, f_mb=f_mb,
                                 threads=e[0]["threads"], modules=e[0]["modules"], trainable=e[0]["trainable"]))
                details.append((precision, latent, runs))
    write_results(args, rows, details, dict(
        device=device, unet_params=unet_params, tiny=tiny, load_before=load_before, load_after=load_average(),
        seconds=time.time() - t0, versions=versions(), cpu=_cpu_name(), cores=os.cpu_count(),
        torch_threads=torch.get_num_threads()))
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            m = re.search(r"^model name\s*:\s*(.+)$", fh.read(), re.M)
        return m.group(1).strip() if m else platform.processor()
    except OSError:
        return platform.processor()


def write_results(args, rows, details, info) -> None:
    v = info["versions"]
    ver = ", ".join(f"{k} {x}" for k, x in v.items())
    lines = [
        "# Training step: lib_lora_train vs a minimal diffusers + peft loop",
        "",
        f"Written by `bench/train_step.py` on {time.strftime('%Y-%m-%d %H:%M')} "
        f"({info['seconds']:.0f} s). Device: {info['device']}"
        + (f" ({info['cpu']}, {info['cores']} cores)" if info["device"] == "cpu" else "") + ".",
        f"UNet {info['unet_params'] / 1e6:.1f}M parameters (channels {info['tiny']['unet_channels']}, "
        f"layers per block {info['tiny']['unet_layers']}, cross-attention width {info['tiny']['text_hidden']}); "
        f"LoRA rank {args.rank}, alpha {args.alpha:g}, UNet only, LierLa layers; batch {args.batch}; AdamW lr "
        f"{args.lr:g}, max_grad_norm 1.0; cached latents, text encoder run every step.",
        f"Per size: {args.rounds} round(s) of engine and floor in separate processes (alternating order), "
        f"{args.warmup} warmup + {args.steps} timed steps each; ms/step is the median over runs of the median "
        f"step time (wall clock; CPU ms: CPU time of the worker process, which other load on the machine "
        f"does not inflate); peak MB is the memory added by the training steps (see README).",
        f"Load average before / after: {info['load_before']} / {info['load_after']} "
        f"(on a loaded machine judge by the CPU ratio; see README).",
        "",
        "| precision | latent (px) | engine ms/step | floor ms/step | ratio | engine CPU ms | floor CPU ms "
        "| CPU ratio | engine peak MB | floor peak MB | ratio | adapted modules | torch threads | versions |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['precision']} | {r['latent']} ({r['latent'] * 8}) | {r['e_ms']:.1f} | {r['f_ms']:.1f} "
            f"| {r['e_ms'] / r['f_ms']:.3f} | {r['e_cpu']:.1f} | {r['f_cpu']:.1f} | {r['e_cpu'] / r['f_cpu']:.3f} "
            f"| {r['e_mb']:.0f} | {r['f_mb']:.0f} "
            f"| {r['e_mb'] / r['f_mb'] if r['f_mb'] > 0 else float('nan'):.3f} | {r['modules']} "
            f"| {r['threads']} | {ver} |")
    lines += ["", "## Runs", "",
              "| precision | latent | variant | round | median ms | min ms | max ms | median CPU ms | peak MB "
              "| RSS at start MB | first / last loss |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for precision, latent, runs in details:
        for variant, results in runs.items():
            for i, x in enumerate(results):
                d = x["durations"]
                lines.append(f"| {precision} | {latent} | {variant} | {i + 1} | {1000 * median(d):.1f} "
                             f"| {1000 * min(d):.1f} | {1000 * max(d):.1f} | {1000 * median(x['cpu_durations']):.1f} "
                             f"| {x['peak_mb']:.0f} "
                             f"| {x['base_mb']:.0f} | {x['losses'][0]:.4f} / {x['losses'][-1]:.4f} |")
    methods = sorted({x["mem_method"] for _, _, runs in details for rs in runs.values() for x in rs})
    lines += ["", f"Memory method: {'; '.join(methods)}.",
              f"Same work checked: engine and peft adapt {rows[0]['modules']} modules with "
              f"{rows[0]['trainable']} trainable parameters." if rows else "", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text)


if __name__ == "__main__":
    sys.exit(main())
