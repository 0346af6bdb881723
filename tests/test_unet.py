"""SDXL UNet: numeric parity with diffusers on a tiny SDXL-shaped model, and the full-size structure against
the real checkpoint's key list and diffusers' SDXL UNet (both on the meta device)."""
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from minifusion.config import SDXL_UNET, UNetConfig
from minifusion.keyops import convert_state_dict
from minifusion.models.unet import UNet, diffusers_keys
from minifusion.tiny import randomize
from helpers import SDXL_BASE

ROOT = Path(__file__).resolve().parents[1]
KEYS_FILE = next((p for p in (ROOT.parent / "shared" / "sdxl" / "sd_xl_base_1.0.keys.txt",
                              ROOT / "shared" / "sdxl" / "sd_xl_base_1.0.keys.txt") if p.exists()), None)


POOLED, CTX = 40, 64
TINY = dict(  # SDXL's structure at toy width: 64-wide heads, deeper transformers on levels 2-3
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=[32, 64, 128],
    attention_head_dim=[1, 1, 2],  # diffusers means heads here: 64/64, 128/64 (level 1 has no attention)
    transformer_layers_per_block=[1, 2, 2],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    cross_attention_dim=CTX, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=8, projection_class_embeddings_input_dim=POOLED + 6 * 8,
    flip_sin_to_cos=True, freq_shift=0, norm_num_groups=32, norm_eps=1e-5,
)


@pytest.fixture(scope="module")
def pair():
    theirs = UNet2DConditionModel(**TINY).eval()
    randomize(theirs, torch.Generator().manual_seed(0))  # diffusers zero-inits layers that would hide bugs
    cfg = UNetConfig.from_diffusers_config(dict(theirs.config))
    ours = UNet(cfg).eval()
    ours.load_state_dict(convert_state_dict(theirs.state_dict(), diffusers_keys(cfg)), strict=True)
    return ours, theirs


def test_config_from_diffusers(pair):
    ours, _ = pair
    assert ours.cfg == UNetConfig(model_channels=32, transformer_depth=(0, 2, 2), transformer_depth_middle=2,
                                  context_dim=CTX, adm_in_channels=POOLED + 48, addition_time_embed_dim=8,
                                  sample_size=32)


def test_norm_eps_match_diffusers(pair):
    """eps 1e-5 vs 1e-6 moves unit-variance activations by ~1e-5 only, below the parity tolerance, so compare
    each norm with the diffusers module its weight comes from (ResBlocks/out 1e-5, SpatialTransformer 1e-6)."""
    ours, theirs = pair
    table, their_modules = diffusers_keys(ours.cfg), dict(theirs.named_modules())
    norms = [(n, m) for n, m in ours.named_modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))]
    assert len(norms) == 17 * 2 + 11 + 22 * 3 + 1  # ResBlocks, SpatialTransformers, transformer blocks, out
    for name, m in norms:
        ref = their_modules[table[f"{name}.weight"][0].removesuffix(".weight")]
        assert (type(ref), ref.eps) == (type(m), m.eps), name


@pytest.mark.parametrize("hw", [(24, 40), (21, 32), (13, 18), (32, 32)])
def test_parity_with_diffusers(pair, hw):
    ours, theirs = pair
    g = torch.Generator().manual_seed(hw[0] * 100 + hw[1])
    b = 2
    x = torch.randn(b, 4, *hw, generator=g)
    t = torch.tensor([999.0, 17.0])
    ctx = torch.randn(b, 77, CTX, generator=g)
    pooled = torch.randn(b, POOLED, generator=g)
    ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768, 1344, 128, 64, 1024, 1024]])
    with torch.no_grad():
        ref = theirs(x, t, encoder_hidden_states=ctx,
                     added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        out = ours(x, t, ctx, pooled, ids)
    assert out.shape == ref.shape == x.shape
    err, scale = (out - ref).abs().max().item(), ref.abs().max().item()
    print(f"{hw}: max abs err {err:.2e}, output abs max {scale:.2f}")
    assert err <= 1e-5 * max(1.0, scale)
    # the two batch elements differ in every input, so a batch mix-up cannot hide behind one comparison
    assert (ref[0] - ref[1]).abs().max() > 100 * err + 1e-3


def test_scalar_timestep(pair):
    ours, theirs = pair
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 16, 24, generator=g), torch.randn(2, 77, CTX, generator=g)
    pooled, ids = torch.randn(2, POOLED, generator=g), torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2)
    with torch.no_grad():
        ref = theirs(x, 500, encoder_hidden_states=ctx,
                     added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        for t in (500, torch.tensor(500), torch.tensor([500, 500])):
            out = ours(x, t, ctx, pooled, ids)
            assert (out - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())


def test_bf16(pair):
    """Runs in bf16 close to fp32, returns the latents' dtype, and still tells t=999 from t=998 (in bf16 both
    round to 1000: the timestep embedding must be computed in fp32)."""
    ours, _ = pair
    half = UNet(ours.cfg).to(torch.bfloat16)
    half.load_state_dict(ours.state_dict())
    g = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, CTX, generator=g)
    pooled, ids = torch.randn(1, POOLED, generator=g), torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]])
    with torch.no_grad():
        ref = ours(x, 999, ctx, pooled, ids)
        out, out_998 = (half(x, t, ctx, pooled, ids) for t in (999, 998))
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()
    assert not torch.equal(out, out_998)


def _checkpoint_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in KEYS_FILE.read_text().splitlines():
        key, shape = line.split(" ", 1)
        if key.startswith("model.diffusion_model."):
            dims = tuple(int(s) for s in shape.strip("[]").split(",") if s)
            shapes[key.removeprefix("model.diffusion_model.")] = dims
    return shapes


@pytest.mark.skipif(KEYS_FILE is None, reason="shared/sdxl/sd_xl_base_1.0.keys.txt not found next to the repo")
def test_full_size_matches_sdxl_checkpoint():
    with torch.device("meta"):
        model = UNet(SDXL_UNET)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ref = _checkpoint_shapes()
    assert len(ref) == 1680
    assert ours.keys() == ref.keys(), (sorted(ours.keys() - ref.keys())[:5], sorted(ref.keys() - ours.keys())[:5])
    assert {k for k in ours if ours[k] != ref[k]} == set()
    assert sum(p.numel() for p in model.parameters()) == 2_567_463_684


def test_full_size_diffusers_key_table():
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**SDXL_BASE)
        ours = UNet(SDXL_UNET)
    assert UNetConfig.from_diffusers_config(dict(theirs.config)) == SDXL_UNET
    their_shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    table = diffusers_keys(SDXL_UNET)
    assert table.keys() == ours.state_dict().keys()
    assert sorted(src for src, _ in table.values()) == sorted(their_shapes)
    assert all(op == "" for _, op in table.values())
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert {k: their_shapes[src] for k, (src, _) in table.items()} == our_shapes
