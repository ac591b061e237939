"""Peak GPU memory and samples/s of one LoRA training setting, SD 1.5 at 512 px or SDXL at 1024 px.

On CUDA it MEASURES: full-size models with random weights are built on the fly (SD 1.5 / SDXL base
architectures), a LoRA is applied with the engine's create_network, and a few training steps run with the
engine's memory options (fp8 base, gradient checkpointing, mixed / full precision, optimizer); the peak is
torch.cuda.max_memory_allocated over the steps.

Without CUDA it ESTIMATES, and says so:
- weights, LoRA parameters, gradients, optimizer state: exact parameter counts of the full-size modules built
  on the meta device (no memory), times the bytes each setting stores per parameter;
- activations kept for backward: measured on CPU with torch.autograd.graph.saved_tensors_hooks (the bytes of
  every distinct tensor autograd saves) on the same architecture at 1/4 of the channel width (activations grow
  linearly with the width) at three small resolutions, fitted linearly in the pixel count and extrapolated to
  the target resolution and full width; with gradient checkpointing, the saved tensors at the checkpoint
  boundaries plus the largest single checkpointed unit (a resnet or a transformer block, as diffusers
  checkpoints them) recomputed in backward;
- plus a fixed 0.8 GiB for the CUDA context and allocator slack (an assumption, not measured).

    python bench/memory.py --family sdxl --batch 1 --precision bf16 --gradient-checkpointing --fp8-base
    python bench/memory.py --table          # the "what fits" table for docs/readme-parts/training.md
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

GIB = 1024 ** 3
CUDA_OVERHEAD = 0.8 * GIB       # context + allocator slack: an assumption for the estimate
CALIBRATION_LATENTS = (8, 12, 16)   # latent sides of the CPU calibration runs (64, 96, 128 px)
WIDTH_DIV = 4


# ------------------------------------------------------------------ architectures (public facts)
def unet_config(family: str, div: int = 1) -> dict:
    if family == "sd1":
        return dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                    block_out_channels=tuple(c // div for c in (320, 640, 1280, 1280)),
                    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32 // div)
    return dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=tuple(c // div for c in (320, 640, 1280)),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
                cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816, norm_num_groups=32 // div)


def text_configs(family: str) -> list[dict]:
    clip_l = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
    if family == "sd1":
        return [clip_l]
    big_g = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
    return [clip_l, big_g]


VAE = dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           latent_channels=4, norm_num_groups=32)


def build_unet(family: str, div: int):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(**unet_config(family, div))


def build(family: str, *, meta: bool):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    ctx = init_empty_weights() if meta else contextlib.nullcontext()
    with ctx:
        unet = UNet2DConditionModel(**unet_config(family))
        tes = [CLIPTextModel(CLIPTextConfig(**text_configs(family)[0]))]
        if family == "sdxl":
            tes.append(CLIPTextModelWithProjection(CLIPTextConfig(**text_configs(family)[1])))
        vae = AutoencoderKL(**VAE)
    return unet, tes, vae


# ------------------------------------------------------------------ settings
@dataclasses.dataclass
class Setting:
    family: str = "sd1"
    resolution: int = 0            # 0: native (512 / 1024)
    batch: int = 1
    precision: str = "bf16"        # fp32 | fp16 | bf16 (mixed precision; base weights in that dtype)
    full: bool = False             # full_fp16 / full_bf16: the LoRA itself in half precision
    gradient_checkpointing: bool = False
    fp8_base: bool = False
    cache_latents: bool = True     # VAE not run per step (it stays loaded: the engine keeps it on the device)
    cache_te: bool = False         # cache_text_encoder_outputs (UNet-only LoRA)
    train_te: bool = False
    optimizer: str = "AdamW"       # AdamW | AdamW8bit | Adafactor
    rank: int = 16

    @property
    def res(self) -> int:
        return self.resolution or (1024 if self.family == "sdxl" else 512)

    def label(self) -> str:
        parts = [self.precision + (" full" if self.full else ""), f"batch {self.batch}", f"rank {self.rank}",
                 self.optimizer]
        parts += [p for p, on in (("grad ckpt", self.gradient_checkpointing), ("fp8 base", self.fp8_base),
                                  ("TE cache", self.cache_te), ("TE trained", self.train_te)) if on]
        return ", ".join(parts)


def _half(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def _weight_bytes(modules, precision: str, fp8: bool) -> int:
    total = 0
    for m in modules:
        for mod in m.modules():
            for name, p in mod.named_parameters(recurse=False):
                big = isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and name == "weight"
                total += p.numel() * (1 if fp8 and big else _half(precision))
    return total


def lora_params(family: str, unet, tes, rank: int, train_te: bool) -> int:
    """Parameter count of sd-scripts' LoRA (LierLa) on these modules, from the engine's own target list."""
    from lib_lora_train.networks import create_network, network_config_from_args
    cfg = network_config_from_args("networks.lora", rank, rank, [], train_text_encoder=train_te)
    net = create_network(cfg, unet, (tes[0] if len(tes) == 1 else tes) if train_te else None, family=family)
    return sum(p.numel() for p in net.parameters())


def _optimizer_bytes(name: str, n: int) -> int:
    return {"adamw": 8 * n, "adamw8bit": 2 * n, "adafactor": n // 2}.get(name.lower(), 8 * n)


# ------------------------------------------------------------------ activation calibration (CPU)
class SavedBytes:
    """Sum of the bytes of distinct tensors autograd saves for backward while active."""

    def __init__(self):
        self.seen: set = set()
        self.bytes = 0

    def _pack(self, t: torch.Tensor):
        try:
            key = (t.untyped_storage().data_ptr(), t.dtype)
            if key not in self.seen and t.device.type != "meta":
                self.seen.add(key)
                self.bytes += t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def _unet_activation_bytes(unet, family: str, latent: int, batch: int, precision: str, checkpointing: bool,
                           params_require_grad) -> tuple[int, int]:
    """(bytes saved in forward, the largest checkpointed unit's own saved bytes)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, latent, latent, generator=g)
    t = torch.full((batch,), 500)
    cond = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    kw = {}
    if family == "sdxl":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 1280, generator=g),
                                   "time_ids": torch.tensor([[latent * 8] * 2 + [0, 0] + [latent * 8] * 2] * batch,
                                                            dtype=torch.float32)}
    # diffusers checkpoints each resnet and each transformer block: those are the units recomputed in backward
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D
    blocks = [m for m in unet.modules() if isinstance(m, (ResnetBlock2D, BasicTransformerBlock))]
    per_block: list[int] = []
    hooks = []
    counter = SavedBytes()

    def pre(_m, *_a):
        per_block.append(-counter.bytes)

    def post(_m, *_a):
        per_block[-1] += counter.bytes
    for b in blocks:
        hooks += [b.register_forward_pre_hook(pre), b.register_forward_hook(post)]
    net = params_require_grad(unet)
    dtype = None if precision == "fp32" else torch.bfloat16   # CPU autocast: bf16 (fp16 saves the same sizes)
    if checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()
    try:
        with counter, (torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()):
            out = unet(x, t, cond, **kw).sample
        out.float().square().mean().backward()
    finally:
        for h in hooks:
            h.remove()
        if net is not None:
            net.remove()
        if checkpointing:
            unet.disable_gradient_checkpointing()
    return counter.bytes, max(per_block) if per_block else 0


