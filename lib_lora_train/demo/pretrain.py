"""Pre-train the demo's tiny SD1-shaped base model from scratch on the synthetic shape world (CPU).

    python -m lib_lora_train.demo.pretrain [--out PATH] [--minutes N] [--preview PNG]

1. a tiny AutoencoderKL (SD1 layout: 4 levels, latent 1/8, 4 channels) learns to reconstruct world images and
   uncaptioned random shapes; its latents are then normalised in place (folded into quant_conv /
   post_quant_conv) so that latents x 0.18215 have unit variance, as SD1's do;
2. a tiny UNet2DConditionModel and a tiny CLIPTextModel learn epsilon prediction on SD1's noise schedule,
   conditioned on the world captions (10% empty);
3. the three are written as one SD1 single-file (ldm layout) fp16 safetensors and checked by loading the
   file with the engine's own loader.

Everything is seeded and fixed-step, so the same library versions and thread count rebuild the same file.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch

from . import world

DEFAULT_OUT = Path(__file__).with_name("tiny_base.safetensors")
REFERENCE_MINUTES = 57.0      # the default step counts on 2 idle cores: autoencoder ~30 min (1 thread), UNet ~27
LATENT_SCALE = 0.18215


@dataclass(frozen=True)
class PretrainConfig:
    seed: int = 0
    threads: int = 2              # the denoiser stage's torch threads
    vae_threads: int = 1          # the autoencoder stage's (its small convolutions gain little from more)
    # sizes (channel counts are multiples of 32: the loader assumes 32 GroupNorm groups)
    vae_channels: tuple[int, ...] = (32, 32, 64, 64)
    vae_layers: int = 1
    unet_channels: tuple[int, ...] = (32, 64, 64, 64)
    unet_layers: int = 1
    text_hidden: int = 64         # one head of 64, as the loader infers heads = hidden // 64
    text_layers: int = 3
    text_intermediate: int = 256
    # data
    world_images: int = 6000
    generic_images: int = 3000
    # autoencoder: most steps on 32 px crops (4x cheaper), then full images
    vae_crop_steps: int = 6000
    vae_full_steps: int = 900
    vae_batch: int = 16
    vae_crop: int = 32
    vae_lr: float = 2e-3
    kl_weight: float = 1e-4
    edge_weight: float = 0.5      # L1 on image gradients too: sharper edges than plain L1
    # denoiser
    unet_steps: int = 5000
    unet_batch: int = 48
    unet_lr: float = 1e-3
    caption_dropout: float = 0.1

    def scaled(self, minutes: float) -> "PretrainConfig":
        f = minutes / REFERENCE_MINUTES
        return replace(self, vae_crop_steps=max(10, round(self.vae_crop_steps * f)),
                       vae_full_steps=max(10, round(self.vae_full_steps * f)),
                       unet_steps=max(10, round(self.unet_steps * f)))

    @property
    def vae_steps(self) -> int:
        return self.vae_crop_steps + self.vae_full_steps


def _log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------- modules

def build_modules(cfg: PretrainConfig):
    """Fresh (unet, vae, text_encoder) with SD1's structure at tiny sizes, initialised from cfg.seed."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(cfg.seed)
    n = len(cfg.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=world.IMAGE_SIZE // 8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        block_out_channels=cfg.unet_channels, layers_per_block=cfg.unet_layers,
        attention_head_dim=8, cross_attention_dim=cfg.text_hidden, norm_num_groups=32)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_channels), block_out_channels=cfg.vae_channels,
        layers_per_block=cfg.vae_layers, latent_channels=4, norm_num_groups=32, sample_size=world.IMAGE_SIZE,
        scaling_factor=LATENT_SCALE)
    te = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=cfg.text_hidden, intermediate_size=cfg.text_intermediate,
        num_hidden_layers=cfg.text_layers, num_attention_heads=max(1, cfg.text_hidden // 64),
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=cfg.text_hidden,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    return unet, vae, te


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def _cosine(step: int, total: int, warmup: int) -> float:
    return min(1.0, (step + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * step / total))


# ---------------------------------------------------------------- autoencoder

def _edges(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[:, :, 1:, :] - x[:, :, :-1, :], x[:, :, :, 1:] - x[:, :, :, :-1]


def train_vae(vae, images: torch.Tensor, cfg: PretrainConfig) -> None:
    """L1 reconstruction (+ L1 on image gradients) + a small KL term; random crops first, full images last."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, cfg.vae_steps, 100))
    side = images.shape[-1]
    vae.train()
    t0 = time.time()
    for step in range(cfg.vae_steps):
        x = images[torch.randint(0, len(images), (cfg.vae_batch,), generator=gen)]
        if step < cfg.vae_crop_steps and cfg.vae_crop < side:
            # crops on the 8 px latent grid, so the encoder sees the same alignment as on full images
            ox, oy = (torch.randint(0, (side - cfg.vae_crop) // 8 + 1, (2,), generator=gen) * 8).tolist()
            x = x[:, :, oy:oy + cfg.vae_crop, ox:ox + cfg.vae_crop]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        l1 = (rec - x).abs().mean()
        kl = post.kl().mean() / z[0].numel()
        loss = l1 + cfg.kl_weight * kl
        if cfg.edge_weight:
            (ry, rx), (xy, xx) = _edges(rec), _edges(x)
            loss = loss + cfg.edge_weight * ((ry - xy).abs().mean() + (rx - xx).abs().mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 200 == 0 or step + 1 == cfg.vae_steps:
            _log(f"  vae step {step + 1}/{cfg.vae_steps}  l1 {l1.item():.4f}  kl {kl.item():.3f}  "
                 f"{time.time() - t0:.0f}s")
    vae.eval()


@torch.no_grad()
def encode_means(vae, images: torch.Tensor, batch: int = 128) -> torch.Tensor:
    return torch.cat([vae.encode(images[i:i + batch]).latent_dist.mean for i in range(0, len(images), batch)])


@torch.no_grad()
def normalise_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Fold a per-channel shift and scale into quant_conv / post_quant_conv so that latents x 0.18215 have
    zero mean and unit variance; the decoder's output is unchanged. Returns the transformed latents."""
    mu = latents.mean(dim=(0, 2, 3))
    s = 1.0 / (LATENT_SCALE * latents.std(dim=(0, 2, 3)))
    c = len(mu)
    q, pq = vae.quant_conv, vae.post_quant_conv
    # quant_conv: [mean; logvar] = W x + b.  new mean = s * (mean - mu), new logvar = logvar + 2 log s
    q.weight[:c] *= s.view(c, 1, 1, 1)
    q.bias[:c] = (q.bias[:c] - mu) * s
    q.bias[c:] += 2.0 * torch.log(s)
    # post_quant_conv sees z' = s (z - mu): W z + b = (W / s) z' + (b + W mu)
    pq.bias += (pq.weight[:, :, 0, 0] @ mu)
    pq.weight /= s.view(1, c, 1, 1)
    return (latents - mu.view(1, c, 1, 1)) * s.view(1, c, 1, 1)


# ---------------------------------------------------------------- denoiser

def train_denoiser(unet, te, tokenizer, latents: torch.Tensor, captions: list[str], cfg: PretrainConfig,
                   every: Callable[[int], None] | None = None) -> None:
    """Epsilon prediction on SD1's DDPM schedule, UNet and text encoder together. `every(step)` is called
    each 500 steps (previews during experiments)."""
    from diffusers import DDPMScheduler

    from ..models.text import encode_tokens, tokenize

    sched_ddpm = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                               beta_schedule="scaled_linear", clip_sample=False)
    vocab = sorted(set(captions)) + [""]
    ids = tokenize(tokenizer, vocab)                         # [V, 1, 77]
    caption_index = torch.tensor([vocab.index(c) for c in captions])
    empty = len(vocab) - 1
    holder = SimpleNamespace(text_encoder=te)

    gen = torch.Generator().manual_seed(cfg.seed + 2)
    params = [*unet.parameters(), *te.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, betas=(0.9, 0.99), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, cfg.unet_steps, 200))
    alphas = sched_ddpm.alphas_cumprod
    unet.train()
    te.train()
    t0 = time.time()
    running = 0.0
    for step in range(cfg.unet_steps):
        pick = torch.randint(0, len(latents), (cfg.unet_batch,), generator=gen)
        x0 = latents[pick] * LATENT_SCALE
        cap = caption_index[pick].clone()
        cap[torch.rand(cfg.unet_batch, generator=gen) < cfg.caption_dropout] = empty
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (cfg.unet_batch,), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        uniq, inverse = torch.unique(cap, return_inverse=True)      # encode each caption once per batch
        cond = encode_tokens(holder, ids[uniq])[inverse]
        pred = unet(xt, t, cond).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        running += loss.item()
        if (step + 1) % 200 == 0 or step + 1 == cfg.unet_steps:
            n = 200 if (step + 1) % 200 == 0 else (step + 1) % 200
            _log(f"  unet step {step + 1}/{cfg.unet_steps}  loss {running / n:.4f}  {time.time() - t0:.0f}s")
            running = 0.0
        if every is not None and (step + 1) % 500 == 0:
            every(step + 1)
    unet.eval()
    te.eval()


