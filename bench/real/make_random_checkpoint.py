"""Write a random-weight, full-size Stable Diffusion checkpoint in the original single-file layout.

For real-host runs (A1111, sd-scripts) without downloading real weights. The layout (key names and
shapes) is derived from the host's own inference config:

  SD 1.5   : <webui>/configs/v1-inference.yaml                     (ldm, CLIP ViT-L/14 in HF layout)
  SD 2.x-v : stablediffusion/configs/stable-diffusion/v2-inference-v.yaml   (ldm, OpenCLIP ViT-H/14)
  SDXL     : generative-models/configs/inference/sd_xl_base.yaml    (sgm, CLIP-L + OpenCLIP ViT-bigG/14)

The file is written one tensor at a time (header first, then each tensor generated and appended), so
memory stays at the size of the largest single tensor (the token embedding: ~250 MB in fp32).

Initialisation: every weight is random (std 1/sqrt(fan_in)), biases N(0, 0.02), norms weight 1 + N(0, 0.1) and
bias N(0, 0.1), CLIP embeddings use CLIP's own small stds. (Norm biases must not be all zero: the text encoder's
final LayerNorm would then give outputs of mean exactly 0, and A1111's prompt-emphasis renormalisation,
z * (mean_before / mean_after), turns that into NaN.) The ldm configs' DDPM schedule buffers (betas,
alphas_cumprod, ...) are written too, in fp32, computed as ldm's register_schedule does, as in released files. Nothing is zero-initialised, so the layers ldm/sgm initialise to zero
(`zero_module`: UNet `out.2`, ResBlock `out_layers.3`, transformer `proj_out`) are random too and a
prompt or a LoRA changes the image.

For a v-parameterisation config (`parameterization: "v"`) the UNet output bias `out.2.bias` is set to
--v-nudge (default -3.0): A1111 decides "v" for an SD 2.x checkpoint by running the UNet on a constant
input at t=999 and testing mean(out - x) < -1 (modules/sd_models_config.py,
is_using_v_parameterization_for_sd2). The nudge makes a random UNet pass that test; no marker key is
added, the checkpoint is detected exactly as a real 768-v one.

Usage:
  python make_random_checkpoint.py --config HOST.yaml --out FILE.safetensors [--dtype fp16|fp32]
                                   [--seed 0] [--v-nudge -3.0] [--list-only]
"""
from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import zlib

import numpy as np
import yaml

# Text encoders by the class the host config names. (width, layers, heads are those of the released models.)
OPENCLIP_ARCH = {  # arch -> (width, layers)
    "ViT-H-14": (1024, 24),
    "ViT-bigG-14": (1280, 32),
}


def _list(v, n):
    if isinstance(v, int):
        return [v] * n
    return list(v)


