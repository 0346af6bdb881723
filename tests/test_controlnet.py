"""SDXL ControlNet under DemoFusion.

The network: parity with diffusers' ControlNetModel (residuals, guess mode) and our UNet with residuals against
UNet2DConditionModel(down_block_additional_residuals=, mid_block_additional_residual=) on tiny random weights
with non-zero zero convs; the full-size structure against diffusers' ControlNetModel.from_unet(SDXL UNet) on the
meta device. The feeding: every mechanism as a pure function against the official pipeline's own expression of
it (pipeline_demofusion_sdxl_controlnet.py, written out literally here); then whole tiny runs, one against an
independent re-implementation of the official per-view feeding driving diffusers' ControlNetModel and
UNet2DConditionModel, number for number.
"""
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from minifusion import controlnet as cn
from minifusion.config import SDXL_UNET, UNetConfig
from minifusion.demofusion import demofusion, local_windows, scale_sizes, window_margin
from minifusion.keyops import convert_state_dict, to_source
from minifusion.models import unet as unet_module
from minifusion.models.controlnet import ControlNet, ControlNetConfig, diffusers_keys
from minifusion.models.unet import UNet
from minifusion.tiny import randomize
from minifusion.views import Cond, Dilated, ViewRunner, Whole, Window
from helpers import SDXL_BASE

POOLED, CTX = 40, 64
# SDXL's structure at toy width (as tests/test_unet.py): no attention on level 1, 64-wide heads
TINY_UNET = UNetConfig(model_channels=32, transformer_depth=(0, 2, 2), transformer_depth_middle=2, context_dim=CTX,
                       adm_in_channels=POOLED + 48, addition_time_embed_dim=8, sample_size=32)
# a "-mid"-like ControlNet for it: level 2 keeps its attention modules with zero transformer blocks; distinct
# condition-embedding widths, so a swapped conv cannot load
TINY_CN = ControlNetConfig(UNetConfig(**{**TINY_UNET.__dict__, "transformer_depth": (0, 0, 2)}), (False, True, True),
                           hint_channels=(8, 16, 24, 40))


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: thread start-up would dominate


def diffusers_kwargs(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def rel_err(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def inputs(b, hw, seed, ctx=CTX, pooled=POOLED):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 4, *hw, generator=g), torch.tensor([999.0, 17.0, 500.0, 3.0][:b]),
            torch.randn(b, 77, ctx, generator=g), torch.randn(b, pooled, generator=g),
            torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768, 1344, 128, 64, 1024, 1024],
                          [512, 512, 8, 0, 512, 512], [256, 768, 0, 16, 256, 768]][:b]),
            torch.rand(b, 3, 8 * hw[0], 8 * hw[1], generator=g))


@pytest.fixture(scope="module")
def cn_pair():
    theirs = ControlNetModel(**diffusers_kwargs(TINY_CN.to_diffusers_config())).eval()
    randomize(theirs, torch.Generator().manual_seed(0))  # diffusers zero-inits the zero convs: they would hide bugs
    ours = ControlNet(TINY_CN).eval()
    ours.load_state_dict(convert_state_dict(theirs.state_dict(), diffusers_keys(TINY_CN)), strict=True)
    return ours, theirs


# ---- the network ----

@pytest.mark.parametrize("guess_mode", [False, True])
@pytest.mark.parametrize("hw", [(13, 18), (16, 24)])
def test_controlnet_parity_with_diffusers(cn_pair, guess_mode, hw):
    ours, theirs = cn_pair
    x, t, ctx, pooled, ids, cond = inputs(3, hw, hw[0] + guess_mode)
    with torch.no_grad():
        ref_down, ref_mid = theirs(x, t, ctx, cond, conditioning_scale=0.7, guess_mode=guess_mode, return_dict=False,
                                   added_cond_kwargs={"text_embeds": pooled, "time_ids": ids})
        down, mid = ours(x, t, ctx, pooled, ids, cond, scale=0.7, guess_mode=guess_mode)
    assert len(down) == len(ref_down) == 9
    errs = [rel_err(a, b) for a, b in zip([*down, mid], [*ref_down, ref_mid])]
    print(f"{hw} guess_mode={guess_mode}: max relative error {max(errs):.1e}")
    assert max(errs) <= 1e-5
    assert all(r.abs().max() > 0.01 for r in down)  # non-zero zero convs: every residual carries signal


