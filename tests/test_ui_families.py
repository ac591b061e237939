"""The tab follows the model family: the Preprocess target and the run's resolution default are the family's
native size (1024 SDXL, 768 SD 2.x v, 512 SD 1.x), and the base-model label names the family, on the standalone
page (from its checkpoint, read cheaply) and in the WebUI (from the loaded model)."""
import pytest

gr = pytest.importorskip("gradio")

from lib_lora_train.hosts.standalone import StandaloneHost  # noqa: E402
from lib_lora_train.hosts.webui import WebUIHost  # noqa: E402
from lib_lora_train.jobs import JobManager  # noqa: E402
from lib_lora_train.models import write_tiny_checkpoint  # noqa: E402
from lib_lora_train.ui import build_tab, project_section  # noqa: E402
from lib_lora_train.ui import tab as tab_module  # noqa: E402
from webui_standins import make_webui  # noqa: E402


def _value(blocks, elem_id):
    return next(b.value for b in blocks.blocks.values() if getattr(b, "elem_id", None) == elem_id)


@pytest.mark.parametrize("family, v_pred, size, label", [
    ("sdxl", False, 1024, "SDXL"), ("sd2", True, 768, "SD 2.x v-prediction"), ("sd1", False, 512, "SD 1.x")])
def test_standalone_page_defaults_follow_the_checkpoint_family(tmp_path, family, v_pred, size, label):
    ckpt = tmp_path / f"tiny_{family}.safetensors"
    kw = {"v_pred": True} if v_pred else {}
    write_tiny_checkpoint(str(ckpt), seed=0, family=family, **kw)
    host = StandaloneHost(str(tmp_path / "data"), checkpoint=str(ckpt))
    assert (host.model_family(), host.native_resolution()) == (family, size)
    assert host.base_config()["resolution"] == str(size)
    assert host.checkpoint_label() == f"tiny_{family}.safetensors ({label})"
    blocks = build_tab(host, JobManager(host))
    assert _value(blocks, "lora_train_pp_resolution") == size
    assert _value(blocks, "lora_train_base_model").endswith(f"({label})")
    ctx = blocks.lora_train_ctx
    project_section.create(ctx, "p", "zkz", "character")
    view = tab_module.open_view(ctx, "p")
    assert view["pp_resolution"] == size and view["base_model"].endswith(f"({label})")


def test_standalone_tiny_default_keeps_its_own_size(tmp_path):
    host = StandaloneHost(str(tmp_path / "data"))
    assert host.native_resolution() == 64 and host.base_config()["resolution"] == "64"
    assert host.checkpoint_label().endswith("(tiny test model)")


def test_webui_tab_follows_the_loaded_model_when_it_changes(tmp_path):
    """The WebUI builds the tab before it loads a model: the page load (open_view) reads the family again."""
    w, ns = make_webui(tmp_path)
    host = WebUIHost(w)
    blocks = build_tab(host, JobManager(host))
    ctx = blocks.lora_train_ctx
    project_section.create(ctx, "p", "zkz", "character")
    assert tab_module.open_view(ctx, "p")["pp_resolution"] == 512
    ns.shared.sd_model.is_sdxl = True              # another checkpoint loaded: SDXL
    ns.sd_models.model_data.sd_model.is_sdxl = True
    view = tab_module.open_view(ctx, "p")
    assert view["pp_resolution"] == 1024 and view["base_model"].endswith("(SDXL)")
    assert host.base_config()["resolution"] == "1024"


def test_progress_line_shows_one_eta_that_the_webui_bar_replaces():
    """Inside the WebUI its own bar carries the run's ETA (the host sets it so); the tab's text line hides its ETA
    while that bar is shown (a CSS rule the tab's script adds), so one ETA is on screen."""
    from types import SimpleNamespace

    from lib_lora_train.ui import train_section
    from lib_lora_train.ui.app import JS_FILE

    job = SimpleNamespace(status="running", total_steps=10, step=3, epoch=1, epochs=2, loss=0.1, avg_loss=None,
                          it_per_s=2.0, active=True, eta_s=65.0, started=1.0, finished=None)
    out = train_section.progress_html(job, task_id="task(lora-train-x)")
    assert out.count("ETA") == 1 and '<span class="lora-train-eta"> · ETA 1:05</span>' in out
    with open(JS_FILE, encoding="utf-8") as fh:
        assert ".lora-train-webui-progress .lora-train-eta{display:none;}" in fh.read()
