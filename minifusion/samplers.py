"""Samplers: how the steps of a run move the state between the points of a schedule (minifusion.schedules).

The state is x = alpha x0 + sigma eps, variance preserving: the UNet's own input, what diffusers' DDIM, DPM-Solver
and UniPC step. The model's output at a point (eps or v) becomes the predicted clean latents x0 and noise eps at
the state it was computed on (`Sampling.predict`); a method maps (state, x0, eps) to the state at the next point.
Every method is a small function, stateless: a multistep solver's earlier predictions are its `history`, passed
in and handed back. A stochastic method draws one noise tensor of the state's shape per step from the run's
generator, only when it uses it.

`sample` runs the steps on a model output function `denoise(x, i)`. DemoFusion (minifusion.demofusion) is such a
function for the whole canvas, and changes the state at the start of every step (its skip residual, Eq. 3):
`change(x, i)`. That is not a step; the sampler is told, so that the change applies to the state it carries on.
It matters for UniPC only, whose corrector rebuilds the state from the previous one.

Where alpha = 0 (a zero-terminal-SNR model's t = 999), a method that divides by alpha — k-diffusion's sigma =
sigma / alpha, DPM-Solver's log-SNR, and epsilon prediction's x0 = (x - sigma eps) / alpha — uses abar floored at
2^-24, as diffusers' Euler, DPM-Solver and UniPC schedulers do; DDIM, LCM and TCD with v-prediction divide by
nothing and keep the exact zero, as diffusers' do.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch

from . import schedules
from .noise import NoiseSchedule
from .schedules import Point

ABAR_FLOOR = 2.0 ** -24  # diffusers' alphas_cumprod[-1] under rescale_betas_zero_snr for sigma-space schedulers
LCM_SIGMA_DATA, LCM_TIMESTEP_SCALING = 0.5, 10.0  # LCMScheduler's defaults, what LCM/LCM-LoRA were distilled with


def randn(shape, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Gaussian noise from `generator` (drawn on its device, so a seed gives the same numbers on every device)."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device)


def run_steps(steps: int, strength: float) -> int:
    """How many of a schedule's steps a run from a re-noised picture takes, the last ones: diffusers' img2img rule
    (Automatic1111's "Denoising strength"); strength 1 runs them all."""
    return min(int(steps * strength), steps)


# ---- the methods: step(x, x0, eps, i, run, history, draw) -> (state at point i + 1, history) ----

def ddim(x, x0, eps, i, run, hist, draw):
    # Song et al. 2021, Eq. 12 (diffusers' DDIMScheduler.step): eta 0 is deterministic, 1 as noisy as DDPM
    p, q = run.points[i], run.points[i + 1]
    std = run.eta * q.sigma / p.sigma * math.sqrt(1 - (p.alpha / q.alpha) ** 2) if run.eta else 0.0
    x = q.alpha * x0 + math.sqrt(q.sigma ** 2 - std ** 2) * eps
    return (x + std * draw() if std else x), hist


def euler(x, x0, eps, i, run, hist, draw):
    # Euler on the probability-flow ODE in k-diffusion's sigma s = sigma / alpha (k-diffusion's sample_euler,
    # diffusers' EulerDiscreteScheduler): x / alpha moves along d = eps from s to s', which is DDIM's point
    # alpha' x0 + sigma' eps. Epsilon prediction: k-diffusion's and diffusers' arithmetic (no x0 needed); v
    # prediction: DDIM's, which divides by nothing (x / alpha loses 4 digits at a zero-terminal-SNR alpha of 2^-12)
    p, q = run.points[i], run.points[i + 1]
    if run.prediction == "epsilon":
        return q.alpha / p.alpha * x + q.alpha * (q.sigma / q.alpha - p.sigma / p.alpha) * eps, hist
    return q.alpha * x0 + q.sigma * eps, hist


def euler_ancestral(x, x0, eps, i, run, hist, draw):
    # k-diffusion's sample_euler_ancestral (diffusers' EulerAncestralDiscreteScheduler at eta 1): an Euler step
    # down to s_down, then fresh noise s_up, with s_down^2 + s_up^2 = s'^2
    p, q = run.points[i], run.points[i + 1]
    s, s_next = p.sigma / p.alpha, q.sigma / q.alpha
    up = min(s_next, run.eta * math.sqrt(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2))
    x = q.alpha * (x0 + math.sqrt(s_next ** 2 - up ** 2) * eps)
    return (x + q.alpha * up * draw() if up else x), hist


def dpmpp_2m(x, x0, eps, i, run, hist, draw):
    # DPM-Solver++(2M) (Lu et al. 2022, Alg. 2; k-diffusion's sample_dpmpp_2m, diffusers'
    # DPMSolverMultistepScheduler): history = the previous x0; the first step and the one to sigma 0 are first order
    p, q = run.points[i], run.points[i + 1]
    if q.sigma == 0:
        return x0, (x0,)
    h = q.log_snr - p.log_snr
    d = x0
    if hist:
        r = (p.log_snr - run.points[i - 1].log_snr) / h
        d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * hist[0]
    return q.sigma / p.sigma * x - q.alpha * math.expm1(-h) * d, (x0,)


def dpmpp_2m_sde(x, x0, eps, i, run, hist, draw):
    # k-diffusion's sample_dpmpp_2m_sde, midpoint (diffusers' DPMSolverMultistepScheduler with algorithm_type
    # "sde-dpmsolver++" at eta 1): the data-prediction SDE solver, fresh noise every step but the last
    p, q = run.points[i], run.points[i + 1]
    if q.sigma == 0:
        return x0, (x0,)
    h = q.log_snr - p.log_snr
    eh = run.eta * h
    x = q.sigma / p.sigma * math.exp(-eh) * x - q.alpha * math.expm1(-h - eh) * x0
    if hist:
        r = (p.log_snr - run.points[i - 1].log_snr) / h
        x = x - 0.5 / r * q.alpha * math.expm1(-h - eh) * (x0 - hist[0])
    return (x + q.sigma * math.sqrt(-math.expm1(-2 * eh)) * draw() if eh else x), (x0,)


def dpmpp_3m_sde(x, x0, eps, i, run, hist, draw):
    # k-diffusion's sample_dpmpp_3m_sde (the third-order multistep of DPM-Solver++ on the SDE): history = the last
    # two x0, warming up through first and second order
    p, q = run.points[i], run.points[i + 1]
    if q.sigma == 0:
        return x0, (x0, *hist[:1])
    h = q.log_snr - p.log_snr
    he = h * (run.eta + 1)
    x = q.sigma / p.sigma * math.exp(-run.eta * h) * x - q.alpha * math.expm1(-he) * x0
    phi_2 = math.expm1(-he) / he + 1
    if hist:
        r0 = (p.log_snr - run.points[i - 1].log_snr) / h
        d1 = d1_0 = (x0 - hist[0]) / r0
        if len(hist) == 2:
            r1 = (run.points[i - 1].log_snr - run.points[i - 2].log_snr) / h
            d1_1 = (hist[0] - hist[1]) / r1
            d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
            d2 = (d1_0 - d1_1) / (r0 + r1)
            x = x - q.alpha * (phi_2 / he - 0.5) * d2
        x = x + q.alpha * phi_2 * d1
    if run.eta:
        x = x + q.sigma * math.sqrt(-math.expm1(-2 * h * run.eta)) * draw()
    return x, (x0, *hist[:1])


def unipc(x, x0, eps, i, run, hist, draw):
    # UniP-2, the predictor of UniPC (Zhao et al. 2023) with B(h) = e^h - 1 ("bh2"), on x0 predictions: diffusers'
    # UniPCMultistepScheduler with its defaults. history = (the last two x0, the state stepped from, its order)
    p, q = run.points[i], run.points[i + 1]
    ms = hist[0] if hist else ()
    order = min(2, run.steps - i, len(ms) + 1)  # warm-up, and first order on the last step
    new = ((x0, *ms[:1]), x, order)
    if q.sigma == 0:
        return x0, new
    h = q.log_snr - p.log_snr
    b = math.expm1(-h)  # h phi_1(h) and B(h) alike for bh2
    x_next = q.sigma / p.sigma * x - q.alpha * b * x0
    if order == 2:
        rk = (run.points[i - 1].log_snr - p.log_snr) / h
        x_next = x_next - q.alpha * b * 0.5 * (ms[0] - x0) / rk
    return x_next, new


def unipc_correct(x0, i, run, hist):
    # UniC: the state the last step landed on, rebuilt from the state it left with the model's output here too
    # (no extra evaluation), of the order of that step (UniPCMultistepScheduler.multistep_uni_c_bh_update)
    (ms, last, order) = hist
    p0, p = run.points[i - 1], run.points[i]
    h = p.log_snr - p0.log_snr
    b = math.expm1(-h)
    x = p.sigma / p0.sigma * last - p.alpha * b * ms[0]
    if order == 1:
        return x - p.alpha * b * 0.5 * (x0 - ms[0])
    rk = (run.points[i - 2].log_snr - p0.log_snr) / h
    g1 = b / -h - 1
    g2 = g1 / -h - 0.5
    b1, b2 = g1 / b, 2 * g2 / b
    rho0 = (b1 - b2) / (1 - rk)  # solves [[1, 1], [rk, 1]] rho = (b1, b2)
    return x - p.alpha * b * (rho0 * (ms[1] - ms[0]) / rk + (b1 - rho0) * (x0 - ms[0]))


def lcm(x, x0, eps, i, run, hist, draw):
    # Latent Consistency Models' multistep sampling (Luo et al. 2023, Alg. 3; diffusers' LCMScheduler.step): the
    # consistency function's boundary scalings, then the next point with fresh noise
    q = run.points[i + 1]
    t = run.points[i].t * LCM_TIMESTEP_SCALING
    c_skip = LCM_SIGMA_DATA ** 2 / (t * t + LCM_SIGMA_DATA ** 2)
    c_out = t / math.sqrt(t * t + LCM_SIGMA_DATA ** 2)
    d = c_out * x0 + c_skip * x
    return (q.alpha * d + q.sigma * draw() if q.sigma else d), hist


def tcd(x, x0, eps, i, run, hist, draw):
    # Trajectory Consistency Distillation's strategic stochastic sampling (Zheng et al. 2024, §4.3; diffusers'
    # TCDScheduler.step, whose eta is the paper's gamma): along the trajectory to s = floor((1 - eta) t_next),
    # then forward to t_next with fresh noise (not on the last step)
    q = run.points[i + 1]
    # in float32, as diffusers computes it: (1 - 0.3) * 750 is 524.99997 there, so s = 524
    s = int(torch.floor(torch.tensor(q.t, dtype=torch.float32) * (1 - run.eta)))
    a_s = run.abar[s]
    x_s = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s) * eps
    if not run.eta or i == run.steps - 1:
        return x_s, hist
    ratio = q.alpha ** 2 / a_s
    return math.sqrt(ratio) * x_s + math.sqrt(1 - ratio) * draw(), hist


