"""CLIP text transformer: one module for both SDXL text encoders.

Encoder 1 is OpenAI CLIP ViT-L/14 (quick_gelu, 12 layers, 768 wide); encoder 2 is OpenCLIP bigG/14 (exact gelu,
32 layers, 1280 wide, plus a text projection for the pooled embedding). Module names follow transformers'
CLIPTextModel without its `text_model.` prefix, which is also how the single-file SDXL stores encoder 1; bigG's
open_clip names are mapped by `open_clip_keys`.

SDXL conditions on the penultimate hidden states of both encoders (no final LayerNorm) and on encoder 2's
pooled output: final LayerNorm of the last layer at the EOS token, times text_projection.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from minifusion.config import TextConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    # OpenAI CLIP's sigmoid approximation of GELU, which ViT-L/14 was trained with
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, W = x.shape
        q, k, v = (p(x).view(B, L, self.heads, W // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        # causal only, no padding mask: SDXL's encoders attend to padding tokens too, and causality keeps
        # every real token (and the first EOS) independent of what the padding is
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(y.transpose(1, 2).reshape(B, L, W))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        if cfg.act not in ACTIVATIONS:
            raise ValueError(f"text encoder activation {cfg.act!r} not supported (have {sorted(ACTIVATIONS)})")
        self.act = ACTIVATIONS[cfg.act]
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Layer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.self_attn = Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Embeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_length, cfg.width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # positions are always 0..L-1: files' position_ids are ignored (some merges carry corrupted ones)
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.token_embedding(ids) + self.position_embedding(pos)


class Encoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.layers))


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)
        if cfg.projection_dim:
            self.text_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ids (B, L) -> (penultimate hidden states (B, L, width), pooled (B, projection_dim) or None)."""
        x = self.embeddings(ids)
        *body, last = self.encoder.layers
        for layer in body:
            x = layer(x)
        if not self.cfg.projection_dim:
            # CLIP-L in SDXL needs only hidden_states[-2]: its last layer and final LN are loaded, never run
            return x, None
        # EOS (49407) is the largest id, so argmax finds the first EOS whichever padding follows it (open_clip, sgm);
        # LayerNorm is per token, so normalising only that token equals final_layer_norm then pooling
        eos = last(x)[torch.arange(ids.shape[0], device=ids.device), ids.argmax(dim=-1)]
        return x, self.text_projection(self.final_layer_norm(eos))


def hf_keys(cfg: TextConfig, prefix: str = "text_model.") -> dict[str, tuple[str, str]]:
    """Key table for transformers' CLIPTextModel(WithProjection): the same names under `prefix`, except
    text_projection, which that layout keeps at the top level."""
    with torch.device("meta"):
        ours = TextEncoder(cfg).state_dict().keys()
    return {k: (k if k.startswith("text_projection.") else prefix + k, "") for k in ours}


def open_clip_keys(cfg: TextConfig, prefix: str = "") -> dict[str, tuple[str, str]]:
    """Key table for open_clip's text tower (the single-file SDXL's `conditioner.embedders.1.model.*`)."""
    table = {
        "embeddings.token_embedding.weight": ("token_embedding.weight", ""),
        "embeddings.position_embedding.weight": ("positional_embedding", ""),
        "final_layer_norm.weight": ("ln_final.weight", ""),
        "final_layer_norm.bias": ("ln_final.bias", ""),
    }
    if cfg.projection_dim:
        # open_clip computes x @ P with P stored [width, projection_dim]; a Linear weight is P.T
        table["text_projection.weight"] = ("text_projection", "T")
    for n in range(cfg.layers):
        ours, theirs = f"encoder.layers.{n}.", f"transformer.resblocks.{n}."
        pairs = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                 "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
        for a, b in pairs.items():
            for p in ("weight", "bias"):
                table[f"{ours}{a}.{p}"] = (f"{theirs}{b}.{p}", "")
        # nn.MultiheadAttention packs q, k, v by rows into one in_proj
        for qkv in "qkv":
            for p in ("weight", "bias"):
                table[f"{ours}self_attn.{qkv}_proj.{p}"] = (f"{theirs}attn.in_proj_{p}", qkv)
    return {k: (prefix + src, op) for k, (src, op) in table.items()}
