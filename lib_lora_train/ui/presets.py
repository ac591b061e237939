"""The Parameters form as data: its fields (label, one-line help, default), the presets in plain words, the
network types, and the mapping between the form's values and sd-scripts keys (both directions)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..presets import FAMILIES, NATIVE_RESOLUTION, all_presets, split_names
from ..training.optim import OPTIMIZER_NAMES
from ..training.schedulers import SCHEDULER_NAMES


@dataclass(frozen=True)
class Field:
    key: str                      # form key (an sd-scripts key where one exists)
    kind: str                     # int | float | text | textarea | dropdown | radio | checkbox
    label: str
    info: str
    default: Any = None
    choices: tuple = ()
    minimum: float | None = None


@dataclass(frozen=True)
class NetworkType:
    name: str
    module: str                   # network_module
    algo: str | None              # LyCORIS algo (network_args algo=...)
    conv: bool                    # takes conv_dim / conv_alpha


NETWORK_TYPES = {
    "LoRA": NetworkType("LoRA", "networks.lora", None, False),
    "LoCon": NetworkType("LoCon", "lycoris.kohya", "locon", True),
    "LoHa": NetworkType("LoHa", "lycoris.kohya", "loha", True),
    "LoKr": NetworkType("LoKr", "lycoris.kohya", "lokr", True),
    "DyLoRA": NetworkType("DyLoRA", "networks.dylora", None, False),
    "IA3": NetworkType("IA3", "lycoris.kohya", "ia3", False),
}
PURPOSES = ("character", "style", "concept")

FIELDS: tuple[Field, ...] = (
    Field("network_type", "dropdown", "Network type",
          "LoRA suits most uses; LoCon, LoHa and LoKr also adapt convolutions; DyLoRA trains several ranks; "
          "IA3 is tiny", "LoRA", tuple(NETWORK_TYPES)),
    Field("network_dim", "int", "Network dim (rank)",
          "How much the LoRA can hold: 32 for a character, 128 for a style; bigger means larger files", 32,
          minimum=1),
    Field("network_alpha", "float", "Network alpha",
          "Scales the learned change; the same as dim or half of it is usual", 32.0, minimum=0),
    Field("conv_dim", "int", "Conv dim", "Rank for convolution layers, LoCon, LoHa and LoKr only; 0 turns it off",
          0, minimum=0),
    Field("conv_alpha", "float", "Conv alpha", "Scale for the convolution rank", 1.0, minimum=0),
    Field("repeats", "int", "Repeats per image",
          "How often each image is seen per epoch; the image folder is renamed to N_name when training starts",
          10, minimum=1),
    Field("max_train_epochs", "int", "Epochs", "How many times the whole image set is trained", 10, minimum=1),
    Field("save_every_n_epochs", "int", "Save every N epochs",
          "Also keep a LoRA file every N epochs to compare them; 0 keeps only the last", 2, minimum=0),
    Field("train_batch_size", "int", "Batch size",
          "Images per step: faster per image, but needs more memory", 2, minimum=1),
    Field("unet_lr", "float", "U-Net learning rate", "How fast the image model learns; 0.0001 is a safe start",
          1e-4, minimum=0),
    Field("text_encoder_lr", "float", "Text encoder learning rate",
          "How fast the prompt model learns, usually half the U-Net rate; 0 leaves it untrained", 5e-5, minimum=0),
    Field("optimizer_type", "dropdown", "Optimizer", "The update rule; AdamW works everywhere", "AdamW",
          OPTIMIZER_NAMES),
    Field("lr_scheduler", "dropdown", "Learning rate schedule",
          "How the rate changes over the run; cosine slows down towards the end", "cosine", SCHEDULER_NAMES),
    Field("lr_warmup_steps", "int", "Warm-up steps",
          "Steps at the start with a rising rate; needs a schedule with warm-up", 0, minimum=0),
    Field("resolution", "int", "Resolution", "Training size in pixels, 512 for SD 1.5; images are fitted to it",
          512, minimum=64),
    Field("enable_bucket", "checkbox", "Aspect-ratio buckets",
          "Train each image in its own shape instead of cropping it square", True),
    Field("clip_skip", "int", "Clip skip", "2 for anime-style base models, 1 for photographic ones", 2,
          minimum=1),
    Field("shuffle_caption", "checkbox", "Shuffle tags",
          "Mix the tag order every step so that no position is learned", True),
    Field("keep_tokens", "int", "Keep first tags",
          "Tags at the start that shuffling never moves; 1 keeps the trigger word first", 1, minimum=0),
    Field("sample_prompts", "textarea", "Sample prompts",
          "One prompt per line, drawn during training to watch progress; empty draws none", ""),
    Field("sample_every_n_epochs", "int", "Sample every N epochs", "How often the sample prompts are drawn", 1,
          minimum=1),
    Field("seed", "int", "Seed", "The same seed and settings give the same result", 42, minimum=0),
    Field("output_name", "text", "Output name",
          "File name of the LoRA; empty uses the project name, numbered when taken", ""),
    Field("presets", "text", "Presets applied",
          "Their options without a field here also apply, e.g. character+sdxl-8gb; the fields above win", ""),
    Field("extra_options", "textarea", "Other sd-scripts options",
          "One per line as in a TOML file, e.g. min_snr_gamma = 5; filled by Import settings", ""),
)
FIELD_BY_KEY = {f.key: f for f in FIELDS}
FORM_KEYS = tuple(f.key for f in FIELDS)

# The presets themselves are data (lib_lora_train/presets, shared with the CLI and the API); here they become form
# values. Their options without a form field reach the run through the "presets" field (form_to_config).


def _family(family: str | None) -> str:
    return family if family in FAMILIES else "sd1"


def preset_names(family: str | None = None) -> list[str]:
    """The presets offered for a model family (built-in and the user's), purpose presets first."""
    found = all_presets()
    fam = _family(family)
    names = [n for n, p in found.items() if fam in p.families]
    return sorted(names, key=lambda n: (found[n].families != FAMILIES, names.index(n)))


def preset_words(family: str | None = None) -> list[str]:
    found = all_presets()
    return [found[n].describe(_family(family)) for n in preset_names(family) if found[n].describe(_family(family))]


def form_preset(name: str, family: str | None = None) -> dict[str, Any]:
    """The form values a preset sets (only the fields it covers; repeats from its suggestion)."""
    found = all_presets()
    if name not in found:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(found)}")
    p = found[name]
    cfg = p.values(_family(family))
    form = config_to_form(cfg, {})
    keys = {"network_dim", "max_train_epochs", "train_batch_size", "lr_warmup_steps", "keep_tokens", "network_alpha",
            "optimizer_type", "lr_scheduler", "enable_bucket", "shuffle_caption", "seed", "sample_every_n_epochs"}
    out = {k: form[k] for k in keys if k in cfg and k in form}
    if "network_module" in cfg or "network_args" in cfg:
        for k in ("network_type", "conv_dim", "conv_alpha"):
            if k in form:
                out[k] = form[k]
    if "save_every_n_epochs" in cfg:
        out["save_every_n_epochs"] = form["save_every_n_epochs"]
    if "unet_lr" in cfg or "learning_rate" in cfg:
        out["unet_lr"] = form["unet_lr"]
    if "text_encoder_lr" in cfg or cfg.get("network_train_unet_only"):
        out["text_encoder_lr"] = form["text_encoder_lr"]
    if "clip_skip" in cfg:
        out["clip_skip"] = form["clip_skip"]
    if "resolution" in cfg:
        out["resolution"] = form["resolution"]
    if p.repeats:
        out["repeats"] = p.repeats
    return out


