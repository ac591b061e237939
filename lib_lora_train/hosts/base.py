"""The interface between the engine's front ends (tab, job manager, HTTP API) and where they run."""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

from ..errors import ConfigError
from ..events import EventSink


@dataclass
class HostPaths:
    projects: str                 # one sub-folder per dataset project (lib_lora_train.prep.project)
    loras: str                    # trained files go to <loras>/<project>/ (the WebUI's models/Lora by default)
    models: list[str] = field(default_factory=list)   # folders a config may name checkpoints / LoRAs from

    def project_dir(self, name: str) -> str:
        return safe_child(self.projects, name, what="project")

    def output_dir(self, name: str) -> str:
        return safe_child(self.loras, name, what="project")

    def allowed_roots(self) -> list[str]:
        return [self.projects, self.loras, *self.models]


def safe_child(root: str, name: str, *, what: str = "name") -> str:
    """`root/name` for a plain name: no separators, no '..', nothing that resolves outside `root`."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{what}: a name is required")
    name = name.strip()
    if any(c in name for c in '/\\:*?"<>|\0') or name in (".", "..") or name.startswith("."):
        raise ConfigError(f"{what}: '{name}' is not a plain folder name (no slashes, no leading dot)")
    path = os.path.join(os.path.abspath(root), name)
    if os.path.dirname(os.path.realpath(path)) != os.path.realpath(root):
        raise ConfigError(f"{what}: '{name}' resolves outside {root}")
    return path


def inside(path: str, roots: list[str]) -> bool:
    """Whether `path` (after resolving links) lies in one of `roots`."""
    real = os.path.realpath(path)
    for root in roots:
        r = os.path.realpath(root)
        if real == r or real.startswith(r.rstrip(os.sep) + os.sep):
            return True
    return False


FAMILY_LABELS = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}


def native_resolution_of(family: str, prediction_type: str = "epsilon") -> int:
    """The side length a family was trained at: SDXL 1024, SD 2.x v-prediction (768-v) 768, else 512."""
    if family == "sdxl":
        return 1024
    return 768 if family == "sd2" and prediction_type == "v_prediction" else 512


def family_label(family: str, prediction_type: str | None = None) -> str:
    """"SDXL", "SD 2.x v-prediction", "SD 1.x": how the tab names a model's family."""
    label = FAMILY_LABELS.get(family, family)
    return f"{label} v-prediction" if prediction_type == "v_prediction" else label


def checkpoint_kind(path: str) -> tuple[str, str] | None:
    """(family, prediction_type) of a checkpoint file from its keys and shapes only (the safetensors header),
    cached per file version; None when it is missing, not a Stable Diffusion checkpoint, or a .ckpt (reading
    one means unpickling all of it: too slow for a label; the run itself still finds its family)."""
    if not str(path or "").lower().endswith(".safetensors"):
        return None
    try:
        st = os.stat(path)
    except (OSError, TypeError, ValueError):
        return None
    key = (os.path.realpath(path), st.st_mtime_ns, st.st_size)
    if key not in _KINDS:
        from ..errors import LoraTrainError
        from ..models import detect_checkpoint
        try:
            _KINDS[key] = tuple(detect_checkpoint(path))
        except (LoraTrainError, OSError, ValueError):
            _KINDS[key] = None
    return _KINDS[key]


_KINDS: dict = {}


class Host(Protocol):
    """What the job manager, the tab and the API need from the program they run in."""

    name: str                     # "standalone" | "webui"
    paths: HostPaths

    def base_config(self) -> dict[str, Any]:
        """sd-scripts keys every run starts from before the user's (device, precision, the default checkpoint
        as `pretrained_model_name_or_path`, resolution for the tiny model, ...)."""

    def checkpoint_label(self) -> str:
        """What the UI calls the model a run trains on by default ("the loaded checkpoint: X (SDXL)")."""

    def model_family(self) -> str:
        """"sd1" | "sd2" | "sdxl" of the model a run would use (the loaded one in the WebUI)."""

    def native_resolution(self) -> int:
        """The side length that model was trained at (512 / 768 / 1024): the default preprocess target and run
        resolution."""

    def training_session(self, cfg) -> contextlib.AbstractContextManager:
        """Context for one run: takes the host's locks, yields an SDModel to train on (or None: the engine loads
        cfg.pretrained_model_name_or_path itself) and restores the host's model on exit, also after errors."""

    def progress_sink(self, job, stop: threading.Event) -> EventSink | None:
        """A sink that mirrors a job's events into the host's own progress display and sets `stop` when the
        host's Interrupt is pressed. None when the host has no display of its own."""

    def outputs_written(self, paths: list[str]) -> None:
        """New LoRA files exist: refresh the host's lists (the WebUI's Lora page)."""

    def taggers(self):
        """lib_lora_train.prep.taggers.HostTaggers or None outside the WebUI."""


class BasicHost:
    """A host with nothing of its own: the engine loads checkpoints from files. Base of the standalone host and
    the tests' host."""

    name = "basic"

    def __init__(self, paths: HostPaths, *, default_checkpoint: str = "", config: dict[str, Any] | None = None):
        self.paths = paths
        self.default_checkpoint = default_checkpoint
        self._config = dict(config or {})
        for d in (paths.projects, paths.loras):
            os.makedirs(d, exist_ok=True)

    def base_config(self) -> dict[str, Any]:
        cfg = {"pretrained_model_name_or_path": self.default_checkpoint}
        cfg.update(self._config)
        return cfg

    def checkpoint_label(self) -> str:
        return os.path.basename(self.default_checkpoint) if self.default_checkpoint else "(none)"

    def _kind(self) -> tuple[str, str]:
        """(family, prediction_type) of the default checkpoint; SD 1.x when it cannot be read."""
        return (checkpoint_kind(self.default_checkpoint) if self.default_checkpoint else None) or ("sd1", "epsilon")

    def model_family(self) -> str:
        return self._kind()[0]

    def native_resolution(self) -> int:
        return native_resolution_of(*self._kind())

    @contextlib.contextmanager
    def training_session(self, cfg) -> Iterator[None]:
        yield None

    def progress_sink(self, job, stop: threading.Event) -> EventSink | None:
        return None

    def outputs_written(self, paths: list[str]) -> None:
        pass

    def taggers(self):
        return None
