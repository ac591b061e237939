"""Shared setup of the fault tests (no tests here): a tiny checkpoint, a 4-image dataset, a fast config, checks
that an output folder holds nothing partial."""
from __future__ import annotations

import os

import torch
from PIL import Image
from safetensors.torch import load_file

from lib_lora_train.config import config_from_dict

# 4 images, batch 2, 1 repeat: 2 steps per epoch, 3 epochs; a LoRA file and a state after every epoch
FAST = dict(resolution="64", network_dim=2, network_alpha=1, learning_rate=1e-3, max_train_epochs=3,
            train_batch_size=2, seed=1, device="cpu", save_every_n_epochs=1, save_state=True, output_name="demo")


def make_data(root, n: int = 4, seed: int = 0) -> str:
    folder = os.path.join(str(root), "data", "1_zkz")
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        arr = (torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(os.path.join(folder, f"{i:03d}.png"))
        with open(os.path.join(folder, f"{i:03d}.txt"), "w", encoding="utf-8") as fh:
            fh.write(f"zkz, tag{i % 3}")
    return os.path.dirname(folder)


def config_values(ckpt: str, root, **kw) -> dict:
    values = dict(FAST, pretrained_model_name_or_path=ckpt, train_data_dir=os.path.join(str(root), "data"),
                  output_dir=os.path.join(str(root), "out"))
    values.update(kw)
    return values


def make_cfg(ckpt: str, root, **kw):
    return config_from_dict(config_values(ckpt, root, **kw))


def lora_files(out) -> list[str]:
    return sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))


def assert_nothing_partial(out) -> list[str]:
    """Every visible file loads completely; returns the LoRA file names. Temp files of atomic_write are hidden
    (a leading dot, a .tmp suffix) and never carry a name the WebUI lists."""
    names = lora_files(out)
    for name in names:
        tensors = load_file(os.path.join(out, name))
        assert tensors and all(bool(torch.isfinite(t.float()).all()) for t in tensors.values()), name
    for name in os.listdir(out):
        assert not name.endswith(".safetensors") or not name.startswith("."), name
    return names