# ---------------------------------------------------------------- file

def ldm_state_dict(unet, vae, te, dtype=torch.float16) -> dict[str, torch.Tensor]:
    from ..models.convert import diffusers_to_ldm

    sd = diffusers_to_ldm(unet.state_dict(), vae.state_dict(), te.state_dict())
    return {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous()
            for k, v in sd.items() if not k.endswith("position_ids")}


def file_metadata(cfg: PretrainConfig) -> dict[str, str]:
    import diffusers
    import transformers

    return {
        "lib_lora_train.demo": "tiny SD1-shaped base model (UNet + VAE + CLIP text encoder) pre-trained from "
                               "scratch on lib_lora_train.demo.world: one circle / square / triangle in red, "
                               "green, blue, yellow, white or black on a plain background of another of those "
                               "colours, 64x64 px, captions like 'red circle, blue background'",
        "rebuild": "python -m lib_lora_train.demo.pretrain --out lib_lora_train/demo/tiny_base.safetensors",
        "pretrain_config": json.dumps(asdict(cfg)),
        "versions": json.dumps({"torch": torch.__version__, "diffusers": diffusers.__version__,
                                "transformers": transformers.__version__}),
        "resolution": str(world.IMAGE_SIZE),
    }


@torch.no_grad()
def check_loaded(path: Path, unet, vae, te) -> float:
    """Load the file with the engine's loader and compare with the trained modules (rounded to fp16 like
    the file). Returns the largest relative difference seen."""
    from ..models import load_sd_model

    model = load_sd_model(path, dtype=torch.float32)
    gen = torch.Generator().manual_seed(123)
    ids = torch.randint(0, 49406, (2, 77), generator=gen)
    lat = torch.randn(2, 4, 8, 8, generator=gen)
    img = torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1
    t = torch.tensor([10, 700])
    worst = 0.0
    for mine, theirs in ((te, model.text_encoder), (unet, model.unet), (vae, model.vae)):
        ref = {k: v.half().float() if v.is_floating_point() else v for k, v in mine.state_dict().items()}
        mine.load_state_dict(ref)
    pairs = [(te(ids)[0], model.text_encoder(ids)[0])]
    cond = pairs[0][0]
    pairs.append((unet(lat, t, cond).sample, model.unet(lat, t, cond).sample))
    pairs.append((vae.decode(lat).sample, model.vae.decode(lat).sample))
    pairs.append((vae.encode(img).latent_dist.mean, model.vae.encode(img).latent_dist.mean))
    for a, b in pairs:
        worst = max(worst, ((a - b).abs().max() / (a.abs().max() + 1e-8)).item())
    return worst


