"""Known lycoris-lora 4.1.3 bugs that the engine works around. Each test asserts the bug is STILL there, so a
fixed release gets noticed: the test then fails with "upstream fixed — revisit workaround"."""
import pytest
import torch

from lib_lora_train.networks import module_delta

FIXED = "upstream fixed — revisit workaround"


def randomise(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module


def file_tensors(module):
    return {k: v.detach() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_loha_lokr_diff_weight_applies_alpha_over_rank_twice(algo):
    """get_diff_weight / merge_to scale by alpha/rank twice; we never use them (delta.py reads the file)."""
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 64)
    cls = LohaModule if algo == "loha" else LokrModule
    m = randomise(cls("x", layer, lora_dim=2, alpha=1))        # scale 0.5, low-rank factors
    correct = module_delta(file_tensors(m), layer.weight)
    # our reading is the one the module's own forward pass uses
    m.org_forward = layer.forward
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(m(x) - layer(x), x @ correct.t(), rtol=1e-4, atol=1e-5)
        upstream = m.get_diff_weight()[0]
    if torch.allclose(upstream, correct, rtol=1e-4, atol=1e-6):
        pytest.fail(FIXED + ": lycoris get_diff_weight is right now")
    torch.testing.assert_close(upstream, correct * 0.5, rtol=1e-4, atol=1e-6)


def test_dylora_cannot_reload_its_own_conv_file():
    """lycoris' DyLoRA saves conv lora_up 2-D and its load_state_dict does nothing; we use our own DyLoRA."""
    from lycoris.modules.dylora import DyLoraModule

    m = DyLoraModule("x", torch.nn.Conv2d(8, 8, 1), lora_dim=4, alpha=1, block_size=1)
    sd = file_tensors(m)
    changed = {k: (v if k == "alpha" else torch.randn_like(v)) for k, v in sd.items()}
    m.load_state_dict(changed)
    reloaded = torch.equal(file_tensors(m)["lora_down.weight"], changed["lora_down.weight"])
    if sd["lora_up.weight"].dim() == 4 and reloaded:
        pytest.fail(FIXED + ": lycoris DyLoRA saves 4-D conv weights and reloads them")


def test_lokr_conv_file_does_not_reload_through_lycoris():
    """lycoris' loader guesses the LoKr factorization from a conv file wrongly (the kernel is folded into w2_b)."""
    from lycoris.modules import get_module, make_module
    from lycoris.modules.lokr import LokrModule

    conv = torch.nn.Conv2d(4, 32, 3, padding=1)
    sd = {f"x.{k}": v for k, v in file_tensors(randomise(LokrModule("x", conv, lora_dim=2, alpha=1))).items()}
    try:
        kind, params = get_module(sd, "x")
        make_module(kind, params, "x", conv)
    except RuntimeError:
        return
    pytest.fail(FIXED + ": lycoris reloads LoKr conv files")


def test_lycoris_full_preset_wraps_time_embedding_twice():
    """The built-in "full" preset crashes on a diffusers UNet; presets.py's "full" is deduplicated."""
    from lycoris.config import PRESET

    full = PRESET["full"]
    by_class = "TimestepEmbedding" in full["unet_target_module"]
    by_name = any(n.startswith("time_embedding.") for n in full["unet_target_name"])
    if not (by_class and by_name):
        pytest.fail(FIXED + ": lycoris' full preset no longer reaches time_embedding both ways")