def activation_model(setting: Setting, unet_small) -> tuple[float, float]:
    """(bytes per latent pixel per sample, constant) at full width, fitted over the calibration resolutions."""
    from lib_lora_train.networks import create_network, network_config_from_args

    def lora_like(u):    # the real LoRA (the engine's layer set): autograd saves what its gradients need
        u.requires_grad_(False)
        cfg = network_config_from_args("networks.lora", setting.rank, setting.rank, [], train_text_encoder=False)
        net = create_network(cfg, u, None, family=setting.family)
        net.apply_to()
        return net
    xs, ys = [], []
    for latent in CALIBRATION_LATENTS:
        saved, largest = _unet_activation_bytes(unet_small, setting.family, latent, 1, setting.precision,
                                                setting.gradient_checkpointing, lora_like)
        if setting.gradient_checkpointing:
            plain, largest = _unet_activation_bytes(unet_small, setting.family, latent, 1, setting.precision,
                                                    False, lora_like)
            saved = saved + largest
        xs.append(latent * latent)
        ys.append(saved * WIDTH_DIV)
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return slope, my - slope * mx


def estimate(setting: Setting, cache: dict | None = None) -> dict:
    cache = {} if cache is None else cache
    fam = setting.family
    if ("meta", fam) not in cache:
        cache[("meta", fam)] = build(fam, meta=True)
    unet, tes, vae = cache[("meta", fam)]
    weights = _weight_bytes([unet], setting.precision, setting.fp8_base)
    weights += _weight_bytes(tes, setting.precision, setting.fp8_base)
    weights += _weight_bytes([vae], "fp32" if fam == "sdxl" else setting.precision, False)   # SDXL VAE in fp32
    key = ("lora", fam, setting.rank, setting.train_te)
    if key not in cache:
        cache[key] = lora_params(fam, unet, tes, setting.rank, setting.train_te)
    n_lora = cache[key]
    lora_bytes = n_lora * (2 if setting.full else 4)
    grads = lora_bytes
    optim = _optimizer_bytes(setting.optimizer, n_lora)
    # CPU calibration runs in bf16 autocast for fp16 and bf16 alike (both save 2-byte activations)
    akey = ("act", fam, setting.precision == "fp32", setting.gradient_checkpointing, setting.rank)
    if akey not in cache:
        if ("small", fam) not in cache:
            torch.manual_seed(0)
            cache[("small", fam)] = build_unet(fam, WIDTH_DIV)
        cache[akey] = activation_model(setting, cache[("small", fam)])
    slope, const = cache[akey]
    lat = setting.res // 8
    activations = max(0.0, slope * lat * lat + const) * setting.batch
    if setting.train_te:
        # text encoders: 77 tokens; their activations are ~(layers x tokens x width x 24 bytes) per sample
        activations += sum(c["num_hidden_layers"] * 77 * c["hidden_size"] * 24 for c in text_configs(fam)) \
            * setting.batch
    total = weights + lora_bytes + grads + optim + activations + CUDA_OVERHEAD
    return {"setting": setting.label(), "family": fam, "resolution": setting.res, "kind": "estimated",
            "weights_gib": weights / GIB, "lora_params": n_lora, "lora_gib": lora_bytes / GIB,
            "grads_gib": grads / GIB, "optimizer_gib": optim / GIB, "activations_gib": activations / GIB,
            "overhead_gib": CUDA_OVERHEAD / GIB, "total_gib": total / GIB}


