"""The Train LoRA tab built on a BasicHost: its handlers called directly (no browser), one short real run."""
import os
import time

import pytest

gr = pytest.importorskip("gradio")

from lib_lora_train.demo.toy import make_toy_dataset  # noqa: E402
from lib_lora_train.errors import ConfigError  # noqa: E402
from lib_lora_train.ui import build_tab, form_store  # noqa: E402
from lib_lora_train.ui import history_section, params_section, preprocess_section, project_section  # noqa: E402
from lib_lora_train.ui import tab as tab_module, tags_section, train_section  # noqa: E402
from lib_lora_train.ui.presets import FORM_KEYS  # noqa: E402
from ui_support import tiny_tab  # noqa: E402

PP = ("white", "keep aspect ratio", 64, False)
STABLE_IDS = ("lora_train_project", "lora_train_project_name", "lora_train_create_project", "lora_train_trigger",
              "lora_train_import_path", "lora_train_import_button", "lora_train_upload", "lora_train_tag_table",
              "lora_train_tag_selected", "lora_train_tag_remove", "lora_train_train_button",
              "lora_train_stop_button", "lora_train_progress", "lora_train_loss_chart", "lora_train_history_table",
              "lora_train_poll", "lora_train_steps", "lora_train_max_train_epochs", "lora_train_outputs")


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui")
    blocks, ctx = tiny_tab(root)
    toy = make_toy_dataset(str(root / "toy"), 4) / "10_zkz"
    return blocks, ctx, str(toy), root


def form(ctx, **changes):
    values = params_section.form_for_project(ctx, type("P", (), {"root": "/nonexistent", "purpose": None})())
    values.update(changes)
    return [values[k] for k in FORM_KEYS]


def new_project(ctx, toy, name):
    project_section.create(ctx, name, "zkz", "character")
    return project_section.import_folder(ctx, name, toy, False, *PP)


def test_tab_builds_with_stable_ids_and_no_launch(ui):
    blocks, ctx, _, _ = ui
    assert isinstance(blocks, gr.Blocks)
    ids = {getattr(b, "elem_id", None) for b in blocks.blocks.values()}
    assert set(STABLE_IDS) <= ids
    assert all(i.startswith("lora_train_") for i in ids if i)
    assert not getattr(blocks, "is_running", False)
    # the WebUI keys its saved defaults (ui-config.json) by label: two fields with one label would share one,
    # so the tab opts out of it (it keeps its own form per project)
    kinds = ("Textbox", "Number", "Dropdown", "Radio", "Checkbox", "Slider")
    inputs = [b for b in blocks.blocks.values() if type(b).__name__ in kinds]
    assert inputs and all(getattr(b, "do_not_save_to_config", False) for b in inputs)
    # labels of the training sections stay unique (the tools' sub-tabs repeat "Ratio", "Output name", ...)
    ctx_labels = [c.label for c in ctx.c.values() if type(c).__name__ in kinds]
    assert len(ctx_labels) == len(set(ctx_labels))


def test_create_import_and_check_report(ui, tmp_path):
    _, ctx, toy, _ = ui
    out = project_section.create(ctx, "alpha", "zkz", "style")
    assert "created" in out["proj_status"] and out["project"]["value"] == "alpha"
    assert out["purpose"] == "style"
    assert project_section.create(ctx, "alpha", "", "")["proj_status"].startswith("opened")
    with pytest.raises(ConfigError):
        project_section.create(ctx, "../evil", "", "character")
    bad = tmp_path / "src"
    bad.mkdir()
    for name in os.listdir(toy):
        (bad / name).write_bytes(open(os.path.join(toy, name), "rb").read())
    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = project_section.import_folder(ctx, "alpha", str(bad), False, *PP)
    assert "imported 4 images" in out["proj_status"]
    assert "broken.png" in out["check_report"]
    thumbs = out["check_gallery"]
    assert [c for _, c in thumbs if c.startswith("broken.png:")] and all(os.path.isfile(p) for p, _ in thumbs)
    assert out["tag_rows"][0] == "zkz" and len(out["tag_images"]) == 4
    assert "4 images" in out["steps_text"]
    with pytest.raises(ConfigError, match="not a folder"):
        project_section.import_folder(ctx, "alpha", str(tmp_path / "missing"), False, *PP)


