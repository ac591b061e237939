"""Regularisation images (prep/regimages.py): the cache (hits, misses, a growing count, what the key holds),
atomic writes and completion after an interrupt, the reg folder read back by the dataset code with sd-scripts'
balancing, prior_loss_weight in the loss against a float64 hand computation, and the CLI / run keys end to end
on the tiny model."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from lib_lora_train.cli import main as cli_main
from lib_lora_train.config import config_from_dict
from lib_lora_train.errors import ConfigError
from lib_lora_train.prep import regimages as rg
from lib_lora_train.prep.regimages import RegRequest, cache_key, generate_reg_images


class FakeRender:
    """Draws a flat image whose colour is a function of the seed (the cache logic does not need a model);
    raises at call number `fail_at` (1-based) to act out an interrupt."""

    def __init__(self, fail_at=None):
        self.calls, self.fail_at = [], fail_at

    def __call__(self, spec):
        self.calls.append(spec.seed)
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise RuntimeError("injected failure while drawing")
        v = (spec.seed * 37) % 256
        return Image.new("RGB", (spec.width, spec.height), (v, 255 - v, 7))


def _req(**kw):
    values = dict(prompt="red circle, white background", count=3, width=64, height=64, steps=2)
    values.update(kw)
    return RegRequest(**values)


def _listing(folder):
    return sorted(os.listdir(folder))


def test_cache_hit_miss_and_a_growing_count(tmp_path):
    render = FakeRender()
    first = generate_reg_images(_req(count=3, seed=10), model_id="sha256:aa", backend="engine", render=render,
                                cache_root=str(tmp_path))
    assert (first.generated, first.reused, render.calls) == (3, 0, [10, 11, 12])
    assert os.path.basename(first.folder) == "1_red circle white background"
    assert _listing(first.folder) == ["reg_00000.png", "reg_00000.txt", "reg_00001.png", "reg_00001.txt",
                                      "reg_00002.png", "reg_00002.txt"]
    for i in range(3):
        with open(os.path.join(first.folder, f"reg_{i:05d}.txt"), encoding="utf-8") as fh:
            assert fh.read() == "red circle, white background\n"
    stamp = os.stat(first.images[0]).st_mtime_ns
    again = generate_reg_images(_req(count=3, seed=10), model_id="sha256:aa", backend="engine", render=render,
                                cache_root=str(tmp_path))
    assert (again.generated, again.reused, again.reg_data_dir) == (0, 3, first.reg_data_dir)
    assert render.calls == [10, 11, 12] and os.stat(first.images[0]).st_mtime_ns == stamp
    more = generate_reg_images(_req(count=5, seed=10), model_id="sha256:aa", backend="engine", render=render,
                               cache_root=str(tmp_path))
    assert (more.generated, more.reused, render.calls[3:]) == (2, 3, [13, 14])
    fewer = generate_reg_images(_req(count=2, seed=10), model_id="sha256:aa", backend="engine", render=render,
                                cache_root=str(tmp_path))
    assert (fewer.generated, len(fewer.images), len(render.calls)) == (0, 2, 5)
    # other repeats: the same images, the folder renamed to the new N_
    rep = generate_reg_images(_req(count=5, seed=10, repeats=3), model_id="sha256:aa", backend="engine",
                              render=render, cache_root=str(tmp_path))
    assert rep.generated == 0 and os.path.basename(rep.folder) == "3_red circle white background"
    assert _listing(rep.reg_data_dir) == ["3_red circle white background", rg.META_FILE]
    with open(os.path.join(rep.reg_data_dir, rg.META_FILE), encoding="utf-8") as fh:
        meta = json.load(fh)
    assert (meta["model"], meta["prompt"], meta["seed"], meta["key"]) == \
        ("sha256:aa", "red circle, white background", 10, rep.key)


def test_the_key_changes_with_what_decides_the_pixels_and_only_with_that():
    base = cache_key(_req(), "sha256:aa", "engine")
    changed = {
        "prompt": cache_key(_req(prompt="1girl"), "sha256:aa", "engine"),
        "model": cache_key(_req(), "sha256:bb", "engine"),
        "backend": cache_key(_req(), "sha256:aa", "webui"),
        "width": cache_key(_req(width=128), "sha256:aa", "engine"),
        "height": cache_key(_req(height=128), "sha256:aa", "engine"),
        "negative": cache_key(_req(negative_prompt="blurry"), "sha256:aa", "engine"),
        "sampler": cache_key(_req(sampler="euler_a"), "sha256:aa", "engine"),
        "steps": cache_key(_req(steps=3), "sha256:aa", "engine"),
        "cfg": cache_key(_req(cfg_scale=5), "sha256:aa", "engine"),
        "seed": cache_key(_req(seed=1), "sha256:aa", "engine"),
    }
    assert base not in changed.values() and len(set(changed.values())) == len(changed)
    assert cache_key(_req(count=99, repeats=4), "sha256:aa", "engine") == base
    # sampler spellings of the same sampler are one key
    assert cache_key(_req(sampler="DPM++ 2M Karras"), "sha256:aa", "engine") == base


def test_another_model_prompt_or_size_is_another_folder(tmp_path):
    render = FakeRender()
    a = generate_reg_images(_req(count=1), model_id="sha256:aa", backend="engine", render=render,
                            cache_root=str(tmp_path))
    b = generate_reg_images(_req(count=1), model_id="sha256:bb", backend="engine", render=render,
                            cache_root=str(tmp_path))
    c = generate_reg_images(_req(count=1, prompt="1girl"), model_id="sha256:aa", backend="engine",
                            render=render, cache_root=str(tmp_path))
    d = generate_reg_images(_req(count=1, width=128), model_id="sha256:aa", backend="engine", render=render,
                            cache_root=str(tmp_path))
    assert len({a.reg_data_dir, b.reg_data_dir, c.reg_data_dir, d.reg_data_dir}) == 4
    assert len(render.calls) == 4 and Image.open(d.images[0]).size == (128, 64)


def test_an_interrupted_request_leaves_whole_images_and_a_rerun_completes_it(tmp_path):
    broken = FakeRender(fail_at=3)
    with pytest.raises(RuntimeError, match="injected"):
        generate_reg_images(_req(count=5), model_id="sha256:aa", backend="engine", render=broken,
                            cache_root=str(tmp_path))
    key = cache_key(_req(), "sha256:aa", "engine")
    folder = os.path.join(tmp_path, key, "1_red circle white background")
    assert _listing(folder) == ["reg_00000.png", "reg_00000.txt", "reg_00001.png", "reg_00001.txt"]
    # a process killed between an image and its caption, and a temp file of a dead writer (pid 999999999)
    os.unlink(os.path.join(folder, "reg_00001.txt"))
    with open(os.path.join(folder, ".reg_00002.png.999999999.abc.tmp"), "wb") as fh:
        fh.write(b"half a png")
    render = FakeRender()
    done = generate_reg_images(_req(count=5), model_id="sha256:aa", backend="engine", render=render,
                               cache_root=str(tmp_path))
    assert render.calls == [2, 3, 4]        # the image without a caption is kept, only its caption written
    assert (done.generated, done.reused) == (4, 1)
    assert _listing(folder) == [f"reg_{i:05d}.{e}" for i in range(5) for e in ("png", "txt")]
    for i, path in enumerate(done.images):
        v = (i * 37) % 256
        assert Image.open(path).getpixel((0, 0)) == (v, 255 - v, 7)


def test_a_stop_between_images_is_an_interrupt_and_resumable(tmp_path):
    import threading

    from lib_lora_train.errors import Interrupted
    stop = threading.Event()
    render = FakeRender()

    def progress(done, total):
        if done == 2:
            stop.set()
    with pytest.raises(Interrupted, match="2 of 4"):
        generate_reg_images(_req(count=4), model_id="sha256:aa", backend="engine", render=render,
                            cache_root=str(tmp_path), progress=progress, stop=stop)
    again = generate_reg_images(_req(count=4), model_id="sha256:aa", backend="engine", render=render,
                                cache_root=str(tmp_path))
    assert (again.reused, again.generated, render.calls) == (2, 2, [0, 1, 2, 3])


def test_hostile_and_bad_requests_are_refused():
    for bad in ({"prompt": ""}, {"prompt": "   "}, {"prompt": "a\nb"}, {"prompt": "a\0b"}, {"prompt": "x" * 1001},
                {"count": 0}, {"count": 10001}, {"width": 10}, {"width": 100}, {"height": 8192}, {"steps": 0},
                {"cfg_scale": 0}, {"seed": -1}, {"repeats": 0}, {"sampler": "nope"},
                {"negative_prompt": "a\r\nb"}):
        with pytest.raises(ConfigError):
            _req(**bad)
    # the class folder's name is made of the prompt's words only: a prompt cannot steer a path
    assert rg.class_folder_name("../../etc/passwd") == "etc passwd"
    assert rg.class_folder_name("C:\\Windows\\x") == "C Windows x"
    assert rg.class_folder_name("...") == "class"
    assert rg.class_folder_name("ｓｔａｒ") == "class"
    with pytest.raises(ConfigError, match="identity"):
        cache_key(_req(), "", "engine")


def test_run_keys_are_validated_at_the_edge(tmp_path):
    ok = config_from_dict({"reg_images_prompt": "  1girl ", "reg_images_count": 4, "reg_images_size": "64"})
    assert ok.reg_images_prompt == "1girl"
    for values, word in (({"reg_images_prompt": "a\nb"}, "control"),
                         ({"reg_images_prompt": "x", "reg_images_count": 0}, "reg_images_count"),
                         ({"reg_images_prompt": "x", "reg_images_size": "65"}, "reg_images_size"),
                         ({"reg_images_prompt": "x", "reg_images_steps": 500}, "reg_images_steps"),
                         ({"reg_images_prompt": "x", "reg_images_sampler": "bogus"}, "reg_images_sampler"),
                         ({"reg_images_prompt": "x", "reg_data_dir": str(tmp_path)}, "both set"),
                         ({"reg_images_prompt": "x", "dataset_config": str(tmp_path / "d.toml")},
                          "dataset_config")):
        with pytest.raises(ConfigError, match=word):
            config_from_dict(values)
    for blank in ("", "   ", None):        # blank: no reg images (the tab's empty field)
        assert config_from_dict({"reg_images_prompt": blank}).reg_images_prompt is None


# ---------------------------------------------------------------- the dataset code reads them back
def _train_folder(root, name, n, seed=0):
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        arr = (torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"zkz, tag{i}", encoding="utf-8")
    return folder


def test_the_reg_folder_reads_back_with_sd_scripts_balancing(tmp_path):
    from lib_lora_train.dataset import TrainingData, datasets_from_folders
    from lib_lora_train.prep.check import check_dataset
    _train_folder(tmp_path / "img", "3_zkz", 4)                       # 12 train samples per epoch
    res = generate_reg_images(_req(count=5), model_id="sha256:aa", backend="engine", render=FakeRender(),
                              cache_root=str(tmp_path / "cache"))
    report = check_dataset(str(tmp_path / "img"), res.reg_data_dir, workers=1, with_summary=False, min_side=64)
    assert report.can_train, report.summary_text()
    general = {"resolution": [64, 64], "train_batch_size": 1}
    data = TrainingData(datasets_from_folders(str(tmp_path / "img"), res.reg_data_dir, general), seed=1)
    reg = sorted((it for it in data.items if it.is_reg), key=lambda it: it.path)
    assert [os.path.basename(it.path) for it in reg] == [f"reg_{i:05d}.png" for i in range(5)]
    assert {it.caption for it in reg} == {"red circle, white background"}
    # sd-scripts: reg samples per epoch = train samples (12): 5 at 1 repeat, then +1 cyclically: 3,3,2,2,2
    assert [it.num_repeats for it in reg] == [3, 3, 2, 2, 2]
    assert data.summary()["num_reg_images"] == 5 and data.samples_per_epoch == 24
    data.set_prior_loss_weight(0.25)
    assert {it.loss_weight for it in reg} == {0.25}
    assert {it.loss_weight for it in data.items if not it.is_reg} == {1.0}


# ---------------------------------------------------------------- with the tiny model
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from lib_lora_train.models import write_tiny_checkpoint
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    write_tiny_checkpoint(str(path), seed=0)
    return str(path)


def test_the_engine_draws_what_the_sampler_draws_for_each_seed(ckpt, tmp_path):
    from lib_lora_train.models import load_sd_model
    from lib_lora_train.sampling.pipeline import generate
    model = load_sd_model(ckpt)
    with rg.engine_source(model) as (model_id, backend, render):
        res = generate_reg_images(_req(count=2, seed=5), model_id=model_id, backend=backend, render=render,
                                  cache_root=str(tmp_path))
    assert backend == "engine" and model_id.startswith("sha256:") and len(model_id) == 7 + 64
    direct = generate(model, [_req(count=2, seed=5).spec(1)])[0]
    saved = Image.open(res.images[1])
    assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(direct))
    assert "Seed: 6" in saved.info["parameters"] and "DPM++ 2M Karras" in saved.info["parameters"]
    # a model built in memory (no file) is keyed by its weights
    mem = load_sd_model(rg_state_dict(), name="mem")
    assert rg.engine_model_id(mem).startswith("weights:")
    assert rg.engine_model_id(mem) == rg.engine_model_id(load_sd_model(rg_state_dict(), name="mem"))
    assert rg.engine_model_id(mem) != rg.engine_model_id(load_sd_model(rg_state_dict(seed=4), name="mem"))


def rg_state_dict(seed=3):
    from lib_lora_train.models import tiny_sd1_state_dict
    return tiny_sd1_state_dict(seed=seed)


def test_cli_makes_and_reuses_them(ckpt, tmp_path, capsys):
    args = ["reg-images", "--model", ckpt, "--prompt", "a photo of a woman", "--count", "2", "--size", "64",
            "--steps", "2", "--out", str(tmp_path), "--device", "cpu", "--json"]
    assert cli_main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert (first["generated"], first["count"], first["backend"]) == (2, 2, "engine")
    assert cli_main(args[:6] + ["3"] + args[7:]) == 0
    second = json.loads(capsys.readouterr().out)
    assert (second["generated"], second["reused"], second["reg_data_dir"]) == (1, 2, first["reg_data_dir"])
    assert Image.open(second["images"][2]).size == (64, 64)
    assert cli_main(args[:4] + ["bad\nprompt"] + args[5:]) == 2
    assert "control characters" in capsys.readouterr().err
    assert cli_main(["reg-images", "--model", str(tmp_path / "missing.safetensors"), "--prompt", "x",
                     "--count", "1"]) == 2


def test_a_run_with_reg_images_prompt_generates_caches_and_trains_on_them(ckpt, tmp_path):
    from safetensors import safe_open

    from lib_lora_train.record import read_events
    from lib_lora_train.training.loop import train
    _train_folder(tmp_path / "data", "2_zkz", 2)
    values = dict(pretrained_model_name_or_path=ckpt, train_data_dir=str(tmp_path / "data"),
                  output_dir=str(tmp_path / "out"), output_name="a", resolution="64", network_dim=2,
                  network_alpha=1, learning_rate=1e-3, max_train_epochs=1, train_batch_size=2, seed=1,
                  device="cpu", reg_images_prompt="red circle", reg_images_steps=2, prior_loss_weight=0.5)
    result = train(config_from_dict(values))
    assert result.status == "done"
    cache = tmp_path / "out" / "reg_images"
    (key,) = os.listdir(cache)
    folder = cache / key / "1_red circle"
    assert len([n for n in os.listdir(folder) if n.endswith(".png")]) == 4     # default: one epoch's samples
    with safe_open(str(tmp_path / "out" / "a.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_num_reg_images"] == "4" and meta["ss_prior_loss_weight"] == "0.5"
    assert str(cache / key) in meta["ss_reg_dataset_dirs"] or "1_red circle" in meta["ss_reg_dataset_dirs"]
    logs = [e["message"] for e in read_events(str(tmp_path / "out" / "a.events.jsonl")) if e["kind"] == "log"]
    assert any("0 from the cache, 4 drawn by the engine sampler" in m for m in logs)
    # a second run with the same cache folder and a larger count draws only the missing ones
    values.update(output_name="b", reg_images_count=6, reg_images_dir=str(cache))
    result = train(config_from_dict(values))
    logs = [e["message"] for e in read_events(str(tmp_path / "out" / "b.events.jsonl")) if e["kind"] == "log"]
    assert result.status == "done" and any("4 from the cache, 2 drawn" in m for m in logs)
    assert os.listdir(cache) == [key]