def unet_shapes(p, prefix):
    """Shapes of ldm/sgm openaimodel.UNetModel's state dict from its config params."""
    out = {}
    mc = p["model_channels"]
    ted = mc * 4
    cm = list(p["channel_mult"])
    nrb = _list(p["num_res_blocks"], len(cm))
    attn_res = list(p["attention_resolutions"])
    tdepth = _list(p.get("transformer_depth", 1), len(cm))
    tdepth_mid = p.get("transformer_depth_middle", tdepth[-1])
    ctx = p["context_dim"]
    linear = bool(p.get("use_linear_in_transformer", False))
    in_ch, out_ch = p["in_channels"], p["out_channels"]

    def lin(name, o, i, bias=True):
        out[f"{name}.weight"] = (o, i)
        if bias:
            out[f"{name}.bias"] = (o,)

    def conv(name, o, i, k):
        out[f"{name}.weight"] = (o, i, k, k)
        out[f"{name}.bias"] = (o,)

    def norm(name, c):
        out[f"{name}.weight"] = (c,)
        out[f"{name}.bias"] = (c,)

    def resblock(name, ch, och):
        norm(f"{name}.in_layers.0", ch)
        conv(f"{name}.in_layers.2", och, ch, 3)
        lin(f"{name}.emb_layers.1", och, ted)
        norm(f"{name}.out_layers.0", och)
        conv(f"{name}.out_layers.3", och, och, 3)
        if och != ch:
            conv(f"{name}.skip_connection", och, ch, 1)

    def transformer(name, ch, depth):
        # num_head_channels=64 (SD2/SDXL) or num_heads=8 (SD1): inner dim == ch either way
        inner = ch
        norm(f"{name}.norm", ch)
        if linear:
            lin(f"{name}.proj_in", inner, ch)
            lin(f"{name}.proj_out", ch, inner)
        else:
            conv(f"{name}.proj_in", inner, ch, 1)
            conv(f"{name}.proj_out", ch, inner, 1)
        for d in range(depth):
            b = f"{name}.transformer_blocks.{d}"
            for a, kv in (("attn1", inner), ("attn2", ctx)):
                lin(f"{b}.{a}.to_q", inner, inner, bias=False)
                lin(f"{b}.{a}.to_k", inner, kv, bias=False)
                lin(f"{b}.{a}.to_v", inner, kv, bias=False)
                lin(f"{b}.{a}.to_out.0", inner, inner)
            lin(f"{b}.ff.net.0.proj", inner * 4 * 2, inner)  # GEGLU
            lin(f"{b}.ff.net.2", inner, inner * 4)
            for n in ("norm1", "norm2", "norm3"):
                norm(f"{b}.{n}", inner)

    lin("time_embed.0", ted, mc)
    lin("time_embed.2", ted, ted)
    if p.get("num_classes") == "sequential":
        lin("label_emb.0.0", ted, p["adm_in_channels"])
        lin("label_emb.0.2", ted, ted)

    conv("input_blocks.0.0", mc, in_ch, 3)
    chans = [mc]
    ch = mc
    ds = 1
    idx = 1
    for level, mult in enumerate(cm):
        for _ in range(nrb[level]):
            resblock(f"input_blocks.{idx}.0", ch, mult * mc)
            ch = mult * mc
            if ds in attn_res and tdepth[level] > 0:
                transformer(f"input_blocks.{idx}.1", ch, tdepth[level])
            chans.append(ch)
            idx += 1
        if level != len(cm) - 1:
            conv(f"input_blocks.{idx}.0.op", ch, ch, 3)
            chans.append(ch)
            idx += 1
            ds *= 2

    resblock("middle_block.0", ch, ch)
    transformer("middle_block.1", ch, tdepth_mid)
    resblock("middle_block.2", ch, ch)

    idx = 0
    for level, mult in list(enumerate(cm))[::-1]:
        for i in range(nrb[level] + 1):
            ich = chans.pop()
            resblock(f"output_blocks.{idx}.0", ch + ich, mc * mult)
            ch = mc * mult
            sub = 1
            if ds in attn_res and tdepth[level] > 0:
                transformer(f"output_blocks.{idx}.1", ch, tdepth[level])
                sub = 2
            if level and i == nrb[level]:
                conv(f"output_blocks.{idx}.{sub}.conv", ch, ch, 3)
                ds //= 2
            idx += 1

    norm("out.0", ch)
    conv("out.2", out_ch, mc, 3)
    return {f"{prefix}{k}": v for k, v in out.items()}


