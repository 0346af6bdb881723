"""The models the bench runs: minifusion pipelines (tiny, full SDXL with random weights, a real checkpoint) and
the reference implementations (diffusers / transformers) holding the very same weight tensors.

Speed and memory do not depend on weight values, so full SDXL with random weights measures the real cost
without a download. Its modules are built on the meta device and every parameter is then allocated once,
directly in the target dtype and on the target device, and filled in place: no fp32 copy, no file.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn

from minifusion.checkpoint import COMPONENTS, Configs, meta_models
from minifusion.config import SDXL_CLIP_G, SDXL_CLIP_L, SDXL_UNET, SDXL_VAE
from minifusion.keyops import to_source
from minifusion.memory import component_dtypes
from minifusion.models import clip, unet, vae
from minifusion.pipeline import Pipeline, load
from minifusion.tiny import TINY

SDXL = Configs(SDXL_UNET, SDXL_VAE, SDXL_CLIP_L, SDXL_CLIP_G)
CONFIGS = {"tiny": TINY, "sdxl": SDXL}


@torch.no_grad()
def materialise_random(model: nn.Module, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """Give a meta-device module random weights at the scale of trained ones (norm gains near 1, matrices
    ~U(+-sqrt(3 / fan_in)) so activations stay O(1) through 70 transformer blocks), allocated in place."""
    g = torch.Generator(device=device).manual_seed(seed)
    norms = (nn.GroupNorm, nn.LayerNorm)
    state = {}
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            t = torch.empty(p.shape, device=device, dtype=dtype)
            if isinstance(module, norms):
                t.normal_(1.0 if pname == "weight" else 0.0, 0.1, generator=g)
            elif p.dim() >= 2:
                bound = math.sqrt(3.0 / p[0].numel())
                t.uniform_(-bound, bound, generator=g)
            else:
                t.normal_(0.0, 0.1, generator=g)
            state[f"{mname}.{pname}" if mname else pname] = t
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def random_models(cfgs: Configs, device: torch.device, dtype: torch.dtype, seed: int = 0,
                  components=COMPONENTS) -> dict[str, nn.Module]:
    dtypes = component_dtypes(dtype)
    models = meta_models(cfgs)
    return {c: materialise_random(models[c], device, dtypes[c], seed + i) for i, c in enumerate(COMPONENTS)
            if c in components}


def make_pipeline(model: str, weights: Path | None, device: torch.device, dtype: torch.dtype) -> Pipeline:
    if weights is not None:
        return load(weights, device=device, dtype=dtype)
    cfgs = CONFIGS[model]
    return Pipeline(random_models(cfgs, device, dtype), cfgs, device, dtype)


# ---------------------------------------------------------------------------------------------------------
# Reference implementations sharing our tensors: key tables run backwards (keyops.to_source) give their
# state dict; every op these layouts need is a copy or a reshape, so no weight is duplicated.

def _assign(theirs: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    theirs.load_state_dict(state, strict=True, assign=True)
    for name, buf in list(theirs.named_buffers()):
        if buf.is_meta:  # transformers' non-persistent position_ids: 0..L-1 by construction
            if not name.endswith("position_ids"):
                raise RuntimeError(f"reference model buffer {name} has no value")
            owner = theirs.get_submodule(name.rsplit(".", 1)[0])
            device = next(theirs.parameters()).device
            owner.register_buffer("position_ids", torch.arange(buf.shape[-1], device=device).expand(buf.shape),
                                  persistent=False)
    return theirs.eval().requires_grad_(False)


def diffusers_unet(ours: unet.UNet) -> nn.Module:
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        theirs = UNet2DConditionModel.from_config(ours.cfg.to_diffusers_config())
    return _assign(theirs, to_source(ours.state_dict(), unet.diffusers_keys(ours.cfg)))


def diffusers_vae(ours: vae.VAE) -> nn.Module:
    from diffusers import AutoencoderKL
    with torch.device("meta"):
        theirs = AutoencoderKL.from_config(ours.cfg.to_diffusers_config())
    return _assign(theirs, to_source(ours.state_dict(), vae.diffusers_keys(ours.cfg)))


def transformers_text(ours: clip.TextEncoder) -> nn.Module:
    import transformers
    config = transformers.CLIPTextConfig(**{k: v for k, v in ours.cfg.to_diffusers_config().items()
                                            if k not in ("architectures", "model_type")})
    config._attn_implementation = "sdpa"
    cls = transformers.CLIPTextModelWithProjection if ours.cfg.projection_dim else transformers.CLIPTextModel
    with torch.device("meta"):
        theirs = cls(config)
    prefix = "text_model." if any(k.startswith("text_model.") for k in theirs.state_dict()) else ""
    state = to_source(ours.state_dict(), clip.hf_keys(ours.cfg, prefix))
    return _assign(theirs, state)


def reference_twins(models: dict[str, nn.Module]) -> dict[str, nn.Module]:
    builders = {"unet": diffusers_unet, "vae": diffusers_vae, "text_encoder_1": transformers_text,
                "text_encoder_2": transformers_text}
    return {c: builders[c](m) for c, m in models.items()}

