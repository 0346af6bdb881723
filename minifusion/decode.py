"""Exact tiled VAE decode: the image of `vae.decode`, with compute-device memory bounded by the tile.

Decoding crops on their own is a different function: every GroupNorm takes its statistics over the whole
feature map and the mid attention looks at every latent pixel (tiles decoded alone differ from the whole
image by up to 0.45 in [0, 1] units). So the decoder runs stage by stage, a stage ending wherever a
whole-map reduction follows; every stage is one 3x3 convolution with elementwise work around it:

    y = conv(silu(groupnorm(x)))  [+ shortcut(residual)]      (conv_in: conv(post_quant_conv(z));
                                                              upsample: conv(nearest_2x(x)))

Each stage reads its input tile by tile from a full-map buffer on `storage` (CPU by default) with a halo of
exactly the conv's padding, applies the GroupNorm with statistics of the whole map, convolves, writes the
tile to the next full-map buffer and adds the tile's per-group sum and sum of squares (fp64) to the
statistics the next GroupNorm needs. No output pixel is computed twice, so the work is one untiled decode
plus the halos' elementwise ops; the price is one round trip of each feature map to the storage device.
The mid attention runs its queries tile by tile against the keys and values of the whole latent map, which
stay on the compute device (2 x C x h x w: for SDXL 1/16 of one full-resolution feature map).
`minifusion.encode` runs the encoder on the same stage runner, its stride-2 downsampling convs included.

FLOPs: `decode_flops(cfg, shape, tile)` counts either decode on the meta device with
torch.utils.flop_counter.FlopCounterMode (convolutions, matmuls and attention kernels; no weights needed).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from minifusion.config import VAEConfig
from minifusion.models.vae import VAE


@dataclass
class _Map:
    """A feature map (B, C, H, W) on the storage device: `data` holds its rows top .. top + data rows (all of them in
    one process; a band of them on each rank of a group); `spans` says which rows each rank holds."""
    data: torch.Tensor
    moments: torch.Tensor | None = None  # (B, groups, 2): fp64 sum and sum of squares, for the next GroupNorm
    top: int = 0
    height: int | None = None  # of the whole map; None: data's own
    spans: list[tuple[int, int]] | None = None  # rows (first, end) held by each rank; None: data's own, one process

    @property
    def shape(self) -> tuple[int, int, int, int]:
        B, C, h, W = self.data.shape
        return B, C, h if self.height is None else self.height, W

    def rows(self, a: int, b: int) -> torch.Tensor:
        return self.data[:, :, a - self.top:b - self.top]


def _spans(n: int, tile: int) -> list[tuple[int, int]]:
    k = -(-n // tile)  # as few tiles as the size allows, of near-equal size
    return [(i * n // k, (i + 1) * n // k) for i in range(k)]


Box = tuple[int, int, int, int]  # rows y0:y1, columns x0:x1


class TileShare(Protocol):
    """Which tiles of each stage this process computes, and how the processes that share a decode (or an encode)
    exchange what their tiles need: the seam between the stage runner and the ranks of a group.

    Every stage calls, in order: `split` (the stage's tiles, in tile order, into one share per rank), `band` (this
    process's part of the stage's output map), `fetch` (the rows its tiles read, halos included; a collective),
    then for each of its tiles compute and `moments` (the GroupNorm statistics of the whole output; a collective);
    the mid attention calls `each` for its keys and values. At the end `whole` gives the finished map. Every rank
    calls the same methods with the same arguments but its own data, so the collectives meet. A first pass without
    data, which counts the tiles for the progress total, calls `split` and `band` only. Implemented by
    `Alone` (one process), minifusion.distributed.GroupShare (the ranks of a group, by tile rows) and
    minifusion.memory.decoding.StageProbe (a meta run measuring stage by stage).
    """
    rank: int  # the index of this process's share in what `split` returns

    def split(self, tiles: list[Box]) -> list[list[Box]]:
        """One share of `tiles` per rank, the same on every rank; the shares, concatenated in rank order, are
        `tiles` in their order (so summing share by share is summing in tile order)."""

    def band(self, data: torch.Tensor, shares: list[list[Box]], height: int) -> _Map:
        """The new output map of a stage `height` rows tall, of which this process holds `data`: the rows of its
        own share's tiles (every row where one process computes everything)."""

    def fetch(self, x: _Map, needs: list[tuple[int, int]]) -> _Map:
        """`x` holding at least rows needs[rank] here (every rank's needs are given: those who hold the rows a
        rank needs send them). Rows outside the map are the conv's zero padding and are not asked for."""

    def moments(self, mine: list[torch.Tensor], shares: list[list[Box]], shape: tuple[int, ...]) -> torch.Tensor:
        """The sum of every tile's moments (`shape`, float64), `mine` being this process's tiles' in share order:
        added one tile at a time in tile order, from the first, on every rank. Float64 addition is not
        associative; this one order is what keeps the GroupNorm statistics, and so every pixel, bit for bit the
        same for any number of ranks."""

    def each(self, tiles: list[Box], shares: list[list[Box]], compute: Callable, store: Callable,
             step: Callable[[], None], shapes: Callable) -> None:
        """store(i, *compute(tiles[i])) for every tile i (on every rank), compute running only for this process's
        share, step() after each tile it computes; `shapes(box)` gives the shapes and dtypes compute returns, so
        ranks can receive the others' results."""

    def whole(self, x: _Map) -> torch.Tensor:
        """The whole map, on every rank."""


