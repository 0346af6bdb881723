"""The SDXL VAE (LDM's AutoencoderKL), with module names equal to the single-file checkpoint keys.

`VAE(cfg).load_state_dict(sd)` takes the `first_stage_model.*` tensors of an SDXL `.safetensors` with that
prefix stripped; `diffusers_keys(cfg)` maps the same modules onto a diffusers `AutoencoderKL`.
Latents here are unscaled (the pipeline multiplies by `cfg.scaling_factor` after encoding and divides before
decoding). The decoder's stages are plain submodules so `minifusion.decode` can run them piecewise.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from minifusion.config import VAEConfig


def norm(channels: int, groups: int) -> nn.GroupNorm:
    # plain GroupNorm, as LDM's: torch's kernels already accumulate half-precision statistics in fp32, so an
    # explicit upcast gains nothing measurable (both within one bf16 ulp of fp64) and costs 3x the time
    return nn.GroupNorm(groups, channels, eps=1e-6)  # the VAE uses 1e-6 (the UNet 1e-5)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = norm(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.nin_shortcut(x) + self.conv2(F.silu(self.norm2(h)))


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels; q/k/v/proj_out are 1x1 convolutions as in the file."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = norm(channels, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        # contiguous (B, 1, HW, C): the fused SDPA kernels need a unit-stride last dim, and the fallback
        # materialises all (HW)^2 scores
        q, k, v = (p(h).reshape(B, 1, C, H * W).transpose(2, 3).contiguous() for p in (self.q, self.k, self.v))
        o = F.scaled_dot_product_attention(q, k, v)  # scale C^-1/2: one head as wide as the block
        return x + self.proj_out(o.transpose(2, 3).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # LDM pads right/bottom only, then a padding-free stride-2 conv


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution: ResnetBlocks, then (except at the last level) a `downsample` or `upsample`."""

    def __init__(self, cin: int, cout: int, n: int, groups: int, resample: type[nn.Module] | None):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(n))
        if resample is Downsample:
            self.downsample = Downsample(cout)
        elif resample is Upsample:
            self.upsample = Upsample(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.block:
            x = b(x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = cfg.channels, cfg.norm_groups, len(cfg.channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList(
            Level(ch[max(i - 1, 0)], ch[i], cfg.num_res_blocks, g, Downsample if i < n - 1 else None) for i in range(n))
        self.mid = Mid(ch[-1], g)
        self.norm_out = norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)  # mean and logvar

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(self.mid(x))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = cfg.channels, cfg.norm_groups, len(cfg.channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[-1], 3, padding=1)
        self.mid = Mid(ch[-1], g)
        # up[i] works at level i, so up[n-1] (the deepest) runs first: LDM's numbering, reversed from diffusers
        self.up = nn.ModuleList(Level(ch[min(i + 1, n - 1)], ch[i], cfg.num_res_blocks + 1, g,
                                      Upsample if i > 0 else None) for i in range(n))
        self.norm_out = norm(ch[0], g)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image in [-1, 1] -> (mean, logvar) of the diagonal Gaussian over unscaled latents."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # as LDM's/diffusers' DiagonalGaussianDistribution

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents -> image in about [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))


def diffusers_keys(cfg: VAEConfig) -> dict[str, tuple[str, str]]:
    """{our key: (diffusers AutoencoderKL key, op)}: renames by pattern; the mid attention's 1x1 convs are
    Linear weights there ("conv1x1")."""
    n = len(cfg.channels)
    rules = [
        (r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up_blocks.{n - 1 - int(m[1])}."),
        (r"^encoder\.down\.", "encoder.down_blocks."),
        (r"\.block\.", ".resnets."),
        (r"\.downsample\.", ".downsamplers.0."),
        (r"\.upsample\.", ".upsamplers.0."),
        (r"\.nin_shortcut\.", ".conv_shortcut."),
        (r"\.mid\.block_(\d)\.", lambda m: f".mid_block.resnets.{int(m[1]) - 1}."),
        (r"\.mid\.attn_1\.norm\.", ".mid_block.attentions.0.group_norm."),
        (r"\.mid\.attn_1\.(q|k|v)\.", lambda m: f".mid_block.attentions.0.to_{m[1]}."),
        (r"\.mid\.attn_1\.proj_out\.", ".mid_block.attentions.0.to_out.0."),
        (r"\.norm_out\.", ".conv_norm_out."),
    ]

    def rename(key: str) -> str:
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        return key

    with torch.device("meta"):
        keys = VAE(cfg).state_dict().keys()
    return {k: (rename(k), "conv1x1" if re.search(r"attn_1\.(q|k|v|proj_out)\.weight$", k) else "") for k in keys}
