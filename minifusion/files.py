"""Output files: atomic writes, and the latents of a finished scale saved so a run can continue from it.

A `.latent.safetensors` file holds the scale's final latents, phase 1's mean and std (every later scale is
renormalised to them) and the random generator's state after that scale, so `--resume` continues the very
random stream the uninterrupted run would have used.
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

import torch
from safetensors.torch import save

from .safetensors_check import CheckpointError, NotSafetensors, SafetensorsFile

METADATA_KEY = "minifusion"


class LatentFileError(ValueError):
    """A latents file that cannot be resumed from; the message names the file."""


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through a temporary file in the same folder, renamed over `path` only once complete, so a
    crash, Ctrl-C or full disk never leaves a half-written file under the final name."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; the result should get the user's usual mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def output_paths(out: Path, n_scales: int) -> list[Path]:
    """img.png -> [img.x1.png, ..., img.x{S-1}.png, img.png]: every scale's image of a run."""
    return [out.with_name(f"{out.stem}.x{s}{out.suffix}") for s in range(1, n_scales)] + [out]


def numbered(folder: Path, seeds: list[int]) -> list[Path]:
    """The next free numbers in `folder`, Automatic1111 style: 00001-<seed>.png, 00002-<seed>.png, ..."""
    taken = [int(m.group(1)) for p in folder.glob("*.png") if (m := re.match(r"(\d+)-", p.name))]
    first = max(taken, default=0) + 1
    return [folder / f"{first + i:05d}-{seed}.png" for i, seed in enumerate(seeds)]


def latent_path(image_path: Path) -> Path:
    """img.x2.png -> img.x2.latent.safetensors"""
    return image_path.with_name(image_path.stem + ".latent.safetensors")


@dataclass
class SavedScale:
    scale: int
    latents: torch.Tensor  # (1, 4, h, w), float32, in the scheduler's final (clean) space
    anchor_mean: float
    anchor_std: float
    generator_state: torch.Tensor | None
    settings: dict
    stats: dict | None = None  # how long it took and what it used (not in the PNG, so that PNGs of the same
    # settings are identical byte for byte)


def save_latents(path: Path, saved: SavedScale) -> None:
    tensors = {"latents": saved.latents.detach().float().cpu().contiguous()}
    if saved.generator_state is not None:
        tensors["generator_state"] = saved.generator_state.cpu()
    meta = {"scale": saved.scale, "anchor_mean": saved.anchor_mean, "anchor_std": saved.anchor_std,
            "settings": saved.settings, "stats": saved.stats}
    data = save(tensors, metadata={METADATA_KEY: json.dumps(meta)})
    atomic_write(path, lambda f: f.write(data))


def load_latents(path: str | Path) -> SavedScale:
    path = Path(path)
    if not path.is_file():
        raise LatentFileError(f"{path}: no such file")
    try:
        f = SafetensorsFile(path)  # a user-supplied file: validated like any checkpoint
        try:
            tensors = {k: f.read(k) for k in ("latents", "generator_state") if k in f.entries}
            meta = json.loads(f.metadata[METADATA_KEY])
        finally:
            f.close()
    except NotSafetensors:
        raise  # another kind of file altogether: the caller names it
    except CheckpointError as e:
        raise LatentFileError(str(e)) from None
    except (ValueError, KeyError, TypeError):
        raise LatentFileError(f"{path}: not a minifusion latents file (no readable settings in its header)") from None
    z = tensors.get("latents")
    state = tensors.get("generator_state")
    ok = (z is not None and z.dim() == 4 and z.shape[:2] == (1, 4) and z.is_floating_point()
          and bool(torch.isfinite(z).all()) and isinstance(meta.get("scale"), int) and meta["scale"] >= 1
          and all(isinstance(meta.get(k), (int, float)) and math.isfinite(meta[k]) for k in ("anchor_mean", "anchor_std"))
          and isinstance(meta.get("settings"), dict)
          and (state is None or (state.dtype == torch.uint8 and state.dim() == 1)))
    if not ok:
        raise LatentFileError(f"{path}: its contents are not those of a minifusion latents file (damaged?)")
    return SavedScale(meta["scale"], z.float(), float(meta["anchor_mean"]), float(meta["anchor_std"]), state,
                      meta["settings"], meta.get("stats") if isinstance(meta.get("stats"), dict) else None)
