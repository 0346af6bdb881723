"""Timestep schedules: the noise levels a run's steps visit, as the points minifusion.samplers step between.

A point is (t, alpha, sigma): the UNet is told t, and the state there is x_t = alpha x0 + sigma eps, variance
preserving (alpha^2 + sigma^2 = 1, alpha^2 = abar_t). k-diffusion's "sigma" is sigma / alpha, the noise level of
x_t / alpha = x0 + (sigma / alpha) eps; below it is called the VE sigma, s.

  leading      SDXL's own (its scheduler config: diffusers' timestep_spacing "leading", steps_offset 1):
               t_i = (N - 1 - i) (1000 // N) + 1, the paper's and the official pipeline's; Automatic1111's "DDIM"
               schedule type and ComfyUI's "ddim_uniform" space them the same way
  trailing     t_i = round(1000 - i 1000 / N) - 1, starting at t = 999 (diffusers' "trailing"; Lin et al. 2024,
               Table 2): what few-step distilled models are made for; Automatic1111's and ComfyUI's "SGM Uniform"
               space t the same way without rounding to integers (under one timestep apart)
  karras       Karras et al. 2022, Eq. 5 with rho = 7, between the model's s(t = 0) and s(t = 999) (k-diffusion's
               get_sigmas_karras as Automatic1111 calls it; diffusers' DPMSolverMultistepScheduler use_karras_sigmas)
  exponential  log-linear in s over the same range (k-diffusion's get_sigmas_exponential)
  ays          NVIDIA's Align Your Steps noise levels for SDXL (diffusers' AysSchedules["StableDiffusionXLSigmas"]
               at 10 steps), log-linearly interpolated to other step counts as ComfyUI's AlignYourStepsScheduler does
  explicit     integer timesteps given by the user, e.g. DMD2's [999, 749, 499, 249]

A sigma schedule tells the UNet the fractional timestep of each s, interpolated in log s over the model's table
(k-diffusion's sigma_to_t, diffusers' _sigma_to_t), as Automatic1111 and diffusers' EulerDiscreteScheduler do.
The last point, where the final step lands, belongs to the sampler (minifusion.samplers.terminal).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

from .settings import TRAIN_STEPS

# NVIDIA, "Align Your Steps" (Sabour et al. 2024), SDXL's 10-step noise levels; the last becomes 0 (ComfyUI, diffusers)
AYS_SDXL = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)
KARRAS_RHO = 7.0


class Point(NamedTuple):
    t: float      # the timestep the UNet is told
    alpha: float  # x_t = alpha x0 + sigma eps
    sigma: float

    @property
    def log_snr(self) -> float:
        """lambda = log(alpha / sigma), the DPM-Solver time (Lu et al. 2022); +inf at sigma = 0."""
        return math.inf if self.sigma == 0 else math.log(self.alpha / self.sigma)


def at(t: int, abar: Sequence[float]) -> Point:
    """The point of an integer timestep, from the model's abar table."""
    return Point(float(t), math.sqrt(abar[t]), math.sqrt(1 - abar[t]))


def from_sigma(s: float, abar: Sequence[float]) -> Point:
    """The point of a VE sigma s: alpha = 1 / sqrt(1 + s^2), and the fractional timestep of s."""
    return Point(sigma_to_t(s, abar), 1 / math.sqrt(1 + s * s), s / math.sqrt(1 + s * s))


def ve_sigmas(abar: Sequence[float]) -> list[float]:
    # finite only where abar > 0: a zero-terminal-SNR table comes here floored (minifusion.samplers)
    return [math.sqrt((1 - a) / a) for a in abar]


def sigma_to_t(s: float, abar: Sequence[float]) -> float:
    """diffusers' _sigma_to_t (k-diffusion's DiscreteSchedule.sigma_to_t): linear in log s between the two
    table entries around s, clamped to the table."""
    logs = [math.log(v) for v in ve_sigmas(abar)]
    ls = math.log(max(s, 1e-10))
    low = min(max(sum(1 for v in logs if ls >= v) - 1, 0), len(logs) - 2)
    w = min(max((logs[low] - ls) / (logs[low] - logs[low + 1]), 0.0), 1.0)
    return (1 - w) * low + w * (low + 1)


def leading(steps: int) -> list[int]:
    ratio = TRAIN_STEPS // steps
    return [(steps - 1 - i) * ratio + 1 for i in range(steps)]


def trailing(steps: int) -> list[int]:
    # diffusers: np.arange(1000, 0, -1000 / N).round() - 1, with numpy's arithmetic (start + i * delta, delta
    # = (start + step) - start) so that halves round alike (half to even, as round() does); numpy's arange
    # gives some N (61, 122, ...) one more entry, t = -1, which is left out
    delta = (TRAIN_STEPS - TRAIN_STEPS / steps) - TRAIN_STEPS
    return [round(TRAIN_STEPS + i * delta) - 1 for i in range(steps)]


def karras(steps: int, s_min: float, s_max: float) -> list[float]:
    lo, hi = s_min ** (1 / KARRAS_RHO), s_max ** (1 / KARRAS_RHO)
    return [(hi + (i / max(steps - 1, 1)) * (lo - hi)) ** KARRAS_RHO for i in range(steps)]


def exponential(steps: int, s_min: float, s_max: float) -> list[float]:
    return [math.exp(math.log(s_max) + (i / max(steps - 1, 1)) * (math.log(s_min) - math.log(s_max)))
            for i in range(steps)]


def ays(steps: int) -> list[float]:
    """ComfyUI's AlignYourStepsScheduler: the 11 levels interpolated to steps + 1 (linear in log s over an even
    grid), the last one (set to 0 there) left to the sampler."""
    levels = list(AYS_SDXL)
    if steps + 1 != len(levels):
        logs = [math.log(v) for v in reversed(levels)]
        out = []
        for k in range(steps + 1):
            x = k / steps * (len(logs) - 1)
            j = min(int(x), len(logs) - 2)
            out.append(math.exp(logs[j] + (x - j) * (logs[j + 1] - logs[j])))
        levels = out[::-1]
    return levels[:steps]


def points(name: str, steps: int, abar: Sequence[float]) -> list[Point]:
    """The `steps` points a schedule evaluates the model at, on the model's abar table (abar_999 > 0)."""
    if name == "leading":
        if steps >= TRAIN_STEPS:  # t_0 = steps: the offset of 1 leaves room for 999 steps (diffusers fails on 1000)
            raise ValueError(f"num_inference_steps {steps} is invalid with the leading schedule; it must be at most "
                             f"{TRAIN_STEPS - 1} (or use the trailing schedule)")
        return [at(t, abar) for t in leading(steps)]
    if name == "trailing":
        return [at(t, abar) for t in trailing(steps)]
    s = ve_sigmas(abar)
    sigmas = {"karras": lambda: karras(steps, s[0], s[-1]), "exponential": lambda: exponential(steps, s[0], s[-1]),
              "ays": lambda: ays(steps)}[name]()
    return [from_sigma(v, abar) for v in sigmas]
