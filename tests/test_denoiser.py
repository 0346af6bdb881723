"""DemoFusion as one denoiser of the canvas (minifusion.demofusion): the same latents as the pre-change loop that
stepped every view (tests/demofusion_reference.py) for DDIM and Euler; every sampler sees one canvas (one history,
one noise draw per step, the skip residual applied to the state the solver carries on); the work it does is what
minifusion.work describes; strength, CFG off and guidance rescale."""
import math

import pytest
import torch
from diffusers import UniPCMultistepScheduler

from minifusion.demofusion import demofusion, renormalise, skip_residual, upsample
from minifusion.noise import NoiseSchedule
from minifusion.samplers import sample
from minifusion.schedulers import Choice
from minifusion.settings import SAMPLERS
from minifusion.views import Cond, ViewRunner, Whole, rescale_guidance
from minifusion.work import describe
from demofusion_reference import demofusion_reference
from sampler_oracles import SDXL_SCHEDULER_CONFIG, FakeModel
from test_demofusion import FakeUNet, make_cond

pytestmark = pytest.mark.usefixtures("one_thread")


def rel(a, b) -> float:
    return ((a - b).abs().max() / b.std()).item()


# ---- DDIM and Euler: fusing model outputs and stepping the canvas once = stepping every view, averaged ----

OLD_CASES = [  # (height, width, base, window, stride, steps, knobs): non-square, 3 scales, jitter, every knob
    (192, 128, 64, 8, 4, 50, {}),
    (96, 160, 64, 8, 2, 25, {"view_batch_size": 1}),
    (192, 192, 64, 8, 4, 25, {"cosine_scale_1": 2.0, "cosine_scale_2": 0.5, "cosine_scale_3": 1.5, "sigma": 1.2}),
    # the fake UNet's trajectories grow fast (std 30 and more): at CFG 7.5 one float32 ulp of Euler's phase 1,
    # where old and new differ only by the space the state is kept in (x / alpha then, x now), grows to 1e-5
    (160, 96, 64, 8, 6, 20, {"jitter": False, "guidance_scale": 5.0}),
]


@pytest.mark.parametrize("kind", ["ddim", "euler"])
@pytest.mark.parametrize("height, width, base, window, stride, steps, knobs", OLD_CASES)
def test_denoiser_equals_the_pre_change_loop(kind, height, width, base, window, stride, steps, knobs):
    kw = dict(height=height, width=width, base_px=base, window=window, stride=stride, steps=steps,
              guidance_scale=4.0, view_batch_size=3) | knobs
    new = [r.latents for r in demofusion(FakeUNet(), make_cond(), generator=torch.Generator().manual_seed(0),
                                         sampler=kind, **kw)]
    old = demofusion_reference(FakeUNet(), make_cond(), generator=torch.Generator().manual_seed(0), scheduler=kind,
                               **kw)
    errors = [rel(a, b) for a, b in zip(new, old)]
    print(f"{kind} {width}x{height} {steps} steps {knobs}: " + ", ".join(f"{e:.1e}" for e in errors))
    assert len(new) == len(old) >= 2 and max(errors) <= 1e-5
    if kind == "ddim":
        assert errors[0] == 0  # phase 1 is the same arithmetic


# ---- every sampler sees one canvas ----

