"""Tiled VAE decode: the same image as the untiled decode (whole-map GroupNorm and attention), every pixel
filled, no more work than one untiled decode, and compute tensors bounded by the tile."""
import weakref

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode
from torch.utils._python_dispatch import TorchDispatchMode

from minifusion.config import VAEConfig
from minifusion.decode import decode_flops, decode_tiled
from minifusion.models.vae import VAE
from minifusion.tiny import randomize

CFG = VAEConfig(ch=8, ch_mult=(1, 2, 4, 4), norm_groups=4)  # SDXL's structure at 1/16 width


@pytest.fixture(scope="module")
def vae():
    model = VAE(CFG).eval()
    randomize(model, torch.Generator().manual_seed(0))
    return model


def latents(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape,tile", [
    ((2, 4, 13, 9), 16),    # batch 2, odd non-square latent, full-res map not a multiple of the tile
    ((1, 4, 6, 11), 20),    # wide
    ((1, 4, 11, 5), 7),     # tall, small odd tile: tiles end on odd rows after each upsampling
    ((1, 4, 3, 2), 5),      # tiny latent: tiles of 1-2 px at latent resolution
    ((1, 4, 5, 7), 512),    # tile larger than the image: one tile per stage
])
@torch.no_grad()
def test_tiled_equals_untiled(vae, shape, tile):
    z = latents(*shape)
    ref = vae.decode(z)
    out = decode_tiled(vae, z, tile=tile)
    assert out.shape == ref.shape == (shape[0], 3, 8 * shape[2], 8 * shape[3])
    assert torch.isfinite(out).all()
    assert (out.abs().amax(dim=(0, 1, 3)) > 0).all() and (out.abs().amax(dim=(0, 1, 2)) > 0).all(), "unfilled rows/cols"
    assert ref.std() > 0.1
    err = ((out - ref) / 2).abs().max().item()  # in [0, 1] pixel units
    assert err <= 1e-3, err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_half_precision(vae, dtype):
    z = latents(1, 4, 9, 7, seed=1)
    ref = vae.decode(z)
    half = vae.to(dtype)
    try:
        untiled = half.decode(z.to(dtype)).float()
        tiled = decode_tiled(half, z, tile=12)
    finally:
        vae.float()
    assert tiled.dtype == dtype
    tiled = tiled.float()
    # tiling adds no more than the rounding noise the half-precision decode already has
    noise = ((untiled - ref) / 2).abs().max().item()
    assert ((tiled - untiled) / 2).abs().max().item() <= max(2 * noise, 1e-3)
    assert ((tiled - ref) / 2).abs().max().item() <= max(3 * noise, 1e-3)


@torch.no_grad()
def test_flops_within_bound(vae):
    z = latents(1, 4, 12, 10)
    counts = []
    with sdpa_kernel(SDPBackend.MATH):  # attention as matmuls, which the counter sees on every device
        for run in (lambda: vae.decode(z), lambda: decode_tiled(vae, z, tile=24)):
            with FlopCounterMode(display=False) as counter:
                run()
            counts.append(counter.get_total_flops())
    untiled, tiled = counts
    assert tiled <= 1.5 * untiled
    assert tiled >= untiled  # every output pixel is still computed
    assert decode_flops(CFG, z.shape) == untiled
    assert decode_flops(CFG, z.shape, tile=24) == tiled


class WorkingSet(TorchDispatchMode):
    """Peak bytes of live tensors that ops allocate inside the block, and the largest one. Leaves out `empty`,
    which is how decode_tiled allocates its whole-map buffers on the storage device (on a CPU-only test the
    compute device too); views and in-place results share an input's memory and allocate none."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.largest = 0

    def _free(self, nbytes: int):
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is not torch.ops.aten.empty.memory_format:
            real = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.device.type != "meta"]
            inputs = {t.untyped_storage().data_ptr() for t in real}
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    s = t.untyped_storage()
                    if s.data_ptr() not in inputs:
                        self.live += s.nbytes()
                        self.largest = max(self.largest, s.nbytes())
                        weakref.finalize(s, self._free, s.nbytes())
            self.peak = max(self.peak, self.live)
        return out


@torch.no_grad()
def test_memory_bounded_by_tile(vae):
    B, h, w, tile = 1, 32, 24, 24
    z = latents(B, 4, h, w)
    with WorkingSet() as untiled:
        vae.decode(z)
    with WorkingSet() as tiled:
        decode_tiled(vae, z, tile=tile)
    crop = B * max(CFG.channels) * (tile + 4) ** 2 * 4  # fp32 input of a tile with halo at the widest stage
    kv = B * CFG.channels[-1] * h * w * 4  # keys (or values) of the whole latent map, for the mid attention
    assert tiled.largest <= max(crop, kv)
    assert tiled.peak <= 12 * crop + 3 * kv  # a dozen tile temporaries; K, V and the pieces of one being joined
    assert untiled.peak >= 10 * tiled.peak  # the measure tells the two apart


def test_progress_callback(vae):
    calls = []
    decode_tiled(vae, latents(1, 4, 5, 6), tile=16, progress=lambda done, total: calls.append((done, total)))
    total = calls[0][1]
    assert [d for d, _ in calls] == list(range(1, total + 1))
    assert all(t == total for _, t in calls)
