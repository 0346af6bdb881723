"""Loading cost: seconds and peak resident memory to load a full-size fp16 single-file SDXL checkpoint into our
models, against the file's size (target: peak RSS <= 1.3 x the file's bytes).

The checkpoint has the real file's keys, shapes and dtypes (2515 tensors, ~6.9 GB in fp16) and random values:
loading cost does not depend on them. It is written once, streamed tensor by tensor (never whole in memory),
and reused. Each load runs in a fresh process (`python -m bench.loading FILE`), so its peak resident set is
its own: a sampler thread splits it into anonymous memory (tensors) and file-backed pages (the mmap of the
checkpoint counted in the resident set), and ru_maxrss gives the kernel's own all-time peak. glibc keeps its
default settings here (unlike `python -m bench`, see measure.py): this is the peak a user's process sees. "Cold" loads
first evict the file from the page cache (posix_fadvise DONTNEED on that file only).

With LoRAs (`python -m bench --loading --loading-loras`), each load is also made with two random full-size kohya
LoRAs merged (rank 32 and 64 over every attention and feed-forward Linear of the UNet and both text encoders,
written beside the checkpoint once): seconds and peak RSS against the same load without them (target: 1.3 x the
checkpoint's bytes plus the LoRA files').
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


# LoRA layers of the bench's random LoRAs: every attention and feed-forward Linear of the UNet's transformer
# blocks and of both text encoders, as kohya-ss trains SDXL LoRAs by default
LORA_LAYERS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
               "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "self_attn.q_proj", "self_attn.k_proj",
               "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
LORA_RANKS = (32, 64)


def lora_layout(cfgs, rank: int) -> dict[str, tuple[int, ...]]:
    """{key: shape} of a kohya-format SDXL LoRA of this rank over LORA_LAYERS (alpha = rank / 2)."""
    models = meta_models(cfgs)
    prefix = {"unet": "lora_unet_", "text_encoder_1": "lora_te1_text_model_", "text_encoder_2": "lora_te2_text_model_"}
    layout = {}
    for c, p in prefix.items():
        for name, m in models[c].named_modules():
            if isinstance(m, torch.nn.Linear) and name.endswith(LORA_LAYERS):
                key = p + name.replace(".", "_")
                layout |= {f"{key}.lora_down.weight": (rank, m.in_features),
                           f"{key}.lora_up.weight": (m.out_features, rank), f"{key}.alpha": ()}
    return layout


def write_random_lora(path: Path, cfgs, rank: int, seed: int = 0) -> Path:
    """A random fp16 LoRA (merging cost does not depend on the values)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {k: torch.tensor(rank / 2) if not shape else
               (torch.randn(shape, generator=g) * 0.1 / shape[1] ** 0.5).to(torch.float16)
               for k, shape in lora_layout(cfgs, rank).items()}
    tmp = path.with_suffix(".partial")
    save_file(tensors, str(tmp), metadata={"ss_network_dim": str(rank), "ss_network_alpha": str(rank / 2)})
    os.replace(tmp, path)
    return path


def ensure_loras(directory: Path, cfgs, ranks=LORA_RANKS) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for rank in ranks:
        path = directory / f"sdxl_random_lora_rank{rank}.safetensors"
        if not path.is_file():
            write_random_lora(path, cfgs, rank, seed=rank)
        paths.append(path)
    return paths


def measure_load(path: Path, dtype: str, device: str, cold: bool, loras: tuple[Path, ...] = ()) -> dict:
    """Load in a fresh interpreter (with these LoRAs merged, weight 1 each); returns its measurements."""
    if cold:
        for f in (path, *loras):
            evict(f)
    cmd = [sys.executable, "-m", "bench.loading", str(path), "--dtype", dtype, "--device", device]
    cmd += [a for f in loras for a in ("--lora", str(f))]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], check=False)
    if out.returncode != 0:
        raise RuntimeError(f"load subprocess failed: {out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    file_bytes = path.stat().st_size
    lora_bytes = sum(f.stat().st_size for f in loras)
    # the target with LoRAs: the checkpoint's 1.3 x plus the LoRA files themselves
    result.update(file_bytes=file_bytes, cold=cold, dtype=dtype, device=device,
                  loras=[f.name for f in loras], lora_bytes=lora_bytes,
                  peak_rss_over_file=result["peak_rss_growth_bytes"] / file_bytes,
                  target_met=result["peak_rss_growth_bytes"] <= 1.3 * file_bytes + lora_bytes)
    return result


def run(directory: Path, cfgs, dtypes=("float16", "bfloat16"), device: str = "cpu", loras: bool = False) -> dict:
    """Each dtype cold and warm; with `loras`, each also with two random full-size LoRAs (LORA_RANKS) merged."""
    path, write_seconds = ensure_checkpoint(directory, cfgs)
    lora_files = tuple(ensure_loras(directory, cfgs)) if loras else ()
    rows = []
    for dtype in dtypes:
        for cold in (True, False):
            rows.append(measure_load(path, dtype, device, cold))
            if lora_files:
                rows.append(measure_load(path, dtype, device, cold, lora_files))
    return {"file": str(path), "file_bytes": path.stat().st_size, "write_seconds": write_seconds, "loads": rows}


def _child(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("path", type=Path)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--lora", action="append", type=Path, default=[], help="merge this LoRA (weight 1)")
    args = ap.parse_args(argv)
    from minifusion.checkpoint import inspect_checkpoint, load_components
    from minifusion.lora import open_loras
    from minifusion.memory import component_dtypes
    from minifusion.pipeline import load  # noqa: F401  (imports everything a real load imports)

    dtypes = component_dtypes(getattr(torch, args.dtype))  # as minifusion.load
    sampler = RSSSampler()
    base, base_file = rss()
    start = time.perf_counter()
    patch = open_loras(args.lora, inspect_checkpoint(args.path)) if args.lora else None  # as minifusion.load
    models, _, _ = load_components(args.path, torch.device(args.device), dtypes, patch=patch)
    if patch is not None:
        patch.close()
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
