"""The tab's regularisation images (ui/regimages_section.py) on a BasicHost with the tiny model: the controls are
there, "Generate regularisation images" reports progress and the result, its fields are saved with the project,
and a run started with "Use them in the run" trains on the cached images without drawing them again."""
import os
import time

import pytest

gr = pytest.importorskip("gradio")

from lib_lora_train.demo.toy import make_toy_dataset  # noqa: E402
from lib_lora_train.ui import form_store, params_section, project_section, train_section  # noqa: E402
from lib_lora_train.ui import tab as tab_module  # noqa: E402
from lib_lora_train.ui.presets import FORM_KEYS  # noqa: E402
from lib_lora_train.ui.regimages_section import generate, run_keys  # noqa: E402
from ui_support import tiny_tab  # noqa: E402


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui")
    blocks, _ = tiny_tab(root)
    src = make_toy_dataset(str(root / "toy"), 2)
    toy = next(src / n for n in sorted(os.listdir(src)) if (src / n).is_dir())
    return blocks, blocks.lora_train_ctx, str(toy)


def test_controls_generate_save_and_a_run_uses_them(ui):
    blocks, ctx, toy = ui
    ids = {getattr(b, "elem_id", None) for b in blocks.blocks.values()}
    assert {"lora_train_reg_prompt", "lora_train_reg_count", "lora_train_reg_weight", "lora_train_reg_use",
            "lora_train_reg_generate", "lora_train_reg_status"} <= ids
    project_section.create(ctx, "rho", "zkz", "concept")
    project_section.import_folder(ctx, "rho", toy, False, "white", "keep aspect ratio", 64, False)
    root = ctx.host.paths.project_dir("rho")
    values = [params_section.form_for_project(ctx, type("P", (), {"root": root, "purpose": None})())[k]
              for k in FORM_KEYS]
    form = dict(zip(FORM_KEYS, values))
    form.update(repeats=1, train_batch_size=2, max_train_epochs=1, network_dim=2, network_alpha=1,
                save_every_n_epochs=0, resolution=64)
    form_store.save_form(root, form)
    lines = list(generate(ctx, "rho", "a toy", 3, 0.5, True))
    assert lines[0].startswith("drawing 3 images of 'a toy' at 64x64")
    assert "3 images ready" in lines[-1] and "0 from the cache, 3 drawn by the built-in sampler" in lines[-1]
    assert "the next run uses them" in lines[-1]
    assert run_keys(root) == {"reg_images_prompt": "a toy", "prior_loss_weight": 0.5, "reg_images_count": 3}
    # the fields come back when the project is opened again
    opened = tab_module.open_view(ctx, "rho")
    assert (opened["reg_prompt"], opened["reg_count"], opened["reg_weight"], opened["reg_use"]) == \
        ("a toy", 3, 0.5, True)
    again = list(generate(ctx, "rho", "a toy", 3, 0.5, True))
    assert "3 from the cache, 0 drawn" in again[-1]
    assert list(generate(ctx, None, "a toy", 3, 0.5, True))[-1].startswith("error: open or create a project")
    out = train_section.start(ctx, "rho", *[form[k] for k in FORM_KEYS])
    job = train_section.job_for(ctx, "rho")
    for _ in range(1200):
        if not job.active:
            break
        time.sleep(0.1)
    assert job.status == "done", (job.error, out)
    assert job.config["reg_images_prompt"] == "a toy" and job.config["prior_loss_weight"] == 0.5
    assert any("3 from the cache, 0 drawn" in line for line in job.log), job.log
    # a bad prompt is refused by the button, and by a run that would use it
    assert list(generate(ctx, "rho", "bad\nprompt", 3, 0.5, True))[-1].startswith("error: reg_images_prompt")
    with pytest.raises(Exception, match="control characters"):
        train_section.start(ctx, "rho", *[form[k] for k in FORM_KEYS])
    # off: the run asks for none
    form_store.save_form(root, {"reg_use": False})
    assert run_keys(root) == {}
