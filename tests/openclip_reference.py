"""A float64 reference of the OpenCLIP text transformer, written from its definition and run on the raw
checkpoint weights (fused in_proj, text_projection as x @ P): what the converted transformers models must equal.
"""
from __future__ import annotations

import math

import torch


def _ln(x, w, b, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def openclip_text(raw: dict, prefix: str, ids: torch.Tensor, heads: int) -> dict:
    """{"layers": [output of resblock i, ...], "final": ln_final(last output), "pooled": ln_final(..)[first EOS]
    @ text_projection (None when the file has no projection)}; all float64. `raw` holds the checkpoint's keys."""
    w = {k[len(prefix):]: t.detach().double() for k, t in raw.items() if k.startswith(prefix)}
    n_layers = len({k.split(".")[2] for k in w if k.startswith("transformer.resblocks.")})
    b, length = ids.shape
    x = w["token_embedding.weight"][ids] + w["positional_embedding"][:length]
    width = x.shape[-1]
    d = width // heads
    mask = torch.full((length, length), float("-inf"), dtype=torch.float64).triu(1)   # causal
    outputs = []
    for i in range(n_layers):
        p = f"transformer.resblocks.{i}."
        h = _ln(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"])
        qkv = h @ w[p + "attn.in_proj_weight"].T + w[p + "attn.in_proj_bias"]
        q, k, v = (t.reshape(b, length, heads, d).transpose(1, 2) for t in qkv.split(width, dim=-1))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + mask, dim=-1)
        a = (att @ v).transpose(1, 2).reshape(b, length, width)
        x = x + a @ w[p + "attn.out_proj.weight"].T + w[p + "attn.out_proj.bias"]
        h = _ln(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"])
        h = torch.nn.functional.gelu(h @ w[p + "mlp.c_fc.weight"].T + w[p + "mlp.c_fc.bias"])   # exact (erf) gelu
        x = x + h @ w[p + "mlp.c_proj.weight"].T + w[p + "mlp.c_proj.bias"]
        outputs.append(x)
    final = _ln(x, w["ln_final.weight"], w["ln_final.bias"])
    pooled = None
    if "text_projection" in w:
        eos = (ids == ids.max()).int().argmax(dim=1)   # the EOS id is the largest in the vocabulary
        pooled = final[torch.arange(b), eos] @ w["text_projection"]
    return {"layers": outputs, "final": final, "pooled": pooled, "ln_final": (w["ln_final.weight"],
                                                                               w["ln_final.bias"])}


def layer_norm(x, weight, bias):
    return _ln(x, weight, bias)
