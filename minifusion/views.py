"""Where a step's views become UNet calls: the one seam that knows about batching, guidance and memory faults.

A view is what the UNet denoises in one go: phase 1's whole latents, a local window (MultiDiffusion) or one of
the s x s dilated views (shifted dilated sampling). The sampler hands over every view of a step with its
geometry; `ViewRunner` batches the views into UNet calls (each view twice, for classifier-free guidance) and
hands back the guided noise predictions. Capabilities that depend on where a view sits plug in here and
nowhere else: a ControlNet (`control`) cuts each view's control crop from its geometry, and
minifusion.distributed runs a share of the calls on each process.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Union

import torch


class Whole(NamedTuple):
    """Phase 1: the whole latents."""


class Window(NamedTuple):
    """A local window: latent rows top:bottom, columns left:right of the latents zero-padded by `margin` on
    every side."""
    top: int
    bottom: int
    left: int
    right: int
    margin: int


class Dilated(NamedTuple):
    """Dilated view (i, j): rows i::s, columns j::s of the latents zero-padded by pad_top rows at the top and
    pad_left columns at the left."""
    i: int
    j: int
    s: int
    pad_top: int
    pad_left: int


View = Union[Whole, Window, Dilated]


@dataclass(frozen=True)
class Cond:
    """Text conditioning for classifier-free guidance, row 0 negative, row 1 positive (as Pipeline.encode_prompt
    returns it): context (2, L, C) with L = 77 tokens per prompt chunk, pooled (2, P)."""
    context: torch.Tensor
    pooled: torch.Tensor

    def __post_init__(self):
        if self.context.shape[0] != 2 or self.pooled.shape[0] != 2:
            raise ValueError("Cond wants exactly one negative and one positive row")


def crop(view: View) -> tuple[int, int]:
    # SDXL micro-conditioning crop: 8 x a window's corner in the zero-padded frame (so even unjittered windows
    # carry the margin, as the reference does); phase 1 and the dilated views see the whole image
    return (8 * view.top, 8 * view.left) if isinstance(view, Window) else (0, 0)


def time_ids(size: tuple[int, int], views: list[View]) -> torch.Tensor:
    # SDXL micro-conditioning rows: original size, crop top-left, target size (original = target = final size)
    return torch.tensor([[*size, *crop(v), *size] for v in views], dtype=torch.float32)


def is_out_of_memory(e: BaseException) -> bool:
    # CUDA raises its own type; the CPU and MPS allocators raise a plain RuntimeError
    return isinstance(e, torch.cuda.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and ("out of memory" in str(e) or "can't allocate memory" in str(e)))


Group = tuple[torch.Tensor, list[View]]  # views (n, C, h, w), already scaled for the scheduler, and their geometry


class ViewRunner:
    """Batches views into UNet calls of at most `batch` views, each group of views on its own (the views of a
    group share a size). unet(latents, timesteps, context, pooled, time_ids[, residuals=]) -> noise prediction.
    control(x, t, context, pooled, time_ids, views, step=, scale=) -> ControlNet residuals for one call, or None.

    When a call runs out of memory the batch is halved for the rest of the run and the call retried (the same
    views, so the same result); on_out_of_memory(new batch) is told. Only a single view that does not fit is an
    error. `evals` and `calls` count UNet batch items and forward calls."""

    def __init__(self, unet: Callable, cond: Cond, *, size: tuple[int, int], guidance_scale: float, batch: int,
                 control: Callable | None = None, on_out_of_memory: Callable[[int], None] | None = None):
        self.unet, self.cond, self.size, self.guidance_scale = unet, cond, size, guidance_scale
        self.batch, self.control, self.on_out_of_memory = batch, control, on_out_of_memory
        self.device, self.dtype = cond.context.device, cond.context.dtype
        self.evals = self.calls = 0

    def __call__(self, groups: list[Group], t: int, step: int, scale: int) -> list[torch.Tensor]:
        """Guided noise predictions for every group, in order. step: index in the scale; scale: 1..S."""
        out = []
        for x, views in groups:
            eps, k = [], 0
            while k < len(x):
                n = min(self.batch, len(x) - k)
                try:
                    eps.append(self.call(x[k:k + n], views[k:k + n], t, step, scale))
                except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
                    if not is_out_of_memory(err) or n == 1:
                        raise
                    self.halve(n)
                    continue
                self.evals, self.calls, k = self.evals + 2 * n, self.calls + 1, k + n
            out.append(torch.cat(eps))
        return out

    def halve(self, n: int) -> None:
        self.batch = n // 2
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.on_out_of_memory is not None:
            self.on_out_of_memory(self.batch)

    def call(self, x: torch.Tensor, views: list[View], t: int, step: int, scale: int) -> torch.Tensor:
        """One UNet call on n views: each twice (uncond, cond interleaved), then guidance."""
        n = len(x)
        args = (x.repeat_interleave(2, dim=0).to(self.dtype), torch.full((2 * n,), float(t), device=self.device),
                self.cond.context.repeat(n, 1, 1), self.cond.pooled.repeat(n, 1),
                time_ids(self.size, views).repeat_interleave(2, dim=0).to(self.device))
        residuals = self.control(*args, views, step=step, scale=scale) if self.control is not None else None
        e = (self.unet(*args) if residuals is None else self.unet(*args, residuals=residuals)).float()
        uncond, text = e[0::2], e[1::2]
        return uncond + self.guidance_scale * (text - uncond)