def vae_shapes(dd, embed_dim, prefix):
    out = {}
    ch = dd["ch"]
    cm = list(dd["ch_mult"])
    nrb = dd["num_res_blocks"]
    z = dd["z_channels"]

    def conv(name, o, i, k):
        out[f"{name}.weight"] = (o, i, k, k)
        out[f"{name}.bias"] = (o,)

    def norm(name, c):
        out[f"{name}.weight"] = (c,)
        out[f"{name}.bias"] = (c,)

    def res(name, i, o):
        norm(f"{name}.norm1", i)
        conv(f"{name}.conv1", o, i, 3)
        norm(f"{name}.norm2", o)
        conv(f"{name}.conv2", o, o, 3)
        if i != o:
            conv(f"{name}.nin_shortcut", o, i, 1)

    def mid(name, c):
        res(f"{name}.block_1", c, c)
        norm(f"{name}.attn_1.norm", c)
        for n in ("q", "k", "v", "proj_out"):
            conv(f"{name}.attn_1.{n}", c, c, 1)
        res(f"{name}.block_2", c, c)

    # encoder
    conv("encoder.conv_in", ch, dd["in_channels"], 3)
    in_mult = (1,) + tuple(cm)
    bi = ch
    for i in range(len(cm)):
        bi = ch * in_mult[i]
        bo = ch * cm[i]
        for j in range(nrb):
            res(f"encoder.down.{i}.block.{j}", bi, bo)
            bi = bo
        if i != len(cm) - 1:
            conv(f"encoder.down.{i}.downsample.conv", bi, bi, 3)
    mid("encoder.mid", bi)
    norm("encoder.norm_out", bi)
    conv("encoder.conv_out", 2 * z if dd.get("double_z", True) else z, bi, 3)
    # decoder
    bi = ch * cm[-1]
    conv("decoder.conv_in", bi, z, 3)
    mid("decoder.mid", bi)
    for i in reversed(range(len(cm))):
        bo = ch * cm[i]
        for j in range(nrb + 1):
            res(f"decoder.up.{i}.block.{j}", bi, bo)
            bi = bo
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", bi, bi, 3)
    norm("decoder.norm_out", bi)
    conv("decoder.conv_out", dd["out_ch"], bi, 3)
    conv("quant_conv", 2 * embed_dim, 2 * z, 1)
    conv("post_quant_conv", z, embed_dim, 1)
    return {f"{prefix}{k}": v for k, v in out.items()}


def hf_clip_l_shapes(prefix):
    """CLIP ViT-L/14 text model in transformers' layout (openai/clip-vit-large-patch14)."""
    w, layers, vocab, ctx = 768, 12, 49408, 77
    out = {
        "embeddings.token_embedding.weight": (vocab, w),
        "embeddings.position_embedding.weight": (ctx, w),
        "embeddings.position_ids": (1, ctx),
        "final_layer_norm.weight": (w,),
        "final_layer_norm.bias": (w,),
    }
    for i in range(layers):
        b = f"encoder.layers.{i}"
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[f"{b}.self_attn.{n}.weight"] = (w, w)
            out[f"{b}.self_attn.{n}.bias"] = (w,)
        for n in ("layer_norm1", "layer_norm2"):
            out[f"{b}.{n}.weight"] = (w,)
            out[f"{b}.{n}.bias"] = (w,)
        out[f"{b}.mlp.fc1.weight"] = (4 * w, w)
        out[f"{b}.mlp.fc1.bias"] = (4 * w,)
        out[f"{b}.mlp.fc2.weight"] = (w, 4 * w)
        out[f"{b}.mlp.fc2.bias"] = (w,)
    return {f"{prefix}text_model.{k}": v for k, v in out.items()}


def openclip_text_shapes(arch, prefix):
    """open_clip text tower (the visual tower is deleted by the host's embedder) in open_clip's layout."""
    w, layers = OPENCLIP_ARCH[arch]
    vocab, ctx = 49408, 77
    out = {
        "positional_embedding": (ctx, w),
        "token_embedding.weight": (vocab, w),
        "ln_final.weight": (w,),
        "ln_final.bias": (w,),
        "text_projection": (w, w),
        "logit_scale": (),
    }
    for i in range(layers):
        b = f"transformer.resblocks.{i}"
        out[f"{b}.ln_1.weight"] = (w,)
        out[f"{b}.ln_1.bias"] = (w,)
        out[f"{b}.attn.in_proj_weight"] = (3 * w, w)
        out[f"{b}.attn.in_proj_bias"] = (3 * w,)
        out[f"{b}.attn.out_proj.weight"] = (w, w)
        out[f"{b}.attn.out_proj.bias"] = (w,)
        out[f"{b}.ln_2.weight"] = (w,)
        out[f"{b}.ln_2.bias"] = (w,)
        out[f"{b}.mlp.c_fc.weight"] = (4 * w, w)
        out[f"{b}.mlp.c_fc.bias"] = (4 * w,)
        out[f"{b}.mlp.c_proj.weight"] = (w, 4 * w)
        out[f"{b}.mlp.c_proj.bias"] = (w,)
    return {f"{prefix}{k}": v for k, v in out.items()}


