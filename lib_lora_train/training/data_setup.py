"""From a TrainConfig to the dataset layer: which datasets, the step plan, latents and captions per batch."""
from __future__ import annotations

import hashlib
import os
import random

import torch

from ..config import TrainConfig
from ..dataset import (LatentCache, TrainingData, datasets_from_config_file, datasets_from_folders,
                       load_item_tensor, plan_steps_for_data, process_caption, random_crop_offsets)
from ..errors import ConfigError, DataError
from ..models.conditioning import vae_scale_factor
from ..events import LOG, WARNING, Event

# TrainConfig fields that are dataset options under the same sd-scripts names.
_GENERAL_KEYS = ("train_batch_size", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
                 "bucket_no_upscale", "caption_extension", "shuffle_caption", "keep_tokens", "keep_tokens_separator",
                 "caption_separator", "secondary_separator", "enable_wildcard", "caption_prefix", "caption_suffix",
                 "caption_dropout_rate", "caption_dropout_every_n_epochs", "caption_tag_dropout_rate",
                 "token_warmup_min", "token_warmup_step", "flip_aug", "random_crop", "dataset_repeats",
                 "validation_split", "validation_seed")


def general_from_config(cfg: TrainConfig) -> dict:
    general = {k: getattr(cfg, k) for k in _GENERAL_KEYS}
    general["resolution"] = list(cfg.resolution_wh)
    return general


def datasets_for_config(cfg: TrainConfig):
    """(list of DatasetParams, folder_mode)."""
    general = general_from_config(cfg)
    if cfg.dataset_config:
        return datasets_from_config_file(cfg.dataset_config, general), False
    if not cfg.train_data_dir:
        raise ConfigError("no dataset: set train_data_dir (folder of N_name subfolders) or dataset_config")
    return datasets_from_folders(cfg.train_data_dir, cfg.reg_data_dir, general), True


def _check_folders(cfg: TrainConfig, emit) -> None:
    """The dataset check (`python -m lib_lora_train check`) before every folder-mode run."""
    from ..prep.check import check_dataset
    report = check_dataset(cfg.train_data_dir, cfg.reg_data_dir, caption_extension=cfg.caption_extension,
                           workers=1, with_summary=False,
                           min_side=min(256, *cfg.resolution_wh))   # smaller is fine when training small
    if not report.can_train:
        raise DataError(report.summary_text())
    if emit is not None:
        for issue in report.all_issues:
            if issue.severity != "info":
                where = f"{issue.path}: " if issue.path else ""
                emit(Event(WARNING, {"message": f"{where}{issue.message}", "code": issue.code}))


def build_training_data(cfg: TrainConfig, emit=None):
    if not cfg.dataset_config and cfg.train_data_dir:
        _check_folders(cfg, emit)
    datasets, folder_mode = datasets_for_config(cfg)
    data = TrainingData(datasets, seed=cfg.seed_value)
    data.set_prior_loss_weight(cfg.prior_loss_weight)
    if emit is not None:
        for msg in data.warnings + _prior_warnings(cfg, data):
            emit(Event(WARNING, {"message": msg}))
    return data, folder_mode


def _prior_warnings(cfg: TrainConfig, data) -> list[str]:
    """A prior_loss_weight changed from sd-scripts' 1.0 (the "concept" preset's 2) acts on regularisation images
    only: without them it silently does nothing, and the run it was tuned for changes what the model draws."""
    if cfg.prior_loss_weight == 1.0 or any(item.is_reg for item in data.items):
        return []
    return [f"prior_loss_weight = {cfg.prior_loss_weight:g} but there are no regularisation images, so nothing "
            f"preserves the prior: without them a LoRA tuned for prior preservation (the \"concept\" preset) also "
            f"changes pictures without the trigger word. Add reg_data_dir (a folder of class images) or "
            f"reg_images_prompt (a class prompt; the model draws them)"]


