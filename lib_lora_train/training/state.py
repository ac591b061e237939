"""Resumable training state: one folder per save, written atomically, loaded safely.

Layout of `<output_dir>/<name>-000004-state/` (sd-scripts' folder names; the content is this engine's own,
sd-scripts' Accelerate state folders cannot be resumed):
    network.tensors       the trainable tensors, safetensors format (float32: the exact weights to resume)
    optimizer.torch       optimizer.state_dict()   (torch.save; read back with weights_only=True)
    scheduler.torch       scheduler.state_dict()
    rng_state.torch       global RNG states (optional; the trainer derives step randomness from (seed, step))
    train_state.json      written last: epoch, global_step, engine version, config digest, extra, file sha256s

None is named .safetensors / .pt / .ckpt: in a WebUI the state sits in models/Lora/<project>/, and A1111's, Forge's
and reForge's Lora lists show every such file there as a LoRA ("network", "optimizer", ...). States written with
those older names (format 1) still load.

A save goes to `<dir>.tmp-<pid>` and is renamed into place only once complete; an older state of the same name
is replaced only after that. A load checks every file's sha256 before unpickling anything.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..fsutil import fault_point, fsync_dir
from .. import __version__
from ..errors import ConfigError

log = logging.getLogger(__name__)

STATE_FORMAT = "lib_lora_train.train_state"
FORMAT_VERSION = 2
STATE_JSON = "train_state.json"
NETWORK_FILE = "network.tensors"
OPTIMIZER_FILE = "optimizer.torch"
SCHEDULER_FILE = "scheduler.torch"
RNG_FILE = "rng_state.torch"
_FORMAT_1_NAMES = {NETWORK_FILE: "network.safetensors", OPTIMIZER_FILE: "optimizer.pt",
                   SCHEDULER_FILE: "scheduler.pt", RNG_FILE: "rng_state.pt"}
_ACCELERATE_FILES = ("optimizer.bin", "scheduler.bin", "random_states_0.pkl")


@dataclass
class TrainState:
    path: Path
    epoch: int
    global_step: int
    engine_version: str
    config_digest: str | None
    extra: dict[str, Any]
    network_tensors: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    scheduler_state: dict[str, Any]
    rng_state: dict[str, Any] | None = field(default=None, repr=False)


def config_digest(values: Mapping[str, Any]) -> str:
    """A stable sha256 of a configuration (canonical JSON), to tell whether a resumed run changed settings."""
    text = json.dumps(values, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def save_train_state(state_dir: str | os.PathLike, *, network_tensors: Mapping[str, torch.Tensor],
                     optimizer: torch.optim.Optimizer, scheduler: Any, epoch: int, global_step: int,
                     extra: dict[str, Any] | None = None, config_digest: str | None = None,
                     save_rng: bool = True) -> Path:
    """Write a complete state folder at `state_dir` (atomically replacing an older one); returns its path."""
    final = Path(state_dir)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in network_tensors.items()}  # no views
        save_file(tensors, str(tmp / NETWORK_FILE), metadata={"format": STATE_FORMAT})
        fault_point("state:" + final.name)    # fault tests only: a kill / full disk in the middle of a save
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
        files = [NETWORK_FILE, OPTIMIZER_FILE, SCHEDULER_FILE]
        if save_rng:
            torch.save(capture_rng_state(), tmp / RNG_FILE)
            files.append(RNG_FILE)
        info = {
            "format": STATE_FORMAT,
            "format_version": FORMAT_VERSION,
            "epoch": int(epoch),
            "global_step": int(global_step),
            # the names sd-scripts writes in its train_state.json, for people who look
            "current_epoch": int(epoch),
            "current_step": int(global_step),
            "engine_version": __version__,
            "config_digest": config_digest,
            "extra": extra or {},
            "files": {name: _sha256(tmp / name) for name in files},
        }
        (tmp / STATE_JSON).write_text(json.dumps(info, indent=2, ensure_ascii=False, default=str) + "\n",
                                      encoding="utf-8")
        for name in files + [STATE_JSON]:
            _fsync_file(tmp / name)
        _fsync_dir(tmp)
        _swap_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _swap_into_place(tmp: Path, final: Path) -> None:
    """Directories cannot be renamed over non-empty ones: move the old aside, move the new in, drop the old."""
    if final.exists():
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)
    for leftover in _leftovers(final):  # from earlier saves that were killed before they finished
        shutil.rmtree(leftover, ignore_errors=True)


def _leftovers(final: Path) -> list[Path]:
    if not final.parent.is_dir():
        return []
    pattern = re.compile(re.escape(final.name) + r"\.(tmp|old)-\d+")
    return [p for p in final.parent.glob(f"{glob.escape(final.name)}.*-*")
            if p.is_dir() and pattern.fullmatch(p.name)]


def load_train_state(state_dir: str | os.PathLike) -> TrainState:
    """Read and verify a state folder; any missing, partial or corrupt piece raises ConfigError."""
    path = Path(state_dir)
    if not path.is_dir():
        recovered = _interrupted_swap(path)
        if recovered is None:
            raise ConfigError(f"resume: no saved state folder at '{path}'")
        log.warning("resume: '%s' is missing but a complete state from an interrupted save was found at '%s'",
                    path, recovered)
        path = recovered
    info = _read_info(path)
    files = info["files"]
    for name, digest in files.items():
        if not (path / name).is_file():
            raise ConfigError(f"resume: state '{path}' is incomplete: {name} is missing")
        if _sha256(path / name) != digest:
            raise ConfigError(f"resume: state '{path}' is corrupt: {name} does not match its recorded checksum")
    def named(name: str) -> str | None:       # this format's name, or format 1's
        return name if name in files else (_FORMAT_1_NAMES[name] if _FORMAT_1_NAMES[name] in files else None)

    for name in (NETWORK_FILE, OPTIMIZER_FILE, SCHEDULER_FILE):
        if named(name) is None:
            raise ConfigError(f"resume: state '{path}' does not list {name} in {STATE_JSON}")
    try:
        tensors = load_file(str(path / named(NETWORK_FILE)))
    except Exception as e:
        raise ConfigError(f"resume: cannot read {path / named(NETWORK_FILE)}: {e}") from e
    return TrainState(
        path=path,
        epoch=info["epoch"],
        global_step=info["global_step"],
        engine_version=str(info.get("engine_version", "")),
        config_digest=info.get("config_digest"),
        extra=dict(info.get("extra") or {}),
        network_tensors=tensors,
        optimizer_state=_torch_load(path / named(OPTIMIZER_FILE)),
        scheduler_state=_torch_load(path / named(SCHEDULER_FILE)),
        rng_state=_torch_load(path / named(RNG_FILE)) if named(RNG_FILE) else None,
    )


def restore_into(state: TrainState, network: Any, optimizer: torch.optim.Optimizer, scheduler: Any, *,
                 restore_rng: bool = False) -> None:
    """Put a loaded state back into freshly built network, optimizer and scheduler (built with the same config)."""
    try:
        if hasattr(network, "load_tensors"):
            network.load_tensors(state.network_tensors)
        else:
            network.load_state_dict(state.network_tensors, strict=True)
    except (KeyError, RuntimeError, ValueError) as e:
        raise ConfigError(f"resume: the saved network in '{state.path}' does not fit the configured network "
                          f"(different network_module / network_dim / targets?): {e}") from e
    try:
        optimizer.load_state_dict(state.optimizer_state)
    except (KeyError, RuntimeError, ValueError) as e:
        raise ConfigError(f"resume: the saved optimizer state in '{state.path}' does not fit this optimizer "
                          f"(different optimizer_type or parameter groups?): {e}") from e
    try:
        scheduler.load_state_dict(state.scheduler_state)
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise ConfigError(f"resume: the saved lr scheduler state in '{state.path}' does not fit this scheduler: "
                          f"{e}") from e
    if restore_rng and state.rng_state is not None:
        restore_rng_state(state.rng_state)


_STATE_NAME = r"(?:-(?P<epoch>\d+)|-step(?P<step>\d+))?-state"


def find_latest_state(output_dir: str | os.PathLike, output_name: str) -> Path | None:
    """The most advanced valid state of `output_name` in `output_dir` (by global step), or None.

    Matches sd-scripts' names `<name>-state`, `<name>-000004-state` and `<name>-step00000500-state`; temporary
    folders of interrupted saves and folders that are not this engine's states are skipped.
    """
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    pattern = re.compile(re.escape(output_name) + _STATE_NAME + r"$")
    best: tuple[tuple[int, int, float], Path] | None = None
    for entry in folder.iterdir():
        if not entry.is_dir() or not pattern.fullmatch(entry.name):
            continue
        try:
            info = _read_info(entry)
        except ConfigError as e:
            log.info("skipping %s: %s", entry, e)
            continue
        key = (info["global_step"], info["epoch"], entry.stat().st_mtime)
        if best is None or key > best[0]:
            best = (key, entry)
    return best[1] if best else None


def capture_rng_state() -> dict[str, Any]:
    """Global RNG states as plain values that `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (str(np_state[0]), [int(x) for x in np_state[1]], int(np_state[2]), int(np_state[3]),
                  float(np_state[4])),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    try:
        if "python" in state:
            version, internal, gauss = state["python"]
            random.setstate((version, tuple(internal), gauss))
        if "numpy" in state:
            name, keys, pos, has_gauss, cached = state["numpy"]
            np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        if "torch" in state:
            torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise ConfigError(f"resume: the saved RNG state cannot be restored: {e}") from e


def _read_info(path: Path) -> dict[str, Any]:
    json_path = path / STATE_JSON
    if not json_path.is_file():
        if any((path / name).exists() for name in _ACCELERATE_FILES):
            raise ConfigError(f"resume: '{path}' is an sd-scripts (Accelerate) state, which this engine cannot "
                              f"resume; start from its saved LoRA with network_weights instead")
        raise ConfigError(f"resume: '{path}' is not a complete training state ({STATE_JSON} is missing)")
    try:
        info = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"resume: {json_path} is unreadable: {e}") from e
    if not isinstance(info, dict) or info.get("format") != STATE_FORMAT:
        raise ConfigError(f"resume: {json_path} is not a {STATE_FORMAT} file")
    if not isinstance(info.get("format_version"), int) or info["format_version"] > FORMAT_VERSION:
        raise ConfigError(f"resume: {json_path} has format version {info.get('format_version')!r}; this engine "
                          f"reads up to {FORMAT_VERSION} (saved by a newer version?)")
    for key in ("epoch", "global_step"):
        value = info.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"resume: {json_path} has an invalid {key}: {value!r}")
    files = info.get("files")
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise ConfigError(f"resume: {json_path} has no valid file list")
    if any(Path(name).name != name for name in files):
        raise ConfigError(f"resume: {json_path} lists files outside its folder")
    return info


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types; all mean the same here
        raise ConfigError(f"resume: cannot read {path} safely: {e}") from e


def _interrupted_swap(path: Path) -> Path | None:
    """A complete `<name>.tmp-*` or `<name>.old-*` left by a save interrupted between its two renames."""
    # a complete new state (tmp) is newer than the one it was replacing (old)
    candidates = sorted(_leftovers(path), reverse=True,
                        key=lambda p: (p.name.rsplit(".", 1)[1].startswith("tmp"), p.stat().st_mtime))
    for candidate in candidates:
        try:
            _read_info(candidate)
            return candidate
        except ConfigError:
            continue
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fsync_dir(os.fspath(path))
