"""SDXL's noise schedules, stateless: DDIM (eta = 0) and Euler, both with "leading" timestep spacing.

A scheduler object only holds its timestep list; every method is a pure function of (tensors, t, t_prev),
so DemoFusion can step hundreds of views per timestep without hidden step counters. `t_prev = -1` marks
the last step (for leading spacing t_prev = t - 1000 // steps, which is negative exactly there).

Both share one interface:
  timesteps          [t_0 > t_1 > ...], t_i = (N - 1 - i) * (1000 // N) + 1
  init_sigma         scale of the initial Gaussian noise
  scale_input(x, t)  what the UNet sees (it was trained on variance-preserving x_t)
  add_noise(x0, eps, t)
  step(x, eps, t, t_prev)

Euler's state is not the variance-preserving x_t = sqrt(abar) x0 + sqrt(1 - abar) eps but x_t / sqrt(abar)
= x0 + sigma eps, sigma = sqrt((1 - abar) / abar). In that space DDIM (eta = 0) is the same step,
x + (sigma_prev - sigma) eps; the two differ only in where the last step lands (sigma 0 vs abar_0) and in
the state's scale, one positive scalar per t shared by every latent. DemoFusion's operations are convex
combinations of states at the same t (skip residual, window averaging, fusion) or scale with their input
(zero padding, the blur rescaled to the unblurred tensor's mean and std), so they commute with that
scalar: run in Euler's own space, with Eq. 2's re-noising written x0 + sigma_t eps (what the reference
gets from EulerDiscreteScheduler.add_noise), they are the DDIM-space operations, only rescaled.
"""
from __future__ import annotations

import torch

TRAIN_STEPS = 1000


def alphas_cumprod() -> torch.Tensor:
    # SDXL's "scaled_linear" betas, in float32 as the reference computes them, so steps agree to rounding
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, TRAIN_STEPS, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def leading_timesteps(steps: int) -> list[int]:
    # "leading" spacing with steps_offset 1 (SDXL's scheduler config)
    ratio = TRAIN_STEPS // steps
    return [(steps - 1 - i) * ratio + 1 for i in range(steps)]


class DDIM:
    """DDIM with eta = 0 (deterministic); the last step lands on abar_0, not 1 (set_alpha_to_one=False)."""

    init_sigma = 1.0

    def __init__(self, steps: int):
        self.timesteps = leading_timesteps(steps)
        self.abar = alphas_cumprod().tolist()

    def alpha(self, t: int) -> float:
        return self.abar[t] if t >= 0 else self.abar[0]

    def scale_input(self, x: torch.Tensor, t: int) -> torch.Tensor:
        return x

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
        a = self.alpha(t)
        return a ** 0.5 * x0 + (1 - a) ** 0.5 * eps

    def step(self, x: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int) -> torch.Tensor:
        a, a_prev = self.alpha(t), self.alpha(t_prev)
        x0 = (x - (1 - a) ** 0.5 * eps) / a ** 0.5
        return a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps


class Euler:
    """Euler (EulerDiscreteScheduler, s_churn 0, linear interpolation, final sigma 0) on x_sigma = x0 + sigma eps."""

    def __init__(self, steps: int):
        self.timesteps = leading_timesteps(steps)
        self.abar = alphas_cumprod().tolist()
        # leading spacing starts at sigma_max on a variance-preserving scale: noise * sqrt(sigma_max^2 + 1)
        self.init_sigma = (self.sigma(self.timesteps[0]) ** 2 + 1) ** 0.5

    def sigma(self, t: int) -> float:
        # timesteps are integers, so the linear interpolation of the sigma table is the table entry itself
        return ((1 - self.abar[t]) / self.abar[t]) ** 0.5 if t >= 0 else 0.0

    def scale_input(self, x: torch.Tensor, t: int) -> torch.Tensor:
        return x / (self.sigma(t) ** 2 + 1) ** 0.5

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
        return x0 + self.sigma(t) * eps

    def step(self, x: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int) -> torch.Tensor:
        # dx/dsigma = eps for epsilon prediction
        return x + (self.sigma(t_prev) - self.sigma(t)) * eps


SCHEDULERS = {"ddim": DDIM, "euler": Euler}
