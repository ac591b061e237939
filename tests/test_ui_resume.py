"""History's Resume: a run whose process was killed reads as interrupted (crashed) with Resume enabled, and
Resume submits it again through the job manager with resume = its state, its own settings and output name, so
it finishes where it stopped; a run without a state is refused with the reason."""
import os
import time

import pytest

gr = pytest.importorskip("gradio")

from lib_lora_train.demo.toy import make_toy_dataset  # noqa: E402
from lib_lora_train.errors import ConfigError  # noqa: E402
from lib_lora_train.hosts.base import BasicHost, HostPaths  # noqa: E402
from lib_lora_train.jobs import JobManager  # noqa: E402
from lib_lora_train.models import write_tiny_checkpoint  # noqa: E402
from lib_lora_train.prep.preprocess import PreprocessOptions  # noqa: E402
from lib_lora_train.prep.project import create_project, import_images  # noqa: E402
from lib_lora_train.record import read_run_record, record_paths  # noqa: E402
from lib_lora_train.ui import build_tab, history_section  # noqa: E402
from resume_support import as_killed, stopped_run  # noqa: E402

# 4 images, batch 2, 1 repeat: 2 steps per epoch, 2 epochs
RUN = {"max_train_epochs": 2, "train_batch_size": 2, "network_dim": 2, "network_alpha": 1, "learning_rate": 1e-3,
       "seed": 1}


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_ui")
    ckpt = write_tiny_checkpoint(str(root / "models" / "tiny.safetensors"))
    paths = HostPaths(str(root / "projects"), str(root / "loras"), [str(root / "models")])
    host = BasicHost(paths, default_checkpoint=str(ckpt), config={"resolution": "64", "device": "cpu"})
    jobs = JobManager(host)
    blocks = build_tab(host, jobs)
    src = make_toy_dataset(str(root / "toy"), 4)
    proj = create_project(paths.project_dir("kappa"), "kappa", trigger="zkz", purpose="character")
    import_images(proj, str(src), recursive=True, repeats=1, options=PreprocessOptions(workers=1))
    return blocks.lora_train_ctx


def _row(table, name):
    return table[table["Run"] == name].iloc[0]


def test_a_killed_run_shows_interrupted_and_resume_finishes_it(ui):
    ctx = ui
    cfg = stopped_run(ctx.jobs, "kappa", dict(RUN, output_name="kappa"), at_step=1)
    as_killed(cfg.output_dir, "kappa")
    out = history_section.view(ctx, "kappa", "kappa")
    assert _row(out["history_table"], "kappa")["Status"] == "interrupted (crashed)"
    assert out["history_resume"]["interactive"] is True
    assert "Resume continues from kappa" in out["history_resume_info"]
    picked = history_section.pick(ctx, "kappa", "kappa")
    assert picked["history_resume"]["interactive"] is True

    res = history_section.resume(ctx, "kappa", "kappa")
    assert "resuming kappa" in res["history_status"] and "resuming from kappa" in res["train_status"]
    job = [j for j in ctx.jobs.list("kappa") if j.output_name == "kappa"][-1]
    state = job.config["resume"]
    assert os.path.basename(state).startswith("kappa") and state.endswith("-state") and os.path.isdir(state)
    assert job.config["output_name"] == "kappa" and job.config["max_train_epochs"] == 2
    assert job.config["network_dim"] == 2 and job.config["train_batch_size"] == 2
    end = time.time() + 300
    while job.active and time.time() < end:
        time.sleep(0.1)
    assert job.status == "done", job.error
    rec = read_run_record(record_paths(cfg.output_dir, "kappa")[0])
    assert rec["status"] == "done" and rec["step"] == 4 and not rec.get("crashed")
    assert [r["from_step"] for r in rec["resumes"]] == [1]                 # continued, not started again
    assert os.path.isfile(os.path.join(cfg.output_dir, "kappa.safetensors"))
    out = history_section.view(ctx, "kappa", "kappa")
    assert _row(out["history_table"], "kappa")["Status"] == "done"
    assert out["history_resume"]["interactive"] is False and "finished" in out["history_resume_info"]
    with pytest.raises(ConfigError, match="finished"):
        history_section.resume(ctx, "kappa", "kappa")


def test_a_killed_run_without_a_state_says_why_it_cannot_resume(ui):
    ctx = ui
    cfg = stopped_run(ctx.jobs, "kappa", dict(RUN, output_name="nostate"), at_step=1)
    as_killed(cfg.output_dir, "nostate", drop_states=True)
    out = history_section.view(ctx, "kappa", "nostate")
    assert _row(out["history_table"], "nostate")["Status"] == "failed (crashed)"
    assert out["history_resume"]["interactive"] is False
    assert "no training state was saved before it crashed" in out["history_resume_info"]
    before = len(ctx.jobs.list())
    with pytest.raises(ConfigError, match="cannot be resumed: no training state"):
        history_section.resume(ctx, "kappa", "nostate")
    assert len(ctx.jobs.list()) == before                                  # nothing submitted
    with pytest.raises(ConfigError, match="choose a run"):
        history_section.resume(ctx, "kappa", None)
