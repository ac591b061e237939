"""`python -m lib_lora_train reg-images`: class images for prior preservation, made by a checkpoint, cached."""
from __future__ import annotations

import argparse
import json
import sys
import threading
from typing import Any

from ..sigint import install_sigint


def cmd_reg_images(args: argparse.Namespace, rest: list[str]) -> int:
    from ..config_schema import parse_resolution
    from .regimages import RegRequest, checkpoint_source, generate_reg_images, user_cache_dir

    size = parse_resolution(args.size) if args.size else None
    with checkpoint_source(args.model, args.device) as (model_id, backend, render):
        if size is None:
            from ..hosts.base import checkpoint_kind, native_resolution_of
            side = native_resolution_of(*(checkpoint_kind(args.model) or ("sd1", "epsilon")))
            size = (side, side)
        req = RegRequest(prompt=args.prompt, count=args.count, width=size[0], height=size[1],
                         negative_prompt=args.negative or "", sampler=args.sampler, steps=args.steps,
                         cfg_scale=args.cfg_scale, seed=args.seed, repeats=args.repeats)

        def progress(done: int, total: int) -> None:
            if not args.json:
                print(f"{done}/{total}", file=sys.stderr, flush=True)

        stop = install_sigint(threading.Event(), "stopping after this image; run it again to complete the set")
        result = generate_reg_images(req, model_id=model_id, backend=backend, render=render,
                                     cache_root=args.out or user_cache_dir(), progress=progress, stop=stop)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(f"{result.count} images in {result.folder} ({result.reused} from the cache, {result.generated} new)")
        print(f"reg_data_dir = {result.reg_data_dir}")
    return 0


def register(subparsers: Any) -> None:
    r = subparsers.add_parser(
        "reg-images", help="make regularisation (class) images with a checkpoint, cached per model and prompt",
        description="Class images for prior preservation: COUNT images of PROMPT drawn by the checkpoint itself "
                    "(seeds SEED, SEED+1, ...), in sd-scripts' reg folder form (<out>/<key>/<repeats>_<class>/ "
                    "with .png + .txt). The same request again reuses them; a larger --count adds the missing "
                    "ones. Pass the printed reg_data_dir to a run, or use the run keys reg_images_prompt / "
                    "reg_images_count instead.")
    r.add_argument("--model", required=True, help="the checkpoint (.safetensors / .ckpt) that draws them")
    r.add_argument("--prompt", required=True, help="the class prompt, e.g. 'a photo of a woman' (also the caption)")
    r.add_argument("--count", type=int, required=True, help="how many images")
    r.add_argument("--out", default=None, help="cache folder (default: $LORA_TRAIN_CACHE or ~/.cache/lora_train, "
                                               "then reg_images/)")
    r.add_argument("--negative", default="", help="negative prompt")
    r.add_argument("--size", default=None, help="N or W,H (default: the model's native resolution)")
    r.add_argument("--sampler", default="dpm++_2m_karras", help="default: dpm++_2m_karras (DPM++ 2M Karras)")
    r.add_argument("--steps", type=int, default=20)
    r.add_argument("--cfg-scale", dest="cfg_scale", type=float, default=7.0)
    r.add_argument("--seed", type=int, default=0, help="image i gets seed SEED+i (default 0)")
    r.add_argument("--repeats", type=int, default=1, help="N of the N_<class> folder (default 1)")
    r.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    r.add_argument("--json", action="store_true", help="print the result as JSON")
    r.set_defaults(func=cmd_reg_images)