def test_steps_formula_follows_the_form_and_persists(ui):
    blocks, ctx, toy, _ = ui
    new_project(ctx, toy, "beta")
    out = params_section.changed(ctx, "beta", *form(ctx, repeats=3, train_batch_size=2, max_train_epochs=2))
    # 4 images x 3 repeats = 12 samples -> 6 batches of 2 -> 3 updates of 2 batches (the default preset's
    # gradient accumulation), x 2 epochs
    assert out["steps_text"].startswith("6 steps:") and "4 images × 3 repeats" in out["steps_text"]
    assert "grad-accum 2" in out["steps_text"]
    out = params_section.changed(ctx, "beta", *form(ctx, repeats=3, train_batch_size=2, max_train_epochs=5))
    assert out["steps_text"].startswith("15 steps:")
    assert "No speed measured yet" in out["eta_text"]
    bad = params_section.changed(ctx, "beta", *form(ctx, network_dim="x"))
    assert bad["steps_text"].startswith("error:") and "Network dim" in bad["steps_text"]
    # the page is reloaded (and even the server restarted): the same values come back
    params_section.changed(ctx, "beta", *form(ctx, repeats=3, max_train_epochs=5, seed=1234, sample_prompts="a cat"))
    tab_module.save_options(ctx, "beta", "/some/folder", "black", "center crop", 128, True, "no tagger", "", "",
                            0.5, "keep")
    other = build_tab(ctx.host, ctx.jobs).lora_train_ctx
    loaded = tab_module.on_load(other)
    assert loaded["project"]["value"] == "beta"
    assert (loaded["max_train_epochs"], loaded["seed"], loaded["sample_prompts"]) == (5, 1234, "a cat")
    assert (loaded["pp_background"], loaded["pp_mode"], loaded["pp_flip"], loaded["import_path"]) == \
        ("black", "center crop", True, "/some/folder")
    # saved with the form's default batch (the character preset's 4): 12 samples -> 3 batches -> 2 updates x 5
    assert loaded["steps_text"].startswith("10 steps")
    assert form_store.last_project(ctx.host.paths.projects) == "beta"


def test_preset_handler(ui):
    _, ctx, toy, _ = ui
    new_project(ctx, toy, "gamma")
    out = params_section.preset(ctx, "gamma", "style", *form(ctx))
    assert out["network_dim"] == 128 and "seed" not in out
    assert form_store.load_form(ctx.host.paths.project_dir("gamma"))["network_dim"] == 128


def test_tag_editing_with_undo(ui):
    _, ctx, toy, _ = ui
    out = new_project(ctx, toy, "delta")
    rows = out["tag_rows"]
    tag = next(t for t in rows if t != "zkz")
    assert tags_section.select_tag(ctx, rows, [rows.index(tag), 1]) == {"tag_selected": tag}
    assert tags_section.select_tag(ctx, rows, [99, 0]) == {}
    out = tags_section.remove_tag(ctx, "delta", tag, "", None)
    assert tag not in out["tag_rows"] and "removed" in out["tag_status"]
    out = tags_section.undo(ctx, "delta", "", None)
    assert tag in out["tag_rows"]
    image = out["tag_images"][0]
    out = tags_section.save_caption(ctx, "delta", image, "red square, zkz", "")
    assert tags_section.editor(ctx, "delta", image)["edit_caption"] == "red square, zkz"
    out = tags_section.trigger_first(ctx, "delta", "", image)
    assert out["edit_caption"].startswith("zkz")
    filtered = tags_section.view(ctx, "delta", "red square")
    assert filtered["tag_images"] == [image]
    with pytest.raises(ConfigError, match="WD14"):
        tags_section.autotag(ctx, "delta", "WD14 (local model file)", "", "", 0.35, "replace", "", None)
    assert tags_section.tagger_choices(ctx) == ["no tagger", "WD14 (local model file)"]   # no WebUI taggers


def test_preprocess_again_keeps_edited_captions(ui):
    _, ctx, toy, _ = ui
    out = new_project(ctx, toy, "eps")
    image = out["tag_images"][0]
    tags_section.save_caption(ctx, "eps", image, "zkz, edited", "")
    out = preprocess_section.run_again(ctx, "eps", "white", "center crop", 64, True)
    assert "8 images written, 4 edited captions kept" in out["pp_status"], out["pp_status"]
    assert tags_section.editor(ctx, "eps", image)["edit_caption"] == "zkz, edited"
    assert len(out["tag_images"]) == 8                          # mirrored copies added
    backup = os.path.join(ctx.host.paths.project_dir("eps"), ".ui_cache", "previous")
    assert os.path.isdir(backup) and os.listdir(backup)


