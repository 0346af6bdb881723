"""Memory model: predicted peak bytes of a DemoFusion run per scale, and the largest settings that fit a budget.

Where the bytes go, per scale:

    weights     the networks resident on the device (minifusion.load: all four on a CPU; the UNet and the
                VAE on a GPU, where the text encoders wait in host memory) plus the one running
    encoding    (before scale 1) both text encoders on the device, with the activations of one batch of prompts
    denoising   max over UNet calls of  sampler state alive at the call + UNet activations of the call
                UNet activations of n samples at h x w latents = fixed + n * (per_sample + per_sample_pixel * h * w)
                (a call is 2 x min(view_batch_size, views left) samples: every view twice for CFG)
    decoding    max over decode_tiled's stages of one tile's working set + the stage's map-wide device buffers
                (the mid attention's keys and values); decode.py keeps the full feature maps on the host,
                reported apart as host bytes

Every number comes from running the code, not from formulas written here: `MemoryTracker` (a
TorchDispatchMode) adds up the bytes of every tensor storage created inside it and subtracts them when the
storage dies, so its peak is the peak of live tensor bytes, what torch.cuda.max_memory_allocated reports on a
GPU. The runs happen on the meta device, which costs no memory at any size: the allocation sequence is the same
as on the CPU once attention takes the CPU's fused kernel there too (on meta, scaled_dot_product_attention would
fall back to the math path and materialise every score, which no real device does). tests/test_memory.py
checks meta against a real CPU run, and bench/ against resident-set growth.

A meta run still costs time per op (about 0.8 s for one forward of SDXL's UNet, and a run of the sampler or of
the tiled decode takes time in proportion to its views and tiles: minutes at 16384 px). So what is measured are
coefficients that do not depend on the size, once per configuration and dtype, on small runs; a prediction at
any size is arithmetic on them:

    UNet activations  ActivationProfile: one and two views at the native window, one at half of it
    sampler state     the bytes live at a UNet call are linear in the step's geometry (`_call_features`: the
                      latent area, phase 1's and the previous scale's, the windows' zero-padded frame, the stacked
                      local and dilated views, the views already denoised in the step, the call's views and
                      batch); fitted to every call of the second step of runs of `demofusion` at small sizes
                      with a no-op UNet (from the second step on, the previous step's predictions are alive too)
    tiled decode      per stage of decode_tiled: bytes bilinear in the tile's sides where the stage is one tile,
                      its map-wide buffers, the bytes each tile keeps, and the halo a tile reads beyond itself,
                      from runs where every stage is one tile and runs where each stage computes one interior
                      tile only (decode.py's `share` seam picks the tiles). Exact where every stage is one tile;
                      otherwise each stage's largest tile with the widest halo: an upper bound, a few percent over
    FLOPs             UNet: each op of a forward at two sizes tells the level it runs at and whether it grows
                      with that level's pixels or their square; decode: a + b hw + c (hw)^2
The coefficients stay in memory and on disk (`cache_dir()`, keyed by the configuration, the dtype, torch's
version and minifusion's source), so a process measures a configuration once per machine (SDXL's: 5-15 s on a
2-core CPU; `measured` says whether that is still to come) and every later check decides in milliseconds.

On a GPU the caching allocator adds rounding and fragmentation, cuDNN/cuBLAS workspaces (counted by the
allocator) are not in the prediction, and the CUDA context sits outside torch's count: `required_bytes` adds
FRAGMENTATION and CUDA_CONTEXT_BYTES for all that (assumed, not measured here). On a CPU the resident set
grows by more than the live tensor bytes, by a few tens of MiB that do not grow with the image: buffers
inside oneDNN's kernels that never pass torch's dispatcher (blocked-layout copies of a layer's weights,
scratchpads) and small blocks on the malloc heap. One SDXL UNet call in bf16, batch 2: 20 MiB of tensors and
70 MiB of growth at 32^2 latents; 79 and 108 MiB at 64^2 (a process's first call adds 30 MiB of one-time
setup). Against gigabytes of activations at DemoFusion's sizes that is noise.

`plan` picks view_batch_size and decode tile under a budget; `estimate` gives the work of a request (scales,
UNet evaluations, FLOPs, peak bytes, and seconds from a measured seconds-per-evaluation).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import weakref
from collections.abc import Collection
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from .checkpoint import COMPONENTS, Configs, meta_models
from .config import TextConfig, UNetConfig, VAEConfig
from .controlnet import Control, Unit, condition_size
from .decode import Alone, _spans, decode_flops, decode_tiled
from .demofusion import demofusion, local_windows, scale_sizes, window_margin
from .models.clip import TextEncoder
from .models.controlnet import ControlNet, ControlNetConfig
from .models.unet import UNet
from .models.vae import VAE
from .views import Cond, Window

GiB = 1 << 30
FRAGMENTATION = 0.10  # caching-allocator rounding and fragmentation, as a fraction of live tensor bytes
CUDA_CONTEXT_BYTES = GiB // 2  # CUDA context and loaded kernel images: device memory outside torch's count
VIEW_BATCHES = (64, 32, 16, 8, 4, 2, 1)
DECODE_TILES = (1024, 512, 384, 256, 192, 128, 96, 64)
HOST_MAPS = torch.ops.aten.empty.memory_format  # torch.empty: decode.py's full-map buffers, on the host
MAP_BUFFERS = torch.ops.aten.empty_strided.default  # torch.empty_strided: its map-wide device buffers (keys, values)


class MemoryTracker(TorchDispatchMode):
    """Live and peak bytes of the tensor storages created while active. An output the op's schema marks as an
    alias of an input (a view, an in-place or out= result) adds nothing. Storages created by `host_ops` (e.g.
    torch.empty, which decode.py uses only for its full-map buffers) are counted apart, as host bytes."""

    def __init__(self, host_ops=()):
        super().__init__()
        self.host_ops = set(host_ops)
        self.live = self.peak = self.live_host = self.peak_host = self.peak_total = 0
        self._seen: dict[int, int] = {}  # storage id -> bytes

    def _free(self, key: int, nbytes: int, host: bool) -> None:
        self._seen.pop(key, None)
        if host:
            self.live_host -= nbytes
        else:
            self.live -= nbytes

    def _created(self, key: int, func, tensor: torch.Tensor) -> None:
        """Told of every storage that starts being counted (subclasses tag them)."""

    def _after(self, func, out) -> None:
        """Told after every op, once the live counts include its outputs."""

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
                self._seen[key] = n
                if host:
                    self.live_host += n
                else:
                    self.live += n
                weakref.finalize(st, self._free, key, n, host)
                self._created(key, func, t)
        self.peak, self.peak_host = max(self.peak, self.live), max(self.peak_host, self.live_host)
        self.peak_total = max(self.peak_total, self.live + self.live_host)
        self._after(func, out)
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


# ---------------------------------------------------------------------------------------------------------
# Measured once per configuration: kept in the process and in a JSON file per measurement.

def cache_dir() -> Path:
    """Where measured coefficients are kept: $MINIFUSION_CACHE, else $XDG_CACHE_HOME/minifusion, else
    ~/.cache/minifusion (a subfolder memory/)."""
    root = os.environ.get("MINIFUSION_CACHE")
    if not root:
        try:
            root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "minifusion")
        except RuntimeError:  # no home directory to be found: beside the other temporary files
            root = Path(tempfile.gettempdir(), "minifusion")
    return Path(root) / "memory"


@lru_cache(maxsize=1)
def _code_version() -> str:
    # any change to minifusion's source or to torch may change what a run allocates: measure again
    digest = hashlib.sha256(torch.__version__.encode())
    package = Path(__file__).parent
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


class _Measured:
    """A measuring function whose JSON-able result is kept per argument tuple: in the process, and in
    cache_dir() so that the next process reads it instead of measuring (unreadable or unwritable: measured)."""
    every: list["_Measured"] = []

    def __init__(self, fn: Callable):
        self.fn, self.__name__, self.__doc__ = fn, fn.__name__, fn.__doc__
        self.memo: dict[tuple, object] = {}
        _Measured.every.append(self)

    def path(self, *args) -> Path:
        key = hashlib.sha256(f"{self.__name__}{args!r}{_code_version()}".encode()).hexdigest()[:32]
        return cache_dir() / f"{self.__name__}-{key}.json"

    def known(self, *args) -> bool:
        return args in self.memo or self.path(*args).is_file()

    def __call__(self, *args):
        if args in self.memo:
            return self.memo[args]
        path = self.path(*args)
        try:
            value = json.loads(path.read_text())
        except (OSError, ValueError):
            value = self.fn(*args)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps(value))
                os.replace(tmp, path)  # whole or not at all: another process may read it at any moment
            except OSError:
                pass
        self.memo[args] = value
        return value


def _least_squares(rows: list[list[int]], values: list[int]) -> list[int]:
    """Least squares of bytes (or FLOPs) on their features; every coefficient is a whole number of bytes per
    unit, so rounding takes off the solver's float noise."""
    a = torch.tensor(rows, dtype=torch.float64)
    b = torch.tensor(values, dtype=torch.float64)[:, None]
    return [round(c) for c in torch.linalg.lstsq(a, b, driver="gelsd").solution[:, 0].tolist()]


