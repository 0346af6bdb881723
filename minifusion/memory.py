"""Memory model: predicted peak bytes of a DemoFusion run per scale, and the largest settings that fit a budget.

Where the bytes go, per scale:

    weights     the networks resident on the device (minifusion.load: all four on a CPU; the UNet and the
                VAE on a GPU, where the text encoders wait in host memory) plus the one running
    encoding    (before scale 1) both text encoders on the device, with the activations of one batch of prompts
    denoising   max over UNet calls of  sampler state alive at the call + UNet activations of the call
                UNet activations of n samples at h x w latents = fixed + n * (per_sample + per_sample_pixel * h * w)
                (a call is 2 x min(view_batch_size, views left) samples: every view twice for CFG)
    decoding    one tile's working set + keys and values of the mid attention over the whole latent map;
                decode.py keeps the full feature maps on the host, reported apart as host bytes

Every number comes from running the code, not from formulas written here: `MemoryTracker` (a
TorchDispatchMode) adds up the bytes of every tensor storage created inside it and subtracts them when the
storage dies, so its peak is the peak of live tensor bytes, what torch.cuda.max_memory_allocated reports on a
GPU. The runs happen on the meta device, which costs no memory or time at any size: the allocation sequence
is the same as on the CPU once attention takes the CPU's fused kernel there too (on meta,
scaled_dot_product_attention would fall back to the math path and materialise every score, which no real
device does). tests/test_memory.py checks meta against a real CPU run, and bench/ against resident-set growth.

On a GPU the caching allocator adds rounding and fragmentation, cuDNN/cuBLAS workspaces (counted by the
allocator) are not in the prediction, and the CUDA context sits outside torch's count: `required_bytes` adds
FRAGMENTATION and CUDA_CONTEXT_BYTES for all that (assumed, not measured here). On a CPU the resident set
grows by more than the live tensor bytes, by a few tens of MiB that do not grow with the image: buffers
inside oneDNN's kernels that never pass torch's dispatcher (blocked-layout copies of a layer's weights,
scratchpads) and small blocks on the malloc heap. One SDXL UNet call in bf16, batch 2: 20 MiB of tensors and
70 MiB of growth at 32^2 latents; 79 and 108 MiB at 64^2 (a process's first call adds 30 MiB of one-time
setup). Against gigabytes of activations at DemoFusion's sizes that is noise.

`plan` picks view_batch_size and decode tile under a budget; `estimate` gives the work of a request (UNet
evaluations, FLOPs, peak bytes, and seconds from a measured seconds-per-evaluation).
"""
from __future__ import annotations

import math
import re
import weakref
from collections.abc import Collection
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from .checkpoint import COMPONENTS, Configs, meta_models
from .config import TextConfig, UNetConfig, VAEConfig
from .decode import decode_flops, decode_tiled
from .demofusion import Cond, demofusion, local_windows, scale_sizes
from .models.clip import TextEncoder
from .models.unet import UNet
from .models.vae import VAE

GiB = 1 << 30
FRAGMENTATION = 0.10  # caching-allocator rounding and fragmentation, as a fraction of live tensor bytes
CUDA_CONTEXT_BYTES = GiB // 2  # CUDA context and loaded kernel images: device memory outside torch's count
VIEW_BATCHES = (64, 32, 16, 8, 4, 2, 1)
DECODE_TILES = (1024, 512, 384, 256, 192, 128, 96, 64)


