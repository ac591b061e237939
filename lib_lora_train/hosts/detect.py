"""Which WebUI is hosting the extension: AUTOMATIC1111, lllyasviel's Forge (2.x) or Panchovix's reForge, told by
structure, never by a version string.

- Forge 2.x loads models lazily through `sd_models.forge_model_reload()` and has its own `backend` package
  (`backend.memory_management`) next to `modules_forge`; it has no `ldm_patched`.
- reForge keeps the A1111 1.10 layout and adds `ldm_patched` (ComfyUI-style model management) and
  `modules_forge`; its `sd_models` has no `forge_model_reload`.
- A1111 has neither `modules_forge` nor `ldm_patched`.

Nothing here imports the WebUI: `find_spec` only asks where a package would come from.
"""
import importlib.util
from typing import Any, Callable, Optional

A1111, FORGE, REFORGE = "a1111", "forge", "reforge"

FORGE_MEMORY = "backend.memory_management"           # Forge 2.x's memory manager
REFORGE_MEMORY = "ldm_patched.modules.model_management"   # reForge's (ComfyUI's) memory manager


def _has(find_spec: Callable[[str], Any], name: str) -> bool:
    try:
        return find_spec(name) is not None
    except (ImportError, ValueError, AttributeError):     # a parent package that is not a package
        return False


def host_kind(sd_models: Any = None, *, find_spec: Optional[Callable[[str], Any]] = None) -> str:
    """"forge", "reforge" or "a1111", from what the running WebUI is made of."""
    find_spec = find_spec or importlib.util.find_spec
    forge_parts = _has(find_spec, "modules_forge")
    if forge_parts and callable(getattr(sd_models, "forge_model_reload", None)) and \
            _has(find_spec, "backend") and _has(find_spec, FORGE_MEMORY):
        return FORGE
    if forge_parts and _has(find_spec, "ldm_patched") and _has(find_spec, REFORGE_MEMORY):
        return REFORGE
    return A1111
