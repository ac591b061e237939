"""Post-training tools on an SD1.5-size checkpoint (random weights): merge into a checkpoint, extract, resize.

Builds a full-size SD1.5-shaped checkpoint (1.07 B parameters, fp16, ~2.1 GB) and a rank-32 LierLa LoRA with random
weights in a work folder, then times each tool in its own subprocess (wall time and peak RSS via /usr/bin/time),
ours and, when available, sd-scripts' scripts on the same inputs in the same run (networks/merge_lora.py,
extract_lora_from_models.py, resize_lora.py run from an sd-scripts checkout with a Python that has torch /
diffusers / transformers; the image libraries those scripts import but never use here -- torchvision, cv2,
imagesize -- are replaced by empty stand-ins, and CLIP's position_ids buffer is supplied for transformers 4.30).
The outputs of both are compared numerically.

    python bench/tools.py                                  # full size, with sd-scripts if found (slow: ~1 h)
    python bench/tools.py --no-sd-scripts                  # ours only
    python bench/tools.py --quick                          # small model, smoke run
Results: printed as a table and written to <workdir>/tools_bench.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SD15 = dict(unet_channels=(320, 640, 1280, 1280), unet_layers=2, transformer_depth=1, text_hidden=768,
            text_layers=12, text_intermediate=3072, vae_channels=(128, 256, 512, 512), vae_layers=2)
QUICK = dict(unet_channels=(64, 128, 256, 256), text_hidden=128, text_layers=4, text_intermediate=512,
             vae_channels=(32, 64, 64, 64), vocab_size=4096)

# Import-time stand-ins so sd-scripts' library modules load without image packages (used by no measured code path).
_STUB_RUNNER = r'''
import importlib.abc, importlib.machinery, runpy, sys, types
ROOT, STUBS = sys.argv[1], set(sys.argv[2].split(","))
class _Meta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return Stand
class Stand(metaclass=_Meta):
    def __init__(self, *a, **k): pass
    def __call__(self, *a, **k): raise RuntimeError("stand-in of an image package was used")
    def __getattr__(self, name): return Stand()
class _Module(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return Stand
def _asked_by_root():
    f = sys._getframe(2)
    while f is not None and ("importlib" in f.f_code.co_filename or f.f_code.co_filename.startswith("<frozen")):
        f = f.f_back
    return f is not None and f.f_code.co_filename.startswith(ROOT)
class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in STUBS and _asked_by_root():
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
    def create_module(self, spec):
        m = _Module(spec.name)
        m.__path__ = []
        return m
    def exec_module(self, module):
        pass
sys.meta_path.insert(0, _Finder())
sys.path[:0] = [ROOT, ROOT + "/networks"]
# sd-scripts drops CLIP's position_ids (a non-persistent buffer from transformers 4.31); 4.30 still expects it
import transformers
_load = transformers.CLIPTextModel.load_state_dict
def _with_position_ids(self, sd, *a, **k):
    key = "text_model.embeddings.position_ids"
    own = self.state_dict()
    if key in own and key not in sd:
        sd = dict(sd)
        sd[key] = own[key]
    return _load(self, sd, *a, **k)
transformers.CLIPTextModel.load_state_dict = _with_position_ids
script = sys.argv[3]
sys.argv = [script] + sys.argv[4:]
runpy.run_path(script, run_name="__main__")
'''


def build_inputs(work: str, sizes: dict, rank: int, log) -> tuple[str, str]:
    import torch

    from lib_lora_train.models import save_checkpoint, tiny_sd1_state_dict
    from lib_lora_train.networks import save_network_file
    from lib_lora_train.tools.checkpoint import CheckpointSource, sd1_targets

    base, lora = os.path.join(work, "base.safetensors"), os.path.join(work, f"lora_r{rank}.safetensors")
    if not os.path.exists(base):
        log("building the random SD1.5-size checkpoint (fp16)")
        sd = tiny_sd1_state_dict(seed=0, **sizes)
        for k in list(sd):
            if sd[k].is_floating_point():
                sd[k] = sd[k].half()
        save_checkpoint(base, sd, {"modelspec.title": "bench base"})
        del sd
    if not os.path.exists(lora):
        log(f"building a random rank-{rank} LierLa LoRA")
        g = torch.Generator().manual_seed(1)
        tensors = {}
        with CheckpointSource(base) as src:
            for t in sd1_targets(src, "lierla"):
                shape = src.shape(t.weight_key)
                n_in = 1
                for s in shape[1:]:
                    n_in *= s
                tensors[f"{t.name}.lora_down.weight"] = (torch.randn(rank, *shape[1:], generator=g) / n_in ** 0.5)
                up_shape = (shape[0], rank) + ((1, 1) if len(shape) == 4 else ())
                tensors[f"{t.name}.lora_up.weight"] = torch.randn(up_shape, generator=g) * 0.01
                tensors[f"{t.name}.alpha"] = torch.tensor(rank / 2)
        tensors = {k: v.half() for k, v in tensors.items()}
        save_network_file(lora, tensors, {"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                                          "ss_network_alpha": str(rank / 2), "ss_base_model_version": "sd_v1",
                                          "modelspec.title": "bench lora"})
    return base, lora


def timed(cmd: list[str], log, env=None, timeout=None) -> dict:
    """Run a command under /usr/bin/time: wall and CPU (user + system) seconds, peak RSS (MB), the machine's load
    average before and after (the machine is shared: CPU seconds are the steadier figure), exit code."""
    full = (["/usr/bin/time", "-f", "TIME %e %M %U %S"] if os.path.exists("/usr/bin/time") else []) + cmd
    load_before = os.getloadavg()[0]
    t0 = time.time()
    try:
        proc = subprocess.run(full, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "seconds": time.time() - t0, "error": f"timed out after {timeout} s"}
    out = {"ok": proc.returncode == 0, "seconds": round(time.time() - t0, 2),
           "load": [round(load_before, 1), round(os.getloadavg()[0], 1)]}
    for line in proc.stderr.splitlines():
        if line.startswith("TIME "):
            _, wall, rss, user, system = line.split()
            out["seconds"], out["peak_rss_mb"] = float(wall), round(int(rss) / 1024)
            out["cpu_seconds"] = round(float(user) + float(system), 1)
    if proc.returncode != 0:
        out["error"] = (proc.stderr or proc.stdout)[-1500:]
        log(f"  failed: {out['error'][-400:]}")
    return out


def ours(code: str) -> list[str]:
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r}); {code}"]


def compare_checkpoints(a: str, b: str, keys_from: str | None = None) -> dict:
    """Largest difference of the merged tensors (those differing from keys_from, the base) between a and b."""
    import torch
    from safetensors import safe_open

    worst, n = 0.0, 0
    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb, safe_open(keys_from, "pt") as fbase:
        common = set(fa.keys()) & set(fb.keys())
        only = sorted(set(fa.keys()) ^ set(fb.keys()))
        for k in sorted(common):
            ta = fa.get_tensor(k)
            if not ta.is_floating_point() or torch.equal(ta, fbase.get_tensor(k)):
                continue
            n += 1
            tb = fb.get_tensor(k)
            scale = float(ta.float().abs().max()) or 1.0
            worst = max(worst, float((ta.float() - tb.float()).abs().max()) / scale)
    return {"merged_tensors": n, "max_rel_diff": worst, "keys_only_in_one": len(only)}


def compare_loras(a: str, b: str) -> dict:
    """Per module ||ΔW_a - ΔW_b|| / ||ΔW_b|| between two LoRA files (the products, so SVD signs do not matter)."""
    from lib_lora_train.tools.formats import read_lora
    from lib_lora_train.tools.modules import flat, module_update, update_shape

    la, lb = read_lora(a), read_lora(b)
    errs = []
    for name, wa in la.modules.items():
        if name not in lb.modules:
            continue
        da = flat(module_update(name, wa, shape=update_shape(name, wa))[0])
        wb = lb.modules[name]
        db = flat(module_update(name, wb, shape=update_shape(name, wb))[0])
        errs.append(float((da - db).norm() / db.norm().clamp_min(1e-30)))
    return {"modules_compared": len(errs), "only_in_one": len(set(la.modules) ^ set(lb.modules)),
            "max_rel_diff": max(errs) if errs else None, "mean_rel_diff": sum(errs) / len(errs) if errs else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=os.path.join("/tmp", "lib_lora_train_tools_bench"))
    ap.add_argument("--rank", type=int, default=32, help="rank of the random LoRA")
    ap.add_argument("--dim", type=int, default=32, help="extract rank")
    ap.add_argument("--quick", action="store_true", help="small model (smoke run)")
    ap.add_argument("--no-sd-scripts", action="store_true")
    ap.add_argument("--sd-scripts", default="/tmp/sdscripts", help="sd-scripts checkout")
    ap.add_argument("--sd-python", default=os.path.join(ROOT, ".venv-webui", "bin", "python"),
                    help="Python for sd-scripts (transformers 4.x: sd-scripts imports CLIPFeatureExtractor)")
    ap.add_argument("--sd-timeout", type=int, default=3 * 3600)
    ap.add_argument("--rounds", type=int, default=2, help="runs of each tool, alternating who goes first")
    ap.add_argument("--only", nargs="*", choices=["merge", "extract", "resize"], help="run only these tools")
    args = ap.parse_args()

    os.makedirs(args.workdir, exist_ok=True)
    work = os.path.join(args.workdir, "quick" if args.quick else "sd15")
    os.makedirs(work, exist_ok=True)
    log = lambda m: print(m, file=sys.stderr, flush=True)     # noqa: E731
    base, lora = build_inputs(work, QUICK if args.quick else SD15, args.rank, log)
    use_sd = not args.no_sd_scripts and not args.quick and os.path.isdir(args.sd_scripts) \
        and os.path.exists(args.sd_python)
    stub = os.path.join(work, "sd_scripts_runner.py")
    with open(stub, "w") as f:
        f.write(_STUB_RUNNER)

    def sd(script: str, *flags) -> list[str]:
        return [args.sd_python, stub, args.sd_scripts, "torchvision,cv2,imagesize",
                os.path.join(args.sd_scripts, "networks", script), *map(str, flags)]

    wanted = set(args.only or ["merge", "extract", "resize"])
    results: dict = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                                 "python": platform.python_version()},
                     "inputs": {"checkpoint_gb": round(os.path.getsize(base) / 2 ** 30, 2),
                                "lora_mb": round(os.path.getsize(lora) / 2 ** 20, 1), "rank": args.rank}}
    ours_merged = os.path.join(work, "merged_ours.safetensors")
    # (name, our command, sd-scripts command or None, our output, sd-scripts output, compare function)
    jobs = []
    if "merge" in wanted or not os.path.exists(ours_merged):
        jobs.append(("merge", ours("from lib_lora_train.tools.merge import merge_into_checkpoint as f; "
                                   f"f({base!r}, [{lora!r}], {ours_merged!r}, save_precision='fp16', "
                                   "compute_hashes=False)"),
                     sd("merge_lora.py", "--sd_model", base, "--models", lora, "--ratios", "1", "--save_to",
                        os.path.join(work, "merged_sd.safetensors"), "--save_precision", "fp16"),
                     ours_merged, os.path.join(work, "merged_sd.safetensors"),
                     lambda a, b: compare_checkpoints(a, b, base)))
    ex_ours, ex_sd = os.path.join(work, "extract_ours.safetensors"), os.path.join(work, "extract_sd.safetensors")
    if "extract" in wanted:
        jobs.append(("extract", ours("from lib_lora_train.tools.extract import extract_lora_to_file as f; "
                                     f"f({base!r}, {ours_merged!r}, {ex_ours!r}, dim={args.dim}, "
                                     "save_precision='fp16')"),
                     sd("extract_lora_from_models.py", "--model_org", base, "--model_tuned", ours_merged, "--dim",
                        args.dim, "--save_precision", "fp16", "--save_to", ex_sd), ex_ours, ex_sd, compare_loras))
    rz_ours, rz_sd = os.path.join(work, "resize_ours.safetensors"), os.path.join(work, "resize_sd.safetensors")
    if "resize" in wanted:
        jobs.append(("resize", ours("from lib_lora_train.tools.resize import resize_lora_to_file as f; "
                                    f"f({lora!r}, {rz_ours!r}, new_rank=8, save_precision='fp16')"),
                     sd("resize_lora.py", "--model", lora, "--new_rank", 8, "--save_precision", "fp16",
                        "--save_to", rz_sd), rz_ours, rz_sd, compare_loras))
    for name, ours_cmd, sd_cmd, ours_out, sd_out, compare in jobs:
        for rnd in range(args.rounds):
            order = [("ours", ours_cmd, ours_out)] + ([("sd_scripts", sd_cmd, sd_out)] if use_sd else [])
            for who, cmd, target in (order if rnd % 2 == 0 else order[::-1]):     # alternate who goes first
                log(f"{name} round {rnd + 1}: {who}")
                if os.path.exists(target):
                    os.unlink(target)
                results.setdefault(f"{name}_{who}", []).append(
                    timed(cmd, log, timeout=args.sd_timeout if who == "sd_scripts" else None))
        if name == "merge":
            results["merge_ours_hash_sha256"] = timed(
                ours(f"from lib_lora_train.models.ckpt import file_hashes; file_hashes({ours_merged!r})"), log)
        if use_sd and os.path.exists(ours_out) and os.path.exists(sd_out):
            results[f"{name}_compare"] = compare(ours_out, sd_out)
        if name == "extract" and os.path.exists(ex_ours):
            results["extract_vs_lora"] = compare_loras(ex_ours, lora)
    path = os.path.join(args.workdir, "tools_bench.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print("\n| step | wall s | CPU s | peak RSS MB | load avg before / after |\n|---|---|---|---|---|")
    for k, v in results.items():
        runs = v if isinstance(v, list) else [v]
        for i, r in enumerate(runs):
            if isinstance(r, dict) and "seconds" in r:
                label = k + (f" #{i + 1}" if len(runs) > 1 else "")
                print(f"| {label} | {r['seconds']} | {r.get('cpu_seconds', '-')} | {r.get('peak_rss_mb', '-')}"
                      f"{'' if r['ok'] else ' (failed)'} | {r['load'][0]} / {r['load'][1]} |")
    for k in ("merge_compare", "extract_compare", "extract_vs_lora", "resize_compare"):
        if k in results:
            print(f"{k}: {results[k]}")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
