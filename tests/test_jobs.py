"""The job manager: queue order, stop, failures, output names, path rules, card sidecars, listeners, and the
host's session/refresh calls. Fast cases use a fake runner; one real tiny run proves interrupt and resume."""
import contextlib
import json
import os
import shutil
import threading
import time

import pytest
import torch
from safetensors.torch import save_file

from lib_lora_train.demo.toy import make_toy_dataset
from lib_lora_train.errors import ConfigError, DataError, Interrupted
from lib_lora_train.events import DONE, EPOCH, SAMPLE, SAVED, START, STEP, Event
from lib_lora_train.hosts.base import BasicHost, HostPaths
from lib_lora_train.jobs import JOB_STATUS, PATH_KEYS, PROJECT_KEYS, JobConflict, JobManager, ProjectNotFound
from lib_lora_train.models import write_tiny_checkpoint
from lib_lora_train.prep.preprocess import PreprocessOptions
from lib_lora_train.prep.project import create_project, import_images

HANG = 600   # seconds: bounds a hung job only; a wait returns as soon as the job ends (no speed check)

BASE = {"resolution": "64", "network_dim": 2, "network_alpha": 1, "max_train_epochs": 1, "train_batch_size": 1,
        "learning_rate": 1e-3, "seed": 1, "device": "cpu"}


class RecordingHost(BasicHost):
    """A BasicHost that records the calls the manager makes, and can hand out a model object."""

    def __init__(self, *a, model=None, fail_enter=False, **kw):
        super().__init__(*a, **kw)
        self.calls: list = []
        self.written: list = []
        self.model, self.fail_enter = model, fail_enter

    @contextlib.contextmanager
    def training_session(self, cfg):
        if self.fail_enter:
            raise ConfigError("the host refuses: --lowvram")
        self.calls.append("enter")
        try:
            yield self.model
        finally:
            self.calls.append("exit")

    def outputs_written(self, paths):
        self.written.append(list(paths))


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A tiny checkpoint and a toy project with 4 images (repeats 1), built once and copied per test."""
    root = tmp_path_factory.mktemp("jobs")
    ckpt = root / "models" / "tiny.safetensors"
    ckpt.parent.mkdir()
    write_tiny_checkpoint(str(ckpt), seed=0)
    src = make_toy_dataset(root / "toy", n_images=4)
    proj = create_project(str(root / "projects" / "star"), "star", trigger="zkz", purpose="character")
    import_images(proj, str(src), recursive=True, repeats=1, options=PreprocessOptions(workers=1))
    return root


def make_env(template, tmp_path, runner=None, **host_kw):
    shutil.copytree(template / "projects", tmp_path / "projects")
    paths = HostPaths(str(tmp_path / "projects"), str(tmp_path / "loras"), [str(template / "models")])
    host = RecordingHost(paths, default_checkpoint=str(template / "models" / "tiny.safetensors"), config=BASE,
                         **host_kw)
    return host, JobManager(host, runner=runner)


def write_lora(path, version="sd_v1"):
    save_file({"w": torch.zeros(2)}, path, metadata={"ss_base_model_version": version})


class FakeTrain:
    """Stands in for training.loop.train: emits the engine's events, writes a LoRA file, obeys stop."""

    def __init__(self, steps=2, gate=None, fail=None, sample=True, validation=False):
        self.steps, self.gate, self.fail, self.sample, self.validation = steps, gate, fail, sample, validation
        self.order: list = []
        self.running = 0
        self.max_running = 0
        self.models: list = []

    def __call__(self, cfg, *, model=None, sink=None, stop=None):
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        self.order.append(cfg.output_name)
        self.models.append(model)
        try:
            sink(Event(START, {"total_steps": self.steps, "epochs": 1, "run_id": "r" + cfg.output_name}))
            if self.gate is not None:
                while not self.gate.wait(0.01):
                    if stop.is_set():
                        raise Interrupted("stopped at step 0")
            for s in range(1, self.steps + 1):
                sink(Event(STEP, {"step": s, "total_steps": self.steps, "epoch": 1, "loss": 0.5 / s,
                                  "avg_loss": 0.4}))
                time.sleep(0.01)
            path = os.path.join(cfg.output_dir, cfg.output_name + ".safetensors")
            os.makedirs(cfg.output_dir, exist_ok=True)
            if self.fail == "after_save":
                write_lora(path)
                sink(Event(SAVED, {"path": path, "epoch": 1, "step": self.steps, "kind": "final"}))
            if self.fail:
                raise self.fail if isinstance(self.fail, BaseException) else RuntimeError("boom after saving")
            epoch = {"epoch": 1, "epochs": 1, "avg_loss": 0.4, "step": self.steps}
            if self.validation:
                epoch["validation_loss"] = 0.3
            sink(Event(EPOCH, epoch))
            if self.sample:
                sample = os.path.join(cfg.output_dir, "sample", f"{cfg.output_name}-e1.png")
                os.makedirs(os.path.dirname(sample), exist_ok=True)
                from PIL import Image
                Image.new("RGB", (8, 8), (200, 10, 10)).save(sample)
                sink(Event(SAMPLE, {"paths": [sample], "epoch": 1, "step": self.steps}))
            write_lora(path)
            sink(Event(SAVED, {"path": path, "epoch": 1, "step": self.steps, "kind": "final",
                               "sshs_model_hash": "abc"}))
            sink(Event(DONE, {"outputs": [path], "steps": self.steps}))
        finally:
            self.running -= 1


