"""The SDXL UNet (Podell et al. 2023), with module names equal to the single-file checkpoint keys.

`UNet(cfg).load_state_dict(sd)` takes the `model.diffusion_model.*` tensors of an SDXL `.safetensors` with
that prefix stripped; `diffusers_keys(cfg)` maps the same modules onto a diffusers `UNet2DConditionModel`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from minifusion.config import UNetConfig


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (N,) numbers -> (N, dim), [cos | sin] order (LDM; diffusers flip_sin_to_cos=True,
    freq_shift=0). Always fp32: in half precision 999 rounds to 1000 and the high frequencies turn to noise."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(groups, cin, eps=1e-5), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, cout))
        # slot 2 is LDM's dropout (inert at inference); kept empty so the file's `out_layers.3` loads by name
        self.out_layers = nn.Sequential(
            nn.GroupNorm(groups, cout, eps=1e-5), nn.SiLU(), nn.Identity(), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip_connection = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Attention(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim))  # `to_out.0`: LDM's to_out.1 was dropout

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q, k, v = (p.unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for p in (self.to_q(x), self.to_k(context), self.to_v(context)))
        return self.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class GEGLU(nn.Module):
    """Gated GELU feed-forward input (Shazeer 2020): half of the projection gates the other half."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        # slot 1 is LDM's dropout; kept empty so `ff.net.2` loads by name
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LN block: self-attention, cross-attention to the text context, GEGLU feed-forward."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = Attention(dim, dim, heads)
        self.attn2 = Attention(dim, context_dim, heads)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn1(h, h)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Feature map -> tokens -> transformer blocks -> feature map, residual. SDXL projects with Linear layers
    (use_linear_projection) and its GroupNorm uses eps 1e-6, unlike the ResBlocks' 1e-5."""

    def __init__(self, ch: int, depth: int, heads: int, context_dim: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, ch)
        self.transformer_blocks = nn.ModuleList(BasicTransformerBlock(ch, context_dim, heads) for _ in range(depth))
        self.proj_out = nn.Linear(ch, ch)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        t = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))
        for block in self.transformer_blocks:
            t = block(t, context)
        return x + self.proj_out(t).transpose(1, 2).unflatten(2, (h, w))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)  # odd sizes round up: 21 -> 11 -> 6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        # nearest-neighbour to the size of the skip connection joined next (diffusers' upsample_size), so odd
        # latent sizes come back exactly: 6 -> 11 -> 21, not 6 -> 12 -> 24
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class UNetBlock(nn.ModuleList):
    """One entry of input_blocks / middle_block / output_blocks: layers applied in turn, each given what it
    needs (LDM's TimestepEmbedSequential)."""

    def forward(self, x, emb, context, size=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


class Encoder(nn.Module):
    """The half of the UNet that a ControlNet copies: the time and "text_time" embeddings, input_blocks and
    middle_block. `attention`: per level, whether its blocks carry a SpatialTransformer; by default where
    transformer_depth > 0 (-mid/-small ControlNets keep the module with zero transformer blocks at some levels)."""

    def __init__(self, cfg: UNetConfig, attention: tuple[bool, ...] | None = None):
        super().__init__()
        self.cfg = cfg
        mc, ted, chans = cfg.model_channels, cfg.time_embed_dim, cfg.channels
        attention = tuple(d > 0 for d in cfg.transformer_depth) if attention is None else attention
        self.time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))
        self.label_emb = nn.Sequential(
            nn.Sequential(nn.Linear(cfg.adm_in_channels, ted), nn.SiLU(), nn.Linear(ted, ted)))

        # down: per level L x (ResBlock [+ SpatialTransformer]), then a Downsample except at the deepest level
        self.input_blocks = nn.ModuleList([UNetBlock([nn.Conv2d(cfg.in_channels, mc, 3, padding=1)])])
        self.skip_channels, ch = [mc], mc
        for level, (cout, depth) in enumerate(zip(chans, cfg.transformer_depth)):
            for _ in range(cfg.num_res_blocks):
                self.input_blocks.append(UNetBlock([self._res(ch, cout)]
                                                   + ([self._attn(cout, depth)] if attention[level] else [])))
                ch = cout
                self.skip_channels.append(ch)
            if level < len(chans) - 1:
                self.input_blocks.append(UNetBlock([Downsample(ch)]))
                self.skip_channels.append(ch)

        self.middle_block = UNetBlock([self._res(ch, ch), self._attn(ch, cfg.transformer_depth_middle),
                                       self._res(ch, ch)])

    def _res(self, cin: int, cout: int) -> ResBlock:
        return ResBlock(cin, cout, self.cfg.time_embed_dim, self.cfg.norm_groups)

    def _attn(self, ch: int, depth: int) -> SpatialTransformer:
        return SpatialTransformer(ch, depth, ch // self.cfg.head_dim, self.cfg.context_dim, self.cfg.norm_groups)

    def embed(self, timesteps, pooled: torch.Tensor, time_ids: torch.Tensor, b: int, device) -> torch.Tensor:
        """The embedding every ResBlock adds: timestep plus "text_time" added conditioning, in the weights' dtype."""
        dtype = self.time_embed[0].weight.dtype
        t = torch.as_tensor(timesteps, device=device).reshape(-1).expand(b)
        # "text_time" added conditioning: each of the 6 numbers gets its own sinusoidal embedding, appended
        # to the pooled text embedding (diffusers' add_embedding, sgm's label_emb over concat(pooled, ids))
        ids = timestep_embedding(time_ids.reshape(-1), self.cfg.addition_time_embed_dim).reshape(b, -1)
        return (self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(dtype))
                + self.label_emb(torch.cat([pooled.float(), ids], dim=-1).to(dtype)))

    def encode(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
               hint: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(middle block output, the skip connections: every input block's output). `hint` (a ControlNet's
        embedded condition) is added to the first block's output, as cldm and diffusers do."""
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            if hint is not None:
                h, hint = h + hint, None
            skips.append(h)
        return self.middle_block(h, emb, context), skips


class UNet(Encoder):
    def __init__(self, cfg: UNetConfig):
        super().__init__(cfg)
        chans, skip_chans, ch = cfg.channels, list(self.skip_channels), self.skip_channels[-1]

        # up: per level (deepest first) L + 1 x (ResBlock on [h, skip] [+ SpatialTransformer]), the last of
        # them followed by an Upsample except at the shallowest level
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(chans))):
            cout, depth = chans[level], cfg.transformer_depth[level]
            for i in range(cfg.num_res_blocks + 1):
                layers = [self._res(ch + skip_chans.pop(), cout)] + ([self._attn(cout, depth)] if depth else [])
                ch = cout
                if level > 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(UNetBlock(layers))

        self.out = nn.Sequential(
            nn.GroupNorm(cfg.norm_groups, ch, eps=1e-5), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def forward(self, latents: torch.Tensor, timesteps, context: torch.Tensor, pooled: torch.Tensor,
                time_ids: torch.Tensor, residuals: tuple[list[torch.Tensor], torch.Tensor] | None = None
                ) -> torch.Tensor:
        """latents (B, C, H, W) any H, W; timesteps a number, 0-d or (B,); context (B, 77, context_dim);
        pooled (B, pooled_dim); time_ids (B, 6) = original size, crop top-left, target size (SDXL
        micro-conditioning). residuals: a ControlNet's (down, mid), one tensor per skip connection and one
        for the middle block's output, added to them (diffusers' down_block_additional_residuals and
        mid_block_additional_residual); a `down` list is emptied once added, so that its tensors are freed
        before the decoder half runs. Runs in the parameters' dtype; returns the noise prediction in latents'
        dtype."""
        dtype, b = self.time_embed[0].weight.dtype, latents.shape[0]
        emb = self.embed(timesteps, pooled, time_ids, b, latents.device)
        context = context.to(dtype)
        h, skips = self.encode(latents.to(dtype), emb, context)
        if residuals is not None:
            down, mid = residuals
            if len(down) != len(skips):
                raise ValueError(f"{len(down)} ControlNet residuals for {len(skips)} skip connections")
            for i, r in enumerate(down):
                skips[i] = skips[i] + r  # one at a time, so the old skip is freed before the next is made
            if isinstance(down, list):
                down.clear()
            h = h + mid
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb, context, size=skips[-1].shape[-2:] if skips else None)
        return self.out(h).to(latents.dtype)


