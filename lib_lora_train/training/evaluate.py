"""Denoising loss at fixed noise and timesteps: comparable between epochs, runs and LoRA multipliers.

The same (image, noise, timestep) triples are used every time, so a lower number means the model (with its
network at the current multiplier) predicts the noise of these images better, and nothing else.

`Validator` is the training loop's validation loss (sd-scripts' validation_split / validate_every_n_epochs /
validate_every_n_steps / max_validation_steps / validation_seed):
- images: the held-out split when there is one, else (validation_fallback) up to 8 training images, and the run
  record says which;
- timesteps: sd-scripts' four, evenly inside [min_timestep, max_timestep] (200, 400, 600, 800 by default);
- noise: seeded by each image's latent and validation_seed (a constant when unset, not the training seed, so
  runs with different seeds are measured on the same noise);
- loss: plain mean squared error against the model's target, whatever loss_type / min-SNR training used;
- it never touches the training random streams (its own generators; the global RNG state is put back) and
  switches the network's dropout off while it measures, so training and resume stay bit-identical.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..models.conditioning import SizeInfo, compute_dtype, effective_clip_skip, unet_inputs, vae_scale_factor
from .noise import compute_loss, target_for

VALIDATION_TIMESTEPS = 4          # as sd-scripts (its NUM_VALIDATION_TIMESTEPS)
FALLBACK_MAX_IMAGES = 8           # training images measured when nothing is held out: 8 x 4 timesteps keeps
                                  # a validation at about a dozen steps' cost (it runs beside every epoch)
NOISE_SEED = 0                    # the noise seed when validation_seed is unset
SMALL_LATENTS_BATCH = 2048        # latent pixels one no-grad U-Net call may take when latents are small (32
                                  # latents of 64 px images): see `eval_batch_size`


@torch.no_grad()
def fixed_denoising_loss(model, latents: torch.Tensor, captions: list[str], *, seed: int = 0,
                         timesteps_per_image: int = 4, clip_skip: int | None = None,
                         batch_size: int = 8) -> float:
    """Mean loss over `timesteps_per_image` evenly spread timesteps per latent, with seeded noise."""
    from ..models import encode_text
    device = model.unet.device
    sched = model.noise_scheduler
    dtype = compute_dtype(model.unet)
    n_train = sched.config.num_train_timesteps
    # evenly spread timesteps (offset per image so every image sees different ones), seeded noise
    gen = torch.Generator().manual_seed(seed)
    items = []
    for i in range(latents.shape[0]):
        for k in range(timesteps_per_image):
            t = int((k + (i * 0.618) % 1.0) / timesteps_per_image * n_train) % n_train
            items.append((i, t, torch.randn(latents.shape[1:], generator=gen)))
    total, count = 0.0, 0
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        lat = torch.stack([latents[i] for i, _, _ in chunk]).to(device, torch.float32)
        noise = torch.stack([n for _, _, n in chunk]).to(device)
        ts = torch.tensor([t for _, t, _ in chunk], device=device, dtype=torch.long)
        cond = encode_text(model, [captions[i] for i, _, _ in chunk], clip_skip=clip_skip, device=device)
        noisy = sched.add_noise(lat, noise, ts)
        f = vae_scale_factor(model)
        sizes = [SizeInfo.uncropped(lat.shape[2] * f, lat.shape[3] * f)] * len(chunk)
        pred = model.unet(noisy.to(dtype), ts, **unet_inputs(model, cond, sizes, dtype)).sample
        target = target_for(sched, lat, noise, ts, model.info.prediction_type)
        loss = compute_loss(pred.float(), target.float())
        total += float(loss.sum())
        count += loss.shape[0]
    return total / max(count, 1)


# ---------------------------------------------------------------------------- the validation loss

@dataclass
class EvalItem:
    """One validation image: its latent [C, H, W], the caption it is conditioned on, its noise seed, and its
    SDXL size conditioning (None: uncropped at the latent's size)."""
    latent: torch.Tensor
    caption: str
    seed: int
    size: SizeInfo | None = None

    def size_info(self) -> SizeInfo:
        return self.size or SizeInfo.uncropped(self.latent.shape[1] * 8, self.latent.shape[2] * 8)   # real VAEs: 8


def validation_timesteps(num_train_timesteps: int, min_timestep: int | None = None,
                         max_timestep: int | None = None, count: int = VALIDATION_TIMESTEPS) -> list[int]:
    """sd-scripts' choice: `count` timesteps evenly inside [min, max], the two ends left out."""
    lo = 0 if min_timestep is None else int(min_timestep)
    hi = num_train_timesteps if max_timestep is None else int(max_timestep)
    step = (hi - lo) / (count + 1)
    return [min(num_train_timesteps - 1, int(lo + k * step)) for k in range(1, count + 1)]


def latent_seed(latent: torch.Tensor, base_seed: int) -> int:
    """The noise seed of an image: a function of its latent and the base seed only (not of its position)."""
    h = hashlib.sha256(str(int(base_seed)).encode())
    h.update(latent.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "little") >> 1


def eval_batch_size(batch_size: int, samples: int, latent_shape: Sequence[int],
                    small_latents: int | None = None) -> int:
    """How many (image, timestep) samples of one latent size go through the U-Net together: `batch_size`, or, for
    small latents, as many as fit `small_latents` latent pixels (at most all of them). A U-Net call's fixed cost
    (hundreds of small kernels and Python) dominates small latents: 32 samples of 64 px SD 1.5 took 21.9 s of
    CPU at batch 4 and 9.3 s in one call, the same number. The budget keeps such a call to the activations of
    one ~360 px image without gradients, well inside what a training step holds."""
    if not small_latents:
        return batch_size
    pixels = max(1, int(latent_shape[-1]) * int(latent_shape[-2]))
    return max(batch_size, min(samples, small_latents // pixels))


@torch.no_grad()
def denoising_loss(model, items: Sequence[EvalItem], timesteps: Sequence[int], *, clip_skip: int | None = None,
                   max_token_length: int | None = None, batch_size: int = 8, small_latents: int | None = None,
                   autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                   scheduler=None) -> float:
    """Mean squared error of the model's prediction over every (item, timestep), at each item's fixed noise.

    Uses whatever network is applied to the model right now, in the modes the modules are in (see
    `evaluation_mode`). Items of different latent sizes (buckets) are batched separately, `batch_size` at a time
    (more for small latents with `small_latents`: see `eval_batch_size`); the number does not depend on it.
    """
    from ..models import TextConditioning, encode_text
    if not items:
        raise ValueError("denoising_loss needs at least one item")
    device = model.unet.device
    sched = scheduler if scheduler is not None else model.noise_scheduler
    dtype = compute_dtype(model.unet)
    autocast = autocast or contextlib.nullcontext
    # each item's caption is encoded once per evaluation (the text encoder may carry the network)
    conds: dict[str, TextConditioning] = {}
    for cap in dict.fromkeys(it.caption for it in items):
        with autocast():
            conds[cap] = encode_text(model, [cap], clip_skip=clip_skip, max_token_length=max_token_length,
                                     device=device)
    work: dict[tuple, list[tuple[EvalItem, int, torch.Tensor]]] = {}
    for it in items:
        gen = torch.Generator().manual_seed(it.seed)
        for t in timesteps:
            noise = torch.randn(it.latent.shape, generator=gen, dtype=torch.float32)
            work.setdefault(tuple(it.latent.shape), []).append((it, int(t), noise))
    total, count = 0.0, 0
    for shape, group in work.items():
        size = eval_batch_size(batch_size, len(group), shape, small_latents)
        for start in range(0, len(group), size):
            chunk = group[start:start + size]
            lat = torch.stack([it.latent for it, _, _ in chunk]).to(device, torch.float32)
            noise = torch.stack([n for _, _, n in chunk]).to(device)
            ts = torch.tensor([t for _, t, _ in chunk], device=device, dtype=torch.long)
            rows = [conds[it.caption] for it, _, _ in chunk]
            cond = TextConditioning(hidden=torch.cat([r.hidden for r in rows]),
                                    pooled=None if rows[0].pooled is None else torch.cat([r.pooled for r in rows]))
            sizes = [it.size_info() for it, _, _ in chunk]
            with autocast():
                noisy = sched.add_noise(lat, noise, ts)
                pred = model.unet(noisy.to(dtype), ts, **unet_inputs(model, cond, sizes, dtype)).sample
            target = target_for(sched, lat, noise, ts, model.info.prediction_type)
            loss = compute_loss(pred.float(), target.float())
            total += float(loss.sum())
            count += loss.shape[0]
    return total / max(count, 1)


@contextlib.contextmanager
def evaluation_mode(modules: Sequence[torch.nn.Module]):
    """eval() (no dropout) for the duration; then every submodule's train flag and the global RNG (CPU and
    CUDA) exactly as they were, so a measurement never changes what training draws next."""
    modes = [(m, m.training) for mod in modules for m in mod.modules()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() \
        else None
    try:
        for mod in modules:
            mod.eval()
        yield
    finally:
        for m, training in modes:
            m.training = training
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def _plain_caption(item) -> str:
    """The caption as training sees it, minus everything random (dropout, shuffle, token warmup)."""
    from ..dataset import process_caption
    fixed = dataclasses.replace(item.subset, caption_dropout_rate=0.0, caption_dropout_every_n_epochs=0,
                                caption_tag_dropout_rate=0.0, shuffle_caption=False, token_warmup_step=0)
    return process_caption(item.caption, fixed, rng=random.Random(0))


def _spread(items: list, n: int) -> list:
    """n items evenly spread over the list (all when there are fewer)."""
    if len(items) <= n:
        return list(items)
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)] if n > 1 else items[:1]


def fallback_batches(data, batch_size: int, max_images: int = FALLBACK_MAX_IMAGES):
    """Training images (no regularization images) in a fixed order, grouped by bucket like validation_batches."""
    from ..dataset import Batch, Sample
    pool = sorted((it for it in data.items if not it.is_reg), key=lambda it: (it.dataset_index, it.path))
    chosen = _spread(pool, max_images)
    by_bucket: dict[tuple, list] = {}
    for it in chosen:
        by_bucket.setdefault((it.dataset_index, it.bucket), []).append(it)
    batches = []
    for (di, bucket) in sorted(by_bucket):
        members = by_bucket[(di, bucket)]
        for start in range(0, len(members), batch_size):
            batches.append(Batch(di, bucket, [Sample(it, False) for it in members[start:start + batch_size]]))
    return batches


class Validator:
    """The loop's validation: which images, when, and one number per measurement (emitted as VALIDATION)."""

    def __init__(self, cfg, data, model, latents, emit, *, autocast=None, scheduler=None):
        from ..dataset import load_item_tensor
        from ..dataset.sizes import size_info
        from ..events import LOG, WARNING, Event
        self.cfg, self.model, self.emit, self.autocast = cfg, model, emit, autocast
        self.scheduler = scheduler             # the training schedule (zero_terminal_snr changes it)
        self.clip_skip = effective_clip_skip(model, cfg.clip_skip)[0]
        self.items: list[EvalItem] = []
        self.source = None
        self._last: tuple[int, float] | None = None
        self._start: list[torch.Tensor] | None = None   # the network's weights at step 0, until measured
        batches = data.validation_batches()
        if batches:
            self.source = "held_out"
        elif cfg.validation_fallback:
            batches = fallback_batches(data, cfg.train_batch_size)
            self.source = "training_images"
            if cfg.validation_split > 0:
                emit(Event(WARNING, {"message": f"validation_split = {cfg.validation_split} held out no image (too "
                                                f"few images per folder); the validation loss is measured on "
                                                f"training images instead"}))
        if not batches:
            return
        if cfg.max_validation_steps:
            batches = batches[:cfg.max_validation_steps]
        base_seed = NOISE_SEED if cfg.validation_seed is None else int(cfg.validation_seed)
        cache = getattr(latents, "cache", None)
        for batch in batches:
            for s in batch.samples:
                if cache is not None and s.item in cache:
                    lat = cache.get(s.item, False)
                else:
                    lat = latents.encode(load_item_tensor(s.item).unsqueeze(0))[0]
                lat = lat.detach().to("cpu", torch.float32)
                self.items.append(EvalItem(lat, _plain_caption(s.item), latent_seed(lat, base_seed),
                                           size_info(s.item, False)))
        self.seed = base_seed
        self.timesteps = validation_timesteps(model.noise_scheduler.config.num_train_timesteps,
                                              cfg.min_timestep, cfg.max_timestep)
        what = "held-out images" if self.source == "held_out" else "training images (nothing is held out)"
        emit(Event(LOG, {"message": f"validation loss: {len(self.items)} {what}, timesteps {self.timesteps}"}))

    @property
    def enabled(self) -> bool:
        return bool(self.items)

    def due_epoch(self, epoch: int, is_last: bool) -> bool:
        n = self.cfg.validate_every_n_epochs
        return self.enabled and (n is None or epoch % n == 0 or is_last)

    def due_step(self, step: int) -> bool:
        n = self.cfg.validate_every_n_steps
        return self.enabled and bool(n) and step % n == 0

    @property
    def batch_size(self) -> int:
        """An image's timesteps go through the U-Net together: at batch 1, 4 forwards per call instead of 1, which
        is most of a measurement's cost where a call's fixed overhead dominates (small images, CPU). Without
        gradients a forward keeps one layer's activations, not the whole pass's, so max(batch, 4) stays inside the
        memory a training step at `train_batch_size` already needs. Small latents go in larger calls
        (`eval_batch_size`)."""
        return max(1, self.cfg.train_batch_size, len(self.timesteps))

    def measure(self, network) -> float:
        model = self.model
        encoders = list(getattr(model, "text_encoders", None) or [model.text_encoder])
        with evaluation_mode([model.unet, *encoders, network]):
            return denoising_loss(model, self.items, self.timesteps, clip_skip=self.clip_skip,
                                  max_token_length=self.cfg.max_token_length,
                                  batch_size=self.batch_size, small_latents=SMALL_LATENTS_BATCH,
                                  autocast=self.autocast,
                                  scheduler=self.scheduler)

    def defer_start(self, network) -> None:
        """The curve's starting point (step 0) without delaying the first step: a copy of the trained weights now
        (the network's size, not the model's), measured before the next measurement (or at `flush_start`) with
        those weights put back for the time of it. The same weights, images, noise and timesteps give the same
        number as measuring now; the training's weights and random streams are left exactly as they were."""
        self._start = [p.detach().clone() for p in _trained(network)]

    def flush_start(self, network) -> None:
        """Measure a deferred starting point now (a run stopped before its first measurement)."""
        if self._start is None:
            return
        params, start = _trained(network), self._start
        self._start = None
        if len(params) != len(start):
            raise RuntimeError("the network's trained parameters changed since the starting point was kept")
        now = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
            try:
                loss = self.measure(network)
            finally:
                for p, n in zip(params, now):
                    p.copy_(n)
        self._report(loss, at="start", epoch=0, step=0)

    def run(self, network, *, at: str, epoch: int, step: int) -> float:
        self.flush_start(network)
        if self._last is not None and self._last[0] == step:
            loss = self._last[1]            # same step, same weights (a step and an epoch end together)
        else:
            loss = self.measure(network)
        self._report(loss, at=at, epoch=epoch, step=step)
        return loss

    def _report(self, loss: float, *, at: str, epoch: int, step: int) -> None:
        from ..events import VALIDATION, Event
        self._last = (step, loss)
        self.emit(Event(VALIDATION, {"epoch": epoch, "step": step, "loss": loss, "at": at,
                                     "source": self.source, "images": len(self.items),
                                     "timesteps": list(self.timesteps), "seed": self.seed}))


def _trained(network) -> list[torch.Tensor]:
    """The parameters training changes (the frozen base model's weights are never among them)."""
    return [p for p in network.parameters() if p.requires_grad]
