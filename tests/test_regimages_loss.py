"""prior_loss_weight in the training loss, as sd-scripts applies it: each sample's loss (mean over its latent) times
its weight (prior_loss_weight for a regularisation image, 1 for a training image), then the mean over the batch.
Checked against a float64 hand computation from the per-sample losses the loop computed, on a batch that mixes
training and generated regularisation images."""
import pytest
import torch
from PIL import Image

from lib_lora_train.config import config_from_dict
from lib_lora_train.prep.regimages import RegRequest, generate_reg_images
from lib_lora_train.training import loop
from numerics import U32


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from lib_lora_train.models import write_tiny_checkpoint
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    write_tiny_checkpoint(str(path), seed=0)
    return str(path)


def _render(spec):
    g = torch.Generator().manual_seed(spec.seed)
    arr = (torch.rand(spec.height, spec.width, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr)


@pytest.mark.parametrize("weight", [0.25, 0.0, 3.0])
def test_prior_loss_weight_scales_the_reg_samples_loss(ckpt, tmp_path, monkeypatch, weight):
    folder = tmp_path / "data" / "1_zkz"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(7)
    for i in range(2):
        arr = (torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("zkz, thing", encoding="utf-8")
    reg = generate_reg_images(RegRequest(prompt="a thing", count=2, width=64, height=64), model_id="sha256:x",
                              backend="engine", render=_render, cache_root=str(tmp_path / "cache"))
    seen = {"flags": [], "per_sample": [], "loss": []}
    real_captions, real_loss, real_backward = loop.captions_for, loop.compute_loss, loop.Updater.backward

    def captions_for(data, batch, **kw):
        seen["flags"].append([s.item.is_reg for s in batch.samples])
        return real_captions(data, batch, **kw)

    def compute_loss(*a, **kw):
        out = real_loss(*a, **kw)
        seen["per_sample"].append(out.detach().clone())
        return out

    def backward(self, loss):
        seen["loss"].append(loss.detach().clone())
        return real_backward(self, loss)
    monkeypatch.setattr(loop, "captions_for", captions_for)
    monkeypatch.setattr(loop, "compute_loss", compute_loss)
    monkeypatch.setattr(loop.Updater, "backward", backward)
    cfg = config_from_dict(dict(
        pretrained_model_name_or_path=ckpt, train_data_dir=str(tmp_path / "data"), reg_data_dir=reg.reg_data_dir,
        output_dir=str(tmp_path / "out"), output_name="w", resolution="64", network_dim=2, network_alpha=1,
        learning_rate=1e-3, max_train_epochs=2, train_batch_size=4, seed=3, device="cpu",
        prior_loss_weight=weight, validation_fallback=False))
    assert loop.train(cfg).status == "done"
    assert len(seen["loss"]) == 2 and all(sorted(f) == [False, False, True, True] for f in seen["flags"])
    for flags, per_sample, loss in zip(seen["flags"], seen["per_sample"], seen["loss"]):
        assert per_sample.shape == (4,) and per_sample.dtype == torch.float32
        w = torch.tensor([weight if r else 1.0 for r in flags], dtype=torch.float64)
        terms = per_sample.double() * w
        ref = terms.mean()
        # float32: one rounding per product and n-1 per sum, then the division (standard error bounds)
        tol = (len(terms) + 2) * U32 * float(terms.abs().sum()) / len(terms) + 1e-30
        assert abs(float(loss) - float(ref)) <= tol, (float(loss), float(ref), tol)
        # and it is not the unweighted mean (the check could fail): reg and train losses differ
        if weight != 1.0:
            assert abs(float(per_sample.double().mean()) - float(ref)) > 100 * tol
