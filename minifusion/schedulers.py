"""What a user chooses: a sampler and a schedule, by the names users know, checked once.

The short names are ComfyUI's; Automatic1111's display names, its older combined names ("DPM++ 2M Karras") and a
few aliases are read too, case-insensitively. The tables are data for every front end (the command line, the web
UI, the PNG text); `check_sampling` is the one rule for a request's sampling settings, raising ValueError in one
line that names the setting by its generate() name. The methods live in minifusion.samplers, the schedules in
minifusion.schedules.

"Automatic" (schedule None) is Automatic1111's: DPM++ 2M on Karras, the SDE samplers on exponential, LCM and TCD
on trailing (distilled to start from t = 999, where SDXL's leading spacing would start lower), every other
sampler on the model's own spacing (SDXL's leading, or what a diffusers folder's scheduler config says). The
default run is the paper's: DDIM on leading, 50 steps.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

from .noise import PREDICTIONS, NoiseSchedule
from .samplers import METHODS, Sampling, build, run_steps
from .schedules import TRAIN_STEPS

# short name -> Automatic1111's name ("Sampler: ..." in its PNG text)
SAMPLERS = {"ddim": "DDIM", "euler": "Euler", "euler_a": "Euler a", "dpmpp_2m": "DPM++ 2M",
            "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_3m_sde": "DPM++ 3M SDE", "unipc": "UniPC", "lcm": "LCM",
            "tcd": "TCD"}
SCHEDULERS = SAMPLERS  # the older name of the setting (--scheduler, generate(scheduler=)): a sampler
# short name -> Automatic1111's "Schedule type" (its "DDIM" type is SDXL's leading spacing)
SCHEDULES = {"leading": "DDIM", "trailing": "SGM Uniform", "karras": "Karras", "exponential": "Exponential",
             "ays": "Align Your Steps"}
AUTOMATIC = "Automatic"  # schedule None
SAMPLER_ALIASES = {"euler_ancestral": "euler_a", "k_euler_a": "euler_a", "k_euler": "euler", "uni_pc": "unipc",
                   "k_dpmpp_2m": "dpmpp_2m", "k_dpmpp_2m_sde": "dpmpp_2m_sde", "k_dpmpp_3m_sde": "dpmpp_3m_sde"}
SCHEDULE_ALIASES = {"ddim_uniform": "leading", "sgm_uniform": "trailing", "align_your_steps": "ays"}
COMBINED = ("karras", "exponential")  # Automatic1111 before 1.9 named "DPM++ 2M Karras" as one sampler
DEFAULT_SCHEDULES = {"dpmpp_2m": "karras", "dpmpp_2m_sde": "exponential", "dpmpp_3m_sde": "exponential",
                     "lcm": "trailing", "tcd": "trailing"}  # else the model's own


def _key(name: str) -> str:
    return " ".join(name.split()).lower()


def _names(table: dict[str, str], aliases: dict[str, str]) -> dict[str, str]:
    return {**{_key(k): k for k in table}, **{_key(v): k for k, v in table.items()}, **aliases}


def sampler_name(name: str) -> tuple[str, str | None]:
    """A user's sampler name -> (short name, the schedule a combined name implies, else None). ValueError
    naming the valid ones otherwise."""
    known = _names(SAMPLERS, SAMPLER_ALIASES)
    for s in COMBINED:
        known.update({f"{_key(v)} {_key(SCHEDULES[s])}": (k, s) for k, v in SAMPLERS.items()})
    found = known.get(_key(name)) if isinstance(name, str) else None
    if found is None:
        raise ValueError(f"sampler {name!r} is invalid; it must be one of {', '.join(SAMPLERS)} (or "
                         f"Automatic1111's {', '.join(SAMPLERS.values())})")
    return found if isinstance(found, tuple) else (found, None)


def schedule_name(name: str | None) -> str | None:
    """A user's schedule name -> its short name, None for automatic (None, "automatic"). ValueError otherwise."""
    if name is None or (isinstance(name, str) and _key(name) == _key(AUTOMATIC)):
        return None
    found = _names(SCHEDULES, SCHEDULE_ALIASES).get(_key(name)) if isinstance(name, str) else None
    if found is None:
        raise ValueError(f"schedule {name!r} is invalid; it must be one of {', '.join(SCHEDULES)} or None for "
                         f"automatic (or Automatic1111's {', '.join(SCHEDULES.values())}, {AUTOMATIC})")
    return found


