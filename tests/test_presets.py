"""Presets as data: one source for TOML `preset = ...`, `--preset` and an API config; per-family values; user
presets from a folder."""
import pytest

from lib_lora_train import presets
from lib_lora_train.cli import main
from lib_lora_train.config import UNSUPPORTED, config_from_dict, load_config, parse_cli_overrides
from lib_lora_train.errors import ConfigError


@pytest.mark.parametrize("family", presets.FAMILIES)
def test_every_builtin_preset_is_a_valid_config(family):
    for name, p in presets.builtin().items():
        if family not in p.families:
            with pytest.raises(ConfigError, match="is for"):
                p.values(family)
            continue
        values = p.values(family)
        assert not set(values) & set(UNSUPPORTED), (name, set(values) & set(UNSUPPORTED))
        config_from_dict(dict(values, **({"sdxl": True} if family == "sdxl" else {})))


def test_family_values():
    assert presets.resolve("character", "sd1")["resolution"] == "512"
    assert presets.resolve("character", "sd2")["resolution"] == "768"
    xl = presets.resolve("sdxl-character")
    assert xl["resolution"] == "1024" and xl["no_half_vae"] is True
    low = presets.resolve(["character", "sdxl-8gb"], "sdxl")
    for key, want in (("gradient_checkpointing", True), ("cache_latents", True), ("cache_text_encoder_outputs", True),
                      ("network_train_unet_only", True), ("fp8_base", True), ("optimizer_type", "Adafactor"),
                      ("shuffle_caption", False), ("network_dim", 32)):
        assert low[key] == want, key
    assert presets.resolve("character+sdxl-12gb", "sdxl")["optimizer_type"] == "AdamW8bit"


def test_explicit_keys_win_everywhere(tmp_path):
    cfg = config_from_dict({"preset": "style", "network_dim": 16})
    assert cfg.network_dim == 16 and cfg.network_alpha == 64 and cfg.resolution == "512"
    (tmp_path / "run.toml").write_text('preset = "concept"\n[network]\nnetwork_alpha = 8\n')
    cfg = load_config(str(tmp_path / "run.toml"))
    assert cfg.network_dim == 64 and cfg.network_alpha == 8 and cfg.clip_skip == 1
    cfg = load_config(str(tmp_path / "run.toml"), parse_cli_overrides(["--preset", "character", "--network_dim", "4"]))
    assert cfg.network_dim == 4 and cfg.clip_skip == 2
    cfg = config_from_dict({"preset": "character", "sdxl": True})       # the family from sd-scripts' flag
    assert cfg.resolution == "1024"


def test_unknown_preset_names_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'character'"):
        config_from_dict({"preset": "charcter"})
    with pytest.raises(ConfigError, match="is for sdxl"):
        config_from_dict({"preset": "sdxl-8gb"})


def test_user_presets_folder(tmp_path, monkeypatch, capsys):
    (tmp_path / "mine.toml").write_text('description = "my faces"\nnetwork_dim = 12\n[sdxl]\nnetwork_dim = 24\n')
    monkeypatch.setenv(presets.ENV_DIRS, str(tmp_path))
    assert presets.resolve("mine", "sd1")["network_dim"] == 12
    assert config_from_dict({"preset": "sdxl-mine"}).network_dim == 24
    assert main(["presets", "--family", "sdxl"]) == 0
    out = capsys.readouterr().out
    assert "mine" in out and "my faces" in out and "sdxl-8gb" in out and "fp8_base=True" in out
    (tmp_path / "bad.toml").write_text("network_dmi = 3\n")
    with pytest.raises(ConfigError, match="network_dim"):
        presets.all_presets()


