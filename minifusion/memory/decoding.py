"""The decode's bytes: per stage of decode_tiled, fitted once; an untiled decode, linear in the latent pixels.

decoding = max over decode_tiled's stages of one tile's working set + the stage's map-wide device buffers (the
mid attention's keys and values); decode.py keeps the full feature maps on the host, reported apart as host bytes.
Per stage: bytes bilinear in the tile's sides where the stage is one tile, its map-wide buffers, the bytes each
tile keeps, and the halo a tile reads beyond itself, from runs where every stage is one tile and runs where each
stage computes one interior tile only (`StageProbe`, a decode.TileShare, picks the tiles). Exact where every
stage is one tile; otherwise each stage's largest tile with the widest halo: an upper bound, a few percent over.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..config import VAEConfig
from ..decode import Alone, Box, _Map, _spans, decode_tiled
from ..models.vae import VAE
from .cache import _dot, _least_squares, _Measured
from .tracker import CPUAttentionOnMeta, MemoryTracker, _meta, _StageTracker


class StageProbe(Alone):
    """A TileShare for measuring a decode_tiled run stage by stage: `begin(tiles)` is told where each stage starts
    (its tile count) and returns the stage's record, into which the probe writes the stage's output map size
    ("size") and the bytes of one tile's moments ("entry"). Each stage computes only `pick(tiles)` (default all;
    it measures, it need not decode) and keeps its maps whole, so any tile's halo can be read."""

    def __init__(self, begin: Callable[[int], dict], pick: Callable[[list[Box]], list[Box]] = lambda tiles: tiles):
        self.begin, self.pick = begin, pick
        self.stage: dict = {}

    def split(self, tiles: list[Box]) -> list[list[Box]]:
        self.stage = self.begin(len(tiles))
        return [self.pick(tiles)]

    def band(self, data: torch.Tensor, shares: list[list[Box]], height: int) -> _Map:
        self.stage["size"] = (height, data.shape[3])
        if data.shape[2] != height:
            data = torch.empty(data.shape[0], data.shape[1], height, data.shape[3], dtype=data.dtype,
                               device=data.device)
        return super().band(data, shares, height)

    def moments(self, mine: list[torch.Tensor], shares: list[list[Box]], shape: tuple[int, ...]) -> torch.Tensor:
        self.stage["entry"] = mine[0].untyped_storage().nbytes() if mine else 0
        return super().moments(mine, shares, shape)

    def each(self, tiles: list[Box], shares: list[list[Box]], compute: Callable, store: Callable,
             step: Callable[[], None], shapes: Callable) -> None:
        for i, box in enumerate(tiles):
            if box in shares[0]:
                store(i, *compute(box))
                step()


@torch.no_grad()
def _decode_stages(cfg: VAEConfig, dtype: torch.dtype, h: int, w: int, tile: int, pick) -> _StageTracker:
    vae, tracker = _meta(VAE, cfg, dtype), _StageTracker()  # built outside: its weights are not the decode's
    z = torch.zeros(1, cfg.latent_channels, h, w, dtype=dtype, device="meta")
    with CPUAttentionOnMeta(), tracker:
        decode_tiled(vae, z, tile=tile, storage="meta", share=StageProbe(tracker.begin, pick))
    tracker.stages = [s for s in tracker.stages if s["allocated"]]  # the dry run that counts tiles allocates nothing
    return tracker


@torch.no_grad()
def _untiled_decode_peak(cfg: VAEConfig, dtype: torch.dtype, h: int, w: int) -> int:
    vae = _meta(VAE, cfg, dtype)
    z = torch.zeros(1, cfg.latent_channels, h, w, dtype=dtype, device="meta")
    with CPUAttentionOnMeta(), MemoryTracker() as tracker:
        vae.decode(z)
    return tracker.peak


