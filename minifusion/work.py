"""One description of a run's work: each scale's steps, views and UNet calls, before anything runs.

The sampler (minifusion.demofusion) hands the view runner, at every step of scale s, one group of views per kind:
phase 1 the whole latents; scale s >= 2 the local windows (Eq. 4) and then the s x s dilated views (Eq. 4-6). The
runner makes UNet calls of at most `view_batch` views of one group (views.batches) and evaluates each view once
per CFG half. `describe` says all of it for a request; the sampler's own counts (ScaleStats) equal it, which the
tests check. The memory model, the progress ETA, the rank planner (distributed.view_batch) and the bench read it.
"""
from __future__ import annotations

from typing import NamedTuple

from .demofusion import local_windows, scale_sizes
from .samplers import run_steps
from .views import batches


class ViewGroup(NamedTuple):
    kind: str  # "whole" (phase 1), "windows" (local paths) or "dilated" (global paths)
    count: int  # views of the group at one step
    size: tuple[int, int]  # latent (h, w) of each


class ScaleWork(NamedTuple):
    scale: int  # 1 = phase 1
    latent_size: tuple[int, int]
    steps: int  # steps run at this scale
    groups: tuple[ViewGroup, ...]  # what one step hands to the view runner, in order
    calls: tuple[tuple[int, int], ...]  # one step's UNet calls in order: (group index, views in the call)
    halves: int  # UNet evaluations per view: 2 with classifier-free guidance, 1 without

    @property
    def windows(self) -> int:
        return sum(g.count for g in self.groups if g.kind == "windows")

    @property
    def dilated_views(self) -> int:
        return sum(g.count for g in self.groups if g.kind == "dilated")

    @property
    def unet_calls(self) -> int:
        return self.steps * len(self.calls)

    @property
    def unet_evals(self) -> int:
        return self.steps * self.halves * sum(g.count for g in self.groups)


def step_groups(h: int, w: int, s: int, window: int, stride: int) -> tuple[ViewGroup, ...]:
    """The views one step of scale s (latents h x w) hands to the view runner, group by group, in order."""
    if s == 1:
        return (ViewGroup("whole", 1, (h, w)),)
    # the windows are the product of their row and column starts: each axis counted on a one-latent strip
    windows = len(local_windows(h, 1, window, stride)) * len(local_windows(1, w, window, stride))
    return (ViewGroup("windows", windows, (min(window, h), min(window, w))),
            ViewGroup("dilated", s * s, (-(-h // s), -(-w // s))))


def describe(height: int, width: int, *, base_px: int, window: int, steps: int, stride: int | None = None,
             view_batch: int = 16, halves: int = 2, strength: float = 1.0, first_scale: int = 1) -> list[ScaleWork]:
    """The work of a height x width run on a model native at base_px pixels with a window of `window` latents:
    one ScaleWork per computed scale, first_scale .. S (2 when a picture replaces phase 1, s + 1 resuming after
    scale s). steps: the schedule's steps (len(timesteps) for explicit ones); scales >= 2 run the last
    steps x strength of them (samplers.run_steps), phase 1 all. stride: local window stride (default
    window / 2); halves: views.halves(guidance_scale)."""
    stride = stride or window // 2
    out = []
    for s, (h, w) in enumerate(scale_sizes(height, width, base_px), start=1):
        if s < first_scale:
            continue
        groups = step_groups(h, w, s, window, stride)
        calls = tuple((g, b - a) for g, group in enumerate(groups) for a, b in batches(group.count, view_batch))
        out.append(ScaleWork(s, (h, w), steps if s == 1 else run_steps(steps, strength), groups, calls, halves))
    return out