def test_api_config_takes_a_preset(tmp_path):
    """The jobs' config resolution (POST runs) expands "preset" like a TOML does; explicit keys and the host's
    base keys stay above it."""
    from lib_lora_train.demo.toy import make_toy_dataset
    from lib_lora_train.hosts.base import BasicHost, HostPaths
    from lib_lora_train.jobs import JobManager
    from lib_lora_train.models import write_tiny_checkpoint
    from lib_lora_train.prep.preprocess import PreprocessOptions
    from lib_lora_train.prep.project import create_project, import_images
    ckpt = write_tiny_checkpoint(str(tmp_path / "models" / "tiny.safetensors"))
    host = BasicHost(HostPaths(str(tmp_path / "projects"), str(tmp_path / "loras"), [str(tmp_path / "models")]),
                     default_checkpoint=str(ckpt), config={"resolution": "64", "device": "cpu"})
    proj = create_project(str(tmp_path / "projects" / "star"), "star", trigger="zkz", purpose="style")
    import_images(proj, str(make_toy_dataset(tmp_path / "toy", n_images=2)), recursive=True, repeats=1,
                  options=PreprocessOptions(workers=1))
    cfg = JobManager(host).resolve_config("star", {"preset": "style", "network_alpha": 8})
    assert cfg.network_dim == 128 and cfg.network_alpha == 8 and cfg.resolution == "64"


# name: (updates on 12 pictures + 48 class images at the preset's own repeats and epochs, shuffled captions)
BENCHMARKED = {"concept": (576, True), "character": (720, True), "style": (480, False)}


@pytest.mark.parametrize("name", sorted(BENCHMARKED))
def test_purpose_presets_are_the_benchmarked_recipe_in_a_few_hundred_updates(tmp_path, name):
    """Each purpose preset as bench/quality runs it (its sd1 values, its suggested repeats, a dozen images and a
    regularisation folder): a few hundred optimizer updates of 8 images each, with the techniques the benchmark
    credits (bench/results_quality.md) switched on, in every family."""
    from PIL import Image
    from lib_lora_train.training.data_setup import plan_for_config
    p = presets.builtin()[name]
    updates, shuffled = BENCHMARKED[name]
    assert all("regularisation images" in p.describe(f) for f in presets.FAMILIES), name
    data, reg = tmp_path / "data" / f"{p.repeats}_zkz", tmp_path / "reg" / "1_world"
    for folder, n in ((data, 12), (reg, 48)):
        folder.mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (64, 64), (i * 5, 40, 200 - i)).save(folder / f"{i:03d}.png")
            (folder / f"{i:03d}.txt").write_text(f"zkz, picture {i}\n", encoding="utf-8")
    for family in presets.FAMILIES:
        cfg = config_from_dict({"preset": f"{family}-{name}", "resolution": "64", "cache_latents": True,
                                "pretrained_model_name_or_path": "base.safetensors", "output_dir": str(tmp_path),
                                "train_data_dir": str(data.parent), "reg_data_dir": str(reg.parent)})
        assert cfg.train_batch_size * cfg.gradient_accumulation_steps == 8, family   # images per update
        assert cfg.min_snr_gamma == 5 and cfg.network_train_unet_only and cfg.prior_loss_weight == 2, family
        assert cfg.shuffle_caption is shuffled, family
        # 12 images x repeats + as many regularisation samples, x epochs, 8 per update
        assert plan_for_config(cfg, num_processes=1).total_steps == updates, family


def test_a_prior_loss_weight_without_regularisation_images_is_reported(tmp_path):
    """The "concept" preset's prior_loss_weight 2 acts on regularisation images only: without them the run says so
    (a warning event), with them or at sd-scripts' default 1.0 it does not."""
    from PIL import Image
    from lib_lora_train.events import WARNING
    from lib_lora_train.training.data_setup import build_training_data
    for folder in (tmp_path / "data" / "2_zkz", tmp_path / "reg" / "1_shape"):
        folder.mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (64, 64), (i * 60, 90, 30)).save(folder / f"{i}.png")
            (folder / f"{i}.txt").write_text(f"picture {i}\n", encoding="utf-8")

    def warnings(**keys):
        cfg = config_from_dict({"preset": "concept", "resolution": "64", "output_dir": str(tmp_path / "out"),
                                "pretrained_model_name_or_path": "base.safetensors",
                                "train_data_dir": str(tmp_path / "data"), **keys})
        events = []
        build_training_data(cfg, events.append)
        messages = [e.data["message"] for e in events if e.kind == WARNING]
        return [m for m in messages if m.startswith("prior_loss_weight")]

    (msg,) = warnings()
    assert "prior_loss_weight = 2" in msg and "reg_data_dir" in msg and "reg_images_prompt" in msg
    assert warnings(reg_data_dir=str(tmp_path / "reg")) == []
    assert warnings(prior_loss_weight=1.0) == []