def text_encoder_shapes(target, params, prefix):
    cls = target.rsplit(".", 1)[-1]
    if cls == "FrozenCLIPEmbedder":
        return hf_clip_l_shapes(prefix + "transformer.")
    if cls in ("FrozenOpenCLIPEmbedder", "FrozenOpenCLIPEmbedder2"):
        return openclip_text_shapes(params.get("arch", "ViT-H-14"), prefix + "model.")
    if cls == "ConcatTimestepEmbedderND":
        return {}  # no weights
    raise SystemExit(f"unsupported text encoder {target}")


def ddpm_buffers(p):
    """ldm.models.diffusion.ddpm.DDPM.register_schedule's buffers (linear schedule), float32 like ldm's."""
    n = int(p.get("timesteps", 1000))
    ls, le = float(p.get("linear_start", 1e-4)), float(p.get("linear_end", 2e-2))
    v_post = float(p.get("v_posterior", 0.0))
    betas = np.linspace(ls ** 0.5, le ** 0.5, n, dtype=np.float64) ** 2
    alphas = 1.0 - betas
    ac = np.cumprod(alphas, axis=0)
    acp = np.append(1.0, ac[:-1])
    pv = (1 - v_post) * betas * (1.0 - acp) / (1.0 - ac) + v_post * betas
    out = {
        "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": acp,
        "sqrt_alphas_cumprod": np.sqrt(ac), "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "log_one_minus_alphas_cumprod": np.log(1.0 - ac), "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1), "posterior_variance": pv,
        "posterior_log_variance_clipped": np.log(np.maximum(pv, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(acp) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - acp) * np.sqrt(alphas) / (1.0 - ac),
    }
    return {k: v.astype(np.float32) for k, v in out.items()}


def layout_from_config(cfg):
    """(shapes: key -> shape, fixed: key -> float32 array written as is, v_param) for an ldm LatentDiffusion or
    sgm DiffusionEngine config."""
    m = cfg["model"]
    p = m["params"]
    shapes = {}
    fixed = {}
    if m["target"].endswith("DiffusionEngine"):  # sgm (SDXL)
        shapes.update(unet_shapes(p["network_config"]["params"], "model.diffusion_model."))
        for i, e in enumerate(p["conditioner_config"]["params"]["emb_models"]):
            shapes.update(text_encoder_shapes(e["target"], e.get("params", {}), f"conditioner.embedders.{i}."))
        fs = p["first_stage_config"]["params"]
        shapes.update(vae_shapes(fs["ddconfig"], fs["embed_dim"], "first_stage_model."))
        den = p.get("denoiser_config", {}).get("params", {})
        v_param = "VScaling" in json.dumps(den)
    else:  # ldm (SD 1.x / 2.x)
        shapes.update(unet_shapes(p["unet_config"]["params"], "model.diffusion_model."))
        cs = p["cond_stage_config"]
        shapes.update(text_encoder_shapes(cs["target"], cs.get("params", {}), "cond_stage_model."))
        fs = p["first_stage_config"]["params"]
        shapes.update(vae_shapes(fs["ddconfig"], fs["embed_dim"], "first_stage_model."))
        v_param = p.get("parameterization", "eps") == "v"
        fixed = ddpm_buffers(p)
        shapes.update({k: v.shape for k, v in fixed.items()})
    return shapes, fixed, v_param