class PointwiseModel:
    """A UNet stand-in that looks at each latent alone (a 1x1 conv, no micro-conditioning): its output on a window or
    on a dilated view is the canvas output there, so DemoFusion with an identity blur is the sampler on the canvas."""

    def __init__(self, seed=0):
        self.w = torch.randn(4, 4, generator=torch.Generator().manual_seed(seed)) * 0.4

    def __call__(self, x, t, context, pooled, time_ids):
        h = torch.einsum("nchw,cd->ndhw", x, self.w) + context.mean(dim=(1, 2))[:, None, None, None]  # CFG matters
        return torch.tanh(h * (1 + t.reshape(-1, 1, 1, 1) / 1000))


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_runs_on_the_whole_canvas(name):
    """Scale 2 of a DemoFusion run on a model that ignores views, with a blur of no width: the sampler run on the
    canvas with the skip residual as its state change (one multistep history, one noise tensor a step)."""
    model, cond = PointwiseModel(), make_cond()
    run = Choice(name, "trailing").sampling(6)
    g = torch.Generator().manual_seed(3)
    latents, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 16, 16, generator=g)
    kw = dict(height=128, width=128, base_px=64, window=8, stride=4, steps=6, guidance_scale=3.0, sigma=1e-6,
              view_batch_size=5, jitter=False, latents=latents, noise=[eps])
    out = list(demofusion(model, cond, generator=torch.Generator().manual_seed(1), sampler=run, **kw))

    runner = ViewRunner(model, cond, size=(128, 128), guidance_scale=3.0, batch=1)
    g = torch.Generator().manual_seed(1)

    def canvas(x, i):
        return runner([(x, [Whole()])], run.timestep(i), i, 1)[0]

    z1 = sample(run, canvas, latents, generator=g)
    z_up = upsample(z1, (16, 16))
    z2 = sample(run, canvas, run.add_noise(z_up, eps, 0), generator=g,
                change=lambda x, i: skip_residual(x, run.add_noise(z_up, eps, i), run.timestep(i), 3.0))
    assert torch.equal(out[0].latents, z1)
    err = rel(out[1].latents, renormalise(z2, z1.mean(), z1.std()))
    print(f"{name}: {err:.1e}")
    assert err <= 1e-5


def test_unipc_applies_the_state_change_to_the_corrected_state():
    """diffusers' UniPC with the change applied to the state the model sees and to what its corrector returns
    (the state it carries on) is ours; applying it only to what the model sees is something else."""
    model = FakeModel(seed=2)
    g = torch.Generator().manual_seed(4)
    x, target = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    run = Choice("unipc", "trailing").sampling(8)

    def change(z, i):
        return 0.7 * z + 0.3 * run.add_noise(target, x, i)

    got = sample(run, lambda z, i: model(z, run.timestep(i)), x, change=change)

    def theirs(correct_too: bool):
        sch = UniPCMultistepScheduler.from_config({**SDXL_SCHEDULER_CONFIG, "timestep_spacing": "trailing"})
        sch.set_timesteps(8)
        corrector, state = sch.multistep_uni_c_bh_update, {}
        if correct_too:
            sch.multistep_uni_c_bh_update = lambda *a, **k: change(corrector(*a, **k), state["i"])
        z = x
        for i, t in enumerate(sch.timesteps):
            state["i"] = i
            z = change(z, i)
            z = sch.step(model(z, t), t, z).prev_sample
        return z

    assert rel(got, theirs(True)) <= 1e-5
    assert rel(got, theirs(False)) > 1e-3


# ---- the work it does ----

@pytest.mark.parametrize("guidance, strength, batch", [(4.0, 1.0, 3), (1.0, 1.0, 4), (7.5, 0.5, 5), (1.0, 0.34, 16)])
def test_counts_are_the_work_description(guidance, strength, batch):
    unet, progress = FakeUNet(), []
    out = list(demofusion(unet, make_cond(), height=192, width=128, base_px=64, window=8, stride=4, steps=6,
                          guidance_scale=guidance, view_batch_size=batch, strength=strength,
                          generator=torch.Generator().manual_seed(0), progress=lambda *a: progress.append(a)))
    work = describe(192, 128, base_px=64, window=8, stride=4, steps=6, view_batch=batch,
                    halves=2 if guidance > 1 else 1, strength=strength)
    assert [w.steps for w in work] == [6] + [int(6 * strength)] * 2
    for r, w in zip(out, work):
        assert (r.stats.windows, r.stats.dilated_views) == (w.windows, w.dilated_views)
        assert (r.stats.unet_evals, r.stats.unet_calls) == (w.unet_evals, w.unet_calls)
        assert [p for p in progress if p[0] == r.scale][-1] == (r.scale, w.steps, w.steps, w.unet_evals)
    assert sum(len(c["x"]) for c in unet.calls) == sum(w.unet_evals for w in work)
    assert len(unet.calls) == sum(w.unet_calls for w in work)


