"""NetworkConfig: what network to train, parsed once from sd-scripts' network_module / dim / alpha / args."""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ..errors import ConfigError

NETWORK_MODULES = ("networks.lora", "networks.dylora", "lycoris.kohya")
ALGOS = ("lora", "loha", "lokr", "dylora", "ia3")

# Keys that sd-scripts accepts and a later issue will implement: refuse them rather than ignore them.
_LATER = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
# Block-weight (分层) options: networks.lora only, as in sd-scripts (see _block_weights).
_BLOCK_KEYS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "down_lr_weight",
               "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold")

_VALID_KEYS = {
    "networks.lora": ("conv_dim", "conv_alpha", "rank_dropout", "module_dropout") + _BLOCK_KEYS,
    "networks.dylora": ("unit", "conv_dim", "conv_alpha"),
    "lycoris.kohya": ("algo", "preset", "conv_dim", "conv_alpha", "dropout", "rank_dropout", "module_dropout",
                      "factor", "decompose_both", "use_tucker", "use_scalar", "bypass_mode", "block_size",
                      "train_norm", "dora_wd", "rs_lora", "full_matrix", "unbalanced_factorization"),
}
# LyCORIS options we know but do not support: accepted only at their default (off).
_LYCORIS_OFF_ONLY = ("train_norm", "dora_wd", "rs_lora", "full_matrix", "unbalanced_factorization")
_LYCORIS_ALGO_ALIASES = {"lora": "lora", "locon": "lora", "loha": "loha", "lokr": "lokr", "dylora": "dylora",
                         "ia3": "ia3", "(ia)^3": "ia3"}


@dataclass
class NetworkConfig:
    network_module: str = "networks.lora"    # as given; written as ss_network_module
    algo: str = "lora"                       # lora (LoRA/LoCon) | loha | lokr | dylora | ia3
    dim: int = 4                             # network_dim (rank)
    alpha: float = 1.0                       # network_alpha; 0 means alpha = dim
    conv_dim: int | None = None              # rank of k×k convs; None = k×k convs not adapted
    conv_alpha: float | None = None
    preset: str = "lierla"                   # a name in presets.PRESETS
    unit: int = 1                            # DyLoRA rank chunk
    dropout: float | None = None             # neuron dropout (network_dropout)
    rank_dropout: float | None = None
    module_dropout: float | None = None
    factor: int = -1                         # LoKr
    decompose_both: bool = False             # LoKr
    use_tucker: bool = False                 # LoCon / LoHa / LoKr k×k convs
    use_scalar: bool = False
    bypass_mode: bool | None = None          # None: bypass (see network._make_adapter); False: LyCORIS rebuild
    train_unet: bool = True
    train_text_encoder: bool = True
    network_args: dict[str, str] = field(default_factory=dict)   # as given, for ss_network_args
    # Block weights (networks.lora): one value per sd-scripts slot of block_family (25 SD1 / SD2, 23 SDXL, see
    # tools/blocks.py). With block_dims
    # set, U-Net Linear / 1x1 layers take their rank / alpha from their slot, k×k convs from conv_block_dims
    # (None: k×k convs are not adapted), and a slot of rank 0 gets no module. The text encoder keeps dim / alpha.
    block_dims: list[int] | None = None
    block_alphas: list[float] | None = None
    conv_block_dims: list[int] | None = None
    conv_block_alphas: list[float] | None = None
    block_lr_weight: list[float] | None = None   # per-slot lr multiplier: U-Net groups "unet_block{slot}"
    block_family: str = "sd1"                    # the model family the per-slot lists were parsed for

    @property
    def variant(self) -> str:
        """Human name: LoRA-LierLa, LoRA-C3Lier, LoHa, LoKr, DyLoRA, IA3."""
        if self.algo == "lora":
            return "LoRA-C3Lier" if (self.conv_dim or self.conv_block_dims) else "LoRA-LierLa"
        return {"loha": "LoHa", "lokr": "LoKr", "dylora": "DyLoRA", "ia3": "IA3"}[self.algo]


