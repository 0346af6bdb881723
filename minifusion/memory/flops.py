"""The work of a request in FLOPs, from coefficients counted once on the meta device.

UNet: each op of a forward at two sizes tells the level it runs at and whether it grows with that level's pixels
or their square; decode: a + b hw + c (hw)^2.
"""
from __future__ import annotations

from fractions import Fraction

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from ..config import UNetConfig, VAEConfig
from ..decode import decode_flops
from ..models.unet import UNet
from .activations import _unet_inputs
from .cache import _least_squares, _Measured
from .tracker import _meta


class _FlopsPerOp(TorchDispatchMode):
    """Each op's FLOPs in the order the ops ran, by torch.utils.flop_counter's formulas (FlopCounterMode's
    counts, without its per-module bookkeeping, which makes a meta forward several times slower)."""

    def __init__(self):
        super().__init__()
        self.ops: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.ops.append(formula(*args, **kwargs, out_val=out))
        return out


@torch.no_grad()
def count_unet_flops(cfg: UNetConfig, h: int, w: int) -> list[int]:
    """Measured: the FLOPs of each op of one UNet evaluation (one sample) at h x w latents, on the meta device."""
    unet = _meta(UNet, cfg, torch.float32)
    with _FlopsPerOp() as counter:
        unet(*_unet_inputs(cfg, 1, h, w, "meta", torch.float32))
    return counter.ops


def _level_pixels(cfg: UNetConfig, h: int, w: int) -> list[int]:
    # every level halves the map, rounding up (a stride-2 conv with padding 1)
    return [-(-h // 2 ** level) * -(-w // 2 ** level) for level in range(len(cfg.channel_mult))]


@_Measured
def _unet_flop_fit(cfg: UNetConfig) -> list[list[int]]:
    """[level, power, FLOPs per level pixel^power] summed over the UNet's ops. Each op is measured at two sizes
    whose level maps all differ (2^L x 3*2^(L-1) and one more pixel each way) and is the level pixel count to
    the power 0, 1 or 2 that grows by the same factor; the sum over ops is then exact at any size."""
    top = 2 ** len(cfg.channel_mult)
    a, b = (top, 3 * top // 2), (top + 1, 3 * top // 2 + 1)
    pa, pb = _level_pixels(cfg, *a), _level_pixels(cfg, *b)
    terms: dict[tuple[int, int], int] = {}
    for fa, fb in zip(count_unet_flops(cfg, *a), count_unet_flops(cfg, *b)):
        if fa == fb:
            key = (0, 0)
        else:
            key = next(((level, p) for p in (1, 2) for level in range(len(pa))
                        if Fraction(fb, fa) == Fraction(pb[level], pa[level]) ** p), None)
            if key is None:
                raise RuntimeError(f"a UNet op's FLOPs ({fa}, {fb}) do not grow with any level's pixels")
        coefficient = Fraction(fa, pa[key[0]] ** key[1])
        terms[key] = terms.get(key, 0) + coefficient
    assert all(c.denominator == 1 for c in terms.values()), terms
    return [[level, p, int(c)] for (level, p), c in sorted(terms.items())]


def unet_flops(cfg: UNetConfig, h: int, w: int) -> int:
    """FLOPs of one UNet evaluation (one sample) at h x w latents (as counted on the meta device)."""
    pixels = _level_pixels(cfg, h, w)
    return sum(c * pixels[level] ** p for level, p, c in _unet_flop_fit(cfg))


@_Measured
def _decode_flop_fit(cfg: VAEConfig) -> list[int]:
    """a + b hw + c (hw)^2: convolutions grow with the latent pixels, the mid attention with their square."""
    sizes = ((8, 8), (8, 12), (12, 12))
    return _least_squares([[1, h * w, (h * w) ** 2] for h, w in sizes],
                          [decode_flops(cfg, (1, cfg.latent_channels, h, w)) for h, w in sizes])
