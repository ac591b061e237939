"""The demo's run settings: one validated config (prior preservation with the world as reg data), and the
README saying what the code does."""
from pathlib import Path

from lib_lora_train.config import config_from_dict
from lib_lora_train.demo import run, toy


def test_demo_settings_validate_with_prior_preservation(tmp_path):
    data = toy.make_toy_dataset(tmp_path / "data", n_images=2)
    reg = toy.make_reg_dataset(tmp_path / "reg", n_images=2)
    cfg = config_from_dict(run._settings(tmp_path, run.BASE_MODEL, data, reg, None))
    assert cfg.reg_data_dir == str(reg) and cfg.train_data_dir == str(data)
    assert cfg.prior_loss_weight == run.DEMO_SETTINGS["prior_loss_weight"]
    assert cfg.resolution in ("64", (64, 64), [64, 64]) or "64" in str(cfg.resolution)
    no_reg = config_from_dict(run._settings(tmp_path, run.BASE_MODEL, data, None, {"max_train_epochs": 1}))
    assert no_reg.reg_data_dir is None and no_reg.max_train_epochs == 1


def test_readme_states_the_demo_settings():
    readme = (Path(run.__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## What `make demo` does", 1)[1].split("\n## ", 1)[0]
    s = run.DEMO_SETTINGS
    lr = f"{s['learning_rate']:.0e}".replace("e-0", "e-")          # 3e-3
    assert f"learning rate {lr}" in section and f"{s['max_train_epochs']} epochs" in section
    assert ("U-Net only" in section) == bool(s.get("network_train_unet_only"))
    assert "docs/images/demo_grid.png" in section and "prior preservation" in section
