"""What a user chooses: a sampler and a schedule, by the names users know, checked once.

The names (ComfyUI's short names; Automatic1111's display names, its older combined names such as "DPM++ 2M
Karras" and a few aliases, case-insensitive) are minifusion.settings' tables, which every front end reads;
`check_sampling` is the one rule for a request's sampling settings, a SettingError in one line naming the setting.
The methods live in minifusion.samplers, the schedules in minifusion.schedules.

"Automatic" (schedule None) is Automatic1111's: DPM++ 2M on Karras, the SDE samplers on exponential, LCM and TCD
on trailing (distilled to start from t = 999, where SDXL's leading spacing would start lower), every other
sampler on the model's own spacing (SDXL's leading, or what a diffusers folder's scheduler config says). The
default run is the paper's: DDIM on leading, 50 steps.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

from .noise import NoiseSchedule
from .samplers import METHODS, Sampling, build, run_steps
from .settings import PREDICTION_TYPES, SCHEDULES, TRAIN_STEPS, SettingError, invalid, sampler_name, schedule_name

DEFAULT_SCHEDULES = {"dpmpp_2m": "karras", "dpmpp_2m_sde": "exponential", "dpmpp_3m_sde": "exponential",
                     "lcm": "trailing", "tcd": "trailing"}  # else the model's own


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
    """Refuse bad sampling settings in one line naming the setting (a SettingError: generate()'s names in its
    text, each front end's in its own words); the names resolved."""
    name, implied = sampler_name(sampler)
    schedule = schedule_name(schedule)
    if implied is not None and schedule not in (None, implied):
        raise SettingError(("sampler", "schedule"), lambda w: f"{w('sampler')} {sampler!r} names its schedule, "
                           f"{SCHEDULES[implied]}; {w('schedule')} {schedule!r} contradicts it")
    schedule = schedule or implied
    if timesteps is not None:
        ok = isinstance(timesteps, (list, tuple)) and len(timesteps) > 0 and all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < TRAIN_STEPS for t in timesteps) and all(
            a > b for a, b in zip(timesteps, timesteps[1:]))
        if not ok:
            raise invalid("timesteps", timesteps, f"it must be a list of integers from 0 to {TRAIN_STEPS - 1}, "
                          "strictly decreasing")
        if schedule is not None:
            raise SettingError(("schedule", "timesteps"), lambda w: f"{w('schedule')} {schedule!r} is invalid with "
                               f"{w('timesteps')}: explicit timesteps are the schedule")
    if eta is not None:
        if METHODS[name].eta is None:
            with_eta = ", ".join(k for k, m in METHODS.items() if m.eta is not None)
            raise SettingError(("eta", "sampler"), lambda w: f"{w('eta')} {eta!r} is invalid for {w('sampler')} "
                               f"{name!r}, which has none (samplers with an eta: {with_eta})")
        if not (_number(eta) and 0 <= eta <= 1):
            raise invalid("eta", eta, "it must be a number from 0 to 1")
    if not (_number(strength) and 0 < strength <= 1):
        raise invalid("strength", strength, "it must be a number above 0 and at most 1")
    steps = len(timesteps) if timesteps is not None else num_inference_steps
    if isinstance(steps, int) and run_steps(steps, strength) < 1:
        raise SettingError("strength", lambda w: f"{w('strength')} {strength!r} leaves none of the {steps} steps to "
                           f"run; it must be at least 1/{steps}")
    if not (_number(guidance_rescale) and 0 <= guidance_rescale <= 1):
        raise invalid("guidance_rescale", guidance_rescale, "it must be a number from 0 to 1")
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise invalid("prediction", prediction_type, f"it must be one of {', '.join(PREDICTION_TYPES)} or None (as the "
                      "checkpoint says)")
    if rescale_betas_zero_snr is not None and not isinstance(rescale_betas_zero_snr, bool):
        raise invalid("zero_snr", rescale_betas_zero_snr, "it must be True, False or None (as the checkpoint says)")
    return Choice(name, schedule, None if timesteps is None else tuple(timesteps),
                  None if eta is None else float(eta), float(strength))
