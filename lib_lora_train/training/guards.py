"""What keeps a run from losing work when something goes wrong, and what it tells the user then.

- LossGuard: a NaN / inf loss stops the run within a few steps, says what probably caused it and which setting to
  change, and keeps the last good epoch's file (the loop hands it a callable that writes it).
- explain_failure: an out-of-memory error or a full disk becomes a message that names the settings or the fix.
- state_identity / check_state_identity: a saved state is resumed only by the run and model it came from.
- clean_leftovers: temporary files of a process killed in the middle of a save are removed at the next start.
"""
from __future__ import annotations

import errno
import math
import os
from typing import Any, Callable

from ..errors import ConfigError, TrainingFailed
from ..events import LOG, Event
from ..fsutil import remove_stale_temp_files

NON_FINITE_PATIENCE = 3      # consecutive non-finite losses tolerated while the weights are still finite


class LossGuard:
    """Stops a diverged run. One non-finite loss can be a bad batch; non-finite weights or three in a row cannot."""

    def __init__(self, cfg, patience: int = NON_FINITE_PATIENCE):
        self.cfg, self.patience = cfg, patience
        self.bad = 0

    def check(self, loss: float, step: int, epoch: int, network, keep: Callable[[], str | None] | None = None):
        if math.isfinite(loss):
            self.bad = 0
            return
        self.bad += 1
        if self.bad < self.patience and _finite_weights(network):
            return
        kept = keep() if keep is not None else None
        raise TrainingFailed(diverged_message(self.cfg, loss, step, epoch, kept))


def _finite_weights(network) -> bool:
    import torch
    return all(bool(torch.isfinite(p).all()) for p in network.parameters())


def diverged_message(cfg, loss: float, step: int, epoch: int, kept: str | None) -> str:
    what = "NaN" if math.isnan(loss) else "infinite"
    lrs = [f"learning_rate = {cfg.learning_rate:g}"]
    if cfg.unet_lr is not None:
        lrs.append(f"unet_lr = {cfg.unet_lr:g}")
    if cfg.text_encoder_lr is not None:
        lrs.append(f"text_encoder_lr = {cfg.text_encoder_lr}")
    msg = (f"training stopped: the loss became {what} at step {step} (epoch {epoch}) and the network weights "
           f"stopped being numbers. The usual cause is a learning rate too high for {cfg.optimizer_type} "
           f"({', '.join(lrs)}): lower it about 10x")
    if cfg.max_grad_norm in (None, 0, 0.0):
        msg += "; set max_grad_norm = 1.0 to clip the gradients"
    if cfg.mixed_precision == "fp16":
        msg += "; or use mixed_precision = \"bf16\" (fp16 overflows more easily)"
    if cfg.network_alpha and cfg.network_dim and cfg.network_alpha > cfg.network_dim:
        msg += f"; network_alpha ({cfg.network_alpha:g}) above network_dim ({cfg.network_dim}) also scales the " \
               f"updates up"
    msg += ". " + (f"The last good epoch is kept: {os.path.basename(kept)}." if kept else
                   "No epoch had completed yet, so there is no file to keep.")
    return msg


# ------------------------------------------------------------------ errors with a way out

def is_out_of_memory(exc: BaseException) -> bool:
    import torch
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def memory_advice(cfg) -> str:
    """The settings that lower GPU memory, with the run's current values."""
    tips = [f"a smaller train_batch_size (now {cfg.train_batch_size})",
            f"a lower resolution (now {cfg.resolution})"]
    if not cfg.gradient_checkpointing:
        tips.append("gradient_checkpointing = true")
    if not (cfg.cache_latents or getattr(cfg, "cache_latents_to_disk", False)):
        tips.append("cache_latents = true (the VAE then leaves the GPU)")
    if not (getattr(cfg, "cache_text_encoder_outputs", False) or not _trains_text_encoder(cfg)):
        tips.append("cache_text_encoder_outputs = true with network_train_unet_only = true")
    if not (cfg.fp8_base or getattr(cfg, "fp8_base_unet", False)):
        tips.append("fp8_base = true (the frozen base stored in 8 bits; needs mixed_precision fp16 or bf16)")
    if cfg.mixed_precision == "no":
        tips.append("mixed_precision = \"bf16\" or \"fp16\"")
    tips.append(f"a smaller network_dim (now {cfg.network_dim})")
    return "; ".join(tips)


