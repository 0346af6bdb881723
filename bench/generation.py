"""A DemoFusion generation through minifusion's Pipeline, measured per scale: UNet evaluations, seconds,
seconds per evaluation, peak memory of denoising and of the VAE decode apart, FLOPs and the fraction of the
device's peak throughput reached while denoising; plus the share of a step that is not the UNet."""
from __future__ import annotations

import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from minifusion import memory
from minifusion.checkpoint import meta_models
from minifusion.decode import decode_flops
from minifusion.demofusion import Cond, demofusion, scale_sizes
from minifusion.memory import unet_flops
from minifusion.work import describe
from minifusion.pipeline import Pipeline

from .measure import PeakMemory, sync, timed

PROMPT = "a photograph of a lighthouse on a cliff at dawn, highly detailed"


def text_encoder_flops(pipe: Pipeline, batch: int) -> int:
    models = meta_models(pipe.configs)
    total = 0
    for c in ("text_encoder_1", "text_encoder_2"):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            models[c](torch.zeros(batch, 77, dtype=torch.long, device="meta"))
        total += counter.get_total_flops()
    return total


def run(pipe: Pipeline, height: int, width: int, steps: int, view_batch_size: int | None, seed: int = 0,
        peak_tflops: float | None = None, tiled_decode: bool = True, max_memory: int | None = None) -> dict:
    device = pipe.device
    mem = PeakMemory(device)
    stride = pipe.configs.unet.sample_size // 2
    phase: dict = {}
    decode, encode = pipe.decode, pipe.encode_prompt

    def timed_encode(*args, **kwargs):
        mem.reset()
        with timed(phase, "encode_seconds", device):
            out = encode(*args, **kwargs)
        phase["encode_memory"] = mem.read()
        mem.reset()  # scale 1's denoising starts now
        return out

    def timed_decode(latents, **kwargs):
        phase["denoise_memory"] = mem.read()
        mem.reset()
        with timed(phase, "decode_seconds", device):
            image = decode(latents, **kwargs)
        phase["decode_memory"] = mem.read()
        return image

    pipe.decode, pipe.encode_prompt = timed_decode, timed_encode
    work = describe(height, width, base_px=pipe.base_size, window=pipe.configs.unet.sample_size, steps=steps,
                    stride=stride)
    rows = []
    start = time.perf_counter()
    try:
        for scale in pipe.iter_generate(PROMPT, height=height, width=width, num_inference_steps=steps, seed=seed,
                                        view_batch_size=view_batch_size, multi_decoder=tiled_decode,
                                        max_memory=max_memory):
            st = scale.stats
            done = work[scale.scale - 1]
            flops = sum(done.steps * done.halves * g.count * unet_flops(pipe.configs.unet, *g.size) for g in done.groups)
            dec_flops = decode_flops(pipe.configs.vae, (1, pipe.configs.vae.latent_channels, *st["latent_size"]))
            row = {"scale": st["scale"], "latent_size": list(st["latent_size"]), "image_size": [*scale.image.size],
                   "view_batch_size": st["view_batch_size"], "decode_tile": st["decode_tile"],
                   "unet_evaluations": st["unet_evaluations"], "unet_calls": st["unet_calls"],
                   "windows": st["windows"], "dilated_views": st["dilated_views"],
                   "denoise_seconds": st["denoise_seconds"],
                   "seconds_per_unet_evaluation": st["denoise_seconds"] / st["unet_evaluations"],
                   "decode_seconds": phase["decode_seconds"],
                   "seconds": st["denoise_seconds"] + phase["decode_seconds"],
                   "denoise_memory": phase["denoise_memory"], "decode_memory": phase["decode_memory"],
                   "unet_flops": flops, "decode_flops": dec_flops,
                   "denoise_tflops_per_second": flops / st["denoise_seconds"] / 1e12}
            if peak_tflops:
                row["mfu"] = row["denoise_tflops_per_second"] / peak_tflops
            rows.append(row)
            mem.reset()  # the next scale's denoising
    finally:
        pipe.decode, pipe.encode_prompt = decode, encode
        mem.close()
    total_seconds = time.perf_counter() - start
    te_flops = text_encoder_flops(pipe, 2)
    unet_total = sum(r["unet_flops"] for r in rows)
    denoise_seconds = sum(r["denoise_seconds"] for r in rows)
    return {"scales": rows, "encode_seconds": phase.get("encode_seconds"), "encode_memory": phase.get("encode_memory"),
            "total_seconds": total_seconds,
            "flops": {"unet": unet_total, "decode": sum(r["decode_flops"] for r in rows), "text_encoders": te_flops,
                      "total": unet_total + sum(r["decode_flops"] for r in rows) + te_flops},
            "denoise_tflops_per_second": unet_total / denoise_seconds / 1e12,
            "mfu": unet_total / denoise_seconds / 1e12 / peak_tflops if peak_tflops else None}


