"""Samplers: what a run costs in UNet evaluations (minifusion.work, arithmetic) and how close each sampler gets for
what it spends (measured on the bench's model).

Evaluations: a 4096^2 SDXL run at the paper's default, at DPM++ 2M Karras 20 steps, at SDXL-Lightning's 8 steps
(Euler, trailing, CFG 1) and at strength 0.5, per scale, from work.describe.

Accuracy (--solvers): for each sampler x steps, the final latents' error, ||z - z_ref|| / ||z_ref||, against a
reference solution of the same run: 1000 DDIM steps on the trailing spacing (every training timestep; the leading
spacing cannot hold 1000 steps), landing where the sampler lands (DDIM and TCD on abar_0, the others on sigma 0:
the same 1000-step trajectory, its last step to either end), with the UNet evaluations spent, for phase 1 alone
and for a 3-scale DemoFusion run; and the fewest evaluations at which each sampler reaches DDIM-50's error (within
1 %). The same phase-1 noise and per-scale noise for every run, no window jitter. The bench's models have random weights:
this says how the solvers converge on a smooth denoiser, not what images look like. Stochastic samplers (Euler a,
the SDE samplers, LCM, TCD) converge in distribution, not to the ODE's solution: their error measures their noise.
DemoFusion's skip residual (Eq. 3) is applied once per step, so its pull depends on the step count: the 3-scale
errors include that change of the process itself, not only the solver's discretisation.
"""
from __future__ import annotations

import time

import torch

from minifusion.demofusion import demofusion, scale_sizes
from minifusion.samplers import randn
from minifusion.schedulers import Choice
from minifusion.settings import SAMPLERS
from minifusion.views import Cond
from minifusion.work import describe

RECIPES = [  # (name, sampler, schedule, steps, CFG, strength)
    ("default (DDIM, leading, 50 steps, CFG 7.5)", "ddim", "leading", 50, 7.5, 1.0),
    ("DPM++ 2M Karras, 20 steps", "dpmpp_2m", "karras", 20, 7.5, 1.0),
    ("Lightning: Euler, trailing, 8 steps, CFG 1", "euler", "trailing", 8, 1.0, 1.0),
    ("default at strength 0.5", "ddim", "leading", 50, 7.5, 0.5),
]
PROMPT = "a photograph of a lighthouse on a cliff at dawn, highly detailed"


def evaluations(size: int = 4096, base: int = 1024, window: int = 128) -> list[dict]:
    rows = []
    for name, sampler, schedule, steps, guidance, strength in RECIPES:
        work = describe(size, size, base_px=base, window=window, steps=steps, halves=2 if guidance > 1 else 1,
                        strength=strength)
        rows.append({"recipe": name, "sampler": sampler, "schedule": schedule, "steps": steps,
                     "guidance_scale": guidance, "strength": strength,
                     "per_scale": [w.unet_evals for w in work], "total": sum(w.unet_evals for w in work)})
    return rows


def print_evaluations(rows: list[dict], size: int = 4096) -> None:
    print(f"\nUNet evaluations of a {size}x{size} SDXL run (minifusion.work; per scale, base scale first)")
    for r in rows:
        print(f"  {r['recipe']:<45} {r['total']:>6}  ({' + '.join(map(str, r['per_scale']))})")


def _error(z: torch.Tensor, ref: torch.Tensor) -> float:
    return ((z - ref).norm() / ref.norm()).item()


