"""Loading cost: seconds and peak resident memory to load a full-size fp16 single-file SDXL checkpoint into our
models, against the file's size (target: peak RSS <= 1.3 x the file's bytes).

The checkpoint has the real file's keys, shapes and dtypes (2515 tensors, ~6.9 GB in fp16) and random values:
loading cost does not depend on them. It is written once, streamed tensor by tensor (never whole in memory),
and reused. Each load runs in a fresh process (`python -m bench.loading FILE`), so its peak resident set is
its own: a sampler thread splits it into anonymous memory (tensors) and file-backed pages (the mmap of the
checkpoint counted in the resident set), and ru_maxrss gives the kernel's own all-time peak. glibc keeps its
default settings here (unlike `python -m bench`, see measure.py): this is the peak a user's process sees. "Cold" loads
first evict the file from the page cache (posix_fadvise DONTNEED on that file only).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch

from minifusion.checkpoint import COMPONENTS, SINGLE_FILE_OPTIONAL, meta_models, single_file_tables
from minifusion.keyops import to_source

from .measure import RSSSampler, rss

SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64"}
DEFAULT_DIR = Path(os.environ.get("TMPDIR", "/tmp")) / "minifusion-bench"


def checkpoint_layout(cfgs, dtype: torch.dtype = torch.float16) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """{key: (dtype, shape)} of a single-file checkpoint for these configs, optional extras included."""
    models = meta_models(cfgs)
    tables = single_file_tables(cfgs, models)
    layout = {}
    for c in COMPONENTS:
        for key, t in to_source(models[c].state_dict(), tables[c]).items():
            layout[key] = (dtype, tuple(t.shape))
    layout[SINGLE_FILE_OPTIONAL[0]] = (torch.int64, (1, cfgs.text_encoder_1.max_length))
    layout[SINGLE_FILE_OPTIONAL[1]] = (dtype, ())
    return layout


def write_random_checkpoint(path: Path, cfgs, dtype: torch.dtype = torch.float16, seed: int = 0,
                            chunk: int = 1 << 24) -> Path:
    """Stream a safetensors file (8-byte header length, JSON header, raw little-endian data) of random values."""
    layout = checkpoint_layout(cfgs, dtype)
    header, offset = {}, 0
    for key in sorted(layout):
        dt, shape = layout[key]
        n = dt.itemsize * (int(torch.Size(shape).numel()))
        header[key] = {"dtype": SAFETENSORS_DTYPES[dt], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    size = cfgs.unet.sample_size * 8
    header["__metadata__"] = {"modelspec.architecture": "stable-diffusion-xl-v1-base",
                              "modelspec.resolution": f"{size}x{size}"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    free = shutil.disk_usage(path.parent).free
    if free < offset + (1 << 30):
        raise OSError(f"{path.parent}: {free / 1e9:.1f} GB free, the checkpoint needs {offset / 1e9:.1f} GB + 1 GB")
    g = torch.Generator().manual_seed(seed)
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key in sorted(k for k in header if k != "__metadata__"):
            dt, shape = layout[key]
            numel = int(torch.Size(shape).numel())
            if dt == torch.int64:
                f.write(torch.arange(numel, dtype=torch.int64).numpy().tobytes())
                continue
            for start in range(0, numel, chunk):
                n = min(chunk, numel - start)
                values = (torch.rand(n, generator=g) * 0.04 - 0.02).to(dt)
                f.write(values.view(torch.int16 if dt.itemsize == 2 else torch.int32).numpy().tobytes())
    os.replace(tmp, path)
    return path


def ensure_checkpoint(directory: Path, cfgs) -> tuple[Path, float]:
    """The random full-size fp16 checkpoint in `directory`, written if absent; (path, seconds spent writing)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "sdxl_random_fp16.safetensors"
    expected = sum(dt.itemsize * int(torch.Size(s).numel()) for dt, s in checkpoint_layout(cfgs).values())
    if path.is_file() and path.stat().st_size > expected:
        return path, 0.0
    start = time.perf_counter()
    write_random_checkpoint(path, cfgs)
    return path, time.perf_counter() - start


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def measure_load(path: Path, dtype: str, device: str, cold: bool) -> dict:
    """Load in a fresh interpreter; returns its measurements."""
    if cold:
        evict(path)
    cmd = [sys.executable, "-m", "bench.loading", str(path), "--dtype", dtype, "--device", device]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], check=False)
    if out.returncode != 0:
        raise RuntimeError(f"load subprocess failed: {out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    file_bytes = path.stat().st_size
    result.update(file_bytes=file_bytes, cold=cold, dtype=dtype, device=device,
                  peak_rss_over_file=result["peak_rss_growth_bytes"] / file_bytes,
                  target_met=result["peak_rss_growth_bytes"] <= 1.3 * file_bytes)
    return result


def run(directory: Path, cfgs, dtypes=("float16", "bfloat16"), device: str = "cpu") -> dict:
    path, write_seconds = ensure_checkpoint(directory, cfgs)
    rows = []
    for dtype in dtypes:
        for cold in (True, False):
            rows.append(measure_load(path, dtype, device, cold))
    return {"file": str(path), "file_bytes": path.stat().st_size, "write_seconds": write_seconds, "loads": rows}


def _child(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("path", type=Path)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    from minifusion.checkpoint import load_components
    from minifusion.memory import component_dtypes
    from minifusion.pipeline import load  # noqa: F401  (imports everything a real load imports)

    dtypes = component_dtypes(getattr(torch, args.dtype))  # as minifusion.load
    sampler = RSSSampler()
    base, base_file = rss()
    start = time.perf_counter()
    models, _, _ = load_components(args.path, torch.device(args.device), dtypes)
    seconds = time.perf_counter() - start
    growth = sampler.growth()
    after, after_file = rss()
    sampler.close()
    params = sum(p.numel() * p.element_size() for m in models.values() for p in m.parameters())
    print(json.dumps({
        "seconds": seconds, "baseline_rss_bytes": base, "peak_rss_bytes": growth["peak_rss_bytes"],
        "peak_rss_growth_bytes": growth["peak_rss_growth_bytes"],
        "peak_anon_growth_bytes": growth["peak_anon_growth_bytes"],
        "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_after_bytes": after, "file_backed_rss_after_bytes": after_file - base_file,
        "parameter_bytes": params}))
    return 0


if __name__ == "__main__":
    sys.exit(_child())
