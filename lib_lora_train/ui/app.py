"""The standalone page: `python -m lib_lora_train ui [--host 127.0.0.1] [--port 7861] [--data DIR] [--lang zh_CN]`.

The same tab as inside the WebUI, on a StandaloneHost (the embedded tiny model by default), with the tab's
JavaScript and style.css injected (the WebUI loads those itself). Listens on 127.0.0.1 unless told otherwise.
"""
from __future__ import annotations

import argparse
import os
from typing import Any

from .i18n import REPO_ROOT

JS_FILE = os.path.join(REPO_ROOT, "javascript", "lora_train.js")
CSS_FILE = os.path.join(REPO_ROOT, "style.css")


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except OSError:
        return ""


def build_app(host: Any, jobs: Any, *, lang: str | None = None) -> Any:
    """The page: a Blocks holding the tab (rendered inside it, as the WebUI does) plus the JS and CSS."""
    import gradio as gr

    from .compat import js_kwargs
    from .tab import build_tab

    tab = build_tab(host, jobs, lang=lang)
    with gr.Blocks(title="Train LoRA", css=_read(CSS_FILE), analytics_enabled=False) as page:
        tab.render()
        js = _read(JS_FILE)
        if js:
            page.load(None, None, None, **js_kwargs("() => {\n" + js + "\n}"))
    page.lora_train_ctx = tab.lora_train_ctx
    return page


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this computer "
                                                       "only)")
    p.add_argument("--port", type=int, default=7861, help="port (default 7861)")
    p.add_argument("--data", default="./lora_train_data",
                   help="data folder with projects/, loras/ and models/ (default ./lora_train_data)")
    p.add_argument("--lang", default=None, help="page language: zh_CN (default English)")
    p.add_argument("--checkpoint", default=None, help="base model (default: the embedded tiny model)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lib_lora_train ui", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    from ..hosts.standalone import StandaloneHost
    from ..jobs import JobManager

    host = StandaloneHost(args.data, checkpoint=args.checkpoint)
    jobs = JobManager(host)
    page = build_app(host, jobs, lang=args.lang)
    page.queue()
    print(f"Train LoRA: data in {host.data_dir}, base model {host.default_checkpoint}", flush=True)
    app, _, _ = page.launch(server_name=args.host, server_port=args.port, inbrowser=False, show_api=False,
                            allowed_paths=[host.data_dir], prevent_thread_lock=True)
    mount_api(app, host, jobs)
    print(f"HTTP API: http://{args.host}:{args.port}/lora-train/v1/ (documented on /docs)", flush=True)
    page.block_thread()
    return 0


def mount_api(app: Any, host: Any, jobs: Any) -> None:
    """The same /lora-train/v1 routes as inside the WebUI, on the page's own server."""
    from ..api import mount
    from ..compare_api import mount_compare

    mount(app, jobs)
    mount_compare(app, jobs, host)


def register(subparsers: Any) -> None:
    """`ui` in the main CLI (gradio is imported only when the command runs)."""
    u = subparsers.add_parser("ui", help="the Train LoRA page in a browser (needs gradio)",
                              description="Serve the Train LoRA tab as a standalone page.")
    add_arguments(u)
    u.set_defaults(func=lambda args, rest: run(args))