def _purpose_presets() -> set[str]:
    return {n for n, p in all_presets().items() if p.families == FAMILIES}


def default_values(base_config: dict[str, Any] | None = None, purpose: str | None = None,
                   family: str | None = None) -> dict[str, Any]:
    """The form a new project starts with: field defaults, its purpose's preset for the model family, the
    family's native resolution (or the host's own resolution)."""
    fam = _family(family)
    values = {f.key: f.default for f in FIELDS}
    name = purpose if purpose in _purpose_presets() else "character"
    values.update(form_preset(name, fam))
    values["presets"] = name
    values["resolution"] = NATIVE_RESOLUTION[fam]
    res = (base_config or {}).get("resolution")
    if res is not None:
        try:
            values["resolution"] = int(str(res).split(",")[0])
        except ValueError:
            pass
    return values


def apply_preset(values: dict[str, Any], preset: str, family: str | None = None) -> dict[str, Any]:
    """The form with a preset chosen: its fields set, and the presets field updated (a purpose preset replaces
    the list; a family-specific one, e.g. a memory fit, is added after it)."""
    out = dict(values)
    out.update(form_preset(preset, family))
    current = split_names(values.get("presets"))
    purpose = _purpose_presets()
    if preset in purpose:
        current = [preset] + [n for n in current if n not in purpose]
    else:
        current = [n for n in current if n in purpose] + [preset]
    out["presets"] = "+".join(current)
    return out


