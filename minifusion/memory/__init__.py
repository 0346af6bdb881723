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

Every number comes from running the code on the meta device under a MemoryTracker (tracker.py), not from
formulas written here. A meta run still costs time per op (about 0.8 s for one forward of SDXL's UNet, and a
run of the sampler or of the tiled decode takes time in proportion to its views and tiles: minutes at 16384 px).
So what is measured are coefficients that do not depend on the size, once per configuration and dtype, on small
runs, kept in the process and on disk (cache.py); a prediction at any size is arithmetic on them:

    weights           parameter counts of the meta networks (weights.py)
    UNet activations  ActivationProfile: one and two views at the native window, one at half of it; the same
                      steered by ControlNets; the text encoders' peak (activations.py)
    sampler state     the bytes live at a UNet call, linear in the step's geometry, fitted to meta runs of
                      `demofusion` with a no-op UNet (sampler_state.py, over the views of work.py)
    tiled decode      per stage of decode_tiled, from runs where every stage is one tile and runs where each stage
                      computes one interior tile only (decoding.py)
    FLOPs             UNet per level and power of its pixels; decode a + b hw + c (hw)^2 (flops.py)

`predict` gives the bytes per scale, `plan` picks view_batch_size and decode tile under a budget, `estimate` gives
the work of a request (scales, UNet evaluations, FLOPs, peak bytes, and seconds from a measured
seconds-per-evaluation), `measured` says whether they will answer at once (budget.py).
"""
from ..checkpoint import COMPONENTS  # predict's and plan's default `resident`, named memory.COMPONENTS by callers
from .activations import (ActivationProfile, activation_profile, condition_bytes, controlled_activation_bytes,
                          text_activation_bytes, unet_activation_bytes)
from ..settings import GiB, parse_size  # a memory budget is a setting's value
from .budget import (CUDA_CONTEXT_BYTES, DECODE_TILES, FRAGMENTATION, VIEW_BATCHES, MemoryPlan, estimate, measured,
                     needs, plan, predict, required_bytes)
from .cache import _Measured, cache_dir  # _Measured (and _decode_fit): the tests empty and refill the cache
from .decoding import _decode_fit, decode_bytes
from .flops import count_unet_flops, unet_flops
from .sampler_state import sampler_calls
from .tracker import HOST_MAPS, MAP_BUFFERS, CPUAttentionOnMeta, MemoryTracker
from .weights import component_dtypes, controlnet_weights_bytes, weights_bytes

__all__ = ["ActivationProfile", "activation_profile", "condition_bytes", "controlled_activation_bytes",
           "text_activation_bytes", "unet_activation_bytes", "CUDA_CONTEXT_BYTES", "DECODE_TILES", "FRAGMENTATION",
           "VIEW_BATCHES", "GiB", "MemoryPlan", "estimate", "measured", "needs", "parse_size", "plan", "predict",
           "required_bytes", "cache_dir", "decode_bytes", "count_unet_flops", "unet_flops", "sampler_calls",
           "HOST_MAPS", "MAP_BUFFERS", "CPUAttentionOnMeta", "MemoryTracker", "component_dtypes",
           "controlnet_weights_bytes", "weights_bytes"]
