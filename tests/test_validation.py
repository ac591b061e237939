"""Validation loss: config keys, fixed timesteps and noise, determinism, and the record of every epoch."""
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lib_lora_train.config import UNSUPPORTED, config_from_dict
from lib_lora_train.errors import ConfigError
from lib_lora_train.events import VALIDATION
from lib_lora_train.models import load_sd_model, write_tiny_checkpoint
from lib_lora_train.networks import create_network, network_config_from_args
from lib_lora_train.record import read_events, read_run_record
from lib_lora_train.training.evaluate import (SMALL_LATENTS_BATCH, EvalItem, denoising_loss, eval_batch_size,
                                              evaluation_mode, latent_seed, validation_timesteps)
from lib_lora_train.training.loop import train


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    write_tiny_checkpoint(str(path), seed=0)
    return str(path)


def make_data(root, n=3, repeats=1):
    folder = root / f"{repeats}_zkz"
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        arr = (torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"zkz, tag{i}", encoding="utf-8")
    return root


def cfg_for(ckpt, tmp_path, out="out", **kw):
    values = dict(pretrained_model_name_or_path=ckpt, train_data_dir=str(tmp_path / "data"),
                  output_dir=str(tmp_path / out), output_name="v", resolution="64", network_dim=4,
                  network_alpha=4, learning_rate=5e-3, max_train_epochs=2, train_batch_size=1, seed=1,
                  cache_latents=True, device="cpu", save_precision="float")
    values.update(kw)
    return config_from_dict(values)


# ---------------------------------------------------------------- config and the fixed measurement

def test_validation_keys_are_supported_and_checked():
    for key in ("validation_split", "validate_every_n_epochs", "validate_every_n_steps", "max_validation_steps",
                "validation_seed"):
        assert key not in UNSUPPORTED
    cfg = config_from_dict({"validation_split": 0.2, "validate_every_n_epochs": 2, "validate_every_n_steps": 5,
                            "max_validation_steps": 3, "validation_seed": 7, "validation_fallback": False})
    assert (cfg.validation_split, cfg.validate_every_n_epochs, cfg.validation_seed) == (0.2, 2, 7)
    assert config_from_dict({}).validation_fallback is True and config_from_dict({}).validation_split == 0.0
    with pytest.raises(ConfigError, match="validation_split"):
        config_from_dict({"validation_split": 1.0})
    with pytest.raises(ConfigError, match="validate_every_n_epochs"):
        config_from_dict({"validate_every_n_epochs": 0})


def test_timesteps_follow_sd_scripts():
    assert validation_timesteps(1000) == [200, 400, 600, 800]
    assert validation_timesteps(1000, 100, 600) == [200, 300, 400, 500]


def test_loss_is_deterministic_changes_with_the_lora_and_leaves_rng_and_modes_alone(ckpt):
    model = load_sd_model(ckpt)
    g = torch.Generator().manual_seed(5)
    items = [EvalItem(torch.randn(4, 8, 8, generator=g), "zkz", 0) for _ in range(2)]
    items += [EvalItem(torch.randn(4, 8, 16, generator=g), "zkz, tag", 0)]      # another bucket
    items = [EvalItem(it.latent, it.caption, latent_seed(it.latent, 0)) for it in items]
    ts = validation_timesteps(model.noise_scheduler.config.num_train_timesteps)
    net = create_network(network_config_from_args("networks.lora", 4, 4, [], network_dropout=0.5),
                         model.unet, model.text_encoder)
    net.apply_to()
    net.train()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_up" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    rng_before = torch.get_rng_state()
    with evaluation_mode([model.unet, model.text_encoder, net]):
        assert not net.training
        a = denoising_loss(model, items, ts)
        b = denoising_loss(model, items, ts)
    assert a == b                                   # same noise, same timesteps, dropout off
    assert net.training and all(m.training for m in net.modules())   # train mode is back
    assert torch.equal(torch.get_rng_state(), rng_before)
    with evaluation_mode([model.unet, model.text_encoder, net]):
        net.multiplier = 0.0
        base = denoising_loss(model, items, ts)
        net.multiplier = 1.0
    net.remove()
    assert base != a                                # the number depends on the LoRA
    # another noise seed gives another number: the noise really is fixed by the seed
    other = [EvalItem(it.latent, it.caption, it.seed + 1) for it in items]
    assert denoising_loss(model, other, ts) != base


