"""Where a step's views become UNet calls: the one seam that knows about batching, guidance and memory faults.

A view is what the UNet denoises in one go: phase 1's whole latents, a local window (MultiDiffusion) or one of
the s x s dilated views (shifted dilated sampling). The sampler hands over every view of a step with its
geometry; `ViewRunner` batches the views into UNet calls (each view twice for classifier-free guidance, once when
the guidance scale is at most 1, where guidance would change nothing) and hands back each view's guided model
output. Capabilities that depend on where a view sits plug in here and
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


Group = tuple[torch.Tensor, list[View]]  # views (n, C, h, w), the UNet's input, and their geometry


def halves(guidance_scale: float) -> int:
    """UNet rows per view: 2 (unconditioned and text-conditioned) for classifier-free guidance, 1 where the guidance
    scale is at most 1 (diffusers' do_classifier_free_guidance: the text-conditioned row alone)."""
    return 2 if guidance_scale > 1 else 1


def batches(n: int, batch: int) -> list[tuple[int, int]]:
    """The UNet calls of n views of one group, at most `batch` views a call, in order: (first view, end)."""
    return [(k, min(k + batch, n)) for k in range(0, n, batch)]


def rescale_guidance(guided: torch.Tensor, text: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """diffusers' rescale_noise_cfg (Lin et al. 2024, §3.4; Automatic1111's "CFG Rescale"): each view's guided
    output moved towards the text-conditioned output's standard deviation by guidance_rescale."""
    dims = list(range(1, guided.dim()))
    rescaled = guided * (text.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided


class ViewRunner:
    """Batches views into UNet calls of at most `batch` views, each group of views on its own (the views of a
    group share a size). unet(latents, timesteps, context, pooled, time_ids[, residuals=]) -> model output.
    control(x, t, context, pooled, time_ids, views, step=, steps=, scale=, halves=) -> ControlNet residuals for
    one call, or None. guidance_rescale: see rescale_guidance.

    When a call runs out of memory the batch is halved for the rest of the run and the call retried (the same
    views, so the same result); on_out_of_memory(new batch) is told. Only a single view that does not fit is an
    error. `evals` and `calls` count UNet batch items and forward calls."""

    def __init__(self, unet: Callable, cond: Cond, *, size: tuple[int, int], guidance_scale: float, batch: int,
                 guidance_rescale: float = 0.0, control: Callable | None = None,
                 on_out_of_memory: Callable[[int], None] | None = None):
        self.unet, self.cond, self.size, self.guidance_scale = unet, cond, size, guidance_scale
        self.guidance_rescale, self.halves = guidance_rescale, halves(guidance_scale)
        self.batch, self.control, self.on_out_of_memory = batch, control, on_out_of_memory
        self.device, self.dtype = cond.context.device, cond.context.dtype
        self.evals = self.calls = 0

    def __call__(self, groups: list[Group], t: float, step: int, scale: int, steps: int | None = None
                 ) -> list[torch.Tensor]:
        """Guided model outputs for every group, in order. step: index in the scale's `steps`; scale: 1..S."""
        out = []
        for x, views in groups:
            outputs, k = [], 0
            while k < len(x):
                n = min(self.batch, len(x) - k)
                try:
                    outputs.append(self.call(x[k:k + n], views[k:k + n], t, step, scale, steps))
                except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
                    if not is_out_of_memory(err) or n == 1:
                        raise
                    self.halve(n)
                    continue
                self.evals, self.calls, k = self.evals + self.halves * n, self.calls + 1, k + n
            out.append(torch.cat(outputs))
        return out

    def halve(self, n: int) -> None:
        self.batch = n // 2
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.on_out_of_memory is not None:
            self.on_out_of_memory(self.batch)

    def call(self, x: torch.Tensor, views: list[View], t: float, step: int, scale: int,
             steps: int | None = None) -> torch.Tensor:
        """One UNet call on n views: each twice (uncond, cond interleaved) then guidance, or once (text only)."""
        n, k = len(x), self.halves
        rows = slice(None) if k == 2 else slice(1, 2)  # Cond's row 0 is the negative prompt, row 1 the prompt
        args = (x.repeat_interleave(k, dim=0).to(self.dtype), torch.full((k * n,), float(t), device=self.device),
                self.cond.context[rows].repeat(n, 1, 1), self.cond.pooled[rows].repeat(n, 1),
                time_ids(self.size, views).repeat_interleave(k, dim=0).to(self.device))
        residuals = None if self.control is None else self.control(*args, views, step=step, steps=steps, scale=scale,
                                                                   halves=k)
        e = (self.unet(*args) if residuals is None else self.unet(*args, residuals=residuals)).float()
        if k == 1:
            return e
        uncond, text = e[0::2], e[1::2]
        guided = uncond + self.guidance_scale * (text - uncond)
        return guided if not self.guidance_rescale else rescale_guidance(guided, text, self.guidance_rescale)
