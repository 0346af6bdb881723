"""Image input: the tiled encode equals the untiled one (whole-map GroupNorm and attention, stride-2 tiles)
at one untiled encode's FLOPs and tile-bounded memory; encoder and sampling parity with diffusers; pictures of
every mode converted as documented; each unusable input refused with a one-line error naming it."""
import copy

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from minifusion.config import SDXL_VAE, VAEConfig
from minifusion.demofusion import scale_sizes
from minifusion.encode import ImageError, base_scale_size, encode_flops, encode_tiled, load_image, sample_latents
from minifusion.keyops import convert_state_dict
from minifusion.models.vae import VAE, diffusers_keys
from minifusion.tiny import randomize
from test_decode import WorkingSet

CFG = VAEConfig(ch=8, ch_mult=(1, 2, 3, 4), num_res_blocks=1, norm_groups=4)  # four levels, all widths differ


@pytest.fixture(scope="module")
def pair():
    """A diffusers AutoencoderKL with random weights and our VAE holding the same weights."""
    theirs = AutoencoderKL(**CFG.to_diffusers_config()).eval()
    randomize(theirs, torch.Generator().manual_seed(0))
    ours = VAE(CFG).eval()
    ours.load_state_dict(convert_state_dict(theirs.state_dict(), diffusers_keys(CFG)), strict=True)
    return theirs, ours


@pytest.fixture(scope="module")
def vae(pair):
    return pair[1]


