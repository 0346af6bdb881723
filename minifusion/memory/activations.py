"""What one network call allocates: the UNet's (plain or ControlNet-steered) and the text encoders'.

UNet activations of n samples at h x w latents = fixed + n * (per_sample + per_sample_pixel * h * w): an
`ActivationProfile`, measured from one and two views at the native window and one at half of it. A steered call
adds the ControlNets' activations and residuals; the scale's condition image sits beside it (`condition_bytes`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import TextConfig, UNetConfig
from ..controlnet import Control, Unit, condition_size
from ..models.clip import TextEncoder
from ..models.controlnet import ControlNet
from ..models.unet import UNet
from ..views import Window
from .cache import _Measured
from .tracker import CPUAttentionOnMeta, MemoryTracker, _call_peak, _meta


def _unet_inputs(cfg: UNetConfig, n: int, h: int, w: int, device, dtype):
    return (torch.zeros(n, cfg.in_channels, h, w, device=device),
            torch.full((n,), 500.0, device=device),
            torch.zeros(n, 77, cfg.context_dim, device=device, dtype=dtype),
            torch.zeros(n, cfg.pooled_dim, device=device, dtype=dtype),
            torch.zeros(n, 6, device=device))


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
# ControlNets: a steered call adds their activations and residuals

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
# Text encoders

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