def _suggest(key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else f" (valid keys: {', '.join(valid)})"


def _parse_args(network_args: Sequence[str] | Mapping[str, Any] | None) -> dict[str, str]:
    if network_args is None:
        return {}
    if isinstance(network_args, Mapping):
        return {str(k).strip(): str(v).strip() for k, v in network_args.items()}
    if isinstance(network_args, str):
        network_args = network_args.split()
    out: dict[str, str] = {}
    for item in network_args:
        if "=" not in str(item):
            raise ConfigError(f"network_args entry {item!r} is not of the form key=value")
        key, value = str(item).split("=", 1)
        out[key.strip()] = value.strip()
    return out


def _int(key: str, value: str, *, minimum: int | None = None) -> int:
    try:
        number = int(str(value))
    except ValueError:
        raise ConfigError(f"network_args {key}={value!r}: expected an integer") from None
    if minimum is not None and number < minimum:
        raise ConfigError(f"network_args {key}={number}: must be >= {minimum}")
    return number


def _float(key: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r}: expected a number") from None


def _prob(key: str, value: Any) -> float | None:
    if value is None or str(value).strip().lower() in ("", "none"):
        return None
    p = _float(key, value)
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"{key}={p}: a dropout probability must be in [0, 1)")
    return p or None


def _bool(key: str, value: str) -> bool:
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", "none", ""):
        return False
    raise ConfigError(f"network_args {key}={value!r}: expected true or false")


def network_config_from_args(network_module: str | None, network_dim: int | None, network_alpha: float | None,
                             network_args: Sequence[str] | Mapping[str, Any] | None, *, train_unet: bool = True,
                             train_text_encoder: bool = True, network_dropout: float | None = None,
                             family: str = "sd1") -> NetworkConfig:
    """Parse sd-scripts' network options into a NetworkConfig (ConfigError on anything not understood).

    family ("sd1" | "sd2" | "sdxl"): the model the network is for; it sets how many values the block-weight
    options take (sd-scripts' 25 SD1/SD2 slots or 23 SDXL slots).
    """
    from .names import check_family
    from .presets import PRESETS

    check_family(family)

    module = (network_module or "networks.lora").strip()
    if module not in NETWORK_MODULES:
        raise ConfigError(f"network_module {module!r} is not supported{_suggest(module, NETWORK_MODULES)}")
    if not train_unet and not train_text_encoder:
        raise ConfigError("nothing to train: both the U-Net and the text encoder are excluded")
    dim = 4 if network_dim is None else int(network_dim)
    if dim < 1:
        raise ConfigError(f"network_dim={dim}: must be >= 1")
    alpha = 1.0 if network_alpha is None else _float("network_alpha", network_alpha)
    args = _parse_args(network_args)

    valid = _VALID_KEYS[module]
    for key in args:
        if key in _LATER:
            raise ConfigError(f"network_args {key}: LoRA+ options are not implemented yet")
        if key in _BLOCK_KEYS and module != "networks.lora":
            raise ConfigError(f"network_args {key}: block weights are supported by networks.lora only "
                              f"(as in sd-scripts), not by {module}")
        if key not in valid:
            if key == "dropout":
                hint = " (use network_dropout)"
            elif key in _VALID_KEYS["lycoris.kohya"]:
                hint = " (a LyCORIS option: set network_module=lycoris.kohya)"
            else:
                hint = _suggest(key, valid)
            raise ConfigError(f"network_args: unknown key {key!r} for {module}{hint}")

    cfg = NetworkConfig(network_module=module, dim=dim, alpha=alpha, train_unet=bool(train_unet),
                        train_text_encoder=bool(train_text_encoder), network_args=dict(args), block_family=family)
    cfg.dropout = _prob("network_dropout", network_dropout)
    cfg.rank_dropout = _prob("rank_dropout", args.get("rank_dropout"))
    cfg.module_dropout = _prob("module_dropout", args.get("module_dropout"))

    if module == "networks.lora":
        cfg.algo = "lora"
        if "conv_dim" in args:
            cfg.conv_dim = _int("conv_dim", args["conv_dim"], minimum=1)
            cfg.conv_alpha = _float("conv_alpha", args["conv_alpha"]) if "conv_alpha" in args else 1.0
            cfg.preset = "c3lier"
        elif "conv_alpha" in args and "conv_block_dims" not in args:
            raise ConfigError("network_args conv_alpha needs conv_dim (LoRA-C3Lier)")
        else:
            cfg.preset = "lierla"
        _block_weights(cfg, args)
    elif module == "networks.dylora":
        cfg.algo = "dylora"
        cfg.unit = _int("unit", args.get("unit", "1"), minimum=1)
        if cfg.dropout or cfg.rank_dropout or cfg.module_dropout:
            raise ConfigError("networks.dylora does not support network_dropout")
        if "conv_dim" in args:
            cfg.conv_dim = _int("conv_dim", args["conv_dim"], minimum=1)
            if cfg.conv_dim != dim:
                raise ConfigError(f"networks.dylora: conv_dim ({cfg.conv_dim}) must equal network_dim ({dim})")
            # sd-scripts uses network_alpha for 3x3 convs too; a different conv_alpha would be silently ignored there
            cfg.conv_alpha = _float("conv_alpha", args["conv_alpha"]) if "conv_alpha" in args else alpha
            if cfg.conv_alpha != alpha:
                raise ConfigError("networks.dylora uses network_alpha for conv layers too: "
                                  "conv_alpha must be left out or equal network_alpha")
            cfg.preset = "c3lier"
        elif "conv_alpha" in args:
            raise ConfigError("network_args conv_alpha needs conv_dim")
        else:
            cfg.preset = "lierla"
    else:
        _lycoris(cfg, args, network_dropout)

    if cfg.preset not in PRESETS:
        raise ConfigError(f"network_args preset={cfg.preset!r} is not known{_suggest(cfg.preset, list(PRESETS))}")
    if cfg.algo == "dylora":
        for d in (cfg.dim, cfg.conv_dim):
            if d is not None and d % cfg.unit:
                raise ConfigError(f"DyLoRA: rank {d} is not a multiple of unit {cfg.unit}")
    return cfg


