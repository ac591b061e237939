"""Merge LoRAs into the weights of a model that is already loaded (the WebUI's), without writing a file, and
restore the exact original weights afterwards.

The host hands over a `LiveModel`: a view of the loaded model's tensors under their single-file (ldm) checkpoint
names plus the lock that keeps generation / training away while the weights change. `LiveMerger.apply` runs
`tools.merge.merge_into_state_dict` on that view (the same arithmetic as merging into a checkpoint file, so the
live result equals a file merge at the model's own precision), keeps a copy of every tensor it changes (on the
CPU by default, to spare GPU memory) and writes the new values into the live tensors in place. `restore` copies
the saved tensors back: bit-for-bit the weights from before.

A restore after something else rewrote the same weights (another checkpoint loaded, a generation-time LoRA
patcher restoring its own backup) would put stale weights into the model, so every apply keeps a fingerprint
of what it wrote and restore refuses when the live weights no longer match it (force=True overrides).
"""
from __future__ import annotations

import contextlib
import itertools
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Mapping, Protocol, Sequence, Union

import torch

from ..errors import ConfigError, ModelError


class LiveModel(Protocol):
    """What a host provides as `host.live_model` (None or no attribute: no live merging).

    Optional extras, called when present:
      label() -> str                 what to call the loaded model in messages
      before_write() -> None         just before the weights change (e.g. the WebUI drops the Lora extension's
                                     weight backups, so its next <lora:...> application starts from these weights)
      after_write(keys) -> None      after the weights changed (apply and restore)
      busy() -> str | None           a reason not to touch the weights now (e.g. "a training run uses the model")
    """

    lock: ContextManager[Any]        # held while the weights are read and written (the WebUI's queue lock)

    def state_dict_view(self) -> Mapping[str, torch.Tensor]:
        """ldm checkpoint key -> the live tensor itself (written in place), for at least the UNet and text
        encoder weights."""


def strip_wrapped(name: str) -> str:
    """The checkpoint key of a live parameter name: the WebUI's hijack nests modules under `.wrapped`."""
    return ".".join(p for p in name.split(".") if p != "wrapped")


class ModuleLiveModel:
    """A LiveModel over an nn.Module whose parameter names are ldm keys (possibly with `.wrapped` levels, as
    the WebUI's hijacked model has): what the WebUI host and the tests use."""

    def __init__(self, module: torch.nn.Module, lock: ContextManager[Any] | None = None, name: str = "model"):
        self.module = module
        self.lock = lock if lock is not None else threading.RLock()
        self.name = name

    def state_dict_view(self) -> dict[str, torch.Tensor]:
        view: dict[str, torch.Tensor] = {}
        alias = "cond_stage_model." if hasattr(self.module, "conditioner") else None   # SDXL: its conditioner again
        for name, t in itertools.chain(self.module.named_parameters(), self.module.named_buffers()):
            if alias is None or not name.startswith(alias):
                view.setdefault(strip_wrapped(name), t)
        return view

    def label(self) -> str:
        return self.name


def _fingerprint(t: torch.Tensor) -> tuple[float, float]:
    d = t.detach().double()
    return float(d.sum()), float(d.abs().sum())


def _same(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b))


@dataclass
class LiveMergeHandle:
    """One applied live merge; give it to LiveMerger.restore."""
    id: int
    description: str                        # "a.safetensors ×1, b.safetensors ×0.5"
    keys: list[str]                         # checkpoint keys changed
    backup: dict[str, torch.Tensor]         # their values before the merge (copies)
    written: dict[str, tuple[float, float]]  # fingerprints of the values written
    merged: dict[str, int]                  # input name -> modules merged
    skipped: dict[str, int]                 # input name -> modules the model lacks
    seconds: float
    created: float = field(default_factory=time.time)
    restored: bool = False

    def summary(self) -> str:
        text = f"{self.description}: {len(self.keys)} tensors changed"
        skipped = sum(self.skipped.values())
        return text + (f", {skipped} modules skipped (not in this model)" if skipped else "")


LiveSource = Union[LiveModel, Callable[[], Any]]


def resolve_live(source: Any) -> Any:
    """The LiveModel behind a host attribute that may be the object itself or a function returning it."""
    if source is not None and not hasattr(source, "state_dict_view") and callable(source):
        source = source()
    if source is None:
        raise ModelError("no model is loaded to merge into (load a checkpoint first)")
    if not hasattr(source, "state_dict_view"):
        raise ModelError("this host's live model does not offer its weights (no state_dict_view)")
    return source


def _hook(live: Any, name: str, *args) -> Any:
    fn = getattr(live, name, None)
    return fn(*args) if callable(fn) else None


def _lock(live: Any) -> ContextManager[Any]:
    lock = getattr(live, "lock", None)
    return lock if lock is not None else contextlib.nullcontext()


