"""SDXL VAE: numeric parity with diffusers' AutoencoderKL on a tiny model whose levels all differ in width (so a
reversed decoder order cannot hide), and the full-size structure against the real checkpoint's key list and
diffusers' SDXL VAE (both on the meta device)."""
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from torch.nn.attention import SDPBackend, sdpa_kernel

from minifusion.config import SDXL_VAE, VAEConfig
from minifusion.keyops import apply_op, convert_state_dict
from minifusion.models.vae import VAE, diffusers_keys
from minifusion.tiny import randomize

ROOT = Path(__file__).resolve().parents[1]
KEYS_FILE = next((p for p in (ROOT.parent / "shared" / "sdxl" / "sd_xl_base_1.0.keys.txt",
                              ROOT / "shared" / "sdxl" / "sd_xl_base_1.0.keys.txt") if p.exists()), None)

SDXL = dict(  # stabilityai/stable-diffusion-xl-base-1.0 vae/config.json
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    layers_per_block=2, norm_num_groups=32, act_fn="silu", sample_size=1024, scaling_factor=0.13025,
)
TINY = dict(SDXL, block_out_channels=[32, 64, 96], down_block_types=["DownEncoderBlock2D"] * 3,
            up_block_types=["UpDecoderBlock2D"] * 3, norm_num_groups=8, sample_size=64)


@pytest.fixture(scope="module")
def pair():
    theirs = AutoencoderKL(**TINY).eval()
    randomize(theirs, torch.Generator().manual_seed(0))  # diffusers zero-inits layers that would hide bugs
    cfg = VAEConfig.from_diffusers_config(dict(theirs.config))
    ours = VAE(cfg).eval()
    ours.load_state_dict(convert_state_dict(theirs.state_dict(), diffusers_keys(cfg)), strict=True)
    return theirs, ours


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5):
    scale = b.abs().max().item()
    err = (a - b).abs().max().item()
    assert scale > 0.1, "degenerate reference output"
    assert err <= rel * scale, f"max abs err {err:.3g} > {rel:g} x output scale {scale:.3g}"


@torch.no_grad()
def test_encode_matches_diffusers(pair):
    theirs, ours = pair
    x = torch.rand(2, 3, 52, 36, generator=torch.Generator().manual_seed(1)) * 2 - 1
    dist = theirs.encode(x).latent_dist
    mean, logvar = ours.encode(x)
    assert mean.shape == (2, 4, 13, 9)
    close(mean, dist.mean)
    close(logvar, dist.logvar)


@torch.no_grad()
def test_decode_matches_diffusers(pair):
    theirs, ours = pair
    z = torch.randn(2, 4, 13, 9, generator=torch.Generator().manual_seed(2))
    ref = theirs.decode(z).sample
    out = ours.decode(z)
    assert out.shape == ref.shape == (2, 3, 52, 36)
    close(out, ref)


@torch.no_grad()
def test_mid_attention_uses_a_fused_kernel(pair):
    """At 4096^2 the latent map has 262,144 pixels: attention that materialised the scores could not run."""
    _, ours = pair
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if the inputs do not qualify for it
        ours.decoder.mid.attn_1(torch.randn(1, 96, 7, 5))


def test_sdxl_config_from_diffusers():
    assert VAEConfig.from_diffusers_config(SDXL) == SDXL_VAE


def test_full_size_matches_checkpoint_keys():
    if KEYS_FILE is None:
        pytest.skip("shared/sdxl/sd_xl_base_1.0.keys.txt not found next to the repository")
    prefix = "first_stage_model."
    want = {}
    for line in KEYS_FILE.read_text().splitlines():
        key, shape = line.split(" ", 1)
        if key.startswith(prefix):
            want[key[len(prefix):]] = tuple(int(n) for n in shape.strip("[]").split(",") if n)
    with torch.device("meta"):
        model = VAE(SDXL_VAE)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == want
    assert sum(p.numel() for p in model.parameters()) == 83_653_863


def test_full_size_diffusers_table():
    with torch.device("meta"):
        theirs = AutoencoderKL(**SDXL).state_dict()
        ours = VAE(SDXL_VAE).state_dict()
    table = diffusers_keys(SDXL_VAE)
    assert table.keys() == ours.keys()
    assert sorted(src for src, _ in table.values()) == sorted(theirs.keys())
    for k, (src, op) in table.items():
        assert apply_op(theirs[src], op).shape == ours[k].shape, k