def _lycoris(cfg: NetworkConfig, args: dict[str, str], network_dropout: float | None) -> None:
    algo_name = args.get("algo", "lora").strip().lower()
    if algo_name not in _LYCORIS_ALGO_ALIASES:
        raise ConfigError(f"network_args algo={algo_name!r} is not supported"
                          f"{_suggest(algo_name, list(_LYCORIS_ALGO_ALIASES))}")
    cfg.algo = _LYCORIS_ALGO_ALIASES[algo_name]
    for key in _LYCORIS_OFF_ONLY:
        if key in args and _bool(key, args[key]):
            raise ConfigError(f"network_args {key}=True is not supported")
    # sd-scripts passes network_dropout as `dropout` unless network_args sets it
    cfg.dropout = _prob("dropout", args["dropout"]) if "dropout" in args else _prob("network_dropout",
                                                                                    network_dropout)
    cfg.preset = args.get("preset", "ia3" if cfg.algo == "ia3" else "full").strip()
    cfg.factor = _int("factor", args.get("factor", "-1"))
    cfg.decompose_both = _bool("decompose_both", args.get("decompose_both", "false"))
    cfg.use_tucker = _bool("use_tucker", args.get("use_tucker", "false"))
    cfg.use_scalar = _bool("use_scalar", args.get("use_scalar", "false"))
    if "bypass_mode" in args:
        cfg.bypass_mode = _bool("bypass_mode", args["bypass_mode"])
    cfg.unit = _int("block_size", args.get("block_size", "4"), minimum=1)
    # LyCORIS: conv_dim defaults to network_dim and conv_alpha to network_alpha
    cfg.conv_dim = _int("conv_dim", args["conv_dim"], minimum=0) if "conv_dim" in args else cfg.dim
    cfg.conv_alpha = _float("conv_alpha", args["conv_alpha"]) if "conv_alpha" in args else cfg.alpha
    if cfg.conv_dim == 0:
        cfg.conv_dim = None
    if cfg.algo == "ia3":
        if cfg.dropout or cfg.rank_dropout:
            raise ConfigError("algo=ia3 supports module_dropout only (no dropout / rank_dropout)")
    if cfg.algo in ("loha", "lokr") and cfg.dropout:
        raise ConfigError(f"algo={cfg.algo}: neuron dropout is not implemented by LyCORIS for this algo; "
                          "use rank_dropout or module_dropout")
    if cfg.algo == "dylora":
        if cfg.dropout or cfg.rank_dropout or cfg.module_dropout:
            raise ConfigError("algo=dylora does not support dropout")
        if cfg.use_tucker or cfg.use_scalar:
            raise ConfigError("algo=dylora does not support use_tucker / use_scalar")