def _dot(coefficients, features) -> int:
    return sum(c * x for c, x in zip(coefficients, features))


# ---------------------------------------------------------------------------------------------------------
# UNet activations

def _unet_inputs(cfg: UNetConfig, n: int, h: int, w: int, device, dtype):
    return (torch.zeros(n, cfg.in_channels, h, w, device=device),
            torch.full((n,), 500.0, device=device),
            torch.zeros(n, 77, cfg.context_dim, device=device, dtype=dtype),
            torch.zeros(n, cfg.pooled_dim, device=device, dtype=dtype),
            torch.zeros(n, 6, device=device))


@lru_cache(maxsize=16)
def _meta(network: type, cfg, dtype: torch.dtype) -> torch.nn.Module:
    """A network (UNet, ControlNet, VAE) of config cfg on the meta device in dtype: no memory, every shape."""
    with torch.device("meta"):
        return network(cfg).to(dtype).eval().requires_grad_(False)


def _call_peak(device: torch.device, call) -> int:
    """Peak bytes `call()` allocates beyond what is live before it: on CUDA by the allocator, elsewhere (the
    meta device included) by MemoryTracker."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        call()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with CPUAttentionOnMeta(), MemoryTracker() as tracker:
        call()
    return tracker.peak


@torch.no_grad()
def unet_activation_bytes(unet: UNet | UNetConfig, n: int, h: int, w: int, dtype: torch.dtype | None = None) -> int:
    """Peak bytes one UNet call with n samples at h x w latents allocates, its output included (its inputs are
    the sampler's, counted there). A config runs on the meta device; a module runs where it lives (on CUDA, measured by
    the allocator; elsewhere by MemoryTracker)."""
    if isinstance(unet, UNetConfig):
        unet = _meta(UNet, unet, dtype or torch.float32)
    device, dtype = unet.time_embed[0].weight.device, unet.time_embed[0].weight.dtype
    inputs = _unet_inputs(unet.cfg, n, h, w, device, dtype)
    return _call_peak(device, lambda: unet(*inputs))


@dataclass(frozen=True)
class ActivationProfile:
    """UNet activation bytes of one call, linear in the samples and, per sample, in the latent pixels."""
    fixed: int
    per_sample: int
    per_sample_pixel: float

    def bytes(self, n: int, h: int, w: int) -> int:
        return int(self.fixed + n * (self.per_sample + self.per_sample_pixel * h * w))


def activation_profile(unet: UNet | UNetConfig, dtype: torch.dtype | None = None,
                       sizes: tuple[int, int] | None = None, controlnets=()) -> ActivationProfile:
    """Measure one view, then two, at latent size a (default the native window), and one view at size b (default
    half of it); solve for the three coefficients. A config is measured on the meta device in `dtype`.
    controlnets (ControlNetConfigs beside a config, ControlNet modules beside a module): the calls are
    ControlNet-steered (`controlled_activation_bytes`)."""
    cfg = unet if isinstance(unet, UNetConfig) else unet.cfg
    sizes = sizes or (cfg.sample_size, cfg.sample_size // 2)
    if isinstance(unet, UNetConfig):
        if controlnets:
            return ActivationProfile(*_controlled_profile_of_config(cfg, tuple(controlnets), dtype or torch.float32,
                                                                    tuple(sizes)))
        return ActivationProfile(*_profile_of_config(cfg, dtype or torch.float32, tuple(sizes)))
    if controlnets:
        return _per_sample(_profile(lambda n, s: controlled_activation_bytes(unet, controlnets, 2 * n, s, s), sizes))
    return _profile(lambda n, s: unet_activation_bytes(unet, n, s, s), sizes)


@_Measured
def _profile_of_config(cfg: UNetConfig, dtype: torch.dtype, sizes: tuple[int, int]) -> list:
    p = _profile(lambda n, s: unet_activation_bytes(cfg, n, s, s, dtype), sizes)
    return [p.fixed, p.per_sample, p.per_sample_pixel]


def _profile(measure, sizes: tuple[int, int]) -> ActivationProfile:
    a, b = sizes
    one_a, two_a, one_b = measure(1, a), measure(2, a), measure(1, b)
    sample_a = two_a - one_a  # what one more view costs at size a
    per_pixel = (one_a - one_b) / (a * a - b * b)
    return ActivationProfile(fixed=one_a - sample_a, per_sample=int(sample_a - per_pixel * a * a),
                             per_sample_pixel=per_pixel)


# ---------------------------------------------------------------------------------------------------------
# ControlNets: their weights sit beside the UNet's; a steered call adds their activations and residuals

@_Measured
def _controlnet_parameters(cfg: ControlNetConfig) -> int:
    return sum(p.numel() for p in _meta(ControlNet, cfg, torch.float32).parameters())


def controlnet_weights_bytes(controlnets, dtype: torch.dtype) -> int:
    """Bytes of the ControlNets' weights (ControlNetConfigs), which minifusion.load keeps in the UNet's dtype."""
    return sum(_controlnet_parameters(c) for c in controlnets) * dtype.itemsize


def condition_bytes(controlnets, h: int, w: int) -> int:
    """Each ControlNet's condition image at a scale of h x w latents, which minifusion.controlnet.Control keeps
    on the device in float32 while the scale runs."""
    return len(controlnets) * 3 * math.prod(condition_size((h, w))) * 4


@torch.no_grad()
def controlled_activation_bytes(unet: UNet | UNetConfig, controlnets, n: int, h: int, w: int,
                                dtype: torch.dtype | None = None) -> int:
    """Peak bytes one ControlNet-steered UNet call with n samples (n / 2 views) at h x w latents allocates, as
    views.ViewRunner makes it: minifusion.controlnet.Control cuts each view's condition crop and runs every
    ControlNet (its activations, its residuals summed), then the UNet runs with the residuals. Configs (a
    UNetConfig and ControlNetConfigs) run on the meta device, modules where they live. The scale's condition
    image is made before the call (`condition_bytes`); guess mode, whose ControlNets see half the rows, needs
    no more than this."""
    if isinstance(unet, UNetConfig):
        unet = _meta(UNet, unet, dtype or torch.float32)
        controlnets = [_meta(ControlNet, c, dtype or torch.float32) for c in controlnets]
    device, dtype = unet.time_embed[0].weight.device, unet.time_embed[0].weight.dtype
    inputs = _unet_inputs(unet.cfg, n, h, w, device, dtype)
    control = Control([Unit(net, torch.zeros(1, 3, *condition_size((h, w)))) for net in controlnets], [(h, w)], 1)
    for i in range(len(controlnets)):
        control.condition(i, 1, device)
    views = [Window(0, h, 0, w, 0)] * (n // 2)
    return _call_peak(device, lambda: unet(*inputs, residuals=control(*inputs, views, step=0, scale=1)))


def _per_sample(views: ActivationProfile) -> ActivationProfile:
    # measured per view (a steered call has two samples per view: their condition crop is shared), used per sample
    return ActivationProfile(views.fixed, views.per_sample // 2, views.per_sample_pixel / 2)


@_Measured
def _controlled_profile_of_config(cfg: UNetConfig, controlnets: tuple, dtype: torch.dtype,
                                  sizes: tuple[int, int]) -> list:
    p = _per_sample(_profile(lambda n, s: controlled_activation_bytes(cfg, controlnets, 2 * n, s, s, dtype), sizes))
    return [p.fixed, p.per_sample, p.per_sample_pixel]


# ---------------------------------------------------------------------------------------------------------
# Weights and text encoders

def component_dtypes(dtype: torch.dtype, vae_dtype: torch.dtype | None = None) -> dict[str, torch.dtype]:
    """What minifusion.load runs each network in: the VAE in fp32 when the rest is fp16 (SDXL's VAE overflows in
    fp16), unless `vae_dtype` says otherwise (the fp16-fix VAE, vae_file.vae_dtype_for)."""
    vae = vae_dtype or (torch.float32 if dtype == torch.float16 else dtype)
    return {"unet": dtype, "vae": vae, "text_encoder_1": dtype, "text_encoder_2": dtype}


@_Measured
def _parameter_counts(cfgs: Configs) -> dict[str, int]:
    return {c: sum(p.numel() for p in m.parameters()) for c, m in meta_models(cfgs).items()}


def weights_bytes(cfgs: Configs, dtype: torch.dtype, vae_dtype: torch.dtype | None = None) -> dict[str, int]:
    dtypes = component_dtypes(dtype, vae_dtype)
    return {c: n * dtypes[c].itemsize for c, n in _parameter_counts(cfgs).items()}


@_Measured
def _text_peak(cfg: TextConfig, dtype: torch.dtype) -> int:
    with torch.device("meta"):
        encoder = TextEncoder(cfg).to(dtype)
        ids = torch.zeros(2, cfg.max_length, dtype=torch.long)
    with torch.no_grad(), CPUAttentionOnMeta(), MemoryTracker() as tracker:
        encoder(ids)
    return tracker.peak


def text_activation_bytes(cfg: TextConfig, dtype: torch.dtype) -> int:
    """Peak bytes one text encoder allocates encoding two prompts (what Pipeline.encode_prompt runs at once)."""
    return _text_peak(cfg, dtype)


# ---------------------------------------------------------------------------------------------------------
# Sampler state at each UNet call

class _NoOpUNet:
    """Stands in for the UNet in a meta run of the sampler: notes the live bytes and batch of every call."""

    def __init__(self, tracker: MemoryTracker):
        self.tracker, self.calls = tracker, []

    def __call__(self, x, t, context, pooled, time_ids, **kwargs):
        self.calls.append((self.tracker.live, x.shape[0], x.shape[-2], x.shape[-1]))
        return torch.zeros_like(x)


def _sampler_run(context_dim: int, pooled_dim: int, dtype: torch.dtype, height: int, width: int, window: int,
                 stride: int, view_batch_size: int) -> list[list[list[tuple[int, int, int, int]]]]:
    """Per scale, per step, every UNet call in order: (sampler bytes live at the call, samples, h, w), from a
    two-step meta run of `demofusion` on a model native at `window` latents (every later step allocates what
    the second does)."""
    with CPUAttentionOnMeta(), MemoryTracker() as tracker:
        unet = _NoOpUNet(tracker)
        cond = Cond(torch.zeros(2, 77, context_dim, device="meta", dtype=dtype),
                    torch.zeros(2, pooled_dim, device="meta", dtype=dtype))
        ends: list[list[int]] = []

        def progress(scale, step, steps, evals):
            if step == 0:  # a scale begins
                ends.append([])
            else:
                ends[-1].append(len(unet.calls))

        for _ in demofusion(unet, cond, height=height, width=width, base_px=window * 8, window=window, steps=2,
                            guidance_scale=7.5, stride=stride, view_batch_size=view_batch_size, jitter=False,
                            progress=progress):
            pass
    out, start = [], 0
    for scale in ends:
        out.append([])
        for end in scale:
            out[-1].append(unet.calls[start:end])
            start = end
    return out


def sampler_calls(cfg: UNetConfig, height: int, width: int, view_batch_size: int, stride: int, dtype: torch.dtype
                  ) -> list[list[list[tuple[int, int, int, int]]]]:
    """Measured: per scale, per step, every UNet call in order, (sampler bytes live at the call, samples, h, w),
    from a two-step meta run of `demofusion` at this size (every later step allocates what the second does).
    Takes time in proportion to the views: the memory model measures small sizes only and computes the rest."""
    return _sampler_run(cfg.context_dim, cfg.pooled_dim, dtype, height, width, cfg.sample_size, stride,
                        view_batch_size)


def _window_count(h: int, w: int, window: int, stride: int) -> int:
    # windows are the product of their row and column starts: count each axis on a one-pixel-wide strip
    return len(local_windows(h, 1, window, stride)) * len(local_windows(1, w, window, stride))


def _view_groups(h: int, w: int, s: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """The groups of views one step of scale s hands to the view runner, in order: (how many, h, w)."""
    if s == 1:
        return [(1, h, w)]
    return [(_window_count(h, w, window, stride), min(window, h), min(window, w)), (s * s, -(-h // s), -(-w // s))]


def _batches(views: int, batch: int, every: bool) -> list[tuple[int, int]]:
    """(views before the call in its group, views in the call) of each call; with every=False only the first,
    the last full and the last one: between them the bytes grow linearly, so the largest is among these."""
    full = views // batch
    starts = range(0, full * batch, batch) if every else sorted({0, max(full - 1, 0) * batch})
    calls = [(k, batch) for k in starts if k + batch <= views]
    if views % batch:
        calls.append((full * batch, views % batch))
    return calls


def _call_features(geometry: tuple, group: int, done: int, n: int) -> list[int]:
    """What the sampler's live bytes at a UNet call of scale >= 2 are linear in (the coefficients are measured):
    the latent area, phase 1's and the previous scale's, the windows' zero-padded frame, the stacked views of
    each group, the view pixels already denoised in the step, those of the call, and the call's batch."""
    h, w, areas, margin, groups = geometry
    pixels = [count * vh * vw for count, vh, vw in groups]
    _, vh, vw = groups[group]
    return [1, h * w, *areas, (h + 2 * margin) * (w + 2 * margin), pixels[0], pixels[1],
            sum(pixels[:group]) + done * vh * vw, n * vh * vw, n]


