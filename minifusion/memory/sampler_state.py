"""The sampler's own bytes live at each UNet call (latents, views, noise predictions), fitted once.

They are linear in the step's geometry (`_call_features`: the latent area, phase 1's and the previous scale's, the
windows' zero-padded frame, the stacked local and dilated views, the views already denoised in the step, the
call's views and batch); the coefficients are fitted to every call of the second step of runs of `demofusion` at
small sizes with a no-op UNet (from the second step on, the previous step's predictions are alive too).
"""
from __future__ import annotations

import torch

from ..config import UNetConfig
from ..demofusion import demofusion, scale_sizes, window_margin
from ..views import Cond
from ..work import step_groups
from .cache import _dot, _least_squares, _Measured
from .tracker import CPUAttentionOnMeta, MemoryTracker


class _NoOpUNet:
    """Stands in for the UNet in a meta run of the sampler: notes the live bytes and batch of every call."""

    def __init__(self, tracker: MemoryTracker):
        self.tracker, self.calls = tracker, []

    def __call__(self, x, t, context, pooled, time_ids, **kwargs):
        self.calls.append((self.tracker.live, x.shape[0], x.shape[-2], x.shape[-1]))
        return torch.zeros_like(x)


def _sampler_run(context_dim: int, pooled_dim: int, dtype: torch.dtype, height: int, width: int, window: int,
                 stride: int, view_batch_size: int) -> list[list[list[tuple[int, int, int, int]]]]:
    """Per scale, per step, every UNet call in order: (sampler bytes live at the call, samples, h, w), from a
    two-step meta run of `demofusion` on a model native at `window` latents (every later step allocates what
    the second does)."""
    with CPUAttentionOnMeta(), MemoryTracker() as tracker:
        unet = _NoOpUNet(tracker)
        cond = Cond(torch.zeros(2, 77, context_dim, device="meta", dtype=dtype),
                    torch.zeros(2, pooled_dim, device="meta", dtype=dtype))
        ends: list[list[int]] = []

        def progress(scale, step, steps, evals):
            if step == 0:  # a scale begins
                ends.append([])
            else:
                ends[-1].append(len(unet.calls))

        for _ in demofusion(unet, cond, height=height, width=width, base_px=window * 8, window=window, steps=2,
                            guidance_scale=7.5, stride=stride, view_batch_size=view_batch_size, jitter=False,
                            progress=progress):
            pass
    out, start = [], 0
    for scale in ends:
        out.append([])
        for end in scale:
            out[-1].append(unet.calls[start:end])
            start = end
    return out


def sampler_calls(cfg: UNetConfig, height: int, width: int, view_batch_size: int, stride: int, dtype: torch.dtype
                  ) -> list[list[list[tuple[int, int, int, int]]]]:
    """Measured: per scale, per step, every UNet call in order, (sampler bytes live at the call, samples, h, w),
    from a two-step meta run of `demofusion` at this size (every later step allocates what the second does).
    Takes time in proportion to the views: the memory model measures small sizes only and computes the rest."""
    return _sampler_run(cfg.context_dim, cfg.pooled_dim, dtype, height, width, cfg.sample_size, stride,
                        view_batch_size)


def _batches(views: int, batch: int, every: bool) -> list[tuple[int, int]]:
    """(views before the call in its group, views in the call) of each call; with every=False only the first,
    the last full and the last one: between them the bytes grow linearly, so the largest is among these."""
    full = views // batch
    starts = range(0, full * batch, batch) if every else sorted({0, max(full - 1, 0) * batch})
    calls = [(k, batch) for k in starts if k + batch <= views]
    if views % batch:
        calls.append((full * batch, views % batch))
    return calls


def _call_features(geometry: tuple, group: int, done: int, n: int) -> list[int]:
    """What the sampler's live bytes at a UNet call of scale >= 2 are linear in (the coefficients are measured):
    the latent area, phase 1's and the previous scale's, the windows' zero-padded frame, the stacked views of
    each group, the view pixels already denoised in the step, those of the call, and the call's batch."""
    h, w, areas, margin, groups = geometry
    pixels = [count * vh * vw for count, vh, vw in groups]
    _, vh, vw = groups[group]
    return [1, h * w, *areas, (h + 2 * margin) * (w + 2 * margin), pixels[0], pixels[1],
            sum(pixels[:group]) + done * vh * vw, n * vh * vw, n]


def _scale_calls(sizes: list[tuple[int, int]], s: int, window: int, stride: int, batch: int, every: bool
                 ) -> list[tuple[list[int], int, int, int]]:
    """One step's UNet calls of scale s of a run with latent `sizes` (or, with every=False, the candidates for
    its largest): (features, samples, view h, view w). Phase 1's features are its latent area alone."""
    h, w = sizes[s - 1]
    groups = [(g.count, *g.size) for g in step_groups(h, w, s, window, stride)]
    if s == 1:
        return [([1, h * w], 2, h, w)]
    areas = (sizes[0][0] * sizes[0][1], sizes[s - 2][0] * sizes[s - 2][1])
    geometry = (h, w, areas, window_margin(window, stride), groups)
    return [(_call_features(geometry, g, k, n), 2 * n, vh, vw)
            for g, (count, vh, vw) in enumerate(groups) for k, n in _batches(count, batch, every)]


# the fitting runs (px, stride, batch): a model native at 8 latents (64 px), so each takes a handful of views;
# sizes, strides and batches vary so that every feature varies on its own (any three of them would do)
_SAMPLER_RUNS = ((256, 192, 6, 5), (200, 130, 2, 16), (192, 136, 7, 2), (128, 128, 8, 1))
_SAMPLER_WINDOW = 8


@_Measured
def _sampler_fit(cfg: UNetConfig, dtype: torch.dtype) -> dict[str, list[int]]:
    rows: dict[str, tuple[list, list]] = {"first": ([], []), "later": ([], [])}
    for height, width, stride, batch in _SAMPLER_RUNS:
        measured = _sampler_run(cfg.context_dim, cfg.pooled_dim, dtype, height, width, _SAMPLER_WINDOW, stride, batch)
        sizes = scale_sizes(height, width, _SAMPLER_WINDOW * 8)
        for s, steps in enumerate(measured, start=1):
            expected = _scale_calls(sizes, s, _SAMPLER_WINDOW, stride, batch, every=True)
            # the runner batches each group of views in order, as _scale_calls lays them out
            assert all([c[1:] for c in calls] == [e[1:] for e in expected] for calls in steps), (height, width, s)
            # from the second step on, the previous step's noise predictions are alive until the runner returns:
            # the last step is the one every later step repeats
            features, values = rows["first" if s == 1 else "later"]
            features += [e[0] for e in expected]
            values += [c[0] for c in steps[-1]]
    return {k: _least_squares(*v) for k, v in rows.items()}


def _sampler_bytes(cfg: UNetConfig, dtype: torch.dtype, sizes: list[tuple[int, int]], s: int, stride: int,
                   batch: int) -> list[tuple[int, int, int, int]]:
    """Predicted (sampler bytes live, samples, view h, view w) of the calls among which a scale's largest is."""
    coefficients = _sampler_fit(cfg, dtype)["first" if s == 1 else "later"]
    return [(_dot(coefficients, f), n, vh, vw)
            for f, n, vh, vw in _scale_calls(sizes, s, cfg.sample_size, stride, batch, every=False)]