def init_tensor(key, shape, rng, v_nudge, norm_keys=frozenset()):
    """float32 (or int64) numpy array for one key."""
    if key.endswith("position_ids"):
        return np.arange(shape[-1], dtype=np.int64).reshape(shape)
    if key.endswith("logit_scale"):
        return np.array(math.log(100.0), dtype=np.float32).reshape(shape)
    if key.endswith("token_embedding.weight"):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02)
    if key.endswith("positional_embedding") or key.endswith("position_embedding.weight"):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.01)
    if key == "model.diffusion_model.out.2.bias" and v_nudge is not None:
        return np.full(shape, v_nudge, dtype=np.float32)
    if key in norm_keys:  # GroupNorm / LayerNorm: weight 1 + N(0, 0.1), bias N(0, 0.1)
        a = rng.standard_normal(shape, dtype=np.float32) * 0.1
        return a + 1.0 if key.endswith("weight") else a
    if key.endswith("bias") or key.endswith("in_proj_bias"):
        return rng.standard_normal(shape, dtype=np.float32) * 0.02
    if key.endswith("text_projection"):
        return rng.standard_normal(shape, dtype=np.float32) * (shape[0] ** -0.5)
    fan_in = int(np.prod(shape[1:]))
    return rng.standard_normal(shape, dtype=np.float32) * (1.0 / math.sqrt(fan_in))


DT = {"fp16": (np.float16, "F16", 2), "fp32": (np.float32, "F32", 4)}


def write(shapes, fixed, out_path, dtype, seed, v_nudge, metadata):
    np_dt, st_dt, nbytes = DT[dtype]
    keys = sorted(shapes)
    # the norms are the modules whose weight is 1-D (every other 1-D weight-less tensor is a bias)
    norm_keys = {k for k in keys if k.endswith(".weight") and len(shapes[k]) == 1}
    norm_keys |= {k[: -len("weight")] + "bias" for k in norm_keys}
    header = {}
    off = 0
    for k in keys:
        shape = shapes[k]
        if k.endswith("position_ids"):
            dt, nb = "I64", 8
        elif k in fixed:
            dt, nb = "F32", 4
        else:
            dt, nb = st_dt, nbytes
        n = int(np.prod(shape)) * nb if shape else nb
        header[k] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    header["__metadata__"] = metadata
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    with open(out_path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for i, k in enumerate(keys):
            rng = np.random.default_rng([seed, zlib.crc32(k.encode())])
            a = fixed[k] if k in fixed else init_tensor(k, shapes[k], rng, v_nudge, norm_keys)
            if a.dtype != np.int64 and k not in fixed:
                a = a.astype(np_dt)
            b = np.ascontiguousarray(a).tobytes()
            s, e = header[k]["data_offsets"]
            assert len(b) == e - s, (k, len(b), e - s)
            f.write(b)
            del a, b
            if i % 200 == 0:
                print(f"  {i}/{len(keys)} {k}", file=sys.stderr, flush=True)
    return off


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="the host's inference yaml")
    ap.add_argument("--out", required=False)
    ap.add_argument("--dtype", default="fp16", choices=sorted(DT))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--v-nudge", type=float, default=-3.0,
                    help="UNet out.2.bias for v-parameterisation configs (A1111's SD2 v test)")
    ap.add_argument("--list-only", action="store_true", help="print keys and shapes, write nothing")
    a = ap.parse_args()
    with open(a.config) as f:
        cfg = yaml.safe_load(f)
    shapes, fixed, v_param = layout_from_config(cfg)
    nparams = sum(int(np.prod(s)) if s else 1 for s in shapes.values())
    if a.list_only:
        for k in sorted(shapes):
            print(k, list(shapes[k]))
        print(f"# {len(shapes)} tensors, {nparams:,} values, v_param={v_param}", file=sys.stderr)
        return
    if not a.out:
        ap.error("--out is required unless --list-only")
    meta = {"format": "pt", "random_weights": "true", "source_config": a.config.rsplit("/", 1)[-1],
            "seed": str(a.seed)}
    nbytes = write(shapes, fixed, a.out, a.dtype, a.seed, a.v_nudge if v_param else None, meta)
    print(f"wrote {a.out}: {len(shapes)} tensors, {nparams:,} values, {nbytes / 2**30:.2f} GiB data, "
          f"v_param={v_param}", file=sys.stderr)


if __name__ == "__main__":
    main()
