"""Measuring instruments: wall time, peak memory per phase (CUDA allocator or CPU resident set), machine facts.

CPU peak memory cannot come from `ru_maxrss`: it is the process's all-time maximum and cannot be reset, so a
later scale would report an earlier scale's peak. `RSSSampler` reads /proc/self/statm from a thread every
millisecond instead, and each phase reports its own maximum minus the resident set when it began. Freed heap
pages that glibc keeps would make that baseline too high (and the growth too low), so a phase first returns
them to the kernel with malloc_trim(0). glibc also raises its mmap threshold as large blocks are freed (up to
32 MiB), after which tensors come from a fragmenting heap and the resident set overstates live memory (the
tiny UNet: 85 MiB resident for 51 MiB of live tensors); `fix_mmap_threshold` pins it at 1 MiB, so every
tensor of 1 MiB or more is mapped on allocation and returned on free (then 55 MiB for the same 51).
"""
from __future__ import annotations

import ctypes
import os
import platform
import statistics
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from minifusion.pipeline import cpu_flags

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:
    _LIBC = None


M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 20


def malloc_trim() -> None:
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def fix_mmap_threshold() -> int | None:
    """Pin glibc's mmap threshold (setting it disables the dynamic raise); returns it, or None without glibc."""
    if _LIBC is None or not _LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        return None
    return MMAP_THRESHOLD


def rss() -> tuple[int, int]:
    """(resident bytes, of which file-backed or shared bytes) of this process, from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    return int(fields[1]) * PAGE, int(fields[2]) * PAGE


class RSSSampler:
    """A daemon thread recording the maximum resident set (and its anonymous part) since the last `reset`."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.reset()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def reset(self) -> int:
        malloc_trim()
        total, shared = rss()
        with self._lock:
            self.base, self.base_anon = total, total - shared
            self.peak, self.peak_anon = total, total - shared
        return total

    def sample(self) -> None:
        total, shared = rss()
        with self._lock:
            self.peak = max(self.peak, total)
            self.peak_anon = max(self.peak_anon, total - shared)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def growth(self) -> dict:
        self.sample()
        with self._lock:
            return {"peak_rss_bytes": self.peak, "peak_rss_growth_bytes": self.peak - self.base,
                    "peak_anon_growth_bytes": self.peak_anon - self.base_anon}


class PeakMemory:
    """Peak memory of a phase: resident-set growth of the process always (on a GPU that is the host side, e.g.
    decode.py's full-map buffers), plus on CUDA the allocator's statistics, reset per phase."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sampler = RSSSampler()

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        self.sampler.reset()

    def read(self) -> dict:
        out = self.sampler.growth()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            out.update(peak_allocated_bytes=torch.cuda.max_memory_allocated(self.device),
                       peak_reserved_bytes=torch.cuda.max_memory_reserved(self.device),
                       peak_allocated_growth_bytes=torch.cuda.max_memory_allocated(self.device) - self.base)
        return out

    def close(self) -> None:
        self.sampler.close()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def time_calls(fns: dict, device: torch.device, warmup: int = 1, repeat: int = 3) -> dict[str, Timing]:
    """Median-ready timings of several zero-argument callables, run interleaved (a, b, a, b, ...) so that a
    change in background load on a shared machine hits all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            sync(device)
    out = {k: Timing() for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            out[k].seconds.append(time.perf_counter() - start)
    return out


@contextmanager
def timed(result: dict, key: str, device: torch.device):
    sync(device)
    start = time.perf_counter()
    yield
    sync(device)
    result[key] = time.perf_counter() - start


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_bf16_hardware": sorted(cpu_flags() & {"avx512_bf16", "amx_bf16", "amx_tile", "bf16"}),
            "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "load_average": os.getloadavg()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_bytes=p.total_memory, cuda=torch.version.cuda,
                    capability=f"{p.major}.{p.minor}")
    return info


# Dense (no sparsity) tensor-core peaks in TFLOP/s from the vendors' data sheets, fp16/bf16 inputs with fp32
# accumulation (what torch's GEMMs use). First match of the device name wins, so the longer names come first;
# where the GPU is not listed the measured matmul rate stands in.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
                   "RTX 4090": 165.2, "RTX 3090": 71.0, "T4": 65.0}


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int = 2048, repeat: int = 5) -> float:
    """Measured throughput of a large square matmul: the practical peak this device reaches in `dtype`."""
    if device.type == "cuda":
        n = 8192
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = time_calls({"mm": lambda: a @ b}, device, warmup=1, repeat=repeat)["mm"]
    return 2 * n ** 3 / min(t.seconds) / 1e12


def peak_tflops(device: torch.device, dtype: torch.dtype) -> dict:
    """The throughput MFU divides by: the data-sheet number on a listed GPU; elsewhere a measured matmul
    (so on a CPU 'MFU' is the fraction of what a well-tiled matmul gets, not of a theoretical peak)."""
    measured = matmul_tflops(device, dtype)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name and dtype in (torch.float16, torch.bfloat16):
                return {"peak_tflops": tflops, "source": f"data sheet ({key}, dense fp16/bf16)",
                        "measured_matmul_tflops": measured}
    return {"peak_tflops": measured, "source": f"measured {dtype} matmul on this device",
            "measured_matmul_tflops": measured}
