"""Key-mapping tables turn a checkpoint's tensors into ours.

A table is data: {our_key: (source_key, op)}. Ops are the only layout changes SDXL files need:
  ""        copy
  "T"       transpose a 2-D matrix (open_clip stores text_projection for x @ P, a Linear wants P.T)
  "conv1x1" a Linear weight [o, i] stored as a 1x1 convolution [o, i, 1, 1] (the VAE's mid attention)
  "q" "k" "v"  one third, by rows, of a packed in_proj (open_clip attention)
"""
from __future__ import annotations

import torch

OPS = ("", "T", "conv1x1", "q", "k", "v")


def apply_op(t: torch.Tensor, op: str) -> torch.Tensor:
    if op == "":
        return t
    if op == "T":
        return t.t()
    if op == "conv1x1":
        return t.reshape(*t.shape, 1, 1)
    i = "qkv".index(op)
    n = t.shape[0] // 3
    return t[i * n:(i + 1) * n]


def convert_state_dict(source: dict[str, torch.Tensor], table: dict[str, tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Apply a table to an in-memory state dict (tests use it to move reference weights into ours)."""
    missing = sorted({src for src, _ in table.values()} - source.keys())
    unused = sorted(source.keys() - {src for src, _ in table.values()})
    if missing or unused:
        raise KeyError(f"table and state dict disagree: missing {missing[:5]}, unused {unused[:5]}")
    return {ours: apply_op(source[src], op) for ours, (src, op) in table.items()}


def to_source(state: dict[str, torch.Tensor], table: dict[str, tuple[str, str]]) -> dict[str, torch.Tensor]:
    """The inverse of a table: our state dict written in a checkpoint's layout (tiny checkpoints, tests)."""
    out: dict[str, torch.Tensor] = {}
    packed: dict[str, dict[str, torch.Tensor]] = {}
    for ours, (src, op) in table.items():
        t = state[ours]
        if op in ("q", "k", "v"):
            packed.setdefault(src, {})[op] = t
        elif op == "T":
            out[src] = t.t().contiguous()
        elif op == "conv1x1":
            out[src] = t.reshape(t.shape[0], t.shape[1]).contiguous()
        else:
            out[src] = t.contiguous()
    for src, parts in packed.items():
        out[src] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out