# ------------------------------------------------------------------ measurement (CUDA)
def measure(setting: Setting, steps: int = 5, device: str = "cuda") -> dict:
    """Real steps; the peak is read on CUDA only (another device gives samples/s and no memory figure)."""
    from lib_lora_train.models.conditioning import SizeInfo
    from lib_lora_train.networks import create_network, network_config_from_args
    from lib_lora_train.training.memory import enable_checkpointing, store_in_fp8, use_sdpa
    from lib_lora_train.training.optim import make_optimizer
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[setting.precision]
    torch.manual_seed(0)
    unet, tes, vae = build(setting.family, meta=False)
    for m in [unet, *tes, vae]:
        m.requires_grad_(False)
        m.to(dev, dtype)
    vae.to(torch.float32 if setting.family == "sdxl" else dtype)
    use_sdpa(unet)
    if setting.fp8_base:
        for m in [unet, *tes]:
            store_in_fp8(m, dtype)
    cfg = network_config_from_args("networks.lora", setting.rank, setting.rank, [],
                                   train_text_encoder=setting.train_te)
    net = create_network(cfg, unet, (tes[0] if len(tes) == 1 else tes) if setting.train_te else None,
                         family=setting.family)
    net.to(dev, dtype if setting.full else torch.float32)
    net.apply_to()
    if setting.gradient_checkpointing:
        enable_checkpointing(unet, tes if setting.train_te else [])
    opt, _ = make_optimizer(setting.optimizer, net.param_groups(None, None, 1e-4), 1e-4,
                            ["relative_step=False"] if setting.optimizer == "Adafactor" else [])
    lat = setting.res // 8
    b = setting.batch
    x = torch.randn(b, 4, lat, lat, device=dev)
    ids = torch.randint(0, 49000, (b, 77), device=dev)
    sizes = [SizeInfo.uncropped(setting.res, setting.res)] * b
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = None
    for step in range(steps + 1):
        if step == 1:
            sync()
            t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=dtype, enabled=setting.precision != "fp32"):
            with torch.set_grad_enabled(setting.train_te):
                hidden = [te(ids, output_hidden_states=True).hidden_states[-2] for te in tes]
                pooled = tes[-1](ids).text_embeds if setting.family == "sdxl" else None
            cond = torch.cat(hidden, dim=-1) if setting.family == "sdxl" else hidden[0]
            kw = {}
            if setting.family == "sdxl":
                kw["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": torch.tensor(
                    [s.as_row() for s in sizes], device=dev, dtype=dtype)}
            if not setting.cache_latents:
                with torch.no_grad():
                    vae.encode(torch.randn(b, 3, setting.res, setting.res, device=dev, dtype=vae.dtype))
            out = unet(x.to(dtype), torch.full((b,), 500, device=dev), cond.to(dtype), **kw).sample
            loss = out.float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    elapsed = time.perf_counter() - t0
    return {"setting": setting.label(), "family": setting.family, "resolution": setting.res,
            "kind": "measured" if cuda else "timed only",
            "total_gib": torch.cuda.max_memory_allocated() / GIB if cuda else float("nan"),
            "samples_per_s": steps * b / elapsed, "device": torch.cuda.get_device_name(0) if cuda else str(dev)}