def test_jobs_run_in_order_one_at_a_time_with_free_names(template, tmp_path):
    fake = FakeTrain(steps=3)
    host, jobs = make_env(template, tmp_path, runner=fake)
    ids = [jobs.submit("star", {}).id for _ in range(3)]
    for i in ids:
        assert jobs.wait(i, timeout=HANG).status == "done"
    assert fake.order == ["star", "star_v2", "star_v3"] and fake.max_running == 1
    assert [jobs.get(i).output_name for i in ids] == fake.order
    first = jobs.get(ids[0])
    assert first.step == 3 and first.total_steps == 3 and first.run_id == "rstar" and first.epoch_losses == [(1, 0.4)]
    assert host.calls == ["enter", "exit"] * 3
    assert host.written == [[os.path.join(tmp_path, "loras", "star", n + ".safetensors")] for n in fake.order]
    # the next run after finished ones still gets a new name: files on disk count, not only active jobs
    assert jobs.resolve_config("star", {}).output_name == "star_v4"


def test_stop_queued_and_running_jobs(template, tmp_path):
    gate = threading.Event()
    fake = FakeTrain(gate=gate)
    host, jobs = make_env(template, tmp_path, runner=fake)
    a, b, c = (jobs.submit("star", {}) for _ in range(3))
    deadline = time.time() + 60
    while a.status != "running" and time.time() < deadline:
        time.sleep(0.01)
    assert (a.status, b.status, c.status) == ("running", "queued", "queued")
    assert jobs.current() is a
    jobs.stop(b.id)
    assert b.status == "interrupted" and b.finished is not None      # at once, without running
    jobs.stop(a.id)                                                  # the runner sees the stop event
    assert jobs.wait(a.id, timeout=HANG).status == "interrupted"
    gate.set()
    assert jobs.wait(c.id, timeout=HANG).status == "done"
    assert fake.order == [a.output_name, c.output_name]              # b never ran
    assert jobs.stop(c.id).status == "done"                          # stopping a finished job changes nothing
    assert host.calls == ["enter", "exit"] * 2
    with pytest.raises(KeyError):
        jobs.stop("nope")