def _scale_calls(sizes: list[tuple[int, int]], s: int, window: int, stride: int, batch: int, every: bool
                 ) -> list[tuple[list[int], int, int, int]]:
    """One step's UNet calls of scale s of a run with latent `sizes` (or, with every=False, the candidates for
    its largest): (features, samples, view h, view w). Phase 1's features are its latent area alone."""
    h, w = sizes[s - 1]
    groups = _view_groups(h, w, s, window, stride)
    if s == 1:
        return [([1, h * w], 2, h, w)]
    areas = (sizes[0][0] * sizes[0][1], sizes[s - 2][0] * sizes[s - 2][1])
    geometry = (h, w, areas, window_margin(window, stride), groups)
    return [(_call_features(geometry, g, k, n), 2 * n, vh, vw)
            for g, (count, vh, vw) in enumerate(groups) for k, n in _batches(count, batch, every)]


# the fitting runs (px, stride, batch): a model native at 8 latents (64 px), so each takes a handful of views;
# sizes, strides and batches vary so that every feature varies on its own (any three of them would do)
_SAMPLER_RUNS = ((256, 192, 6, 5), (200, 130, 2, 16), (192, 136, 7, 2), (128, 128, 8, 1))
_SAMPLER_WINDOW = 8


@_Measured
def _sampler_fit(cfg: UNetConfig, dtype: torch.dtype) -> dict[str, list[int]]:
    rows: dict[str, tuple[list, list]] = {"first": ([], []), "later": ([], [])}
    for height, width, stride, batch in _SAMPLER_RUNS:
        measured = _sampler_run(cfg.context_dim, cfg.pooled_dim, dtype, height, width, _SAMPLER_WINDOW, stride, batch)
        sizes = scale_sizes(height, width, _SAMPLER_WINDOW * 8)
        for s, steps in enumerate(measured, start=1):
            expected = _scale_calls(sizes, s, _SAMPLER_WINDOW, stride, batch, every=True)
            # the runner batches each group of views in order, as _scale_calls lays them out
            assert all([c[1:] for c in calls] == [e[1:] for e in expected] for calls in steps), (height, width, s)
            # from the second step on, the previous step's noise predictions are alive until the runner returns:
            # the last step is the one every later step repeats
            features, values = rows["first" if s == 1 else "later"]
            features += [e[0] for e in expected]
            values += [c[0] for c in steps[-1]]
    return {k: _least_squares(*v) for k, v in rows.items()}