def diffusers_keys(cfg: UNetConfig, model: nn.Module | None = None, attention: tuple[bool, ...] | None = None,
                   extra: dict[str, str] | None = None) -> dict[str, tuple[str, str]]:
    """{our key: (diffusers UNet2DConditionModel key, "")}. Modules map by prefix; inside a transformer the
    names already agree, inside a ResBlock they are renamed. For a ControlNet, which shares the encoder half:
    `model` whose keys to map (default the UNet), `attention` as `Encoder` takes it, `extra` prefixes of its
    own modules."""
    resnet = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
              "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
    prefix = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
              "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
              "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
              "middle_block.1": "mid_block.attentions.0"}

    def block(ours: str, theirs: str, j: int, attention: bool):
        prefix.update({f"{ours}.0.{a}": f"{theirs}.resnets.{j}.{b}" for a, b in resnet.items()})
        if attention:
            prefix[f"{ours}.1"] = f"{theirs}.attentions.{j}"

    L, levels = cfg.num_res_blocks, len(cfg.channels)
    attention = tuple(d > 0 for d in cfg.transformer_depth) if attention is None else attention
    for i in range(levels):
        for j in range(L):
            n = 1 + i * (L + 1) + j
            block(f"input_blocks.{n}", f"down_blocks.{i}", j, attention[i])
        if i < levels - 1:
            prefix[f"input_blocks.{(i + 1) * (L + 1)}.0.op"] = f"down_blocks.{i}.downsamplers.0.conv"
    for j in (0, 1):
        prefix.update({f"middle_block.{2 * j}.{a}": f"mid_block.resnets.{j}.{b}" for a, b in resnet.items()})
    for i, depth in enumerate(reversed(cfg.transformer_depth)):  # up_blocks.i is level levels - 1 - i
        for j in range(L + 1):
            k = i * (L + 1) + j
            block(f"output_blocks.{k}", f"up_blocks.{i}", j, depth > 0)
        if i < levels - 1:
            prefix[f"output_blocks.{i * (L + 1) + L}.{2 if depth else 1}.conv"] = f"up_blocks.{i}.upsamplers.0.conv"
    prefix.update(extra or {})

    def rename(key: str) -> str:
        parts = key.split(".")
        for n in range(len(parts) - 1, 0, -1):  # longest module prefix wins
            if (head := ".".join(parts[:n])) in prefix:
                return ".".join([prefix[head], *parts[n:]])
        raise KeyError(f"no diffusers name for {key}")

    if model is None:
        with torch.device("meta"):
            model = UNet(cfg)
    return {k: (rename(k), "") for k in model.state_dict().keys()}
