"""Network files: atomic writes, sshs_* hashes exactly as sd-scripts, equal to the WebUI's addnet hash."""
import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import save as st_save

from lib_lora_train.errors import ConfigError, ModelError
from lib_lora_train.networks import addnet_hash, read_network_file, save_network_file


def tensors(n=8, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(n):
        out[f"lora_unet_layer_{i}.lora_down.weight"] = torch.randn(4, size, generator=g).half()
        out[f"lora_unet_layer_{i}.lora_up.weight"] = torch.randn(size, 4, generator=g).half()
        out[f"lora_unet_layer_{i}.alpha"] = torch.tensor(2.0).half()
    return out


META = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "2.0",
        "modelspec.title": "my lora", "user_note": "changes later"}


def webui_addnet_hash(path):
    """Written independently of the engine, as modules/hashes.py addnet_hash_safetensors does it."""
    with open(path, "rb") as f:
        data = f.read()
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + n:]).hexdigest()


def test_write_read_and_hashes(tmp_path):
    path = tmp_path / "net.safetensors"
    t = tensors()
    hashes = save_network_file(path, t, META)
    back, meta = read_network_file(path)
    assert back.keys() == t.keys() and all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in t.items())
    assert {k: meta[k] for k in META} == META
    assert meta["sshs_model_hash"] == hashes["sshs_model_hash"] == webui_addnet_hash(path) == addnet_hash(path)
    assert len(hashes["sshs_model_hash"]) == 64
    # legacy hash: 64 KiB at 1 MiB of the in-memory file; a file under 1 MiB hashes the empty string
    assert meta["sshs_legacy_hash"] == hashes["sshs_legacy_hash"] == hashlib.sha256(b"").hexdigest()[:8]
    assert os.listdir(tmp_path) == ["net.safetensors"]


def test_model_hash_ignores_metadata_and_legacy_hash_sees_only_ss_keys(tmp_path):
    big = tensors(n=4, size=40000)                      # > 1 MiB, so the legacy hash reads real bytes
    a = save_network_file(tmp_path / "a.safetensors", big, META)
    b = save_network_file(tmp_path / "b.safetensors", big, {**META, "user_note": "edited", "modelspec.title": "x"})
    c = save_network_file(tmp_path / "c.safetensors", big, {**META, "ss_training_comment": "shifts the data"})
    assert a == b                                       # only ss_* metadata takes part
    assert a["sshs_model_hash"] == c["sshs_model_hash"] and a["sshs_legacy_hash"] != c["sshs_legacy_hash"]
    # sd-scripts: serialize with the ss_* keys only, take 64 KiB at 0x100000
    ss_only = st_save(big, {k: v for k, v in META.items() if k.startswith("ss_")})
    assert a["sshs_legacy_hash"] == hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8]
    assert a["sshs_legacy_hash"] != hashlib.sha256(b"").hexdigest()[:8]
    assert a["sshs_model_hash"] == webui_addnet_hash(tmp_path / "a.safetensors")


def test_refuses_to_overwrite_unless_asked(tmp_path):
    path = tmp_path / "net.safetensors"
    save_network_file(path, tensors(seed=1), META)
    first = path.read_bytes()
    with pytest.raises(ConfigError, match="net.safetensors"):
        save_network_file(path, tensors(seed=2), META)
    assert path.read_bytes() == first
    save_network_file(path, tensors(seed=2), META, overwrite=True)
    assert path.read_bytes() != first
    assert os.listdir(tmp_path) == ["net.safetensors"]


def test_a_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "net.safetensors"
    save_network_file(path, tensors(seed=1), META)
    first = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        save_network_file(path, tensors(seed=2), META, overwrite=True)
    assert path.read_bytes() == first and os.listdir(tmp_path) == ["net.safetensors"]


def test_bad_metadata_and_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="ss_network_dim"):
        save_network_file(tmp_path / "x.safetensors", tensors(), {"ss_network_dim": 4})
    assert not (tmp_path / "x.safetensors").exists()
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ModelError, match="bad.safetensors"):
        read_network_file(tmp_path / "bad.safetensors")
    with pytest.raises(ModelError, match="not found"):
        read_network_file(tmp_path / "missing.safetensors")


def test_header_is_standard_safetensors(tmp_path):
    path = tmp_path / "net.safetensors"
    save_network_file(path, tensors(n=1), META)
    data = path.read_bytes()
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    assert header["__metadata__"]["ss_network_module"] == "networks.lora"
    assert header["lora_unet_layer_0.alpha"]["shape"] == [] and header["lora_unet_layer_0.alpha"]["dtype"] == "F16"