# ---------------------------------------------------------------- in the training loop

def test_default_run_records_validation_loss_for_every_epoch_on_training_images(ckpt, tmp_path):
    make_data(tmp_path / "data")
    result = train(cfg_for(ckpt, tmp_path, max_train_epochs=3))
    rec = read_run_record(result.record_path)
    epochs = [(v["at"], v["epoch"]) for v in rec["validation"]]
    assert epochs == [("start", 0), ("epoch", 1), ("epoch", 2), ("epoch", 3)]
    assert rec["validation_source"]["source"] == "training_images"
    assert rec["validation_source"]["images"] == 3
    assert all(isinstance(e.get("validation_loss"), float) for e in rec["epochs"]) and len(rec["epochs"]) == 3
    events = [e for e in read_events(result.record_path.replace(".run.json", ".events.jsonl"))
              if e["kind"] == VALIDATION]
    assert [e["epoch"] for e in events] == [0, 1, 2, 3]
    # a LoRA trained at a high rate on 3 images fits them better than the base model does
    assert rec["validation"][-1]["loss"] < rec["validation"][0]["loss"]

    # validation never disturbs training: without it, the same files come out bit for bit
    plain = train(cfg_for(ckpt, tmp_path, out="plain", max_train_epochs=3, validation_fallback=False))
    assert read_run_record(plain.record_path)["validation"] == []
    a, b = load_file(result.outputs[-1]), load_file(plain.outputs[-1])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_held_out_split_every_n_epochs_and_steps(ckpt, tmp_path):
    make_data(tmp_path / "data", n=6)
    cfg = cfg_for(ckpt, tmp_path, validation_split=0.34, validation_seed=3, validate_every_n_epochs=2,
                  validate_every_n_steps=2, max_train_epochs=3, train_batch_size=2)
    seen = []
    result = train(cfg, sink=lambda e: seen.append(e) if e.kind == VALIDATION else None)
    rec = read_run_record(result.record_path)
    assert rec["validation_source"]["source"] == "held_out" and rec["validation_source"]["images"] == 2
    assert rec["dataset"]["num_train_images"] == 4
    kinds = [(v["at"], v["epoch"], v["step"]) for v in rec["validation"]]
    # 4 images, batch 2: 2 steps per epoch; epochs every 2 plus the last one; steps 2, 4, 6
    assert kinds == [("start", 0, 0), ("step", 1, 2), ("step", 2, 4), ("epoch", 2, 4), ("step", 3, 6),
                     ("epoch", 3, 6)]
    assert [e.get("validation_loss") is not None for e in rec["epochs"]] == [False, True, True]
    # the host's sink sees the same measurements the record keeps
    assert [(e.data["at"], e.data["step"], e.data["loss"]) for e in seen] == \
        [(v["at"], v["step"], v["loss"]) for v in rec["validation"]]
    assert len({v["loss"] for v in rec["validation"]}) >= 4       # training moves the number


