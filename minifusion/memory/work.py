"""The views one step of each scale evaluates: what `estimate` counts and the sampler-state fit lays out.

These recompute the sampler's geometry (demofusion.local_windows, dilated views of scale s) rather than ask the
sampler for it; they stay here, in one place, until the sampler describes a step's work itself.
"""
from __future__ import annotations

from ..config import UNetConfig
from ..demofusion import local_windows, scale_sizes


def _window_count(h: int, w: int, window: int, stride: int) -> int:
    # windows are the product of their row and column starts: count each axis on a one-pixel-wide strip
    return len(local_windows(h, 1, window, stride)) * len(local_windows(1, w, window, stride))


def _view_groups(h: int, w: int, s: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """The groups of views one step of scale s hands to the view runner, in order: (how many, h, w)."""
    if s == 1:
        return [(1, h, w)]
    return [(_window_count(h, w, window, stride), min(window, h), min(window, w)), (s * s, -(-h // s), -(-w // s))]


def unet_views(cfg: UNetConfig, height: int, width: int, stride: int | None = None) -> list[list[tuple[int, int, int]]]:
    """Per scale, the UNet views one step evaluates (each twice, for CFG): [(latent h, latent w, how many)]."""
    window = cfg.sample_size
    stride = stride or window // 2
    return [[(vh, vw, n) for n, vh, vw in _view_groups(h, w, s, window, stride)]
            for s, (h, w) in enumerate(scale_sizes(height, width, window * 8), start=1)]
