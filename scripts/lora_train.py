"""Train LoRA: the only file the WebUI loads. It hands the WebUI's modules to the engine's WebUI host and
registers the tab, the HTTP API and the settings; everything else lives in the `lib_lora_train` package.

The WebUI puts this extension's folder on sys.path only while it loads this file (so the package is imported
now) and executes the file again on every "Reload UI" (the host and its job manager live in
`lib_lora_train.hosts.webui`, which is not re-executed, so running jobs survive a reload).
"""
import sys
import traceback

from modules import call_queue, devices, paths, progress, script_callbacks, scripts, sd_models, shared

EXT_DIR = scripts.basedir()     # the extension's folder now; the WebUI's root once loading is over

from lib_lora_train.hosts import webui as webui_host  # noqa: E402  (importable now: EXT_DIR is on sys.path)
from lib_lora_train.hosts import webui_support  # noqa: E402


def _optional(name):
    try:
        return __import__(f"modules.{name}", fromlist=[name])
    except Exception:  # noqa: BLE001 - a fork without it: that feature is simply off
        return None


WEBUI = webui_host.WebUI(shared=shared, devices=devices, call_queue=call_queue, paths=paths, sd_models=sd_models,
                         progress=progress, lowvram=_optional("lowvram"), deepbooru=_optional("deepbooru"),
                         images=_optional("images"))
from lib_lora_train.hosts import adapters as host_adapters, detect as host_detect  # noqa: E402
HOST_KIND = host_detect.host_kind(sd_models)     # "a1111", "forge" or "reforge", by structure
HOST, JOBS = webui_host.host_and_jobs(WEBUI, ext_dir=EXT_DIR, host_class=host_adapters.host_class(HOST_KIND))


def register_xyz_axes():
    """"LoRA epoch" and "LoRA weight" on the WebUI's X/Y/Z plot (idempotent: also after "Reload UI")."""
    try:
        from lib_lora_train.hosts import webui_xyz
        if not webui_xyz.ensure_axes(scripts, lambda: HOST.paths.loras):
            print("[lora-train] X/Y/Z plot script not found: no LoRA epoch/weight axes", flush=True)
    except Exception:  # noqa: BLE001 - the tab works without the axes
        traceback.print_exc()


register_xyz_axes()     # the WebUI's own xyz_grid.py is loaded before extension scripts


def on_ui_tabs():
    problem, command = webui_support.dependency_problem(EXT_DIR, sys.executable)
    if problem is None:
        try:
            from lib_lora_train.ui import build_tab
            return [(build_tab(HOST, JOBS), webui_host.TAB_TITLE, webui_host.TAB_ID)]
        except Exception as exc:  # noqa: BLE001 - the tab still appears and says why it cannot work
            traceback.print_exc()
            problem, command = f"The tab could not be built: {type(exc).__name__}: {exc}", None
    print(f"[lora-train] {problem}" + (f"\n[lora-train] fix: {command}" if command else ""), flush=True)
    return [(webui_support.dependency_tab(problem, command), webui_host.TAB_TITLE, webui_host.TAB_ID)]


def on_app_started(demo, app):
    try:
        from lib_lora_train import api
    except Exception as exc:  # noqa: BLE001
        print(f"[lora-train] the HTTP API is off: {type(exc).__name__}: {exc}", flush=True)
        return
    auth = webui_support.api_auth_dependencies(getattr(shared.cmd_opts, "api_auth", None))
    api.mount(app, JOBS, dependencies=auth)     # routes added to the app directly: the WebUI's auth is not on them
    try:
        from lib_lora_train.compare_api import mount_compare
        mount_compare(app, JOBS, HOST, dependencies=auth)
    except Exception:  # noqa: BLE001
        traceback.print_exc()


def on_ui_settings():
    webui_support.register_settings(shared)


script_callbacks.on_before_ui(register_xyz_axes)
script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_app_started(on_app_started)
script_callbacks.on_ui_settings(on_ui_settings)
