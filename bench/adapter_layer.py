"""One adapted layer, forward + backward: the engine's LoRA adapter against peft's, at UNet-like shapes.

Isolates the per-layer cost that the whole-step benchmark (train_step.py) mixes with attention, convolutions
and the optimizer. "lean" is a sketch of a leaner no-dropout training forward for the engine's adapter (the
scale folded into the small up weight instead of two multiplies over the activation); it is here as evidence
for that proposal, not as engine code.

    python bench/adapter_layer.py                  # a few shapes, CPU, 1 thread
    python bench/adapter_layer.py --iters 400 --shapes linear:4096x64,conv:4096x64
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def lean_forward(self, x, *args, **kwargs):
    """y = W x + (x down^T) (up * scalar * scale * multiplier)^T: no activation-sized multiply."""
    import torch.nn.functional as F
    out = self.org_forward(x, *args, **kwargs)
    up = self.lora_up.weight.to(x.dtype) * (self.scalar.to(x.dtype) * (self.scale * self.multiplier))
    down = self.lora_down.weight.to(x.dtype)
    if self.isconv:
        d = self.lora_down
        lx = F.conv2d(x, down, stride=d.stride, padding=d.padding, dilation=d.dilation, groups=d.groups)
        return out + F.conv2d(lx, up)
    return out + F.linear(F.linear(x, down), up)


def build(kind: str, channels: int, rank: int, alpha: float, variant: str):
    import torch
    from lib_lora_train.networks import create_network, network_config_from_args

    class Transformer2DModel(torch.nn.Module):   # the class name the LierLa preset looks for
        def __init__(self):
            super().__init__()
            self.layer = (torch.nn.Linear(channels, channels) if kind == "linear"
                          else torch.nn.Conv2d(channels, channels, 1))

        def forward(self, x):
            return self.layer(x)

    torch.manual_seed(0)
    root = torch.nn.Sequential()
    root.add_module("block", Transformer2DModel())
    root.requires_grad_(False)
    if variant == "peft":
        from peft import LoraConfig, inject_adapter_in_model
        root = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=["block.layer"]), root)
        ups = [p for n, p in root.named_parameters() if "lora_B" in n]
    else:
        net = create_network(network_config_from_args("networks.lora", rank, alpha, [], train_unet=True,
                                                      train_text_encoder=False), root, None)
        net.apply_to()
        net.train()
        if variant == "lean":
            for name, adapter in net.adapters.items():
                adapter.forward = types.MethodType(lean_forward, adapter)
                net._targets[name].module.forward = adapter.forward
        ups = [a.lora_up.weight for a in net.adapters.values()]
        root._keep = [net]   # keep the network alive with the model
    for p in ups:                      # non-zero up weights: the adapter path must really be computed
        torch.nn.init.normal_(p, std=0.01)
    return root


def measure(shapes, iters: int, rank: int, alpha: float) -> list[tuple]:
    import torch
    rows = []
    for kind, tokens, channels in shapes:
        side = int(round(tokens ** 0.5))
        x = torch.randn(tokens, channels) if kind == "linear" else torch.randn(1, channels, side, side)
        models = {v: build(kind, channels, rank, alpha, v) for v in ("engine", "peft", "lean")}
        ref = models["peft"](x)
        for v, m in models.items():   # same function on all sides before timing it
            torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-5)
        times = {v: [] for v in models}
        for _ in range(iters):
            for v, m in models.items():
                t0 = time.process_time()
                m(x).sum().backward()
                times[v].append(time.process_time() - t0)
        med = {v: statistics.median(ts[iters // 10:]) for v, ts in times.items()}
        rows.append((kind, tokens, channels, med))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="linear:4096x64,conv:4096x64,linear:4096x256,linear:1024x128,"
                                       "linear:256x256",
                   help="kind:TOKENSxCHANNELS, comma separated (kind linear or conv = 1x1 Conv2d)")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=8.0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    import torch
    torch.set_num_threads(a.threads)
    shapes = []
    for item in a.shapes.split(","):
        kind, dims = item.split(":")
        tokens, channels = (int(v) for v in dims.lower().split("x"))
        shapes.append((kind, tokens, channels))
    print(f"CPU time per forward+backward of one adapted layer (median of {a.iters}, rank {a.rank}, "
          f"torch threads {torch.get_num_threads()}, torch {torch.__version__})\n")
    print("| layer | tokens x channels | engine us | peft us | lean us | engine/peft | lean/peft |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for kind, tokens, channels, med in measure(shapes, a.iters, a.rank, a.alpha):
        e, f, ln = (1e6 * med[v] for v in ("engine", "peft", "lean"))
        print(f"| {kind} | {tokens} x {channels} | {e:.0f} | {f:.0f} | {ln:.0f} | {e / f:.3f} | {ln / f:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
