"""Samplers and schedules against diffusers' schedulers and k-diffusion (tests/sampler_oracles.py), on a smooth
fake model: every sampler x schedule, epsilon and v-prediction, zero terminal SNR, the stochastic ones with the
step noise made equal. The numbers printed are max |ours - theirs| / std(theirs) of the final latents."""
import math

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, LCMScheduler
from diffusers.schedulers import AysSchedules

from minifusion import schedules
from minifusion.noise import NoiseSchedule, alphas_cumprod
from minifusion.samplers import ABAR_FLOOR, METHODS, sample
from minifusion.schedulers import Choice, check_sampling
from minifusion.settings import SAMPLERS, SCHEDULES
from sampler_oracles import (SDXL_SCHEDULER_CONFIG, FakeModel, diffusers_sample, diffusers_scheduler, k_diffusion,
                             k_sample)

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-4  # x std of the final latents (issue 20)
SHAPE = (1, 4, 8, 8)
STOCHASTIC = {"euler_a", "dpmpp_2m_sde", "dpmpp_3m_sde", "lcm", "tcd"}


def rel(a, b) -> float:
    return ((a - b).abs().max() / b.std()).item()


def ours(name, schedule, steps, model, latents, noise=NoiseSchedule(), seed=0, eta=None, timesteps=None):
    run = Choice(name, schedule, timesteps, eta).sampling(steps, noise)
    out = sample(run, lambda x, i: model(x, run.points[i].t), latents, generator=torch.Generator().manual_seed(seed))
    return run, out


def latents(seed=1):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


# ---- the model's table and the schedules ----

def test_schedule_by_hand():
    # SDXL: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2, abar = cumprod(1 - betas)
    ac = alphas_cumprod()
    b0, b999 = 0.00085, 0.012
    assert ac[0].item() == pytest.approx(1 - b0, rel=1e-6)
    b1 = (math.sqrt(b0) + (math.sqrt(b999) - math.sqrt(b0)) / 999) ** 2
    assert ac[1].item() == pytest.approx((1 - b0) * (1 - b1), rel=1e-6)
    assert schedules.leading(1) == [1] and schedules.leading(50)[:3] == [981, 961, 941]
    # DDIM's last step lands on abar_0 (set_alpha_to_one False): eps keeps the weight sqrt(1 - abar_0)
    run = Choice("ddim").sampling(4)
    x, eps = torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
    a1, a0 = ac[1].item(), ac[0].item()
    expected = math.sqrt(a0) * (0 - math.sqrt(1 - a1)) / math.sqrt(a1) + math.sqrt(1 - a0)
    assert sample(run, lambda x, i: eps, x, first=3).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("zero_snr", [False, True])
def test_alphas_cumprod_is_diffusers(zero_snr):
    ref = DDIMScheduler.from_config({**SDXL_SCHEDULER_CONFIG, "rescale_betas_zero_snr": zero_snr}).alphas_cumprod
    assert torch.equal(alphas_cumprod(zero_snr), ref)
    assert (alphas_cumprod(True)[-1] == 0) and alphas_cumprod(False)[-1] > 0


@pytest.mark.parametrize("steps", [1, 4, 7, 20, 50, 61])
def test_leading_and_trailing_are_diffusers(steps):
    for spacing in ("leading", "trailing"):
        for cls in (DDIMScheduler, EulerDiscreteScheduler):
            sch = cls.from_config({**SDXL_SCHEDULER_CONFIG, "timestep_spacing": spacing})
            sch.set_timesteps(steps)
            # numpy's arange gives 61 trailing steps a 62nd, t = -1 (a diffusers quirk, left out here)
            assert getattr(schedules, spacing)(steps) == [int(t) for t in sch.timesteps][:steps]
    assert schedules.leading(7) == [853, 711, 569, 427, 285, 143, 1] and schedules.trailing(4) == [999, 749, 499, 249]


