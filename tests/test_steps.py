"""plan_steps: sd-scripts' step/epoch arithmetic and the human-readable formula."""
import math

import pytest
from PIL import Image

from lib_lora_train.dataset import (TrainingData, datasets_from_folders, plan_steps, plan_steps_for_data,
                                    plan_steps_for_datasets)
from lib_lora_train.errors import ConfigError, DataError


def worked_example(tmp_path):
    """trainers.md §1.9: 20 images in 10_x (200 samples) + 300 reg images in 1_cls, batch 2."""
    for folder, n in (("train/10_x", 20), ("reg/1_cls", 300)):
        path = tmp_path / folder
        path.mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i % 256, 0, 0)).save(path / f"{i:03d}.png")
    return datasets_from_folders(str(tmp_path / "train"), str(tmp_path / "reg"),
                                 {"resolution": "512", "train_batch_size": 2})


def test_worked_example_epoch_mode(tmp_path):
    datasets = worked_example(tmp_path)
    data = TrainingData(datasets, seed=0)
    assert data.num_batches_per_epoch == 200
    plan = plan_steps_for_data(data, max_train_epochs=10)
    assert (plan.total_steps, plan.epochs, plan.steps_per_epoch, plan.mode) == (2000, 10, 200, "epochs")
    assert plan.samples_per_epoch == 400
    assert plan_steps_for_data(data, max_train_epochs=10, gradient_accumulation_steps=2).total_steps == 1000
    assert plan_steps_for_data(data, max_train_epochs=10, gradient_accumulation_steps=2,
                               num_processes=2).total_steps == 500
    assert plan.formula.startswith("20 images × 10 repeats = 200 samples (+200 reg, 100 of 300 unused) "
                                   "→ 200 batches of 2")
    assert plan.formula.endswith("= 200 steps/epoch × 10 epochs = 2000 steps")
    # the UI's entry point scans the same folders and agrees
    assert plan_steps_for_datasets(datasets, max_train_epochs=10) == plan


def test_step_mode_default_and_given():
    plan = plan_steps(200)
    assert (plan.total_steps, plan.epochs, plan.steps_per_epoch, plan.mode) == (1600, 8, 200, "steps")
    assert plan.formula == ("200 batches per epoch; ceil(200 batches / grad-accum 1) = 200 steps/epoch; "
                            "1600 steps (max_train_steps) → 8 epochs")
    assert plan_steps(200, gradient_accumulation_steps=2).epochs == 16
    assert plan_steps(200, max_train_steps=450).epochs == 3
    # epochs override steps, as in sd-scripts
    assert plan_steps(200, max_train_steps=450, max_train_epochs=1).total_steps == 200


@pytest.mark.parametrize("batches, procs, ga", [(7, 2, 3), (1, 1, 4), (13, 3, 2), (100, 8, 1)])
def test_arithmetic_matches_sd_scripts(batches, procs, ga):
    epochs = 3
    plan = plan_steps(batches, num_processes=procs, gradient_accumulation_steps=ga, max_train_epochs=epochs)
    assert plan.total_steps == epochs * math.ceil(batches / procs / ga)
    per_epoch = math.ceil(math.ceil(batches / procs) / ga)   # what each process steps through
    assert plan.steps_per_epoch == per_epoch and plan.epochs == math.ceil(plan.total_steps / per_epoch)
    steps = plan_steps(batches, num_processes=procs, gradient_accumulation_steps=ga, max_train_steps=10)
    assert steps.total_steps == 10 and steps.epochs == math.ceil(10 / per_epoch)


def test_bad_inputs():
    with pytest.raises(DataError, match="no batches"):
        plan_steps(0)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        plan_steps(10, gradient_accumulation_steps=0)
    with pytest.raises(ConfigError, match="max_train_epochs"):
        plan_steps(10, max_train_epochs=0)
