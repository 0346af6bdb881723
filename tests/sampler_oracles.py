"""The reference samplers the sampler tests compare against: diffusers' schedulers built from SDXL's scheduler
config (stabilityai/stable-diffusion-xl-base-1.0, scheduler/scheduler_config.json) with the flags that name a
sampler and a schedule, and k-diffusion's sampling functions.

Where a diffusers scheduler's own flags lay out another schedule than ours, it is given ours, so that the step
arithmetic is what is compared (tests/test_samplers.py measures the schedules apart):
- DPMSolverMultistep and UniPC space "leading" by N + 1 (DDIM and Euler by N, which is SDXL's); ours is given;
- under use_karras_sigmas / use_exponential_sigmas they have our sigmas but tell the UNet the timestep rounded
  (Karras) or truncated (exponential) to an integer; they are given the fractional one, as Euler's, k-diffusion's
  and Automatic1111's UNet gets;
- EulerDiscrete's Karras / exponential range is its spacing's first and last sigma, not the model's range
  s(0)..s(999) (k-diffusion, Automatic1111, DPMSolverMultistep); given ours through set_timesteps(sigmas=);
- EulerAncestral, DPMSolverMultistep and UniPC take no custom sigmas: ours are set on the scheduler after
  set_timesteps, which is all their step reads;
- DDIM on a sigma schedule: DDIM (eta 0) is Euler in k-diffusion's sigma landing on abar_0, so the oracle is
  EulerDiscrete on our sigmas followed by that last sigma;
- LCM and TCD index abar by integer timesteps only: they are compared on integer schedules, given ours
  (set_timesteps(timesteps=)); LCMScheduler's own default schedule (its 50-step distillation grid) is another.

k-diffusion 0.1.1.post1 is installed without its dependencies (its package __init__ imports its training code's:
clean-fid, clip, kornia, ...): only its sampling module is loaded, from the installed file.
"""
from __future__ import annotations

import importlib.util
import inspect
import math
import sys
import types

import torch
import torch.nn.functional as F
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, LCMScheduler, TCDScheduler, UniPCMultistepScheduler)

from minifusion.samplers import Sampling

