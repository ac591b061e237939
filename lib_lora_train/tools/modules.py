"""One module of a network file: its kind, rank, alpha, update ΔW, and turning an update back into a LoRA.

ΔW of the standard kinds comes from networks.delta.module_delta (the plain reader, WebUI / sd-scripts semantics);
this module adds LyCORIS "full" (diff / diff_b), norm-layer diffs (w_norm / b_norm), DyLoRA rank slicing, shapes
without a base model, and the SVD helpers shared by merge-lora, extract and resize.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping

import torch

from ..errors import ModelError
from ..networks.delta import module_delta

Tensors = Mapping[str, torch.Tensor]
_KXK_NAME = re.compile(r"(_conv1|_conv2|_conv|_conv_in|_conv_out|_op)$")   # SD1 3x3 convs (when shapes are flat)


def module_kind(w: Tensors) -> str:
    """lora (LoRA / LoCon) | loha | lokr | ia3 | full | norm."""
    if "dora_scale" in w:
        return "dora"
    if "lora_down.weight" in w and "lora_up.weight" in w:
        return "lora"
    if "hada_w1_a" in w:
        return "loha"
    if ("lokr_w1" in w or "lokr_w1_a" in w) and ("lokr_w2" in w or "lokr_w2_a" in w):
        return "lokr"
    if "diff" in w:
        return "full"
    if "w_norm" in w:
        return "norm"
    if "weight" in w:
        return "ia3"
    raise ModelError(f"unknown module format with keys {sorted(w)}")


def type_label(w: Tensors) -> str:
    """LoRA, LoCon (a k×k conv), LoCon-Tucker, LoHa, LoKr, IA3, Full, Norm, DoRA."""
    kind = module_kind(w)
    if kind == "lora":
        down = w["lora_down.weight"]
        if "lora_mid.weight" in w:
            return "LoCon-Tucker"
        return "LoCon" if down.dim() == 4 and tuple(down.shape[2:]) != (1, 1) else "LoRA"
    return {"loha": "LoHa", "lokr": "LoKr", "ia3": "IA3", "full": "Full", "norm": "Norm", "dora": "DoRA"}[kind]


def module_rank(w: Tensors) -> int | None:
    kind = module_kind(w)
    if kind in ("lora", "dora") and "lora_down.weight" in w:
        return int(w["lora_down.weight"].shape[0])
    if kind == "loha":
        return int(w["hada_w1_b"].shape[0])
    if kind == "lokr":
        for k in ("lokr_w2_b", "lokr_w1_b"):
            if k in w:
                return int(w[k].shape[0])
    return None


def module_alpha(w: Tensors) -> float | None:
    return float(w["alpha"].float()) if "alpha" in w else None


def module_scale(w: Tensors) -> float:
    """alpha / rank as the plain reader (networks.delta) applies it; no alpha, or no rank: 1."""
    rank, alpha = module_rank(w), module_alpha(w)
    if rank is None or alpha is None:
        return 1.0
    return alpha / rank


def _kxk(name: str, flat_in: int) -> bool:
    return bool(_KXK_NAME.search(name)) and flat_in % 9 == 0


def update_shape(name: str, w: Tensors) -> tuple[int, ...] | None:
    """The shape of the adapted layer's weight, from the tensors alone (None for IA3 / norm layers).

    Flattened conv factors (LoHa / LoKr without Tucker) carry no kernel size; SD1's 3×3 convs are recognised by
    name (conv1 / conv2 / the up- and down-sampler convs / conv_in / conv_out).
    """
    kind = module_kind(w)
    if kind in ("lora", "dora"):
        up, down = w["lora_up.weight"], w["lora_down.weight"]
        return (int(up.shape[0]), *[int(s) for s in down.shape[1:]])
    if kind == "full":
        return tuple(int(s) for s in w["diff"].shape)
    if kind == "loha":
        out = int(w["hada_w1_a"].shape[0])
        if "hada_t1" in w:
            return (out, int(w["hada_w1_b"].shape[1]), *[int(s) for s in w["hada_t1"].shape[2:]])
        flat = int(w["hada_w1_b"].shape[1])
        k = _kxk(name, flat)
        return (out, flat // 9, 3, 3) if k else (out, flat)
    if kind == "lokr":
        w1 = w["lokr_w1"] if "lokr_w1" in w else None
        a1 = int(w1.shape[0]) if w1 is not None else int(w["lokr_w1_a"].shape[0])
        b1 = int(w1.shape[1]) if w1 is not None else int(w["lokr_w1_b"].shape[1])
        if "lokr_w2" in w:
            w2 = w["lokr_w2"]
            return (a1 * int(w2.shape[0]), b1 * int(w2.shape[1]), *[int(s) for s in w2.shape[2:]])
        if "lokr_t2" in w:
            return (a1 * int(w["lokr_w2_a"].shape[0]), b1 * int(w["lokr_w2_b"].shape[1]),
                    *[int(s) for s in w["lokr_t2"].shape[2:]])
        a2, flat2 = int(w["lokr_w2_a"].shape[0]), int(w["lokr_w2_b"].shape[1])
        k = _kxk(name, flat2)
        return (a1 * a2, b1 * flat2 // 9, 3, 3) if k else (a1 * a2, b1 * flat2)
    return None


def dylora_slice(w: Tensors, rank: int, *, keep_alpha: bool = True) -> dict[str, torch.Tensor]:
    """The first `rank` ranks of a DyLoRA module (sd-scripts extract_lora_from_dylora: rows of down, columns of
    up; alpha kept, so the scale becomes alpha / rank). keep_alpha=False scales alpha by sqrt(rank / dim) instead,
    which reproduces the scale the nested chunk had during DyLoRA training (alpha / sqrt(dim * rank))."""
    if module_kind(w) != "lora":
        return dict(w)
    dim = int(w["lora_down.weight"].shape[0])
    if rank >= dim:
        return dict(w)
    out = dict(w)
    out["lora_down.weight"] = w["lora_down.weight"][:rank].contiguous()
    out["lora_up.weight"] = w["lora_up.weight"][:, :rank].contiguous()
    if not keep_alpha and "alpha" in w:
        out["alpha"] = (w["alpha"].float() * math.sqrt(rank / dim)).to(w["alpha"].dtype)
    return out


def module_update(name: str, w: Tensors, org_weight: torch.Tensor | None = None, *,
                  shape: tuple[int, ...] | None = None,
                  dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ΔW, Δbias or None) of one module in float32 (float64 for a float64 base or dtype), shaped like the layer.

    org_weight is needed for IA3 (its update scales the base weight); otherwise the shape suffices.
    """
    kind = module_kind(w)
    dt = torch.float64 if (org_weight is not None and org_weight.dtype == torch.float64) \
        or dtype == torch.float64 else torch.float32
    if kind == "dora":
        raise ModelError(f"{name}: DoRA modules (dora_scale) are not supported by the tools")
    if kind == "full":
        delta = w["diff"].to(dt)
        bias = w["diff_b"].to(dt) if "diff_b" in w else None
        return delta, bias
    if kind == "norm":
        return w["w_norm"].to(dt), (w["b_norm"].to(dt) if "b_norm" in w else None)
    if kind == "ia3" and org_weight is None:
        raise ModelError(f"{name}: an IA3 update depends on the base weights; give the model")
    if org_weight is None:
        shape = shape or update_shape(name, w)
        if shape is None:
            raise ModelError(f"{name}: cannot tell the layer shape from the tensors")
        org_weight = torch.empty(shape, dtype=dt, device="meta")
    delta = module_delta({k: v for k, v in w.items() if k != "scalar"}, org_weight)
    if "scalar" in w:
        delta = delta * w["scalar"].to(delta.dtype)
    return delta.to(dt), None


