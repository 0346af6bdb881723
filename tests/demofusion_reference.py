"""THE PRE-CHANGE REFERENCE, kept as a test oracle only: the DemoFusion loop and the DDIM / Euler schedulers as
minifusion ran them before the sampler became a denoiser (commit 06b9296, minifusion/demofusion.py and
minifusion/schedulers.py), which is also how the official pipeline runs: every view is stepped by the scheduler
and the stepped views are averaged. tests/test_denoiser.py checks that fusing the model outputs and stepping the
canvas once gives the same latents. Do not use it anywhere else, and do not "fix" it: it is the old behaviour.
Only the mechanisms (windows, dilated views, blur, fusion) are imported from minifusion.demofusion; they did not
change (global views are rebuilt here from pad_to_multiple, dilate and blur_rescaled, as the old code did).
"""
from __future__ import annotations

import torch

from minifusion.demofusion import (LATENT_CHANNELS, blur_rescaled, cosine_factor, dilate, fuse, local_views,
                                   local_windows, merge_dilated, merge_windows, pad_to_multiple, renormalise,
                                   scale_sizes, skip_residual, upsample, window_margin)
from minifusion.views import Dilated, Whole, Window, time_ids

TRAIN_STEPS = 1000


def alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, TRAIN_STEPS, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def leading_timesteps(steps: int) -> list[int]:
    ratio = TRAIN_STEPS // steps
    return [(steps - 1 - i) * ratio + 1 for i in range(steps)]


class DDIM:
    init_sigma = 1.0

    def __init__(self, steps: int):
        self.timesteps = leading_timesteps(steps)
        self.abar = alphas_cumprod().tolist()

    def alpha(self, t: int) -> float:
        return self.abar[t] if t >= 0 else self.abar[0]

    def scale_input(self, x, t):
        return x

    def add_noise(self, x0, eps, t):
        a = self.alpha(t)
        return a ** 0.5 * x0 + (1 - a) ** 0.5 * eps

    def step(self, x, eps, t, t_prev):
        a, a_prev = self.alpha(t), self.alpha(t_prev)
        x0 = (x - (1 - a) ** 0.5 * eps) / a ** 0.5
        return a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps


class Euler:
    def __init__(self, steps: int):
        self.timesteps = leading_timesteps(steps)
        self.abar = alphas_cumprod().tolist()
        self.init_sigma = (self.sigma(self.timesteps[0]) ** 2 + 1) ** 0.5

    def sigma(self, t: int) -> float:
        return ((1 - self.abar[t]) / self.abar[t]) ** 0.5 if t >= 0 else 0.0

    def scale_input(self, x, t):
        return x / (self.sigma(t) ** 2 + 1) ** 0.5

    def add_noise(self, x0, eps, t):
        return x0 + self.sigma(t) * eps

    def step(self, x, eps, t, t_prev):
        return x + (self.sigma(t_prev) - self.sigma(t)) * eps


SCHEDULERS = {"ddim": DDIM, "euler": Euler}


def guided_eps(unet, cond, size, guidance_scale, batch, x, views, t):
    """The old ViewRunner: batches of views, each twice (uncond, cond interleaved), then guidance."""
    out = []
    for k in range(0, len(x), batch):
        xs, vs = x[k:k + batch], views[k:k + batch]
        n = len(xs)
        e = unet(xs.repeat_interleave(2, dim=0), torch.full((2 * n,), float(t)), cond.context.repeat(n, 1, 1),
                 cond.pooled.repeat(n, 1), time_ids(size, vs).repeat_interleave(2, dim=0)).float()
        out.append(e[0::2] + guidance_scale * (e[1::2] - e[0::2]))
    return torch.cat(out)


@torch.no_grad()
def demofusion_reference(unet, cond, *, height, width, base_px, window, steps, guidance_scale, generator=None,
                         stride=64, view_batch_size=16, cosine_scale_1=3.0, cosine_scale_2=1.0, cosine_scale_3=1.0,
                         sigma=0.8, jitter=True, latents=None, noise=None, scheduler="ddim") -> list[torch.Tensor]:
    """Every scale's final latents, as the pre-change loop computed them (on the CPU)."""
    sch = SCHEDULERS[scheduler](steps)
    pairs = list(zip(sch.timesteps, sch.timesteps[1:] + [-1]))
    sizes = scale_sizes(height, width, base_px)
    margin = window_margin(window, stride)
    size = (height, width)
    if latents is None:
        latents = torch.randn((1, LATENT_CHANNELS, *sizes[0]), generator=generator)
    z = latents.float() * sch.init_sigma
    for t, t_prev in pairs:
        z = sch.step(z, guided_eps(unet, cond, size, guidance_scale, 1, sch.scale_input(z, t), [Whole()], t), t, t_prev)
    out = [z]
    anchor_mean, anchor_std = z.mean(), z.std()
    for s in range(2, len(sizes) + 1):
        z_up = upsample(z, sizes[s - 1])
        eps = noise[s - 2].float() if noise is not None else torch.randn(z_up.shape, generator=generator)
        h, w = z_up.shape[-2:]
        z = sch.add_noise(z_up, eps, pairs[0][0])
        for t, t_prev in pairs:
            z = skip_residual(z, sch.add_noise(z_up, eps, t), t, cosine_scale_1)
            windows = local_windows(h, w, window, stride, jitter, generator)
            local = local_views(z, windows, margin)
            c3 = 0.99 * cosine_factor(t) ** cosine_scale_3 + 0.01
            zp, pad = pad_to_multiple(z, s)
            dilated, blurred = dilate(zp, s), dilate(blur_rescaled(zp, s, sigma * c3), s)
            views = [Window(*box, margin) for box in windows]
            eps_local = guided_eps(unet, cond, size, guidance_scale, view_batch_size, sch.scale_input(local, t),
                                   views, t)
            eps_global = guided_eps(unet, cond, size, guidance_scale, view_batch_size, sch.scale_input(blurred, t),
                                    [Dilated(i, j, s, *pad) for i in range(s) for j in range(s)], t)
            z = fuse(merge_windows(sch.step(local, eps_local, t, t_prev), windows, margin, (h, w)),
                     merge_dilated(sch.step(dilated, eps_global, t, t_prev), s, pad), t, cosine_scale_2)
        z = renormalise(z, anchor_mean, anchor_std)
        out.append(z)
    return out
