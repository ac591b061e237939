"""Live merging into a loaded model: same weights as a file merge, and an exact restore."""
import threading

import pytest
import torch

from lib_lora_train.errors import ConfigError, Interrupted, ModelError
from lib_lora_train.hosts.live_merge import LiveMerger, ModuleLiveModel, strip_wrapped
from lib_lora_train.models import load_sd_model, read_checkpoint, save_checkpoint
from lib_lora_train.networks import save_network_file
from lib_lora_train.tools.merge import LoraInput, merge_into_checkpoint
from test_tools_support import assert_close, base_model, outputs, random_network, tiny_sd


def module_like_webui(sd, dtype=None):
    """An nn.Module with the checkpoint's keys as parameter names, the text encoder nested under `.wrapped`
    levels as the WebUI's hijack does."""
    root = torch.nn.Module()
    for key, t in sd.items():
        parts = key.split(".")
        if parts[0] == "cond_stage_model":
            parts.insert(1, "wrapped")
            if key.endswith("token_embedding.weight"):
                parts.insert(-1, "wrapped")
        mod = root
        for p in parts[:-1]:
            if p not in mod._modules:
                mod.add_module(p, torch.nn.Module())
            mod = mod._modules[p]
        value = t.clone()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        mod.register_parameter(parts[-1], torch.nn.Parameter(value, requires_grad=value.is_floating_point()))
    return root


class Hooked(ModuleLiveModel):
    def __init__(self, module):
        super().__init__(module)
        self.calls = []
        self.busy_reason = None

    def before_write(self):
        self.calls.append("before")

    def after_write(self, keys):
        self.calls.append(("after", len(keys)))

    def busy(self):
        return self.busy_reason


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("live")
    save_checkpoint(d / "base.safetensors", tiny_sd())
    for name, seed, args in (("a", 61, ["conv_dim=2", "conv_alpha=1"]), ("b", 62, [])):
        net = random_network(base_model(), "networks.lora", 4, 2, args, seed=seed)
        save_network_file(d / f"{name}.safetensors", net.save_tensors(), {"modelspec.title": name})
    return d


def snapshot(live):
    return {k: (t.detach().clone(), t.data_ptr()) for k, t in live.state_dict_view().items()}


def assert_identical(live, snap):
    view = live.state_dict_view()
    assert set(view) == set(snap)
    for k, (t, ptr) in snap.items():
        assert view[k].data_ptr() == ptr, f"{k} was replaced instead of written in place"
        assert view[k].dtype == t.dtype and torch.equal(view[k], t), f"{k} differs after restore"


def test_view_has_the_checkpoint_keys():
    live = ModuleLiveModel(module_like_webui(tiny_sd()))
    assert set(live.state_dict_view()) == set(tiny_sd())
    assert strip_wrapped("cond_stage_model.wrapped.transformer.x.wrapped.weight") == "cond_stage_model.transformer.x.weight"


@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_apply_then_restore_is_bit_identical(files, dtype):
    live = Hooked(module_like_webui(tiny_sd(), dtype))
    before = snapshot(live)
    merger = LiveMerger(live)
    h1 = merger.apply([str(files / "a.safetensors")], [0.8], ["MIDD"])
    h2 = merger.apply([str(files / "b.safetensors")], [-1.5])
    view = live.state_dict_view()
    changed = set(h1.keys) | set(h2.keys)
    assert changed and all(not torch.equal(view[k], before[k][0]) for k in h2.keys)
    assert all(view[k].dtype == before[k][0].dtype for k in changed)
    assert [h.id for h in merger.applied] == [h1.id, h2.id]
    with pytest.raises(ConfigError, match="later merges"):
        merger.restore(h1)
    assert merger.restore() is h2
    assert merger.restore_all() == [h1]
    assert_identical(live, before)
    assert live.calls.count("before") == 4 and ("after", len(h2.keys)) in live.calls
    with pytest.raises(ConfigError, match="no live merge"):
        merger.restore()


def test_live_weights_and_outputs_equal_the_file_merge(files, tmp_path):
    spec = dict(ratio=0.7, block_weights="1,1,1,1,0,0,1,1,1,1,1,1,1,1,0.5,1,1")
    out = merge_into_checkpoint(files / "base.safetensors", [LoraInput(str(files / "a.safetensors"), **spec)],
                                tmp_path / "merged.safetensors")
    from_file = read_checkpoint(out.path)
    live = ModuleLiveModel(module_like_webui(tiny_sd()))
    merger = LiveMerger(live)
    handle = merger.apply([LoraInput(str(files / "a.safetensors"), **spec)])
    view = {k: t.detach().clone() for k, t in live.state_dict_view().items()}
    assert sorted(handle.keys) == sorted(out.report.changed_keys)
    for k, t in from_file.items():
        assert torch.equal(view[k], t), k
    got = outputs(load_sd_model(view))
    want = outputs(load_sd_model(from_file))
    base = outputs(base_model())
    for g, w, b in zip(got, want, base):   # same weights; the kernels may still differ in the last bit
        assert_close(g, w, rel=1e-6)
        assert not torch.allclose(g, b, atol=1e-4)
    merger.restore()
    restored = outputs(load_sd_model({k: t.detach().clone() for k, t in live.state_dict_view().items()}))
    for r, b in zip(restored, base):
        assert_close(r, b, rel=1e-6)


def test_stop_and_errors_leave_the_model_unchanged(files):
    live = ModuleLiveModel(module_like_webui(tiny_sd()))
    before = snapshot(live)
    merger = LiveMerger(live)
    stop = threading.Event()
    stop.set()
    with pytest.raises(Interrupted):
        merger.apply([str(files / "a.safetensors")], stop=stop)
    alien = {"lora_unet_nothing_here.lora_down.weight": torch.ones(2, 3),
             "lora_unet_nothing_here.lora_up.weight": torch.ones(3, 2)}
    with pytest.raises(ModelError, match="fits this model"):
        merger.apply([alien])
    with pytest.raises(ConfigError, match="ratios"):
        merger.apply([str(files / "a.safetensors")], [1.0, 2.0])
    assert merger.applied == []
    assert_identical(live, before)


def test_restore_refuses_weights_rewritten_since(files):
    live = Hooked(module_like_webui(tiny_sd()))
    before = snapshot(live)
    merger = LiveMerger(live)
    handle = merger.apply([str(files / "b.safetensors")])
    with torch.no_grad():     # e.g. another checkpoint loaded into the same tensors
        live.state_dict_view()[handle.keys[0]].add_(1.0)
    with pytest.raises(ModelError, match="changed after the merge"):
        merger.restore()
    assert merger.applied == [handle]
    merger.restore(force=True)
    assert_identical(live, before)


def test_busy_model_and_missing_model_are_refused(files):
    live = Hooked(module_like_webui(tiny_sd()))
    live.busy_reason = "a training run uses the model"
    with pytest.raises(ConfigError, match="training run"):
        LiveMerger(live).apply([str(files / "b.safetensors")])
    with pytest.raises(ModelError, match="no model is loaded"):
        LiveMerger(lambda: None).apply([str(files / "b.safetensors")])
    assert live.calls == []