def lora_factors(w: Tensors) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """(up [out, r], down [r, in·k·k], scale) of a plain LoRA / LoCon module (no Tucker), else None."""
    if module_kind(w) != "lora" or "lora_mid.weight" in w:
        return None
    up, down = w["lora_up.weight"], w["lora_down.weight"]
    r = int(down.shape[0])
    scale = module_scale(w) * (float(w["scalar"].float()) if "scalar" in w else 1.0)
    return up.reshape(up.shape[0], -1).float(), down.reshape(r, -1).float(), scale


# ---------------------------------------------------------------- update -> LoRA

@dataclass
class LowRank:
    up: torch.Tensor        # [out, r] (U·S, sd-scripts' convention)
    down: torch.Tensor      # [r, in·k·k]
    S: torch.Tensor         # singular values of the update (float64), longest known
    full_len: int           # min(out, in·k·k): the length of the full spectrum (zeros beyond len(S))


def svd_dense(mat: torch.Tensor, rank: int, device: str | torch.device | None = None) -> LowRank:
    """Truncated SVD of a dense 2-D update; only the kept vectors are formed (sd-scripts forms all of U and V).

    Rectangular matrices (one side at least twice the other) go through the float64 eigendecomposition of the
    smaller Gram matrix: the same top singular triplets, more accurate than a float32 SVD and several times
    faster on a CPU for SD's feed-forward layers; near-square ones use LAPACK's SVD in float32 (as sd-scripts).
    """
    src = mat.to(device) if device is not None else mat
    m, n = src.shape
    if max(m, n) >= 2 * min(m, n) and min(m, n) > 64:
        return _svd_gram(src, rank)
    U, S, Vh = torch.linalg.svd(src.float(), full_matrices=False)
    r = max(1, min(rank, S.shape[0]))
    up = (U[:, :r] * S[:r]).cpu()
    down = Vh[:r].cpu()
    return LowRank(up, down, S.double().cpu(), min(m, n))