# ------------------------------------------------------------------ the README table
TABLE_SETTINGS = {
    "sd1": [Setting("sd1", precision="fp16", batch=1, gradient_checkpointing=True, fp8_base=True,
                    optimizer="AdamW8bit", rank=16),
            Setting("sd1", precision="fp16", batch=1, gradient_checkpointing=True, rank=32),
            Setting("sd1", precision="fp16", batch=2, rank=32, train_te=True),
            Setting("sd1", precision="bf16", batch=4, rank=64, train_te=True),
            Setting("sd1", precision="bf16", batch=8, rank=128, train_te=True)],
    "sdxl": [Setting("sdxl", precision="bf16", batch=1, gradient_checkpointing=True, fp8_base=True,
                     cache_te=True, optimizer="Adafactor", rank=8),
             Setting("sdxl", precision="bf16", batch=1, gradient_checkpointing=True, cache_te=True, rank=16,
                     optimizer="AdamW8bit"),
             Setting("sdxl", precision="bf16", batch=1, gradient_checkpointing=True, rank=32),
             Setting("sdxl", precision="bf16", batch=2, gradient_checkpointing=True, rank=32, train_te=True),
             Setting("sdxl", precision="bf16", batch=2, rank=32, train_te=True)],
}
CARDS = (8, 12, 16, 24)


def table(cuda: bool) -> str:
    cache: dict = {}
    lines = ["| family | setting | " + " | ".join(f"{c} GB" for c in CARDS) + " | peak |",
             "| --- | --- | " + " | ".join("---" for _ in CARDS) + " | --- |"]
    for fam, settings in TABLE_SETTINGS.items():
        for s in settings:
            r = measure(s) if cuda else estimate(s, cache)
            mark = "M" if r["kind"] == "measured" else "E"
            # a card of N GB has about N * 0.93 GiB usable
            cells = [("fits" if r["total_gib"] <= c * 0.93 else "no") + f" ({mark})" for c in CARDS]
            name = "SD 1.5 512 px" if fam == "sd1" else "SDXL 1024 px"
            lines.append(f"| {name} | {s.label()} | " + " | ".join(cells) + f" | {r['total_gib']:.1f} GiB |")
            print(lines[-1], r, file=sys.stderr, flush=True)
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", choices=("sd1", "sdxl"), default="sd1")
    ap.add_argument("--resolution", type=int, default=0)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="bf16")
    ap.add_argument("--full", action="store_true", help="full_fp16 / full_bf16")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--fp8-base", action="store_true")
    ap.add_argument("--no-cache-latents", action="store_true")
    ap.add_argument("--cache-te", action="store_true")
    ap.add_argument("--train-te", action="store_true")
    ap.add_argument("--optimizer", default="AdamW")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default=None, help="run real steps on this device (default: cuda if present); "
                    "the models are full size, so on cpu this needs many GB of RAM")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    cuda = torch.cuda.is_available()
    if a.table:
        print(table(cuda))
        print("\nM = measured on " + (torch.cuda.get_device_name(0) if cuda else "-")
              + "; E = estimated (no GPU: see bench/memory.py for the method)")
        return 0
    s = Setting(a.family, a.resolution, a.batch, a.precision, a.full, a.gradient_checkpointing, a.fp8_base,
                not a.no_cache_latents, a.cache_te, a.train_te, a.optimizer, a.rank)
    r = measure(s, a.steps, a.device or "cuda") if (cuda or a.device) else estimate(s)
    if r["kind"] == "estimated":
        print("ESTIMATE (no CUDA device): weights / LoRA / gradients / optimizer from exact parameter counts, "
              "activations calibrated on CPU at 1/4 width and small resolutions, +0.8 GiB assumed overhead")
    for k, v in r.items():
        print(f"{k:>16}: {v:.3f}" if isinstance(v, float) else f"{k:>16}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