def default_schedule(sampler: str, noise: NoiseSchedule = NoiseSchedule()) -> str:
    """The schedule "Automatic" picks for a sampler on a model."""
    return DEFAULT_SCHEDULES.get(sampler, noise.timestep_spacing)


class Choice(NamedTuple):
    """A request's checked sampling settings: sampler and schedule short names (schedule None: automatic, or the
    explicit timesteps), eta None for the sampler's default."""
    sampler: str = "ddim"
    schedule: str | None = None
    timesteps: tuple[int, ...] | None = None
    eta: float | None = None
    strength: float = 1.0

    def schedule_for(self, noise: NoiseSchedule = NoiseSchedule()) -> str | None:
        """The schedule it runs on a model: the one asked, else Automatic's; None with explicit timesteps."""
        return None if self.timesteps is not None else self.schedule or default_schedule(self.sampler, noise)

    def sampling(self, num_inference_steps: int, noise: NoiseSchedule = NoiseSchedule()) -> Sampling:
        return build(self.sampler, self.schedule_for(noise), num_inference_steps, noise, self.timesteps, self.eta)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_sampling(sampler: str = "ddim", schedule: str | None = None, num_inference_steps: int = 50,
                   timesteps: Sequence[int] | None = None, eta: float | None = None, strength: float = 1.0,
                   guidance_rescale: float = 0.0, prediction_type: str | None = None,
                   rescale_betas_zero_snr: bool | None = None) -> Choice:
    """Refuse bad sampling settings in one line naming the setting (generate()'s names); the names resolved."""
    name, implied = sampler_name(sampler)
    schedule = schedule_name(schedule)
    if implied is not None and schedule not in (None, implied):
        raise ValueError(f"sampler {sampler!r} names its schedule, {SCHEDULES[implied]}; schedule {schedule!r} "
                         "contradicts it")
    schedule = schedule or implied
    if timesteps is not None:
        ok = isinstance(timesteps, (list, tuple)) and len(timesteps) > 0 and all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < TRAIN_STEPS for t in timesteps) and all(
            a > b for a, b in zip(timesteps, timesteps[1:]))
        if not ok:
            raise ValueError(f"timesteps {timesteps!r} is invalid; it must be a list of integers from 0 to "
                             f"{TRAIN_STEPS - 1}, strictly decreasing")
        if schedule is not None:
            raise ValueError(f"schedule {schedule!r} is invalid with timesteps: explicit timesteps are the schedule")
    if eta is not None:
        if METHODS[name].eta is None:
            with_eta = ", ".join(k for k, m in METHODS.items() if m.eta is not None)
            raise ValueError(f"eta {eta!r} is invalid for sampler {name!r}, which has none (samplers with an eta: "
                             f"{with_eta})")
        if not (_number(eta) and 0 <= eta <= 1):
            raise ValueError(f"eta {eta!r} is invalid; it must be a number from 0 to 1")
    if not (_number(strength) and 0 < strength <= 1):
        raise ValueError(f"strength {strength!r} is invalid; it must be a number above 0 and at most 1")
    steps = len(timesteps) if timesteps is not None else num_inference_steps
    if isinstance(steps, int) and run_steps(steps, strength) < 1:
        raise ValueError(f"strength {strength!r} leaves none of the {steps} steps to run; it must be at least "
                         f"1/{steps}")
    if not (_number(guidance_rescale) and 0 <= guidance_rescale <= 1):
        raise ValueError(f"guidance_rescale {guidance_rescale!r} is invalid; it must be a number from 0 to 1")
    if prediction_type is not None and prediction_type not in PREDICTIONS:
        raise ValueError(f"prediction_type {prediction_type!r} is invalid; it must be one of "
                         f"{', '.join(PREDICTIONS)} or None (as the checkpoint says)")
    if rescale_betas_zero_snr is not None and not isinstance(rescale_betas_zero_snr, bool):
        raise ValueError(f"rescale_betas_zero_snr {rescale_betas_zero_snr!r} is invalid; it must be True, False or "
                         "None (as the checkpoint says)")
    return Choice(name, schedule, None if timesteps is None else tuple(timesteps),
                  None if eta is None else float(eta), float(strength))