def _sampler_bytes(cfg: UNetConfig, dtype: torch.dtype, sizes: list[tuple[int, int]], s: int, stride: int,
                   batch: int) -> list[tuple[int, int, int, int]]:
    """Predicted (sampler bytes live, samples, view h, view w) of the calls among which a scale's largest is."""
    coefficients = _sampler_fit(cfg, dtype)["first" if s == 1 else "later"]
    return [(_dot(coefficients, f), n, vh, vw)
            for f, n, vh, vw in _scale_calls(sizes, s, cfg.sample_size, stride, batch, every=False)]


# ---------------------------------------------------------------------------------------------------------
# Decoding

class _StageTracker(MemoryTracker):
    """MemoryTracker that splits a decode_tiled run into its stages (`begin`, told by _Probe) and notes, at each
    stage's peak, the live bytes of the stage's map-wide device buffers (MAP_BUFFERS)."""

    def __init__(self):
        super().__init__(host_ops={HOST_MAPS})
        self.stages: list[dict] = []
        self._maps: dict[int, int] = {}  # storage id -> the stage that allocated it as a map-wide buffer

    def begin(self, tiles: int) -> None:
        self.stages.append({"tiles": tiles, "peak": self.live, "map": 0, "allocated": False, "entry": 0})

    def _created(self, key, func, tensor):
        if self.stages and func is not HOST_MAPS:
            self.stages[-1]["allocated"] = True
            if func is MAP_BUFFERS:
                self._maps[key] = len(self.stages)

    def _after(self, func, out):
        if self.stages and self.live > self.stages[-1]["peak"]:
            here = len(self.stages)
            self.stages[-1].update(peak=self.live,
                                   map=sum(n for key, n in self._seen.items() if self._maps.get(key) == here))


