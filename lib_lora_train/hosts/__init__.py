"""Hosts run the engine and render its events: the standalone page, the WebUI tab (the CLI is `cli.py`).

`base.Host` is the one interface the tab, the job manager and the HTTP API talk to; `standalone.py` and
`webui.py` implement it. Nothing here imports the WebUI: `webui.py` is handed the WebUI's modules by the
extension's `scripts/` file.
"""
from .base import Host, HostPaths, safe_child

__all__ = ["Host", "HostPaths", "safe_child"]
