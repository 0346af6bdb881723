"""Budgets: peak bytes per scale (`predict`), the largest settings that fit (`plan`), a request's work (`estimate`).

On a GPU the caching allocator adds rounding and fragmentation, cuDNN/cuBLAS workspaces (counted by the
allocator) are not in the prediction, and the CUDA context sits outside torch's count: `required_bytes` adds
FRAGMENTATION and CUDA_CONTEXT_BYTES for all that (assumed, not measured here). On a CPU the resident set
grows by more than the live tensor bytes, by a few tens of MiB that do not grow with the image: buffers
inside oneDNN's kernels that never pass torch's dispatcher (blocked-layout copies of a layer's weights,
scratchpads) and small blocks on the malloc heap. One SDXL UNet call in bf16, batch 2: 20 MiB of tensors and
70 MiB of growth at 32^2 latents; 79 and 108 MiB at 64^2 (a process's first call adds 30 MiB of one-time
setup). Against gigabytes of activations at DemoFusion's sizes that is noise.
"""
from __future__ import annotations

import math
from collections.abc import Collection
from typing import NamedTuple

import torch

from ..checkpoint import COMPONENTS, Configs
from ..demofusion import scale_sizes
from ..models.controlnet import ControlNetConfig
from .activations import (_controlled_profile_of_config, _profile_of_config, _text_peak, activation_profile,
                          condition_bytes, text_activation_bytes)
from .cache import _dot
from .decoding import _decode_fit, decode_bytes
from .flops import _decode_flop_fit, _unet_flop_fit, unet_flops
from .sampler_state import _sampler_bytes, _sampler_fit
from .weights import (_controlnet_parameters, _parameter_counts, component_dtypes, controlnet_weights_bytes,
                      weights_bytes)
from ..settings import GiB
from ..views import halves as cfg_halves
from ..work import describe

FRAGMENTATION = 0.10  # caching-allocator rounding and fragmentation, as a fraction of live tensor bytes
CUDA_CONTEXT_BYTES = GiB // 2  # CUDA context and loaded kernel images: device memory outside torch's count
VIEW_BATCHES = (64, 32, 16, 8, 4, 2, 1)
DECODE_TILES = (1024, 512, 384, 256, 192, 128, 96, 64)