def _trains_text_encoder(cfg) -> bool:
    return not getattr(cfg, "network_train_unet_only", False)


def explain_failure(exc: BaseException, cfg, *, step: int | None = None) -> TrainingFailed | None:
    """A clear TrainingFailed for an out-of-memory error or a full disk (None for anything else)."""
    if isinstance(exc, TrainingFailed):
        return None
    at = f" at step {step}" if step else ""
    if is_out_of_memory(exc):
        return TrainingFailed(f"out of GPU memory{at}. To use less memory: {memory_advice(cfg)}. "
                              f"Files already saved are intact.{resume_hint(cfg)}")
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        where = exc.filename or cfg.output_dir
        return TrainingFailed(f"the disk is full{at}: could not write {where} ({exc.strerror}). No partial file "
                              f"was left and files already saved are intact; free some space on the disk of "
                              f"'{cfg.output_dir}'{' and resume' if resume_hint(cfg) else ' and start again'}."
                              f"{resume_hint(cfg)}")
    return None


def resume_hint(cfg) -> str:
    from .state import find_latest_state
    try:
        state = find_latest_state(cfg.output_dir, cfg.output_name)
    except OSError:
        state = None
    return f" Resume with resume = \"{state}\"." if state else ""


# ------------------------------------------------------------------ states belong to one run and one model

def state_identity(cfg, model_info, net_cfg) -> dict[str, Any]:
    """What a saved state records about its run, so a resume from another run or model is refused."""
    return {"output_name": cfg.output_name,
            "model_sha256": getattr(model_info, "sha256", None),
            "model_legacy_hash": getattr(model_info, "legacy_hash", None),
            "model_name": getattr(model_info, "name", None),
            "network": {"module": cfg.network_module, "dim": net_cfg.dim, "alpha": float(net_cfg.alpha or 0)}}


def check_state_identity(state, cfg, model_info, net_cfg) -> None:
    extra = state.extra or {}
    where = f"resume: the state '{state.path}'"
    name = extra.get("output_name")
    if name is not None and name != cfg.output_name:
        raise ConfigError(f"{where} belongs to the run '{name}', not to '{cfg.output_name}'; set output_name = "
                          f"\"{name}\" to continue that run, or start this one without resume")
    for key, mine in (("model_sha256", getattr(model_info, "sha256", None)),
                      ("model_legacy_hash", getattr(model_info, "legacy_hash", None))):
        theirs = extra.get(key)
        if theirs and mine and theirs != mine:
            raise ConfigError(f"{where} was trained on another model ('{extra.get('model_name')}', {key} "
                              f"{str(theirs)[:12]}), not on '{getattr(model_info, 'name', '?')}' ({str(mine)[:12]}); "
                              f"resume with the same checkpoint")
    net = extra.get("network") or {}
    now = state_identity(cfg, model_info, net_cfg)["network"]
    diff = [f"{k} {net[k]!r} -> {now[k]!r}" for k in now if k in net and net[k] != now[k]]
    if diff:
        raise ConfigError(f"{where} was saved with another network ({', '.join(diff)}); resume with the same "
                          f"network settings")


# ------------------------------------------------------------------ leftovers of killed processes

def clean_leftovers(cfg, emit=None) -> list[str]:
    """Remove temporary files that a process killed mid-save left in the output and cache folders."""
    folders = [cfg.output_dir]
    if getattr(cfg, "cache_latents_to_disk", False):
        folders.append(cfg.latents_cache_dir or os.path.join(cfg.output_dir, ".latents"))
    removed = [p for f in folders for p in remove_stale_temp_files(f)]
    if removed and emit is not None:
        emit(Event(LOG, {"message": f"removed {len(removed)} temporary file(s) left by an interrupted save: "
                                    f"{', '.join(os.path.basename(p) for p in removed[:3])}"}))
    return removed
