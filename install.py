"""Installs what the Train LoRA extension needs into the WebUI's Python; the WebUI runs it in a separate process
(from its root folder, with `launch` importable) at every start and right after installing the extension.

- Only what is missing or older than the minimum is installed, at the exact versions verified with the WebUI's
  pins, with --no-deps (their dependencies are listed explicitly): pip never moves a package the WebUI pinned.
- The WebUI's own packages (torch, torchvision, xformers, bitsandbytes, gradio, transformers, numpy, accelerate,
  ...) are never installed or upgraded; one that is too old is only reported.
- Fails soft: nothing is raised; the outcome is printed and written to .install_status.json, which the tab reads
  to say what is missing and which command fixes it.
"""
import importlib
import importlib.util
import json
import os
import sys
import time

EXT_DIR = os.path.dirname(os.path.abspath(__file__))
STATUS_FILE = os.path.join(EXT_DIR, ".install_status.json")
DEPS_FILE = os.path.join(EXT_DIR, "lib_lora_train", "hosts", "webui_deps.py")


def load_deps():
    """The requirement list, loaded by path: the package itself needs torch, which may not be importable here."""
    spec = importlib.util.spec_from_file_location("_lora_train_webui_deps", DEPS_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def write_status(status: dict, path: str = STATUS_FILE) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(status, fh, indent=1)
        os.replace(tmp, path)
    except OSError as exc:
        print(f"[lora-train] could not write {path}: {exc}", flush=True)


def main(launch=None, version_of=None, status_file: str = STATUS_FILE) -> dict:
    status = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "python": sys.executable, "installed": [],
              "failed": [], "problems": [], "ok": False}
    try:
        deps = load_deps()
        if launch is None:
            import launch
        version_of = version_of or deps.installed_version
        before = deps.check(version_of)
        for req in deps.to_install(before):
            spec = f"{req.name}=={req.pin}"
            try:
                launch.run_pip(" ".join(deps.pip_args(req)), f"{spec} for Train LoRA ({req.why})")
                status["installed"].append(spec)
            except Exception as exc:  # noqa: BLE001 - report and go on with the rest
                status["failed"].append({"name": req.name, "pin": req.pin, "optional": req in deps.OPTIONAL,
                                         "error": str(exc).strip()[-600:]})
        importlib.invalidate_caches()
        after = deps.check(version_of)
        status["problems"] = after.to_dict()["problems"]
        status["ok"] = after.ok
        status["fix"] = deps.fix_command(after, sys.executable)
        if status["installed"]:
            print(f"[lora-train] installed {', '.join(status['installed'])}", flush=True)
        if after.problems:
            print("[lora-train] " + deps.describe(after, sys.executable).replace("\n", "\n[lora-train] "),
                  flush=True)
    except Exception as exc:  # noqa: BLE001 - an installer must never stop the WebUI from starting
        status["failed"].append({"name": "install.py", "error": f"{type(exc).__name__}: {exc}"})
        print(f"[lora-train] install.py failed: {type(exc).__name__}: {exc}", flush=True)
    write_status(status, status_file)
    return status


if __name__ == "__main__":
    main()