def accuracy(pipe, height: int, width: int, steps: list[int], reference_steps: int = 1000, seed: int = 0,
             guidance_scale: float = 7.5, schedule: str | None = None) -> dict:
    """The accuracy table of one run size (height x width): every sampler on `schedule` (None: each on its
    automatic one), and DDIM at 50 steps, the target, whatever `steps` holds."""
    base, window = pipe.base_size, pipe.configs.unet.sample_size
    cond = Cond(*pipe.encode_prompt(PROMPT))
    sizes = scale_sizes(height, width, base)
    g = torch.Generator().manual_seed(seed)
    latents = randn((1, 4, *sizes[0]), g, pipe.device)
    noise = [randn((1, 4, *s), g, pipe.device) for s in sizes[1:]]

    def run(choice: Choice, n: int) -> tuple[torch.Tensor, int]:
        out = list(demofusion(pipe.unet, cond, height=height, width=width, base_px=base, window=window, steps=n,
                              guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(seed),
                              jitter=False, latents=latents, noise=noise, sampler=choice.sampling(n),
                              stride=window // 2))
        return out[-1].latents.float().cpu(), sum(r.stats.unet_evals for r in out)

    start = time.perf_counter()
    refs = {"first": run(Choice("ddim", "trailing"), reference_steps)[0],
            "zero": run(Choice("euler", "trailing"), reference_steps)[0]}
    rows = []
    for name in SAMPLERS:
        ref = refs["first" if name in ("ddim", "tcd") else "zero"]
        choice = Choice(name, schedule)
        for n in sorted({*steps, 50} if name == "ddim" else steps):
            z, evals = run(choice, n)
            rows.append({"sampler": name, "schedule": choice.schedule_for(), "steps": n, "evaluations": evals,
                         "error": _error(z, ref)})
    target = next(r["error"] for r in rows if r["sampler"] == "ddim" and r["steps"] == 50)
    fewest = {}
    for name in SAMPLERS:
        # within 1 %: Euler's error at 50 steps is DDIM's to three digits, and should not fall on a coin toss
        reached = [r["evaluations"] for r in rows if r["sampler"] == name and r["error"] <= 1.01 * target]
        fewest[name] = min(reached) if reached else None
    return {"height": height, "width": width, "scales": len(sizes), "guidance_scale": guidance_scale,
            "schedule": schedule,
            "reference_steps": reference_steps, "rows": rows, "ddim_50_error": target,
            "fewest_evaluations_to_ddim_50": fewest, "seconds": time.perf_counter() - start}


def print_accuracy(a: dict) -> None:
    steps = sorted({r["steps"] for r in a["rows"]})
    print(f"\nsolver accuracy, {a['width']}x{a['height']} ({a['scales']} scale{'s' if a['scales'] > 1 else ''}), "
          f"CFG {a['guidance_scale']}, {a['schedule'] or 'automatic'} schedule: ||z - z_ref|| / ||z_ref|| against {a['reference_steps']} DDIM steps; "
          "random weights: solvers on a smooth denoiser, not image quality")
    print(f"{'sampler':>13} {'schedule':>12} " + " ".join(f"{s:>17}" for s in steps) + f" {'to DDIM-50':>11}")
    for name in dict.fromkeys(r["sampler"] for r in a["rows"]):
        cells = {r["steps"]: r for r in a["rows"] if r["sampler"] == name}
        schedule = next(iter(cells.values()))["schedule"]
        fewest = a["fewest_evaluations_to_ddim_50"][name]
        print(f"{name:>13} {schedule:>12} " + " ".join(
            f"{cells[s]['error']:>9.2e} ({cells[s]['evaluations']:>5})" if s in cells else f"{'-':>17}"
            for s in steps) + f" {fewest if fewest is not None else '-':>11}")
    print(f"(UNet evaluations in brackets; 'to DDIM-50': the fewest evaluations tried that reach DDIM-50's "
          f"error, {a['ddim_50_error']:.2e}, within 1 %)")


def run(pipe, sizes: list[str], steps: list[int], reference_steps: int, seed: int,
        schedule: str | None = None) -> list[dict]:
    """The accuracy table of each run size ("WxH"; the model's base size on the long side is phase 1 alone)."""
    out = []
    for size in sizes:
        w, h = (int(v) for v in size.lower().split("x"))
        out.append(accuracy(pipe, h, w, steps, reference_steps, seed, schedule=schedule))
        print_accuracy(out[-1])
    return out