def test_work_description_by_hand():
    # 4096^2 SDXL: 3x3, 7x7, 9x9... windows of 128 at stride 64 -> 9, 25, 49 windows; s^2 dilated views
    work = describe(4096, 4096, base_px=1024, window=128, steps=50)
    assert [(w.windows, w.dilated_views) for w in work] == [(0, 0), (9, 4), (25, 9), (49, 16)]
    assert [len(w.calls) for w in work] == [1, 2, 3, 5]  # 16 views a call: 9 + 4, 16 + 9 + 9, 49 = 16x3 + 1 + 16
    assert sum(w.unet_evals for w in work) == 2 * 50 * (1 + 13 + 34 + 65) == 11300
    half = describe(4096, 4096, base_px=1024, window=128, steps=50, halves=1, strength=0.5, first_scale=2)
    assert [w.scale for w in half] == [2, 3, 4] and sum(w.unet_evals for w in half) == 25 * (13 + 34 + 65)


# ---- strength, CFG off, guidance rescale ----

def test_strength_starts_scales_later_in_the_schedule():
    unet = FakeUNet()
    list(demofusion(unet, make_cond(), height=128, width=128, base_px=64, window=8, stride=4, steps=10,
                    guidance_scale=4.0, strength=0.3, generator=torch.Generator().manual_seed(0),
                    sampler=Choice("dpmpp_2m", "karras").sampling(10)))
    run = Choice("dpmpp_2m", "karras").sampling(10)
    ts = [c["t"][0].item() for c in unet.calls]
    assert ts[:10] == pytest.approx([p.t for p in run.points[:10]], abs=1e-4)  # phase 1: every step
    assert sorted(set(ts[10:]), reverse=True) == pytest.approx([p.t for p in run.points[7:10]], abs=1e-4)


def test_cfg_off_runs_the_text_row_once_per_view():
    unet, cond = FakeUNet(), make_cond()
    list(demofusion(unet, cond, height=128, width=128, base_px=64, window=8, stride=4, steps=2, guidance_scale=1.0,
                    generator=torch.Generator().manual_seed(0)))
    for c in unet.calls:
        n = len(c["x"])
        assert torch.equal(c["context"], cond.context[1:].expand(n, -1, -1))
        assert torch.equal(c["pooled"], cond.pooled[1:].expand(n, -1))
    # and the output is the text-conditioned output itself
    x = torch.randn(3, 4, 8, 8)
    alone = ViewRunner(FakeUNet(), cond, size=(64, 64), guidance_scale=1.0, batch=2)
    guided = ViewRunner(FakeUNet(), cond, size=(64, 64), guidance_scale=1.0 + 1e-9, batch=2)
    views = [Whole()] * 3
    a, b = alone([(x, views)], 500, 0, 1)[0], guided([(x, views)], 500, 0, 1)[0]
    torch.testing.assert_close(a, b)
    assert (alone.evals, guided.evals) == (3, 6)


def test_guidance_rescale_is_diffusers_per_view():
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg
    g = torch.Generator().manual_seed(0)
    guided, text = torch.randn(3, 4, 8, 6, generator=g) * 2, torch.randn(3, 4, 8, 6, generator=g)
    for k in range(3):  # diffusers rescales a whole batch item: here one view
        torch.testing.assert_close(rescale_guidance(guided, text, 0.7)[k:k + 1],
                                   rescale_noise_cfg(guided[k:k + 1], text[k:k + 1], 0.7))


def test_v_prediction_zero_snr_runs_every_scale():
    run = Choice("euler", "trailing").sampling(4, NoiseSchedule("v_prediction", True))
    out = list(demofusion(FakeUNet(), make_cond(), height=192, width=128, base_px=64, window=8, stride=4, steps=4,
                          guidance_scale=4.0, guidance_rescale=0.7, sampler=run,
                          generator=torch.Generator().manual_seed(0)))
    assert [r.scale for r in out] == [1, 2, 3] and all(torch.isfinite(r.latents).all() for r in out)
    assert not math.isclose(out[2].latents.std().item(), 0.0)