@pytest.mark.parametrize("steps", [1, 5, 10, 25])
def test_sigma_schedules_are_k_diffusion_and_diffusers(steps):
    kd = k_diffusion()
    abar = alphas_cumprod().tolist()
    s = schedules.ve_sigmas(abar)
    for ours_, theirs in ((schedules.karras(steps, s[0], s[-1]), kd.get_sigmas_karras(steps, s[0], s[-1])),
                          (schedules.exponential(steps, s[0], s[-1]), kd.get_sigmas_exponential(steps, s[0], s[-1]))):
        torch.testing.assert_close(torch.tensor(ours_, dtype=torch.float64), theirs[:-1].double(), rtol=1e-6, atol=0)  # k-diffusion: float32
    # diffusers' DPM-Solver under use_karras_sigmas has the same sigmas (it rounds the timesteps, see oracles)
    sch = DPMSolverMultistepScheduler.from_config({**SDXL_SCHEDULER_CONFIG, "use_karras_sigmas": True})
    sch.set_timesteps(steps)
    torch.testing.assert_close(torch.tensor(schedules.karras(steps, s[0], s[-1]), dtype=torch.float64), sch.sigmas[:-1].double(),
                               rtol=1e-6, atol=0)
    # the UNet's timestep of a sigma: diffusers' _sigma_to_t
    sch = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    sigmas = schedules.karras(steps, s[0], s[-1])
    sch.set_timesteps(sigmas=sigmas + [0.0])
    torch.testing.assert_close(torch.tensor([schedules.sigma_to_t(v, abar) for v in sigmas], dtype=torch.float64),
                               sch.timesteps.double(),
                               rtol=0, atol=1e-3)


def test_align_your_steps_is_nvidias_at_10_steps_and_log_linear_between():
    ays = schedules.ays(10) + [0.0]
    assert ays == pytest.approx(AysSchedules["StableDiffusionXLSigmas"], abs=1e-12)
    # 20 steps: every other level is one of the 11 (the grid of 21 contains the grid of 11), between them the
    # geometric mean (linear in log sigma)
    twenty = schedules.ays(20)
    assert twenty[::2] == pytest.approx(list(schedules.AYS_SDXL[:10]), rel=1e-12)
    assert twenty[1] == pytest.approx(math.sqrt(schedules.AYS_SDXL[0] * schedules.AYS_SDXL[1]), rel=1e-12)


# ---- every sampler on every schedule, against diffusers ----

SCHEDULE_CASES = [(s, None) for s in SCHEDULES] + [(None, [999, 749, 499, 249]), (None, [999, 850, 500, 100, 20])]
# LCM and TCD index abar by integer timesteps only; DPM++ 3M SDE is checked against k-diffusion (diffusers' differs)
MATRIX = [(name, schedule, timesteps) for name in SAMPLERS for schedule, timesteps in SCHEDULE_CASES
          if not (name in ("lcm", "tcd") and schedule in ("karras", "exponential", "ays")) and name != "dpmpp_3m_sde"]


@pytest.mark.parametrize("name, schedule, timesteps", MATRIX)
def test_sampler_on_schedule_equals_diffusers(name, schedule, timesteps):
    # 20 steps: trailing divides 1000 (DDIMScheduler lands a trailing step on t - 1000 // N, which is the next
    # point only then); >= 15 keeps diffusers' DPM-Solver from lowering the order of its last steps
    steps = 10 if name in ("lcm", "tcd") else 20
    model, x = FakeModel(), latents()
    run, got = ours(name, schedule, steps, model, x, timesteps=timesteps)
    sch = diffusers_scheduler(name, schedule or "explicit", run)
    ref = diffusers_sample(sch, model, x, run, torch.Generator().manual_seed(0),
                           eta=run.eta if name in ("ddim", "tcd") else None)
    err = rel(got, ref)
    print(f"{name} {schedule or timesteps}: {err:.1e}")
    assert err <= TOL