def predict(cfgs: Configs, height: int, width: int, dtype: torch.dtype = torch.float16, view_batch_size: int = 16,
            decode_tile: int | None = 256, stride: int | None = None, resident: Collection[str] = COMPONENTS,
            controlnets: tuple[ControlNetConfig, ...] = (), vae_dtype: torch.dtype | None = None,
            halves: int = 2) -> list[dict]:
    """Predicted peak live tensor bytes on the compute device per scale (base scale first), denoising and decoding
    apart: what torch.cuda.max_memory_allocated reports for each. `resident`: the networks that stay on the device
    throughout (default all four; () when each visits the device only while it runs). `controlnets`: every UNet
    call steered by these, whose weights go where the UNet's go. `vae_dtype`: as component_dtypes. halves: UNet
    rows per view (work.ScaleWork.halves: 1 where guidance is off), the UNet's batch; the sampler's own bytes were
    fitted with both halves, an upper bound with one."""
    stride = stride or cfgs.unet.sample_size // 2
    wb = weights_bytes(cfgs, dtype, vae_dtype)
    control = controlnet_weights_bytes(controlnets, dtype)
    kept = sum(wb[c] for c in set(resident)) + (control if "unet" in resident else 0)
    text = ("text_encoder_1", "text_encoder_2")
    during_encode = kept + sum(wb[c] for c in text if c not in resident) + sum(
        text_activation_bytes(getattr(cfgs, c), dtype) for c in text)  # both encoders' peaks: an upper bound
    during_denoise = kept + (0 if "unet" in resident else wb["unet"] + control)
    during_decode = kept + (0 if "vae" in resident else wb["vae"])
    profile = activation_profile(cfgs.unet, dtype, controlnets=controlnets)
    sizes = scale_sizes(height, width, cfgs.unet.sample_size * 8)
    upscale = 2 ** (len(cfgs.vae.ch_mult) - 1)
    out = []
    for s, (h, w) in enumerate(sizes, start=1):
        calls = _sampler_bytes(cfgs.unet, dtype, sizes, s, stride, view_batch_size)
        denoise = during_denoise + condition_bytes(controlnets, h, w) + max(
            live + profile.bytes(n * halves // 2, ch, cw) for live, n, ch, cw in calls)
        dec = decode_bytes(cfgs.vae, h, w, component_dtypes(dtype, vae_dtype)["vae"], decode_tile)
        out.append({"scale": s, "latent_size": (h, w), "image_size": (upscale * h, upscale * w),
                    "max_unet_batch": max(n * halves // 2 for _, n, _, _ in calls),
                    "denoise_bytes": denoise, "decode_bytes": during_decode + dec["device"],
                    "peak_bytes": max(denoise, during_decode + dec["device"]), "host_decode_bytes": dec["host"]})
    out[0]["encode_bytes"] = during_encode  # the prompts are encoded once, before scale 1
    out[0]["peak_bytes"] = max(out[0]["peak_bytes"], during_encode)
    return out


def required_bytes(peak_bytes: int, device_type: str = "cuda") -> int:
    """Device memory a predicted peak of live tensor bytes needs: on CUDA plus allocator fragmentation and the
    context outside torch's count; elsewhere the live bytes themselves."""
    if device_type != "cuda":
        return peak_bytes
    return int(peak_bytes * (1 + FRAGMENTATION)) + CUDA_CONTEXT_BYTES


def needs(rows: list[dict], device_type: str = "cuda") -> tuple[int, int]:
    """(encoding and denoising, decoding) memory `predict`'s rows need on a device of that type. Off CUDA the
    decode's full feature maps (host bytes) live in the same memory as everything else, so they count too."""
    host = 0 if device_type == "cuda" else max(r["host_decode_bytes"] for r in rows)
    first = max(max(r["denoise_bytes"] for r in rows), max(r.get("encode_bytes", 0) for r in rows))
    return (required_bytes(first, device_type),
            required_bytes(max(r["decode_bytes"] for r in rows) + host, device_type))


class MemoryPlan(NamedTuple):
    view_batch_size: int
    decode_tile: int | None  # None: decode in one piece
    resident: tuple[str, ...]  # the networks kept on the device throughout; the others visit it only to run


def plan(max_memory_bytes: int, cfgs: Configs, height: int, width: int, dtype: torch.dtype = torch.float16,
         device_type: str = "cuda", stride: int | None = None, resident: Collection[str] = COMPONENTS,
         may_offload: bool = False, view_batch_sizes=VIEW_BATCHES, decode_tiles=DECODE_TILES,
         controlnets: tuple[ControlNetConfig, ...] = (), vae_dtype: torch.dtype | None = None) -> MemoryPlan:
    """The largest view_batch_size and decode tile whose predicted need (`needs`) stays within max_memory_bytes,
    each chosen on its own as denoising and decoding never overlap (a tile of None, an untiled decode, counts
    as larger than any). With `resident` kept on the device; if nothing fits that way and `may_offload`, with
    each network on the device only while it runs (the UNet's weights leave for the decode). ValueError, naming
    the least memory that would do, when even the smallest view batch and tile do not fit. `controlnets` and
    `vae_dtype`: as `predict`."""
    vbs = sorted(set(view_batch_sizes), reverse=True)
    tiles = sorted(set(decode_tiles), key=lambda t: -math.inf if t is None else -t)
    for kept in (tuple(resident), ()) if may_offload and resident else (tuple(resident),):
        def need(vb, tile):
            return needs(predict(cfgs, height, width, dtype, vb, tile, stride, kept, controlnets, vae_dtype),
                         device_type)

        least = max(need(vbs[-1], tiles[-1]))
        if least <= max_memory_bytes:
            vb = next(v for v in vbs if need(v, tiles[-1])[0] <= max_memory_bytes)
            tile = next(t for t in tiles if need(vbs[-1], t)[1] <= max_memory_bytes)
            return MemoryPlan(vb, tile, kept)
    raise ValueError(f"{width}x{height} does not fit in {max_memory_bytes / GiB:.2f} GiB of {device_type} memory "
                     f"even with view_batch_size {vbs[-1]} and decode tile {tiles[-1]}: it needs at least "
                     f"{least / GiB:.2f} GiB")


def estimate(cfgs: Configs, height: int, width: int, steps: int = 50, view_batch_size: int = 16,
             dtype: torch.dtype = torch.float16, decode_tile: int | None = 256, stride: int | None = None,
             seconds_per_unet_eval: float | None = None, resident: Collection[str] = COMPONENTS,
             controlnets: tuple[ControlNetConfig, ...] = (), vae_dtype: torch.dtype | None = None,
             guidance_scale: float = 7.5, strength: float = 1.0) -> dict:
    """The cost of a request before running it: peak bytes (max over scales), UNet evaluations, FLOPs (UNet
    plus one decode per scale) and, given a measured seconds per UNet evaluation at the native window size,
    seconds of the UNet evaluations (bench/ measures what the rest of a step adds). `scales`: predict's rows,
    each with its own unet_evals and flops, the work of each from minifusion.work.describe (guidance <= 1: one
    half; strength: the steps scales >= 2 run). `controlnets`: their memory as `predict` counts it (their FLOPs
    are not counted); `vae_dtype`: as `predict`."""
    halves = cfg_halves(guidance_scale)
    rows = predict(cfgs, height, width, dtype, view_batch_size, decode_tile, stride, resident, controlnets, vae_dtype,
                   halves)
    decode = _decode_flop_fit(cfgs.vae)
    work = describe(height, width, base_px=cfgs.unet.sample_size * 8, window=cfgs.unet.sample_size, steps=steps,
                    stride=stride, view_batch=view_batch_size, halves=halves, strength=strength)
    for row, scale in zip(rows, work):
        h, w = row["latent_size"]
        row["unet_evals"] = scale.unet_evals
        row["flops"] = (sum(scale.steps * halves * g.count * unet_flops(cfgs.unet, *g.size) for g in scale.groups)
                        + _dot(decode, [1, h * w, (h * w) ** 2]))
    out = {"peak_bytes": max(r["peak_bytes"] for r in rows), "unet_evals": sum(r["unet_evals"] for r in rows),
           "flops": sum(r["flops"] for r in rows), "scales": rows}
    if seconds_per_unet_eval is not None:
        out["seconds"] = out["unet_evals"] * seconds_per_unet_eval
    return out


def measured(cfgs: Configs, dtype: torch.dtype = torch.float16, controlnets: tuple[ControlNetConfig, ...] = (),
             vae_dtype: torch.dtype | None = None) -> bool:
    """Whether `estimate` and `plan` for this configuration, dtype, ControlNets and VAE dtype will answer from
    coefficients already measured (in this process or in cache_dir()), rather than measure them first (seconds;
    say so first)."""
    sizes = (cfgs.unet.sample_size, cfgs.unet.sample_size // 2)
    profile = (_controlled_profile_of_config.known(cfgs.unet, tuple(controlnets), dtype, sizes) if controlnets
               else _profile_of_config.known(cfgs.unet, dtype, sizes))
    return all([_parameter_counts.known(cfgs), _text_peak.known(cfgs.text_encoder_1, dtype),
                _text_peak.known(cfgs.text_encoder_2, dtype), profile, _sampler_fit.known(cfgs.unet, dtype),
                _decode_fit.known(cfgs.vae, component_dtypes(dtype, vae_dtype)["vae"]),
                _unet_flop_fit.known(cfgs.unet), _decode_flop_fit.known(cfgs.vae),
                *(_controlnet_parameters.known(c) for c in controlnets)])
