"""install.py on Forge 2.x's and reForge's pinned venvs (versions from their requirements_versions.txt, read at
lllyasviel/stable-diffusion-webui-forge dfdcbab6 and Panchovix/stable-diffusion-webui-reForge 3b56b268): their own
pins (diffusers, huggingface-hub, transformers, gradio 4.40 on Forge, ...) are kept; only what they lack is
installed, with --no-deps."""
from test_install import run

FORGE_VENV = {"torch": "2.3.1+cu121", "transformers": "4.46.1", "accelerate": "0.31.0", "safetensors": "0.4.2",
              "numpy": "1.26.2", "gradio": "4.40.0", "huggingface-hub": "0.26.2", "diffusers": "0.31.0",
              "peft": "0.13.2", "pydantic": "2.8.2"}
REFORGE_VENV = {"torch": "2.7.0+cu128", "transformers": "4.48.1", "accelerate": "0.21.0", "safetensors": "0.5.2",
                "numpy": "1.26.4", "gradio": "3.41.2", "huggingface-hub": "0.25.0", "diffusers": "0.32.2",
                "pydantic": "1.10.15"}
OURS = ["install lycoris-lora==4.1.3 --no-deps", "install toml==0.10.2 --no-deps",
        "install prodigyopt==1.1.2 --no-deps", "install dadaptation==3.2 --no-deps",
        "install lion-pytorch==0.2.5 --no-deps"]


def test_forge_pins_are_kept(tmp_path):
    launch, status = run(tmp_path, FORGE_VENV)
    assert launch.calls == OURS and status["ok"] is True
    assert {k: launch.versions[k] for k in FORGE_VENV} == FORGE_VENV


def test_reforge_pins_are_kept_including_its_newer_diffusers(tmp_path):
    launch, status = run(tmp_path, REFORGE_VENV)
    assert launch.calls == OURS and status["ok"] is True
    assert {k: launch.versions[k] for k in REFORGE_VENV} == REFORGE_VENV