@pytest.mark.parametrize("name", ["ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_sde", "unipc", "lcm", "tcd"])
@pytest.mark.parametrize("schedule", ["trailing", "karras"])
def test_v_prediction_zero_snr_equals_diffusers(name, schedule):
    if name in ("lcm", "tcd") and schedule == "karras":
        return
    noise = NoiseSchedule("v_prediction", True)
    model, x = FakeModel(seed=3), latents(4)
    run, got = ours(name, schedule, 20, model, x, noise)
    ref = diffusers_sample(diffusers_scheduler(name, schedule, run, zero_snr=True), model, x, run,
                           torch.Generator().manual_seed(0), eta=run.eta if name in ("ddim", "tcd") else None)
    err = rel(got, ref)
    print(f"v-prediction, zero SNR, {name} {schedule}: {err:.1e}")
    assert err <= TOL


def test_ddim_with_eta_equals_diffusers():
    model, x = FakeModel(seed=5), latents(6)
    run, got = ours("ddim", "leading", 12, model, x, eta=0.6, seed=9)
    ref = diffusers_sample(diffusers_scheduler("ddim", "leading", run), model, x, run, torch.Generator().manual_seed(9),
                           eta=0.6)
    assert rel(got, ref) <= TOL


@pytest.mark.parametrize("name", ["euler", "euler_a", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde"])
@pytest.mark.parametrize("schedule, steps", [("karras", 6), ("exponential", 25), ("trailing", 9)])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_k_diffusion_samplers_equal_k_diffusion(name, schedule, steps, prediction):
    model, x = FakeModel(seed=7), latents(8)
    run, got = ours(name, schedule, steps, model, x, NoiseSchedule(prediction), seed=2)
    g = torch.Generator().manual_seed(2)
    noises = [torch.randn(SHAPE, generator=g) for _ in range(steps - 1)] if name in STOCHASTIC else None
    ref = k_sample(name, model, x, run, noises)
    err = rel(got, ref)
    print(f"k-diffusion {name} {schedule} {steps} {prediction}: {err:.1e}")
    assert err <= TOL


def test_diffusers_third_order_sde_update_is_not_k_diffusions():
    """DPM++ 3M SDE follows k-diffusion (Automatic1111's and ComfyUI's), which it equals above. diffusers'
    DPMSolverMultistepScheduler(sde-dpmsolver++, solver_order=3) agrees on the first two steps (orders 1 and 2)
    and then weighs the second difference D2 by (1 - e^-2h - 2h) / (2h)^2 - 0.5 where k-diffusion's -phi_3 is
    0.5 - (e^-2h - 1 + 2h) / (2h)^2 = (1 - e^-2h - 2h) / (2h)^2 + 0.5: O(1) instead of O(h)."""
    model, x = FakeModel(seed=7), latents(8)
    for steps, close in ((2, True), (20, False)):
        run, got = ours("dpmpp_3m_sde", "exponential", steps, model, x)
        ref = diffusers_sample(diffusers_scheduler("dpmpp_3m_sde", "exponential", run), model, x, run,
                               torch.Generator().manual_seed(0))
        assert (rel(got, ref) <= TOL) == close


def test_diffusers_rounding_of_karras_timesteps_is_the_only_difference():
    """Built with its own flags alone, DPMSolverMultistepScheduler(use_karras_sigmas=True) tells the UNet the
    rounded timestep of each sigma: the step arithmetic is ours (above), the model sees another t."""
    model, x = FakeModel(), latents()
    run, got = ours("dpmpp_2m", "karras", 20, model, x)
    sch = DPMSolverMultistepScheduler.from_config({**SDXL_SCHEDULER_CONFIG, "use_karras_sigmas": True})
    sch.set_timesteps(20)
    assert torch.equal(sch.timesteps.double(), torch.tensor([p.t for p in run.points[:-1]], dtype=torch.float64).round())
    err = rel(got, diffusers_sample(sch, model, x, run))
    print(f"DPM++ 2M Karras against diffusers' own flags (rounded timesteps): {err:.1e}")
    assert 0 < err < 1e-2


def test_lcm_own_schedule_differs_from_trailing():
    sch = LCMScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    sch.set_timesteps(4)
    assert [int(t) for t in sch.timesteps] == [999, 759, 499, 259] and schedules.trailing(4) == [999, 749, 499, 249]


# ---- zero terminal SNR: no division by a zero alpha ----

@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_zero_snr_runs_finite_from_pure_noise(name, prediction):
    run, got = ours(name, None, 6, FakeModel(), latents(), NoiseSchedule(prediction, True, "trailing"))
    assert run.points[0].t == 999 and torch.isfinite(got).all()
    exact = not METHODS[name].divides and prediction == "v_prediction"
    assert run.points[0].alpha == pytest.approx(0.0 if exact else math.sqrt(ABAR_FLOOR), abs=1e-18, rel=1e-12)


# ---- names and the one check ----

def test_names_resolve_case_insensitively():
    assert check_sampling("DPM++ 2M").sampler == "dpmpp_2m"
    assert check_sampling("dpm++ 2m karras") == Choice("dpmpp_2m", "karras")
    assert check_sampling("Euler a", "SGM Uniform") == Choice("euler_a", "trailing")
    assert check_sampling("euler_ancestral", "Align Your Steps").schedule == "ays"
    assert check_sampling("DPM++ 3M SDE Exponential") == Choice("dpmpp_3m_sde", "exponential")
    assert check_sampling("ddim", "automatic").schedule is None
    assert Choice("dpmpp_2m").schedule_for() == "karras" and Choice("dpmpp_2m_sde").schedule_for() == "exponential"
    assert Choice("euler").schedule_for() == "leading" and Choice("lcm").schedule_for() == "trailing"
    assert Choice("euler").schedule_for(NoiseSchedule(timestep_spacing="trailing")) == "trailing"


@pytest.mark.parametrize("kwargs, message", [
    ({"sampler": "pndm"}, "sampler 'pndm' is invalid; it must be one of ddim, euler, euler_a, dpmpp_2m"),
    ({"schedule": "cosine"}, "schedule 'cosine' is invalid; it must be one of leading, trailing, karras"),
    ({"timesteps": [999, 999, 500]}, "timesteps [999, 999, 500] is invalid; it must be a list of integers from 0 "
                                     "to 999, strictly decreasing"),
    ({"timesteps": [1000, 500]}, "timesteps [1000, 500] is invalid"),
    ({"timesteps": [999, 499.5]}, "timesteps [999, 499.5] is invalid"),
    ({"timesteps": [999, 499], "schedule": "karras"}, "schedule 'karras' is invalid with timesteps"),
    ({"strength": 0}, "strength 0 is invalid; it must be a number above 0 and at most 1"),
    ({"strength": 1.5}, "strength 1.5 is invalid"),
    ({"strength": 0.1, "num_inference_steps": 4}, "strength 0.1 leaves none of the 4 steps to run"),
    ({"sampler": "euler", "eta": 0.5}, "eta 0.5 is invalid for sampler 'euler', which has none (samplers with an "
                                       "eta: ddim, euler_a, dpmpp_2m_sde, dpmpp_3m_sde, tcd)"),
    ({"sampler": "tcd", "eta": 2}, "eta 2 is invalid; it must be a number from 0 to 1"),
    ({"guidance_rescale": -0.1}, "guidance_rescale -0.1 is invalid"),
    ({"prediction_type": "sample"}, "prediction_type 'sample' is invalid"),
    ({"sampler": "DPM++ 2M Karras", "schedule": "exponential"}, "contradicts it"),
])
def test_bad_sampling_settings_are_one_line_naming_the_setting(kwargs, message):
    with pytest.raises(ValueError) as e:
        check_sampling(**kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)
