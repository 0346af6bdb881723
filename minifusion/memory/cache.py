"""Coefficients measured once per configuration, kept in the process and in a JSON file per measurement.

A measurement (a meta run of the UNet, the sampler or the tiled decode) costs seconds; the coefficients it yields
do not depend on the size, so they stay in memory and on disk (`cache_dir()`), keyed by the configuration, the
dtype, torch's version and minifusion's source: a process measures a configuration once per machine (SDXL's:
5-15 s on a 2-core CPU; `measured` says whether that is still to come) and every later check decides in
milliseconds.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch

# minifusion/ itself: what a measurement runs is any of its modules, this package included
PACKAGE = Path(__file__).parent.parent


def cache_dir() -> Path:
    """Where measured coefficients are kept: $MINIFUSION_CACHE, else $XDG_CACHE_HOME/minifusion, else
    ~/.cache/minifusion (a subfolder memory/)."""
    root = os.environ.get("MINIFUSION_CACHE")
    if not root:
        try:
            root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "minifusion")
        except RuntimeError:  # no home directory to be found: beside the other temporary files
            root = Path(tempfile.gettempdir(), "minifusion")
    return Path(root) / "memory"


@lru_cache(maxsize=1)
def _code_version() -> str:
    # any change to minifusion's source or to torch may change what a run allocates: measure again
    digest = hashlib.sha256(torch.__version__.encode())
    for path in sorted(PACKAGE.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


class _Measured:
    """A measuring function whose JSON-able result is kept per argument tuple: in the process, and in
    cache_dir() so that the next process reads it instead of measuring (unreadable or unwritable: measured)."""
    every: list["_Measured"] = []

    def __init__(self, fn: Callable):
        self.fn, self.__name__, self.__doc__ = fn, fn.__name__, fn.__doc__
        self.memo: dict[tuple, object] = {}
        _Measured.every.append(self)

    def path(self, *args) -> Path:
        key = hashlib.sha256(f"{self.__name__}{args!r}{_code_version()}".encode()).hexdigest()[:32]
        return cache_dir() / f"{self.__name__}-{key}.json"

    def known(self, *args) -> bool:
        return args in self.memo or self.path(*args).is_file()

    def __call__(self, *args):
        if args in self.memo:
            return self.memo[args]
        path = self.path(*args)
        try:
            value = json.loads(path.read_text())
        except (OSError, ValueError):
            value = self.fn(*args)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps(value))
                os.replace(tmp, path)  # whole or not at all: another process may read it at any moment
            except OSError:
                pass
        self.memo[args] = value
        return value


def _least_squares(rows: list[list[int]], values: list[int]) -> list[int]:
    """Least squares of bytes (or FLOPs) on their features; every coefficient is a whole number of bytes per
    unit, so rounding takes off the solver's float noise."""
    a = torch.tensor(rows, dtype=torch.float64)
    b = torch.tensor(values, dtype=torch.float64)[:, None]
    return [round(c) for c in torch.linalg.lstsq(a, b, driver="gelsd").solution[:, 0].tolist()]


def _dot(coefficients, features) -> int:
    return sum(c * x for c, x in zip(coefficients, features))
