"""scripts/lora_train.py loaded the way the WebUI loads it (spec_from_file_location, module name "lora_train.py")
against stand-in `modules.*`: the tab, the API with --api-auth, the settings, one job manager across reloads,
and the tab that says what is missing."""
import ast
import importlib.util
import os
import sys
import types

import pytest

from lib_lora_train.hosts import webui as webui_host
from lib_lora_train.hosts import webui_deps, webui_support
from webui_standins import make_webui

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "lora_train.py")


class Callbacks(types.ModuleType):
    def __init__(self):
        super().__init__("modules.script_callbacks")
        self.registered = {}
        for name in ("ui_tabs", "app_started", "ui_settings", "before_reload", "script_unloaded", "model_loaded",
                     "before_ui"):
            setattr(self, f"on_{name}", lambda fn, name=None, _k=name: self.registered.setdefault(_k, []).append(fn))


@pytest.fixture
def webui(tmp_path, monkeypatch):
    """Stand-in `modules` package in sys.modules; a fresh process-wide host for each test."""
    w, ns = make_webui(tmp_path)
    monkeypatch.setattr(webui_host, "_SINGLE", {})
    pkg = types.ModuleType("modules")
    pkg.__path__ = []
    ns.callbacks = Callbacks()
    mods = {"scripts": types.SimpleNamespace(basedir=lambda: ROOT), "script_callbacks": ns.callbacks,
            "shared": ns.shared, "call_queue": ns.call_queue, "devices": ns.devices, "paths": ns.paths,
            "progress": ns.progress, "sd_models": ns.sd_models}
    monkeypatch.setitem(sys.modules, "modules", pkg)
    for name, mod in mods.items():
        setattr(pkg, name, mod)
        monkeypatch.setitem(sys.modules, f"modules.{name}", mod)
    monkeypatch.setitem(sys.modules, "networks", ns.networks)     # the built-in Lora's module, by that name
    return ns


def load_script():
    spec = importlib.util.spec_from_file_location("lora_train.py", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_script_imports_only_the_webui_and_the_package():
    tree = ast.parse(open(SCRIPT, encoding="utf-8").read())
    tops = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            tops |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            tops.add(node.module.split(".")[0])
    assert tops <= {"sys", "traceback", "modules", "lib_lora_train"}, tops


def test_registers_api_and_settings_and_keeps_one_job_manager(webui):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    first = load_script()
    assert set(webui.callbacks.registered) == {"ui_tabs", "app_started", "ui_settings", "before_ui"}
    assert first.EXT_DIR == ROOT and first.HOST.webui.networks is None    # found in sys.modules when needed
    webui.callbacks.registered["ui_settings"][0]()
    labels = webui.shared.opts.data_labels
    assert set(labels) == {"lora_train_output_dir", "lora_train_projects_dir"}
    assert all(i.section == ("lora_train", "Train LoRA") and i.category_id == "training" for i in labels.values())
    app = FastAPI()
    webui.callbacks.registered["app_started"][0](None, app)
    client = TestClient(app)
    assert client.get("/lora-train/v1/projects").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert "/lora-train/v1/runs" in paths and "/lora-train/v1/runs/{run_id}/compare" in paths
    # "Reload UI" executes the script again: the same host and job manager (running jobs survive)
    second = load_script()
    assert second.JOBS is first.JOBS and second.HOST is first.HOST
    # the host reaches the built-in Lora's networks module and refreshes its list
    second.HOST.outputs_written(["x.safetensors"])
    assert webui.networks.refreshes == 1


def test_api_auth_protects_the_routes(webui):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    webui.shared.cmd_opts.api_auth = "user:pass"
    load_script()
    app = FastAPI()
    webui.callbacks.registered["app_started"][0](None, app)
    client = TestClient(app)
    assert client.get("/lora-train/v1/projects").status_code == 401
    assert client.get("/lora-train/v1/runs", auth=("user", "nope")).status_code == 401
    assert client.get("/lora-train/v1/projects", auth=("user", "pass")).status_code == 200
    assert client.post("/lora-train/v1/runs", json={"project": "x", "config": {}}).status_code == 401


def html_of(block) -> str:
    return " ".join(str(getattr(c, "value", "")) for c in block.blocks.values())


def test_a_missing_dependency_gives_a_tab_that_says_how_to_fix_it(webui, monkeypatch):
    pytest.importorskip("gradio")
    have = {"diffusers": None, "lycoris-lora": "4.1.3"}
    real = webui_deps.check
    monkeypatch.setattr(webui_deps, "check", lambda: real(lambda n: have[n] if n in have else
                                                          webui_deps.installed_version(n) or "99"))
    module = load_script()
    [(block, title, elem_id)] = webui.callbacks.registered["ui_tabs"][0]()
    assert (title, elem_id) == ("Train LoRA", "lora_train")
    text = html_of(block)
    assert "diffusers &gt;=0.31.0 (not installed)" in text
    assert f"{sys.executable} -m pip install --no-deps diffusers==0.31.0" in text
    assert module.HOST is not None


def test_a_failing_import_is_reported_with_the_verified_pins(webui, monkeypatch):
    pytest.importorskip("gradio")
    monkeypatch.setattr(webui_deps, "check", lambda: webui_deps.Report())
    monkeypatch.setitem(sys.modules, "lycoris", None)      # "import lycoris" raises ImportError
    load_script()
    [(block, _, _)] = webui.callbacks.registered["ui_tabs"][0]()
    text = html_of(block)
    assert "do not import" in text and "lycoris-lora==4.1.3" in text


def test_install_failures_from_the_status_file(tmp_path):
    (tmp_path / ".install_status.json").write_text('{"failed": [{"name": "diffusers", "error": "no network"}]}')
    assert webui_support.install_failures(str(tmp_path)) == ["install.py could not install diffusers: no network"]
    assert webui_support.install_failures(str(tmp_path / "none")) == []


def test_the_real_tab_is_built_when_everything_is_there(webui):
    pytest.importorskip("gradio")
    try:
        from lib_lora_train.ui import build_tab  # noqa: F401
    except ImportError:
        pytest.skip("lib_lora_train.ui is not there yet")
    load_script()
    [(block, title, elem_id)] = webui.callbacks.registered["ui_tabs"][0]()
    assert (title, elem_id) == ("Train LoRA", "lora_train")
    assert "cannot start" not in html_of(block)