def test_failures_are_reported_and_the_manager_lives_on(template, tmp_path):
    fakes = iter([FakeTrain(fail=DataError("no usable images in 1_star")), FakeTrain(fail="after_save"),
                  FakeTrain()])
    calls = []

    def runner(cfg, **kw):
        calls.append(cfg.output_name)
        return next(fakes)(cfg, **kw)

    host, jobs = make_env(template, tmp_path, runner=runner)
    a, b, c = (jobs.submit("star", {}) for _ in range(3))
    for j in (a, b, c):
        jobs.wait(j.id, timeout=HANG)
    assert (a.status, a.error) == ("failed", "no usable images in 1_star")
    assert (b.status, b.error) == ("failed", "RuntimeError: boom after saving")
    assert c.status == "done" and c.error is None
    assert any("error: no usable images" in line for line in a.log)
    assert host.calls == ["enter", "exit"] * 3                       # the session is closed after errors too
    # the file saved before the failure is listed, and the host was told to refresh
    assert [o["name"] for o in b.outputs] == [b.output_name]
    assert host.written == [[b.outputs[0]["path"]], [c.outputs[0]["path"]]]


def test_host_refusing_the_session_fails_the_job_only(template, tmp_path):
    host, jobs = make_env(template, tmp_path, runner=FakeTrain(), fail_enter=True)
    job = jobs.wait(jobs.submit("star", {}).id, timeout=60)
    assert job.status == "failed" and "--lowvram" in job.error and host.calls == []
    host.fail_enter = False
    assert jobs.wait(jobs.submit("star", {}).id, timeout=60).status == "done"


def test_the_host_model_reaches_the_runner(template, tmp_path):
    marker = object()
    fake = FakeTrain()
    host, jobs = make_env(template, tmp_path, runner=fake, model=marker)
    jobs.wait(jobs.submit("star", {}).id, timeout=60)
    assert fake.models == [marker]


def test_output_names_never_collide(template, tmp_path):
    host, jobs = make_env(template, tmp_path, runner=FakeTrain())
    out = tmp_path / "loras" / "star"
    out.mkdir(parents=True)
    write_lora(str(out / "star.safetensors"))
    (out / "star_v2.run.json").write_text("{}")
    (out / "star_v3-000002.safetensors").write_bytes(b"x")
    assert jobs.resolve_config("star", {}).output_name == "star_v4"
    with pytest.raises(JobConflict, match="star_v2"):
        jobs.resolve_config("star", {"output_name": "star_v2"})
    assert jobs.resolve_config("star", {"output_name": "star", "overwrite": True}).output_name == "star"
    assert jobs.resolve_config("star", {"output_name": "fresh"}).output_name == "fresh"
    gate = threading.Event()
    host2, jobs2 = make_env(template, tmp_path / "two", runner=FakeTrain(gate=gate))
    first = jobs2.submit("star", {"output_name": "same"})
    with pytest.raises(JobConflict, match=first.id):
        jobs2.submit("star", {"output_name": "same"})
    assert jobs2.submit("star", {}).output_name == "star"
    gate.set()
    for bad in ("../x", "a/b", ".x"):
        with pytest.raises(ConfigError, match="output_name"):
            jobs.resolve_config("star", {"output_name": bad})


def test_project_keys_and_paths_outside_the_folders_are_refused(template, tmp_path):
    host, jobs = make_env(template, tmp_path, runner=FakeTrain())
    assert "train_data_dir" in PROJECT_KEYS and "pretrained_model_name_or_path" in PATH_KEYS
    for key in ("train_data_dir", "reg_data_dir", "output_dir", "dataset_config", "output-dir"):
        with pytest.raises(ConfigError, match="set from the project"):
            jobs.resolve_config("star", {key: str(tmp_path)})
    outside = tmp_path / "outside"
    outside.mkdir()
    write_lora(str(outside / "w.safetensors"))
    for key in ("pretrained_model_name_or_path", "network_weights", "network-weights", "resume", "sample_prompts"):
        with pytest.raises(ConfigError, match="outside the folders"):
            jobs.resolve_config("star", {key: str(outside / "w.safetensors")})
    with pytest.raises(ConfigError, match="outside the folders"):
        jobs.resolve_config("star", {"network_weights": str(tmp_path / "loras" / ".." / "outside" / "w.safetensors")})
    os.makedirs(tmp_path / "loras" / "star", exist_ok=True)
    os.symlink(outside / "w.safetensors", tmp_path / "loras" / "star" / "link.safetensors")
    with pytest.raises(ConfigError, match="outside the folders"):
        jobs.resolve_config("star", {"network_weights": str(tmp_path / "loras" / "star" / "link.safetensors")})
    # inside the host's folders: accepted, and the folders come from the project
    ckpt = str(template / "models" / "tiny.safetensors")
    inner = tmp_path / "loras" / "star" / "old.safetensors"
    write_lora(str(inner))
    cfg = jobs.resolve_config("star", {"pretrained_model_name_or_path": ckpt, "network-weights": str(inner),
                                       "network_dim": 4})
    assert cfg.pretrained_model_name_or_path == ckpt and cfg.network_weights == str(inner)
    assert cfg.network_dim == 4 and cfg.resolution == "64"           # caller's key over the host's default
    assert cfg.train_data_dir == os.path.join(host.paths.projects, "star", "img")
    assert cfg.output_dir == os.path.join(host.paths.loras, "star") and cfg.reg_data_dir is None