class Alone(TileShare):
    """One process computes every tile and holds every map whole."""
    rank = 0

    def split(self, tiles: list[Box]) -> list[list[Box]]:
        return [tiles]

    def band(self, data: torch.Tensor, shares: list[list[Box]], height: int) -> _Map:
        return _Map(data)

    def fetch(self, x: _Map, needs: list[tuple[int, int]]) -> _Map:
        return x

    def moments(self, mine: list[torch.Tensor], shares: list[list[Box]], shape: tuple[int, ...]) -> torch.Tensor:
        total = 0
        for m in mine:
            total = total + m
        return total

    def each(self, tiles: list[Box], shares: list[list[Box]], compute: Callable, store: Callable,
             step: Callable[[], None], shapes: Callable) -> None:
        for i, box in enumerate(tiles):
            store(i, *compute(box))
            step()

    def whole(self, x: _Map) -> torch.Tensor:
        return x.data


def _rows(boxes: list[Box]) -> tuple[int, int]:
    return (min(b[0] for b in boxes), max(b[1] for b in boxes)) if boxes else (0, 0)


class _Stages:
    """Runs decoder stages tile by tile; with `dry=True` it only counts the tiles (for the progress total).
    `share` decides which tiles this process computes (`Alone`: all of them)."""

    def __init__(self, vae: VAE, tile: int, storage: torch.device, dry: bool = False,
                 step: Callable[[], None] = lambda: None, share: TileShare | None = None):
        w = vae.post_quant_conv.weight
        self.device, self.dtype, self.groups = w.device, w.dtype, vae.cfg.norm_groups
        self.tile, self.storage, self.dry, self.step = tile, storage, dry, step
        self.share = share or Alone()
        self.count = 0

    def _tiles(self, H: int, W: int, tile: int | None = None) -> list[tuple[int, int, int, int]]:
        tile = tile or self.tile
        return [(y0, y1, x0, x1) for y0, y1 in _spans(H, tile) for x0, x1 in _spans(W, tile)]

    def _empty(self, B: int, C: int, H: int, W: int) -> torch.Tensor:
        return torch.empty(B, C, H, W, device="meta" if self.dry else self.storage, dtype=self.dtype)

    def _output(self, B: int, C: int, H: int, W: int, shares: list[list[Box]], moments: bool) -> _Map:
        a, b = _rows(shares[self.share.rank])
        out = self.share.band(self._empty(B, C, b - a, W), shares, H)
        out.moments = 0 if moments else None
        return out

    def _norm(self, t: torch.Tensor, x: _Map, gn: nn.GroupNorm) -> torch.Tensor:
        """GroupNorm of a crop `t` of `x` with the statistics of all of `x`: biased variance, applied in fp32
        as x * scale + shift, the way torch's own GroupNorm kernel does."""
        B, C, H, W = x.shape
        n = C // gn.num_groups * H * W
        mean = x.moments[..., 0] / n
        rstd = ((x.moments[..., 1] / n - mean ** 2).clamp_min(0) + gn.eps).rsqrt()
        scale = rstd.repeat_interleave(C // gn.num_groups, dim=1) * gn.weight.double()  # (B, C)
        shift = gn.bias.double() - mean.repeat_interleave(C // gn.num_groups, dim=1) * scale
        # t stays in its dtype: addcmul promotes it to fp32 element by element, without a converted copy
        return torch.addcmul(shift.float()[..., None, None], t, scale.float()[..., None, None]).to(t.dtype)

    def _moments(self, y: torch.Tensor) -> torch.Tensor:
        # squares in fp32 are exact to 1e-7 relative; summing them in fp64 keeps E[x^2] - E[x]^2 exact as well
        y = y.float().unflatten(1, (self.groups, -1))
        return torch.stack([y.sum((2, 3, 4), dtype=torch.float64), (y * y).sum((2, 3, 4), dtype=torch.float64)], dim=-1)

    def conv(self, x: _Map, conv: nn.Conv2d, norm: nn.GroupNorm | None = None, before: nn.Module | None = None,
             after: nn.Module | None = None, upsample: bool = False, pad: tuple[int, int] | None = None,
             residual: _Map | None = None, shortcut: nn.Module | None = None, moments: bool = True) -> _Map:
        """`after(conv(silu(norm(before(x)))))` [+ `shortcut(residual)`], on the nearest-2x upsampled `x` if
        `upsample`. `pad`: zeros (before, after) on both axes where the module pads itself (LDM's Downsample:
        (0, 1)); default the conv's own symmetric padding."""
        B, _, H, W = x.shape
        u, st, k = 2 if upsample else 1, conv.stride[0], conv.kernel_size[0]
        lo, hi = pad if pad is not None else (conv.padding[0],) * 2
        Hi, Wi = u * H, u * W  # the map the conv reads
        Ho, Wo = (Hi + lo + hi - k) // st + 1, (Wi + lo + hi - k) // st + 1
        # output tiles of tile/stride: a strided conv's tile then reads an input tile of about the tile size
        tiles = self._tiles(Ho, Wo, max(1, self.tile // st))
        shares = self.share.split(tiles)
        out = self._output(B, conv.out_channels, Ho, Wo, shares, moments)
        if self.dry:
            self.count += len(shares[self.share.rank])
            return out

        def reads(y0, y1):  # output rows y0:y1 read input rows y*st - lo + [0, k), clipped to the map
            return max(y0 * st - lo, 0), min((y1 - 1) * st - lo + k, Hi)

        def source_rows(boxes):
            if not boxes:
                return 0, 0
            a0, a1 = reads(*_rows(boxes))
            return a0 // u, -(-a1 // u)

        x = self.share.fetch(x, [source_rows(b) for b in shares])
        if residual is not None:
            residual = self.share.fetch(residual, [_rows(b) for b in shares])
        stats = []
        for y0, y1, x0, x1 in shares[self.share.rank]:
            # those input rows inside the map are fetched, the rest is the conv's zero padding; tiles in output
            # space so a strided conv reads exactly its own inputs
            r0, r1, c0, c1 = y0 * st - lo, (y1 - 1) * st - lo + k, x0 * st - lo, (x1 - 1) * st - lo + k
            (a0, a1), b0, b1 = reads(y0, y1), max(c0, 0), min(c1, Wi)
            # always a copy, as it is from host storage to a GPU: the same allocations on every device
            t = x.rows(a0 // u, -(-a1 // u))[..., b0 // u:-(-b1 // u)].to(self.device, copy=True)
            if before is not None:
                t = before(t)
            if norm is not None:
                t = F.silu(self._norm(t, x, norm))
            if upsample:  # nearest-2x of the source rows a0//2.., then the rows a0..a1 of the 2x map
                t = F.interpolate(t, scale_factor=2.0, mode="nearest")
                t = t[:, :, a0 % 2:a0 % 2 + a1 - a0, b0 % 2:b0 % 2 + b1 - b0]
            y = F.conv2d(F.pad(t, (b0 - c0, c1 - b1, a0 - r0, r1 - a1)), conv.weight, conv.bias, stride=st)
            if after is not None:
                y = after(y)
            if residual is not None:
                y = y + shortcut(residual.rows(y0, y1)[..., x0:x1].to(self.device, copy=True))
            out.rows(y0, y1)[..., x0:x1] = y
            if moments:
                stats.append(self._moments(y))
            del t, y  # not alive while the next tile is fetched: the working set is one tile's, as memory/decoding.py assumes
            self.step()
        if moments:
            out.moments = self.share.moments(stats, shares, (B, self.groups, 2))
        return out

    def resblock(self, x: _Map, block: nn.Module) -> _Map:
        h = self.conv(x, block.conv1, norm=block.norm1)
        return self.conv(h, block.conv2, norm=block.norm2, residual=x, shortcut=block.nin_shortcut)

    def attention(self, x: _Map, attn: nn.Module) -> _Map:
        B, C, H, W = x.shape
        tiles = self._tiles(H, W)
        shares = self.share.split(tiles)
        out = self._output(B, C, H, W, shares, moments=True)
        if self.dry:
            self.count += 3 * len(shares[self.share.rank])  # a pass for the keys, one for the values, one for the queries
            return out
        x = self.share.fetch(x, [_rows(b) for b in shares])

        def normed(y0, y1, x0, x1):
            t = x.rows(y0, y1)[..., x0:x1].to(self.device, copy=True)
            return t, self._norm(t, x, attn.norm)

        # keys and values of every latent pixel, written in place in tile order; (B, 1, N, C), contiguous as
        # fused SDPA needs. One pass each, so only one tile's projection is alive at a time
        k, v = (torch.empty_strided((B, 1, H * W, C), (H * W * C, H * W * C, C, 1), device=self.device,
                                    dtype=self.dtype) for _ in range(2))
        ends = [0]
        for y0, y1, x0, x1 in tiles:
            ends.append(ends[-1] + (y1 - y0) * (x1 - x0))
        for buf, proj in ((k, attn.k), (v, attn.v)):
            def project(box, proj=proj):
                _, h = normed(*box)
                return [proj(h).flatten(2).transpose(1, 2)]

            def store(i, p, buf=buf):
                buf[:, 0, ends[i]:ends[i + 1]] = p

            self.share.each(tiles, shares, project, store, self.step,
                            lambda box: [((B, (box[1] - box[0]) * (box[3] - box[2]), C), self.dtype)])
        stats = []
        for y0, y1, x0, x1 in shares[self.share.rank]:
            t, h = normed(y0, y1, x0, x1)
            q = attn.q(h).flatten(2).transpose(1, 2).contiguous()[:, None]
            o = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(B, C, y1 - y0, x1 - x0)
            y = t + attn.proj_out(o)
            out.rows(y0, y1)[..., x0:x1] = y
            stats.append(self._moments(y))
            del t, h, q, o, y
            self.step()
        out.moments = self.share.moments(stats, shares, (B, self.groups, 2))
        return out


def _decoder(run: _Stages, vae: VAE, z: _Map) -> _Map:
    """VAE.decode (post_quant_conv, then Decoder.forward), stage by stage."""
    dec = vae.decoder
    x = run.conv(z, dec.conv_in, before=vae.post_quant_conv)
    x = run.resblock(x, dec.mid.block_1)
    x = run.attention(x, dec.mid.attn_1)
    x = run.resblock(x, dec.mid.block_2)
    for level in reversed(dec.up):
        for block in level.block:
            x = run.resblock(x, block)
        if hasattr(level, "upsample"):
            x = run.conv(x, level.upsample.conv, upsample=True)
    return run.conv(x, dec.conv_out, norm=dec.norm_out, moments=False)


@torch.no_grad()
def decode_tiled(vae: VAE, latents: torch.Tensor, tile: int = 256, storage: str | torch.device | None = "cpu",
                 progress: bool | Callable[[int, int], None] | None = None, share: TileShare | None = None
                 ) -> torch.Tensor:
    """Unscaled latents (B, C, h, w) -> image (B, 3, 8h, 8w) in about [-1, 1], equal to `vae.decode(latents)`.

    Computes on the VAE's device in its dtype. `tile`: tile side in pixels of each stage's own feature map.
    `storage`: device of the full-map buffers and of the returned image (None: the VAE's device).
    `progress`: True for a tqdm bar, or a callable(done, total) called after every tile.
    `share`: which tiles this process computes (default all, `Alone`; minifusion.distributed.GroupShare splits
    them over the ranks of a group, each holding only its rows of every feature map).
    """
    return _run(_decoder, vae, latents, tile, storage, progress, "VAE decode", share)


def _run(body: Callable[[_Stages, VAE, _Map], _Map], vae: VAE, x: torch.Tensor, tile: int,
         storage: str | torch.device | None, progress: bool | Callable[[int, int], None] | None,
         desc: str, share: TileShare | None = None) -> torch.Tensor:
    """`body` (the decoder's or the encoder's stages) on `x`, tile by tile, as `decode_tiled` documents."""
    if not isinstance(tile, int) or isinstance(tile, bool) or tile < 1:
        raise ValueError(f"tile {tile!r} must be a positive integer (pixels of each stage's feature map)")
    storage = torch.device(storage) if storage is not None else vae.post_quant_conv.weight.device
    plan = _Stages(vae, tile, storage, dry=True, share=share)
    body(plan, vae, _Map(torch.empty(x.shape, device="meta")))
    total, done = plan.count, 0
    bar = tqdm(total=total, desc=desc, unit="tile") if progress is True else None

    def step():
        nonlocal done
        done += 1
        if bar is not None:
            bar.update()
        elif callable(progress):
            progress(done, total)

    run = _Stages(vae, tile, storage, step=step, share=share)
    out = run.share.whole(body(run, vae, _Map(x.to(storage, run.dtype))))
    if bar is not None:
        bar.close()
    return out


def decode_flops(cfg: VAEConfig, shape: tuple[int, ...], tile: int | None = None) -> int:
    """FLOPs of decoding latents of `shape` (B, C, h, w): untiled (`tile=None`) or `decode_tiled` with that
    tile. Counted on the meta device, so any size of any config costs no memory and no weights."""
    return meta_flops(cfg, shape, lambda vae, z: decode_tiled(vae, z, tile=tile, storage="meta") if tile
                      else vae.decode(z))


def meta_flops(cfg: VAEConfig, shape: tuple[int, ...], fn: Callable[[VAE, torch.Tensor], object]) -> int:
    """FLOPs of `fn(vae, x)` for a VAE of `cfg` and an input of `shape`, both on the meta device."""
    with torch.device("meta"):
        vae, x = VAE(cfg), torch.empty(shape)
    with FlopCounterMode(display=False) as counter:
        fn(vae, x)
    return counter.get_total_flops()
