"""A ControlNet from its own file or folder: `minifusion.load(..., controlnet=PATH)`.

Accepted: a diffusers ControlNet folder (config.json beside diffusion_pytorch_model[.fp16].safetensors, or
sharded); one .safetensors with diffusers ControlNetModel keys (most released SDXL ControlNets: diffusers'
canny/depth, thibaud's openpose, xinsir's, lllyasviel's sd_control_collection repacks); one .safetensors in the
original cldm layout (`input_hint_block.*`, `zero_convs.N.0`, `middle_block_out.0`, bare or under
`control_model.`). A single file carries no config, so its architecture is read from its tensor shapes and
counts, with the UNet's conventions for what no tensor shows (64-wide heads, 32 norm groups, the split of the
added-conditioning input). The "-mid"/"-small" variants keep attention modules with zero transformer blocks at
some levels; that shows in the keys (a proj_in without transformer_blocks) and is built so.

Loading is the checkpoint loader's, with its strictness and its care with untrusted files: headers validated
before any tensor is read, pickles refused, every missing, unexpected or misshapen tensor reported in one error.
A ControlNet must fit the UNet it steers (every width and count of the encoder half; its transformer depths are
its own). Other ways of steering SDXL with a condition image (Control-LoRA, ControlNet-LLLite, T2I-Adapter,
ControlNet-Union, ControlNet-XS) are different networks: they are named as such and refused.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import (COUNT_LIMITS, LEVEL_LIMIT, WIDTH_LIMIT, TensorSource, _count, _report, _shapes, check,
                         load_part)
from .config import UNetConfig
from .families import CHECKPOINTS, CONTROLNETS, identify, of_class
from .model_files import diffusers_files, find_part, read_json
from .models.controlnet import ControlNet, ControlNetConfig, diffusers_keys
from .safetensors_check import CheckpointError, first_line, show

STEM = "diffusion_pytorch_model"
NEED = ("pass an SDXL ControlNet: a diffusers ControlNet folder or .safetensors file, or one in the original "
        "(cldm) layout")

UNSUPPORTED = "minifusion runs ControlNets in the original ControlNet architecture only"
DIFFUSERS_MARK = "controlnet_cond_embedding.conv_in.weight"
CLDM_MARK = "input_hint_block.0.weight"
CLDM_PREFIX = "control_model."

# config.json entries that would make it another network than an SDXL ControlNet: (diffusers' default when
# absent, the value minifusion's blocks implement)
SDXL_CONFIG = {"addition_embed_type": (None, "text_time"), "use_linear_projection": (False, True),
               "act_fn": ("silu", "silu"), "norm_eps": (1e-5, 1e-5), "flip_sin_to_cos": (True, True),
               "freq_shift": (0, 0), "resnet_time_scale_shift": ("default", "default"),
               "only_cross_attention": (False, False), "class_embed_type": (None, None),
               "num_class_embeds": (None, None), "encoder_hid_dim": (None, None),
               "encoder_hid_dim_type": (None, None), "downsample_padding": (1, 1),
               "mid_block_scale_factor": (1, 1),
               "mid_block_type": ("UNetMidBlock2DCrossAttn", "UNetMidBlock2DCrossAttn")}
CHANNEL_ORDERS = ("rgb", "bgr")
# What the UNet and its ControlNet must share for the residuals to land on the UNet's skip connections.
SHARED = ("in_channels", "channels", "num_res_blocks", "context_dim", "adm_in_channels")


@dataclass(frozen=True)
class ControlNetFile:
    """A ControlNet file or folder, checked from its headers and config alone (no weights read)."""
    where: Path  # the file, or the diffusers folder holding config.json
    files: tuple[Path, ...]
    config: ControlNetConfig
    table: dict[str, tuple[str, str]]  # our key -> (file key, op)


def inspect_controlnet(path: str | Path, unet_cfg: UNetConfig) -> ControlNetFile:
    """What `load_controlnet` will load from path for a UNet of unet_cfg, or CheckpointError naming the file."""
    path = Path(path)
    try:
        kind, where = find_part(path, "controlnet", "ControlNet", NEED)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    if kind == "folder":
        cfg = _folder_config(where / "config.json", unet_cfg)
        files = diffusers_files(where.parent, where.name, STEM)
    else:
        cfg, files = None, [where]
    src = TensorSource(files)
    try:
        layout, prefix = _layout(where, src)
        if cfg is None:
            cfg = _infer(where, src, layout, prefix, unet_cfg)
        _check_fits(where, cfg, unet_cfg)
        table = _table(cfg, layout, prefix)
        _strict(where, cfg, table, src)
        return ControlNetFile(where, tuple(src.files), cfg, table)
    finally:
        src.close()


def load_controlnet(info: ControlNetFile, device: torch.device, dtype: torch.dtype) -> ControlNet:
    """The ControlNet `inspect_controlnet` found, onto device in dtype; its tensors are checked again (the files
    may have changed since)."""
    return load_part(info, _strict, device, dtype)


# ---------------------------------------------------------------------------------------------------------

def _layout(where: Path, src: TensorSource) -> tuple[str, str]:
    """('diffusers', '') or ('cldm', '' or 'control_model.'), or CheckpointError naming what the file is."""
    keys = list(src.keys())
    family = identify(keys, CONTROLNETS)
    if family:
        raise CheckpointError(f"{where}: this is {family}; {UNSUPPORTED}; {NEED}")
    if DIFFUSERS_MARK in src.where:
        layout, prefix, embedding = "diffusers", "", "add_embedding.linear_1.weight"
    elif CLDM_MARK in src.where or CLDM_PREFIX + CLDM_MARK in src.where:
        prefix = "" if CLDM_MARK in src.where else CLDM_PREFIX
        layout, embedding = "cldm", prefix + "label_emb.0.0.weight"
    else:
        family = identify(keys, CHECKPOINTS)  # its note is for the main checkpoint: only the name is kept
        what = f"this is {family.name}" if family else \
            "not a ControlNet (no input_hint_block or controlnet_cond_embedding)"
        raise CheckpointError(f"{where}: {what}; {NEED}")
    if embedding not in src.where:
        raise CheckpointError(f"{where}: a ControlNet for Stable Diffusion 1.x / 2.x (it has no SDXL text_time "
                              f"conditioning); {NEED}")
    return layout, prefix


def _infer(where: Path, src: TensorSource, layout: str, prefix: str, unet_cfg: UNetConfig) -> ControlNetConfig:
    """The architecture of a single file from its tensors; the UNet's conventions for what none shows."""
    keys = list(src.keys())
    try:
        arch = _diffusers_arch(src, keys) if layout == "diffusers" else _cldm_arch(src, keys, prefix)
        ctx = next((src.shape(k)[1] for k in keys if k.endswith("attn2.to_k.weight")), unet_cfg.context_dim)
        return _config(unet_cfg, **arch, context_dim=ctx, global_pool=False, bgr=False)
    except KeyError as e:
        raise CheckpointError(f"{where}: not an SDXL ControlNet (no tensor {show(e.args[0])}); {NEED}") from None
    except (ZeroDivisionError, IndexError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: not an SDXL ControlNet (its tensor shapes describe no SDXL ControlNet: "
                              f"{str(e)[:100] or type(e).__name__}); {NEED}") from None


def _diffusers_arch(src: TensorSource, keys: list[str]) -> dict:
    levels = _count(keys, r"down_blocks\.(\d+)\.")
    attn = [f"down_blocks.{i}.attentions.0." for i in range(levels)]
    n_hint = _count(keys, r"controlnet_cond_embedding\.blocks\.(\d+)\.")
    conv_in = src.shape("conv_in.weight")
    hint_in = src.shape(DIFFUSERS_MARK)
    return dict(
        in_channels=conv_in[1], model_channels=conv_in[0],
        channels=[src.shape(f"down_blocks.{i}.resnets.0.conv2.weight")[0] for i in range(levels)],
        num_res_blocks=_count(keys, r"down_blocks\.0\.resnets\.(\d+)\."),
        attention=[a + "proj_in.weight" in src.where for a in attn],
        depth=[_count(keys, re.escape(a) + r"transformer_blocks\.(\d+)\.") for a in attn],
        depth_middle=_count(keys, r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\."),
        adm_in_channels=src.shape("add_embedding.linear_1.weight")[1],
        hint_channels=[hint_in[0]] + [src.shape(f"controlnet_cond_embedding.blocks.{2 * k + 1}.weight")[0]
                                      for k in range(n_hint // 2)],
        conditioning_channels=hint_in[1])


def _cldm_arch(src: TensorSource, keys: list[str], p: str) -> dict:
    levels = 1 + sum(1 for k in keys if re.fullmatch(re.escape(p) + r"input_blocks\.\d+\.0\.op\.weight", k))
    per_level = _count(keys, re.escape(p) + r"input_blocks\.(\d+)\.") // levels - 1
    first = [1 + i * (per_level + 1) for i in range(levels)]
    n_hint = _count(keys, re.escape(p) + r"input_hint_block\.(\d+)\.") // 2 + 1  # convs at 0, 2, 4, ...
    conv_in = src.shape(p + "input_blocks.0.0.weight")
    hint_in = src.shape(p + CLDM_MARK)
    return dict(
        in_channels=conv_in[1], model_channels=conv_in[0],
        channels=[src.shape(f"{p}input_blocks.{b}.0.out_layers.3.weight")[0] for b in first],
        num_res_blocks=per_level,
        attention=[f"{p}input_blocks.{b}.1.proj_in.weight" in src.where for b in first],
        depth=[_count(keys, re.escape(f"{p}input_blocks.{b}.1.") + r"transformer_blocks\.(\d+)\.") for b in first],
        depth_middle=_count(keys, re.escape(p + "middle_block.1.") + r"transformer_blocks\.(\d+)\."),
        adm_in_channels=src.shape(p + "label_emb.0.0.weight")[1],
        # the stride-2 convs sit at 4, 8, 12, ...: each starts the next width
        hint_channels=[hint_in[0]] + [src.shape(f"{p}input_hint_block.{4 * k + 4}.weight")[0]
                                      for k in range((n_hint - 2) // 2)],
        conditioning_channels=hint_in[1])


def _config(unet_cfg: UNetConfig, *, in_channels, model_channels, channels, num_res_blocks, attention, depth,
            depth_middle, adm_in_channels, context_dim, hint_channels, conditioning_channels, global_pool,
            bgr) -> ControlNetConfig:
    if not channels or any(c % model_channels for c in channels):
        raise ValueError(f"level widths {channels} are not multiples of {model_channels}")
    if not len(channels) == len(attention) == len(depth):
        raise ValueError(f"{len(channels)} levels but {len(depth)} transformer depths")
    cfg = dataclasses.replace(
        unet_cfg, in_channels=in_channels, model_channels=model_channels,
        channel_mult=tuple(c // model_channels for c in channels), num_res_blocks=num_res_blocks,
        transformer_depth=tuple(d if a else 0 for d, a in zip(depth, attention)),
        transformer_depth_middle=depth_middle, context_dim=context_dim, adm_in_channels=adm_in_channels)
    return ControlNetConfig(cfg, tuple(attention), tuple(hint_channels), conditioning_channels, global_pool, bgr)


def _folder_config(f: Path, unet_cfg: UNetConfig) -> ControlNetConfig:
    raw = read_json(f)
    cls = raw.get("_class_name", "ControlNetModel")
    family = of_class(cls, CONTROLNETS)
    if family:
        raise CheckpointError(f"{f}: this is {family}; {UNSUPPORTED}; {NEED}")
    if cls != "ControlNetModel":
        raise CheckpointError(f"{f}: a {show(cls)}, not a ControlNetModel; {NEED}")
    if raw.get("addition_embed_type") is None:
        raise CheckpointError(f"{f}: a ControlNet for Stable Diffusion 1.x / 2.x (it has no SDXL text_time "
                              f"conditioning); {NEED}")
    for key, (default, want) in SDXL_CONFIG.items():
        if raw.get(key, default) != want:
            raise CheckpointError(f"{f}: {key} = {show(raw.get(key, default), 60)} describes another network than "
                                  f"an SDXL ControlNet (SDXL's: {want}); {NEED}")
    try:
        return _config_of_json(raw, unet_cfg)
    except (ValueError, KeyError, TypeError, ZeroDivisionError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{f}: not an SDXL ControlNet config ({first_line(e)[:100]}); {NEED}") from None


def _per_level(value, levels: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def _config_of_json(c: dict, unet_cfg: UNetConfig) -> ControlNetConfig:
    chans = list(c["block_out_channels"])
    types = list(c["down_block_types"])
    if len(types) != len(chans) or set(types) - {"CrossAttnDownBlock2D", "DownBlock2D"}:
        raise ValueError(f"down_block_types {types[:8]} for {len(chans)} levels")
    attention = [t == "CrossAttnDownBlock2D" for t in types]
    depth = _per_level(c.get("transformer_layers_per_block", 1), len(chans))
    heads = _per_level(c.get("num_attention_heads") or c.get("attention_head_dim", 8), len(chans))
    # diffusers calls the number of heads "attention_head_dim"; the mid block has the last level's
    for ch, h, d, a in [*zip(chans, heads, depth, attention), (chans[-1], heads[-1], depth[-1], True)]:
        if a and d and ch != h * unet_cfg.head_dim:
            raise ValueError(f"{h} attention heads over {ch} channels, not {unet_cfg.head_dim} wide as SDXL's")
    order = c.get("controlnet_conditioning_channel_order", "rgb")
    if order not in CHANNEL_ORDERS:
        raise ValueError(f"controlnet_conditioning_channel_order {order!r}")
    return _config(unet_cfg, in_channels=c.get("in_channels", 4), model_channels=chans[0], channels=chans,
                   num_res_blocks=c.get("layers_per_block", 2), attention=attention, depth=depth,
                   depth_middle=depth[-1], adm_in_channels=c["projection_class_embeddings_input_dim"],
                   context_dim=c["cross_attention_dim"],
                   hint_channels=list(c.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)),
                   conditioning_channels=c.get("conditioning_channels", 3),
                   global_pool=c.get("global_pool_conditions", False) is True, bgr=order == "bgr")


def _integer(v, low: int, high: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _check_fits(where: Path, cfg: ControlNetConfig, unet_cfg: UNetConfig) -> None:
    """Every count bounded (a forged config cannot make building it run for hours) and the encoder half the
    UNet's, so each residual lands on a skip connection of its width."""
    u = cfg.unet
    counts = [(u.transformer_depth, 0, COUNT_LIMITS["transformer_depth"]),
              ((u.transformer_depth_middle,), 0, COUNT_LIMITS["transformer_depth_middle"]),
              (cfg.hint_channels, 1, WIDTH_LIMIT), ((cfg.conditioning_channels,), 1, WIDTH_LIMIT),
              ((u.in_channels, u.model_channels, u.num_res_blocks, u.context_dim, u.adm_in_channels), 1, WIDTH_LIMIT)]
    for values, low, high in counts:
        if not 1 <= len(values) <= LEVEL_LIMIT or not all(_integer(v, low, high) for v in values):
            raise CheckpointError(f"{where}: {show(values, 60)} is not a plausible SDXL ControlNet value; {NEED}")
    if len(u.channel_mult) > LEVEL_LIMIT or len(cfg.attention) != len(u.channel_mult):
        raise CheckpointError(f"{where}: {len(u.channel_mult)} levels is not a plausible SDXL ControlNet; {NEED}")
    for name in SHARED:
        mine, theirs = getattr(u, name), getattr(unet_cfg, name)
        if mine != theirs:
            raise CheckpointError(f"{where}: a ControlNet for a UNet with {name} {show(mine, 60)}, but the "
                                  f"checkpoint's UNet has {show(theirs, 60)}; use a ControlNet made for this model")
    if cfg.conditioning_channels != 3:
        raise CheckpointError(f"{where}: a ControlNet reading {cfg.conditioning_channels}-channel conditions; "
                              "minifusion feeds it an RGB image (3 channels)")


def _table(cfg: ControlNetConfig, layout: str, prefix: str) -> dict[str, tuple[str, str]]:
    if layout == "diffusers":
        return diffusers_keys(cfg)
    with torch.device("meta"):
        keys = ControlNet(cfg).state_dict().keys()
    return {k: (prefix + k, "") for k in keys}


def _strict(where: Path, cfg: ControlNetConfig, table, src: TensorSource) -> ControlNet:
    """The meta ControlNet, after every tensor of the files was checked against it (one error for all)."""
    try:
        with torch.device("meta"):
            model = ControlNet(cfg)
    except (ValueError, TypeError, ZeroDivisionError, RuntimeError) as e:
        raise CheckpointError(f"{where}: the ControlNet it describes cannot be built ({first_line(e)[:100]}); "
                              f"{NEED}") from None
    problems = check(table, _shapes(model), src, src.keys(), ())
    if any(problems):
        raise CheckpointError(_report(where, *problems))
    return model