def _block_weights(cfg: NetworkConfig, args: dict[str, str]) -> None:
    """block_dims / block_alphas / conv_block_dims / conv_block_alphas / *_lr_weight (sd-scripts semantics).

    Block mode starts when any of these is given (sd-scripts starts it only for block_dims or an lr weight and
    then silently ignores the alphas and conv_block_dims; here they take effect). Missing per-slot lists default
    to network_dim / network_alpha (conv: conv_dim / conv_alpha, or 1.0 as in sd-scripts). A slot whose lr
    weight is 0 (or at most block_lr_zero_threshold) gets rank 0, i.e. no module.
    """
    from ..tools.blocks import block_lr_weights, num_slots, slot_values

    family = cfg.block_family
    n_slots = num_slots(family)
    threshold = _float("block_lr_zero_threshold", args["block_lr_zero_threshold"]) \
        if "block_lr_zero_threshold" in args else 0.0
    lr = block_lr_weights(args.get("down_lr_weight"), args.get("mid_lr_weight"), args.get("up_lr_weight"),
                          threshold, family=family)
    if lr is None and "block_lr_zero_threshold" in args:
        raise ConfigError("network_args block_lr_zero_threshold needs down_lr_weight, mid_lr_weight or up_lr_weight")
    dims_given = any(k in args for k in ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas"))
    if lr is None and not dims_given:
        return
    dims = (slot_values("block_dims", args["block_dims"], int, family=family) if "block_dims" in args
            else [cfg.dim] * n_slots)
    alphas = (slot_values("block_alphas", args["block_alphas"], float, family=family) if "block_alphas" in args
              else [cfg.alpha] * n_slots)
    conv_alpha = cfg.conv_alpha if cfg.conv_alpha is not None else (
        _float("conv_alpha", args["conv_alpha"]) if "conv_alpha" in args else 1.0)
    if "conv_block_dims" in args:
        conv_dims = slot_values("conv_block_dims", args["conv_block_dims"], int, family=family)
    elif cfg.conv_dim is not None:
        conv_dims = [cfg.conv_dim] * n_slots
    else:
        conv_dims = None
        if "conv_block_alphas" in args:
            raise ConfigError("network_args conv_block_alphas needs conv_block_dims or conv_dim")
    conv_alphas = None
    if conv_dims is not None:
        conv_alphas = (slot_values("conv_block_alphas", args["conv_block_alphas"], float, family=family)
                       if "conv_block_alphas" in args else [conv_alpha] * n_slots)
        cfg.conv_alpha = conv_alpha
        cfg.preset = "c3lier"
    if lr is not None:
        dims = [0 if w == 0 else d for d, w in zip(dims, lr)]
        if conv_dims is not None:
            conv_dims = [0 if w == 0 else d for d, w in zip(conv_dims, lr)]
    cfg.block_dims, cfg.block_alphas = dims, alphas
    cfg.conv_block_dims, cfg.conv_block_alphas = conv_dims, conv_alphas
    cfg.block_lr_weight = lr


def check_block_family(cfg: NetworkConfig, family: str) -> None:
    """Per-block lists parsed for one family cannot drive a network on another (the slots differ)."""
    from .names import FAMILY_LABELS
    from ..tools.blocks import num_slots

    if num_slots(cfg.block_family) != num_slots(family):
        raise ConfigError(f"the block-weight options were read for {FAMILY_LABELS[cfg.block_family]} "
                          f"({num_slots(cfg.block_family)} blocks) but the model is {FAMILY_LABELS[family]} "
                          f"({num_slots(family)} blocks); pass family={family!r} to network_config_from_args")


def check_run_network_options(cfg) -> NetworkConfig:
    """The network options of a run (a TrainConfig) parsed as training will parse them, for checks made before
    any model is loaded (at submit, at import). The family comes from the run's flags or the checkpoint's
    header (models.detect.expected_family); training parses them again against the loaded model."""
    from ..models.detect import expected_family

    return network_config_from_args(cfg.network_module, cfg.network_dim, cfg.network_alpha, cfg.network_args,
                                    train_unet=not cfg.network_train_text_encoder_only,
                                    train_text_encoder=not cfg.network_train_unet_only,
                                    network_dropout=cfg.network_dropout,
                                    family=expected_family(sdxl=cfg.sdxl, v2=cfg.v2,
                                                           checkpoint=cfg.pretrained_model_name_or_path))
