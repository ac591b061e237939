"""Start-up work that must not delay the first step: the checkpoint's full-file hash is read in the background
and still lands, unchanged, in every saved file's metadata and the run record."""
import hashlib
import threading

import pytest
from PIL import Image
import torch

from lib_lora_train.config import config_from_dict
from lib_lora_train.models import loader, write_tiny_checkpoint
from lib_lora_train.models.bundle import ModelInfo
from lib_lora_train.models.ckpt import file_hashes
from lib_lora_train.networks import read_network_file
from lib_lora_train.record import read_run_record
from lib_lora_train.training.loop import train


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    write_tiny_checkpoint(str(path), seed=0)
    return str(path)


def test_background_hashes_are_the_file_hashes_filled_once(ckpt, tmp_path):
    info = ModelInfo(path=ckpt, legacy_hash=None)
    job = loader.BackgroundHashes(info)
    assert job.wait() is True and job.wait() is False
    want = file_hashes(ckpt)
    assert (info.sha256, info.legacy_hash) == (want.sha256, want.legacy)
    with open(ckpt, "rb") as fh:
        assert info.sha256 == hashlib.sha256(fh.read()).hexdigest()
    assert loader.BackgroundHashes(ModelInfo(path=None)).wait() is False          # nothing to read
    assert loader.BackgroundHashes(ModelInfo(path=ckpt, sha256="x", legacy_hash="y")).wait() is False
    gone = loader.BackgroundHashes(ModelInfo(path=str(tmp_path / "missing.safetensors")))
    with pytest.raises(FileNotFoundError):
        gone.wait()


def test_first_step_does_not_wait_for_the_hash_and_the_metadata_has_it(ckpt, tmp_path, monkeypatch):
    folder = tmp_path / "data" / "1_zkz"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("zkz", encoding="utf-8")
    first_step = threading.Event()
    released_by_step = []
    real = loader.file_hashes

    def slow_hashes(path):            # finishes only once training has made its first step (or after 120 s)
        released_by_step.append(first_step.wait(120))
        return real(path)
    monkeypatch.setattr(loader, "file_hashes", slow_hashes)

    def sink(e):
        if e.kind == "step":
            first_step.set()
    cfg = config_from_dict(dict(pretrained_model_name_or_path=ckpt, train_data_dir=str(tmp_path / "data"),
                                output_dir=str(tmp_path / "out"), output_name="h", resolution="64", network_dim=4,
                                max_train_steps=2, train_batch_size=1, seed=1, cache_latents=True, device="cpu",
                                save_every_n_steps=1))
    result = train(cfg, sink=sink)
    assert released_by_step == [True]   # the first step came while the hash was still being read
    want = real(ckpt)
    for path in result.outputs:         # the step-1 file and the final one both carry it
        _, meta = read_network_file(path)
        assert meta["ss_new_sd_model_hash"] == want.sha256 and meta["ss_sd_model_hash"] == want.legacy
    rec = read_run_record(result.record_path)
    assert rec["model"]["sha256"] == want.sha256 and rec["model"]["legacy_hash"] == want.legacy