def test_bad_projects_and_options_give_specific_errors(template, tmp_path):
    host, jobs = make_env(template, tmp_path, runner=FakeTrain())
    with pytest.raises(ProjectNotFound, match="'ghost' does not exist"):
        jobs.submit("ghost", {})
    with pytest.raises(ConfigError, match="plain folder name"):
        jobs.submit("../star", {})
    with pytest.raises(ConfigError, match="did you mean 'network_dim'"):
        jobs.submit("star", {"netwrok_dim": 4})
    with pytest.raises(ConfigError, match="network_dim: expected int"):
        jobs.submit("star", {"network_dim": "many"})
    with pytest.raises(ConfigError, match="must be an object"):
        jobs.submit("star", ["network_dim", 4])
    create_project(os.path.join(host.paths.projects, "empty"), "empty")
    with pytest.raises(ConfigError, match="no training images yet"):
        jobs.submit("empty", {})
    assert jobs.list() == []                                          # nothing was queued


def test_card_sidecar_and_preview_are_written(template, tmp_path):
    host, jobs = make_env(template, tmp_path, runner=FakeTrain(validation=True))
    jobs.preferred_weight = 0.8
    out = tmp_path / "loras" / "star"
    out.mkdir(parents=True)
    # a sidecar the user already edited (e.g. before a resume): the user's values stay
    (out / "star.json").write_text(json.dumps({"activation text": "my trigger", "notes": "mine"}))
    job = jobs.wait(jobs.submit("star", {}).id, timeout=60)
    side = json.loads((out / "star.json").read_text())
    assert side["activation text"] == "my trigger" and side["notes"] == "mine"
    assert side["sd version"] == "SD1" and side["preferred weight"] == 0.8
    job2 = jobs.wait(jobs.submit("star", {"network_dim": 8}).id, timeout=60)
    assert job2.output_name == "star_v2"
    side2 = json.loads((out / "star_v2.json").read_text())
    assert side2["activation text"] == "zkz" and side2["sd version"] == "SD1"    # the project's trigger word
    assert "dim 8" in side2["notes"] and "base tiny.safetensors" in side2["notes"]
    sample = job2.samples[-1]["paths"][-1]
    assert (out / "star_v2.preview.png").read_bytes() == open(sample, "rb").read()
    assert job2.outputs[0]["sshs_model_hash"] == "abc" and job2.validation_losses == [(1, 0.3)]
    assert job.to_dict()["validation_losses"] == [[1, 0.3]]


def test_preview_follows_a_sample_made_after_the_save(template, tmp_path):
    """Intermediate epochs: the engine saves the epoch file, then makes the epoch's samples."""
    def runner(cfg, *, model=None, sink=None, stop=None):
        os.makedirs(cfg.output_dir, exist_ok=True)
        path = os.path.join(cfg.output_dir, cfg.output_name + "-000001.safetensors")
        write_lora(path, "sd_v2_768_v")
        sink(Event(SAVED, {"path": path, "epoch": 1, "step": 1, "kind": "epoch"}))
        sample = os.path.join(cfg.output_dir, "s.png")
        from PIL import Image
        Image.new("RGB", (8, 8)).save(sample)
        sink(Event(SAMPLE, {"paths": [sample], "epoch": 1, "step": 1}))
    host, jobs = make_env(template, tmp_path, runner=runner)
    job = jobs.wait(jobs.submit("star", {}).id, timeout=60)
    assert job.status == "done"
    out = tmp_path / "loras" / "star"
    assert (out / "star-000001.preview.png").exists()
    assert json.loads((out / "star-000001.json").read_text())["sd version"] == "SD2"


