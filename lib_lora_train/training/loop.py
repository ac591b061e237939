"""The training loop, top to bottom: model -> data -> network -> optimizer -> steps -> files.

Everything random in step s comes from generators seeded by (seed, epoch, batch), so a run resumed from a saved
state continues bit-identically (docs/ARCHITECTURE.md). The loop never prints: it emits events.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import random
import threading
import time
from dataclasses import dataclass, field

import torch

from ..config import TrainConfig, te_lrs
from ..errors import ConfigError, Interrupted
from ..fsutil import fault_point
from ..events import (DONE, EPOCH, ERROR, INTERRUPTED, LOG, SAVED, START, STATE_SAVED, WARNING, Event,
                      EventSink, fan_out)
from ..record import RunRecord
from . import distributed
from . import metadata as md
from .data_setup import build_training_data, captions_for, make_latent_source
from .evaluate import Validator
from .guards import LossGuard, check_state_identity, clean_leftovers, explain_failure, state_identity
from .memory import enable_checkpointing, fp8_targets, store_in_fp8
from .model_setup import prepare_model
from .noise import compute_loss, ip_noise, loss_weights_min_snr, debiased_weights, sample_noise, \
    sample_timesteps, target_for
from .optim import make_optimizer
from .previews import Previews
from .schedulers import make_scheduler
from .speed import apply_speed_options, as_channels_last
from .state import load_train_state, restore_into, save_train_state
from .step_log import StepLog
from .te_cache import text_source
from .update import Updater
from ..transfer import to_device


@dataclass
class RunResult:
    status: str                       # "done" | "interrupted"
    outputs: list[str] = field(default_factory=list)
    record_path: str = ""
    state_dir: str | None = None
    steps: int = 0


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of ints; independent of Python's hash randomisation."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' was asked for but PyTorch sees no CUDA device")
    return torch.device(name)


def output_file(cfg: TrainConfig, suffix: str = "") -> str:
    return os.path.join(cfg.output_dir, f"{cfg.output_name}{suffix}.safetensors")


def _check_outputs_free(cfg: TrainConfig) -> None:
    """Never replace another run's files silently."""
    if cfg.resume or cfg.overwrite or not os.path.isdir(cfg.output_dir):
        return
    prefix = cfg.output_name
    taken = [n for n in os.listdir(cfg.output_dir)
             if n == f"{prefix}.safetensors" or n == f"{prefix}.run.json"
             or (n.startswith(prefix + "-") and n.endswith(".safetensors") and n[len(prefix) + 1:-12].isdigit())]
    if taken:
        raise ConfigError(f"output_dir '{cfg.output_dir}' already holds files of a run named '{prefix}' "
                          f"({', '.join(sorted(taken)[:3])}); choose another output_name, set overwrite = true, "
                          f"or resume that run")


def _dtypes(cfg: TrainConfig, device: torch.device) -> tuple[torch.dtype, torch.dtype | None]:
    """(weight dtype of the frozen base, autocast dtype or None)."""
    if cfg.mixed_precision == "fp16":
        return torch.float16, torch.float16
    if cfg.mixed_precision == "bf16":
        return torch.bfloat16, torch.bfloat16
    return torch.float32, None


def _save_dtype(cfg: TrainConfig) -> torch.dtype | None:
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32, None: None}[cfg.save_precision]