class _Probe:
    """decode.py's tile-share protocol (as decode.Alone) for measuring: each stage computes only `pick(tiles)`,
    keeps its maps whole (so any tile's halo can be read) and tells the tracker where it begins."""
    rank = 0

    def __init__(self, tracker: _StageTracker, pick: Callable[[list], list]):
        self.tracker, self.pick = tracker, pick

    def split(self, tiles):  # every stage starts by splitting its tiles
        self.tracker.begin(len(tiles))
        return [self.pick(tiles)]

    def band(self, data, shares, height):
        self.tracker.stages[-1]["size"] = (height, data.shape[3])
        if data.shape[2] != height:
            data = torch.empty(data.shape[0], data.shape[1], height, data.shape[3], dtype=data.dtype,
                               device=data.device)
        return Alone().band(data, shares, height)

    def fetch(self, x, needs):
        return x

    def moments(self, mine, shares, shape):
        self.tracker.stages[-1]["entry"] = mine[0].untyped_storage().nbytes() if mine else 0
        return Alone().moments(mine, shares, shape)

    def each(self, tiles, shares, compute, store, step, shapes):
        for i, box in enumerate(tiles):
            if box in shares[0]:
                store(i, *compute(box))
                step()

    def whole(self, x):
        return x.data


@torch.no_grad()
def _decode_stages(cfg: VAEConfig, dtype: torch.dtype, h: int, w: int, tile: int, pick) -> _StageTracker:
    vae, tracker = _meta(VAE, cfg, dtype), _StageTracker()  # built outside: its weights are not the decode's
    z = torch.zeros(1, cfg.latent_channels, h, w, dtype=dtype, device="meta")
    with CPUAttentionOnMeta(), tracker:
        decode_tiled(vae, z, tile=tile, storage="meta", share=_Probe(tracker, pick))
    tracker.stages = [s for s in tracker.stages if s["allocated"]]  # the dry run that counts tiles allocates nothing
    return tracker