def test_train_poll_history_notes_delete(ui):
    _, ctx, toy, root = ui
    new_project(ctx, toy, "zeta")
    # 4 images / batch 2, 2 batches per update (the default preset's accumulation), 2 epochs: 2 steps, a loss line
    values = form(ctx, repeats=1, train_batch_size=2, max_train_epochs=2, network_dim=4, network_alpha=4,
                  save_every_n_epochs=0)
    out = train_section.start(ctx, "zeta", *values)
    assert out["train_status"].startswith(("queued", "running"))
    with pytest.raises(ConfigError, match="already has a run"):
        train_section.start(ctx, "zeta", *values)
    job = train_section.job_for(ctx, "zeta")
    seen = out["train_seen"]
    for _ in range(600):
        if not job.active:
            break
        time.sleep(0.1)
    assert job.status == "done", job.error
    out = train_section.poll(ctx, "zeta", seen)
    assert out["train_seen"] == f"{job.id}:{job.version}" and "done" in out["progress"]
    assert "<svg" in out["loss_chart"] and "polyline" in out["loss_chart"]
    assert "zeta.safetensors" in out["train_outputs"]
    table = out["history_table"]
    assert list(table.columns)[:2] == ["Run", "Status"] and table.iloc[0]["Run"] == "zeta"
    assert out["eta_text"].startswith("about")                           # the finished run measured the speed
    assert train_section.poll(ctx, "zeta", out["train_seen"]) == {}      # nothing moved: nothing redrawn
    # the ETA now has a measured speed
    est = params_section.estimate(ctx, "zeta", dict(zip(FORM_KEYS, values)))
    assert est["eta_text"].startswith("about")
    # notes, load back, delete (asks first)
    history_section.save_notes(ctx, "zeta", "zeta", "good at 0.8")
    assert history_section.pick(ctx, "zeta", "zeta")["history_notes"] == "good at 0.8"
    loaded = history_section.load_params(ctx, "zeta", "zeta", *form(ctx))
    assert loaded["network_dim"] == 4 and loaded["max_train_epochs"] == 2 and loaded["repeats"] == 1
    ask = history_section.ask_delete(ctx, "zeta", "zeta")
    assert "zeta.safetensors" in ask["history_status"] and ask["history_pending"] == "zeta"
    refused = history_section.confirm_delete(ctx, "zeta", "zeta", "")
    assert "nothing deleted" in refused["history_status"]
    out_dir = ctx.host.paths.output_dir("zeta")
    assert os.path.exists(os.path.join(out_dir, "zeta.safetensors"))
    done = history_section.confirm_delete(ctx, "zeta", "zeta", "zeta")
    assert "deleted run zeta" in done["history_status"]
    assert not [n for n in os.listdir(out_dir) if n.startswith("zeta")]
    assert os.path.isdir(ctx.host.paths.project_dir("zeta"))           # the project itself stays


def test_stop_without_a_job_and_poll_without_project(ui):
    _, ctx, _, _ = ui
    assert "nothing is training" in train_section.stop(ctx, "alpha")["train_status"]
    assert train_section.poll(ctx, None, "none") == {}
    assert "No run" in train_section.poll(ctx, None, "x")["progress"]


def test_upload_import_takes_both_gradio_file_forms(ui):
    _, ctx, toy, _ = ui
    project_section.create(ctx, "eta", "zkz", "concept")
    pngs = sorted(os.path.join(toy, n) for n in os.listdir(toy) if n.endswith(".png"))

    class TempFile:                      # what Gradio 3.41 hands over; 4.x hands plain paths
        def __init__(self, name):
            self.name = name

    out = project_section.import_uploads(ctx, "eta", [TempFile(pngs[0]), pngs[1]], *PP)
    assert "imported 2 images" in out["proj_status"] and out["upload"] is None
    with pytest.raises(ConfigError, match="upload"):
        project_section.import_uploads(ctx, "eta", None, *PP)
