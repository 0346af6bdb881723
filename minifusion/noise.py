"""The model's noise schedule: what a checkpoint predicts and on which alphas, read from the checkpoint.

SDXL base predicts the noise (epsilon) on the "scaled_linear" betas of its scheduler config. Some fine-tunes
(NoobAI-XL V-Pred, ...) predict v = alpha eps - sigma x0 (Salimans & Ho 2022, §4) and are trained with a zero
terminal SNR: the betas rescaled so that abar_999 = 0 exactly, pure noise at the top of the schedule (Lin et
al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1). Sampling such a model as
epsilon gives wrong images, so it is recognised without being told:
- a single file's `v_pred` / `ztsnr` marker keys (empty tensors; what Automatic1111, Forge and ComfyUI read);
- a diffusers folder's scheduler/scheduler_config.json: `prediction_type`, `rescale_betas_zero_snr` and
  `timestep_spacing` (a Lightning folder says "trailing": the model's own schedule).
EDM-trained SDXLs (Playground v2.5, `edm_mean`) are refused by minifusion.checkpoint before this is asked.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import torch

from .safetensors_check import CheckpointError, SafetensorsFile
from .settings import PREDICTION_TYPES, TRAIN_STEPS

MARKERS = ("v_pred", "ztsnr")  # single-file marker keys: known, optional, never loaded
SPACINGS = ("leading", "trailing")  # a scheduler config's timestep_spacing that names one of our schedules
CONFIG = Path("scheduler") / "scheduler_config.json"
CONFIG_LIMIT = 1 << 20  # SDXL's is 500 bytes


@dataclass(frozen=True)
class NoiseSchedule:
    """What the model was trained on. prediction_type: "epsilon" or "v_prediction"; rescale_betas_zero_snr:
    abar_999 = 0; timestep_spacing: the model's own schedule (its scheduler config's); source: where it was read."""
    prediction_type: str = "epsilon"
    rescale_betas_zero_snr: bool = False
    timestep_spacing: str = "leading"
    source: str = "SDXL's scheduler config"

    def overridden(self, prediction_type: str | None = None,
                   rescale_betas_zero_snr: bool | None = None) -> "NoiseSchedule":
        """This schedule with generate()'s overrides (None: as detected)."""
        new = replace(self, prediction_type=prediction_type or self.prediction_type,
                      rescale_betas_zero_snr=self.rescale_betas_zero_snr if rescale_betas_zero_snr is None
                      else rescale_betas_zero_snr)
        return self if new == self else replace(new, source="given")

    def describe(self) -> str:
        """One phrase for a plan line, e.g. "v-prediction, zero terminal SNR (v_pred, ztsnr keys)"."""
        what = "v-prediction" if self.prediction_type == "v_prediction" else "epsilon prediction"
        return f"{what}{', zero terminal SNR' if self.rescale_betas_zero_snr else ''} ({self.source})"

    def alphas_cumprod(self) -> torch.Tensor:
        return alphas_cumprod(self.rescale_betas_zero_snr)


@lru_cache(maxsize=2)
def alphas_cumprod(zero_snr: bool = False) -> torch.Tensor:
    """abar_t, t = 0..999, in float32 as diffusers computes it (so steps agree to rounding): SDXL's scaled_linear
    betas, rescaled to a zero terminal SNR if asked (diffusers' rescale_zero_terminal_snr)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, TRAIN_STEPS, dtype=torch.float32) ** 2
    if zero_snr:
        # Lin et al. 2024, Algorithm 1: shift and scale sqrt(abar) so that it ends at 0 and keeps its start
        root = torch.cumprod(1.0 - betas, dim=0).sqrt()
        first, last = root[0].clone(), root[-1].clone()
        root = (root - last) * (first / (first - last))
        abar = root ** 2
        betas = 1 - torch.cat([abar[0:1], abar[1:] / abar[:-1]])
    return torch.cumprod(1.0 - betas, dim=0)


def detect(layout: str, where: Path) -> NoiseSchedule:
    """The noise schedule of a checkpoint found by minifusion.checkpoint.find_checkpoint: ("single", file) is read
    for its marker keys (headers only), ("diffusers", folder) for its scheduler config."""
    if layout == "single":
        f = SafetensorsFile(where)
        try:
            found = [m for m in MARKERS if m in f.entries]
        finally:
            f.close()
        if not found:
            return NoiseSchedule()
        return NoiseSchedule("v_prediction" if "v_pred" in found else "epsilon", "ztsnr" in found,
                             source=", ".join(found) + (" key" if len(found) == 1 else " keys"))
    path = where / CONFIG
    if not path.is_file():
        return NoiseSchedule()
    config = _read_config(path)
    prediction = config.get("prediction_type", "epsilon")
    zero_snr = config.get("rescale_betas_zero_snr", False)
    if prediction not in PREDICTION_TYPES:
        # "sample" (x0) prediction exists in diffusers but in no SDXL release
        raise CheckpointError(f"{path}: prediction_type {json.dumps(prediction)} is not one minifusion samples "
                              f"({' or '.join(PREDICTION_TYPES)})")
    if not isinstance(zero_snr, bool):
        raise CheckpointError(f"{path}: rescale_betas_zero_snr must be true or false, not {json.dumps(zero_snr)}")
    spacing = config.get("timestep_spacing")
    # "linspace" (no SDXL release uses it) is left to SDXL's own leading spacing
    return NoiseSchedule(prediction, zero_snr, spacing if spacing in SPACINGS else "leading", source=str(CONFIG))


def _read_config(path: Path) -> dict:
    try:
        if path.stat().st_size > CONFIG_LIMIT:
            raise CheckpointError(f"{path}: far too large for a scheduler config; download it again")
        config = json.loads(path.read_bytes())
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    except (ValueError, RecursionError):
        raise CheckpointError(f"{path}: not valid JSON; download it again") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a JSON object; download it again")
    return config
