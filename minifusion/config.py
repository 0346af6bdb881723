"""Architecture configs: small frozen dataclasses with SDXL presets.

A diffusers `config.json` maps onto the same dataclasses (`from_diffusers_config`), so tiny test models,
SDXL fine-tunes and the real SDXL all go through one code path.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


def _read(config) -> dict:
    if isinstance(config, dict):
        return config
    return json.loads(Path(config).read_text())


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    transformer_depth: tuple[int, ...] = (0, 2, 10)  # per level; 0 = no attention at that level
    transformer_depth_middle: int = 10
    head_dim: int = 64  # SDXL: every attention head is 64 wide
    context_dim: int = 2048
    adm_in_channels: int = 2816  # pooled text (1280) + 6 micro-conditioning numbers x 256
    addition_time_embed_dim: int = 256
    norm_groups: int = 32
    sample_size: int = 128  # native latent size; the base image size is 8x this

    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(self.model_channels * m for m in self.channel_mult)

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    @property
    def pooled_dim(self) -> int:
        return self.adm_in_channels - 6 * self.addition_time_embed_dim

    @classmethod
    def from_diffusers_config(cls, config) -> "UNetConfig":
        c = _read(config)
        if c.get("addition_embed_type") != "text_time":
            raise ValueError("UNet config has no 'text_time' added conditioning: not an SDXL UNet")
        chans = tuple(c["block_out_channels"])
        levels = len(chans)
        heads = c.get("num_attention_heads") or c.get("attention_head_dim", 8)
        heads = tuple(heads) if isinstance(heads, (list, tuple)) else (heads,) * levels
        depth = c.get("transformer_layers_per_block", 1)
        depth = tuple(depth) if isinstance(depth, (list, tuple)) else (depth,) * levels
        depth = tuple(d if "CrossAttn" in t else 0 for d, t in zip(depth, c["down_block_types"]))
        # diffusers calls the number of heads "attention_head_dim"; every level must agree on the width
        widths = {ch // h for ch, h, d in zip(chans, heads, depth) if d}
        if len(widths) != 1:
            raise ValueError(f"UNet config: attention heads of unequal width {sorted(widths)}")
        mid_depth = depth[-1] if c.get("transformer_layers_per_block") is not None else 1
        return cls(
            in_channels=c.get("in_channels", 4),
            out_channels=c.get("out_channels", 4),
            model_channels=chans[0],
            channel_mult=tuple(ch // chans[0] for ch in chans),
            num_res_blocks=c.get("layers_per_block", 2),
            transformer_depth=depth,
            transformer_depth_middle=mid_depth,
            head_dim=widths.pop(),
            context_dim=c["cross_attention_dim"],
            adm_in_channels=c["projection_class_embeddings_input_dim"],
            addition_time_embed_dim=c["addition_time_embed_dim"],
            norm_groups=c.get("norm_num_groups", 32),
            sample_size=c.get("sample_size", 128),
        )

    def to_diffusers_config(self) -> dict:
        if self.transformer_depth_middle != self.transformer_depth[-1]:
            raise ValueError("diffusers gives the mid block the last level's transformer depth")
        attn = [d > 0 for d in self.transformer_depth]
        return {
            "_class_name": "UNet2DConditionModel", "sample_size": self.sample_size,
            "in_channels": self.in_channels, "out_channels": self.out_channels,
            "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
            "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "block_out_channels": list(self.channels), "layers_per_block": self.num_res_blocks,
            "transformer_layers_per_block": [max(d, 1) for d in self.transformer_depth],
            "attention_head_dim": [ch // self.head_dim for ch in self.channels],
            "cross_attention_dim": self.context_dim, "use_linear_projection": True,
            "addition_embed_type": "text_time", "addition_time_embed_dim": self.addition_time_embed_dim,
            "projection_class_embeddings_input_dim": self.adm_in_channels,
            "norm_num_groups": self.norm_groups, "norm_eps": 1e-5, "act_fn": "silu",
            "flip_sin_to_cos": True, "freq_shift": 0,
        }


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    norm_groups: int = 32
    scaling_factor: float = 0.13025

    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(self.ch * m for m in self.ch_mult)

    @classmethod
    def from_diffusers_config(cls, config) -> "VAEConfig":
        c = _read(config)
        chans = tuple(c["block_out_channels"])
        return cls(
            in_channels=c.get("in_channels", 3),
            out_channels=c.get("out_channels", 3),
            latent_channels=c.get("latent_channels", 4),
            ch=chans[0],
            ch_mult=tuple(ch // chans[0] for ch in chans),
            num_res_blocks=c.get("layers_per_block", 2),
            norm_groups=c.get("norm_num_groups", 32),
            scaling_factor=c.get("scaling_factor", 0.18215),
        )

    def to_diffusers_config(self) -> dict:
        n = len(self.ch_mult)
        return {
            "_class_name": "AutoencoderKL", "in_channels": self.in_channels, "out_channels": self.out_channels,
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": list(self.channels), "layers_per_block": self.num_res_blocks,
            "latent_channels": self.latent_channels, "norm_num_groups": self.norm_groups,
            "scaling_factor": self.scaling_factor, "act_fn": "silu",
        }


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 49408
    max_length: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    act: str = "quick_gelu"  # CLIP ViT-L/14; OpenCLIP bigG uses exact gelu
    projection_dim: int | None = None  # bigG: pooled EOS token -> text_projection
    eps: float = 1e-5

    @classmethod
    def from_diffusers_config(cls, config) -> "TextConfig":
        c = _read(config)
        with_projection = "CLIPTextModelWithProjection" in c.get("architectures", [])
        return cls(
            vocab_size=c["vocab_size"],
            max_length=c.get("max_position_embeddings", 77),
            width=c["hidden_size"],
            layers=c["num_hidden_layers"],
            heads=c["num_attention_heads"],
            mlp_dim=c["intermediate_size"],
            act=c.get("hidden_act", "quick_gelu"),
            projection_dim=c.get("projection_dim") if with_projection else None,
            eps=c.get("layer_norm_eps", 1e-5),
        )

    def to_diffusers_config(self) -> dict:
        return {
            "architectures": ["CLIPTextModelWithProjection" if self.projection_dim else "CLIPTextModel"],
            "model_type": "clip_text_model", "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_length, "hidden_size": self.width,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "intermediate_size": self.mlp_dim, "hidden_act": self.act, "layer_norm_eps": self.eps,
            "projection_dim": self.projection_dim or self.width,
            # SDXL's released configs carry eos_token_id 2, which makes transformers pool at argmax(ids)
            # as open_clip does
            "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
        }


SDXL_UNET = UNetConfig()
SDXL_VAE = VAEConfig()
SDXL_CLIP_L = TextConfig()
SDXL_CLIP_G = TextConfig(width=1280, layers=32, heads=20, mlp_dim=5120, act="gelu", projection_dim=1280)
