"""SD1 U-Net block numbering, as data: sd-scripts' 25 training slots and the LoRA Block Weight (LBW) vectors.

Two numberings of the same blocks are in use:

* sd-scripts (networks/lora.py, block-weight training): 25 slots, 0..11 = IN00..IN11 (down side, slot 0 is
  conv_in and never has a LoRA), 12 = the middle block, 13..24 = OUT00..OUT11 (up side). A down-block module
  `down_blocks_i_{resnets|attentions}_j` sits in slot 1 + 3i + j, its downsampler in 1 + 3i + 2; an up-block module
  `up_blocks_i_{resnets|attentions}_j` in 13 + 3i + j, its upsampler in 13 + 3i + 2.
* hako-mikan's LoRA Block Weight strings (also sd-scripts' svd_merge_lora --lbws): 26 values BASE (the text
  encoder), IN00..IN11, M00, OUT00..OUT11 -- i.e. LBW index = slot + 1 -- or the 17-value short form listing only
  the blocks a LierLa LoRA has. Expanding 17 to 26 fills the unlisted blocks with 1.0, as svd_merge_lora does
  (SuperMerger fills 0; use the 26-value form to control the conv-only blocks of a LoCon exactly).

Modules outside the 25 slots (time embedding, conv_out, ...) have no block: block_index() gives -1 (as sd-scripts)
and their LBW ratio is 1. conv_in is IN00 for LBW (it is input_blocks.0 in the ldm layout).

SDXL (names in the sgm layout, lora_unet_input_blocks_4_1_...; sd-scripts' is_sdxl branches):
* training: 23 slots, 0 = time_embed / label_emb (never adapted), 1..9 = input_blocks.0..8 (IN00..IN08),
  10..12 = middle_block.0..2, 13..21 = output_blocks.0..8 (OUT00..OUT08), 22 = out (never adapted).
  down_lr_weight has 9 values (input_blocks 0..8), mid_lr_weight 3, up_lr_weight 9; block_dims etc. 23.
* LBW: the same 26-entry vector (BASE, IN00..IN11, M00, OUT00..OUT11) indexed as svd_merge_lora does for SDXL
  (input_blocks.i -> IN0i, the whole middle block -> M00, output_blocks.i -> OUT0i), given as 12 values
  (BASE, IN04, IN05, IN07, IN08, M00, OUT00..OUT05: where a LoRA-LierLa has modules) or 20 (BASE, IN00..IN08,
  M00, OUT00..OUT08) or all 26; unlisted entries are 1.0.
Which numbering applies is read from the name itself: only SDXL files use input_blocks / middle_block /
output_blocks names (SD 1.x / 2.x files use down_blocks / mid_block / up_blocks).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Sequence

from ..errors import ConfigError

NUM_SLOTS = 25                      # sd-scripts SD1: 12 down + 1 mid + 12 up
NUM_DOWN = NUM_UP = 12
MID_SLOT = 12
SLOT_NAMES = tuple([f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)])
LBW26 = ("BASE",) + SLOT_NAMES
LBW17 = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00") + tuple(f"OUT{i:02d}" for i in range(3, 12))
SDXL_LBW_LENGTHS = (12, 20)
LBW12 = ("BASE", "IN04", "IN05", "IN07", "IN08", "M00") + tuple(f"OUT{i:02d}" for i in range(6))
LBW20 = ("BASE",) + tuple(f"IN{i:02d}" for i in range(9)) + ("M00",) + tuple(f"OUT{i:02d}" for i in range(9))

NUM_SLOTS_SDXL = 23                 # sd-scripts SDXL: 1 (embeddings) + 9 in + 3 mid + 9 out + 1 (out)
NUM_DOWN_SDXL = NUM_UP_SDXL = 9
NUM_MID_SDXL = 3
SLOT_NAMES_SDXL = (("EMB",) + tuple(f"IN{i:02d}" for i in range(9)) + ("M00", "M01", "M02")
                   + tuple(f"OUT{i:02d}" for i in range(9)) + ("OUT",))
_SDXL_UNET_ROOTS = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_",
                    "lora_unet_time_embed_", "lora_unet_label_emb_", "lora_unet_out_")


def num_slots(family: str) -> int:
    """How many block-weight training values a family takes (block_dims, block_alphas, ...)."""
    return NUM_SLOTS_SDXL if family == "sdxl" else NUM_SLOTS


def is_sdxl_name(lora_name: str) -> bool:
    return lora_name.startswith(_SDXL_UNET_ROOTS) or lora_name.startswith(("lora_te1_", "lora_te2_"))

# SDXL presets (12-value form, BASE IN04 IN05 IN07 IN08 M00 OUT00..OUT05): our own, built from the same groups
# as the SD1 ones of the same name (the whole U-Net side or block, with BASE = the text encoders on).
LBW_PRESETS_SDXL: dict[str, tuple[float, ...]] = {
    "NONE": (0,) * 12,
    "ALL": (1,) * 12,
    "INALL": (1, 1, 1, 1, 1) + (0,) * 7,
    "MIDD": (1, 0, 0, 0, 0, 1) + (0,) * 6,
    "OUTALL": (1,) + (0,) * 5 + (1,) * 6,
    "ALL0.5": (0.5,) * 12,
}

# hako-mikan sd-webui-lora-block-weight default presets (17-value form).
LBW_PRESETS: dict[str, tuple[float, ...]] = {
    "NONE": (0,) * 17,
    "ALL": (1,) * 17,
    "INS": (1, 1, 1, 1) + (0,) * 13,
    "IND": (1, 0, 0, 0, 1, 1, 1) + (0,) * 10,
    "INALL": (1,) * 7 + (0,) * 10,
    "MIDD": (1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0),
    "OUTD": (1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0),
    "OUTS": (1,) + (0,) * 11 + (1,) * 5,
    "OUTALL": (1,) + (0,) * 7 + (1,) * 9,
    "ALL0.5": (0.5,) * 17,
}


@dataclass(frozen=True)
class BlockRow:
    slot: int          # sd-scripts slot (0..24)
    name: str          # LBW name (IN00 .. OUT11)
    unet_part: str     # what the slot holds in the diffusers SD1 U-Net
    lierla: bool       # a LoRA-LierLa (attention-only) network has modules here
    c3lier: bool       # a LoRA-C3Lier / LoCon network has modules here


def _rows() -> tuple[BlockRow, ...]:
    rows = [BlockRow(0, "IN00", "conv_in (never adapted by networks.lora)", False, False)]
    for i in range(4):
        for j in range(2):
            attn = i < 3
            part = f"down_blocks.{i}.resnets.{j}" + (f" + attentions.{j}" if attn else "")
            rows.append(BlockRow(1 + 3 * i + j, SLOT_NAMES[1 + 3 * i + j], part, attn, True))
        if i < 3:
            rows.append(BlockRow(3 + 3 * i, SLOT_NAMES[3 + 3 * i], f"down_blocks.{i}.downsamplers.0", False, True))
    rows.append(BlockRow(12, "M00", "mid_block (resnets 0-1 + attentions.0)", True, True))
    for i in range(4):
        for j in range(3):
            attn = i > 0
            part = f"up_blocks.{i}.resnets.{j}" + (f" + attentions.{j}" if attn else "")
            if j == 2 and i < 3:
                part += " + upsamplers.0"
            rows.append(BlockRow(13 + 3 * i + j, SLOT_NAMES[13 + 3 * i + j], part, attn, True))
    return tuple(sorted(rows, key=lambda r: r.slot))


# Which block is which: for a table or picture in a UI (the engine does not render it).
BLOCK_TABLE: tuple[BlockRow, ...] = _rows()

def _sdxl_rows() -> tuple[BlockRow, ...]:
    """SDXL's blocks by LBW name; `slot` is sd-scripts' SDXL training slot (the middle block spans 10-12)."""
    parts = {0: "conv_in", 3: "downsampler (op)", 6: "downsampler (op)"}
    rows = []
    for i in range(9):
        level = i and (i - 1) // 3
        attn = i in (4, 5, 7, 8)
        part = parts.get(i) or f"input_blocks.{i}: resnet" + (" + transformer" if attn else "") + f" (level {level})"
        rows.append(BlockRow(1 + i, f"IN{i:02d}", part, attn, i != 0))
    rows.append(BlockRow(11, "M00", "middle_block: resnet, transformer, resnet", True, True))
    for i in range(9):
        attn = i < 6
        part = (f"output_blocks.{i}: resnet" + (" + transformer" if attn else "")
                + (" + upsampler" if i in (2, 5) else ""))
        rows.append(BlockRow(13 + i, f"OUT{i:02d}", part, attn, True))
    return tuple(rows)


# SDXL's blocks (LBW names as in the 20-value vector; BASE = both text encoders), for a table in a UI.
SDXL_BLOCK_TABLE: tuple[BlockRow, ...] = _sdxl_rows()

_RE_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")


def _sgm_number(name: str, root: str) -> int:
    return int(name[len(root):].split("_", 1)[0])


def sdxl_block_index(lora_name: str) -> int:
    """sd-scripts' SDXL slot (0..22) of an sgm-named U-Net module, -1 for the text encoders."""
    if not lora_name.startswith("lora_unet_"):
        return -1
    if lora_name.startswith(("lora_unet_time_embed_", "lora_unet_label_emb_")):
        return 0
    if lora_name.startswith("lora_unet_input_blocks_"):
        return 1 + _sgm_number(lora_name, "lora_unet_input_blocks_")
    if lora_name.startswith("lora_unet_middle_block_"):
        return 10 + _sgm_number(lora_name, "lora_unet_middle_block_")
    if lora_name.startswith("lora_unet_output_blocks_"):
        return 13 + _sgm_number(lora_name, "lora_unet_output_blocks_")
    if lora_name.startswith("lora_unet_out_"):
        return 22
    return -1


