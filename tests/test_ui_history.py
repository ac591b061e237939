"""History: table rows from run records, notes beside the record, deleting exactly one run's files."""
import json
import os

import pytest

from lib_lora_train.errors import ConfigError
from lib_lora_train.ui.history import (HEADERS, delete_run, duration_text, read_notes, run_files, run_row,
                                       write_notes)


def fake_run(out, name, *, epochs=2, status="done", extra_outputs=()):
    os.makedirs(out, exist_ok=True)
    outputs = []
    for e in range(1, epochs):
        outputs.append({"path": os.path.join(out, f"{name}-{e:06d}.safetensors"), "epoch": e})
    outputs.append({"path": os.path.join(out, f"{name}.safetensors"), "epoch": epochs})
    outputs += [{"path": p} for p in extra_outputs]
    for o in outputs:
        if o["path"].startswith(out):
            open(o["path"], "wb").write(b"x")
            open(o["path"][:-12] + ".json", "w").write("{}")
            open(o["path"][:-12] + ".preview.png", "wb").write(b"p")
    os.makedirs(os.path.join(out, "sample"), exist_ok=True)
    sample = os.path.join(out, "sample", f"{name}_e000001_00.png")
    open(sample, "wb").write(b"s")
    state = os.path.join(out, f"{name}-state")
    os.makedirs(state, exist_ok=True)
    open(os.path.join(state, "train_state.json"), "w").write("{}")
    rec = {"output_name": name, "status": status, "created": 100.0, "started": 100.0, "seconds": 75.2,
           "config": {"network_module": "lycoris.kohya", "network_args": ["algo=loha"], "network_dim": 8,
                      "network_alpha": 4, "train_batch_size": 2, "learning_rate": 1e-4, "unet_lr": 1e-4,
                      "text_encoder_lr": 5e-5, "optimizer_type": "AdamW", "max_train_epochs": epochs},
           "dataset": {"dataset_dirs": {"10_x": {"n_repeats": 10, "img_count": 6}}},
           "network": {"dim": 8, "alpha": 4.0}, "steps": {"total_steps": 60, "epochs": epochs},
           "step": 60, "last_loss": 0.123456, "outputs": outputs,
           "samples": [{"paths": [sample], "epoch": 1}]}
    with open(os.path.join(out, f"{name}.run.json"), "w") as fh:
        json.dump(rec, fh)
    open(os.path.join(out, f"{name}.events.jsonl"), "w").write("")
    return rec


def test_row_has_the_columns(tmp_path):
    rec = fake_run(str(tmp_path), "run1")
    row = dict(zip(HEADERS, run_row(rec)))
    assert row["Images"] == 6 and row["Repeats"] == "10" and row["Epochs"] == "2"
    assert row["Dim"] == "8" and row["Alpha"] == "4" and row["Batch size"] == "2"
    assert row["U-Net LR"] == "0.0001" and row["Text encoder LR"] == "5e-05"
    assert row["Network"] == "LoHa" and row["Steps"] == "60/60" and row["Duration"] == "1m 15s"
    assert row["Last loss"] == "0.1235" and "run1.safetensors" in row["Files"]
    assert duration_text(3725) == "1h 02m" and duration_text(None) == ""


def test_notes_live_beside_the_record(tmp_path):
    fake_run(str(tmp_path), "run1")
    assert read_notes(str(tmp_path), "run1") == ""
    path = write_notes(str(tmp_path), "run1", "too strong at 1.0\n")
    assert path.endswith("run1.notes.txt") and read_notes(str(tmp_path), "run1") == "too strong at 1.0\n"
    with pytest.raises(ConfigError):
        write_notes(str(tmp_path), "nope", "x")
    with pytest.raises(ConfigError):
        write_notes(str(tmp_path), "../run1", "x")


def test_delete_takes_only_that_runs_files(tmp_path):
    out = str(tmp_path / "loras" / "p")
    fake_run(out, "p")
    fake_run(out, "p_v2")                          # another run whose name starts the same way
    open(os.path.join(out, "mine.txt"), "w").write("user file")
    write_notes(out, "p", "n")
    files = {os.path.relpath(f, out) for f in run_files(out, "p")}
    assert files == {"p-000001.safetensors", "p-000001.json", "p-000001.preview.png", "p.safetensors", "p.json",
                     "p.preview.png", "p.run.json", "p.events.jsonl", "p.notes.txt", "p-state",
                     os.path.join("sample", "p_e000001_00.png")}
    with pytest.raises(ConfigError, match="still training"):
        delete_run(out, "p", active=True)
    assert os.path.exists(os.path.join(out, "p.safetensors"))
    delete_run(out, "p")
    left = sorted(os.listdir(out))
    assert "mine.txt" in left and "p_v2.safetensors" in left and "p_v2.run.json" in left and "p_v2-state" in left
    assert not [n for n in left if n.startswith("p.") or n.startswith("p-")]
    assert os.listdir(os.path.join(out, "sample")) == ["p_v2_e000001_00.png"]


def test_delete_never_leaves_the_output_folder(tmp_path):
    out = str(tmp_path / "loras" / "p")
    outside = tmp_path / "precious.safetensors"
    outside.write_bytes(b"keep")
    fake_run(out, "p", extra_outputs=[str(outside)])            # a record naming a file elsewhere
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    os.symlink(str(target), os.path.join(out, "p-000009-state"))  # a link named like a state folder
    deleted = delete_run(out, "p")
    assert outside.read_bytes() == b"keep" and (target / "keep.txt").read_text() == "keep"
    assert os.path.join(out, "p-000009-state") in deleted      # the link itself goes, never what it points to
    with pytest.raises(ConfigError):
        delete_run(out, "../p")
    with pytest.raises(ConfigError):
        delete_run(out, "nope")
