"""The Lora card files a host writes beside a LoRA (WebUI user-metadata sidecar, preview) and the host helpers
that keep every path inside the configured folders."""
import json
import os

import pytest
from PIL import Image

from lib_lora_train.errors import ConfigError
from lib_lora_train.hosts import outputs
from lib_lora_train.hosts.base import BasicHost, HostPaths, inside, safe_child

# The keys the WebUI's Lora user-metadata editor reads and writes (reference: webui_ecosystem.md §5.6).
WEBUI_KEYS = {"description", "sd version", "activation text", "preferred weight", "negative text", "notes"}


def lora(tmp_path, name="star"):
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(b"not read by these functions")
    return str(path)


def test_sidecar_has_the_webui_keys(tmp_path):
    path = lora(tmp_path)
    side = outputs.write_sidecar(path, activation_text="zkz", preferred_weight=0.8, sd_version_name="SD1",
                                 notes="trained")
    assert side == str(tmp_path / "star.json")
    data = json.loads(open(side, encoding="utf-8").read())
    assert set(data) == WEBUI_KEYS
    assert data["activation text"] == "zkz" and data["preferred weight"] == 0.8
    assert data["sd version"] == "SD1" and data["notes"] == "trained" and data["negative text"] == ""
    assert open(path, "rb").read() == b"not read by these functions"


def test_sidecar_keeps_user_values_and_fills_missing_ones(tmp_path):
    path = lora(tmp_path)
    with open(outputs.sidecar_path(path), "w", encoding="utf-8") as fh:
        json.dump({"activation text": "my words", "preferred weight": 0.6, "extra": [1, 2]}, fh)
    outputs.write_sidecar(path, activation_text="zkz", preferred_weight=1.0, notes="ours")
    data = json.loads(open(outputs.sidecar_path(path), encoding="utf-8").read())
    assert data["activation text"] == "my words" and data["preferred weight"] == 0.6 and data["extra"] == [1, 2]
    assert data["notes"] == "ours" and data["sd version"] == "SD1"


def test_unreadable_sidecar_is_rewritten(tmp_path):
    path = lora(tmp_path)
    with open(outputs.sidecar_path(path), "w", encoding="utf-8") as fh:
        fh.write("{ not json")
    outputs.write_sidecar(path, activation_text="zkz")
    assert json.loads(open(outputs.sidecar_path(path), encoding="utf-8").read())["activation text"] == "zkz"


@pytest.mark.parametrize("version,name", [("sd_v1", "SD1"), ("sd_v2_768_v", "SD2"), ("sd_v2", "SD2"),
                                          ("sdxl_base_v1-0", "SDXL"), (None, "Unknown"), ("flux", "Unknown")])
def test_sd_version_from_base_model_version(version, name):
    assert outputs.sd_version(version) == name


def test_preview_copies_png_converts_others_and_keeps_an_existing_one(tmp_path):
    path = lora(tmp_path)
    png = tmp_path / "sample.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(png)
    target = outputs.set_preview(path, str(png))
    assert target == str(tmp_path / "star.preview.png") and open(target, "rb").read() == png.read_bytes()
    jpg = tmp_path / "sample2.jpg"
    Image.new("RGB", (8, 8), (0, 0, 255)).save(jpg)
    assert outputs.set_preview(path, str(jpg)) is None                    # an existing preview stays
    assert outputs.set_preview(path, str(jpg), replace=True) == target
    with Image.open(target) as im:
        assert im.format == "PNG" and im.getpixel((4, 4))[2] > 200
    assert outputs.set_preview(path, str(tmp_path / "missing.png"), replace=True) is None
    outputs.write_sidecar(path)
    assert sorted(outputs.related_files(path)) == sorted([str(tmp_path / "star.json"), target])


def test_run_notes_summarise_the_run():
    cfg = {"network_module": "networks.lora", "network_args": ["conv_dim=4"], "network_dim": 32,
           "network_alpha": 16, "learning_rate": 1e-4, "unet_lr": 2e-4, "optimizer_type": "AdamW8bit",
           "train_batch_size": 2, "resolution": "512", "clip_skip": 2,
           "pretrained_model_name_or_path": "/m/v1-5.safetensors"}
    notes = outputs.run_notes(cfg, epoch=3, step=120, loss=0.12345)
    for part in ("conv_dim=4", "dim 32", "alpha 16", "unet 0.0002", "AdamW8bit", "batch 2", "clip skip 2",
                 "epoch 3, step 120", "last loss 0.1235", "base v1-5.safetensors"):
        assert part in notes, part


def test_safe_child_refuses_anything_but_a_plain_name(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    assert safe_child(str(root), "star") == str(root / "star")
    for bad in ("", "  ", "..", ".", ".hidden", "a/b", "..\\x", "c:x", "../root2"):
        with pytest.raises(ConfigError):
            safe_child(str(root), bad, what="project")
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", root / "link")
    with pytest.raises(ConfigError, match="outside"):
        safe_child(str(root), "link")


def test_inside_follows_links(tmp_path):
    root, other = tmp_path / "root", tmp_path / "other"
    root.mkdir()
    other.mkdir()
    (other / "f.safetensors").write_bytes(b"x")
    os.symlink(other / "f.safetensors", root / "f.safetensors")
    assert inside(str(root / "sub" / "x"), [str(root)]) and inside(str(root), [str(root)])
    assert not inside(str(root / "f.safetensors"), [str(root)])           # a link out of the root
    assert not inside(str(tmp_path / "root2" / "x"), [str(root)])         # a sibling sharing the prefix
    assert not inside(str(root / ".." / "other" / "f.safetensors"), [str(root)])


def test_basic_host_folders_and_config(tmp_path):
    paths = HostPaths(str(tmp_path / "projects"), str(tmp_path / "loras"), [str(tmp_path / "models")])
    host = BasicHost(paths, default_checkpoint="/m/tiny.safetensors", config={"resolution": "64"})
    assert os.path.isdir(paths.projects) and os.path.isdir(paths.loras)
    assert host.base_config() == {"pretrained_model_name_or_path": "/m/tiny.safetensors", "resolution": "64"}
    assert host.checkpoint_label() == "tiny.safetensors"
    assert paths.allowed_roots() == [paths.projects, paths.loras, str(tmp_path / "models")]
    assert paths.output_dir("star") == os.path.join(paths.loras, "star")
    with host.training_session(None) as model:
        assert model is None
    with pytest.raises(ConfigError):
        paths.project_dir("../x")