def block_index(lora_name: str) -> int:
    """sd-scripts' training slot of a U-Net module name (SD1/SD2: 0..24; SDXL sgm names: 0..22), -1 for
    text-encoder or block-less modules."""
    if not lora_name.startswith("lora_unet_"):
        return -1
    if is_sdxl_name(lora_name):
        return sdxl_block_index(lora_name)
    m = _RE_UPDOWN.search(lora_name)
    if m:
        side, i, kind, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
        idx = 3 * i + (2 if kind in ("upsamplers", "downsamplers") else j)
        return 1 + idx if side == "down" else NUM_DOWN + 1 + idx
    if "mid_block_" in lora_name:
        return MID_SLOT
    return -1


def lbw_index(lora_name: str) -> int | None:
    """Index into a 26-value LBW vector: 0 (BASE) for the text encoder(s), slot + 1 for an SD1 / SD2 U-Net module,
    the svd_merge_lora SDXL index for an sgm-named one; None if none."""
    if lora_name.startswith("lora_te"):
        return 0
    if is_sdxl_name(lora_name):
        slot = sdxl_block_index(lora_name)
        if slot < 0:
            return None
        if slot == 0:
            return 1                     # embeddings: IN00 (svd_merge_lora)
        if slot <= 9:
            return slot                  # input_blocks.i -> IN0i
        if slot <= 12:
            return 13                    # the middle block -> M00
        if slot <= 21:
            return slot + 1              # output_blocks.i -> OUT0i
        return 23                        # out -> OUT09
    if lora_name.startswith("lora_unet_conv_in"):
        return 1
    slot = block_index(lora_name)
    return None if slot < 0 else slot + 1