def images(*shape, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference relative to the reference's scale (its max abs value)."""
    scale = b.abs().max().item()
    assert scale > 0.1, "degenerate reference output"
    return (a.float() - b.float()).abs().max().item() / scale


@pytest.mark.parametrize("shape,tile", [
    ((2, 3, 40, 24), 16),   # batch 2, non-square, no map a multiple of the tile
    ((1, 3, 24, 56), 20),   # wide
    ((1, 3, 48, 16), 7),    # tall, small odd tile: stride-2 tiles of 3 outputs read 7 rows
    ((1, 3, 8, 16), 5),     # one latent row
    ((1, 3, 37, 29), 9),    # not even a multiple of 8: every Downsample floors an odd size
    ((1, 3, 32, 40), 512),  # tile larger than the image: one tile per stage
])
@torch.no_grad()
def test_tiled_equals_untiled(vae, shape, tile):
    x = images(*shape)
    ref_mean, ref_logvar = vae.encode(x)
    mean, logvar = encode_tiled(vae, x, tile=tile)
    assert mean.shape == logvar.shape == ref_mean.shape == (shape[0], 4, shape[2] // 8, shape[3] // 8)
    # measured ~2e-6 in fp32; 1e-3 of the output scale is the promise
    assert rel_err(mean, ref_mean) <= 1e-3
    assert rel_err(logvar, ref_logvar) <= 1e-3


@torch.no_grad()
def test_bfloat16(vae):
    x = images(1, 3, 32, 24, seed=1)
    ref_mean, _ = vae.encode(x)
    half = copy.deepcopy(vae).to(torch.bfloat16)  # a copy: rounding the shared weights would break parity
    untiled, _ = half.encode(x.bfloat16())
    tiled, _ = encode_tiled(half, x, tile=10)
    assert tiled.dtype == torch.bfloat16
    noise = rel_err(untiled, ref_mean)  # the rounding noise bf16 has without tiling
    assert rel_err(tiled, untiled) <= max(2 * noise, 1e-3)
    assert rel_err(tiled, ref_mean) <= max(3 * noise, 1e-3)


@torch.no_grad()
def test_flops_within_bound(vae):
    x = images(1, 3, 40, 32)
    counts = []
    with sdpa_kernel(SDPBackend.MATH):  # attention as matmuls, which the counter sees on every device
        for run in (lambda: vae.encode(x), lambda: encode_tiled(vae, x, tile=16)):
            with FlopCounterMode(display=False) as counter:
                run()
            counts.append(counter.get_total_flops())
    untiled, tiled = counts
    assert untiled <= tiled <= 1.5 * untiled
    assert encode_flops(CFG, x.shape) == untiled
    assert encode_flops(CFG, x.shape, tile=16) == tiled
    # the real SDXL VAE at its base size, counted on the meta device
    assert encode_flops(SDXL_VAE, (1, 3, 512, 384), tile=128) <= 1.5 * encode_flops(SDXL_VAE, (1, 3, 512, 384))


@torch.no_grad()
def test_memory_bounded_by_tile(vae):
    B, H, W, tile = 1, 160, 96, 16
    x = images(B, 3, H, W)
    with WorkingSet() as untiled:
        vae.encode(x)
    with WorkingSet() as tiled:
        encode_tiled(vae, x, tile=tile)
    crop = B * max(CFG.channels) * (tile + 2) ** 2 * 4  # fp32 input of a tile with halo at the widest stage
    kv = B * CFG.channels[-1] * (H // 8) * (W // 8) * 4  # keys (or values) of the whole latent map
    assert tiled.largest <= max(crop, kv)
    assert tiled.peak <= 12 * crop + 3 * kv
    assert untiled.peak >= 10 * tiled.peak  # the measure tells the two apart


def test_progress_callback(vae):
    calls = []
    encode_tiled(vae, images(1, 3, 16, 24), tile=8, progress=lambda done, total: calls.append((done, total)))
    total = calls[0][1]
    assert [d for d, _ in calls] == list(range(1, total + 1))
    assert all(t == total for _, t in calls)


@torch.no_grad()
def test_encoder_and_sampling_match_diffusers(pair):
    theirs, ours = pair
    x = images(2, 3, 40, 24, seed=2)
    dist = theirs.encode(x).latent_dist
    mean, logvar = encode_tiled(ours, x, tile=16)
    assert rel_err(mean, dist.mode()) <= 1e-5
    assert rel_err(logvar, dist.logvar) <= 1e-5
    sample = sample_latents(mean, logvar, torch.Generator().manual_seed(7))
    assert rel_err(sample, dist.sample(torch.Generator().manual_seed(7))) <= 1e-5
    # the same numbers as diffusers draws, dtype included: eps drawn in the latents' dtype
    for dtype in (torch.float32, torch.bfloat16):
        d = DiagonalGaussianDistribution(dist.parameters.to(dtype))
        assert torch.equal(sample_latents(d.mean, d.logvar, torch.Generator().manual_seed(3)),
                           d.sample(torch.Generator().manual_seed(3)))
    torch.manual_seed(5)
    a = sample_latents(dist.mean, dist.logvar)
    torch.manual_seed(5)
    assert torch.equal(a, dist.sample())  # no generator: the global RNG on the latents' device, as diffusers


def pixels(x: torch.Tensor) -> np.ndarray:
    """load_image's output back to 0..255 (H, W, 3)."""
    assert x.dtype == torch.float32 and x.shape[:2] == (1, 3) and -1 <= x.min() and x.max() <= 1
    return ((x[0].permute(1, 2, 0) + 1) * 127.5).numpy()


def palette_image(transparent: bool) -> Image.Image:
    img = Image.new("P", (2, 1))
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    img.putdata([0, 1])
    if transparent:
        img.info["transparency"] = 1
    return img


# mode, a 2x1 picture in it, the RGB a viewer shows (worked out by hand), file format
MODES = [
    ("RGB", Image.frombytes("RGB", (2, 1), bytes([10, 20, 30, 200, 100, 50])), [(10, 20, 30), (200, 100, 50)], "PNG"),
    ("L", Image.frombytes("L", (2, 1), bytes([0, 77])), [(0, 0, 0), (77, 77, 77)], "PNG"),
    ("1", Image.frombytes("L", (2, 1), bytes([0, 255])).convert("1"), [(0, 0, 0), (255, 255, 255)], "PNG"),
    ("RGBA", Image.frombytes("RGBA", (2, 1), bytes([10, 20, 30, 255, 0, 0, 0, 0])), [(10, 20, 30), (255, 255, 255)],
     "PNG"),
    ("RGBA half", Image.frombytes("RGBA", (2, 1), bytes([0, 0, 0, 102, 255, 0, 0, 51])),
     [(153, 153, 153), (255, 204, 204)], "PNG"),
    ("LA", Image.frombytes("LA", (2, 1), bytes([40, 255, 0, 0])), [(40, 40, 40), (255, 255, 255)], "PNG"),
    ("P", palette_image(False), [(10, 20, 30), (200, 100, 50)], "PNG"),
    ("P transparent", palette_image(True), [(10, 20, 30), (255, 255, 255)], "PNG"),
    ("CMYK", Image.frombytes("CMYK", (2, 1), bytes([255, 0, 0, 0, 0, 0, 0, 255])), [(0, 255, 255), (0, 0, 0)], "TIFF"),
    ("I;16", Image.fromarray(np.array([[25700, 65535]], dtype=np.uint16)), [(100, 100, 100), (255, 255, 255)], "PNG"),
    ("I", Image.fromarray(np.array([[0, 32896]], dtype=np.int32)), [(0, 0, 0), (128, 128, 128)], "TIFF"),
    ("F", Image.fromarray(np.array([[0.5, 1.0]], dtype=np.float32)), [(128, 128, 128), (255, 255, 255)], "TIFF"),
]


@pytest.mark.parametrize("mode,img,want,fmt", MODES, ids=[m[0] for m in MODES])
def test_modes_convert_to_rgb(tmp_path, mode, img, want, fmt):
    path = tmp_path / f"in.{fmt.lower()}"
    img.save(path, fmt, **({"transparency": 1} if mode == "P transparent" else {}))
    assert Image.open(path).mode == img.mode, "the file keeps the mode under test"
    for source in (path, str(path), img):
        got = pixels(load_image(source, 1, 2))  # its own size: no resampling, exact values
        assert np.abs(got - np.array([want], dtype=np.float32)).max() <= 1.0, (source, got)


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (4, 2), (0, 0, 0))
    img.putpixel((0, 0), (255, 0, 0))  # stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    img.save(tmp_path / "rotated.png", exif=exif)
    got = pixels(load_image(tmp_path / "rotated.png", 4, 2))  # upright it is 2 wide, 4 tall
    assert got.shape == (4, 2, 3)
    assert tuple(got[0, 1]) == (255, 0, 0)  # clockwise turns the top-left corner into the top-right
    assert got.sum() == 255


def test_resize_is_exact_size_and_antialiased():
    checker = Image.fromarray((np.indices((64, 48)).sum(0) % 2 * 255).astype(np.uint8))  # 1-px black/white
    got = pixels(load_image(checker, 16, 12))
    assert got.shape == (16, 12, 3)
    # a filter that averages gives the mean grey; point sampling would give black or white
    assert np.abs(got - 127.5).max() < 8
    flat = pixels(load_image(Image.new("RGB", (30, 20), (40, 90, 200)), 24, 40))  # upscale, other aspect
    assert flat.shape == (24, 40, 3) and np.abs(flat - [40, 90, 200]).max() <= 1


def one_line_error(source, *words):
    with pytest.raises(ImageError) as info:
        load_image(source, 8, 8)
    msg = str(info.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    assert isinstance(info.value, ValueError)
    return msg


def test_bad_inputs_are_refused(tmp_path, monkeypatch):
    (tmp_path / "notes.png").write_text("not a picture")
    one_line_error(tmp_path / "notes.png", "notes.png", "not a readable image")
    (tmp_path / "empty.png").write_bytes(b"")
    one_line_error(tmp_path / "empty.png", "empty.png", "empty (0 bytes)")
    one_line_error(tmp_path / "missing.png", "missing.png", "no such file")
    one_line_error(tmp_path, str(tmp_path), "not a readable image")  # a folder

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])
    one_line_error(tmp_path / "cut.png", "cut.png", "truncated or corrupt")

    one_line_error(Image.new("RGB", (0, 5)), "empty (0x5 pixels)")
    one_line_error(Image.new("La", (2, 2)), "cannot convert image mode La")

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new("RGB", (40, 40)).save(tmp_path / "big.png")  # 1600 px: PIL only warns
    one_line_error(tmp_path / "big.png", "big.png", "too large")
    Image.new("RGB", (100, 100)).save(tmp_path / "bomb.png")  # 10000 px: PIL's DecompressionBombError
    one_line_error(tmp_path / "bomb.png", "bomb.png", "too large")

    with pytest.raises(TypeError):
        load_image(torch.zeros(1, 3, 8, 8), 8, 8)


def test_base_scale_size():
    # default: twice the base on the long side, the short side following the picture's aspect
    assert base_scale_size(1600, 1200, 1024) == ((1536, 2048), (768, 1024))
    assert base_scale_size(900, 1600, 1024) == ((2048, 1152), (1024, 576))
    # a picture larger than that: its own long side rounded up to the base grid, never smaller than it came
    assert base_scale_size(3000, 2000, 1024).final == (2048, 3072)
    assert base_scale_size(2000, 4100, 1024).final == (5120, 2496)
    assert base_scale_size(2048, 2048, 1024).final == (2048, 2048)
    # the spec's example: 512x768 px on a 256 px base runs phase 1 at 170x256 px -> a 21x32 latent
    assert base_scale_size(768, 512, 256, height=512) == ((512, 768), (168, 256))
    assert base_scale_size(768, 512, 256, width=768) == ((512, 768), (168, 256))
    assert base_scale_size(768, 512, 256, height=512, width=776).final == (512, 776)  # within rounding
    with pytest.raises(ValueError, match="aspect"):
        base_scale_size(768, 512, 256, height=512, width=512)


@torch.no_grad()
def test_loaded_picture_encodes_to_phase_one_latents(vae):
    """The pieces together: an odd-sized picture, sized and loaded, encodes to phase 1's latent size."""
    final, base = base_scale_size(333, 500, 128)
    mean, _ = encode_tiled(vae, load_image(Image.new("RGB", (333, 500), (9, 99, 199)), *base), tile=64)
    assert tuple(mean.shape[2:]) == scale_sizes(*final, 128)[0]