class MemoryTracker(TorchDispatchMode):
    """Live and peak bytes of the tensor storages created while active. An output the op's schema marks as an
    alias of an input (a view, an in-place or out= result) adds nothing. Storages created by `host_ops` (e.g.
    torch.empty, which decode.py uses only for its full-map buffers) are counted apart, as host bytes."""

    def __init__(self, host_ops=()):
        super().__init__()
        self.host_ops = set(host_ops)
        self.live = self.peak = self.live_host = self.peak_host = self.peak_total = 0
        self._seen: set[int] = set()

    def _free(self, key: int, nbytes: int, host: bool) -> None:
        self._seen.discard(key)
        if host:
            self.live_host -= nbytes
        else:
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        host = func in self.host_ops
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for ret, value in zip(func._schema.returns, outs):
            if ret.alias_info is not None:  # a view of an input or the input itself (in-place, out=)
                continue
            for t in (value if isinstance(value, (tuple, list)) else (value,)):
                if not isinstance(t, torch.Tensor):
                    continue
                st = t.untyped_storage()
                key = id(st)
                if key in self._seen:
                    continue
                n = st.nbytes()
                self._seen.add(key)
                if host:
                    self.live_host += n
                else:
                    self.live += n
                weakref.finalize(st, self._free, key, n, host)
        self.peak, self.peak_host = max(self.peak, self.live), max(self.peak_host, self.live_host)
        self.peak_total = max(self.peak_total, self.live + self.live_host)
        return out


