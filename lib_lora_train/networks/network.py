"""Network: the trainable adapters hooked into a UNet and a text encoder, with sd-scripts file tensors.

LoRA / LoCon, LoHa, LoKr and IA3 use lycoris-lora's module classes (created directly, one per layer, with our
own names and targets); DyLoRA is our own module (dylora.py). Hooking is ours too: each adapted layer gets an
instance-level `forward` that remove() deletes again, so the models are left exactly as they were.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .config import NetworkConfig, check_block_family
from .delta import split_by_module
from .dylora import DyLoRAModule
from .names import check_family, is_sdxl_unet, te_prefixes
from .targets import Target, find_targets, text_encoder_list

_MISSING = object()


def _lycoris():
    # imported lazily: lycoris pulls in torch._dynamo and takes seconds to import
    from lycoris.modules.ia3 import IA3Module
    from lycoris.modules.locon import LoConModule
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule
    return LoConModule, LohaModule, LokrModule, IA3Module


_KOHYA_LOCON = None


def _kohya_locon_class():
    """LoConModule whose training forward applies sd-scripts' dropout rules (networks/lora.py LoRAModule).

    LyCORIS defines dropout differently (after the up projection, rank mask shared by the batch, no rescale);
    for LoRA we follow sd-scripts: module dropout skips the layer, neuron dropout acts on the down output, rank
    dropout masks ranks per sample and rescales by 1/(1-p). Without dropout (or in eval mode) the LyCORIS
    forward is used unchanged.
    """
    global _KOHYA_LOCON
    if _KOHYA_LOCON is not None:
        return _KOHYA_LOCON
    LoConModule = _lycoris()[0]

    class KohyaLoConModule(LoConModule):
        def __init__(self, *args, neuron_dropout=None, kohya_rank_dropout=None, kohya_module_dropout=None,
                     **kwargs):
            super().__init__(*args, **kwargs)
            self.neuron_dropout = neuron_dropout
            self.kohya_rank_dropout = kohya_rank_dropout
            self.kohya_module_dropout = kohya_module_dropout

        def forward(self, x, *args, **kwargs):
            if not self.training or not (self.neuron_dropout or self.kohya_rank_dropout
                                         or self.kohya_module_dropout):
                return super().forward(x, *args, **kwargs)
            out = self.org_forward(x, *args, **kwargs)
            if self.kohya_module_dropout and torch.rand(1) < self.kohya_module_dropout:
                return out
            down = self.lora_down.weight.to(x.dtype)
            if self.isconv:
                conv = self.lora_down if not self.tucker else self.lora_mid
                geometry = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
                if self.tucker:
                    lx = F.conv2d(F.conv2d(x, down), self.lora_mid.weight.to(x.dtype), **geometry)
                else:
                    lx = F.conv2d(x, down, **geometry)
            else:
                lx = F.linear(x, down)
            if self.neuron_dropout:
                lx = F.dropout(lx, p=self.neuron_dropout)
            scale = self.scale
            if self.kohya_rank_dropout:
                mask = torch.rand((lx.size(0), self.lora_dim), device=lx.device) > self.kohya_rank_dropout
                if lx.dim() == 3:
                    mask = mask.unsqueeze(1)
                elif lx.dim() == 4:
                    mask = mask[:, :, None, None]
                lx = lx * mask.to(lx.dtype)
                scale = scale / (1.0 - self.kohya_rank_dropout)
            up = self.lora_up.weight.to(x.dtype)
            lx = F.conv2d(lx, up) if self.isconv else F.linear(lx, up)
            return out + lx * (self.scalar.to(lx.dtype) * self.multiplier * scale)

    _KOHYA_LOCON = KohyaLoConModule
    return _KOHYA_LOCON


def _make_adapter(cfg: NetworkConfig, t: Target, multiplier: float) -> torch.nn.Module:
    if "dim" in t.options:     # per-block rank / alpha (block weights)
        dim, alpha = t.options["dim"], t.options["alpha"]
    else:
        dim, alpha = (cfg.conv_dim, cfg.conv_alpha) if t.kxk else (cfg.dim, cfg.alpha)
    if cfg.algo == "dylora":
        return DyLoRAModule(t.name, t.module, dim, alpha, cfg.unit, multiplier)
    _, LohaModule, LokrModule, IA3Module = _lycoris()
    common = dict(multiplier=multiplier, lora_dim=dim, alpha=alpha, module_dropout=cfg.module_dropout or 0.0)
    # Bypass (y = W x + ΔW-path(x)) by default: LyCORIS' rebuild mode computes W x and then ((W + ΔW) - W) x,
    # which costs more and loses float32 precision in the subtraction. Both give the same result (tested).
    bypass = True if cfg.bypass_mode is None else cfg.bypass_mode
    if cfg.algo == "lora":
        return _kohya_locon_class()(
            t.name, t.module, use_tucker=cfg.use_tucker, use_scalar=cfg.use_scalar, bypass_mode=bypass,
            neuron_dropout=cfg.dropout, kohya_rank_dropout=cfg.rank_dropout,
            kohya_module_dropout=cfg.module_dropout, **{**common, "module_dropout": 0.0})
    if cfg.algo == "loha":
        return LohaModule(t.name, t.module, rank_dropout=cfg.rank_dropout or 0.0, use_tucker=cfg.use_tucker,
                          use_scalar=cfg.use_scalar, bypass_mode=bypass, **common)
    if cfg.algo == "lokr":
        return LokrModule(t.name, t.module, rank_dropout=cfg.rank_dropout or 0.0, use_tucker=cfg.use_tucker,
                          use_scalar=cfg.use_scalar, decompose_both=cfg.decompose_both, factor=cfg.factor,
                          bypass_mode=bypass, **common)
    if cfg.algo == "ia3":
        if not isinstance(t.module, torch.nn.Linear):
            raise ConfigError(f"algo=ia3 adapts Linear layers only, but preset {cfg.preset!r} includes the conv "
                              f"layer {t.name}; use preset=ia3 or attn-only")
        # bypass scales the layer output including its bias, which a weight scale in the file cannot express:
        # use it only where it is exact (scale on the input, or no bias)
        exact = t.on_input or t.module.bias is None
        return IA3Module(t.name, t.module, train_on_input=t.on_input, bypass_mode=bypass and exact, **common)
    raise ConfigError(f"unknown algo {cfg.algo!r}")


def _adapter_tensors(adapter: torch.nn.Module) -> dict[str, torch.Tensor]:
    if isinstance(adapter, DyLoRAModule):
        return adapter.state_tensors()
    return dict(adapter.state_dict())     # lycoris modules give the file layout (custom_state_dict)


def _on_input(network: "Network", key: str) -> bool:
    return network._targets[key.rsplit(".", 1)[0]].on_input


def _fits(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Same alpha once ours is stored at the file's precision (fp16 files round alpha)."""
    return bool(ours.to(theirs.dtype) == theirs)