def test_deferred_starting_point_is_the_number_measured_before_training_and_leaves_the_weights(ckpt, tmp_path):
    """The start measurement moved to the first validation (not before the first step) gives the number a
    measurement before training gives, and puts the trained weights back bit for bit."""
    from lib_lora_train.training.data_setup import build_training_data, make_latent_source
    from lib_lora_train.training.evaluate import Validator
    make_data(tmp_path / "data")
    cfg = cfg_for(ckpt, tmp_path)
    seen = []
    data, _ = build_training_data(cfg, seen.append)
    model = load_sd_model(ckpt)
    latents = make_latent_source(cfg, data, model, torch.device("cpu"), seen.append)
    net = create_network(network_config_from_args("networks.lora", 4, 4, []), model.unet, model.text_encoder)
    net.apply_to()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05, generator=g)             # a starting point that is not the base model
    validator = Validator(cfg, data, model, latents, seen.append)
    before = validator.measure(net)
    validator.defer_start(net)
    with torch.no_grad():                               # "training" moves the weights
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    trained = [p.detach().clone() for p in net.parameters()]
    after = validator.measure(net)
    seen.clear()
    assert validator.run(net, at="epoch", epoch=1, step=3) == after
    got = [(e.data["at"], e.data["step"], e.data["loss"]) for e in seen if e.kind == VALIDATION]
    assert got == [("start", 0, before), ("epoch", 3, after)]
    assert all(torch.equal(p, t) for p, t in zip(net.parameters(), trained))
    validator.flush_start(net)                          # measured once only
    assert [e for e in seen if e.kind == VALIDATION][2:] == []
    net.remove()


def test_stopped_before_the_first_validation_still_records_the_starting_point(ckpt, tmp_path):
    import threading
    make_data(tmp_path / "data", n=4)
    stop = threading.Event()

    def sink(e):
        if e.kind == "step" and e.data["step"] == 1:
            stop.set()
    from lib_lora_train.errors import Interrupted
    with pytest.raises(Interrupted):
        train(cfg_for(ckpt, tmp_path, max_train_epochs=1), sink=sink, stop=stop)
    rec = read_run_record(str(tmp_path / "out" / "v.run.json"))
    assert [(v["at"], v["step"]) for v in rec["validation"]] == [("start", 0)]


def test_the_number_does_not_depend_on_how_the_forwards_are_batched(ckpt):
    """The validator batches an image's timesteps together (`Validator.batch_size`), and small latents all in one
    call (`eval_batch_size`): with the model in float64, batch 1, 3, 8 and all 12 give the same loss up to the float32 arithmetic of the loss itself (a mean of squared errors
    over a latent's elements: worst case n·u relative)."""
    model = load_sd_model(ckpt)
    model.unet.to(torch.float64)
    model.text_encoder.to(torch.float64)
    g = torch.Generator().manual_seed(7)
    items = [EvalItem(torch.randn(4, 8, 8, generator=g), f"zkz, tag{i}", 0) for i in range(3)]
    items = [EvalItem(it.latent, it.caption, latent_seed(it.latent, 0)) for it in items]
    ts = validation_timesteps(model.noise_scheduler.config.num_train_timesteps)
    with torch.no_grad():
        losses = [denoising_loss(model, items, ts, batch_size=b) for b in (1, 3, 8)]
        losses.append(denoising_loss(model, items, ts, batch_size=1, small_latents=SMALL_LATENTS_BATCH))
    n = items[0].latent.numel()
    bound = n * torch.finfo(torch.float32).eps / 2 * max(abs(v) for v in losses)
    assert max(losses) - min(losses) <= bound, losses


def test_small_latents_go_through_the_unet_together_large_ones_at_the_training_batch():
    assert eval_batch_size(4, 32, (4, 8, 8), SMALL_LATENTS_BATCH) == 32          # 64 px: all 32 in one call
    assert eval_batch_size(4, 100, (4, 8, 8), SMALL_LATENTS_BATCH) == 32         # at most the budget
    assert eval_batch_size(4, 3, (4, 8, 8), SMALL_LATENTS_BATCH) == 4            # never below the batch
    assert eval_batch_size(4, 32, (4, 16, 16), SMALL_LATENTS_BATCH) == 8         # 128 px
    assert eval_batch_size(4, 32, (4, 64, 64), SMALL_LATENTS_BATCH) == 4         # 512 px: as before
    assert eval_batch_size(6, 32, (4, 128, 128), SMALL_LATENTS_BATCH) == 6       # SDXL 1024 px
    assert eval_batch_size(4, 32, (4, 8, 8), None) == 4
