"""Counting what a run allocates, on the meta device.

Every number of the memory model comes from running the code, not from formulas: `MemoryTracker` (a
TorchDispatchMode) adds up the bytes of every tensor storage created inside it and subtracts them when the
storage dies, so its peak is the peak of live tensor bytes, what torch.cuda.max_memory_allocated reports on a
GPU. The runs happen on the meta device, which costs no memory at any size: the allocation sequence is the same
as on the CPU once attention takes the CPU's fused kernel there too (on meta, scaled_dot_product_attention would
fall back to the math path and materialise every score, which no real device does). tests/test_memory.py
checks meta against a real CPU run, and bench/ against resident-set growth.
"""
from __future__ import annotations

import weakref
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

HOST_MAPS = torch.ops.aten.empty.memory_format  # torch.empty: decode.py's full-map buffers, on the host
MAP_BUFFERS = torch.ops.aten.empty_strided.default  # torch.empty_strided: its map-wide device buffers (keys, values)


class MemoryTracker(TorchDispatchMode):
    """Live and peak bytes of the tensor storages created while active. An output the op's schema marks as an
    alias of an input (a view, an in-place or out= result) adds nothing. Storages created by `host_ops` (e.g.
    torch.empty, which decode.py uses only for its full-map buffers) are counted apart, as host bytes."""

    def __init__(self, host_ops=()):
        super().__init__()
        self.host_ops = set(host_ops)
        self.live = self.peak = self.live_host = self.peak_host = self.peak_total = 0
        self._seen: dict[int, int] = {}  # storage id -> bytes

    def _free(self, key: int, nbytes: int, host: bool) -> None:
        self._seen.pop(key, None)
        if host:
            self.live_host -= nbytes
        else:
            self.live -= nbytes

    def _created(self, key: int, func, tensor: torch.Tensor) -> None:
        """Told of every storage that starts being counted (subclasses tag them)."""

    def _after(self, func, out) -> None:
        """Told after every op, once the live counts include its outputs."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        host = func in self.host_ops
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for ret, value in zip(func._schema.returns, outs):
            if ret.alias_info is not None:  # a view of an input or the input itself (in-place, out=)
                continue
            for t in (value if isinstance(value, (tuple, list)) else (value,)):
                if not isinstance(t, torch.Tensor):
                    continue
                st = t.untyped_storage()
                key = id(st)
                if key in self._seen:
                    continue
                n = st.nbytes()
                self._seen[key] = n
                if host:
                    self.live_host += n
                else:
                    self.live += n
                weakref.finalize(st, self._free, key, n, host)
                self._created(key, func, t)
        self.peak, self.peak_host = max(self.peak, self.live), max(self.peak_host, self.live_host)
        self.peak_total = max(self.peak_total, self.live + self.live_host)
        self._after(func, out)
        return out


class CPUAttentionOnMeta(TorchFunctionMode):
    """On meta tensors, run attention as the CPU's fused flash kernel (its meta function gives the output and
    log-sum-exp shapes), so a meta run allocates what a CPU run allocates."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and args[0].is_meta:
            q, k, v = args[:3]
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, 0.0, kwargs.get("is_causal", False), attn_mask=kwargs.get("attn_mask"),
                scale=kwargs.get("scale"))[0]
        return func(*args, **kwargs)


class _StageTracker(MemoryTracker):
    """MemoryTracker that splits a decode_tiled run into its stages (`begin`, told by decoding.StageProbe) and
    notes, at each stage's peak, the live bytes of the stage's map-wide device buffers (MAP_BUFFERS)."""

    def __init__(self):
        super().__init__(host_ops={HOST_MAPS})
        self.stages: list[dict] = []
        self._maps: dict[int, int] = {}  # storage id -> the stage that allocated it as a map-wide buffer

    def begin(self, tiles: int) -> dict:
        self.stages.append({"tiles": tiles, "peak": self.live, "map": 0, "allocated": False, "entry": 0})
        return self.stages[-1]

    def _created(self, key, func, tensor):
        if self.stages and func is not HOST_MAPS:
            self.stages[-1]["allocated"] = True
            if func is MAP_BUFFERS:
                self._maps[key] = len(self.stages)

    def _after(self, func, out):
        if self.stages and self.live > self.stages[-1]["peak"]:
            here = len(self.stages)
            self.stages[-1].update(peak=self.live,
                                   map=sum(n for key, n in self._seen.items() if self._maps.get(key) == here))


@lru_cache(maxsize=16)
def _meta(network: type, cfg, dtype: torch.dtype) -> torch.nn.Module:
    """A network (UNet, ControlNet, VAE) of config cfg on the meta device in dtype: no memory, every shape."""
    with torch.device("meta"):
        return network(cfg).to(dtype).eval().requires_grad_(False)


def _call_peak(device: torch.device, call) -> int:
    """Peak bytes `call()` allocates beyond what is live before it: on CUDA by the allocator, elsewhere (the
    meta device included) by MemoryTracker."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        call()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with CPUAttentionOnMeta(), MemoryTracker() as tracker:
        call()
    return tracker.peak