def _number(key: str, value: Any, kind: str) -> int | float:
    f = FIELD_BY_KEY[key]
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ConfigError(f"{f.label}: a number is required")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{f.label}: {value!r} is not a number") from None
    if not math.isfinite(x):
        raise ConfigError(f"{f.label}: {value!r} is not a number")
    if kind == "int":
        if x != int(x):
            raise ConfigError(f"{f.label}: expected a whole number, got {value!r}")
        x = int(x)
    if f.minimum is not None and x < f.minimum:
        raise ConfigError(f"{f.label}: must be at least {f.minimum:g}, got {value!r}")
    return x


def clean_values(values: dict[str, Any]) -> dict[str, Any]:
    """The form's values typed and checked (ConfigError naming the field's label)."""
    out: dict[str, Any] = {}
    for f in FIELDS:
        v = values.get(f.key, f.default)
        if f.kind in ("int", "float"):
            out[f.key] = _number(f.key, v, f.kind)
        elif f.kind == "checkbox":
            out[f.key] = bool(v)
        elif f.kind == "dropdown":
            if v not in f.choices:
                raise ConfigError(f"{f.label}: choose one of {', '.join(f.choices)}, got {v!r}")
            out[f.key] = v
        else:
            out[f.key] = "" if v is None else str(v)
    return out


def network_args(values: dict[str, Any]) -> list[str]:
    nt = NETWORK_TYPES[values["network_type"]]
    args = [f"algo={nt.algo}"] if nt.algo else []
    if nt.conv:
        dim = int(values.get("conv_dim") or 0)
        args.append(f"conv_dim={dim}")
        if dim:
            args.append(f"conv_alpha={float(values.get('conv_alpha') or 1.0):g}")
    if nt.name == "DyLoRA":
        dim = int(values["network_dim"])
        args.append(f"unit={4 if dim % 4 == 0 else 1}")
    return args


def form_to_config(values: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """(sd-scripts keys, repeats) of a form. Sample prompts and the dataset folders are set by the caller (they
    are files and folders of the project)."""
    v = clean_values(values)
    nt = NETWORK_TYPES[v["network_type"]]
    cfg: dict[str, Any] = {
        "network_module": nt.module, "network_dim": v["network_dim"], "network_alpha": v["network_alpha"],
        "network_args": network_args(v), "max_train_epochs": v["max_train_epochs"],
        "train_batch_size": v["train_batch_size"], "learning_rate": v["unet_lr"], "unet_lr": v["unet_lr"],
        "optimizer_type": v["optimizer_type"], "lr_scheduler": v["lr_scheduler"],
        "lr_warmup_steps": v["lr_warmup_steps"], "resolution": str(v["resolution"]),
        "enable_bucket": v["enable_bucket"], "clip_skip": v["clip_skip"],
        "shuffle_caption": v["shuffle_caption"], "keep_tokens": v["keep_tokens"], "seed": v["seed"],
    }
    if v["enable_bucket"]:
        # sd-scripts' bucket range (256-1024 at 512, up to 2048 at 1024), widened so a small size keeps working
        cfg["min_bucket_reso"] = min(256, v["resolution"])
        cfg["max_bucket_reso"] = max(1024, 2 * v["resolution"])
    if v["save_every_n_epochs"]:
        cfg["save_every_n_epochs"] = v["save_every_n_epochs"]
    if v["text_encoder_lr"] > 0:
        cfg["text_encoder_lr"] = v["text_encoder_lr"]
    else:
        cfg["network_train_unet_only"] = True
    if v["output_name"].strip():
        cfg["output_name"] = v["output_name"].strip()
    if split_names(v["presets"]):
        cfg["preset"] = split_names(v["presets"])
    for key, value in parse_extra(v["extra_options"]).items():
        if key in cfg or key in FIELD_BY_KEY:
            raise ConfigError(f"Other sd-scripts options: {key} has its own field in the form; set it there")
        cfg[key] = value
    return cfg, v["repeats"]


def parse_extra(text: str) -> dict[str, Any]:
    """The "Other sd-scripts options" field: TOML key = value lines (sections are flattened)."""
    import tomllib
    if not (text or "").strip():
        return {}
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"Other sd-scripts options: not valid TOML ({exc}); write one key = value per line, "
                          f"strings in quotes") from None
    flat: dict[str, Any] = {}
    for k, val in data.items():
        flat.update(val if isinstance(val, dict) else {k: val})
    return flat


