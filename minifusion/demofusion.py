"""DemoFusion sampling (Du et al., CVPR 2024, arXiv 2311.16973) as the reference implementation does it.

Phase 1 is plain SDXL sampling at the base size. Every later scale s = 2..S upsamples the previous result,
re-noises it (Eq. 2) and denoises it again; each step first mixes in the re-noised upsample (skip residual,
Eq. 3), then fuses overlapping local windows (MultiDiffusion) with s x s dilated global views (Eq. 4-6).
Every mechanism is a pure tensor function below; `demofusion` wires them up like the paper's Algorithm 1.

The fusion happens inside the denoiser, as the tiled-diffusion extensions that work with every sampler do
(ComfyUI-TiledDiffusion, Automatic1111's multidiffusion-upscaler): every view's guided model output is put back
on the whole canvas (windows averaged, dilated views scattered, Eq. 5's mix), and then one sampler step
(minifusion.samplers) moves the canvas. The reference steps each view and averages the stepped views instead;
for DDIM and Euler, whose step is affine in (state, model output) with the same coefficients for every view,
the two are the same numbers up to float rounding, while a multistep solver now keeps one history for the
canvas and a stochastic one draws one noise tensor for it (in the reference each view batch overwrites the
history and the overlaps average the noise away). The skip residual is a change of state the sampler is told
about (`samplers.sample(change=...)`).
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, NamedTuple

import torch
import torch.nn.functional as F

from .samplers import Sampling, randn, run_steps, sample
from .schedulers import Choice
from .schedules import TRAIN_STEPS
from .settings import BY_NAME
from .views import Cond, Dilated, ViewRunner, Whole, Window

LATENT_CHANNELS = 4
DEFAULT = {name: row.default for name, row in BY_NAME.items()}  # the table's defaults, the paper's knobs among them


def scale_sizes(height: int, width: int, base: int) -> list[tuple[int, int]]:
    """Latent (h, w) of scales 1..S for a height x width px image on a model native at base px."""
    n = int(max(height, width) / base)
    if n < 1:
        raise ValueError(f"{height}x{width} is smaller than the model's native {base} px")
    sizes = [(height // n // 8, width // n // 8)]
    # the reference's own float expression, so int() truncates exactly as it does (768 * aspect must be 512.0)
    aspect = min(height / base, width / base) / max(height / base, width / base)
    for s in range(2, n + 1):
        long, short = base * s, int(base * s * aspect)
        h, w = (long, short) if height > width else (short, long)
        sizes.append((int(h / 8), int(w / 8)))
    return sizes


def cosine_factor(t: int) -> float:
    # decays from 1 at t = 1000 to 0 at t = 0: the guiding terms fade out as denoising proceeds
    return 0.5 * (1 + math.cos(math.pi * (TRAIN_STEPS - t) / TRAIN_STEPS))


def skip_residual(z: torch.Tensor, z_renoised: torch.Tensor, t: int, cosine_scale_1: float) -> torch.Tensor:
    c1 = cosine_factor(t) ** cosine_scale_1
    return (1 - c1) * z + c1 * z_renoised  # Eq. 3


def fuse(local: torch.Tensor, global_: torch.Tensor, t: int, cosine_scale_2: float) -> torch.Tensor:
    c2 = cosine_factor(t) ** cosine_scale_2
    return (1 - c2) * local + c2 * global_  # Eq. 5


def renormalise(z: torch.Tensor, mean: torch.Tensor | float, std: torch.Tensor | float) -> torch.Tensor:
    # end of each scale >= 2: back to phase 1's global statistics (unbiased std), as the reference does
    return (z - z.mean()) / z.std() * std + mean


def upsample(z: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(z, size=size, mode="bicubic")  # progressive upscaling: z' of Eq. 2


def window_margin(window: int, stride: int) -> int:
    return (window - stride) // 4


def _starts(size: int, window: int, stride: int) -> list[int]:
    n = -(-(size - window) // stride) + 1
    return [min(i * stride, size - window) for i in range(n)]  # the last one shifted back to end at the border


def _jitter(u: float, start: int, window: int, size: int, margin: int) -> int:
    # a border window only moves towards its border, into the zero margin, so border latents stay covered
    lo = 0 if start + window == size else -margin
    hi = 0 if start == 0 else margin
    return lo + int(u * (hi - lo + 1))


def local_windows(h: int, w: int, window: int, stride: int, jitter: bool = False,
                  generator: torch.Generator | None = None) -> list[tuple[int, int, int, int]]:
    """MultiDiffusion windows (top, bottom, left, right) in the latents zero-padded by window_margin on every
    side. An axis shorter than the window gets one window spanning it."""
    if not 0 < stride <= window:
        raise ValueError(f"stride {stride} must be in 1..window ({window})")
    margin = window_margin(window, stride)
    wh, ww = min(window, h), min(window, w)
    corners = [(r, c) for r in _starts(h, wh, stride) for c in _starts(w, ww, stride)]
    if jitter:
        device = generator.device if generator is not None else None
        u = torch.rand(len(corners), 2, generator=generator, device=device, dtype=torch.float64).tolist()
        corners = [(r + _jitter(ur, r, wh, h, margin), c + _jitter(uc, c, ww, w, margin))
                   for (r, c), (ur, uc) in zip(corners, u)]
    return [(r + margin, r + margin + wh, c + margin, c + margin + ww) for r, c in corners]


def local_views(z: torch.Tensor, windows: list[tuple[int, int, int, int]], margin: int) -> torch.Tensor:
    """The local windows (top, bottom, left, right) of the latents zero-padded by margin, stacked."""
    zp = F.pad(z, (margin, margin, margin, margin))
    return torch.cat([zp[:, :, a:b, c:d] for a, b, c, d in windows])


def merge_windows(views: torch.Tensor, windows: list[tuple[int, int, int, int]], margin: int,
                  size: tuple[int, int]) -> torch.Tensor:
    """Put the denoised windows back and average where they overlap (MultiDiffusion, Eq. 4's local paths)."""
    out = views.split(len(views) // len(windows))
    b, c = out[0].shape[:2]
    value = views.new_zeros(b, c, size[0] + 2 * margin, size[1] + 2 * margin)
    count = views.new_zeros(1, 1, *value.shape[-2:])
    for o, (top, bottom, left, right) in zip(out, windows):
        value[:, :, top:bottom, left:right] += o
        count[:, :, top:bottom, left:right] += 1
    inner = (slice(None), slice(None), slice(margin, margin + size[0]), slice(margin, margin + size[1]))
    return value[inner] / count[inner]


def pad_to_multiple(z: torch.Tensor, s: int) -> tuple[torch.Tensor, tuple[int, int]]:
    ph, pw = -z.shape[-2] % s, -z.shape[-1] % s
    return F.pad(z, (pw, 0, ph, 0)), (ph, pw)  # zeros at the top and left, as the reference pads


def gaussian_blur(z: torch.Tensor, kernel_size: int, std: float) -> torch.Tensor:
    x = torch.arange(kernel_size, dtype=torch.float32, device=z.device) - (kernel_size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * std ** 2))
    g = g / g.sum()
    k = (g[:, None] * g[None, :]).to(z.dtype).expand(z.shape[1], 1, kernel_size, kernel_size)
    return F.conv2d(z, k, padding=kernel_size // 2, groups=z.shape[1])  # zero-padded, per channel


def blur_rescaled(zp: torch.Tensor, s: int, std: float) -> torch.Tensor:
    # Eq. 6 with the reference's kernel 2s - 1 (the paper says 4s - 3); rescaled to the unblurred tensor's
    # global mean and std so blurring removes detail without shrinking the latents' scale
    b = gaussian_blur(zp, 2 * s - 1, std)
    return (b - b.mean()) / b.std() * zp.std() + zp.mean()


def dilate(z: torch.Tensor, s: int) -> torch.Tensor:
    """The s*s views z[:, :, i::s, j::s], stacked as view i*s + j (batch inner); sides must divide by s."""
    b, c, h, w = z.shape
    return z.reshape(b, c, h // s, s, w // s, s).permute(3, 5, 0, 1, 2, 4).reshape(s * s * b, c, h // s, w // s)


def undilate(views: torch.Tensor, s: int) -> torch.Tensor:
    """Inverse of dilate: scatter every view back to its strided positions."""
    n, c, h, w = views.shape
    return views.reshape(s, s, n // (s * s), c, h, w).permute(2, 3, 4, 0, 5, 1).reshape(n // (s * s), c, h * s, w * s)


def global_views(z: torch.Tensor, s: int, blur_std: float) -> tuple[torch.Tensor, tuple[int, int]]:
    """Shifted dilated sampling (Eq. 4-6): the s*s dilated views of the zero-padded latents' blurred copy (what
    the UNet sees; the sampler step moves the unblurred canvas), and the padding."""
    zp, pad = pad_to_multiple(z, s)
    return dilate(blur_rescaled(zp, s, blur_std), s), pad


def merge_dilated(views: torch.Tensor, s: int, pad: tuple[int, int]) -> torch.Tensor:
    """Scatter the dilated views' outputs back to their strided positions and drop the padding."""
    return undilate(views, s)[:, :, pad[0]:, pad[1]:]


class ScaleStats(NamedTuple):
    latent_size: tuple[int, int]
    windows: int        # local windows per step (0 in phase 1)
    dilated_views: int  # global views per step, s*s (0 in phase 1)
    unet_evals: int     # UNet batch items over the scale: views x CFG halves x steps (work.describe's count)
    unet_calls: int     # UNet forward calls over the scale


class ScaleResult(NamedTuple):
    scale: int  # 1 = phase 1
    latents: torch.Tensor
    stats: ScaleStats
    anchor: tuple  # phase 1's latent mean and std (0-dim tensors, or a resumed run's floats): every later scale's


class Resume(NamedTuple):
    """Continue a run from a finished scale: its latents and phase 1's statistics (the renormalisation
    anchor). The caller restores the generator state saved with them to continue the same random stream."""
    scale: int
    latents: torch.Tensor
    anchor_mean: float
    anchor_std: float


@torch.no_grad()
def demofusion(unet: Callable, cond: Cond, *, height: int, width: int, base_px: int, window: int, steps: int,
               guidance_scale: float, stride: int, generator: torch.Generator | None = None,
               view_batch_size: int = DEFAULT["view_batch"], cosine_scale_1: float = DEFAULT["c1"],
               cosine_scale_2: float = DEFAULT["c2"], cosine_scale_3: float = DEFAULT["c3"],
               sigma: float = DEFAULT["sigma"], jitter: bool = DEFAULT["jitter"],
               latents: torch.Tensor | None = None, noise: list[torch.Tensor] | None = None,
               sampler: str | Sampling = DEFAULT["sampler"], strength: float = DEFAULT["strength"],
               guidance_rescale: float = DEFAULT["guidance_rescale"],
               progress: Callable[[int, int, int, int], None] | None = None, resume: Resume | None = None,
               on_out_of_memory: Callable[[int], None] | None = None,
               runner: Callable[..., ViewRunner] = ViewRunner) -> Iterator[ScaleResult]:
    """Yield ScaleResult(scale, latents, stats, anchor) as each scale 1..S finishes; scales >= 2 renormalised to
    the anchor, phase 1's statistics.

    unet(latents (N,4,h,w), timesteps (N,), context (N,L,C), pooled (N,P), time_ids (N,6)) -> the model's output.
    The knobs' defaults are minifusion.settings' (the paper's). sampler: a samplers.Sampling (sampler, schedule,
    model noise schedule), or a sampler's short name run on SDXL's schedule with `steps` steps. strength: scales
    >= 2 re-noise to the point that leaves the last steps x strength steps (samplers.run_steps) and run those.
    guidance_rescale: views.rescale_guidance.
    latents: phase-1 initial noise (1,4,h,w); noise: one tensor per scale >= 2. What is not injected is drawn from
    `generator`, in that order (phase-1 noise, then per scale its noise, and per step the window jitter and the
    sampler's noise). progress(scale, step, steps run at the scale, unet_evals so far in this scale) after each
    step, and with step 0 as each scale begins.
    resume: start after a finished scale instead of at phase 1.
    Every step's views go through one `runner` (views.ViewRunner, or a factory taking its arguments: a
    ControlNet or minifusion.distributed plug in there), which batches them view_batch_size at a time and
    halves the batch when memory runs out (on_out_of_memory(new batch) is told).
    """
    run = Choice(sampler).sampling(steps) if isinstance(sampler, str) else sampler
    sizes = scale_sizes(height, width, base_px)
    device = cond.context.device
    margin = window_margin(window, stride)
    run_views = runner(unet, cond, size=(height, width), guidance_scale=guidance_scale, batch=view_batch_size,
                       guidance_rescale=guidance_rescale, on_out_of_memory=on_out_of_memory)

    def report(s: int, begin: int, evals: int) -> Callable[[int], None] | None:
        # scale s runs the schedule's steps begin .. N - 1
        if progress is None:
            return None
        progress(s, 0, run.steps - begin, 0)
        return lambda i: progress(s, i - begin + 1, run.steps - begin, run_views.evals - evals)

    if noise is not None and len(noise) != len(sizes) - 1:
        raise ValueError(f"{len(sizes)} scales need {len(sizes) - 1} noise tensors, got {len(noise)}")
    if resume is None:
        # phase 1: ordinary SDXL sampling at the base size, from pure noise (x_T = eps: variance preserving)
        if latents is None:
            latents = randn((1, LATENT_CHANNELS, *sizes[0]), generator, device)
        if latents.shape != (1, LATENT_CHANNELS, *sizes[0]):
            raise ValueError(f"phase-1 latents must be {(1, LATENT_CHANNELS, *sizes[0])}, got {tuple(latents.shape)}")

        def whole(x: torch.Tensor, i: int) -> torch.Tensor:
            return run_views([(x, [Whole()])], run.timestep(i), i, 1, run.steps)[0]

        z = sample(run, whole, latents.to(device, torch.float32), generator=generator,
                   on_step=report(1, 0, 0))
        anchor_mean, anchor_std = z.mean(), z.std()  # what every later scale is renormalised to
        yield ScaleResult(1, z, ScaleStats(sizes[0], 0, 0, run_views.evals, run_views.calls), (anchor_mean, anchor_std))
        first = 2
    else:
        if not 1 <= resume.scale <= len(sizes) or resume.latents.shape[-2:] != sizes[resume.scale - 1]:
            raise ValueError(f"cannot resume: scale {resume.scale} latents of size {tuple(resume.latents.shape[-2:])} "
                             f"do not fit a {width}x{height} run (its scales are {sizes})")
        z = resume.latents.to(device, torch.float32)
        anchor_mean, anchor_std = resume.anchor_mean, resume.anchor_std
        first = resume.scale + 1

    n = run_steps(run.steps, strength)
    start = run.steps - n  # strength < 1: the first steps are skipped
    for s in range(first, len(sizes) + 1):
        evals, calls = run_views.evals, run_views.calls
        z_up = upsample(z, sizes[s - 1])
        eps = noise[s - 2].to(device, torch.float32) if noise is not None else randn(z_up.shape, generator, device)
        if eps.shape != z_up.shape:
            raise ValueError(f"scale {s} noise must be {tuple(z_up.shape)}, got {tuple(eps.shape)}")
        h, w = z_up.shape[-2:]
        n_windows = len(local_windows(h, w, window, stride))

        def skip(x: torch.Tensor, i: int) -> torch.Tensor:
            # Eq. 2 (the same eps at every t), Eq. 3
            return skip_residual(x, run.add_noise(z_up, eps, i), run.timestep(i), cosine_scale_1)

        def fused(x: torch.Tensor, i: int) -> torch.Tensor:
            t = run.timestep(i)
            windows = local_windows(h, w, window, stride, jitter, generator)
            c3 = 0.99 * cosine_factor(t) ** cosine_scale_3 + 0.01
            blurred, pad = global_views(x, s, sigma * c3)
            # every UNet view of the step at once: the UNet sees the blurred dilated views (Eq. 6)
            out_local, out_global = run_views(
                [(local_views(x, windows, margin), [Window(*box, margin) for box in windows]),
                 (blurred, [Dilated(a, b, s, *pad) for a in range(s) for b in range(s)])], t, i - start, s, n)
            # the outputs on the canvas: windows averaged (Eq. 4), dilated views put back, the two mixed (Eq. 5)
            return fuse(merge_windows(out_local, windows, margin, (h, w)), merge_dilated(out_global, s, pad), t,
                        cosine_scale_2)

        z = sample(run, fused, run.add_noise(z_up, eps, start), first=start, change=skip,  # Eq. 2 at the start
                   generator=generator, on_step=report(s, start, evals))
        z = renormalise(z, anchor_mean, anchor_std)
        yield ScaleResult(s, z, ScaleStats(sizes[s - 1], n_windows, s * s, run_views.evals - evals,
                                           run_views.calls - calls), (anchor_mean, anchor_std))