def _numbers(text: str, what: str) -> list[float]:
    text = text.strip()
    try:
        if text.startswith("["):
            values = json.loads(text)
            if not isinstance(values, list):
                raise ValueError
        else:
            values = [v for v in re.split(r"[,\s]+", text) if v]
        return [float(v) for v in values]
    except (ValueError, TypeError):
        raise ConfigError(f"{what} {text!r}: expected a preset name ({', '.join(LBW_PRESETS)}), "
                          f"comma-separated numbers, or a JSON list") from None


def _expand(values: list[float], names: tuple[str, ...]) -> tuple[float, ...]:
    full = [1.0] * 26
    for name, v in zip(names, values):
        full[LBW26.index(name)] = v
    return tuple(full)


def parse_block_weights(spec: str | Sequence[float] | None, *, what: str = "block weights",
                        family: str = "sd1") -> tuple[float, ...] | None:
    """A LBW spec -> 26 ratios (BASE, IN00..IN11, M00, OUT00..OUT11), or None for "no per-block ratios".

    spec: a preset name (ALL, INALL, MIDD, OUTALL, ... case-insensitive), "1,0,0.5,..." / "[1, 0, ...]", or a
    sequence of numbers: 17 or 26 values for SD 1.x / 2.x, 12, 20 or 26 for SDXL (see the module docstring).
    family "auto" (the LoRA's family not known yet, e.g. checking a form): any of those lengths, the length
    telling the family; preset names then give the SD 1.x vectors.
    """
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return None
    if family == "auto":
        is_preset = isinstance(spec, str) and spec.strip().upper() in {k.upper() for k in LBW_PRESETS}
        n = 17 if is_preset else len(_numbers(spec, what) if isinstance(spec, str) else list(spec))
        family = "sdxl" if n in SDXL_LBW_LENGTHS else "sd1"
    sdxl = family == "sdxl"
    presets = LBW_PRESETS_SDXL if sdxl else LBW_PRESETS
    if isinstance(spec, str):
        preset = {k.upper(): v for k, v in presets.items()}.get(spec.strip().upper())
        values = list(preset) if preset is not None else _numbers(spec, what)
    else:
        values = [float(v) for v in spec]
    if any(not math.isfinite(v) for v in values):
        raise ConfigError(f"{what}: values must be finite numbers")
    n = len(values)
    if n == 26:
        return tuple(values)
    if sdxl and n == 12:
        return _expand(values, LBW12)
    if sdxl and n == 20:
        return _expand(values, LBW20)
    if not sdxl and n == 17:
        return _expand(values, LBW17)
    if sdxl:
        hint = " (17 values is the SD 1.x / 2.x LoRA vector)" if n == 17 else ""
        raise ConfigError(f"{what}: {n} values given{hint}; an SDXL LoRA takes 12 values ({','.join(LBW12)}), "
                          f"20 ({','.join(LBW20)}) or 26, or a preset name ({', '.join(presets)})")
    if n in SDXL_LBW_LENGTHS:
        raise ConfigError(f"{what}: {n} values is an SDXL block vector; SD 1.x / 2.x takes 17 (LoRA) or 26 "
                          f"(LoCon) values")
    raise ConfigError(f"{what}: {n} values given; SD 1.x / 2.x takes 17 values ({','.join(LBW17)}) or 26 "
                      f"({','.join(LBW26)}), or a preset name ({', '.join(presets)})")


