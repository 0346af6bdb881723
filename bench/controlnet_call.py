"""One ControlNet-steered UNet call against an uncontrolled one, on random weights (speed does not depend on them).

    .venv/bin/python -m bench.controlnet_call                                   # tiny, CPU: seconds
    .venv/bin/python -m bench.controlnet_call --model sdxl --device cuda --dtype float16 --views 16

A call is what views.ViewRunner makes of `--views` local windows of the native size: 2 x views rows (CFG). The
controlled call is the whole seam: minifusion.controlnet.Control cutting each window's condition crop from a
condition image of `--image-scale` x the native size, the ControlNet, then the UNet with its residuals. Prints
one JSON object: median seconds of each (after warm-up), their ratio, and on CUDA the peak allocated bytes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from minifusion.controlnet import Control, Unit, condition_size
from minifusion.models.controlnet import ControlNet, ControlNetConfig
from minifusion.models.unet import UNet
from minifusion.views import Window, time_ids

from .models import CONFIGS, materialise_random


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeat: int, warmup: int) -> dict:
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        _sync(device)
        seconds.append(time.perf_counter() - start)
    out = {"median_s": statistics.median(seconds), "min_s": min(seconds)}
    if device.type == "cuda":
        out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device) - base
    return out


@torch.no_grad()
def run(model: str, device: torch.device, dtype: torch.dtype, views: int, image_scale: int, repeat: int,
        warmup: int) -> dict:
    cfg = CONFIGS[model].unet
    with torch.device("meta"):
        unet, net = UNet(cfg), ControlNet(ControlNetConfig.from_unet(cfg))
    unet, net = materialise_random(unet, device, dtype, 0), materialise_random(net, device, dtype, 1)
    window, size = cfg.sample_size, cfg.sample_size * image_scale
    sizes = [(window, window)] + [(window * s, window * s) for s in range(2, image_scale + 1)]
    image = torch.rand(1, 3, *condition_size(sizes[0]))
    control = Control([Unit(net, image)], sizes, steps=1)
    g = torch.Generator(device=device).manual_seed(0)
    n = 2 * views
    x = torch.randn(n, cfg.in_channels, window, window, device=device, generator=g).to(dtype)
    t = torch.full((n,), 500.0, device=device)
    context = torch.randn(n, 77, cfg.context_dim, device=device, generator=g).to(dtype)
    pooled = torch.randn(n, cfg.pooled_dim, device=device, generator=g).to(dtype)
    margin = window // 8
    boxes = [Window(r, r + window, c, c + window, margin)
             for r in range(0, size - window + 1, window // 2) for c in range(0, size - window + 1, window // 2)]
    boxes = (boxes * views)[:views]
    ids = time_ids((8 * size, 8 * size), boxes).repeat_interleave(2, dim=0).to(device)
    control.condition(0, image_scale, device)  # the chained upsampling happens once per scale, not per call

    def plain():
        unet(x, t, context, pooled, ids)

    def controlled():
        unet(x, t, context, pooled, ids, residuals=control(x, t, context, pooled, ids, boxes, step=0,
                                                             scale=image_scale))

    def controlnet_alone():
        control(x, t, context, pooled, ids, boxes, step=0, scale=image_scale)

    result = {"model": model, "device": str(device), "dtype": str(dtype).removeprefix("torch."), "views": views,
              "unet_rows": n, "latent": window, "condition_px": 8 * size,
              "unet_parameters": sum(p.numel() for p in unet.parameters()),
              "controlnet_parameters": sum(p.numel() for p in net.parameters())}
    for name, fn in (("uncontrolled", plain), ("controlled", controlled), ("controlnet_alone", controlnet_alone)):
        result[name] = _timed(fn, device, repeat, warmup)
    result["controlled_over_uncontrolled"] = result["controlled"]["median_s"] / result["uncontrolled"]["median_s"]
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.controlnet_call", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(CONFIGS), default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--views", type=int, default=4, help="windows per call (each twice, for CFG)")
    ap.add_argument("--image-scale", type=int, default=2, help="the scale the windows are cut at")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args(argv)
    out = run(args.model, torch.device(args.device), getattr(torch, args.dtype), args.views, args.image_scale,
              args.repeat, args.warmup)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