def train(cfg: TrainConfig, *, model=None, sink: EventSink | None = None,
          stop: threading.Event | None = None, preview_renderer=None, reg_source=None) -> RunResult:
    """Run one training job. `model` (an SDModel) is used as given when a host already holds one.
    `preview_renderer(lora_path, specs, weight) -> [PIL images]`: a host's own pipeline for the previews (the
    WebUI's), given the network saved to a file at that moment; on its failure the built-in sampler makes them.
    `reg_source()`: a host's context yielding (model_id, backend, render) for reg_images_prompt (the WebUI's
    txt2img); None: the engine's own sampler on `model`."""
    from ..dataset.sizes import batch_sizes
    from ..models.conditioning import unet_inputs
    from ..networks import create_network, network_config_from_args, read_network_file, save_network_file

    stop = stop or threading.Event()
    dctx = distributed.setup(cfg, host_model=model is not None)   # torchrun / accelerate launch; else 1 process
    _check_outputs_free(cfg)
    dctx.barrier("checking the output folder")                     # every process checked before rank 0 writes
    os.makedirs(cfg.output_dir, exist_ok=True)
    record = RunRecord(cfg.output_dir, cfg.output_name, cfg.to_dict(), resume=bool(cfg.resume)) \
        if dctx.is_main else distributed.Silent()                  # only rank 0 writes; the others report errors
    emit = fan_out([record, sink]) if dctx.is_main else distributed.errors_only(sink)
    result = RunResult(status="failed", record_path=record.path)
    restore: list = [dctx.close]   # undo actions for a model we did not load ourselves
    peer_lost_state = None         # distributed.py: rank 0 keeps a state when another process dies mid-run
    try:
        if dctx.is_main:
            clean_leftovers(cfg, emit)     # guards.py: temp files of a process killed mid-save
        device = dctx.device or resolve_device(cfg.device)
        weight_dtype, autocast_dtype = _dtypes(cfg, device)

        # ---------------------------------------------------------------- model
        host_model = model is not None
        prep = prepare_model(cfg, model, device, weight_dtype, emit, restore)
        model, info, scheduler_cfg, clip_skip = prep.model, prep.info, prep.scheduler, prep.clip_skip
        unet, unet_dtype, text_encoders = model.unet, prep.unet_dtype, prep.text_encoders
        fp8_modules = fp8_targets(cfg, model, host_model=host_model)   # refused on a host's model: check now

        # ---------------------------------------------------------------- data
        if cfg.reg_images_prompt:   # prep/regimages.py: class images by this model (cached) become reg_data_dir
            from ..prep.regimages import reg_images_for_run
            with dctx.main_first("regularisation images"):
                cfg, _ = reg_images_for_run(cfg, model, device, emit, stop=stop, source=reg_source,
                                            clip_skip=clip_skip)
        data, folder_mode = build_training_data(cfg, emit)
        from ..dataset import plan_steps_for_data
        plan = plan_steps_for_data(data, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                                   max_train_epochs=cfg.max_train_epochs, max_train_steps=cfg.max_train_steps,
                                   num_processes=dctx.world_size)
        summary = data.summary()
        with dctx.main_first("latent and text-encoder caches"):   # rank 0 writes on-disk caches, then the rest read
            latents = make_latent_source(cfg, data, model, device, emit)
            text = text_source(cfg, data, model, device, clip_skip=clip_skip, max_steps=plan.total_steps,
                               autocast=lambda: _autocast(device, autocast_dtype), emit=emit)
        for module in fp8_modules:         # after caching: cached outputs come from the unrounded weights
            store_in_fp8(module, weight_dtype)

        # ---------------------------------------------------------------- network
        train_unet = not cfg.network_train_text_encoder_only
        train_te = not cfg.network_train_unet_only and (te_lrs(cfg) is None or any(lr > 0 for lr in te_lrs(cfg)))
        net_cfg = network_config_from_args(cfg.network_module, cfg.network_dim, cfg.network_alpha,
                                           cfg.network_args, train_unet=train_unet, train_text_encoder=train_te,
                                           network_dropout=cfg.network_dropout, family=info.family)
        if cfg.network_weights and cfg.dim_from_weights:
            net_cfg = _dims_from_file(net_cfg, cfg.network_weights, read_network_file)
        torch.manual_seed(derive_seed(cfg.seed_value, 0x1417))   # the network's initial weights
        network = create_network(net_cfg, unet, text_encoders[0] if len(text_encoders) == 1 else text_encoders,
                                 family=info.family)
        network.to(device)
        if cfg.network_weights:
            tensors, _ = read_network_file(cfg.network_weights)
            network.load_tensors(tensors)
            emit(Event(LOG, {"message": f"started from {cfg.network_weights}"}))
        dctx.broadcast_parameters(network.parameters())   # every process starts from rank 0's weights
        network.apply_to()
        restore.append(network.remove)
        if cfg.full_fp16 or cfg.full_bf16:
            network.to(weight_dtype)

        groups = network.param_groups(cfg.unet_lr, cfg.text_encoder_lr, cfg.learning_rate)
        if not groups:
            raise ConfigError("nothing to train: every network part has learning rate 0 or was switched off")
        optimizer, optimizer_description = make_optimizer(cfg.optimizer_type, groups, cfg.learning_rate,
                                                          cfg.optimizer_args, kernel=cfg.optimizer_kernel)
        lr_scheduler = make_scheduler(cfg.lr_scheduler, optimizer, num_training_steps=plan.total_steps,
                                      num_warmup_steps=cfg.lr_warmup_steps,
                                      num_cycles=cfg.lr_scheduler_num_cycles, power=cfg.lr_scheduler_power)
        scaler = torch.amp.GradScaler("cuda") if autocast_dtype == torch.float16 and device.type == "cuda" \
            else None
        updater = Updater(optimizer, max_grad_norm=cfg.max_grad_norm, scaler=scaler, fused=cfg.fused_backward_pass,
                          accumulation_steps=cfg.gradient_accumulation_steps)
        restore.append(updater.close)

        if cfg.gradient_checkpointing:
            restore.append(enable_checkpointing(unet, text_encoders if train_te else []))
        unet_forward, undo_speed = apply_speed_options(cfg, model, device, emit)   # speed.py: attention kernel,
        restore.append(undo_speed)                    # channels_last, torch.compile (after the network is attached)

        # ---------------------------------------------------------------- resume
        global_step, first_epoch = 0, 0
        if cfg.resume:
            state = load_train_state(cfg.resume)
            prep.hashes.wait()                                 # the identity check compares the model's sha256
            check_state_identity(state, cfg, info, net_cfg)    # guards.py: not another run's or model's state
            restore_into(state, network, optimizer, lr_scheduler)
            global_step, first_epoch = state.global_step, state.epoch
            global_step = distributed.adapt_resume(state, dctx, plan, cfg.gradient_accumulation_steps,
                                                   lr_scheduler, emit, record)   # saved by N processes, now M
            emit(Event(LOG, {"message": f"resumed from {cfg.resume} at epoch {first_epoch}, step {global_step}"}))

        run_meta = md.training_metadata(
            cfg, model_info=info, data_summary=summary, plan=plan,
            num_batches_per_epoch=data.num_batches_per_epoch, optimizer_description=optimizer_description,
            network_dim=net_cfg.dim, network_alpha=net_cfg.alpha, network_args=net_cfg.network_args,
            folder_mode=folder_mode,
            session_id=derive_seed(cfg.seed_value, 7) % (2 ** 32) if cfg.seed is not None else None)
        distributed.adjust_metadata(run_meta, dctx, data.num_batches_per_epoch)
        if dctx.enabled:
            record.set(distributed={**dctx.describe(), "global_batch_size": cfg.train_batch_size * dctx.world_size
                                    * cfg.gradient_accumulation_steps})
        model_record = {"name": info.name, "family": info.family, "prediction_type": info.prediction_type,
                        "sha256": info.sha256, "legacy_hash": info.legacy_hash}
        record.set(model=model_record, dataset=_record_dataset(summary, data),
                   network={**dataclasses.asdict(net_cfg), "variant": net_cfg.variant},
                   optimizer=optimizer_description)

        def model_hashes() -> None:
            """The checkpoint's full-file sha256 (metadata and record only) is read in a background thread since
            the model was loaded (model_setup.py), so it never delays the first step; a save waits for it."""
            if prep.hashes.wait():
                run_meta.update(md.model_hash_keys(info))
                model_record.update(sha256=info.sha256, legacy_hash=info.legacy_hash)
                record.set(model=model_record)

        def save_lora(path: str, epoch: int, kind: str) -> None:
            if not dctx.is_main:
                return
            model_hashes()
            tensors = network.save_tensors(_save_dtype(cfg))
            meta = md.for_save(run_meta, cfg, model_info=info, step=global_step, epoch=epoch)
            hashes = save_network_file(path, tensors, meta, overwrite=True)
            result.outputs.append(path)
            emit(Event(SAVED, {"path": path, "epoch": epoch, "step": global_step, "kind": kind, **hashes}))

        def save_state(name: str, epoch: int) -> str:
            path = os.path.join(cfg.output_dir, name)
            if not dctx.is_main:
                return path
            model_hashes()                   # state_identity holds the model's sha256
            save_train_state(path, network_tensors=network.save_tensors(), optimizer=optimizer,
                             scheduler=lr_scheduler, epoch=epoch, global_step=global_step,
                             extra={"output_name": cfg.output_name, "total_steps": plan.total_steps,
                                    **state_identity(cfg, info, net_cfg), **distributed.state_extra(dctx, plan)})
            emit(Event(STATE_SAVED, {"path": path, "epoch": epoch, "step": global_step}))
            return path

        def keep_last_good() -> str | None:
            """guards.py: a diverged run keeps the file of its last completed epoch (when its weights are finite)."""
            if last_epoch_tensors is None or not dctx.is_main:
                return None
            ep, step_at, tensors = last_epoch_tensors
            path = output_file(cfg, f"-{ep:06d}")
            if not os.path.exists(path):
                if not all(bool(torch.isfinite(t).all()) for t in tensors.values()):
                    return None
                model_hashes()
                meta = md.for_save(run_meta, cfg, model_info=info, step=step_at, epoch=ep)
                hashes = save_network_file(path, tensors, meta, overwrite=False)
                result.outputs.append(path)
                emit(Event(SAVED, {"path": path, "epoch": ep, "step": step_at, "kind": "epoch", **hashes}))
            return path

        def write_preview_lora(path: str, epoch: int, step: int) -> None:
            model_hashes()
            meta = md.for_save(run_meta, cfg, model_info=info, step=step, epoch=epoch)
            save_network_file(path, network.save_tensors(_save_dtype(cfg)), meta, overwrite=True)

        sampler = Previews(cfg, model, network, emit, renderer=preview_renderer, write_lora=write_preview_lora)
        validator = Validator(cfg, data, model, latents, emit, autocast=lambda: _autocast(device, autocast_dtype),
                              scheduler=scheduler_cfg)
        if not dctx.is_main:
            sampler = validator = distributed.Silent()
        record.set(validation_source={"source": validator.source, "images": len(validator.items)}
                   if validator.enabled else None)
        emit(Event(START, {"total_steps": plan.total_steps, "epochs": plan.epochs,
                           "steps_per_epoch": plan.steps_per_epoch, "formula": plan.formula,
                           "run_id": record.run_id, "start_step": global_step}))
        if cfg.sample_at_first and global_step == 0:
            sampler.make(0, 0)
        if validator.enabled and global_step == 0:
            validator.defer_start(network)   # the curve's starting point: measured at the first validation

        # ---------------------------------------------------------------- the loop
        network.train()
        ga = cfg.gradient_accumulation_steps
        t_start, step_at_start = time.time(), global_step
        epoch = completed_epochs = first_epoch
        last_epoch_tensors = None
        interrupted = False
        if dctx.enabled:
            def peer_lost_state():       # the weights are those of global_step: the lost collective comes first
                return save_state(f"{cfg.output_name}-state", completed_epochs)
        loss_guard = LossGuard(cfg, patience=3 if scaler is not None else 1)   # guards.py: NaN / inf loss
        # step_log.py: losses read one micro-batch late without waiting (async_loss; CUDA by default); with
        # several processes the loss is averaged (a collective) and read at once
        async_loss = device.type == "cuda" if cfg.async_loss is None else cfg.async_loss
        step_log = StepLog(emit, loss_guard, network, keep_last_good, lag=1 if async_loss and not dctx.enabled else 0)
        pin = cfg.pin_memory
        for epoch in range(first_epoch, plan.epochs):
            epoch_batches = data.batches_for_epoch(epoch, group=dctx.world_size)
            batches = dctx.shard(epoch_batches)           # distributed.py: this process's share
            steps_done_in_epoch = global_step - epoch * plan.steps_per_epoch
            first_batch = max(0, steps_done_in_epoch) * ga
            step_log.start_epoch()
            for b_index in range(first_batch, len(batches)):
                batch = batches[b_index]
                seed = derive_seed(cfg.seed_value, epoch, b_index)
                step_parts = dctx.step_batches(epoch_batches, b_index)   # None in a single process
                own_seed = dctx.rank_seed(seed, derive_seed)             # (seed, epoch, batch, rank)
                gen = torch.Generator().manual_seed(dctx.step_seed(seed, step_parts, derive_seed))
                torch.manual_seed(own_seed)               # dropout inside network modules
                caption_rng = random.Random(own_seed)
                network.before_step(gen)

                fault_point(f"step:{global_step + 1}")   # fault tests only (fsutil.py)
                lat = to_device(latents.get_batch(batch, gen), device, pin=pin)   # transfer.py: CUDA, no wait
                captions = captions_for(data, batch, epoch=epoch, step=global_step,
                                        max_steps=plan.total_steps, rng=caption_rng)
                with _autocast(device, autocast_dtype):
                    with torch.set_grad_enabled(train_te):
                        cond = text.encode(captions)      # hidden states (+ SDXL's pooled embedding)
                    lat_all, mine = dctx.rows(lat, step_parts)   # draw for the step's global batch, keep own rows
                    noise = sample_noise(lat_all, gen, noise_offset=cfg.noise_offset,
                                         noise_offset_random_strength=cfg.noise_offset_random_strength,
                                         adaptive_noise_scale=cfg.adaptive_noise_scale,
                                         multires_noise_iterations=cfg.multires_noise_iterations,
                                         multires_noise_discount=cfg.multires_noise_discount, pin=pin)
                    t_host = sample_timesteps(lat_all.shape[0], gen, min_timestep=cfg.min_timestep or 0,
                                              max_timestep=cfg.max_timestep or 1000, device="cpu")
                    timesteps = to_device(t_host, device, pin=pin)
                    noisy_in = ip_noise(noise, cfg.ip_noise_gamma, gen, pin=pin) if cfg.ip_noise_gamma else noise
                    noise, noisy_in, timesteps, t_host = noise[mine], noisy_in[mine], timesteps[mine], t_host[mine]
                    noisy = scheduler_cfg.add_noise(lat, noisy_in, timesteps)
                    pred = unet_forward(as_channels_last(noisy.to(unet_dtype), cfg.channels_last), timesteps,
                                        **unet_inputs(model, cond, batch_sizes(batch), unet_dtype)).sample
                target = target_for(scheduler_cfg, lat, noise, timesteps, info.prediction_type)
                per_sample = compute_loss(pred.float(), target.float(), loss_type=cfg.loss_type,
                                          huber_c=cfg.huber_c, huber_schedule=cfg.huber_schedule,
                                          timesteps=timesteps, scheduler=scheduler_cfg)
                # per-sample weights on the host (from the host's timesteps: the SNR tables live there), one copy
                weights = torch.tensor([s.item.loss_weight for s in batch.samples])
                if cfg.min_snr_gamma:
                    weights = weights * loss_weights_min_snr(t_host, scheduler_cfg, cfg.min_snr_gamma,
                                                             info.prediction_type)
                if cfg.debiased_estimation_loss:
                    weights = weights * debiased_weights(t_host, scheduler_cfg, info.prediction_type)
                loss = (per_sample * to_device(weights, per_sample.device, pin=pin)).mean()
                updater.backward(loss)
                # the global batch's loss (this process's own alone: a tensor, read by step_log without waiting)
                loss_now = dctx.mean_value(loss.detach()) if dctx.enabled else loss.detach()
                step_meta = step_log.add(loss_now, global_step + 1, epoch + 1)   # the NaN guard reads it there

                end_of_step = (b_index + 1) % ga == 0 or b_index + 1 == len(batches)
                if not end_of_step:
                    continue
                dctx.average_gradients(updater.params)   # distributed.py: mean over processes (no-op alone)
                updater.step()
                lr_scheduler.step()
                global_step += 1

                elapsed = time.time() - t_start
                it_s = (global_step - step_at_start) / elapsed if elapsed > 0 else 0.0
                step_log.end_step(step_meta, {   # STEP: emitted when its loss is read (loss, avg_loss filled then)
                    "step": global_step, "total_steps": plan.total_steps, "epoch": epoch + 1,
                    "epochs": plan.epochs, "loss": None, "avg_loss": None,
                    "lr": {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)},
                    "it_per_s": it_s,
                    "eta_s": (plan.total_steps - global_step) / it_s if it_s > 0 else None})
                save_due = cfg.save_every_n_steps and global_step % cfg.save_every_n_steps == 0 \
                    and global_step < plan.total_steps
                if save_due or sampler.due_step(global_step) or validator.due_step(global_step):
                    step_log.flush()                   # every loss so far is read before files and previews

                if save_due:
                    save_lora(output_file(cfg, f"-step{global_step:08d}"), epoch + 1, "step")
                    if cfg.save_state:
                        save_state(f"{cfg.output_name}-step{global_step:08d}-state", epoch)
                if sampler.due_step(global_step):
                    sampler.make(epoch + 1, global_step)
                if validator.due_step(global_step):
                    validator.run(network, at="step", epoch=epoch + 1, step=global_step)
                if global_step >= plan.total_steps:
                    break
                if dctx.agree(stop.is_set()) and b_index + 1 < len(batches):   # at an epoch's end, finish the epoch first
                    interrupted = True
                    break
            step_log.flush()                           # the epoch's last losses (and the NaN guard on them)
            if interrupted:
                break

            # ---------------------------------------------------------- end of epoch
            done_epochs = completed_epochs = epoch + 1
            is_last = done_epochs >= plan.epochs or global_step >= plan.total_steps
            val_loss = validator.run(network, at="epoch", epoch=done_epochs, step=global_step) \
                if validator.due_epoch(done_epochs, is_last) else None
            emit(Event(EPOCH, {"epoch": done_epochs, "epochs": plan.epochs, "step": global_step,
                               "avg_loss": step_log.epoch_avg, "validation_loss": val_loss}))
            last_epoch_tensors = (done_epochs, global_step, network.save_tensors(_save_dtype(cfg)))
            if cfg.save_every_n_epochs and done_epochs % cfg.save_every_n_epochs == 0 and not is_last:
                save_lora(output_file(cfg, f"-{done_epochs:06d}"), done_epochs, "epoch")
                if dctx.is_main:
                    _prune_old_epochs(cfg, done_epochs, emit)
                if cfg.save_state:
                    save_state(f"{cfg.output_name}-{done_epochs:06d}-state", done_epochs)
            if sampler.due_epoch(done_epochs, is_last):
                sampler.make(done_epochs, global_step)
            if is_last:
                break
            if dctx.agree(stop.is_set()):
                interrupted = True
                break

        if interrupted:
            # A stop request: a resumable state, and the file of the last completed epoch.
            if validator.enabled:
                validator.flush_start(network)   # stopped before the first validation: the starting point
            state_path = save_state(f"{cfg.output_name}-state", completed_epochs)
            if last_epoch_tensors is not None and dctx.is_main:
                ep, step_at, tensors = last_epoch_tensors
                path = output_file(cfg, f"-{ep:06d}")
                if not os.path.exists(path):
                    meta = md.for_save(run_meta, cfg, model_info=info, step=step_at, epoch=ep)
                    hashes = save_network_file(path, tensors, meta, overwrite=False)
                    result.outputs.append(path)
                    emit(Event(SAVED, {"path": path, "epoch": ep, "step": step_at, "kind": "epoch", **hashes}))
            result.status, result.state_dir, result.steps = "interrupted", state_path, global_step
            emit(Event(INTERRUPTED, {"step": global_step, "epoch": completed_epochs, "state": state_path}))
            raise Interrupted(f"stopped at step {global_step}; resume with resume = \"{state_path}\"")

        # ---------------------------------------------------------------- the end
        dctx.check_in_sync(network.save_tensors(), record, emit)   # distributed.py: every process, same weights
        save_lora(output_file(cfg), min(epoch + 1, plan.epochs), "final")
        if cfg.save_state_on_train_end:
            result.state_dir = save_state(f"{cfg.output_name}-state", plan.epochs)
        result.status, result.steps = "done", global_step
        emit(Event(DONE, {"outputs": result.outputs, "steps": global_step,
                          "avg_loss": step_log.run_avg}))
        return result

    except Interrupted:
        raise
    except BaseException as exc:
        distributed.save_after_peer_lost(exc, dctx, peer_lost_state, emit)
        clear = explain_failure(exc, cfg)   # guards.py: out of memory / disk full -> what to change
        shown = clear or exc
        emit(Event(ERROR, {"message": str(shown) or type(shown).__name__, "type": type(shown).__name__}))
        if clear is not None:
            raise clear from exc
        raise
    finally:
        for undo in reversed(restore):
            try:
                undo()
            except Exception as exc:  # noqa: BLE001 - report, keep undoing the rest
                emit(Event(WARNING, {"message": f"could not restore the model completely: {exc}"}))
        record.close()