def write_preview(path: Path, out: Path, seed: int = 1) -> None:
    """Sample a few world prompts from the saved file into a labelled grid (for looking at)."""
    from ..models import load_sd_model
    from ..sampling.grid import make_grid, save_png_with_text
    from ..sampling.pipeline import generate
    from ..sampling.prompts import parse_prompt_line
    from .toy import TOKEN

    model = load_sd_model(path)
    prompts = ["red circle, white background", "blue square, yellow background", "green triangle, black background",
               "yellow circle, blue background", "white square, red background", "black triangle, green background",
               f"{TOKEN}, white background", ""]
    rows = []
    for scale in (1.0, 5.0):
        specs = [parse_prompt_line(f"{p} --w 64 --h 64 --s 20 --l {scale} --d {seed + i}")
                 for i, p in enumerate(prompts)]
        rows.append(generate(model, specs, default_size=world.IMAGE_SIZE))
    grid = make_grid(rows, [f"cfg {s:g}" for s in (1.0, 5.0)], [p or "(empty)" for p in prompts],
                     title=f"{path.name}: DPM++ 2M Karras, 20 steps", min_cell=128)
    save_png_with_text(grid, out, {"parameters": "demo base model preview"})


# ---------------------------------------------------------------- main

def _stage_file(work: Path | None, cfg: PretrainConfig) -> Path | None:
    """Where the finished autoencoder stage is kept, keyed by everything it depends on (so a rerun after an
    interruption skips it, and a changed config never reuses a stale one)."""
    if work is None:
        return None
    import hashlib
    vae_keys = {k: v for k, v in asdict(cfg).items() if k.startswith(("vae_", "world_", "generic_", "kl_", "edge_"))
                or k == "seed"}
    digest = hashlib.sha256(json.dumps(vae_keys, sort_keys=True).encode()).hexdigest()[:12]
    return work / f"vae_stage_{digest}.pt"