def test_one_condition_per_view_for_both_cfg_rows(cn_pair):
    """A view's condition embedded once for its uncond and text rows: as diffusers fed each row its copy."""
    ours, theirs = cn_pair
    x, t, ctx, pooled, ids, cond = inputs(4, (10, 12), 5)
    with torch.no_grad():
        ref_down, ref_mid = theirs(x, t, ctx, cond[0::2].repeat_interleave(2, dim=0), return_dict=False,
                                   added_cond_kwargs={"text_embeds": pooled, "time_ids": ids})
        down, mid = ours(x, t, ctx, pooled, ids, cond[0::2])
        with pytest.raises(ValueError, match="3 condition images for 4 latents"):
            ours(x, t, ctx, pooled, ids, cond[:3])
    assert max(rel_err(a, b) for a, b in zip([*down, mid], [*ref_down, ref_mid])) <= 1e-5


def test_controlnet_reads_the_condition(cn_pair):
    ours, _ = cn_pair
    x, t, ctx, pooled, ids, cond = inputs(2, (8, 8), 3)
    with torch.no_grad():
        a, _ = ours(x, t, ctx, pooled, ids, cond)
        b, _ = ours(x, t, ctx, pooled, ids, cond.flip(-1))
    assert (a[0] - b[0]).abs().max() > 1e-3


@pytest.fixture(scope="module")
def unet_pair():
    theirs = UNet2DConditionModel(**diffusers_kwargs(TINY_UNET.to_diffusers_config())).eval()
    randomize(theirs, torch.Generator().manual_seed(1))
    ours = UNet(TINY_UNET).eval()
    ours.load_state_dict(convert_state_dict(theirs.state_dict(), unet_module.diffusers_keys(TINY_UNET)), strict=True)
    return ours, theirs


@pytest.mark.parametrize("hw", [(13, 18), (16, 24)])
def test_unet_with_residuals_parity_with_diffusers(cn_pair, unet_pair, hw):
    """The residuals of a ControlNet with non-zero zero convs, added by ours and by diffusers' UNet."""
    net, _ = cn_pair
    ours, theirs = unet_pair
    x, t, ctx, pooled, ids, cond = inputs(2, hw, 7)
    with torch.no_grad():
        down, mid = net(x, t, ctx, pooled, ids, cond, scale=0.9)
        ref = theirs(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids},
                     down_block_additional_residuals=[d.clone() for d in down],
                     mid_block_additional_residual=mid.clone()).sample
        out = ours(x, t, ctx, pooled, ids, residuals=(down, mid))
        plain = ours(x, t, ctx, pooled, ids)
    print(f"{hw}: max relative error {rel_err(out, ref):.1e}")
    assert rel_err(out, ref) <= 1e-5
    assert (out - plain).abs().max() > 100 * (out - ref).abs().max() + 1e-3  # the residuals matter


def test_zero_residuals_leave_the_unet_exact(unet_pair):
    ours, _ = unet_pair
    x, t, ctx, pooled, ids, _ = inputs(2, (9, 14), 8)
    sizes = [(9, 14)] * 3 + [(5, 7)] * 3 + [(3, 4)] * 3

    def zeros():
        return [x.new_zeros(2, c, *hw) for c, hw in zip(ours.skip_channels, sizes)], x.new_zeros(2, 128, 3, 4)

    with torch.no_grad():
        plain = ours(x, t, ctx, pooled, ids)
        down, mid = zeros()
        assert torch.equal(ours(x, t, ctx, pooled, ids, residuals=(down, mid)), plain)
        assert down == []  # emptied once added: the residuals are freed before the decoder half runs
        with pytest.raises(ValueError, match="8 ControlNet residuals for 9 skip connections"):
            ours(x, t, ctx, pooled, ids, residuals=(zeros()[0][:8], mid))


def test_global_pool_and_bgr_as_diffusers():
    cfg = ControlNetConfig(TINY_CN.unet, TINY_CN.attention, TINY_CN.hint_channels, global_pool=True, bgr=True)
    theirs = ControlNetModel(**diffusers_kwargs(cfg.to_diffusers_config())).eval()
    randomize(theirs, torch.Generator().manual_seed(4))
    ours = ControlNet(cfg).eval()
    ours.load_state_dict(convert_state_dict(theirs.state_dict(), diffusers_keys(cfg)), strict=True)
    x, t, ctx, pooled, ids, cond = inputs(2, (8, 12), 9)
    with torch.no_grad():
        ref_down, ref_mid = theirs(x, t, ctx, cond, conditioning_scale=0.5, guess_mode=True, return_dict=False,
                                   added_cond_kwargs={"text_embeds": pooled, "time_ids": ids})
        down, mid = ours(x, t, ctx, pooled, ids, cond, scale=0.5, guess_mode=True)
    assert mid.shape == (2, 128, 1, 1)
    assert max(rel_err(a, b) for a, b in zip([*down, mid], [*ref_down, ref_mid])) <= 1e-5