@torch.no_grad()
def _untiled_decode_peak(cfg: VAEConfig, dtype: torch.dtype, h: int, w: int) -> int:
    vae = _meta(VAE, cfg, dtype)
    z = torch.zeros(1, cfg.latent_channels, h, w, dtype=dtype, device="meta")
    with CPUAttentionOnMeta(), MemoryTracker() as tracker:
        vae.decode(z)
    return tracker.peak


def _middle_tile(tiles: list) -> list:
    rows, cols = sorted({box[0] for box in tiles}), sorted({box[2] for box in tiles})
    return [next(box for box in tiles if box[0] == rows[len(rows) // 2] and box[2] == cols[len(cols) // 2])]


def _root(coefficients: list[float], target: float) -> float:
    """The x >= 0 with p0 + (p1 + p2) x + p3 x^2 = target (a stage's bytes at an x by x tile)."""
    p0, p1, p2, p3 = coefficients
    b, c = p1 + p2, p0 - target
    if p3 > 0:
        return (-b + math.sqrt(max(b * b - 4 * p3 * c, 0.0))) / (2 * p3)
    return -c / b if b > 0 else 0.0


_ONE_TILE = 1 << 30  # a tile larger than any map: every stage is one tile
_DECODE_PROBES = ((16, 24), (24, 20), (20, 12), (28, 32))  # latents, non-square: each stage is bilinear
_INTERIOR_TILES = (16, 1024)  # each stage computes one interior tile of this size (of a 3 x 3 tiled latent map)


@_Measured
def _decode_fit(cfg: VAEConfig, dtype: torch.dtype) -> dict:
    """Per stage of decode_tiled: its output map's size over the latents', bytes p0 + p1 X + p2 Y + p3 X Y of a
    stage that is one X x Y tile, the map-wide buffers per map pixel, the bytes each tile keeps (its moments)
    and the halo: a stage of several tiles holds, for an interior L x L tile, what one (L + halo)^2 tile does
    (its input is read one pixel beyond, twice that after a 2x upsampling). The halo is the larger of those
    solved at tiles of 16 and of 1024, so that within that range the bound holds: the difference is linear in L.
    Then the host's full maps and an untiled decode, both linear in the latent pixels."""
    runs = [_decode_stages(cfg, dtype, h, w, _ONE_TILE, lambda tiles: tiles) for h, w in _DECODE_PROBES]
    interior = [_decode_stages(cfg, dtype, 3 * tile, 3 * tile, tile, _middle_tile).stages
                for tile in _INTERIOR_TILES]
    stages = []
    for q, first in enumerate(runs[0].stages):
        ratio = first["size"][0] // _DECODE_PROBES[0][0]
        maps = [(ratio * h, ratio * w) for h, w in _DECODE_PROBES]
        p = _least_squares([[1, rows, cols, rows * cols] for rows, cols in maps],
                   [r.stages[q]["peak"] - r.stages[q]["map"] for r in runs])
        per_map = round(sum(r.stages[q]["map"] for r in runs) / sum(rows * cols for rows, cols in maps))
        halo = max(_root(p, inner[q]["peak"] - inner[q]["map"]) - tile
                   for inner, tile in zip(interior, _INTERIOR_TILES))
        stages.append({"ratio": ratio, "bytes": p, "map": per_map, "halo": max(halo, 0.0), "entry": first["entry"]})
    pixels = [[1, h * w] for h, w in _DECODE_PROBES]
    untiled = [_untiled_decode_peak(cfg, dtype, h, w) for h, w in _DECODE_PROBES[:3]]
    return {"stages": stages, "host": _least_squares(pixels, [r.peak_host for r in runs]),
            "untiled": _least_squares(pixels[:3], untiled)}


def _span(size: int, tile: int) -> tuple[int, int]:
    """(tiles, largest tile) along one axis of a map, as decode.py splits it."""
    spans = _spans(size, tile)
    return len(spans), max(b - a for a, b in spans)


def _stage_bytes(stage: dict, h: int, w: int, tile: int) -> int:
    rows, cols = stage["ratio"] * h, stage["ratio"] * w
    (kr, lr), (kc, lc) = _span(rows, tile), _span(cols, tile)
    # a stage of several tiles along an axis: its largest tile there with the widest halo (a border tile reads less)
    x, y = (lr + stage["halo"] if kr > 1 else rows), (lc + stage["halo"] if kc > 1 else cols)
    p0, p1, p2, p3 = stage["bytes"]
    return math.ceil(p0 + p1 * x + p2 * y + p3 * x * y + stage["map"] * rows * cols + stage["entry"] * (kr * kc - 1))


def decode_bytes(cfg: VAEConfig, h: int, w: int, dtype: torch.dtype, tile: int | None = 256) -> dict[str, int]:
    """Device and host peak bytes of decoding h x w latents (weights not included): `decode_tiled` with that
    tile (pixels of each stage's own map), or one untiled `vae.decode` (tile None; all of it on the device).

    Tiled: the largest over decode_tiled's stages of its working set, from measured per-stage coefficients (see
    the module's docstring): exact where every stage is one tile, an upper bound otherwise. The host holds full
    feature maps (a ResnetBlock's input, middle and output at once), in proportion to the latent pixels."""
    fit = _decode_fit(cfg, dtype)
    if tile is None:
        return {"device": _dot(fit["untiled"], [1, h * w]), "host": 0}
    return {"device": max(_stage_bytes(stage, h, w, tile) for stage in fit["stages"]),
            "host": _dot(fit["host"], [1, h * w])}


# ---------------------------------------------------------------------------------------------------------

def predict(cfgs: Configs, height: int, width: int, dtype: torch.dtype = torch.float16, view_batch_size: int = 16,
            decode_tile: int | None = 256, stride: int | None = None, resident: Collection[str] = COMPONENTS,
            controlnets: tuple[ControlNetConfig, ...] = (), vae_dtype: torch.dtype | None = None) -> list[dict]:
    """Predicted peak live tensor bytes on the compute device per scale (base scale first), denoising and decoding
    apart: what torch.cuda.max_memory_allocated reports for each. `resident`: the networks that stay on the device
    throughout (default all four; () when each visits the device only while it runs). `controlnets`: every UNet
    call steered by these, whose weights go where the UNet's go. `vae_dtype`: as component_dtypes."""
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
            live + profile.bytes(n, ch, cw) for live, n, ch, cw in calls)
        dec = decode_bytes(cfgs.vae, h, w, component_dtypes(dtype, vae_dtype)["vae"], decode_tile)
        out.append({"scale": s, "latent_size": (h, w), "image_size": (upscale * h, upscale * w),
                    "max_unet_batch": max(n for _, n, _, _ in calls),
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


# ---------------------------------------------------------------------------------------------------------
# Work

class _FlopsPerOp(TorchDispatchMode):
    """Each op's FLOPs in the order the ops ran, by torch.utils.flop_counter's formulas (FlopCounterMode's
    counts, without its per-module bookkeeping, which makes a meta forward several times slower)."""

    def __init__(self):
        super().__init__()
        self.ops: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.ops.append(formula(*args, **kwargs, out_val=out))
        return out


@torch.no_grad()
def count_unet_flops(cfg: UNetConfig, h: int, w: int) -> list[int]:
    """Measured: the FLOPs of each op of one UNet evaluation (one sample) at h x w latents, on the meta device."""
    unet = _meta(UNet, cfg, torch.float32)
    with _FlopsPerOp() as counter:
        unet(*_unet_inputs(cfg, 1, h, w, "meta", torch.float32))
    return counter.ops


def _level_pixels(cfg: UNetConfig, h: int, w: int) -> list[int]:
    # every level halves the map, rounding up (a stride-2 conv with padding 1)
    return [-(-h // 2 ** level) * -(-w // 2 ** level) for level in range(len(cfg.channel_mult))]


@_Measured
def _unet_flop_fit(cfg: UNetConfig) -> list[list[int]]:
    """[level, power, FLOPs per level pixel^power] summed over the UNet's ops. Each op is measured at two sizes
    whose level maps all differ (2^L x 3*2^(L-1) and one more pixel each way) and is the level pixel count to
    the power 0, 1 or 2 that grows by the same factor; the sum over ops is then exact at any size."""
    top = 2 ** len(cfg.channel_mult)
    a, b = (top, 3 * top // 2), (top + 1, 3 * top // 2 + 1)
    pa, pb = _level_pixels(cfg, *a), _level_pixels(cfg, *b)
    terms: dict[tuple[int, int], int] = {}
    for fa, fb in zip(count_unet_flops(cfg, *a), count_unet_flops(cfg, *b)):
        if fa == fb:
            key = (0, 0)
        else:
            key = next(((level, p) for p in (1, 2) for level in range(len(pa))
                        if Fraction(fb, fa) == Fraction(pb[level], pa[level]) ** p), None)
            if key is None:
                raise RuntimeError(f"a UNet op's FLOPs ({fa}, {fb}) do not grow with any level's pixels")
        coefficient = Fraction(fa, pa[key[0]] ** key[1])
        terms[key] = terms.get(key, 0) + coefficient
    assert all(c.denominator == 1 for c in terms.values()), terms
    return [[level, p, int(c)] for (level, p), c in sorted(terms.items())]


def unet_flops(cfg: UNetConfig, h: int, w: int) -> int:
    """FLOPs of one UNet evaluation (one sample) at h x w latents (as counted on the meta device)."""
    pixels = _level_pixels(cfg, h, w)
    return sum(c * pixels[level] ** p for level, p, c in _unet_flop_fit(cfg))


@_Measured
def _decode_flop_fit(cfg: VAEConfig) -> list[int]:
    """a + b hw + c (hw)^2: convolutions grow with the latent pixels, the mid attention with their square."""
    sizes = ((8, 8), (8, 12), (12, 12))
    return _least_squares([[1, h * w, (h * w) ** 2] for h, w in sizes],
                [decode_flops(cfg, (1, cfg.latent_channels, h, w)) for h, w in sizes])


def unet_views(cfg: UNetConfig, height: int, width: int, stride: int | None = None) -> list[list[tuple[int, int, int]]]:
    """Per scale, the UNet views one step evaluates (each twice, for CFG): [(latent h, latent w, how many)]."""
    window = cfg.sample_size
    stride = stride or window // 2
    return [[(vh, vw, n) for n, vh, vw in _view_groups(h, w, s, window, stride)]
            for s, (h, w) in enumerate(scale_sizes(height, width, window * 8), start=1)]


def estimate(cfgs: Configs, height: int, width: int, steps: int = 50, view_batch_size: int = 16,
             dtype: torch.dtype = torch.float16, decode_tile: int | None = 256, stride: int | None = None,
             seconds_per_unet_eval: float | None = None, resident: Collection[str] = COMPONENTS,
             controlnets: tuple[ControlNetConfig, ...] = (), vae_dtype: torch.dtype | None = None) -> dict:
    """The cost of a request before running it: peak bytes (max over scales), UNet evaluations, FLOPs (UNet
    plus one decode per scale) and, given a measured seconds per UNet evaluation at the native window size,
    seconds of the UNet evaluations (bench/ measures what the rest of a step adds). `scales`: predict's rows,
    each with its own unet_evals and flops. `controlnets`: their memory as `predict` counts it (their FLOPs
    are not counted); `vae_dtype`: as `predict`."""
    rows = predict(cfgs, height, width, dtype, view_batch_size, decode_tile, stride, resident, controlnets, vae_dtype)
    decode = _decode_flop_fit(cfgs.vae)
    for row, views in zip(rows, unet_views(cfgs.unet, height, width, stride)):
        h, w = row["latent_size"]
        row["unet_evals"] = sum(2 * n * steps for _, _, n in views)
        row["flops"] = (sum(2 * n * steps * unet_flops(cfgs.unet, vh, vw) for vh, vw, n in views)
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
