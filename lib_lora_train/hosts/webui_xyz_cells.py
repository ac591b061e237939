"""Failed X/Y/Z cells shown as failed, not black.

A1111's xyz_grid catches an exception of a cell's process_images (e.g. its NansException "A tensor with all NaNs
was produced in Unet") and leaves the cell empty, which the grid then draws as a black square; with
--disable-nan-check a NaN cell comes back as a black picture. Either way the grid says nothing. So the live
xyz_grid module's `process_images` (the name its cells call) is wrapped: for cells that use our axes or belong to
our Compare grid, a failure becomes a grey "failed" tile with the reason (compare.failed) and, for the Compare
grid, an entry in the list its `p` carries (shallow copies share it). Every other cell goes straight to the
original function, untouched; an Interrupt still gives the WebUI's own empty cells.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Optional

from ..compare.failed import FailedCell, bad_image_reason, failed_tile, short_reason

STATE_ATTR = "lora_train_xyz"          # set on a cell's p by our LoRA epoch / weight axes (webui_xyz)
FAILED_ATTR = "lora_train_failed"      # a list on the Compare grid's p: where failed cells are collected
GUARD_MARK = "_lora_train_cell_guard"
_TOKEN = re.compile(r"<lora:([^:>]+):([^>]*)>")


def _interrupted(xyz_module: Any) -> bool:
    state = getattr(xyz_module, "state", None)
    return bool(getattr(state, "interrupted", False) or getattr(state, "stopping_generation", False))


def _ours(p: Any) -> bool:
    return getattr(p, STATE_ATTR, None) is not None or isinstance(getattr(p, FAILED_ATTR, None), list)


def _where(p: Any) -> tuple[Optional[str], Optional[float]]:
    """The LoRA file stem and weight of a cell, from what our axes wrote or from its <lora:...> token."""
    st = getattr(p, STATE_ATTR, None) or {}
    if st.get("name"):
        return st["name"], st.get("weight")
    m = next(iter(_TOKEN.finditer(str(getattr(p, "prompt", "")))), None)
    if m is None:
        return None, None
    try:
        return m.group(1).strip(), float(m.group(2))
    except ValueError:
        return m.group(1).strip(), None


def _record(p: Any, reason: str) -> None:
    sink = getattr(p, FAILED_ATTR, None)
    if isinstance(sink, list):
        stem, weight = _where(p)
        sink.append(FailedCell(reason, None, weight, str(getattr(p, "prompt", "")), stem))


def _size(p: Any) -> tuple[int, int]:
    return int(getattr(p, "width", 512) or 512), int(getattr(p, "height", 512) or 512)


def lora_reason(networks: Optional[Callable[[], Any]], p: Any) -> Optional[str]:
    """Why the cell's LoRA did not take effect, from the built-in Lora extension's loaded_networks after the cell:
    not loaded at all, or loaded with no layer matched (a LoRA of another model family loads "fine" and changes
    nothing; the extension says so only in a debug log)."""
    nets = networks() if networks is not None else None
    stem, _weight = _where(p)
    loaded = getattr(nets, "loaded_networks", None)
    if not stem or not isinstance(loaded, list):
        return None
    net = next((n for n in loaded if getattr(n, "name", None) == stem), None)
    if net is None:
        return f"the WebUI's Lora extension did not load {stem}"
    # Only A1111's extension fills `modules`; Forge's and reForge's (which have `load_lora_state_dict`) patch the
    # weights through their model patchers and leave it empty on every LoRA, so there it says nothing.
    if hasattr(net, "modules") and not net.modules and not hasattr(nets, "load_lora_state_dict"):
        return f"{stem} matched no layer of the loaded model (a LoRA of another model family?)"
    return None


def guard_cells(xyz_module: Any, networks: Optional[Callable[[], Any]] = None) -> bool:
    """Wrap the module's process_images once (idempotent). False when there is nothing to wrap. `networks()`:
    the built-in Lora extension's module (None: not checked)."""
    original = getattr(xyz_module, "process_images", None)
    if original is not None and getattr(original, GUARD_MARK, False):
        if networks is not None:
            original.lora_train_networks = networks      # the caller's view of the extension (latest wins)
        return False
    if original is None:
        return False

    def process_images(p: Any) -> Any:
        if not _ours(p):
            return original(p)
        try:
            res = original(p)
        except Exception as exc:
            if _interrupted(xyz_module):
                raise
            reason = short_reason(exc)
            _record(p, reason)
            return _processed(xyz_module, p, [failed_tile(_size(p), reason)])
        images = list(getattr(res, "images", None) or [])
        if not images or _interrupted(xyz_module):
            return res                      # interrupted: the WebUI's own blank cell
        reason = bad_image_reason(images) or lora_reason(process_images.lora_train_networks, p)
        if reason is not None:
            _record(p, reason)
            res.images = [failed_tile(im.size, reason) for im in images]
        return res

    setattr(process_images, GUARD_MARK, True)
    process_images.lora_train_networks = networks
    process_images.__wrapped__ = original
    xyz_module.process_images = process_images
    return True


def _processed(xyz_module: Any, p: Any, images: list) -> Any:
    """A Processed holding the failed tile, built with the module's own class (its signature is
    Processed(p, images_list, seed, info))."""
    make: Optional[Callable[..., Any]] = getattr(xyz_module, "Processed", None)
    if make is None:
        raise RuntimeError("the X/Y/Z module has no Processed class")
    return make(p, images, getattr(p, "seed", -1), "")