SDXL_SCHEDULER_CONFIG = {  # stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False}
CLASSES = {"ddim": (DDIMScheduler, {}), "euler": (EulerDiscreteScheduler, {}),
           "euler_a": (EulerAncestralDiscreteScheduler, {}), "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
           "dpmpp_2m_sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
           "dpmpp_3m_sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
           "unipc": (UniPCMultistepScheduler, {}), "lcm": (LCMScheduler, {}), "tcd": (TCDScheduler, {})}
SIGMA_FLAGS = {"karras": {"use_karras_sigmas": True}, "exponential": {"use_exponential_sigmas": True}}
OWN_SPACING = {"ddim", "euler", "euler_a"}  # whose "leading" is SDXL's


class FakeModel:
    """A smooth stand-in for a UNet at one latent size: a fixed random 3x3 conv of the input through a tanh,
    modulated by t, so that every point of the schedule and every bit of the state matter."""

    def __init__(self, channels=4, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.conv = torch.randn(channels, channels, 3, 3, generator=g) * 0.3
        self.bias = torch.randn(1, channels, 1, 1, generator=g) * 0.1

    def __call__(self, x, t):
        t = float(t)
        return torch.tanh(F.conv2d(x, self.conv, padding=1) * (1 + t / 1000) + self.bias * math.cos(t / 300))


def diffusers_scheduler(name: str, schedule: str | None, run: Sampling, zero_snr: bool = False):
    """The diffusers scheduler of sampler `name` set to run's schedule (see the module docstring)."""
    cls, flags = CLASSES[name]
    config = {**SDXL_SCHEDULER_CONFIG, "prediction_type": run.prediction, "rescale_betas_zero_snr": zero_snr, **flags}
    n = run.steps
    ts = [p.t for p in run.points[:-1]]
    integer = all(t == int(t) for t in ts)
    if schedule in ("leading", "trailing") and (name in OWN_SPACING or schedule == "trailing") \
            and name not in ("lcm", "tcd"):
        sch = cls.from_config({**config, "timestep_spacing": schedule})
        sch.set_timesteps(n)
        return sch
    if name in ("lcm", "tcd"):
        assert integer, "LCM and TCD index abar by integer timesteps"
        sch = cls.from_config(config)
        sch.set_timesteps(timesteps=[int(t) for t in ts])
        return sch
    sigmas = [p.sigma / p.alpha for p in run.points]  # finite here: abar floored, or a sigma schedule
    if name in ("euler", "ddim"):
        sch = EulerDiscreteScheduler.from_config(config)
        sch.set_timesteps(sigmas=sigmas)  # ddim: the last sigma is s(abar_0)
        return sch
    sch = cls.from_config({**config, **SIGMA_FLAGS.get(schedule, {})})
    sch.set_timesteps(n)
    sch.timesteps = torch.tensor(ts, dtype=torch.float64)
    sch.sigmas = torch.tensor(sigmas, dtype=torch.float32)
    return sch


def diffusers_sample(sch, model, latents: torch.Tensor, run: Sampling, generator: torch.Generator | None = None,
                     eta: float | None = None) -> torch.Tensor:
    """diffusers' denoising loop (the scheduler's step on the model's output) from VP state `latents` at run's
    first point; the final state, in the VP space (Euler schedulers work in k-diffusion's sigma)."""
    p0 = run.points[0]
    ve = isinstance(sch, (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler))
    x = latents / p0.alpha if ve else latents.clone()
    accepts = inspect.signature(sch.step).parameters
    kwargs = {k: v for k, v in (("eta", eta), ("generator", generator)) if k in accepts and v is not None}
    for t in sch.timesteps:
        out = model(sch.scale_model_input(x, t), t)
        x = sch.step(out, t, x, **kwargs).prev_sample
    last = run.points[-1]
    return x * last.alpha if ve else x


def k_diffusion():
    """k_diffusion.sampling, loaded from the installed file without the package's __init__."""
    if "kd_sampling" not in sys.modules:
        spec = importlib.util.find_spec("k_diffusion")
        folder = spec.submodule_search_locations[0]
        package = types.ModuleType("kd")
        package.__path__ = [folder]
        sys.modules["kd"] = package
        for name in ("utils", "sampling"):
            s = importlib.util.spec_from_file_location(f"kd.{name}", f"{folder}/{name}.py")
            module = importlib.util.module_from_spec(s)
            sys.modules[f"kd.{name}"] = module
            setattr(package, name, module)
            s.loader.exec_module(module)
        sys.modules["kd_sampling"] = sys.modules["kd.sampling"]
    return sys.modules["kd_sampling"]


def k_sample(name: str, model, latents: torch.Tensor, run: Sampling, noises: list[torch.Tensor] | None = None,
             eta: float | None = None) -> torch.Tensor:
    """k-diffusion's sampler `name` on run's sigmas with k-diffusion's eps-model wrapper (CompVisDenoiser's
    arithmetic: c_in = 1 / sqrt(s^2 + 1), denoised = x - s eps) at run's timesteps; noises: the noise drawn per
    step, in order."""
    kd = k_diffusion()
    sigmas = torch.tensor([p.sigma / p.alpha for p in run.points], dtype=torch.float64)
    times = {float(s): p.t for s, p in zip(sigmas, run.points)}

    def denoiser(x, s):
        p = run.points[[float(v) for v in sigmas].index(float(s))]
        out = model(x * p.alpha, times[float(s)])
        if run.prediction == "v_prediction":
            return (p.alpha * (x * p.alpha) - p.sigma * out) / 1.0
        return x - (p.sigma / p.alpha) * out

    queue = list(noises or [])
    fn = {"euler": kd.sample_euler, "euler_a": kd.sample_euler_ancestral, "dpmpp_2m": kd.sample_dpmpp_2m,
          "dpmpp_2m_sde": kd.sample_dpmpp_2m_sde, "dpmpp_3m_sde": kd.sample_dpmpp_3m_sde}[name]
    kwargs = {} if name in ("euler", "dpmpp_2m") else {"eta": run.eta if eta is None else eta,
                                                        "noise_sampler": lambda s, s_next: queue.pop(0)}
    x = (latents / run.points[0].alpha).double()
    out = fn(lambda x, s: denoiser(x.float(), s).double(), x, sigmas, disable=True, **kwargs)
    return out.float()