def _middle_tile(tiles: list) -> list:
    rows, cols = sorted({box[0] for box in tiles}), sorted({box[2] for box in tiles})
    return [next(box for box in tiles if box[0] == rows[len(rows) // 2] and box[2] == cols[len(cols) // 2])]


def _root(coefficients: list[float], target: float) -> float:
    """The x >= 0 with p0 + (p1 + p2) x + p3 x^2 = target (a stage's bytes at an x by x tile)."""
    p0, p1, p2, p3 = coefficients
    b, c = p1 + p2, p0 - target
    if p3 > 0:
        return (-b + math.sqrt(max(b * b - 4 * p3 * c, 0.0))) / (2 * p3)
    return -c / b if b > 0 else 0.0


_ONE_TILE = 1 << 30  # a tile larger than any map: every stage is one tile
_DECODE_PROBES = ((16, 24), (24, 20), (20, 12), (28, 32))  # latents, non-square: each stage is bilinear
_INTERIOR_TILES = (16, 1024)  # each stage computes one interior tile of this size (of a 3 x 3 tiled latent map)


@_Measured
def _decode_fit(cfg: VAEConfig, dtype: torch.dtype) -> dict:
    """Per stage of decode_tiled: its output map's size over the latents', bytes p0 + p1 X + p2 Y + p3 X Y of a
    stage that is one X x Y tile, the map-wide buffers per map pixel, the bytes each tile keeps (its moments)
    and the halo: a stage of several tiles holds, for an interior L x L tile, what one (L + halo)^2 tile does
    (its input is read one pixel beyond, twice that after a 2x upsampling). The halo is the larger of those
    solved at tiles of 16 and of 1024, so that within that range the bound holds: the difference is linear in L.
    Then the host's full maps and an untiled decode, both linear in the latent pixels."""
    runs = [_decode_stages(cfg, dtype, h, w, _ONE_TILE, lambda tiles: tiles) for h, w in _DECODE_PROBES]
    interior = [_decode_stages(cfg, dtype, 3 * tile, 3 * tile, tile, _middle_tile).stages
                for tile in _INTERIOR_TILES]
    stages = []
    for q, first in enumerate(runs[0].stages):
        ratio = first["size"][0] // _DECODE_PROBES[0][0]
        maps = [(ratio * h, ratio * w) for h, w in _DECODE_PROBES]
        p = _least_squares([[1, rows, cols, rows * cols] for rows, cols in maps],
                           [r.stages[q]["peak"] - r.stages[q]["map"] for r in runs])
        per_map = round(sum(r.stages[q]["map"] for r in runs) / sum(rows * cols for rows, cols in maps))
        halo = max(_root(p, inner[q]["peak"] - inner[q]["map"]) - tile
                   for inner, tile in zip(interior, _INTERIOR_TILES))
        stages.append({"ratio": ratio, "bytes": p, "map": per_map, "halo": max(halo, 0.0), "entry": first["entry"]})
    pixels = [[1, h * w] for h, w in _DECODE_PROBES]
    untiled = [_untiled_decode_peak(cfg, dtype, h, w) for h, w in _DECODE_PROBES[:3]]
    return {"stages": stages, "host": _least_squares(pixels, [r.peak_host for r in runs]),
            "untiled": _least_squares(pixels[:3], untiled)}


def _span(size: int, tile: int) -> tuple[int, int]:
    """(tiles, largest tile) along one axis of a map, as decode.py splits it."""
    spans = _spans(size, tile)
    return len(spans), max(b - a for a, b in spans)


def _stage_bytes(stage: dict, h: int, w: int, tile: int) -> int:
    rows, cols = stage["ratio"] * h, stage["ratio"] * w
    (kr, lr), (kc, lc) = _span(rows, tile), _span(cols, tile)
    # a stage of several tiles along an axis: its largest tile there with the widest halo (a border tile reads less)
    x, y = (lr + stage["halo"] if kr > 1 else rows), (lc + stage["halo"] if kc > 1 else cols)
    p0, p1, p2, p3 = stage["bytes"]
    return math.ceil(p0 + p1 * x + p2 * y + p3 * x * y + stage["map"] * rows * cols + stage["entry"] * (kr * kc - 1))


def decode_bytes(cfg: VAEConfig, h: int, w: int, dtype: torch.dtype, tile: int | None = 256) -> dict[str, int]:
    """Device and host peak bytes of decoding h x w latents (weights not included): `decode_tiled` with that
    tile (pixels of each stage's own map), or one untiled `vae.decode` (tile None; all of it on the device).

    Tiled: the largest over decode_tiled's stages of its working set, from measured per-stage coefficients (see
    the module's docstring): exact where every stage is one tile, an upper bound otherwise. The host holds full
    feature maps (a ResnetBlock's input, middle and output at once), in proportion to the latent pixels."""
    fit = _decode_fit(cfg, dtype)
    if tile is None:
        return {"device": _dot(fit["untiled"], [1, h * w]), "host": 0}
    return {"device": max(_stage_bytes(stage, h, w, tile) for stage in fit["stages"]),
            "host": _dot(fit["host"], [1, h * w])}
