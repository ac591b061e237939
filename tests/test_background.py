"""Background threads at exit (lib_lora_train/background.py): a program that ends while a training job, a grid or a
tool runs in a thread keeps its exit code, and a running job stops at its next step with a resumable state.

Without the exit hook CPython ends such a daemon thread inside a torch call and the process aborts ("terminate
called without an active exception", 134); here the processes must end with 0 and say that the work was stopped."""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HANG = 600       # bounds a hung process only


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=HANG)


def test_a_thread_inside_torch_calls_is_stopped_and_joined_at_exit():
    out = _run("""
        import threading, torch
        from lib_lora_train import background
        torch.set_num_threads(1)
        a = torch.randn(128, 128)
        stop, busy = threading.Event(), threading.Event()

        def work():
            n = 0
            while not stop.is_set():
                a @ a                 # a torch call: releases and takes back the GIL
                n += 1
                busy.set()
            print("stopped after", n > 0, flush=True)

        background.start(work, name="matmul", stop=stop)
        busy.wait(60)
    """)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "stopped after True"


def test_stop_all_calls_a_stop_function_and_reports_a_thread_that_does_not_end():
    out = _run("""
        import threading
        from lib_lora_train import background
        asked, never = [], threading.Event()
        background.start(lambda: never.wait(60), name="stubborn", stop=lambda: asked.append(1))
        print(background.stop_all(timeout=0.2), asked, flush=True)
        never.set()
    """)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "['stubborn'] [1]"
    assert "waiting for stubborn to stop" in out.stderr


def test_a_program_ending_during_a_job_stops_it_with_a_state_and_drops_the_queue(tmp_path):
    """The standalone page's process (or any program holding a JobManager) ends while a real tiny run trains and a
    second one waits: the run saves a resumable state at its next step, the queued one never starts, exit code 0."""
    out = _run("""
        import os, sys, time, torch
        from lib_lora_train.demo.toy import make_toy_dataset
        from lib_lora_train.hosts.base import BasicHost, HostPaths
        from lib_lora_train.jobs import JobManager
        from lib_lora_train.models import write_tiny_checkpoint
        from lib_lora_train.prep.preprocess import PreprocessOptions
        from lib_lora_train.prep.project import create_project, import_images
        torch.set_num_threads(1)
        root = sys.argv[1]
        ckpt = os.path.join(root, "models", "tiny.safetensors")
        os.makedirs(os.path.dirname(ckpt))
        write_tiny_checkpoint(ckpt, seed=0)
        proj = create_project(os.path.join(root, "projects", "star"), "star", trigger="zkz")
        import_images(proj, make_toy_dataset(os.path.join(root, "toy"), n_images=4), recursive=True, repeats=1,
                      options=PreprocessOptions(workers=1))
        host = BasicHost(HostPaths(os.path.join(root, "projects"), os.path.join(root, "loras"),
                                   [os.path.dirname(ckpt)]), default_checkpoint=ckpt)
        jobs = JobManager(host)
        jobs.listeners.append(lambda job, e: e.kind == "job_status" and job.status not in ("queued", "running")
                              and print(job.output_name, job.status, job.step > 0, job.started is not None,
                                        bool(job.state_dir) and os.path.isdir(job.state_dir), flush=True))
        cfg = {"resolution": "64", "network_dim": 2, "network_alpha": 1, "max_train_epochs": 10000,
               "train_batch_size": 1, "learning_rate": 1e-3, "seed": 1, "device": "cpu"}
        first = jobs.submit("star", {**cfg, "output_name": "first"})
        jobs.submit("star", {**cfg, "output_name": "second"})
        end = time.time() + 300
        while first.step < 1 and time.time() < end:
            time.sleep(0.05)
        print("running:", first.status, flush=True)
    """, str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    # the queued one is dropped without starting; the running one stops with its state (it had trained)
    lines = out.stdout.splitlines()
    assert lines[0] == "running: running" and sorted(lines[1:]) == [
        "first interrupted True True True", "second interrupted False False False"], out.stdout


def _pytest_with_this_conftest(tmp_path, test_code: str) -> subprocess.CompletedProcess:
    """Run one test file through pytest in a subprocess, with the suite's own conftest.py beside it."""
    with open(os.path.join(ROOT, "tests", "conftest.py"), encoding="utf-8") as f:
        (tmp_path / "conftest.py").write_text(f.read(), encoding="utf-8")
    (tmp_path / "test_left_behind.py").write_text(textwrap.dedent(test_code), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": ROOT, "LORA_TRAIN_TEST_STOP_WAIT": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG)


def test_the_suite_stops_engine_threads_a_test_left_running(tmp_path):
    # the thread leaves a mark once its stop is set, so the session's end stopped it rather than killing it (the
    # hook here, the exit hook of background.py behind it; the next test pins the hook itself)
    out = _pytest_with_this_conftest(tmp_path, """
        import pathlib, threading
        from lib_lora_train import background

        def test_leaves_a_thread():
            stop = threading.Event()

            def work():
                if stop.wait(600):
                    pathlib.Path("stopped").write_text("yes")
            background.start(work, name="polite", stop=stop)
    """)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "did not stop" not in out.stderr
    assert (tmp_path / "stopped").read_text() == "yes"      # asked to stop and finished, not killed at exit


def test_the_suite_fails_when_an_engine_thread_does_not_stop_when_asked(tmp_path):
    # the thread ignores its stop for 5 s: longer than the session's wait (1 s here), short enough for the exit hook
    out = _pytest_with_this_conftest(tmp_path, """
        import threading, time
        from lib_lora_train import background

        def test_leaves_a_stubborn_thread():
            background.start(lambda: time.sleep(5), name="stubborn", stop=lambda: None)
    """)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert "1 passed" in out.stdout
    assert "engine threads did not stop when asked: ['stubborn']" in out.stderr