def test_full_size_matches_diffusers_from_unet():
    """The SDXL ControlNet (diffusers/controlnet-canny-sdxl-1.0 is ControlNetModel.from_unet of SDXL's UNet):
    every key and shape, on the meta device."""
    from minifusion.controlnet_file import _config_of_json

    with torch.device("meta"):
        theirs = ControlNetModel.from_unet(UNet2DConditionModel(**SDXL_BASE), load_weights_from_unet=False)
        ours = ControlNet(ControlNetConfig.from_unet(SDXL_UNET))
    cfg = ControlNetConfig.from_unet(SDXL_UNET)
    assert _config_of_json(dict(theirs.config), SDXL_UNET) == cfg
    their_shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    table = diffusers_keys(cfg)
    assert sorted(src for src, _ in table.values()) == sorted(their_shapes)
    assert {k: their_shapes[src] for k, (src, _) in table.items()} == {k: tuple(v.shape)
                                                                       for k, v in ours.state_dict().items()}
    n = sum(p.numel() for p in ours.parameters())
    print(f"SDXL ControlNet: {len(table)} tensors, {n:,} parameters")
    assert n == sum(p.numel() for p in theirs.parameters()) == 1_251_014_160


# ---- feeding it: each mechanism against the official pipeline's own expression ----

def official_pad_crop(condition, view: Window):
    # condition_image_ = F.pad(condition_image, (jitter_range * 8,) * 4)[..., h_start * 8:h_end * 8, w_start * 8:...]
    p = 8 * view.margin
    return F.pad(condition, (p, p, p, p))[0:1, :, view.top * 8:view.bottom * 8, view.left * 8:view.right * 8]


def official_dilated(condition, view: Dilated):
    # F.pad(condition_image, (w_pad * 8, w * 8, h_pad * 8, h * 8))[0:1, :, h * 8::s, w * 8::s]
    padded = F.pad(condition, (view.pad_left * 8, view.j * 8, view.pad_top * 8, view.i * 8))
    return padded[0:1, :, view.i * 8::view.s, view.j * 8::view.s]


@pytest.mark.parametrize("h, w, window, stride", [(33, 64, 32, 16), (128, 170, 128, 64), (40, 31, 32, 8)])
def test_window_crop_is_the_official_pad_then_crop(h, w, window, stride):
    g = torch.Generator().manual_seed(h)
    condition = torch.rand(1, 3, 8 * h, 8 * w, generator=g)
    margin = window_margin(window, stride)
    boxes = local_windows(h, w, window, stride, jitter=True, generator=g) + local_windows(h, w, window, stride)
    for box in boxes:
        view = Window(*box, margin)
        got = cn.window_condition(condition, view)
        assert got.shape == (1, 3, 8 * min(window, h), 8 * min(window, w))
        assert torch.equal(got, official_pad_crop(condition, view))
    # a window at the top-left corner of the padded frame reaches into the zero margin
    corner = cn.window_condition(condition, Window(0, window, 0, window, margin))
    assert corner[..., :8 * margin, :].abs().max() == 0 and corner[..., 8 * margin:, 8 * margin:].abs().min() > 0