def test_listeners_get_every_event_and_status_changes(template, tmp_path):
    host, jobs = make_env(template, tmp_path, runner=FakeTrain(steps=2))
    seen = []
    jobs.listeners.append(lambda job, e: seen.append((job.id, e.kind, e.data.get("status"))))
    jobs.listeners.append(lambda job, e: 1 / 0)                       # a broken listener changes nothing
    job = jobs.wait(jobs.submit("star", {}).id, timeout=60)
    assert job.status == "done"
    kinds = [k for _i, k, _s in seen]
    assert kinds[0] == JOB_STATUS and kinds[1] == START and kinds.count(STEP) == 2
    assert {EPOCH, SAMPLE, SAVED, DONE} <= set(kinds)
    assert [s for _i, k, s in seen if k == JOB_STATUS] == ["running", "done"]
    assert {i for i, _k, _s in seen} == {job.id}
    versions = job.version
    assert versions >= len(seen)


def test_real_run_interrupted_then_resumed(template, tmp_path):
    """A real tiny run: stop mid epoch 2 -> interrupted with a resumable state and the epoch-1 file (with its card
    sidecar); resuming through the manager continues the same run to the end."""
    host, jobs = make_env(template, tmp_path)
    stopper = {}

    def listener(job, event):
        if event.kind == STEP and event.data["step"] == 6 and job.id == stopper.get("id"):
            jobs.stop(job.id)
    jobs.listeners.append(listener)
    job = jobs.submit("star", {"max_train_epochs": 2})
    stopper["id"] = job.id
    jobs.wait(job.id, timeout=120)
    assert job.status == "interrupted", (job.error, list(job.log))
    assert job.step == 6 and job.total_steps == 8 and job.epoch_losses and job.epoch_losses[0][0] == 1
    assert os.path.isfile(os.path.join(job.state_dir, "train_state.json"))
    out = tmp_path / "loras" / "star"
    assert [o["name"] for o in job.outputs] == ["star-000001"]
    side = json.loads((out / "star-000001.json").read_text())
    assert side["activation text"] == "zkz" and side["sd version"] == "SD1"
    assert host.calls == ["enter", "exit"] and host.written == [[str(out / "star-000001.safetensors")]]
    assert json.loads((out / "star.run.json").read_text())["status"] == "interrupted"

    steps = []
    jobs.listeners.append(lambda j, e: steps.append(e.data["step"]) if e.kind == STEP else None)
    again = jobs.submit("star", {"max_train_epochs": 2, "resume": job.state_dir})
    assert again.output_name == "star"                                # the interrupted run's name
    jobs.wait(again.id, timeout=120)
    assert again.status == "done", (again.error, list(again.log))
    assert steps == [7, 8] and again.run_id == job.run_id
    assert (out / "star.safetensors").exists() and (out / "star.json").exists()
    assert host.calls == ["enter", "exit"] * 2


def test_a_finished_runs_reference_cycles_are_collected_when_it_reports_done(template, tmp_path):
    """A network lives in reference cycles (module <-> hooks); with the collector paused, as it may be between
    Python's own generations in a long-lived host, the job manager still frees it before reporting done."""
    import gc
    import weakref

    class Cyclic:                         # stands in for a network: an object that refers to itself
        def __init__(self):
            self.me = self

    refs = []
    fake = FakeTrain()

    def runner(cfg, **kw):
        net = Cyclic()
        refs.append(weakref.ref(net))
        return fake(cfg, **kw)

    host, jobs = make_env(template, tmp_path, runner=runner)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        job = jobs.submit("star", {})
        jobs.wait(job.id, timeout=HANG)
        assert job.status == "done"
        assert refs and refs[0]() is None, "the run's cyclic garbage outlived the job"
    finally:
        if was_enabled:
            gc.enable()
