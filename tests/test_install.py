"""install.py with a stand-in of the WebUI's `launch` module (no real pip): only what is missing or too old is
installed, at the verified pins with --no-deps; the WebUI's own packages are never touched; it fails soft."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What A1111 1.10.1's venv holds after its own install (torch from its index; no diffusers, no lycoris).
WEBUI_VENV = {"torch": "2.1.2+cu121", "transformers": "4.30.2", "accelerate": "0.21.0", "safetensors": "0.4.2",
              "numpy": "1.26.2", "gradio": "3.41.2", "huggingface-hub": "0.36.2", "xformers": "0.0.23"}


def load_install():
    spec = importlib.util.spec_from_file_location("lora_train_install", os.path.join(ROOT, "install.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeLaunch:
    """modules/launch_utils as install.py sees it through `import launch`."""

    def __init__(self, versions, fail=()):
        self.versions, self.fail, self.calls = versions, set(fail), []

    def is_installed(self, name):
        return name in self.versions

    def run_pip(self, command, desc=None, live=False):
        self.calls.append(command)
        spec = command.split()[1]
        name, _, version = spec.partition("==")
        if name in self.fail:
            raise RuntimeError(f"Couldn't install {desc}.\nCommand: pip {command}\nError code: 1")
        self.versions[name] = version


def run(tmp_path, versions, **kw):
    launch = FakeLaunch(dict(versions), **kw)
    status_file = tmp_path / "status.json"
    status = load_install().main(launch=launch, version_of=launch.versions.get, status_file=str(status_file))
    assert json.loads(status_file.read_text()) == json.loads(json.dumps(status))
    return launch, status


def test_fresh_webui_gets_only_the_missing_packages_at_the_verified_pins(tmp_path):
    launch, status = run(tmp_path, WEBUI_VENV)
    assert launch.calls == ["install diffusers==0.31.0 --no-deps", "install lycoris-lora==4.1.3 --no-deps",
                            "install toml==0.10.2 --no-deps", "install prodigyopt==1.1.2 --no-deps",
                            "install dadaptation==3.2 --no-deps", "install lion-pytorch==0.2.5 --no-deps"]
    assert status["ok"] is True and status["problems"] == [] and status["failed"] == []
    # second start: nothing to do, pip is not run at all
    launch2, status2 = run(tmp_path, launch.versions)
    assert launch2.calls == [] and status2["ok"] is True


def test_newer_versions_are_kept_and_older_ones_upgraded(tmp_path):
    have = dict(WEBUI_VENV, diffusers="0.35.0", **{"lycoris-lora": "2.0.0", "toml": "0.10.2", "prodigyopt": "1.1.2",
                                                   "dadaptation": "3.2", "lion-pytorch": "0.2.5"})
    launch, status = run(tmp_path, have)
    assert launch.calls == ["install lycoris-lora==4.1.3 --no-deps"] and status["ok"]


def test_the_webuis_own_packages_are_reported_never_installed(tmp_path):
    have = {k: v for k, v in WEBUI_VENV.items() if k != "accelerate"}
    have.update(torch="2.0.1", transformers="4.25.1")
    launch, status = run(tmp_path, have)
    touched = {c.split()[1].split("==")[0] for c in launch.calls}
    assert touched.isdisjoint({"torch", "transformers", "accelerate", "numpy", "gradio", "xformers",
                               "bitsandbytes", "torchvision"})
    assert status["ok"] is False
    owned = {p["name"]: p for p in status["problems"]}
    assert set(owned) == {"torch", "transformers", "accelerate"} and all(p["owned_by_webui"] for p in owned.values())
    assert status["fix"] is None        # nothing this extension may install would fix it


def test_pip_failures_are_reported_not_raised(tmp_path, capsys):
    launch, status = run(tmp_path, WEBUI_VENV, fail={"diffusers", "lion-pytorch"})
    assert [f["name"] for f in status["failed"]] == ["diffusers", "lion-pytorch"]
    assert status["failed"][1]["optional"] is True and "Error code" in status["failed"][0]["error"]
    assert status["ok"] is False and [p["name"] for p in status["problems"]] == ["diffusers", "lion-pytorch"]
    assert status["fix"].endswith("-m pip install --no-deps diffusers==0.31.0")
    assert "diffusers" in capsys.readouterr().out


def test_an_installer_crash_still_ends_quietly(tmp_path, monkeypatch):
    install = load_install()
    monkeypatch.setattr(install, "DEPS_FILE", str(tmp_path / "missing.py"))
    status = install.main(launch=FakeLaunch({}), status_file=str(tmp_path / "s.json"))
    assert status["ok"] is False and status["failed"][0]["name"] == "install.py"
    assert json.loads((tmp_path / "s.json").read_text())["failed"]


def test_runs_as_the_webui_runs_it(tmp_path):
    """A separate process, the WebUI root as cwd and on PYTHONPATH, `import launch` from there."""
    ext = tmp_path / "extensions" / "lora-train"
    (ext / "lib_lora_train" / "hosts").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "install.py"), ext / "install.py")
    shutil.copy(os.path.join(ROOT, "lib_lora_train", "hosts", "webui_deps.py"), ext / "lib_lora_train" / "hosts")
    (tmp_path / "launch.py").write_text(
        "import json\n"
        "def is_installed(name):\n    return True\n"
        "def run_pip(command, desc=None, live=False):\n"
        "    with open('pip_calls.txt', 'a') as fh:\n        fh.write(command + '\\n')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    proc = subprocess.run([sys.executable, str(ext / "install.py")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    status = json.loads((ext / ".install_status.json").read_text())
    calls = (tmp_path / "pip_calls.txt").read_text().split("\n") if (tmp_path / "pip_calls.txt").exists() else []
    # This test venv has every requirement: nothing to install, except what it lacks on purpose.
    assert all("torch" not in c.split("==")[0] for c in calls)
    assert status["python"] == sys.executable and isinstance(status["ok"], bool)
    if status["ok"]:
        assert not any("diffusers" in c or "lycoris" in c for c in calls)


@pytest.mark.parametrize("have, minimum, ok", [
    ("2.1.2+cu121", "2.1.0", True), ("2.0.1", "2.1.0", False), ("0.31.0", "0.31.0", True),
    ("0.31.0.dev0", "0.31.0", False), ("4.30.2", "4.30.0", True), ("1.0", "1.0.0", True), (None, "1", False),
    ("10.0", "9.5", True)])
def test_version_comparison(have, minimum, ok):
    deps = load_install().load_deps()
    assert deps.at_least(have, minimum) is ok
