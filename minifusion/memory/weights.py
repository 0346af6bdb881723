"""Bytes of the networks' weights, in the dtypes minifusion.load runs them in."""
from __future__ import annotations

import torch

from ..checkpoint import Configs, meta_models
from ..models.controlnet import ControlNet, ControlNetConfig
from .cache import _Measured
from .tracker import _meta


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
def _controlnet_parameters(cfg: ControlNetConfig) -> int:
    return sum(p.numel() for p in _meta(ControlNet, cfg, torch.float32).parameters())


def controlnet_weights_bytes(controlnets, dtype: torch.dtype) -> int:
    """Bytes of the ControlNets' weights (ControlNetConfigs), which minifusion.load keeps in the UNet's dtype."""
    return sum(_controlnet_parameters(c) for c in controlnets) * dtype.itemsize