def pretrain(cfg: PretrainConfig, out: Path, preview: Path | None = None, work: Path | None = None) -> Path:
    from ..models.ckpt import save_checkpoint
    from ..models.tokenizer import clip_tokenizer

    start = time.time()
    _log(f"building the shape world ({cfg.world_images} captioned + {cfg.generic_images} generic images)")
    w_images, captions = world.world_array(cfg.world_images, seed=cfg.seed)
    generic = world.generic_array(cfg.generic_images, seed=cfg.seed + 1)
    world_t = _to_tensor(w_images)
    unet, vae, te = build_modules(cfg)

    stage = _stage_file(work, cfg)
    if stage is not None and stage.exists():
        saved = torch.load(stage, weights_only=True)
        vae.load_state_dict(saved["vae"])
        vae.eval()
        latents = saved["latents"]
        _log(f"autoencoder stage reused from {stage}")
    else:
        _log(f"training the autoencoder: {cfg.vae_steps} steps")
        torch.set_num_threads(cfg.vae_threads)
        train_vae(vae, torch.cat([world_t, _to_tensor(generic)]), cfg)
        latents = normalise_latents(vae, encode_means(vae, world_t))
        if stage is not None:
            stage.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"vae": vae.state_dict(), "latents": latents}, stage)
    for p in vae.parameters():
        p.requires_grad_(False)
    _log(f"  latents x {LATENT_SCALE}: std {(latents * LATENT_SCALE).std().item():.3f}   "
         f"{time.time() - start:.0f}s so far")

    _log(f"training the UNet and text encoder: {cfg.unet_steps} steps")
    torch.set_num_threads(cfg.threads)
    train_denoiser(unet, te, clip_tokenizer(), latents, captions, cfg)

    save_checkpoint(out, ldm_state_dict(unet, vae, te), file_metadata(cfg), overwrite=True)
    minutes = (time.time() - start) / 60
    _log(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) after {minutes:.1f} min of training")
    diff = check_loaded(out, unet, vae, te)
    _log(f"load_sd_model reproduces the trained modules: max relative difference {diff:.2e}")
    if diff > 1e-3:
        raise RuntimeError(f"the saved file does not reproduce the trained modules (difference {diff:.2e})")
    if preview is not None:
        write_preview(out, preview)
        _log(f"preview grid: {preview}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lib_lora_train.demo.pretrain", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output file (default: {DEFAULT_OUT})")
    ap.add_argument("--minutes", type=float, default=None,
                    help=f"scale the step counts from the reference {REFERENCE_MINUTES:g} minutes (for quick trials)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (results can depend on it)")
    ap.add_argument("--preview", type=Path, default=None, help="also write a PNG grid of samples")
    ap.add_argument("--work", type=Path, default=None,
                    help="keep the finished autoencoder stage here, so an interrupted build restarts at the UNet")
    args = ap.parse_args(argv)
    cfg = PretrainConfig(seed=args.seed, threads=args.threads)
    if args.minutes is not None:
        cfg = cfg.scaled(args.minutes)
    pretrain(cfg, args.out, args.preview, args.work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
