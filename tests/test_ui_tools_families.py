"""The Tools section on SDXL: inspect an SDXL LoRA, merge it into an SDXL checkpoint, and a LoRA of another family
refused with the tools' message (nothing written)."""
import os

import pytest
import torch

from lib_lora_train.hosts.base import BasicHost, HostPaths
from lib_lora_train.models import load_sd_model, read_checkpoint, tiny_sd1_state_dict, write_tiny_checkpoint
from lib_lora_train.networks import save_network_file
from lib_lora_train.ui import tools_actions as act
from lib_lora_train.ui.tools_runner import ToolRunner
from test_compare_families import _random_lora


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("tools_sdxl")
    models, loras = d / "models", d / "loras"
    os.makedirs(models)
    os.makedirs(loras)
    write_tiny_checkpoint(str(models / "xl.safetensors"), seed=0, family="sdxl")
    xl = load_sd_model(str(models / "xl.safetensors"))
    save_network_file(str(loras / "xl_lora.safetensors"), _random_lora(xl, "sdxl", 1),
                      {"ss_base_model_version": "sdxl_base_v1-0"})
    sd1 = load_sd_model(tiny_sd1_state_dict(seed=0))
    save_network_file(str(loras / "sd1_lora.safetensors"), _random_lora(sd1, "sd1", 2),
                      {"ss_base_model_version": "sd_v1"})
    paths = HostPaths(str(d / "projects"), str(loras), [str(models)])
    return d, BasicHost(paths, default_checkpoint=str(models / "xl.safetensors"))


def run(fn, **kw):
    return ToolRunner().run_sync("test", lambda sink, stop: fn(sink=sink, stop=stop, **kw))


def test_sdxl_lora_inspected_and_merged_another_family_refused(world):
    d, host = world
    assert host.model_family() == "sdxl" and host.native_resolution() == 1024
    view = act.inspect_file(host, "xl_lora.safetensors")
    assert "Base model: sdxl_base_v1-0" in view.summary
    assert any(row[0].startswith("lora_te2_") for row in view.modules)          # both text encoders listed
    res = run(act.merge_into_checkpoint, host=host, base="xl.safetensors (default)",
              rows=[act.LoraRow("xl_lora.safetensors", 1.0, "")], output_name="xl_merged")
    assert res.ok, res.message
    merged = read_checkpoint(d / "models" / "xl_merged.safetensors")
    base = read_checkpoint(d / "models" / "xl.safetensors")
    changed = [k for k in base if not torch.equal(merged[k], base[k])]
    assert any(k.startswith("conditioner.embedders.1.") for k in changed)          # bigG (te2) too
    assert any(k.startswith("model.diffusion_model.") for k in changed)
    bad = run(act.merge_into_checkpoint, host=host, base="xl.safetensors (default)",
              rows=[act.LoraRow("sd1_lora.safetensors", 1.0, "")], output_name="wrong")
    assert not bad.ok and "SDXL" in bad.message and "Traceback" not in bad.message
    assert not (d / "models" / "wrong.safetensors").exists()
