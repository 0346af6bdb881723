"""The memory model counts the ControlNet: its weights beside the UNet's, its condition image per scale and the
activations of a steered UNet call, checked against real CPU runs of the tiny model under the same MemoryTracker
(as tests/test_memory.py checks the uncontrolled model)."""
import functools

import pytest
import torch

from minifusion import memory
from minifusion.checkpoint import Configs
from minifusion.config import VAEConfig
from minifusion.controlnet import Control, Unit
from minifusion.demofusion import demofusion, scale_sizes
from minifusion.memory import MemoryTracker
from minifusion.models.controlnet import ControlNet, ControlNetConfig
from minifusion.tiny import TINY, random_models, randomize
from minifusion.views import Cond, ViewRunner

SMALL = Configs(TINY.unet, VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8),
                TINY.text_encoder_1, TINY.text_encoder_2)
CN = ControlNetConfig(TINY.unet, (False, True, True), hint_channels=(4, 8, 8, 16))
SIZE, F32 = 512, torch.float32  # two scales on the tiny model's 256 px base: 32^2 then 64^2 latents


@pytest.fixture(scope="module")
def models():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(2)
    yield random_models(TINY, seed=0)["unet"], [randomize(ControlNet(CN), g).eval() for _ in range(2)]
    torch.set_num_threads(n)


def test_meta_steered_call_allocates_what_a_cpu_run_allocates(models):
    unet, nets = models
    n, h, w = 6, 21, 32
    real = memory.controlled_activation_bytes(unet, nets, n, h, w)
    assert real > memory.unet_activation_bytes(unet, n, h, w)
    assert memory.controlled_activation_bytes(TINY.unet, (CN, CN), n, h, w, F32) == real


def test_steered_profile_predicts_an_unseen_call(models):
    unet, nets = models
    profile = memory.activation_profile(TINY.unet, F32, controlnets=(CN,))
    real = memory.controlled_activation_bytes(unet, nets[:1], 10, 24, 20)
    assert abs(profile.bytes(10, 24, 20) - real) <= 0.05 * real


def test_controlnet_weights_are_counted_where_the_unets_are():
    plain = memory.predict(SMALL, SIZE, SIZE, F32, view_batch_size=4)
    steered = memory.predict(SMALL, SIZE, SIZE, F32, view_batch_size=4, controlnets=(CN,))
    weights = sum(p.numel() for p in ControlNet(CN).parameters()) * 4
    assert memory.controlnet_weights_bytes((CN,), F32) == weights
    for a, b in zip(plain, steered):
        assert b["decode_bytes"] - a["decode_bytes"] == weights  # resident: beside the UNet during the decode too
        assert b["denoise_bytes"] - a["denoise_bytes"] > weights
    away = [memory.predict(SMALL, SIZE, SIZE, F32, 4, resident=(), controlnets=c) for c in ((), (CN,))]
    assert away[1][0]["decode_bytes"] == away[0][0]["decode_bytes"]  # with the UNet, off the device to decode


@torch.no_grad()
def test_steered_denoising_peak_matches_a_cpu_run(models):
    """The sampler steered by two ControlNets on the CPU, every tensor tracked (the condition image included),
    against the prediction of each scale's peak over the resident weights (within 10%)."""
    unet, nets = models
    g = torch.Generator().manual_seed(0)
    cond = Cond(torch.randn(2, 77, TINY.unet.context_dim, generator=g),
                torch.randn(2, TINY.unet.pooled_dim, generator=g))
    sizes = scale_sizes(SIZE, SIZE, 256)
    peaks, tracker = [], MemoryTracker()
    with tracker:
        images = [torch.rand(1, 3, 256, 256, generator=g) for _ in nets]
        control = Control([Unit(net, image) for net, image in zip(nets, images)], sizes, steps=1)
        run = demofusion(unet, cond, height=SIZE, width=SIZE, base_px=256, window=32, steps=1, guidance_scale=7.5,
                         stride=16, view_batch_size=4, jitter=False,
                         runner=functools.partial(ViewRunner, control=control))
        for _ in run:
            peaks.append(tracker.peak)
            tracker.peak = tracker.live
    rows = memory.predict(SMALL, SIZE, SIZE, F32, view_batch_size=4, controlnets=(CN, CN))
    resident = sum(memory.weights_bytes(SMALL, F32).values()) + memory.controlnet_weights_bytes((CN, CN), F32)
    for measured, row in zip(peaks, rows):
        predicted = row["denoise_bytes"] - resident
        print(f"scale {row['scale']}: predicted {predicted / 2**20:.2f} MiB, measured {measured / 2**20:.2f} MiB")
        assert abs(predicted - measured) <= 0.10 * measured, (row["scale"], predicted, measured)


def test_plan_fits_the_controlnet_in_the_budget():
    """A budget the uncontrolled run fills at 16 views per call: steered, the plan takes fewer."""
    budget = memory.needs(memory.predict(SMALL, SIZE, SIZE, F32, view_batch_size=16, decode_tile=64), "cpu")[0]
    plain = memory.plan(budget, SMALL, SIZE, SIZE, F32, "cpu", view_batch_sizes=(16, 4, 1), decode_tiles=(64,))
    steered = memory.plan(budget, SMALL, SIZE, SIZE, F32, "cpu", view_batch_sizes=(16, 4, 1), decode_tiles=(64,),
                          controlnets=(CN,))
    assert plain.view_batch_size == 16 and steered.view_batch_size < 16