def _svd_gram(mat: torch.Tensor, rank: int) -> LowRank:
    md = mat.double()
    tall = md.shape[0] >= md.shape[1]
    gram = md.t() @ md if tall else md @ md.t()
    evals, evecs = torch.linalg.eigh(gram)                     # ascending
    S = evals.flip(0).clamp_min(0).sqrt()
    r = max(1, min(rank, S.shape[0]))
    top = evecs.flip(1)[:, :r]
    if tall:                                                     # top = V_r: up = M V_r = U_r S_r
        up, down = md @ top, top.t()
    else:                                                        # top = U_r: V_r from the QR of Mᵀ U_r = V_r S_r
        q, rr = torch.linalg.qr(md.t() @ top)
        sign = torch.sign(torch.diagonal(rr))
        sign[sign == 0] = 1
        up, down = top * S[:r], (q * sign).t()
    return LowRank(up.float().cpu(), down.float().cpu(), S.cpu(), min(md.shape))


def svd_factors(A: torch.Tensor, B: torch.Tensor, rank: int) -> LowRank:
    """Exact truncated SVD of A @ B ([out, R] @ [R, in]) without forming it: QR of both sides, SVD of R×R."""
    out, R = A.shape
    n_in = B.shape[1]
    if R >= min(out, n_in):
        return svd_dense(A.double() @ B.double(), rank)
    Qa, Ra = torch.linalg.qr(A.double())
    Qb, Rb = torch.linalg.qr(B.double().t())
    u, s, vh = torch.linalg.svd(Ra @ Rb.t())
    r = max(1, min(rank, R))
    up = (Qa @ u[:, :r]) * s[:r]
    down = vh[:r] @ Qb.t()
    return LowRank(up.float(), down.float(), s, min(out, n_in))


QUANTILE_LIMIT = 16_000_000     # torch.quantile refuses larger inputs


def quantile(x: torch.Tensor, q: float) -> float:
    """torch.quantile (linear interpolation) also for tensors above its 16M-element limit."""
    flat = x.flatten().float()
    if flat.numel() <= QUANTILE_LIMIT:
        return float(torch.quantile(flat, q))
    pos = q * (flat.numel() - 1)
    lo = int(math.floor(pos))
    vals = torch.sort(flat).values
    hi = min(lo + 1, flat.numel() - 1)
    return float(vals[lo] + (vals[hi] - vals[lo]) * (pos - lo))


def clamp_quantile(lr: LowRank, q: float | None) -> LowRank:
    """sd-scripts' outlier clamp: both factors to ±(the q-quantile of their joined values). q None / >= 1: off."""
    if q is None or q >= 1.0:
        return lr
    hi = quantile(torch.cat([lr.up.flatten(), lr.down.flatten()]), q)
    return LowRank(lr.up.clamp(-hi, hi), lr.down.clamp(-hi, hi), lr.S, lr.full_len)


def retained(S: torch.Tensor, rank: int) -> dict[str, float]:
    """How much of the spectrum a rank keeps: sum(S), Frobenius (sqrt of the energy) and max(S) / S[r-1]."""
    S = S.double()
    total, fro = float(S.sum()), float(S.pow(2).sum().sqrt())
    kept = S[:rank]
    out = {"sum_retained": float(kept.sum()) / total if total > 0 else 1.0,
           "fro_retained": float(kept.pow(2).sum().sqrt()) / fro if fro > 0 else 1.0}
    last = float(S[rank - 1]) if 0 < rank <= S.shape[0] else 0.0
    out["max_ratio"] = float(S[0]) / last if last > 0 else math.inf
    return out


def lora_tensors(lr: LowRank, shape: tuple[int, ...], alpha: float, dtype: torch.dtype | None = None
                 ) -> dict[str, torch.Tensor]:
    """sd-scripts file tensors of a low-rank update for a layer of `shape` (Linear, 1×1 or k×k conv)."""
    r = lr.down.shape[0]
    if len(shape) == 4:
        down = lr.down.reshape(r, shape[1], shape[2], shape[3])
        up = lr.up.reshape(shape[0], r, 1, 1)
    else:
        down, up = lr.down.reshape(r, shape[1]), lr.up.reshape(shape[0], r)
    out = {"lora_down.weight": down.contiguous(), "lora_up.weight": up.contiguous(),
           "alpha": torch.tensor(float(alpha))}
    if dtype is not None:
        out = {k: v.to(dtype) for k, v in out.items()}
    return out


def flat(delta: torch.Tensor) -> torch.Tensor:
    """[out, in·k·k] view of an update."""
    return delta.reshape(delta.shape[0], -1)