# sd-scripts keys the form's own fields produce (form_to_config); anything else goes to "Other options"
FORM_CONFIG_KEYS = ("network_module", "network_dim", "network_alpha", "network_args", "max_train_epochs",
                    "train_batch_size", "learning_rate", "unet_lr", "text_encoder_lr", "network_train_unet_only",
                    "optimizer_type", "lr_scheduler", "lr_warmup_steps", "resolution", "enable_bucket", "clip_skip",
                    "shuffle_caption", "keep_tokens", "seed", "min_bucket_reso", "max_bucket_reso",
                    "save_every_n_epochs", "output_name", "sample_prompts", "sample_every_n_epochs")


def extra_from_config(cfg: dict[str, Any], skip: tuple[str, ...] = ()) -> str:
    """The options of a config the form has no field for, as "Other sd-scripts options" lines."""
    from ..interop.tomlfmt import table
    rest = {k: v for k, v in cfg.items() if k not in FORM_CONFIG_KEYS and k not in skip and v is not None}
    return table(rest)


def _args_dict(args: Any) -> dict[str, str]:
    if isinstance(args, dict):
        return {str(k): str(v) for k, v in args.items()}
    items = args.split() if isinstance(args, str) else list(args or [])
    out = {}
    for item in items:
        if "=" in str(item):
            k, _, val = str(item).partition("=")
            out[k.strip()] = val.strip()
    return out


def network_type_of(module: str | None, args: Any) -> str:
    a = _args_dict(args)
    if module == "networks.dylora":
        return "DyLoRA"
    if module == "lycoris.kohya":
        algo = a.get("algo", "lora").lower()
        return {"lora": "LoCon", "locon": "LoCon", "loha": "LoHa", "lokr": "LoKr", "ia3": "IA3",
                "(ia)^3": "IA3", "dylora": "DyLoRA"}.get(algo, "LoCon")
    return "LoRA"


def config_to_form(cfg: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """A run's config (run.json `config`) back into form values, starting from `base` for what it lacks."""
    v = dict(base)
    args = _args_dict(cfg.get("network_args"))
    v["network_type"] = network_type_of(cfg.get("network_module"), cfg.get("network_args"))
    for key in ("network_dim", "max_train_epochs", "train_batch_size", "lr_warmup_steps", "keep_tokens"):
        if cfg.get(key) is not None:
            v[key] = int(cfg[key])
    if cfg.get("network_alpha") is not None:
        v["network_alpha"] = float(cfg["network_alpha"])
    if "conv_dim" in args:
        v["conv_dim"] = int(float(args["conv_dim"]))
    if "conv_alpha" in args:
        v["conv_alpha"] = float(args["conv_alpha"])
    v["save_every_n_epochs"] = int(cfg.get("save_every_n_epochs") or 0)
    lr = cfg.get("unet_lr") if cfg.get("unet_lr") is not None else cfg.get("learning_rate")
    if lr is not None:
        v["unet_lr"] = float(lr)
    if cfg.get("network_train_unet_only"):
        v["text_encoder_lr"] = 0.0
    elif cfg.get("text_encoder_lr") is not None:
        v["text_encoder_lr"] = float(cfg["text_encoder_lr"])
    elif lr is not None:
        v["text_encoder_lr"] = float(lr)
    for key in ("optimizer_type", "lr_scheduler"):
        if cfg.get(key):
            v[key] = str(cfg[key])
    if cfg.get("resolution") is not None:
        res = cfg["resolution"]
        v["resolution"] = int(res[0] if isinstance(res, (list, tuple)) else str(res).split(",")[0])
    for key in ("enable_bucket", "shuffle_caption"):
        if key in cfg:
            v[key] = bool(cfg[key])
    v["clip_skip"] = int(cfg.get("clip_skip") or 1)
    if cfg.get("seed") is not None:
        v["seed"] = int(cfg["seed"])
    if cfg.get("sample_every_n_epochs"):
        v["sample_every_n_epochs"] = int(cfg["sample_every_n_epochs"])
    return v
