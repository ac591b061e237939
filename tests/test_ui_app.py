"""The standalone page: its host, its command line, the JS and CSS it injects; the form store."""
import os

import pytest

from lib_lora_train.cli import build_parser
from lib_lora_train.hosts.standalone import TINY_RANDOM, StandaloneHost, default_checkpoint
from lib_lora_train.ui import form_store
from lib_lora_train.ui.app import CSS_FILE, JS_FILE


def test_cli_ui_defaults_to_this_computer_only():
    args = build_parser().parse_args(["ui"])
    assert (args.host, args.port, args.data, args.lang) == ("127.0.0.1", 7861, "./lora_train_data", None)
    args = build_parser().parse_args(["ui", "--port", "7899", "--data", "/tmp/x", "--lang", "zh_CN"])
    assert (args.port, args.data, args.lang) == (7899, "/tmp/x", "zh_CN")


def test_standalone_host_folders_and_model(tmp_path, monkeypatch):
    import lib_lora_train.demo as demo
    monkeypatch.setattr(demo, "BASE_MODEL", tmp_path / "absent.safetensors")
    host = StandaloneHost(str(tmp_path / "data"))
    assert host.paths.projects == str(tmp_path / "data" / "projects")
    assert host.paths.loras == str(tmp_path / "data" / "loras")
    assert str(tmp_path / "data" / "models") in host.paths.models
    assert host.default_checkpoint == str(tmp_path / "data" / "models" / TINY_RANDOM)
    mtime = os.path.getmtime(host.default_checkpoint)
    assert default_checkpoint(str(tmp_path / "data")) == host.default_checkpoint    # written once
    assert os.path.getmtime(host.default_checkpoint) == mtime
    cfg = host.base_config()
    assert cfg["resolution"] == "64" and cfg["device"] == "cpu"
    assert cfg["pretrained_model_name_or_path"] == host.default_checkpoint
    embedded = tmp_path / "tiny_base.safetensors"
    embedded.write_bytes(b"x")
    monkeypatch.setattr(demo, "BASE_MODEL", embedded)
    assert StandaloneHost(str(tmp_path / "data2")).default_checkpoint == str(embedded)


def test_form_store_round_trip(tmp_path):
    assert form_store.load_form(str(tmp_path)) == {}
    form_store.save_form(str(tmp_path), {"network_dim": 16, "purpose": "style"})
    form_store.save_form(str(tmp_path), {"seed": 3})
    assert form_store.load_form(str(tmp_path)) == {"network_dim": 16, "purpose": "style", "seed": 3}
    (tmp_path / form_store.FORM_FILE).write_text("{broken")
    assert form_store.load_form(str(tmp_path)) == {}                      # falls back to the defaults
    assert form_store.last_project(str(tmp_path)) is None
    form_store.set_last_project(str(tmp_path), "p")
    assert form_store.last_project(str(tmp_path)) == "p"


def test_page_injects_js_and_css(tmp_path):
    pytest.importorskip("gradio")
    from lib_lora_train.jobs import JobManager
    from lib_lora_train.ui.app import build_app
    js = open(JS_FILE, encoding="utf-8").read()
    assert "lora_train_poll" in js and "lora_train_root" in js
    assert "lora-train-progress" in open(CSS_FILE, encoding="utf-8").read()
    host = StandaloneHost(str(tmp_path / "data"), checkpoint=str(tmp_path / "m.safetensors"))
    page = build_app(host, JobManager(host))
    assert "lora-train-progress" in (page.css or "")
    scripts = [d.get("js") for d in page.get_config_file()["dependencies"] if d.get("js")]
    assert any("lora_train_poll" in s for s in scripts)
    assert any(getattr(b, "elem_id", None) == "lora_train_train_button" for b in page.blocks.values())
