"""The training-quality benchmark: does a LoRA learn a held-out concept without damaging the base model's prior?

    python bench/quality/run.py [--settings base,plain,concept,...] [--concepts zkz,...] [--seeds 32] [--out DIR]

For every (concept, setting): write the concept's dozen images in sd-scripts folder mode, train a LoRA on the
demo's tiny pre-trained base (lib_lora_train/demo/tiny_base.safetensors) with the engine's own train(), then
draw every prompt on fixed seeds with DPM++ 2M Karras (20 steps, CFG 5) and read each image with the pixel-rule
classifier (classify.py). Scores (each with a Wilson 95% interval):

- concept: the share of trigger-prompt images that show the concept;
- leakage: the share of non-trigger (world) prompt images that show the concept;
- prior:   the share of non-trigger prompt images that show the shape and colour the prompt asks for; the base
           model alone on the same seeds and prompts is the reference ("within 0.05 of the base").

The `ceiling` setting trains and samples nothing: it reads the concept's pictures after a round trip through the
base's autoencoder, the most any LoRA on that base can reach (a LoRA never changes the VAE).

Results go to DIR/results.json (every reading's summary) and DIR/results.md (the table). Not part of `make test`:
a few CPU minutes per setting.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from classify import classify  # noqa: E402
from concepts import CONCEPTS, N_IMAGES, PRIOR_PROMPTS, follows  # noqa: E402
from sampler import SCALE, sample, to_float32, to_pil  # noqa: E402
from settings import SETTINGS, Setting  # noqa: E402

BASE = HERE.parent.parent / "lib_lora_train" / "demo" / "tiny_base.safetensors"   # --base changes it


def file_digest(path: Path) -> str:
    import hashlib
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]
TARGET = {"concept": 0.90, "prior_drop": 0.05, "leakage": 0.10}
CFG = SCALE       # --cfg changes it


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def write_dataset(root: Path, concept, repeats: int, n_images: int = 12) -> Path:
    folder = root / f"{repeats}_{concept.trigger.split()[0]}"
    folder.mkdir(parents=True, exist_ok=True)
    for i, (img, caption) in enumerate(concept.make(n_images, 0)):
        img.save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(caption + "\n", encoding="utf-8")
    return root


def write_reg(root: Path, n: int = 48) -> Path:
    """Prior-preservation images: world scenes with their captions (the class the concept lives in)."""
    from lib_lora_train.demo import world
    folder = root / "1_world"
    folder.mkdir(parents=True, exist_ok=True)
    for i, (img, caption) in enumerate(world.world_samples(n, seed=12345)):
        img.save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(caption + "\n", encoding="utf-8")
    return root


def train_setting(setting: Setting, concept, work: Path, reuse: bool = False) -> tuple[str, dict]:
    from lib_lora_train.config import config_from_dict
    from lib_lora_train.training.loop import train
    data = write_dataset(work / "data", concept, setting.folder_repeats(), setting.images)
    values = dict(setting.run_values(), pretrained_model_name_or_path=str(BASE), train_data_dir=str(data),
                  output_dir=str(work / "lora"), output_name="bench")
    if setting.reg:
        values["reg_data_dir"] = str(write_reg(work / "reg"))
    cfg = config_from_dict(values)
    lora = Path(cfg.output_dir) / f"{cfg.output_name}.safetensors"
    info_path = work / "train_info.json"
    if reuse and lora.exists() and info_path.exists():     # evaluate an earlier run's LoRA again (other seeds)
        return str(lora), json.loads(info_path.read_text()) | {"_cfg": cfg}
    t0 = time.process_time()
    w0 = time.time()
    result = train(cfg)
    info = {"steps": result.steps, "cpu_minutes": round((time.process_time() - t0) / 60, 2),
            "wall_minutes": round((time.time() - w0) / 60, 2),
            "config": {k: v for k, v in cfg.to_dict().items() if k in _SHOWN}}
    info_path.write_text(json.dumps(info, default=str))
    return str(lora), info | {"_cfg": cfg}


_SHOWN = ("network_module", "network_dim", "network_alpha", "network_args", "optimizer_type", "optimizer_args",
          "learning_rate", "unet_lr", "text_encoder_lr", "lr_scheduler", "lr_warmup_steps", "train_batch_size",
          "max_train_epochs", "max_train_steps", "min_snr_gamma", "noise_offset", "network_train_unet_only",
          "shuffle_caption", "keep_tokens", "clip_skip", "prior_loss_weight", "caption_dropout_rate",
          "network_dropout")


def draw_all(model, concept, seeds: list[int], clip_skip) -> dict[str, list]:
    out = {}
    for prompt in list(concept.prompts) + list(PRIOR_PROMPTS):
        out[prompt] = [classify(img) for img in sample(model, prompt, seeds, clip_skip=clip_skip, scale=CFG)]
    return out


def score(concept, readings: dict[str, list], base: dict[str, list] | None) -> dict:
    trig = [concept.shows(r, p) for p in concept.prompts for r in readings[p]]
    leak = [concept.leaks(r) for p in PRIOR_PROMPTS for r in readings[p]]
    prior = [follows(r, p) for p in PRIOR_PROMPTS for r in readings[p]]
    res = {}
    for key, xs in (("concept", trig), ("leakage", leak), ("prior", prior)):
        k, n = sum(xs), len(xs)
        res[key] = {"rate": k / n, "k": k, "n": n, "ci95": wilson(k, n)}
    res["per_prompt"] = {p: {"concept" if p in concept.prompts else "prior":
                             sum((concept.shows(r, p) if p in concept.prompts else follows(r, p))
                                 for r in readings[p]) / len(readings[p])} for p in readings}
    if base is not None:     # the same reading (shape, colour, background) as the base on the same seed
        same = [(r.shape, r.colour, r.background) == (b.shape, b.colour, b.background)
                for p in PRIOR_PROMPTS for r, b in zip(readings[p], base[p])]
        res["same_as_base"] = {"rate": sum(same) / len(same), "k": sum(same), "n": len(same),
                               "ci95": wilson(sum(same), len(same))}
    return res


def base_readings(base_model, concept, seeds: list[int], cache: Path) -> dict[str, list]:
    """The base model's readings on the benchmark's prompts and seeds, cached (several runs in parallel share it)."""
    # keyed by the base file's content: two bases of one architecture have the same size
    at = "" if CFG == SCALE else f"_cfg{CFG:g}"       # the benchmark's CFG keeps the caches' first names
    path = cache / f"base_{concept.name}_{seeds[0]}_{len(seeds)}{at}_{file_digest(BASE)}.pkl"
    if path.exists():
        return pickle.loads(path.read_bytes())
    readings = draw_all(base_model, concept, seeds, None)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(pickle.dumps(readings))
    os.replace(tmp, path)
    return readings


@torch.no_grad()
def _through_autoencoder(model, images) -> list:
    x = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1 for im in images])
    return [classify(im) for im in to_pil(model.vae.decode(model.vae.encode(x).latent_dist.mean).sample)]


def ceiling(base_model, concept, n: int = 24) -> dict:
    """What the base's autoencoder lets any LoRA reach: the concept's own pictures (the dozen trained on and as many
    new ones), encoded and decoded by the base's VAE, read by the classifier. A LoRA changes only the U-Net (and
    text encoder); a picture the VAE cannot reproduce, no setting can draw."""
    from lib_lora_train.demo import world
    pairs = concept.make(N_IMAGES, 0) + concept.make(n - N_IMAGES, 7)
    shows = [concept.shows(r, cap) for r, (_, cap) in zip(_through_autoencoder(base_model, [p[0] for p in pairs]), pairs)]
    scenes = world.world_samples(n * 2, seed=999)
    readings = _through_autoencoder(base_model, [p[0] for p in scenes])
    res = {}
    for key, xs in (("concept", shows), ("leakage", [concept.leaks(r) for r in readings]),
                    ("prior", [follows(r, cap) for r, (_, cap) in zip(readings, scenes)])):
        res[key] = {"rate": sum(xs) / len(xs), "k": sum(xs), "n": len(xs), "ci95": wilson(sum(xs), len(xs))}
    return res


def evaluate(setting: Setting, concept, seeds: list[int], work: Path, base_model, cache: Path,
             reuse: bool = False, compare_base: bool = True) -> dict:
    from lib_lora_train.networks import create_network, network_config_from_args, read_network_file
    if setting.name == "ceiling":
        return {"steps": 0, "cpu_minutes": 0.0, "wall_minutes": 0.0, **ceiling(base_model, concept)}
    if setting.name == "base":
        base = base_readings(base_model, concept, seeds, cache)
        return {"steps": 0, "cpu_minutes": 0.0, "wall_minutes": 0.0, **score(concept, base, base)}
    lora, info = train_setting(setting, concept, work, reuse)
    cfg = info.pop("_cfg")
    net_cfg = network_config_from_args(cfg.network_module, cfg.network_dim, cfg.network_alpha, cfg.network_args,
                                       train_unet=not cfg.network_train_text_encoder_only,
                                       train_text_encoder=not cfg.network_train_unet_only)
    network = create_network(net_cfg, base_model.unet, base_model.text_encoder)
    network.load_tensors(read_network_file(lora)[0])
    network.to(torch.float32)
    network.eval()
    network.apply_to()
    try:
        network.multiplier = 1.0
        readings = draw_all(base_model, concept, seeds, cfg.clip_skip)
    finally:
        network.remove()
    base = base_readings(base_model, concept, seeds, cache) if compare_base else None
    return {**info, **score(concept, readings, base)}


def fmt(s: dict) -> str:
    lo, hi = s["ci95"]
    return f"{s['rate']:.2f} [{lo:.2f}, {hi:.2f}]"


def verdict(row: dict, base: dict) -> str:
    ok = (row["concept"]["rate"] >= TARGET["concept"] and row["leakage"]["rate"] <= TARGET["leakage"]
          and row["prior"]["rate"] >= base["prior"]["rate"] - TARGET["prior_drop"])
    return "yes" if ok else "no"


def markdown(results: dict, seeds: int) -> str:
    lines = [f"Seeds per prompt: {seeds}; DPM++ 2M Karras, 20 steps, CFG {CFG:g}, 64 px; Wilson 95% intervals. "
             f"Target: concept >= {TARGET['concept']}, leakage <= {TARGET['leakage']}, prior within "
             f"{TARGET['prior_drop']} of the base.", ""]
    for cname, rows in results.items():
        c = CONCEPTS[cname]
        base = rows.get("base")
        lines += [f"### {cname}: {c.kind} ({c.description})", "",
                  "| setting | concept | leakage | prior | same as base | seeds | steps | CPU min | meets target |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for sname, r in rows.items():
            same = fmt(r["same_as_base"]) if "same_as_base" in r else ""
            ok = verdict(r, base) if base and sname not in ("base", "ceiling") else ""
            lines.append(f"| {sname} | {fmt(r['concept'])} | {fmt(r['leakage'])} | {fmt(r['prior'])} | {same} | "
                         f"{r.get('seeds', '')} | {r['steps']} | {r['cpu_minutes']:.1f} | {ok} |")
        lines.append("")
    return "\n".join(lines)


def merge(folders: list[Path], out: Path) -> int:
    """One table from several runs (e.g. settings run in parallel), rows in the order settings.py lists them."""
    combined: dict[str, dict] = {}
    for folder in folders:
        for cname, rows in json.loads((folder / "results.json").read_text()).items():
            combined.setdefault(cname, {}).update(rows)
    order = list(SETTINGS)
    combined = {c: dict(sorted(rows.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 999))
                for c, rows in combined.items()}
    seeds = {r["seeds"] for rows in combined.values() for r in rows.values() if "seeds" in r}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(combined, indent=1, default=str))
    (out / "results.md").write_text(markdown(combined, "/".join(str(s) for s in sorted(seeds))))
    print((out / "results.md").read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    global BASE, CFG
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--settings", default="ceiling,base,plain,concept-reg,concept,character,style")
    ap.add_argument("--concepts", default="zkz")
    ap.add_argument("--seeds", type=int, default=32)
    ap.add_argument("--out", default="bench_quality_out")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cfg", type=float, default=SCALE,
                    help=f"CFG scale of the samples (default {SCALE:g}, the benchmark's; 7 is the WebUI's default)")
    ap.add_argument("--base", default=None, help=f"the base model file (default: {BASE.name}, the demo's)")
    ap.add_argument("--base-cache", default=None,
                    help="folder for the base model's readings (default: --out); runs in parallel can share one")
    ap.add_argument("--reuse", action="store_true",
                    help="a setting already trained in --out is evaluated again, not retrained")
    ap.add_argument("--no-base-compare", action="store_true",
                    help="skip the per-seed comparison with the base model (saves drawing the base's images)")
    ap.add_argument("--merge", nargs="+", metavar="DIR",
                    help="only combine the results.json of earlier --out folders into --out (no training)")
    args = ap.parse_args(argv)
    CFG = args.cfg
    if args.merge:
        return merge([Path(d) for d in args.merge], Path(args.out))
    torch.set_num_threads(args.threads)
    if args.base:
        BASE = Path(args.base).resolve()
    from lib_lora_train.models import load_sd_model
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(1000, 1000 + args.seeds))
    names = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        ap.error(f"unknown settings {unknown}; known: {', '.join(SETTINGS)}")
    json_path = out / "results.json"
    results = json.loads(json_path.read_text()) if json_path.exists() else {}
    base_model = load_sd_model(str(BASE))
    to_float32(base_model)
    for cname in [c.strip() for c in args.concepts.split(",") if c.strip()]:
        concept = CONCEPTS[cname]
        rows = results.setdefault(cname, {})
        for sname in names:
            t0 = time.time()
            row = evaluate(SETTINGS[sname], concept, seeds, out / "runs" / cname / sname, base_model,
                           Path(args.base_cache) if args.base_cache else out, args.reuse,
                           not args.no_base_compare)
            row["about"] = SETTINGS[sname].about
            row["seeds"] = 0 if sname == "ceiling" else len(seeds)      # the ceiling draws no samples
            rows[sname] = row
            print(f"{cname:5s} {sname:28s} concept {fmt(row['concept'])}  leakage {fmt(row['leakage'])}  "
                  f"prior {fmt(row['prior'])}  steps {row['steps']}  cpu {row['cpu_minutes']} min  "
                  f"({time.time() - t0:.0f} s)", flush=True)
            json_path.write_text(json.dumps(results, indent=1, default=str))
            (out / "results.md").write_text(markdown(results, len(seeds)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
