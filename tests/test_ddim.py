"""Schedulers: step-by-step parity with diffusers' DDIMScheduler / EulerDiscreteScheduler configured as SDXL's."""
import math

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from minifusion.schedulers import DDIM, Euler, alphas_cumprod, leading_timesteps

SDXL_SCHEDULER = dict(  # stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json
    num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
    timestep_spacing="leading", steps_offset=1, prediction_type="epsilon",
)
STEPS = (1, 7, 50)


def reference(kind: str, steps: int):
    if kind == "ddim":
        sch = DDIMScheduler(**SDXL_SCHEDULER, set_alpha_to_one=False, clip_sample=False)
    else:
        sch = EulerDiscreteScheduler(**SDXL_SCHEDULER, interpolation_type="linear")
    sch.set_timesteps(steps)
    return sch


def ours(kind: str, steps: int):
    return DDIM(steps) if kind == "ddim" else Euler(steps)


def test_schedule_by_hand():
    # SDXL: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2, abar = cumprod(1 - betas)
    ac = alphas_cumprod()
    b0, b999 = 0.00085, 0.012
    assert ac[0].item() == pytest.approx(1 - b0, rel=1e-6)
    b1 = (math.sqrt(b0) + (math.sqrt(b999) - math.sqrt(b0)) / 999) ** 2
    assert ac[1].item() == pytest.approx((1 - b0) * (1 - b1), rel=1e-6)
    assert leading_timesteps(1) == [1]
    assert leading_timesteps(7) == [853, 711, 569, 427, 285, 143, 1]  # 1000 // 7 = 142
    assert leading_timesteps(50)[:3] == [981, 961, 941] and leading_timesteps(50)[-1] == 1


@pytest.mark.parametrize("kind", ["ddim", "euler"])
@pytest.mark.parametrize("steps", STEPS)
def test_steps_match_diffusers(kind, steps):
    ref, sch = reference(kind, steps), ours(kind, steps)
    assert sch.timesteps == [int(t) for t in ref.timesteps]
    assert float(sch.init_sigma) == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    g = torch.Generator().manual_seed(steps)
    x = torch.randn(2, 4, 6, 5, generator=g) * sch.init_sigma
    x_ref = x.clone()
    ts = sch.timesteps + [-1]
    for t, t_prev in zip(ts, ts[1:]):
        eps = torch.randn(x.shape, generator=g)
        inp, inp_ref = sch.scale_input(x, t), ref.scale_model_input(x_ref, ref.timesteps[ts.index(t)])
        torch.testing.assert_close(inp, inp_ref, rtol=1e-5, atol=1e-5)
        x = sch.step(x, eps, t, t_prev)
        x_ref = ref.step(eps, ref.timesteps[ts.index(t)], x_ref).prev_sample
        scale = x_ref.abs().max().item()
        torch.testing.assert_close(x, x_ref, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("kind", ["ddim", "euler"])
@pytest.mark.parametrize("steps", STEPS)
def test_add_noise_matches_diffusers(kind, steps):
    ref, sch = reference(kind, steps), ours(kind, steps)
    g = torch.Generator().manual_seed(100 + steps)
    x0, eps = torch.randn(1, 4, 5, 7, generator=g), torch.randn(1, 4, 5, 7, generator=g)
    for i, t in enumerate(sch.timesteps):
        expected = ref.add_noise(x0, eps, ref.timesteps[i:i + 1])
        scale = expected.abs().max().item()
        torch.testing.assert_close(sch.add_noise(x0, eps, t), expected, rtol=1e-6, atol=1e-6 * scale)


def test_euler_space_is_scaled_ddim_space():
    # x_sigma = x_t / sqrt(abar_t): re-noising in Euler's space is DDIM's re-noising divided by sqrt(abar_t)
    ddim, euler = DDIM(10), Euler(10)
    x0, eps = torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3)
    for t in ddim.timesteps:
        a = alphas_cumprod()[t].item()
        torch.testing.assert_close(euler.add_noise(x0, eps, t), ddim.add_noise(x0, eps, t) / math.sqrt(a))
        torch.testing.assert_close(euler.scale_input(euler.add_noise(x0, eps, t), t), ddim.add_noise(x0, eps, t))
    # and DDIM's step is Euler's step in that space, up to where the last step lands
    ts = ddim.timesteps
    for t, t_prev in zip(ts, ts[1:]):
        a, a_prev = alphas_cumprod()[t].item(), alphas_cumprod()[t_prev].item()
        torch.testing.assert_close(euler.step(x0 / math.sqrt(a), eps, t, t_prev) * math.sqrt(a_prev),
                                   ddim.step(x0, eps, t, t_prev))


def test_last_ddim_step_lands_on_abar_0():
    # set_alpha_to_one=False: the final "previous" alpha is abar_0, so eps keeps weight sqrt(1 - abar_0)
    sch = DDIM(4)
    x, eps = torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
    a1, a0 = alphas_cumprod()[1].item(), alphas_cumprod()[0].item()
    expected = math.sqrt(a0) * (0 - math.sqrt(1 - a1)) / math.sqrt(a1) + math.sqrt(1 - a0)
    assert sch.step(x, eps, 1, -1).item() == pytest.approx(expected, rel=1e-5)