# -------------------------------------------------------------------- helpers

@contextlib.contextmanager
def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        yield
    else:
        with torch.autocast(device_type=device.type, dtype=dtype):
            yield


def _dims_from_file(net_cfg, path, read_network_file):
    tensors, meta = read_network_file(path)
    downs = [t for k, t in tensors.items() if k.endswith("lora_down.weight")]
    if not downs:
        raise ConfigError(f"dim_from_weights: {path} holds no lora_down weights")
    return dataclasses.replace(net_cfg, dim=int(downs[0].shape[0]))


def _record_dataset(summary: dict, data) -> dict:
    keep = ("num_train_images", "num_reg_images", "dataset_dirs", "reg_dataset_dirs", "bucket_info",
            "tag_frequency")
    out = {k: summary.get(k) for k in keep}
    out["num_batches_per_epoch"] = data.num_batches_per_epoch
    out["warnings"] = list(getattr(data, "warnings", []))
    return out


def _prune_old_epochs(cfg: TrainConfig, done_epochs: int, emit) -> None:
    """save_last_n_epochs: remove this run's older epoch files (never files of other runs)."""
    if not cfg.save_last_n_epochs:
        return
    old = done_epochs - cfg.save_last_n_epochs * (cfg.save_every_n_epochs or 1)
    if old >= 1:
        path = output_file(cfg, f"-{old:06d}")
        if os.path.exists(path):
            os.unlink(path)
            emit(Event(LOG, {"message": f"removed {os.path.basename(path)} (save_last_n_epochs)"}))