def predicted_vs_measured(pipe: Pipeline, result: dict, height: int, width: int) -> list[dict]:
    """The memory model's growth over the resident weights against this run's measured growth, per scale and
    phase, at the view batch and decode tile the run used. On a CPU the full-map decode buffers live in the
    same memory, so they are part of the prediction."""
    first = result["scales"][0]
    # with nothing resident, each phase's prediction holds only the running network's weights: take them off
    weights = memory.weights_bytes(pipe.configs, pipe.dtype)
    predicted = memory.predict(pipe.configs, height, width, pipe.dtype, first["view_batch_size"],
                               first["decode_tile"], resident=())
    on_cpu = pipe.device.type == "cpu"
    rows = []
    for r, p in zip(result["scales"], predicted):
        denoise = p["denoise_bytes"] - weights["unet"]
        decode = p["decode_bytes"] - weights["vae"] + (p["host_decode_bytes"] if on_cpu else 0)
        key = "peak_rss_growth_bytes" if on_cpu else "peak_allocated_growth_bytes"
        measured_d, measured_v = r["denoise_memory"].get(key), r["decode_memory"].get(key)
        rows.append({"scale": r["scale"], "predicted_denoise_growth_bytes": denoise,
                     "measured_denoise_growth_bytes": measured_d,
                     "predicted_decode_growth_bytes": decode, "measured_decode_growth_bytes": measured_v,
                     "denoise_ratio": measured_d / denoise if measured_d else None,
                     "decode_ratio": measured_v / decode if measured_v else None})
    return rows


def max_memory_check(pipe: Pipeline, result: dict, max_memory: int) -> dict:
    """Did the run stay within the max_memory it was planned for? On CUDA: the allocator's peak reservation plus
    the CUDA context (memory.CUDA_CONTEXT_BYTES, assumed); on a CPU: the weights plus the resident set's peak
    growth (which also holds library buffers outside the model's count, see minifusion/memory/budget.py)."""
    phases = [r[k] for r in result["scales"] for k in ("denoise_memory", "decode_memory")]
    if pipe.device.type == "cuda":
        used = max(p["peak_reserved_bytes"] for p in phases) + memory.CUDA_CONTEXT_BYTES
    else:
        weights = sum(p.numel() * p.element_size() for m in (pipe.unet, pipe.vae, pipe.text_encoder_1,
                                                                pipe.text_encoder_2) for p in m.parameters())
        used = weights + max(p["peak_rss_growth_bytes"] for p in phases)
    return {"max_memory_bytes": max_memory, "used_bytes": used, "holds": used <= max_memory}


# ---------------------------------------------------------------------------------------------------------
# Non-UNet work: one DemoFusion step at the last scale with the UNet replaced by a no-op of equal output,
# against the same step with the real UNet.

class NoOpUNet:
    def __call__(self, x, t, context, pooled, time_ids):
        return torch.zeros_like(x)


class CountOps(TorchDispatchMode):
    """Counts the aten ops dispatched while `active` (each one a kernel launch on a GPU)."""

    def __init__(self):
        super().__init__()
        self.count, self.active = 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += self.active
        return func(*args, **(kwargs or {}))


def _last_step_seconds(unet, cond: Cond, cfgs, height: int, width: int, view_batch_size: int,
                       device: torch.device, counter: CountOps | None = None) -> float:
    """Seconds of step 2 of 2 at the last scale (step 1 warms up; phase 1 and the scale's set-up are excluded)."""
    marks = {}
    base, window = cfgs.unet.sample_size * 8, cfgs.unet.sample_size
    n_scales = len(scale_sizes(height, width, base))

    def progress(scale, step, steps, evals):
        if scale == n_scales:
            sync(device)
            marks[step] = time.perf_counter()
            if counter is not None:
                counter.active = step == 1

    gen = torch.Generator().manual_seed(0)
    for _ in demofusion(unet, cond, height=height, width=width, base_px=base, window=window, steps=2,
                        guidance_scale=7.5, generator=gen, view_batch_size=view_batch_size, stride=window // 2,
                        progress=progress):
        pass
    return marks[2] - marks[1]


@torch.no_grad()
def non_unet_fraction(cfgs, device: torch.device, dtype: torch.dtype, height: int, width: int, view_batch_size: int,
                      unet=None, repeat: int = 3) -> dict:
    """Share of a DemoFusion step spent outside the UNet (view gather, blur, scatter, fusion, CFG, scheduler):
    the step with a no-op UNet, and with `unet` when given. Conditioning is random: it does not change the work."""
    g = torch.Generator().manual_seed(0)
    cond = Cond(torch.randn(2, 77, cfgs.unet.context_dim, generator=g).to(device, dtype),
                torch.randn(2, cfgs.unet.pooled_dim, generator=g).to(device, dtype))

    def step(u, counter=None):
        return _last_step_seconds(u, cond, cfgs, height, width, view_batch_size, device, counter)

    noop = sorted(step(NoOpUNet()) for _ in range(repeat))
    counter = CountOps()
    with counter:
        step(NoOpUNet(), counter)
    out = {"height": height, "width": width, "noop_step_seconds": noop[len(noop) // 2],
           "non_unet_ops_per_step": counter.count}
    if unet is not None:
        real = sorted(step(unet) for _ in range(repeat))
        out["real_step_seconds"] = real[len(real) // 2]
        out["non_unet_fraction"] = out["noop_step_seconds"] / out["real_step_seconds"]
    return out