class LiveMerger:
    """Applies LoRAs to a live model and restores it; keeps the applied merges as a stack (restore in reverse
    order, or everything at once with restore_all)."""

    def __init__(self, source: LiveSource, *, backup_device: str | torch.device = "cpu"):
        self._source = source
        self.backup_device = backup_device
        self._applied: list[LiveMergeHandle] = []
        self._ids = itertools.count(1)
        self._guard = threading.Lock()      # one apply / restore at a time through this merger

    @property
    def applied(self) -> list[LiveMergeHandle]:
        return list(self._applied)

    def live(self) -> Any:
        return resolve_live(self._source)

    def apply(self, loras: Sequence[Any], ratios: Sequence[float] | None = None,
              block_weights: Sequence[Any] | None = None, *, ranks: Sequence[int | None] | None = None,
              merge_dtype: str | torch.dtype = "float", sink=None, stop: threading.Event | None = None
              ) -> LiveMergeHandle:
        """Merge `loras` (paths, tensors or LoraInput) at `ratios` with optional per-LoRA block weights (LBW
        presets / 17 or 26 values) into the live weights. Nothing changes if an error is raised or `stop` is
        set before the weights are written."""
        from ..tools.merge import LoraInput, merge_into_state_dict

        specs = _specs(LoraInput, loras, ratios, block_weights, ranks)
        live = self.live()
        busy = _hook(live, "busy")
        if busy:
            raise ConfigError(f"the loaded model cannot be changed now: {busy}")
        t0 = time.time()
        with self._guard, _lock(live):
            # First, so the merge is computed from (and restores to) the weights a host's own patcher would
            # also restore to, not from its leftovers (the WebUI's Lora extension merges in place).
            _hook(live, "before_write")
            view = live.state_dict_view()
            work = dict(view)
            report = merge_into_state_dict(work, specs, merge_dtype=merge_dtype, sink=sink, stop=stop)
            if stop is not None and stop.is_set():
                from ..errors import Interrupted
                raise Interrupted("live merge stopped on request; the model is unchanged")
            keys = list(report.changed_keys)
            backup = {k: view[k].detach().to(self.backup_device, copy=True) for k in keys}
            written: list[str] = []
            try:
                with torch.no_grad():
                    for k in keys:
                        view[k].copy_(work[k])
                        written.append(k)
            except BaseException:
                with torch.no_grad():
                    for k in written:
                        view[k].copy_(backup[k])
                raise
            finally:
                del work
            prints = {k: _fingerprint(view[k]) for k in keys}
            _hook(live, "after_write", keys)
        names = [_label(s.source) for s in specs]
        handle = LiveMergeHandle(
            next(self._ids), ", ".join(f"{n} ×{s.ratio:g}" for n, s in zip(names, specs)), keys, backup, prints,
            dict(report.merged), {k: len(v) for k, v in report.skipped.items()}, time.time() - t0)
        self._applied.append(handle)
        return handle

    def restore(self, handle: LiveMergeHandle | None = None, *, force: bool = False) -> LiveMergeHandle:
        """Put back the weights from before `handle` (default: the last merge). Only the last applied merge can
        be restored (the earlier ones' saved weights do not include the later ones' changes)."""
        with self._guard:
            if not self._applied:
                raise ConfigError("no live merge to restore")
            handle = handle or self._applied[-1]
            if handle.restored or handle not in self._applied:
                raise ConfigError(f"live merge #{handle.id} is not applied")
            if handle is not self._applied[-1]:
                raise ConfigError(f"live merge #{handle.id} has later merges on top; restore those first "
                                  f"(or restore all)")
            live = self.live()
            with _lock(live):
                _hook(live, "before_write")     # a host patcher's leftovers undone first (they sit on our merge)
                view = live.state_dict_view()
                missing = [k for k in handle.keys if k not in view]
                changed = [k for k in handle.keys if k in view and not _same(_fingerprint(view[k]), handle.written[k])]
                if (missing or changed) and not force:
                    what = missing or changed
                    raise ModelError(
                        f"the loaded model's weights changed after the merge was applied ({len(what)} tensors, "
                        f"e.g. {what[0]}): another checkpoint was loaded or something else rewrote them. "
                        f"Restoring would write stale weights; reload the checkpoint instead, or discard the merge")
                with torch.no_grad():
                    for k in handle.keys:
                        if k in view:
                            view[k].copy_(handle.backup[k])
                _hook(live, "after_write", list(handle.keys))
            self._forget(handle)
            return handle

    def restore_all(self, *, force: bool = False) -> list[LiveMergeHandle]:
        done = []
        while self._applied:
            done.append(self.restore(self._applied[-1], force=force))
        return done

    def discard(self) -> int:
        """Forget every applied merge without touching the weights (after the model was reloaded anyway)."""
        with self._guard:
            n = len(self._applied)
            for h in list(self._applied):
                self._forget(h)
            return n

    def _forget(self, handle: LiveMergeHandle) -> None:
        handle.restored = True
        handle.backup = {}
        self._applied.remove(handle)


def _specs(LoraInput, loras, ratios, block_weights, ranks) -> list:
    loras = list(loras)
    if not loras:
        raise ConfigError("no LoRA given to merge")
    n = len(loras)
    for what, values in (("ratios", ratios), ("block weights", block_weights), ("ranks", ranks)):
        if values is not None and len(values) != n:
            raise ConfigError(f"{n} LoRAs but {len(values)} {what}: give one per LoRA")
    out = []
    for i, src in enumerate(loras):
        if isinstance(src, LoraInput):
            out.append(src)
            continue
        out.append(LoraInput(src, float(ratios[i]) if ratios is not None else 1.0,
                             block_weights[i] if block_weights is not None else None,
                             ranks[i] if ranks is not None else None))
    return out


def _label(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.path.basename(os.fspath(source))
    return getattr(source, "name", None) or "network"