def block_ratio(lora_name: str, weights: Sequence[float] | None) -> float:
    """The LBW ratio of one module (1.0 without weights or for a module outside every block)."""
    if weights is None:
        return 1.0
    idx = lbw_index(lora_name)
    return 1.0 if idx is None else float(weights[idx])


# ---------------------------------------------------------------- block-weight training (sd-scripts semantics)

LR_PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")


def lr_weight_preset(spec: str, n: int = NUM_DOWN) -> list[float]:
    """sd-scripts' named lr-weight curves over n blocks, with an optional "+offset" (e.g. "cosine+.25")."""
    name, _, offset_text = spec.strip().partition("+")
    name = name.strip()
    try:
        offset = float(offset_text) if offset_text.strip() else 0.0
    except ValueError:
        raise ConfigError(f"lr weight preset {spec!r}: the part after '+' must be a number") from None
    steps = [i / (n - 1) for i in range(n)]
    if name == "sine":
        curve = [math.sin(math.pi * s / 2) for s in steps]
    elif name == "cosine":
        curve = [math.sin(math.pi * s / 2) for s in reversed(steps)]
    elif name == "linear":
        curve = steps
    elif name == "reverse_linear":
        curve = list(reversed(steps))
    elif name == "zeros":
        curve = [0.0] * n
    else:
        raise ConfigError(f"unknown lr weight preset {name!r}; use one of {', '.join(LR_PRESETS)} "
                          f"(optionally with +offset) or {n} comma-separated numbers")
    return [v + offset for v in curve]


