"""The host adapter for a host kind told by hosts/detect.py (each a thin subclass of the A1111 one). Kept apart
from detect.py, which the adapters themselves import, so the imports stay one-way."""
from __future__ import annotations

from .detect import FORGE, REFORGE


def host_class(kind: str):
    """The adapter class of a host kind: ForgeHost, ReForgeHost or the A1111 WebUIHost."""
    if kind == FORGE:
        from .forge import ForgeHost
        return ForgeHost
    if kind == REFORGE:
        from .reforge import ReForgeHost
        return ReForgeHost
    from .webui import WebUIHost
    return WebUIHost
