"""Helpers for the real-browser test: Debian's headless Chromium through selenium, the standalone page in a
subprocess, and Gradio 3.41 widgets found by their elem_id.

Nothing is downloaded: the browser and its driver are the system's (/usr/bin/chromium, /usr/bin/chromedriver).
Waits are conditions polled by WebDriverWait; a wait that runs out fails with what it waited for, the page's
state and the server log's tail.
"""
from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any, Callable

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = os.environ.get("LORA_TRAIN_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("LORA_TRAIN_CHROMEDRIVER", "/usr/bin/chromedriver")
CHROME_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--window-size=1400,1000")


def skip_reason() -> str | None:
    """Why the browser test cannot run here, or None when it can."""
    for module in ("gradio", "selenium"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed in this environment (the browser test runs in .venv-webui)"
    for what, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return f"{what} not found at {path} (install Debian's chromium and chromium-driver)"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: str, n: int = 3000) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()[-n:]
    except OSError:
        return ""


class PageServer:
    """`python -m lib_lora_train ui` in its own process group, on a free port of 127.0.0.1."""

    def __init__(self, data_dir: str, log_path: str, *, fake_webui: bool = False):
        self.data_dir = data_dir
        self.log_path = log_path
        self.fake_webui = fake_webui
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 600.0) -> None:      # bounds a hang only (see Page.HANG)
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False",
                   PYTHONUNBUFFERED="1", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
        if self.fake_webui:
            cmd = [sys.executable, os.path.abspath(__file__), "fake-webui", str(self.port), self.data_dir]
        else:
            cmd = [sys.executable, "-m", "lib_lora_train", "ui", "--host", "127.0.0.1", "--port", str(self.port),
                   "--data", self.data_dir]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the page exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.3)
        raise RuntimeError(f"the page did not answer on {self.url} within {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        return _tail(self.log_path)

    def stop(self) -> None:
        """Ends the process group this object started (the page and anything it spawned)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


def make_driver(profile_dir: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in CHROME_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={profile_dir}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(600)                     # bounds a hang only (see Page.HANG)
    return driver


class Page:
    """The tab in a browser: widgets by elem_id, conditions to wait for, failures that say what was seen."""

    def __init__(self, driver: Any, server: PageServer, shots_dir: str):
        self.d = driver
        self.server = server
        self.shots_dir = shots_dir

    # -- finding
    def find(self, css: str):
        from selenium.webdriver.common.by import By
        return self.d.find_element(By.CSS_SELECTOR, css)

    def find_all(self, css: str) -> list:
        from selenium.webdriver.common.by import By
        return self.d.find_elements(By.CSS_SELECTOR, css)

    def field(self, elem_id: str):
        """The text input of a Textbox / Number / Dropdown (Gradio 3.41: textarea or input inside #elem_id)."""
        return self.find(f"#{elem_id} textarea, #{elem_id} input")

    def value(self, elem_id: str) -> str:
        return self.field(elem_id).get_property("value") or ""

    def text(self, elem_id: str) -> str:
        return self.find(f"#{elem_id}").text

    # -- acting
    def type(self, elem_id: str, text: str, *, enter: bool = False) -> None:
        """Replace a field's text by typing (so Gradio's input event fires), then leave the field (blur)."""
        from selenium.webdriver.common.keys import Keys
        el = self.field(elem_id)
        self.d.execute_script("arguments[0].scrollIntoView({block: 'center'});", el)
        el.click()
        el.send_keys(Keys.CONTROL, "a")
        el.send_keys(Keys.DELETE)
        el.send_keys(text)
        el.send_keys(Keys.ENTER if enter else Keys.TAB)

    def click(self, css: str) -> None:
        el = self.find(css)
        self.d.execute_script("arguments[0].scrollIntoView({block: 'center'});", el)
        el.click()

    def button(self, elem_id: str) -> None:
        self.click(f"button#{elem_id}, #{elem_id} button")

    # -- waiting
    # A wait ends as soon as its condition holds, so its timeout only bounds a hang. It is not a speed target:
    # on a loaded 2-core machine one import took 150-190 s, and a 30 s bound failed a fresh clone's `make test`.
    HANG = 600.0

    def wait(self, condition: Callable[[], Any], what: str, timeout: float = HANG, poll: float = 0.2) -> Any:
        """Poll `condition()` until it returns something truthy; exceptions while polling count as "not yet"."""
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        last: dict[str, Any] = {}

        def check(_driver):
            try:
                return condition()
            except Exception as exc:  # noqa: BLE001 - the page is still re-rendering; try again
                last["error"] = repr(exc)
                return False

        try:
            return WebDriverWait(self.d, timeout, poll_frequency=poll).until(check)
        except TimeoutException:
            self.fail(f"timed out after {timeout:.0f} s waiting for {what}"
                      + (f" (last error: {last['error']})" if "error" in last else ""))

    def fail(self, message: str) -> None:
        shot = os.path.join(self.shots_dir, "failure.png")
        try:
            self.d.save_screenshot(shot)
        except Exception:  # noqa: BLE001 - a screenshot is a bonus
            shot = "(no screenshot)"
        state = []
        for eid in ("lora_train_project_status", "lora_train_tag_status", "lora_train_train_status",
                    "lora_train_steps"):
            try:
                state.append(f"{eid}: {self.value(eid)!r}")
            except Exception:  # noqa: BLE001
                pass
        raise AssertionError(f"{message}\npage state: {'; '.join(state)}\nscreenshot: {shot}\n"
                             f"server log tail:\n{self.server.log_tail() if self.server else '(in this process)'}")

    def wait_value(self, elem_id: str, predicate: Callable[[str], bool], what: str, timeout: float = HANG) -> str:
        return self.wait(lambda: (lambda v: v if predicate(v) else False)(self.value(elem_id)),
                         f"{elem_id} to show {what}", timeout)

    def progress(self) -> dict[str, str] | None:
        """The Train section's progress attributes (None before the first run)."""
        bars = self.find_all("#lora_train_progress .lora-train-progress[data-status]")
        if not bars:
            return None
        bar = bars[0]
        return {k: bar.get_attribute(f"data-{k}") or "" for k in ("status", "step", "total", "task-id")}


# ----------------------------------------------------------------------------- a page with WebUI progress tasks

FAKE_PROJECT = "webui_proj"
FAKE_STEPS = 40               # long enough (20 s) that the test's Stop always comes first
FAKE_STEP_SECONDS = 0.5


def slow_runner(cfg, *, model=None, sink=None, stop=None):
    """Stands in for training.loop.train on the fake-WebUI page: events only, slow enough to watch, obeys stop."""
    from types import SimpleNamespace

    from lib_lora_train.errors import Interrupted
    from lib_lora_train.events import DONE, START, STEP, Event

    sink(Event(START, {"total_steps": FAKE_STEPS, "epochs": 1, "run_id": "fake-" + cfg.output_name}))
    for step in range(1, FAKE_STEPS + 1):
        if stop is not None and stop.wait(FAKE_STEP_SECONDS):
            raise Interrupted(f"stopped at step {step - 1}")
        sink(Event(STEP, {"step": step, "total_steps": FAKE_STEPS, "epoch": 1, "epochs": 1, "loss": 1.0 / step,
                          "avg_loss": 0.5}))
    sink(Event(DONE, {"steps": FAKE_STEPS}))
    return SimpleNamespace(status="done", outputs=[], record_path=None, state_dir=None, steps=FAKE_STEPS)


def serve_fake_webui(port: int, data_dir: str) -> None:
    """The tab on a host that, like the WebUI's, gives every job a progress-task id; training is `slow_runner`.
    A project with toy images is open, so a test only has to press Train."""
    sys.path.insert(0, REPO_ROOT)
    import torch

    from lib_lora_train.demo.toy import make_toy_dataset
    from lib_lora_train.hosts.standalone import StandaloneHost
    from lib_lora_train.jobs import JobManager
    from lib_lora_train.prep.project import create_project, import_images
    from lib_lora_train.ui import form_store
    from lib_lora_train.ui.app import build_app

    torch.set_num_threads(1)

    class TaskHost(StandaloneHost):
        def progress_task_id(self, job_id: str) -> str:
            return f"task(lora-train-{job_id})"

    host = TaskHost(data_dir)
    project = create_project(host.paths.project_dir(FAKE_PROJECT), FAKE_PROJECT, trigger="zkz")
    toy = make_toy_dataset(os.path.join(data_dir, "toy"), n_images=2)
    import_images(project, os.path.join(toy, "10_zkz"))
    form_store.set_last_project(host.paths.projects, FAKE_PROJECT)
    page = build_app(host, JobManager(host, runner=slow_runner))
    page.queue()
    page.launch(server_name="127.0.0.1", server_port=port, inbrowser=False, show_api=False,
                prevent_thread_lock=True)
    print("fake WebUI page up", flush=True)
    page.block_thread()


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "fake-webui":
    serve_fake_webui(int(sys.argv[2]), sys.argv[3])