def _lr_list(key: str, value: str, n: int, family: str = "sd1") -> list[float]:
    text = str(value).strip()
    if "," not in text:
        if n == 1 or key == "mid_lr_weight":
            items = [text]
        else:
            return lr_weight_preset(text, n)
    else:
        items = text.split(",")
    try:
        values = [float(s) if s.strip() else 0.0 for s in items]   # an empty entry is 0, as in sd-scripts
    except ValueError:
        raise ConfigError(f"network_args {key}={value!r}: expected {n} comma-separated numbers"
                          + ("" if key == "mid_lr_weight" else
                             f" or a preset ({', '.join(LR_PRESETS)}, optionally +offset)")) from None
    if len(values) != n:
        if family == "sdxl":
            where = {"down_lr_weight": "SDXL's input_blocks 0..8 (IN00..IN08)",
                     "up_lr_weight": "SDXL's output_blocks 0..8 (OUT00..OUT08)",
                     "mid_lr_weight": "SDXL's middle_block 0..2"}[key]
        else:
            where = {"down_lr_weight": "IN00..IN11 (slots 0-11; IN00 = conv_in has no LoRA)",
                     "up_lr_weight": "OUT00..OUT11 (slots 13-24)", "mid_lr_weight": "the middle block (slot 12)"}[key]
        raise ConfigError(f"network_args {key}: {len(values)} values given, expected {n} for {where}")
    return values


def block_lr_weights(down: str | None, mid: str | None, up: str | None, zero_threshold: float = 0.0, *,
                     family: str = "sd1") -> list[float] | None:
    """The per-slot lr multipliers (25 SD1/SD2, 23 SDXL) from down/mid/up_lr_weight (None when none is given).

    A weight at or below zero_threshold becomes 0; a block with weight 0 gets no LoRA module at all. SDXL's slots 0
    (embeddings) and 22 (out) have weight 1, as in sd-scripts (they never hold a LoRA).
    """
    if down is None and mid is None and up is None:
        return None
    sdxl = family == "sdxl"
    n_side, n_mid = (NUM_DOWN_SDXL, NUM_MID_SDXL) if sdxl else (NUM_DOWN, 1)
    d = _lr_list("down_lr_weight", down, n_side, family) if down is not None else [1.0] * n_side
    m = _lr_list("mid_lr_weight", mid, n_mid, family) if mid is not None else [1.0] * n_mid
    u = _lr_list("up_lr_weight", up, n_side, family) if up is not None else [1.0] * n_side
    weights = [w if w > zero_threshold else 0.0 for w in d + m + u]
    return [1.0] + weights + [1.0] if sdxl else weights


def slot_values(key: str, value: str, kind: type, *, family: str = "sd1") -> list:
    """Per-slot ints (dims) or floats (alphas) from a comma list (25 SD1/SD2, 23 SDXL), with a clear error for
    a wrong length."""
    n = num_slots(family)
    items = [s for s in str(value).replace(" ", "").split(",")]
    try:
        values = [kind(s) for s in items]
    except ValueError:
        raise ConfigError(f"network_args {key}={value!r}: expected {n} comma-separated "
                          f"{'integers' if kind is int else 'numbers'}") from None
    if len(values) != n:
        if family == "sdxl":
            what = ("one per SDXL block: EMB, IN00..IN08, M00..M02, OUT00..OUT08, OUT; EMB and OUT never get a "
                    "LoRA")
            other = " (25 values is the SD 1.x / 2.x layout)" if len(values) == NUM_SLOTS else ""
        else:
            what = "one per SD 1.x / 2.x block: IN00..IN11, M00, OUT00..OUT11; IN00 is conv_in and never gets a LoRA"
            other = " (23 values is the SDXL layout)" if len(values) == NUM_SLOTS_SDXL else ""
        raise ConfigError(f"network_args {key}: {len(values)} values given, expected {n}{other} ({what})")
    if kind is int and any(v < 0 for v in values):
        raise ConfigError(f"network_args {key}: ranks must be >= 0 (0 = no LoRA in that block)")
    return values