def text_encoder_lr_value(lr: float | Sequence[float] | None) -> float | None:
    """The one text-encoder lr sd-scripts' train_network uses with networks.lora / lycoris.kohya: a number as
    given; of a list, its first value (None for an empty list). A list whose values differ is refused: those
    network modules cannot give SDXL's two encoders different rates."""
    if lr is None or isinstance(lr, (int, float)):
        return lr
    values = [float(v) for v in lr]
    if not values:
        return None
    if any(v != values[0] for v in values[1:]):
        raise ConfigError(f"text_encoder_lr {values}: networks.lora and lycoris.kohya train all text encoders at "
                          f"one learning rate (sd-scripts uses the first value only); give one value")
    return values[0]


class Network(torch.nn.Module):
    """Adapters for the layers of one UNet and one or two text encoders (see create_network)."""

    family: str = "sd1"

    def __init__(self, cfg: NetworkConfig, targets: list[Target], multiplier: float = 1.0):
        super().__init__()
        self.config = cfg
        self.adapters = torch.nn.ModuleDict()
        self._targets: dict[str, Target] = {}
        for t in targets:
            self.adapters[t.name] = _make_adapter(cfg, t, multiplier)
            self._targets[t.name] = t
        self._multiplier = float(multiplier)
        self._hooks: list[tuple[torch.nn.Module, object, object]] = []
        self.eval()    # the training loop switches to train() (dropout, DyLoRA chunks) for its steps

    # -- names and parts ---------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.adapters.keys())

    def names_for(self, part: str) -> list[str]:
        return [n for n, t in self._targets.items() if t.part == part]

    def _adapters_for(self, part: str) -> list[torch.nn.Module]:
        return [self.adapters[n] for n in self.names_for(part)]

    # -- hooking -----------------------------------------------------------------------------------------------
    @property
    def applied(self) -> bool:
        return bool(self._hooks)

    def apply_to(self) -> None:
        """Route each adapted layer's forward through its adapter."""
        if self._hooks:
            raise RuntimeError("network is already applied")
        for name, adapter in self.adapters.items():
            module = self._targets[name].module
            previous = module.__dict__.get("forward", _MISSING)
            adapter.org_forward = module.forward
            hook = adapter.forward
            module.forward = hook
            self._hooks.append((module, previous, hook))

    def remove(self) -> None:
        """Undo apply_to(): the layers get back exactly the forward they had (nothing else was changed)."""
        while self._hooks:
            module, previous, hook = self._hooks.pop()
            if module.__dict__.get("forward") is not hook:
                raise RuntimeError(f"{type(module).__name__} was re-hooked by someone else; remove that first")
            if previous is _MISSING:
                del module.__dict__["forward"]
            else:
                module.__dict__["forward"] = previous

    # -- multiplier --------------------------------------------------------------------------------------------
    @property
    def multiplier(self) -> float:
        return self._multiplier

    @multiplier.setter
    def multiplier(self, value: float) -> None:
        self._multiplier = float(value)
        for adapter in self.adapters.values():
            adapter.multiplier = self._multiplier

    # -- training ----------------------------------------------------------------------------------------------
    def param_groups(self, unet_lr: float | None, text_encoder_lr: float | Sequence[float] | None,
                     default_lr: float | None) -> list[dict]:
        """Optimizer groups "text_encoder" and "unet" (sd-scripts order); lr None means default_lr.

        text_encoder_lr may be a list (sd-scripts' --text_encoder_lr takes several values): networks.lora and
        lycoris.kohya have no per-encoder groups, so sd-scripts' train_network uses the first value for all text
        encoders (SDXL's two included); values that differ are refused here instead of being ignored.
        A part with lr 0 is left out and its parameters are frozen (requires_grad False).
        """
        text_encoder_lr = text_encoder_lr_value(text_encoder_lr)
        groups = []
        for part, lr in (("text_encoder", text_encoder_lr), ("unet", unet_lr)):
            names = self.names_for(part)
            if not names:
                continue
            lr = default_lr if lr is None else lr
            if lr is None:
                raise ConfigError(f"no learning rate for the {part} part of the network")
            weights = self.config.block_lr_weight
            if part == "unet" and weights is not None:
                # sd-scripts: one group per block, "unet_block{slot}", lr = unet lr x the block's weight
                from ..tools.blocks import block_index
                by_slot: dict[int, list[str]] = {}
                for n in names:
                    by_slot.setdefault(block_index(n), []).append(n)
                for slot in sorted(by_slot):
                    weight = weights[slot] if slot >= 0 else 1.0
                    groups += self._group(by_slot[slot], float(lr) * weight, f"unet_block{slot}")
            else:
                groups += self._group(names, float(lr), part)
        return groups

    def _group(self, names: list[str], lr: float, label: str) -> list[dict]:
        """One optimizer group; with lr 0 its adapters are frozen and no group is made."""
        frozen = lr == 0.0
        params = []
        for n in names:
            adapter = self.adapters[n]
            if isinstance(adapter, DyLoRAModule):
                adapter.frozen = frozen
                adapter.set_chunk(adapter.chunk_start)
            else:
                adapter.requires_grad_(not frozen)
            params.extend(adapter.parameters())
        return [] if frozen else [{"params": params, "lr": lr, "name": label}]

    def before_step(self, generator: torch.Generator | None = None) -> None:
        """Per-step choices: DyLoRA draws the trained rank chunk (the same chunk index for all layers)."""
        dy = [a for a in self.adapters.values() if isinstance(a, DyLoRAModule)]
        if not dy:
            return
        chunks = max(a.lora_dim // a.unit for a in dy)
        device = generator.device if generator is not None else "cpu"
        k = int(torch.randint(0, chunks, (1,), generator=generator, device=device).item())
        for a in dy:
            a.set_chunk(min(k, a.lora_dim // a.unit - 1) * a.unit)

    # -- tensors -----------------------------------------------------------------------------------------------
    def save_tensors(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The network as sd-scripts / LyCORIS file tensors ("<name>.lora_down.weight", "<name>.alpha", ...)."""
        out: dict[str, torch.Tensor] = {}
        for name, adapter in self.adapters.items():
            for key, t in _adapter_tensors(adapter).items():
                t = t.detach().to("cpu")
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                out[f"{name}.{key}"] = self._file_shape(f"{name}.{key}", t.clone()).contiguous()
        return out

    # SD 2.x: sd-scripts trains on a U-Net whose proj_in / proj_out are 1x1 convs (it converts the checkpoint's
    # Linear weights), so its files hold those layers' LoRA factors as [r, in, 1, 1] / [out, r, 1, 1]. Ours are
    # Linear layers: the factors are written in sd-scripts' shape and read back in either shape.
    def _conv_shaped(self, key: str) -> bool:
        name = key.split(".", 1)[0]
        t = self._targets.get(name)
        return (self.family == "sd2" and t is not None and t.part == "unet"
                and name.endswith(("_proj_in", "_proj_out")) and isinstance(t.module, torch.nn.Linear)
                and key.endswith((".lora_down.weight", ".lora_up.weight")))

    def _file_shape(self, key: str, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(*t.shape, 1, 1) if t.dim() == 2 and self._conv_shaped(key) else t

    def _own_shape(self, key: str, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[:2]) if t.dim() == 4 and self._conv_shaped(key) else t

    def load_tensors(self, tensors: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """Load file tensors (resume, or start from existing weights). Nothing changes if a check fails.

        strict: the keys must be exactly this network's, with the same shapes and alphas. Otherwise missing
        layers keep their values, unknown keys are ignored and a layer's alpha is taken from the file; a shape
        mismatch is always an error. SDXL files with diffusers-spelled U-Net names (lora_unet_down_blocks_...) are
        read as their sgm names, as sd-scripts converts them on load.
        """
        tensors = {k: self._file_shape(k, v) for k, v in self._sgm_spelling(tensors).items()}
        expected = {k: v.shape for k, v in self.save_tensors().items()}
        missing = [k for k in expected if k not in tensors]
        unexpected = [k for k in tensors if k not in expected]
        wrong = [f"{k} {tuple(tensors[k].shape)} != {tuple(s)}" for k, s in expected.items()
                 if k in tensors and tuple(tensors[k].shape) != tuple(s)]
        # IA3: the side a scale acts on is fixed by the layer, not a weight
        wrong += [f"{k} differs" for k in expected
                  if k.endswith(".on_input") and k in tensors and bool(tensors[k]) != bool(_on_input(self, k))]
        by_module = split_by_module({k: v for k, v in tensors.items() if k in expected})
        alpha_diff = [n for n, w in by_module.items()
                      if "alpha" in w and not _fits(self.adapters[n].alpha, w["alpha"])]
        problems = []
        if wrong:
            problems.append(f"{len(wrong)} shape mismatches, e.g. {wrong[:3]}")
        if strict:
            if missing:
                problems.append(f"{len(missing)} missing keys, e.g. {missing[:3]}")
            if unexpected:
                problems.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:3]}")
            if alpha_diff:
                problems.append(f"{len(alpha_diff)} layers with a different alpha, e.g. {alpha_diff[:3]}")
        if problems:
            raise ConfigError("network weights do not fit this network: " + "; ".join(problems))

        with torch.no_grad():
            for name, w in by_module.items():
                adapter = self.adapters[name]
                weights = {k: self._own_shape(f"{name}.{k}", v) for k, v in w.items() if k != "alpha"}
                if isinstance(adapter, DyLoRAModule):
                    if weights:
                        down, up = adapter.full_weights()
                        adapter.load_weights(weights.get("lora_down.weight", down), weights.get("lora_up.weight", up))
                else:
                    adapter.load_state_dict(weights, strict=False)
                if name in alpha_diff and not (getattr(adapter, "use_w1", False) and getattr(adapter, "use_w2", False)):
                    alpha = float(w["alpha"])
                    adapter.alpha.fill_(alpha)
                    adapter.scale = (alpha or adapter.lora_dim) / adapter.lora_dim

    def _sgm_spelling(self, tensors: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        if self.family != "sdxl" or not any(k.startswith(("lora_unet_down_blocks_", "lora_unet_mid_block_",
                                                           "lora_unet_up_blocks_")) for k in tensors):
            return tensors
        rename = {"lora_unet_" + t.path.replace(".", "_"): n for n, t in self._targets.items() if t.part == "unet"}
        out = {}
        for key, t in tensors.items():
            module, dot, rest = key.partition(".")
            out[rename.get(module, module) + dot + rest] = t
        return out

    def trainable_parameters(self) -> Iterable[torch.nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)


def _resolve_family(family: str | None, unet, encoders: list) -> str:
    """The family the names follow: given, or told by the models (an SDXL U-Net / two encoders); checked."""
    sdxl_unet = is_sdxl_unet(unet)
    if family is None:
        family = "sdxl" if sdxl_unet or len(encoders) == 2 else "sd1"
    check_family(family)
    if unet is not None and sdxl_unet != (family == "sdxl"):
        raise ConfigError(f"family={family!r} but the U-Net is "
                          f"{'an SDXL' if sdxl_unet else 'not an SDXL'} U-Net")
    return family


def create_network(cfg: NetworkConfig, unet: torch.nn.Module | None, text_encoder, multiplier: float = 1.0, *,
                   family: str | None = None) -> Network:
    """Build the adapters for cfg on the given models (not hooked yet: call apply_to()).

    text_encoder: one encoder (SD 1.x / 2.x), [te1, te2] (SDXL) or None. family: "sd1" | "sd2" | "sdxl"; None
    infers it from the models (SD 2.x names are SD 1.x names, so only SDXL matters for the names).
    A part excluded by train_unet / train_text_encoder gets no adapters at all (sd-scripts behaviour).
    The network starts in eval mode; the training loop calls .train() for its steps.
    """
    encoders = text_encoder_list(text_encoder)
    family = _resolve_family(family, unet, encoders)
    if cfg.block_dims is not None or cfg.block_lr_weight is not None:
        check_block_family(cfg, family)
    targets: list[Target] = []
    if cfg.train_text_encoder:
        if not encoders:
            raise ConfigError("train_text_encoder is on but no text encoder was given")
        prefixes = te_prefixes(family, len(encoders))
        for i, (prefix, te) in enumerate(zip(prefixes, encoders), 1):
            targets += find_targets(te, "text_encoder", cfg.preset, family=family, prefix=prefix,
                                    encoder=i if len(encoders) > 1 else None)
    if cfg.train_unet:
        if unet is None:
            raise ConfigError("train_unet is on but no U-Net was given")
        targets += find_targets(unet, "unet", cfg.preset, family=family)
    if cfg.block_dims is not None:
        targets = _block_targets(cfg, targets)
    elif cfg.conv_dim is None:
        targets = [t for t in targets if not t.kxk]
    if not targets:
        raise ConfigError(f"preset {cfg.preset!r} adapts no layer of the parts being trained")
    network = Network(cfg, targets, multiplier)
    network.family = family
    return network


def _block_targets(cfg: NetworkConfig, targets: list[Target]) -> list[Target]:
    """Per-block rank / alpha for the U-Net targets (sd-scripts' slots: 25 SD1/SD2, 23 SDXL); rank 0 drops the
    layer.

    Text-encoder layers and U-Net layers outside every slot keep network_dim / network_alpha (conv_dim /
    conv_alpha for k×k convs).
    """
    from ..tools.blocks import block_index

    kept = []
    for t in targets:
        slot = block_index(t.name) if t.part == "unet" else -1
        if slot < 0:
            if t.kxk and cfg.conv_dim is None:
                continue
            kept.append(t)
            continue
        if t.kxk:
            if cfg.conv_block_dims is None:
                continue
            dim, alpha = cfg.conv_block_dims[slot], cfg.conv_block_alphas[slot]
        else:
            dim, alpha = cfg.block_dims[slot], cfg.block_alphas[slot]
        if dim:
            t.options.update(dim=int(dim), alpha=float(alpha))
            kept.append(t)
    return kept
