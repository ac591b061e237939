"""Dataset parameters, from sd-scripts `N_name` folders or from a `dataset_config` TOML/JSON file.

Names, levels and defaults follow sd-scripts' `library/config_util.py`. A value is looked up per key in this
order, the first one that is not None winning: subset > dataset > file [general] > the caller's `general` dict
(the CLI/TrainConfig values, named like sd-scripts arguments) > the dataclass default. One deliberate difference:
`caption_extension` defaults to ".txt" (like the GUIs) instead of sd-scripts' ".caption".
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..errors import ConfigError, DataError
from .images import IMAGE_EXTENSIONS, list_images

logger = logging.getLogger(__name__)

INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")


@dataclass
class SubsetParams:
    image_dir: str
    num_repeats: int = 1
    is_reg: bool = False
    class_tokens: str | None = None
    caption_extension: str = ".txt"
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    caption_separator: str = ","
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0
    flip_aug: bool = False
    color_aug: bool = False
    random_crop: bool = False
    face_crop_aug_range: tuple[float, float] | None = None
    cache_info: bool = False
    alpha_mask: bool = False
    resize_interpolation: str | None = None
    custom_attributes: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # sd-scripts adds the missing leading dot
        if self.caption_extension and not self.caption_extension.startswith("."):
            self.caption_extension = "." + self.caption_extension


@dataclass
class DatasetParams:
    resolution: tuple[int, int] = (512, 512)
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    network_multiplier: float = 1.0
    validation_split: float = 0.0
    validation_seed: int | None = None
    resize_interpolation: str | None = None
    subsets: list[SubsetParams] = field(default_factory=list)
    # messages produced while building these params (skipped folders, ...); TrainingData passes them on
    warnings: list[str] = field(default_factory=list, compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.resolution, int):
            self.resolution = (self.resolution, self.resolution)
        self.resolution = tuple(self.resolution)


# ---------------------------------------------------------------- key tables (sd-scripts schema, DreamBooth)

def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise TypeError("true or false")
    return v


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError("an integer")
    return v


def _float(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError("a number")
    return float(v)


def _number(v: Any) -> float | int:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError("a number")
    return v


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError("a string")
    return v


def _dict(v: Any) -> dict:
    if not isinstance(v, dict):
        raise TypeError("a table / dict")
    return dict(v)


def _resolution(v: Any) -> tuple[int, int]:
    if isinstance(v, str):  # CLI form "512" or "512,768"
        try:
            v = [int(p) for p in v.replace(" ", "").split(",")]
        except ValueError:
            raise TypeError("a size like 512 or 512,768") from None
        if len(v) == 1:
            v = v * 2
    if isinstance(v, int) and not isinstance(v, bool):
        v = [v, v]
    if (not isinstance(v, (list, tuple)) or len(v) != 2
            or any(isinstance(x, bool) or not isinstance(x, int) or x <= 0 for x in v)):
        raise TypeError("a positive integer or [width, height]")
    return (v[0], v[1])


def _pair_of_floats(v: Any) -> tuple[float, float]:
    if isinstance(v, str):
        v = v.split(",")
        try:
            v = [float(p) for p in v]
        except ValueError:
            raise TypeError("two numbers like 2.0,4.0") from None
    if not isinstance(v, (list, tuple)) or len(v) != 2 or any(isinstance(x, bool) for x in v):
        raise TypeError("two numbers [low, high]")
    try:
        lo, hi = float(v[0]), float(v[1])
    except (TypeError, ValueError):
        raise TypeError("two numbers [low, high]") from None
    if lo > hi:
        raise TypeError("[low, high] with low <= high")
    return (lo, hi)


def _interpolation(v: Any) -> str:
    v = _str(v)
    if v not in INTERPOLATIONS:
        raise TypeError("one of " + ", ".join(INTERPOLATIONS))
    return v


# keys allowed at all three levels (general, dataset, subset)
SUBSET_ASCENDABLE: dict[str, Callable[[Any], Any]] = {
    "num_repeats": _int, "shuffle_caption": _bool, "keep_tokens": _int, "keep_tokens_separator": _str,
    "caption_separator": _str, "secondary_separator": _str, "enable_wildcard": _bool,
    "caption_prefix": _str, "caption_suffix": _str, "caption_dropout_rate": _float,
    "caption_dropout_every_n_epochs": _int, "caption_tag_dropout_rate": _float, "token_warmup_min": _int,
    "token_warmup_step": _number, "flip_aug": _bool, "color_aug": _bool, "random_crop": _bool,
    "face_crop_aug_range": _pair_of_floats, "custom_attributes": _dict, "resize_interpolation": _interpolation,
    "caption_extension": _str, "class_tokens": _str, "cache_info": _bool,
}
# keys allowed only in a subset
SUBSET_ONLY: dict[str, Callable[[Any], Any]] = {"image_dir": _str, "is_reg": _bool, "alpha_mask": _bool}
# keys allowed in general and dataset
DATASET_KEYS: dict[str, Callable[[Any], Any]] = {
    "resolution": _resolution, "batch_size": _int, "enable_bucket": _bool, "min_bucket_reso": _int,
    "max_bucket_reso": _int, "bucket_reso_steps": _int, "bucket_no_upscale": _bool, "network_multiplier": _float,
    "validation_split": _float, "validation_seed": _int, "resize_interpolation": _interpolation,
}
GENERAL_KEYS = {**SUBSET_ASCENDABLE, **DATASET_KEYS}
DATASET_LEVEL_KEYS = {**GENERAL_KEYS, "subsets": None}
SUBSET_KEYS = {**SUBSET_ASCENDABLE, **SUBSET_ONLY}
UNSUPPORTED_SUBSET_KEYS = {
    "metadata_file": "fine-tuning (metadata_file) subsets are not supported yet; use image_dir with caption files",
    "conditioning_data_dir": "ControlNet subsets (conditioning_data_dir) are not supported",
}
# sd-scripts keeps these on the command line only; its schema rejects them in the dataset file
ARGPARSE_ONLY = {"prior_loss_weight", "max_token_length", "debug_dataset"}
# the caller's general dict uses sd-scripts argument names; these differ from the file's names
CLI_ALIASES = {"train_batch_size": "batch_size", "dataset_repeats": "num_repeats",
               "caption_extention": "caption_extension"}


def _check_keys(table: Mapping[str, Any], allowed: Mapping[str, Any], level: str, where: str) -> None:
    for key in table:
        if key in allowed:
            continue
        if level == "subset" and key in UNSUPPORTED_SUBSET_KEYS:
            raise DataError(f"{where}: {UNSUPPORTED_SUBSET_KEYS[key]}")
        if key in ARGPARSE_ONLY:
            raise DataError(f"{where}: '{key}' is not a dataset option (sd-scripts accepts it only as a training "
                            f"argument); set it in the training config instead")
        homes = [name for name, keys in (("[general]", GENERAL_KEYS), ("[[datasets]]", DATASET_LEVEL_KEYS),
                                         ("[[datasets.subsets]]", SUBSET_KEYS)) if key in keys]
        if homes:
            raise DataError(f"{where}: '{key}' is not allowed at the {level} level; it belongs in "
                            + " or ".join(homes))
        close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise DataError(f"{where}: unknown key '{key}' at the {level} level{hint}")


def _convert(table: Mapping[str, Any], converters: Mapping[str, Any], where: str,
             error: type[Exception] = DataError) -> dict[str, Any]:
    out = {}
    for key, value in table.items():
        conv = converters.get(key)
        if conv is None or value is None:
            out[key] = value
            continue
        try:
            out[key] = conv(value)
        except TypeError as exc:
            raise error(f"{where}: '{key}' must be {exc}, got {value!r}") from None
    return out


def _cli_general(general: Mapping[str, Any] | None) -> dict[str, Any]:
    """The caller's general values under the file's key names; unrelated keys are ignored (like sd-scripts)."""
    out: dict[str, Any] = {}
    for key, value in (general or {}).items():
        name = CLI_ALIASES.get(key, key)
        if name in GENERAL_KEYS and value is not None and out.get(name) is None:
            out[name] = value
    if isinstance(out.get("resize_interpolation"), str) and out["resize_interpolation"] == "":
        out["resize_interpolation"] = None
    return _convert(out, GENERAL_KEYS, "training config", ConfigError)


def _pick(name: str, levels: list[Mapping[str, Any]], default: Any) -> Any:
    for level in levels:
        value = level.get(name)
        if value is not None:
            return value
    return default


def _build(klass: type, levels: list[Mapping[str, Any]], **fixed: Any) -> Any:
    kwargs = dict(fixed)
    for f in dataclasses.fields(klass):
        if f.name in kwargs or f.name in ("subsets", "warnings"):
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        kwargs[f.name] = _pick(f.name, levels, default)
    return klass(**kwargs)


def check_dataset_params(ds: DatasetParams, where: str = "dataset") -> None:
    """Value checks that do not depend on where the params came from (DataError)."""
    w, h = ds.resolution
    if ds.batch_size < 1:
        raise DataError(f"{where}: batch_size must be at least 1, got {ds.batch_size}")
    if ds.bucket_reso_steps < 8 or ds.bucket_reso_steps % 8:
        raise DataError(f"{where}: bucket_reso_steps must be a multiple of 8 (latents are 1/8 of the image), "
                        f"got {ds.bucket_reso_steps}")
    if not 0.0 <= ds.validation_split < 1.0:
        raise DataError(f"{where}: validation_split must be in [0, 1), got {ds.validation_split}")
    if not ds.enable_bucket and (w % 8 or h % 8):
        raise DataError(f"{where}: resolution {w}x{h} must be a multiple of 8 when bucketing is off")
    for sub in ds.subsets:
        for key in ("caption_dropout_rate", "caption_tag_dropout_rate"):
            if not 0.0 <= getattr(sub, key) <= 1.0:
                raise DataError(f"{where}, subset {sub.image_dir}: {key} must be in [0, 1], "
                                f"got {getattr(sub, key)}")


def _require_resolution(levels: list[Mapping[str, Any]], where: str) -> None:
    if _pick("resolution", levels, None) is None:
        raise DataError(f"{where}: resolution is required (e.g. 512 or [512, 768])")


def dataset_from_tables(subsets: list[Mapping[str, Any]], dataset: Mapping[str, Any],
                        general_levels: list[Mapping[str, Any]], where: str) -> DatasetParams:
    """Build one DatasetParams from already converted tables (the fallback chain of sd-scripts)."""
    levels = [dataset, *general_levels]
    _require_resolution(levels, where)
    subset_params = [_build(SubsetParams, [s, *levels], image_dir=s["image_dir"]) for s in subsets]
    ds = _build(DatasetParams, levels)
    ds.subsets = subset_params
    check_dataset_params(ds, where)
    return ds


# ---------------------------------------------------------------- folder mode


def _parse_folder_name(name: str) -> tuple[int, str] | None:
    """`10_sks dog` -> (10, "sks dog"); None when the first `_` token is not an integer (sd-scripts rule)."""
    head, _, rest = name.partition("_")
    try:
        return int(head), rest
    except ValueError:
        return None


# public: the preparation tools (lib_lora_train.prep) check folder names with the same rule
parse_folder_name = _parse_folder_name


def _folder_subsets(base: str, is_reg: bool, arg: str, warnings: list[str]) -> list[dict[str, Any]]:
    if not os.path.isdir(base):
        raise DataError(f"{arg} does not exist or is not a folder: {base}")
    subsets, unnamed = [], []
    for entry in sorted(os.scandir(base), key=lambda e: e.name):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        parsed = _parse_folder_name(entry.name)
        if parsed is None:
            n = len(list_images(entry.path))
            unnamed.append((entry.name, n))
            msg = f"{arg}: ignored folder '{entry.name}' (its name does not start with <repeats>_)"
            if n:
                msg += f"; rename it to 10_{entry.name} to train on its {n} images with 10 repeats"
            warnings.append(msg)
            continue
        repeats, tokens = parsed
        if repeats < 1:
            warnings.append(f"{arg}: ignored folder '{entry.name}': repeats must be at least 1, got {repeats}")
            continue
        subsets.append({"image_dir": entry.path, "num_repeats": repeats, "is_reg": is_reg,
                        "class_tokens": tokens})

    direct = list_images(base)
    n_found = sum(len(list_images(s["image_dir"])) for s in subsets)
    if n_found == 0:
        exts = " ".join(IMAGE_EXTENSIONS)
        name = os.path.basename(os.path.normpath(base))
        if direct and _parse_folder_name(name) is not None:
            raise DataError(
                f"{arg} must be the PARENT of folders named like 10_mychar; you pointed at the image folder "
                f"'{name}' itself ({len(direct)} images) — set {arg} to its parent folder "
                f"{os.path.dirname(os.path.abspath(base))}")
        if direct:
            raise DataError(
                f"{arg} must be the PARENT of folders named like 10_mychar; you pointed at a folder that contains "
                f"{len(direct)} images directly ({base}) — use its parent and rename this folder to 10_{name} "
                f"(10 = how many times each image is repeated per epoch)")
        with_images = [(n, c) for n, c in unnamed if c]
        if with_images:
            n, c = with_images[0]
            raise DataError(
                f"{arg}: the folders in {base} must be named <repeats>_<name>, e.g. 10_{n}; '{n}' ({c} images) "
                f"has no repeat prefix — rename it to 10_{n}")
        if is_reg:
            warnings.append(f"{arg}: no images ({exts}) in <repeats>_<name> folders of {base}; "
                            f"no regularization images are used")
            return []
        raise DataError(f"No images found: {arg} ({base}) must contain folders named <repeats>_<name> "
                        f"(e.g. 10_mychar) with images ({exts}) directly inside them")
    if direct:
        warnings.append(f"{arg}: {len(direct)} images directly in {base} are not used; only the images inside "
                        f"<repeats>_<name> subfolders are read")
    return subsets


def datasets_from_folders(train_data_dir: str, reg_data_dir: str | None,
                          general: Mapping[str, Any] | None) -> list[DatasetParams]:
    """sd-scripts folder mode: one dataset whose subsets are the `N_name` subfolders (train, then reg)."""
    if not train_data_dir:
        raise DataError("train_data_dir is not set")
    warnings: list[str] = []
    tables = _folder_subsets(train_data_dir, False, "train_data_dir", warnings)
    if reg_data_dir:
        tables += _folder_subsets(reg_data_dir, True, "reg_data_dir", warnings)
    cli = _cli_general(general)
    ds = dataset_from_tables(tables, {}, [cli], "dataset")
    ds.warnings = warnings
    for msg in warnings:
        logger.warning(msg)
    return [ds]


# ---------------------------------------------------------------- dataset_config file


def load_config_file(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise DataError(f"dataset_config file not found: {path}")
    lower = path.lower()
    try:
        if lower.endswith(".toml"):
            with open(path, "rb") as fh:
                return tomllib.load(fh)
        if lower.endswith(".json"):
            with open(path, encoding="utf-8") as fh:
                return json.load(fh)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot parse dataset_config {path}: {exc}") from None
    raise DataError(f"dataset_config must be a .toml or .json file: {path}")


def _resolve_dir(image_dir: str, config_dir: str) -> str:
    # sd-scripts resolves relative paths against the working directory; fall back to the file's folder
    if os.path.isabs(image_dir) or os.path.exists(image_dir):
        return image_dir
    beside = os.path.join(config_dir, image_dir)
    return beside if os.path.exists(beside) else image_dir


def datasets_from_config(config: Mapping[str, Any], general: Mapping[str, Any] | None,
                         config_dir: str = ".", name: str = "dataset_config") -> list[DatasetParams]:
    """Validate and resolve an already loaded dataset_config dict."""
    if not isinstance(config, Mapping):
        raise DataError(f"{name}: the top level must be a table")
    _check_keys(config, {"general": None, "datasets": None}, "top", name)
    file_general = config.get("general") or {}
    if not isinstance(file_general, Mapping):
        raise DataError(f"{name}: [general] must be a table")
    _check_keys(file_general, GENERAL_KEYS, "general", f"{name} [general]")
    file_general = _convert(file_general, GENERAL_KEYS, f"{name} [general]")
    cli = _cli_general(general)
    datasets_raw = config.get("datasets")
    if not datasets_raw:
        raise DataError(f"{name}: no [[datasets]] defined")
    if not isinstance(datasets_raw, list):
        raise DataError(f"{name}: 'datasets' must be a list of tables ([[datasets]])")

    out = []
    for i, dataset in enumerate(datasets_raw):
        where = f"{name} [[datasets]] #{i + 1}"
        if not isinstance(dataset, Mapping):
            raise DataError(f"{where}: must be a table")
        for sub in dataset.get("subsets") or []:
            if isinstance(sub, Mapping):
                for key, msg in UNSUPPORTED_SUBSET_KEYS.items():
                    if key in sub:
                        raise DataError(f"{where}: {msg}")
        _check_keys(dataset, DATASET_LEVEL_KEYS, "dataset", where)
        subsets_raw = dataset.get("subsets") or []
        if not isinstance(subsets_raw, list):
            raise DataError(f"{where}: 'subsets' must be a list of tables ([[datasets.subsets]])")
        ds_table = _convert({k: v for k, v in dataset.items() if k != "subsets"}, GENERAL_KEYS, where)
        warnings: list[str] = []
        subsets, seen = [], set()
        for j, sub in enumerate(subsets_raw):
            swhere = f"{where} [[datasets.subsets]] #{j + 1}"
            if not isinstance(sub, Mapping):
                raise DataError(f"{swhere}: must be a table")
            _check_keys(sub, SUBSET_KEYS, "subset", swhere)
            if not sub.get("image_dir"):
                raise DataError(f"{swhere}: image_dir is required (the folder with the images directly inside)")
            table = _convert(sub, SUBSET_KEYS, swhere)
            table["image_dir"] = _resolve_dir(table["image_dir"], config_dir)
            key = os.path.normcase(os.path.abspath(table["image_dir"]))
            if key in seen:
                warnings.append(f"{swhere}: duplicate subset with image_dir '{table['image_dir']}' ignored "
                                f"(the first one is used)")
                continue
            seen.add(key)
            subsets.append(table)
        if not subsets:
            raise DataError(f"{where}: no [[datasets.subsets]] defined")
        ds = dataset_from_tables(subsets, ds_table, [file_general, cli], where)
        ds.warnings = warnings
        for msg in warnings:
            logger.warning(msg)
        out.append(ds)
    return out


def datasets_from_config_file(path: str, general: Mapping[str, Any] | None) -> list[DatasetParams]:
    """Read a sd-scripts `dataset_config` (TOML or JSON); DreamBooth-style subsets only."""
    config = load_config_file(path)
    return datasets_from_config(config, general, os.path.dirname(os.path.abspath(path)),
                                os.path.basename(path))
