"""Training metadata per model family: the ss_* and modelspec.* values sd-scripts writes for SD 1.x, SD 2.x
(512 / 768-v) and SDXL LoRAs (train_network.py, sdxl_train_network.py, library/sai_model_spec.py)."""
from types import SimpleNamespace

import pytest

from lib_lora_train.config import TrainConfig
from lib_lora_train.training import metadata as md

SUMMARY = {"num_train_images": 10, "num_reg_images": 0, "datasets": [{}], "dataset_dirs": {}, "tag_frequency": {}}
PLAN = SimpleNamespace(epochs=2, total_steps=20)


def info(family, prediction="epsilon", version=None, v2=False):
    return SimpleNamespace(family=family, prediction_type=prediction, base_model_version=version, v2=v2,
                           name="base.safetensors", legacy_hash=None, sha256=None)


FAMILIES = {
    # family: (model info, ss_base_model_version, ss_v2, architecture, implementation, default resolution, pred)
    "sd1": (info("sd1", version="sd_v1"), "sd_v1", "False", "stable-diffusion-v1/lora", "diffusers", "512x512",
            "epsilon"),
    "sd2": (info("sd2", version="sd_v2", v2=True), "sd_v2", "True", "stable-diffusion-v2-512/lora", "diffusers",
            "512x512", "epsilon"),
    "sd2-v": (info("sd2", "v_prediction", "sd_v2_v", True), "sd_v2_v", "True", "stable-diffusion-v2-768-v/lora",
              "diffusers", "768x768", "v"),
    "sdxl": (info("sdxl", version="sdxl_base_v1-0"), "sdxl_base_v1-0", "False", "stable-diffusion-xl-v1-base/lora",
             "https://github.com/Stability-AI/generative-models", "1024x1024", "epsilon"),
}


def metadata(cfg, model_info):
    base = md.training_metadata(cfg, model_info=model_info, data_summary=SUMMARY, plan=PLAN,
                                num_batches_per_epoch=10, optimizer_description="AdamW", network_dim=4,
                                network_alpha=1.0, network_args=None, folder_mode=True, session_id=1,
                                started_at=1.7e9)
    return md.for_save(base, cfg, model_info=model_info, step=20, epoch=2)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_keys(family):
    model_info, version, v2, arch, impl, reso, pred = FAMILIES[family]
    cfg = TrainConfig(output_name="x", resolution=None)
    meta = metadata(cfg, model_info)
    assert meta["ss_base_model_version"] == version
    assert meta["ss_v2"] == v2
    assert meta["modelspec.architecture"] == arch
    assert meta["modelspec.implementation"] == impl
    assert meta["modelspec.resolution"] == reso          # no resolution set: the family's native one
    assert meta["modelspec.prediction_type"] == pred
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert all(isinstance(v, str) for v in meta.values())
    # a given resolution is written as given
    assert metadata(TrainConfig(output_name="x", resolution="832,1216"), model_info)["modelspec.resolution"] == \
        "832x1216"


def test_minimum_keys_per_family():
    model_info = FAMILIES["sdxl"][0]
    cfg = TrainConfig(output_name="x", no_metadata=True)
    meta = metadata(cfg, model_info)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert not any(k.startswith("ss_") and k not in md.MINIMUM_KEYS for k in meta)
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


def test_text_encoder_lr_is_written_as_sd_scripts_uses_it():
    """train_network passes networks.lora the first value of a --text_encoder_lr list and writes that value."""
    model_info = FAMILIES["sdxl"][0]
    cfg = TrainConfig(output_name="x")
    cfg.text_encoder_lr = [5e-5, 5e-5]
    assert metadata(cfg, model_info)["ss_text_encoder_lr"] == "5e-05"
    cfg.text_encoder_lr = []
    assert metadata(cfg, model_info)["ss_text_encoder_lr"] == "None"
    cfg.text_encoder_lr = 1e-4
    assert metadata(cfg, model_info)["ss_text_encoder_lr"] == "0.0001"


def test_model_info_properties_are_used_when_present():
    custom = SimpleNamespace(**vars(FAMILIES["sd1"][0]), architecture="my-arch/lora", implementation="mine",
                             native_resolution=640)
    meta = metadata(TrainConfig(output_name="x", resolution=None), custom)
    assert (meta["modelspec.architecture"], meta["modelspec.implementation"], meta["modelspec.resolution"]) == \
        ("my-arch/lora", "mine", "640x640")


@pytest.mark.parametrize("family,data", [("sdxl", "sdscripts_sdxl_metadata_keys.txt"),
                                         ("sd2-v", "sdscripts_sd2v_metadata_keys.txt")])
def test_keys_equal_sd_scripts_real_output(family, data):
    """tests/data/sdscripts_*_metadata_keys.txt: the metadata keys of LoRAs written by sd-scripts 48d368fa's
    sdxl_train_network.py / train_network.py --v2 --v_parameterization in folder mode (no optional modelspec
    fields given)."""
    from pathlib import Path

    reference = set((Path(__file__).parent / "data" / data).read_text().split())
    model_info = SimpleNamespace(**{**vars(FAMILIES[family][0]), "sha256": "0" * 64, "legacy_hash": "0" * 8})
    ours = set(metadata(TrainConfig(output_name="x", resolution="64,64"), model_info))
    # sshs_* are added when the file is written (networks.io.save_network_file)
    assert ours == {k for k in reference if not k.startswith("sshs_")}
    assert {"sshs_model_hash", "sshs_legacy_hash"} <= reference


def test_network_args_as_sd_scripts_writes_them():
    """sd-scripts adds "dropout" (network_dropout, null when unset) to the network_args it writes (its real SDXL
    LoCon file: {"conv_dim": "4", "conv_alpha": "1", "dropout": null})."""
    import json

    base = md.training_metadata(TrainConfig(output_name="x"), model_info=FAMILIES["sdxl"][0], data_summary=SUMMARY,
                                plan=PLAN, num_batches_per_epoch=1, optimizer_description="AdamW", network_dim=4,
                                network_alpha=1.0, network_args={"conv_dim": "4", "conv_alpha": "1"},
                                folder_mode=True, session_id=1, started_at=1.7e9)
    assert base["ss_network_args"] == '{"conv_dim": "4", "conv_alpha": "1", "dropout": null}'
    cfg = TrainConfig(output_name="x", network_dropout=0.1)
    base = md.training_metadata(cfg, model_info=FAMILIES["sdxl"][0], data_summary=SUMMARY, plan=PLAN,
                                num_batches_per_epoch=1, optimizer_description="AdamW", network_dim=4,
                                network_alpha=1.0, network_args={"algo": "loha", "dropout": "0.2"},
                                folder_mode=True, session_id=1, started_at=1.7e9)
    assert json.loads(base["ss_network_args"]) == {"algo": "loha", "dropout": "0.2"}
    assert "ss_network_args" not in metadata(TrainConfig(output_name="x"), FAMILIES["sdxl"][0])