class Method(NamedTuple):
    step: Callable
    terminal: str = "zero"  # where the last step lands: "zero" (sigma 0) or "first" (abar_0: set_alpha_to_one False)
    divides: bool = True    # steps in sigma / alpha or log-SNR (see the module docstring)
    eta: float | None = None  # its default eta; None: it has none
    correct: Callable | None = None  # a corrector applied to the state once the model's output there is known


METHODS = {
    "ddim": Method(ddim, terminal="first", divides=False, eta=0.0),
    "euler": Method(euler),
    "euler_a": Method(euler_ancestral, eta=1.0),
    "dpmpp_2m": Method(dpmpp_2m),
    "dpmpp_2m_sde": Method(dpmpp_2m_sde, eta=1.0),
    "dpmpp_3m_sde": Method(dpmpp_3m_sde, eta=1.0),
    "unipc": Method(unipc, correct=unipc_correct),
    "lcm": Method(lcm, divides=False),
    "tcd": Method(tcd, terminal="first", divides=False, eta=0.3),
}


@dataclass(frozen=True)
class Sampling:
    """A run's sampler on its schedule: `points` are the steps' points, then where the last step lands; `abar` the
    model's table as the method sees it (floored where it divides)."""
    name: str
    method: Method
    points: tuple[Point, ...]
    abar: tuple[float, ...]
    prediction: str  # "epsilon" or "v_prediction"
    eta: float | None

    @property
    def steps(self) -> int:
        return len(self.points) - 1

    def timestep(self, i: int) -> float:
        return self.points[i].t

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, i: int) -> torch.Tensor:
        """x0 noised to point i (diffusers' add_noise there): the img2img start and DemoFusion's Eq. 2."""
        p = self.points[i]
        return p.alpha * x0 + p.sigma * eps

    def predict(self, x: torch.Tensor, out: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) from the model's output at point i, computed on state x."""
        p = self.points[i]
        if self.prediction == "v_prediction":  # v = alpha eps - sigma x0 (Salimans & Ho 2022)
            return p.alpha * x - p.sigma * out, p.sigma * x + p.alpha * out
        return (x - p.sigma * out) / p.alpha, out