def plan_for_config(cfg: TrainConfig, num_processes: int | None = None):
    """The step plan of a config without loading any model (the `steps` command, the UI's estimate).
    num_processes: of a torchrun / accelerate launch run (None: WORLD_SIZE of this process, else 1)."""
    from .distributed import env_world_size
    data, _ = build_training_data(cfg)
    return plan_steps_for_data(data, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                               max_train_epochs=cfg.max_train_epochs, max_train_steps=cfg.max_train_steps,
                               num_processes=num_processes or env_world_size())


def captions_for(data: TrainingData, batch, *, epoch: int, step: int, max_steps: int,
                 rng: random.Random) -> list[str]:
    """The processed caption of every sample of a batch (epoch is 0-based here, 1-based for sd-scripts rules)."""
    return [process_caption(s.item.caption, s.item.subset, epoch=epoch + 1, step=step, max_steps=max_steps,
                            rng=rng) for s in batch.samples]


def _content_seed(images: torch.Tensor) -> int:
    # The VAE's posterior is sampled with noise that depends only on the image, so a latent is the same
    # whether it was encoded now, cached earlier, or re-encoded after a resume.
    digest = hashlib.sha256(images.detach().to("cpu", torch.float32).numpy().tobytes()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def make_encoder(model, device: torch.device):
    vae, scale = model.vae, model.info.latent_scale

    def encode(images: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator().manual_seed(_content_seed(images))
        with torch.no_grad():
            dist = vae.encode(images.to(device, vae.dtype)).latent_dist
            noise = torch.randn(dist.mean.shape, generator=gen, dtype=torch.float32).to(device, dist.mean.dtype)
            return ((dist.mean + dist.std * noise) * scale).float()
    return encode


def vae_identity(model) -> str:
    """A cheap fingerprint of the VAE weights, so a changed VAE never reuses old cached latents."""
    info = model.info
    h = hashlib.sha256(f"{info.name}|{model.vae.dtype}|{info.family}|{info.latent_scale}".encode())
    for i, (name, p) in enumerate(model.vae.state_dict().items()):
        if i % 8 == 0:
            h.update(name.encode())
            h.update(p.detach().flatten()[:256].to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()[:24]


class LatentSource:
    """Latents of a batch: from the cache when cache_latents is on, else encoded on the fly."""

    def __init__(self, cfg: TrainConfig, data: TrainingData, model, device: torch.device, emit=None):
        self.encode = make_encoder(model, device)
        self.cache = None
        self.random_crop = any(s.random_crop for ds in data.datasets for s in ds.subsets)
        if cfg.cache_latents or cfg.cache_latents_to_disk:
            cache_dir = None
            if cfg.cache_latents_to_disk:
                cache_dir = cfg.latents_cache_dir or os.path.join(cfg.output_dir, ".latents")
            self.cache = LatentCache(self.encode, vae_identity(model), cache_dir=cache_dir,
                                     batch_size=cfg.vae_batch_size, family=model.info.family,
                                     downscale=vae_scale_factor(model))

            def progress(done: int, total: int) -> None:
                if emit is not None and (done == total or done % 16 == 0):
                    emit(Event(LOG, {"message": f"caching latents {done}/{total}"}))
            self.cache.prepare(data.items, on_progress=progress)
            if emit is not None:
                emit(Event(LOG, {"message": f"latent cache: {self.cache.stats.as_dict()}"}))

    def get_batch(self, batch, gen: torch.Generator) -> torch.Tensor:
        if self.cache is not None:
            return torch.stack([self.cache.get(s.item, s.flipped) for s in batch.samples])
        rng = random.Random(int(torch.randint(0, 2 ** 62, (1,), generator=gen)))
        images = []
        for s in batch.samples:
            crop = random_crop_offsets(s.item, rng) if s.item.subset.random_crop else None
            images.append(load_item_tensor(s.item, flip=s.flipped, crop=crop))
        return self.encode(torch.stack(images))


def make_latent_source(cfg: TrainConfig, data: TrainingData, model, device: torch.device, emit=None):
    return LatentSource(cfg, data, model, device, emit)