class CPUAttentionOnMeta(TorchFunctionMode):
    """On meta tensors, run attention as the CPU's fused flash kernel (its meta function gives the output and
    log-sum-exp shapes), so a meta run allocates what a CPU run allocates."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and args[0].is_meta:
            q, k, v = args[:3]
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, 0.0, kwargs.get("is_causal", False), attn_mask=kwargs.get("attn_mask"),
                scale=kwargs.get("scale"))[0]
        return func(*args, **kwargs)


def _unet_inputs(cfg: UNetConfig, n: int, h: int, w: int, device, dtype):
    return (torch.zeros(n, cfg.in_channels, h, w, device=device),
            torch.full((n,), 500.0, device=device),
            torch.zeros(n, 77, cfg.context_dim, device=device, dtype=dtype),
            torch.zeros(n, cfg.pooled_dim, device=device, dtype=dtype),
            torch.zeros(n, 6, device=device))


@lru_cache(maxsize=8)
def _meta_unet(cfg: UNetConfig, dtype: torch.dtype) -> UNet:
    with torch.device("meta"):
        return UNet(cfg).to(dtype).eval().requires_grad_(False)


@torch.no_grad()
def unet_activation_bytes(unet: UNet | UNetConfig, n: int, h: int, w: int, dtype: torch.dtype | None = None) -> int:
    """Peak bytes one UNet call with n samples at h x w latents allocates, its output included (its inputs are
    the sampler's, counted there). A config runs on the meta device; a module runs where it lives (on CUDA, measured by
    the allocator; elsewhere by MemoryTracker)."""
    if isinstance(unet, UNetConfig):
        unet = _meta_unet(unet, dtype or torch.float32)
    device, dtype = unet.time_embed[0].weight.device, unet.time_embed[0].weight.dtype
    inputs = _unet_inputs(unet.cfg, n, h, w, device, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        unet(*inputs)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with CPUAttentionOnMeta(), MemoryTracker() as tracker:
        unet(*inputs)
    return tracker.peak


@dataclass(frozen=True)
class ActivationProfile:
    """UNet activation bytes of one call, linear in the samples and, per sample, in the latent pixels."""
    fixed: int
    per_sample: int
    per_sample_pixel: float

    def bytes(self, n: int, h: int, w: int) -> int:
        return int(self.fixed + n * (self.per_sample + self.per_sample_pixel * h * w))


def activation_profile(unet: UNet | UNetConfig, dtype: torch.dtype | None = None,
                       sizes: tuple[int, int] | None = None) -> ActivationProfile:
    """Measure one view, then two, at latent size a (default the native window), and one view at size b (default
    half of it); solve for the three coefficients. A config is measured on the meta device in `dtype`."""
    cfg = unet if isinstance(unet, UNetConfig) else unet.cfg
    sizes = sizes or (cfg.sample_size, cfg.sample_size // 2)
    if isinstance(unet, UNetConfig):
        return _profile_of_config(cfg, dtype or torch.float32, sizes)
    return _profile(lambda n, s: unet_activation_bytes(unet, n, s, s), sizes)


@lru_cache(maxsize=32)
def _profile_of_config(cfg: UNetConfig, dtype: torch.dtype, sizes: tuple[int, int]) -> ActivationProfile:
    return _profile(lambda n, s: unet_activation_bytes(cfg, n, s, s, dtype), sizes)


def _profile(measure, sizes: tuple[int, int]) -> ActivationProfile:
    a, b = sizes
    one_a, two_a, one_b = measure(1, a), measure(2, a), measure(1, b)
    sample_a = two_a - one_a  # what one more view costs at size a
    per_pixel = (one_a - one_b) / (a * a - b * b)
    return ActivationProfile(fixed=one_a - sample_a, per_sample=int(sample_a - per_pixel * a * a),
                             per_sample_pixel=per_pixel)


# ---------------------------------------------------------------------------------------------------------

def component_dtypes(dtype: torch.dtype) -> dict[str, torch.dtype]:
    # minifusion.load runs the VAE in fp32 when the rest is fp16 (SDXL's VAE overflows in fp16)
    return {"unet": dtype, "vae": torch.float32 if dtype == torch.float16 else dtype,
            "text_encoder_1": dtype, "text_encoder_2": dtype}


@lru_cache(maxsize=8)
def _parameter_counts(cfgs: Configs) -> dict[str, int]:
    return {c: sum(p.numel() for p in m.parameters()) for c, m in meta_models(cfgs).items()}


def weights_bytes(cfgs: Configs, dtype: torch.dtype) -> dict[str, int]:
    dtypes = component_dtypes(dtype)
    return {c: n * dtypes[c].itemsize for c, n in _parameter_counts(cfgs).items()}


class _NoOpUNet:
    """Stands in for the UNet in a meta run of the sampler: notes the live bytes and batch of every call."""

    def __init__(self, tracker: MemoryTracker):
        self.tracker, self.calls = tracker, []

    def __call__(self, x, t, context, pooled, time_ids):
        self.calls.append((self.tracker.live, x.shape[0], x.shape[-2], x.shape[-1]))
        return torch.zeros_like(x)


@lru_cache(maxsize=64)
def sampler_calls(cfg: UNetConfig, height: int, width: int, view_batch_size: int, stride: int, dtype: torch.dtype
                  ) -> list[list[tuple[int, int, int, int]]]:
    """Per scale, every distinct UNet call of one step: (sampler bytes live at the call, samples, h, w), from a
    two-step meta run of `demofusion` (its state does not grow with the step count)."""
    with CPUAttentionOnMeta(), MemoryTracker() as tracker:
        unet = _NoOpUNet(tracker)
        cond = Cond(torch.zeros(2, 77, cfg.context_dim, device="meta", dtype=dtype),
                    torch.zeros(2, cfg.pooled_dim, device="meta", dtype=dtype))
        per_scale, start = [], 0
        for _ in demofusion(unet, cond, height=height, width=width, base_px=cfg.sample_size * 8,
                            window=cfg.sample_size, steps=2, guidance_scale=7.5, stride=stride,
                            view_batch_size=view_batch_size, jitter=False):
            per_scale.append(sorted(set(unet.calls[start:])))
            start = len(unet.calls)
    return per_scale


@lru_cache(maxsize=8)
def text_activation_bytes(cfg: TextConfig, dtype: torch.dtype) -> int:
    """Peak bytes one text encoder allocates encoding two prompts (what Pipeline.encode_prompt runs at once)."""
    with torch.device("meta"):
        encoder = TextEncoder(cfg).to(dtype)
        ids = torch.zeros(2, cfg.max_length, dtype=torch.long)
    with torch.no_grad(), CPUAttentionOnMeta(), MemoryTracker() as tracker:
        encoder(ids)
    return tracker.peak


def _kv_bytes(cfg: VAEConfig, h: int, w: int, dtype: torch.dtype) -> int:
    return 2 * cfg.channels[-1] * h * w * dtype.itemsize


@lru_cache(maxsize=64)
def _decode_sim(cfg: VAEConfig, h: int, w: int, dtype: torch.dtype, tile: int | None) -> tuple[int, int]:
    with torch.device("meta"):
        vae = VAE(cfg).to(dtype)
        z = torch.zeros(1, cfg.latent_channels, h, w, dtype=dtype)
    with torch.no_grad(), CPUAttentionOnMeta(), MemoryTracker(host_ops={torch.ops.aten.empty.memory_format}) as tr:
        decode_tiled(vae, z, tile=tile, storage="meta") if tile else vae.decode(z)
    return tr.peak, tr.peak_host


def decode_bytes(cfg: VAEConfig, h: int, w: int, dtype: torch.dtype, tile: int | None = 256) -> dict[str, int]:
    """Device and host peak bytes of decoding h x w latents (weights not included): `decode_tiled` with that
    tile (pixels of each stage's own map), or one untiled `vae.decode` (tile None; all of it on the device).

    A tiled decode's device working set depends on the tile, not the image, except for the mid attention's keys
    and values over the whole latent map. So it is measured at latents no larger than the tile (where every
    stage already works on tiles at least as large as the real ones) and the keys and values are scaled up to
    the real map: exact when the peak is the attention stage, an upper bound otherwise. The host holds full
    feature maps (a ResnetBlock's input, middle and output at once): scaled by area from the same run, exact."""
    if tile is None:
        device, host = _decode_sim(cfg, h, w, dtype, None)
        return {"device": device, "host": host}
    scale = 2 ** (len(cfg.ch_mult) - 1)
    tile = min(tile, scale * max(h, w))  # a tile covering the largest map: every larger one decodes alike
    sh, sw = min(h, tile), min(w, tile)
    device, host = _decode_sim(cfg, sh, sw, dtype, tile)
    device += _kv_bytes(cfg, h, w, dtype) - _kv_bytes(cfg, sh, sw, dtype)
    return {"device": device, "host": int(host * (h * w) / (sh * sw))}


# ---------------------------------------------------------------------------------------------------------

def predict(cfgs: Configs, height: int, width: int, dtype: torch.dtype = torch.float16, view_batch_size: int = 16,
            decode_tile: int | None = 256, stride: int | None = None, resident: Collection[str] = COMPONENTS
            ) -> list[dict]:
    """Predicted peak live tensor bytes on the compute device per scale (base scale first), denoising and decoding
    apart: what torch.cuda.max_memory_allocated reports for each. `resident`: the networks that stay on the device
    throughout (default all four; () when each visits the device only while it runs)."""
    stride = stride or cfgs.unet.sample_size // 2
    wb = weights_bytes(cfgs, dtype)
    kept = sum(wb[c] for c in set(resident))
    text = ("text_encoder_1", "text_encoder_2")
    during_encode = kept + sum(wb[c] for c in text if c not in resident) + sum(
        text_activation_bytes(getattr(cfgs, c), dtype) for c in text)  # both encoders' peaks: an upper bound
    during_denoise = kept + (0 if "unet" in resident else wb["unet"])
    during_decode = kept + (0 if "vae" in resident else wb["vae"])
    profile = activation_profile(cfgs.unet, dtype)
    calls = sampler_calls(cfgs.unet, height, width, view_batch_size, stride, dtype)
    sizes = scale_sizes(height, width, cfgs.unet.sample_size * 8)
    out = []
    for s, ((h, w), scale_calls) in enumerate(zip(sizes, calls), start=1):
        denoise = during_denoise + max(live + profile.bytes(n, ch, cw) for live, n, ch, cw in scale_calls)
        dec = decode_bytes(cfgs.vae, h, w, component_dtypes(dtype)["vae"], decode_tile)
        out.append({"scale": s, "latent_size": (h, w), "max_unet_batch": max(n for _, n, _, _ in scale_calls),
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
         may_offload: bool = False, view_batch_sizes=VIEW_BATCHES, decode_tiles=DECODE_TILES) -> MemoryPlan:
    """The largest view_batch_size and decode tile whose predicted need (`needs`) stays within max_memory_bytes,
    each chosen on its own as denoising and decoding never overlap (a tile of None, an untiled decode, counts
    as larger than any). With `resident` kept on the device; if nothing fits that way and `may_offload`, with
    each network on the device only while it runs (the UNet's weights leave for the decode). ValueError, naming
    the least memory that would do, when even the smallest view batch and tile do not fit."""
    vbs = sorted(set(view_batch_sizes), reverse=True)
    tiles = sorted(set(decode_tiles), key=lambda t: -math.inf if t is None else -t)
    for kept in (tuple(resident), ()) if may_offload and resident else (tuple(resident),):
        def need(vb, tile):
            return needs(predict(cfgs, height, width, dtype, vb, tile, stride, kept), device_type)

        least = max(need(vbs[-1], tiles[-1]))
        if least <= max_memory_bytes:
            vb = next(v for v in vbs if need(v, tiles[-1])[0] <= max_memory_bytes)
            tile = next(t for t in tiles if need(vbs[-1], t)[1] <= max_memory_bytes)
            return MemoryPlan(vb, tile, kept)
    raise ValueError(f"{width}x{height} does not fit in {max_memory_bytes / GiB:.2f} GiB of {device_type} memory "
                     f"even with view_batch_size {vbs[-1]} and decode tile {tiles[-1]}: it needs at least "
                     f"{least / GiB:.2f} GiB")


def parse_size(text: str | int | float, unit: int = 1) -> int:
    """Bytes from 8589934592, "8GiB", "8 GB", "512MiB" or, with unit=GiB, a plain 8 or "8". Binary units
    throughout (GB is read as GiB, as memory is sold). ValueError if it is not a positive size."""
    units = {"": unit, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
             "mib": 1 << 20, "g": GiB, "gb": GiB, "gib": GiB, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        number, suffix = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
        if m is None or m.group(2) not in units:
            raise ValueError(f"{text!r} is not a memory size; write e.g. 8GiB, 12 GB or 512MiB")
        number, suffix = float(m.group(1)), m.group(2)
    size = number * units[suffix]
    if not math.isfinite(size) or size < 1:
        raise ValueError(f"{text!r} is not a memory size; it must be positive, e.g. 8GiB")
    return int(size)


@lru_cache(maxsize=64)
def unet_flops(cfg: UNetConfig, h: int, w: int) -> int:
    """FLOPs of one UNet evaluation (one sample) at h x w latents, counted on the meta device."""
    unet = _meta_unet(cfg, torch.float32)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(*_unet_inputs(cfg, 1, h, w, "meta", torch.float32))
    return counter.get_total_flops()


def unet_views(cfg: UNetConfig, height: int, width: int, stride: int | None = None) -> list[list[tuple[int, int, int]]]:
    """Per scale, the UNet views one step evaluates (each twice, for CFG): [(latent h, latent w, how many)]."""
    window = cfg.sample_size
    stride = stride or window // 2
    out = []
    for s, (h, w) in enumerate(scale_sizes(height, width, window * 8), start=1):
        if s == 1:
            out.append([(h, w, 1)])
        else:
            out.append([(min(window, h), min(window, w), len(local_windows(h, w, window, stride))),
                        (-(-h // s), -(-w // s), s * s)])
    return out


def estimate(cfgs: Configs, height: int, width: int, steps: int = 50, view_batch_size: int = 16,
             dtype: torch.dtype = torch.float16, decode_tile: int | None = 256, stride: int | None = None,
             seconds_per_unet_eval: float | None = None, resident: Collection[str] = COMPONENTS) -> dict:
    """The cost of a request before running it: peak bytes (max over scales), UNet evaluations, FLOPs (UNet
    plus one decode per scale) and, given a measured seconds per UNet evaluation at the native window size,
    seconds of the UNet evaluations (bench/ measures what the rest of a step adds)."""
    evals = flops = 0
    for views in unet_views(cfgs.unet, height, width, stride):
        for h, w, n in views:
            evals += 2 * n * steps
            flops += 2 * n * steps * unet_flops(cfgs.unet, h, w)
    for h, w in scale_sizes(height, width, cfgs.unet.sample_size * 8):
        flops += decode_flops(cfgs.vae, (1, cfgs.vae.latent_channels, h, w))
    rows = predict(cfgs, height, width, dtype, view_batch_size, decode_tile, stride, resident)
    out = {"peak_bytes": max(r["peak_bytes"] for r in rows), "unet_evals": evals, "flops": flops, "scales": rows}
    if seconds_per_unet_eval is not None:
        out["seconds"] = evals * seconds_per_unet_eval
    return out
