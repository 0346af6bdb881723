"""The SDXL ControlNet (Zhang et al. 2023): a trainable copy of the UNet's encoder half that reads a spatial
condition (edges, depth, pose) and hands the UNet one residual per skip connection and one for its middle block.

It is the UNet's own `Encoder` (time and "text_time" embeddings, input_blocks, middle_block: the same classes and
names) plus three modules named as in the original cldm checkpoints, so that layout loads by prefix stripping:
`input_hint_block` embeds the condition image into the first block's feature map (convs with SiLU between, three
of stride 2: 8x down, to the latents' size), `zero_convs.N.0` are the 1x1 convs on the N-th skip connection and
`middle_block_out.0` the one on the middle block's output. `diffusers_keys` maps the same modules onto a
diffusers `ControlNetModel`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from minifusion.config import UNetConfig
from minifusion.models import unet


@dataclass(frozen=True)
class ControlNetConfig:
    unet: UNetConfig  # the encoder half; it must agree with the UNet it steers in every width and count
    attention: tuple[bool, ...]  # per level: its blocks carry a SpatialTransformer (its depth may be 0: -mid/-small)
    hint_channels: tuple[int, ...] = (16, 32, 96, 256)  # the condition embedding's widths, one level per 2x down
    conditioning_channels: int = 3
    global_pool: bool = False  # diffusers' global_pool_conditions: residuals averaged over the image (guess mode)
    bgr: bool = False  # diffusers' controlnet_conditioning_channel_order "bgr": the net reads channels reversed

    @classmethod
    def from_unet(cls, cfg: UNetConfig) -> "ControlNetConfig":
        """The ControlNet of a UNet, as diffusers' ControlNetModel.from_unet builds it."""
        return cls(cfg, tuple(d > 0 for d in cfg.transformer_depth))

    def to_diffusers_config(self) -> dict:
        u = self.unet
        if u.transformer_depth_middle != u.transformer_depth[-1]:
            raise ValueError("diffusers gives the mid block the last level's transformer depth")
        return {
            "_class_name": "ControlNetModel", "in_channels": u.in_channels,
            "conditioning_channels": self.conditioning_channels,
            "conditioning_embedding_out_channels": list(self.hint_channels),
            "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in self.attention],
            "mid_block_type": "UNetMidBlock2DCrossAttn", "block_out_channels": list(u.channels),
            "layers_per_block": u.num_res_blocks,
            "transformer_layers_per_block": list(u.transformer_depth),
            "attention_head_dim": [ch // u.head_dim for ch in u.channels],
            "cross_attention_dim": u.context_dim, "use_linear_projection": True,
            "addition_embed_type": "text_time", "addition_time_embed_dim": u.addition_time_embed_dim,
            "projection_class_embeddings_input_dim": u.adm_in_channels, "norm_num_groups": u.norm_groups,
            "norm_eps": 1e-5, "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0,
            "global_pool_conditions": self.global_pool,
            "controlnet_conditioning_channel_order": "bgr" if self.bgr else "rgb",
        }


def hint_block(cfg: ControlNetConfig) -> nn.Sequential:
    """Condition image -> the first block's feature map: conv in, then per width a conv and a stride-2 conv to
    the next width, then a conv out to the model's channels; SiLU between all of them."""
    chans = cfg.hint_channels
    convs = [nn.Conv2d(cfg.conditioning_channels, chans[0], 3, padding=1)]
    for a, b in zip(chans, chans[1:]):
        convs += [nn.Conv2d(a, a, 3, padding=1), nn.Conv2d(a, b, 3, padding=1, stride=2)]
    convs.append(nn.Conv2d(chans[-1], cfg.unet.model_channels, 3, padding=1))
    layers = [convs[0]]
    for conv in convs[1:]:
        layers += [nn.SiLU(), conv]
    return nn.Sequential(*layers)


def guess_mode_scales(n: int, scale: float) -> torch.Tensor:
    # diffusers' guess mode: residuals weighted from 0.1 (shallowest skip) up to 1.0 (middle block), log-spaced
    return torch.logspace(-1, 0, n + 1) * scale


class ControlNet(unet.Encoder):
    def __init__(self, cfg: ControlNetConfig):
        super().__init__(cfg.unet, cfg.attention)
        self.control = cfg
        self.input_hint_block = hint_block(cfg)
        self.zero_convs = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 1)) for c in self.skip_channels)
        mid = self.skip_channels[-1]
        self.middle_block_out = nn.Sequential(nn.Conv2d(mid, mid, 1))

    def forward(self, latents: torch.Tensor, timesteps, context: torch.Tensor, pooled: torch.Tensor,
                time_ids: torch.Tensor, condition: torch.Tensor, scale: float = 1.0, guess_mode: bool = False
                ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The UNet's inputs (as `UNet.forward` takes them) and the condition image (B, 3, 8h, 8w) in [0, 1] ->
        (down, mid): one residual per skip connection and one for the middle block, times `scale` (guess
        mode: times guess_mode_scales). The condition may have B / k rows, one for k consecutive rows of the
        latents (a view's uncond and text rows see the same image): embedded once, then repeated. Runs in the
        parameters' dtype, which the residuals keep."""
        dtype, b = self.time_embed[0].weight.dtype, latents.shape[0]
        if b % condition.shape[0]:
            raise ValueError(f"{condition.shape[0]} condition images for {b} latents")
        emb = self.embed(timesteps, pooled, time_ids, b, latents.device)
        condition = condition.to(dtype)
        if self.control.bgr:
            condition = condition.flip(1)
        hint = self.input_hint_block(condition)
        if len(hint) != b:
            hint = hint.repeat_interleave(b // len(hint), dim=0)
        context = context.to(dtype)
        h, skips = self.encode(latents.to(dtype), emb, context, hint=hint)
        down = [zero_conv(skips.pop(0)) for zero_conv in self.zero_convs]  # each skip freed once convolved
        mid = self.middle_block_out(h)
        if guess_mode and not self.control.global_pool:
            weights = guess_mode_scales(len(down), scale).tolist()
        else:
            weights = [scale] * (len(down) + 1)
        for r, w in zip(down + [mid], weights):
            r.mul_(w)
        if self.control.global_pool:
            down, mid = [r.mean(dim=(2, 3), keepdim=True) for r in down], mid.mean(dim=(2, 3), keepdim=True)
        return down, mid


def diffusers_keys(cfg: ControlNetConfig) -> dict[str, tuple[str, str]]:
    """{our key: (diffusers ControlNetModel key, "")}: the encoder half as the UNet maps it, plus the condition
    embedding (conv_in, blocks.k, conv_out), the zero convs (controlnet_down_blocks.N) and controlnet_mid_block."""
    n_convs = 2 * len(cfg.hint_channels)
    hint = {f"input_hint_block.{2 * k}": f"controlnet_cond_embedding.blocks.{k - 1}" for k in range(1, n_convs - 1)}
    hint.update({"input_hint_block.0": "controlnet_cond_embedding.conv_in",
                 f"input_hint_block.{2 * (n_convs - 1)}": "controlnet_cond_embedding.conv_out",
                 "middle_block_out.0": "controlnet_mid_block"})
    with torch.device("meta"):
        model = ControlNet(cfg)
    hint.update({f"zero_convs.{n}.0": f"controlnet_down_blocks.{n}" for n in range(len(model.zero_convs))})
    return unet.diffusers_keys(cfg.unet, model, cfg.attention, hint)