def build(name: str, schedule: str | None, steps: int, noise: NoiseSchedule = NoiseSchedule(),
          timesteps: Sequence[int] | None = None, eta: float | None = None) -> Sampling:
    """Sampler `name` (a short name of METHODS) on a schedule (minifusion.schedules: "leading", "trailing",
    "karras", "exponential", "ays") of `steps` points, or on explicit `timesteps`, for a model with this noise
    schedule. eta None: the method's default. Names and values are checked by minifusion.schedulers."""
    method = METHODS[name]
    table = noise.alphas_cumprod().tolist()
    if method.divides or noise.prediction_type == "epsilon":
        table = [max(a, ABAR_FLOOR) for a in table]
    if timesteps is not None:
        pts = [schedules.at(t, table) for t in timesteps]
    elif schedule in ("leading", "trailing"):
        pts = schedules.points(schedule, steps, table)
    else:  # a sigma schedule needs s(999) finite whatever the method
        pts = schedules.points(schedule, steps, [max(a, ABAR_FLOOR) for a in table])
    last = schedules.at(0, table) if method.terminal == "first" else Point(0.0, 1.0, 0.0)
    return Sampling(name, method, (*pts, last), tuple(table), noise.prediction_type,
                    method.eta if eta is None else eta)


def sample(run: Sampling, denoise: Callable[[torch.Tensor, int], torch.Tensor], x: torch.Tensor, *, first: int = 0,
           change: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
           generator: torch.Generator | None = None, on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """Steps first .. N - 1 of `run` from state x at point `first`; the state at the last point.

    denoise(x, i): the model's output (eps or v, as the model predicts) for state x at point i. change(x, i): the
    state after a change made at the start of step i, before the model sees it. on_step(i) after step i."""
    hist: tuple = ()

    def draw() -> torch.Tensor:
        return randn(x.shape, generator, x.device)

    for i in range(first, run.steps):
        if change is not None:
            x = change(x, i)
        x0, eps = run.predict(x, denoise(x, i), i)
        if hist and run.method.correct is not None:
            x = run.method.correct(x0, i, run, hist)
            if change is not None:  # the corrector rebuilt the state: the change applies to what it carries on
                x = change(x, i)
        x, hist = run.method.step(x, x0, eps, i, run, hist, draw)
        if on_step is not None:
            on_step(i)
    return x
