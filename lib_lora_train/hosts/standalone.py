"""The standalone page's host: files only, a data folder of its own, the embedded tiny model by default.

    <data>/projects/   dataset projects          <data>/loras/<project>/   trained files
    <data>/models/     checkpoints a config may name (and the tiny random checkpoint when the embedded one is
                       missing)
"""
from __future__ import annotations

import os

from .base import BasicHost, HostPaths, family_label

DEFAULT_DATA = "./lora_train_data"
TINY_RANDOM = "tiny_random_sd1.safetensors"


def default_checkpoint(data_dir: str) -> str:
    """The embedded pre-trained tiny model when it is there, else a tiny random checkpoint written once."""
    from ..demo import BASE_MODEL
    if os.path.isfile(BASE_MODEL):
        return str(BASE_MODEL)
    path = os.path.join(data_dir, "models", TINY_RANDOM)
    if not os.path.isfile(path):
        from ..models import write_tiny_checkpoint
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_tiny_checkpoint(path)
    return path


class StandaloneHost(BasicHost):
    name = "standalone"

    def __init__(self, data_dir: str = DEFAULT_DATA, *, checkpoint: str | None = None,
                 config: dict | None = None):
        data = os.path.abspath(os.path.expanduser(data_dir))
        models = os.path.join(data, "models")
        os.makedirs(models, exist_ok=True)
        ckpt = checkpoint or default_checkpoint(data)
        super().__init__(HostPaths(os.path.join(data, "projects"), os.path.join(data, "loras"), [models]),
                         default_checkpoint=ckpt, config={"device": "cpu", **(config or {})})
        self.data_dir = data
        self.tiny = checkpoint is None        # the embedded tiny model: trained at 64 px

    def native_resolution(self) -> int:
        return 64 if self.tiny else super().native_resolution()

    def base_config(self) -> dict:
        # The run's and the Preprocess section's default size follow the checkpoint's family (1024 for SDXL).
        return {"resolution": str(self.native_resolution()), **super().base_config()}

    def checkpoint_label(self) -> str:
        label = os.path.basename(self.default_checkpoint)
        if self.tiny:
            return f"{label} (tiny test model)"
        family, prediction = self._kind()
        return f"{label} ({family_label(family, prediction)})"