@pytest.mark.parametrize("h, w, s", [(33, 64, 2), (48, 96, 3), (50, 37, 4), (16, 16, 2)])
def test_dilated_subsample_is_the_official_strided_pad(h, w, s):
    condition = torch.rand(1, 3, 8 * h, 8 * w, generator=torch.Generator().manual_seed(w))
    pad_top, pad_left = -h % s, -w % s
    for i in range(s):
        for j in range(s):
            view = Dilated(i, j, s, pad_top, pad_left)
            got = cn.dilated_condition(condition, view)
            assert got.shape == (1, 3, 8 * (h + pad_top) // s, 8 * (w + pad_left) // s)  # 8 x the view's latents
            assert torch.equal(got, official_dilated(condition, view))
    # view (0, 0) with no pad is the plain pixel-strided image: no blur, nothing but every s-th pixel
    if pad_top == pad_left == 0:
        assert torch.equal(cn.dilated_condition(condition, Dilated(0, 0, s, 0, 0)), condition[..., ::s, ::s])


def test_sizes_not_a_multiple_of_8_are_latent_aligned():
    """3072 x 2048 on SDXL: scale 2 is 1365 x 2048 px but 170 x 256 latents. The official's 1365-row condition
    gives a dilated view 683 rows, which the ControlNet's three stride-2 convs take to 86 against the view's 85
    latent rows (its crash); the condition at 8 x the latent size gives exactly 8 x 85."""
    sizes = scale_sizes(2048, 3072, 1024)
    assert sizes == [(85, 128), (170, 256), (256, 384)]
    official_rows = int(1024 * 2 * (2048 / 3072))
    assert official_rows == 1365
    condition = torch.zeros(1, 3, official_rows, 8)
    assert official_dilated(condition, Dilated(0, 0, 2, 0, 0)).shape[-2] == 683
    with torch.device("meta"):
        hint = ControlNet(ControlNetConfig.from_unet(SDXL_UNET)).input_hint_block
        assert hint(torch.zeros(1, 3, 683, 16)).shape[-2] == 86
    ours = cn.upsample(torch.rand(1, 3, *cn.condition_size(sizes[0])), sizes[1])
    assert ours.shape[-2:] == (1360, 2048)
    assert cn.dilated_condition(ours, Dilated(1, 0, 2, 0, 0)).shape[-2:] == (680, 1024)


def test_chained_bicubic_upsampling():
    """Each scale's condition from the previous scale's tensor (bicubic, align_corners False, no clamp) at
    the official pixel size current_height x current_width, here a multiple of 8."""
    sizes = scale_sizes(384, 768, 128)  # a 128 px base: S = 6
    first = torch.rand(1, 3, *cn.condition_size(sizes[0]), generator=torch.Generator().manual_seed(0))
    control = cn.Control([cn.Unit(None, first)], sizes, steps=1)
    official = first
    for s in range(2, len(sizes) + 1):
        size = (int(128 * s * 0.5), 128 * s)  # current_height = int(base * s * aspect), current_width = base * s
        official = F.interpolate(official, size=size, mode="bicubic")
        assert torch.equal(control.condition(0, s, torch.device("cpu")), official)
    assert official.min() < 0 or official.max() > 1  # bicubic overshoots; nothing clamps it
    assert torch.equal(control.condition(0, 2, torch.device("cpu")), F.interpolate(first, size=(128, 256),
                                                                                    mode="bicubic"))


def test_keep_schedule_by_hand():
    # diffusers' controlnet_keep: off while k/N < start or (k+1)/N > end
    assert [cn.keep(k, 10, 0.2, 0.7) for k in range(10)] == [0, 0, 1, 1, 1, 1, 1, 0, 0, 0]
    assert [cn.keep(k, 4, 0.0, 1.0) for k in range(4)] == [1, 1, 1, 1]
    assert [cn.keep(k, 3, 0.3, 0.7) for k in range(3)] == [0, 1, 0]


def test_prepare_image_as_diffusers_image_processor():
    """Phase 1's condition: the official prepare_image at (W // S, H // S), which diffusers rounds down to a
    multiple of 8: 8 x phase 1's latent size."""
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (150, 100, 3), dtype=np.uint8))
    height, width, base = 512, 768, 256  # S = 3: (170, 256) px, which diffusers rounds to (168, 256)
    size = cn.phase1_condition_size(height, width, base)
    processor = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
    ref = processor.preprocess(picture, height=height // 3, width=width // 3)
    assert size == (168, 256) == tuple(ref.shape[-2:])
    assert torch.equal(cn.prepare_image(picture, size), ref.float())
    tensor = torch.rand(1, 3, 40, 60, generator=torch.Generator().manual_seed(1))
    assert torch.equal(cn.prepare_image(tensor, (40, 60)), tensor)
    assert torch.equal(cn.prepare_image(tensor, (80, 64)), processor.preprocess(tensor, height=80, width=64))
    for bad in (tensor * 2, tensor[0], tensor.double().half().long()):
        with pytest.raises(ValueError, match="control image tensor"):
            cn.prepare_image(bad, (40, 60))


class Recorder(torch.nn.Module):
    """A stand-in ControlNet: records its inputs, returns residuals that depend on all of them."""

    def __init__(self, channels):
        super().__init__()
        self.time_embed = torch.nn.Sequential(torch.nn.Linear(1, 1))
        self.control = ControlNetConfig(TINY_UNET, (False, True, True))
        self.channels, self.calls = channels, []

    def forward(self, x, t, ctx, pooled, ids, condition, scale=1.0, guess_mode=False):
        self.calls.append(dict(x=x, t=t, ctx=ctx, pooled=pooled, ids=ids, condition=condition, scale=scale,
                               guess_mode=guess_mode))
        per_row = condition.mean((1, 2, 3)).repeat_interleave(len(x) // len(condition))
        v = (x.mean((1, 2, 3)) + t / 1000 + ctx.mean((1, 2)) + pooled.mean(1) + ids.mean(1) / 1000
             + per_row)[:, None, None, None] * scale
        return [v.expand(-1, c, 2, 2) + 0 for c in self.channels], v.expand(-1, self.channels[-1], 1, 1) + 0


def test_control_feeds_the_unet_inputs_and_scales_by_keep():
    sizes = [(4, 4), (8, 8)]
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    net = Recorder([3, 5])
    control = cn.Control([cn.Unit(net, image, scale=0.5, start=0.0, end=0.5)], sizes, steps=4)
    x2, t2, ctx, pooled, ids = torch.rand(4, 4, 4, 4), torch.full((4,), 10.0), torch.rand(4, 7, 6), \
        torch.rand(4, 5), torch.rand(4, 6)
    views = [Window(0, 4, 0, 4, 1), Window(2, 6, 4, 8, 1)]
    down, mid = control(x2, t2, ctx, pooled, ids, views, step=1, scale=2)
    call = net.calls[-1]
    assert all(call[k] is v for k, v in dict(x=x2, t=t2, ctx=ctx, pooled=pooled, ids=ids).items())
    assert call["scale"] == 0.5 and call["guess_mode"] is False
    condition = F.interpolate(image, size=(64, 64), mode="bicubic")
    # one crop per view: the ControlNet embeds it once for both of the view's rows
    assert torch.equal(call["condition"], torch.cat([official_pad_crop(condition, v) for v in views]))
    assert control(x2, t2, ctx, pooled, ids, views, step=2, scale=2) is None  # keep = 0: not run at all
    assert len(net.calls) == 1


def test_guess_mode_runs_on_the_text_rows_only():
    net = Recorder([3, 5])
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    control = cn.Control([cn.Unit(net, image)], [(4, 4), (8, 8)], steps=2, guess_mode=True)
    g = torch.Generator().manual_seed(4)
    x2, ctx, pooled, ids = (torch.rand(4, 4, 4, 4, generator=g), torch.rand(4, 7, 6, generator=g),
                            torch.rand(4, 5, generator=g), torch.rand(4, 6, generator=g))
    t2 = torch.full((4,), 10.0)
    views = [Dilated(0, 1, 2, 0, 0), Dilated(1, 1, 2, 0, 0)]
    down, mid = control(x2, t2, ctx, pooled, ids, views, step=0, scale=2)  # phase 2: the official crashes here
    call = net.calls[-1]
    for k, v in dict(x=x2, ctx=ctx, pooled=pooled, ids=ids).items():
        assert torch.equal(call[k], v[1::2])
    assert call["guess_mode"] is True and call["condition"].shape[0] == 2  # one condition per view, not per row
    assert all(r[0::2].abs().max() == 0 and r[1::2].abs().min() > 0 for r in [*down, mid])


def test_without_guidance_every_row_is_a_text_row():
    """CFG off (views.halves 1): the call holds one text-conditioned row per view; guess mode runs on all of them,
    with its scales (diffusers' pipelines without do_classifier_free_guidance); strength counts the scale's own
    steps when it runs fewer (strength < 1)."""
    net = Recorder([3, 5])
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    control = cn.Control([cn.Unit(net, image, end=0.5)], [(4, 4), (8, 8)], steps=10, guess_mode=True)
    x, ctx, pooled, ids = torch.rand(2, 4, 4, 4), torch.rand(2, 7, 6), torch.rand(2, 5), torch.rand(2, 6)
    views = [Dilated(0, 1, 2, 0, 0), Dilated(1, 1, 2, 0, 0)]
    down, mid = control(x, torch.full((2,), 10.0), ctx, pooled, ids, views, step=0, scale=2, halves=1)
    call = net.calls[-1]
    assert call["x"] is x and call["guess_mode"] is True and call["condition"].shape[0] == 2
    assert all(r.abs().min() > 0 for r in [*down, mid])  # no zero rows
    # step 2 of a scale of 4 steps is past end = 0.5; of the run's 10 it would not be
    assert control(x, torch.full((2,), 10.0), ctx, pooled, ids, views, step=2, steps=4, scale=2, halves=1) is None


def test_several_controlnets_add_up():
    image_a, image_b = torch.rand(2, 1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    a, b = Recorder([3, 5]), Recorder([3, 5])
    sizes = [(4, 4)]
    args = (torch.rand(2, 4, 4, 4), torch.full((2,), 10.0), torch.rand(2, 7, 6), torch.rand(2, 5), torch.rand(2, 6),
            [Whole()])
    both = cn.Control([cn.Unit(a, image_a, 0.3), cn.Unit(b, image_b, 0.8, 0.5, 1.0)], sizes, steps=2)
    alone_a, alone_b = (cn.Control([u], sizes, steps=2) for u in both.units)
    for step in (0, 1):
        down, mid = both(*args, step=step, scale=1)
        ra, rb = alone_a(*args, step=step, scale=1), alone_b(*args, step=step, scale=1)
        expected = ra if rb is None else ([x + y for x, y in zip(ra[0], rb[0])], ra[1] + rb[1])
        assert all(torch.equal(x, y) for x, y in zip([*down, mid], [*expected[0], expected[1]]))
    assert [c["scale"] for c in b.calls] == [0.8, 0.8]  # step 0 skipped (start 0.5) by `both` and alone


def test_make_control_refuses_bad_requests(cn_pair):
    net, _ = cn_pair
    image = torch.rand(1, 3, 64, 64)
    ok = dict(height=512, width=512, base_px=256, steps=4)
    for kwargs, message in [(dict(nets=[]), "needs a ControlNet"),
                            (dict(images=[image, image]), "2 control image"),
                            (dict(scales=[1.0, 2.0]), "2 values of controlnet_conditioning_scale"),
                            (dict(scales=float("nan")), "controlnet_conditioning_scale nan"),
                            (dict(starts=0.5, ends=0.5), "0 <= start < end <= 1"),
                            (dict(ends=1.5), "0 <= start < end <= 1"),
                            (dict(guess_mode="yes"), "guess_mode 'yes'")]:
        args = dict(nets=[net], images=image) | kwargs
        with pytest.raises(ValueError, match=message):
            cn.make_control(args.pop("nets"), args.pop("images"), **args, **ok)
    control = cn.make_control([net], image, **ok)
    assert control.units[0].image.shape == (1, 3, 256, 256) and control.sizes == [(32, 32), (64, 64)]


def test_canny_as_the_official_demo():
    cv2 = pytest.importorskip("cv2")
    picture = np.zeros((96, 128, 3), dtype=np.uint8)
    picture[32:64, 40:88] = (250, 30, 200)
    edges = cn.canny(Image.fromarray(picture))
    e = np.array(edges)
    assert e.shape == (96, 128, 3) and (e[..., 0] == e[..., 1]).all() and (e[..., 0] == e[..., 2]).all()
    assert set(np.unique(e)) == {0, 255}
    # the edges ring the rectangle: every edge pixel within a pixel of its border, none inside or far outside
    ys, xs = np.nonzero(e[..., 0])
    on_border = (np.minimum(abs(ys - 32), abs(ys - 63)) <= 1) | (np.minimum(abs(xs - 40), abs(xs - 87)) <= 1)
    assert len(ys) > 100 and on_border.all()
    resized = cn.canny(Image.fromarray(picture), size=(48, 64))
    small = np.array(Image.fromarray(picture).resize((64, 48), Image.Resampling.BICUBIC))
    assert np.array_equal(np.array(resized)[..., 0], cv2.Canny(small, 100, 200))


def test_canny_without_opencv_says_what_to_install(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(ImportError, match=r"minifusion\[canny\]"):
        cn.canny(Image.new("RGB", (8, 8)))


# ---- whole runs ----

# a smaller UNet than minifusion.tiny's, so whole runs against diffusers take seconds: a 128 px base (16 latents)
SMALL = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(0, 1),
                   transformer_depth_middle=1, head_dim=32, context_dim=32, adm_in_channels=16 + 6 * 4,
                   addition_time_embed_dim=4, sample_size=16)
SMALL_CN = ControlNetConfig(SMALL, (False, True), hint_channels=(4, 8, 8, 16))


class OfficialRunner:
    """The official pipeline's per-view feeding, written out from pipeline_demofusion_sdxl_controlnet.py with
    diffusers' ControlNetModel(s) and UNet2DConditionModel: the views the sampler hands over are batched as
    views.ViewRunner batches them, but each call's condition crop, time ids, scale and residual sum are computed
    the official way, from a condition chained at the official pixel sizes."""

    def __init__(self, unet, cond, *, size, guidance_scale, batch, guidance_rescale=0.0, on_out_of_memory=None, nets,
                 images, scales, starts, ends, steps, base):
        self.unet, self.cond, self.size, self.gs, self.batch = unet, cond, size, guidance_scale, batch
        self.nets, self.scales, self.starts, self.ends, self.steps = nets, scales, starts, ends, steps
        height, width = size
        scale_num = int(max(height / base, width / base))
        self.aspect = min(height / base, width / base) / max(height / base, width / base)
        self.base, self.tall = base, height > width
        processor = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
        self.conditions = {1: [processor.preprocess(im, height=height // scale_num, width=width // scale_num)
                               for im in images]}
        self.evals = self.calls = 0
        self.hints = []

    def condition(self, s):
        if s not in self.conditions:
            prev = self.condition(s - 1)
            current_height = current_width = self.base * s
            if self.tall:
                current_width = int(current_width * self.aspect)
            else:
                current_height = int(current_height * self.aspect)
            self.conditions[s] = [F.interpolate(c, size=(current_height, current_width), mode="bicubic")
                                  for c in prev]
        return self.conditions[s]

    def __call__(self, groups, t, step, scale, scale_steps=None):  # every scale runs `steps` (strength 1)
        out = []
        for x, views in groups:
            eps = []
            for k in range(0, len(x), self.batch):
                eps.append(self.call(x[k:k + self.batch], views[k:k + self.batch], t, step, scale))
            out.append(torch.cat(eps))
        return out

    def call(self, x, views, t, step, scale):
        n, (H, W) = len(x), self.size
        latent_model_input = x.repeat_interleave(2, dim=0)
        prompt_embeds = torch.cat([self.cond.context] * n)
        add_text_embeds = torch.cat([self.cond.pooled] * n)
        time_ids = []
        for v in views:
            ids = torch.tensor([[H, W, 0, 0, H, W]], dtype=torch.float32)
            if isinstance(v, Window):
                ids[:, 2], ids[:, 3] = v.top * 8, v.left * 8
            time_ids.append(ids.repeat(2, 1))
        added = {"text_embeds": add_text_embeds, "time_ids": torch.cat(time_ids)}
        down = mid = None
        for net, condition, s, a, b in zip(self.nets, self.condition(scale), self.scales, self.starts, self.ends):
            if isinstance(views[0], Whole):
                image = torch.cat([condition] * 2)
            elif isinstance(views[0], Window):
                image = torch.cat([official_pad_crop(condition, v) for v in views]).repeat_interleave(2, dim=0)
            else:
                image = torch.cat([official_dilated(condition, v) for v in views]).repeat_interleave(2, dim=0)
            self.hints.append(image)
            keep = 1.0 - float(step / self.steps < a or (step + 1) / self.steps > b)
            d, m = net(latent_model_input, t, encoder_hidden_states=prompt_embeds, controlnet_cond=image,
                       conditioning_scale=s * keep, added_cond_kwargs=added, return_dict=False)
            down = d if down is None else [p + q for p, q in zip(down, d)]  # MultiControlNetModel's sum
            mid = m if mid is None else mid + m
        noise_pred = self.unet(latent_model_input, t, encoder_hidden_states=prompt_embeds, added_cond_kwargs=added,
                               down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        self.evals, self.calls = self.evals + 2 * n, self.calls + 1
        uncond, text = noise_pred[::2], noise_pred[1::2]
        return uncond + self.gs * (text - uncond)


class Recording(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.hints = net, []
        self.control, self.time_embed = net.control, net.time_embed

    def forward(self, *args, **kwargs):
        self.hints.append(args[5].repeat_interleave(len(args[0]) // len(args[5]), dim=0))  # as each row sees it
        return self.net(*args, **kwargs)


@pytest.fixture(scope="module")
def small_models():
    g = torch.Generator().manual_seed(11)
    unet = randomize(UNet(SMALL), g).eval()
    nets = [randomize(ControlNet(SMALL_CN), g).eval() for _ in range(2)]
    their_unet = UNet2DConditionModel(**diffusers_kwargs(SMALL.to_diffusers_config())).eval()
    their_unet.load_state_dict(to_source(unet.state_dict(), unet_module.diffusers_keys(SMALL)))
    their_nets = []
    for net in nets:
        theirs = ControlNetModel(**diffusers_kwargs(SMALL_CN.to_diffusers_config())).eval()
        theirs.load_state_dict(to_source(net.state_dict(), diffusers_keys(SMALL_CN)))
        their_nets.append(theirs)
    gc = torch.Generator().manual_seed(12)
    cond = Cond(torch.randn(2, 77, 32, generator=gc), torch.randn(2, 16, generator=gc))
    return unet, nets, their_unet, their_nets, cond


@pytest.mark.parametrize("height, width, steps", [(136, 256, 3), (384, 192, 3)])
def test_whole_run_against_the_official_feeding(small_models, height, width, steps):
    """Two ControlNets (the second only in the middle third of each scale), jittered windows, a zero-padded
    dilated frame (136 x 256: scale 2 has 17 latent rows) and two chained upsamplings (384 x 192: S = 3)."""
    unet, nets, their_unet, their_nets, cond = small_models
    rng = np.random.default_rng(height)
    images = [Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)) for _ in nets]
    scales, starts, ends = [0.8, 1.3], [0.0, 0.3], [1.0, 0.7]
    kw = dict(height=height, width=width, base_px=128, window=16, stride=8, steps=steps, guidance_scale=6.0,
              view_batch_size=4, sampler="ddim")
    recording = [Recording(net) for net in nets]
    control = cn.make_control(recording, images, scales, starts, ends, height=height, width=width, base_px=128,
                              steps=steps)
    ours = list(demofusion(unet, cond, generator=torch.Generator().manual_seed(1), **kw,
                           runner=functools.partial(ViewRunner, control=control)))
    official = functools.partial(OfficialRunner, nets=their_nets, images=images, scales=scales, starts=starts,
                                 ends=ends, steps=steps, base=128)
    runners = []

    def make(*args, **kwargs):
        runners.append(official(*args, **kwargs))
        return runners[-1]

    ref = list(demofusion(their_unet, cond, generator=torch.Generator().manual_seed(1), **kw, runner=make))
    # the same condition crops, bit for bit: the first ControlNet's in every call; the second's in the calls
    # where it acts (the official runs it at weight 0 in the others, which we skip)
    official = runners[0].hints
    assert len(recording[0].hints) == len(official) // 2
    assert all(torch.equal(a, b) for a, b in zip(recording[0].hints, official[0::2]))
    second = iter(official[1::2])
    assert 0 < len(recording[1].hints) < len(recording[0].hints)
    assert all(any(torch.equal(h, o) for o in second) for h in recording[1].hints)
    errs = [rel_err(a.latents, b.latents) for a, b in zip(ours, ref)]
    print(f"{height}x{width}: per-scale max relative error of the latents {['%.1e' % e for e in errs]}")
    assert len(ours) == len(ref) == len(scale_sizes(height, width, 128)) and max(errs) <= 1e-4


@pytest.fixture(scope="module")
def zero_conv_file(tmp_path_factory):
    """A tiny ControlNet for minifusion.tiny's model in the diffusers folder layout, its zero convs zero (as a
    ControlNet starts training) and everything else random."""
    import json
    from safetensors.torch import save_file
    from minifusion.tiny import TINY
    cfg = ControlNetConfig(TINY.unet, (False, True, True), hint_channels=(4, 8, 8, 16))
    net = randomize(ControlNet(cfg), torch.Generator().manual_seed(6))
    with torch.no_grad():
        for conv in [*net.zero_convs, net.middle_block_out]:
            conv[0].weight.zero_(), conv[0].bias.zero_()
    folder = tmp_path_factory.mktemp("controlnet") / "zero"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg.to_diffusers_config()))
    save_file(to_source(net.state_dict(), diffusers_keys(cfg)), str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


def test_zero_convs_give_exactly_the_uncontrolled_run(tiny_file, zero_conv_file):
    from minifusion import load
    pipe = load(tiny_file, device="cpu", dtype=torch.float32, controlnet=[zero_conv_file, zero_conv_file])
    calls = []
    pipe.controlnets[0].register_forward_hook(lambda *_: calls.append(1))
    # a picture of the run's aspect, so image-to-image keeps its 136 x 512 size
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 256, (34, 128, 3), dtype=np.uint8))
    kw = dict(height=136, width=512, num_inference_steps=2, seed=3)
    plain = pipe.generate("a fox", **kw)
    controlled = pipe.generate("a fox", control_image=[picture, picture], controlnet_conditioning_scale=[1.0, 0.4],
                               control_guidance_end=[1.0, 0.5], **kw)
    guessed = pipe.generate("a fox", control_image=[picture, picture], guess_mode=True, **kw)
    assert len(calls) > 0  # the ControlNet did run
    for run in (controlled, guessed):
        assert all(torch.equal(a, b) for a, b in zip(run.latents, plain.latents))
    # image-to-image with control: the same, from the picture
    calls.clear()
    img2img = [pipe.generate("a fox", image=picture, num_inference_steps=2, seed=3, **extra)
               for extra in ({}, {"control_image": [picture, picture]})]
    assert len(calls) > 0 and len(img2img[0].latents) == 2
    assert all(torch.equal(a, b) for a, b in zip(*(r.latents for r in img2img)))
