"""More than one process: DemoFusion view-parallel over the ranks of a torch.distributed group, still exact.

Every step's local windows and dilated views are independent until they are fused, so one image can use many
GPUs without approximation. Every rank holds the same latents and draws the same random stream from the same
seed, so noise and window jitter need no communication. Each rank runs a share of a step's UNet calls — whole
calls, the very view batches one process would form — and one all_gather per step hands every rank all the
outputs as bytes, so the fusion that follows adds them in the single-process order. The exact tiled VAE
decode is split the same way: each rank decodes whole tile rows and holds only its rows of every feature map,
receiving the halo rows its convolutions read from their owners; the GroupNorm statistics are gathered per
tile and summed in tile order, as one process sums them.

Collectives move bytes: tensors of known shapes are packed into one uint8 buffer per rank, padded to the
largest, so the same code runs on gloo (CPU) and NCCL (one GPU per rank). A failure inside a rank's UNet calls
travels with the step's gather, so every rank stops together with one message; out of memory on any rank
halves the view batch on all of them. Anything else is bounded by the group's collective timeout.

Image parallelism (many images, many GPUs) needs none of this: `images_of_rank` splits a list of images.
"""
from __future__ import annotations

import math
import os
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from .decode import Box, TileShare, _Map, _rows
from .views import Group, ViewRunner, batches, is_out_of_memory
from .work import ScaleWork

DEFAULT_TIMEOUT_S = 1800  # the longest a rank waits for the others: above any gap between collectives (a 4096^2 PNG
# write on rank 0, a slow first load), far below "hung forever"
OK, OUT_OF_MEMORY, FAILED = 0, 1, 2

Spec = tuple[tuple[int, ...], torch.dtype]


class DistributedError(RuntimeError):
    """Another rank failed; the message says which and why."""


def default_group() -> dist.ProcessGroup | None:
    """The default process group when one with more than one rank is initialised, else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def launched() -> bool:
    """Whether this process was started by torchrun (or any launcher that sets the env:// variables)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init(device: str | None, timeout_s: float = DEFAULT_TIMEOUT_S) -> torch.device:
    """Initialise the default group from torchrun's environment: NCCL with one GPU per rank (LOCAL_RANK) on CUDA,
    gloo on the CPU. Returns this rank's device."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    elif dev.type != "cpu":
        raise ValueError(f"--device {device}: several processes run on CUDA (NCCL) or the CPU (gloo), not {dev.type}")
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s),
                            device_id=dev if dev.type == "cuda" else None)
    return dev


def rank(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_rank(group) if (group or default_group()) is not None else 0


def world(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_world_size(group) if (group or default_group()) is not None else 1


def images_of_rank(n: int, rank: int, world: int) -> list[int]:
    """Image parallel: which of n images this rank makes (round robin, no communication)."""
    return list(range(rank, n, world))


def _comm_device(group: dist.ProcessGroup, device: torch.device) -> torch.device:
    # NCCL moves GPU memory only; gloo moves host memory
    return device if dist.get_backend(group) == "nccl" else torch.device("cpu")


def _nbytes(specs: list[Spec]) -> int:
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in specs)


def all_gather_tensors(mine: list[torch.Tensor], specs: list[list[Spec]], group: dist.ProcessGroup,
                       device: torch.device) -> list[list[torch.Tensor]]:
    """Every rank's tensors, given the shapes and dtypes each rank contributes (specs[q] for rank q, known to
    all): one all_gather of byte buffers padded to the largest. The results live on `device`."""
    comm = _comm_device(group, device)
    buf = torch.zeros(max(1, max(_nbytes(s) for s in specs)), dtype=torch.uint8, device=comm)
    offset = 0
    for t in mine:
        b = t.detach().contiguous().reshape(-1).view(torch.uint8)
        buf[offset:offset + len(b)] = b
        offset += len(b)
    out = [torch.empty_like(buf) for _ in specs]
    dist.all_gather(out, buf, group=group)
    result = []
    for got, spec in zip(out, specs):
        tensors, offset = [], 0
        for shape, dtype in spec:
            n = math.prod(shape) * dtype.itemsize
            tensors.append(got[offset:offset + n].clone().view(dtype).reshape(shape).to(device))
            offset += n
        result.append(tensors)
    return result


def broadcast_tensors(tensors: list[torch.Tensor] | None, dtypes: list[torch.dtype], group: dist.ProcessGroup,
                      device: torch.device, src: int = 0) -> list[torch.Tensor]:
    """Rank src's tensors on every rank (others pass None): their shapes first, then their bytes."""
    comm = _comm_device(group, device)
    ndim = 4
    shapes = torch.zeros(len(dtypes), ndim, dtype=torch.int64, device=comm)
    if dist.get_rank(group) == src:
        for row, t in zip(shapes, tensors):
            row[:t.dim()] = torch.tensor(t.shape)
            row[t.dim():] = -1
    dist.broadcast(shapes, src=src, group=group)
    specs = [(tuple(int(v) for v in row if v >= 0), dtype) for row, dtype in zip(shapes.tolist(), dtypes)]
    buf = torch.zeros(max(1, _nbytes(specs)), dtype=torch.uint8, device=comm)
    if dist.get_rank(group) == src:
        offset = 0
        for t in tensors:
            b = t.detach().contiguous().reshape(-1).view(torch.uint8)
            buf[offset:offset + len(b)] = b
            offset += len(b)
    dist.broadcast(buf, src=src, group=group)
    out, offset = [], 0
    for shape, dtype in specs:
        n = math.prod(shape) * dtype.itemsize
        out.append(buf[offset:offset + n].clone().view(dtype).reshape(shape).to(device))
        offset += n
    return out


def broadcast_object(obj, group: dist.ProcessGroup, src: int = 0):
    """Rank src's picklable object on every rank (small things: the model's names and hashes)."""
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def assign(costs: list[float], world: int) -> list[int]:
    """The rank of each UNet call: the costliest first, each to the least loaded rank (ties: the lower rank,
    the earlier call), so every rank computes the same assignment."""
    load, owner = [0.0] * world, [0] * len(costs)
    for c in sorted(range(len(costs)), key=lambda c: (-costs[c], c)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[c] = r
        load[r] += costs[c]
    return owner


def view_batch(work: list[ScaleWork], world: int, most: int = 16) -> int:
    """The view batch that spreads a run's UNet calls best over `world` ranks, for when none is asked for: of
    16, 8, 4, 2, 1 (at most `most`) the largest whose busiest rank has at most 5 % more work, summed over the
    scales' steps (a call costing its views x latent pixels), than the best one's, as fuller calls use a GPU
    better. work: the run's work.describe (its view groups and steps; its own view batch does not matter). With
    16 a call a 2048^2 step has only 2 calls, so 16 GPUs would run it no faster than 2."""
    def busiest(batch: int) -> int:
        total = 0
        for scale in work:
            costs = [(b - a) * g.size[0] * g.size[1] for g in scale.groups for a, b in batches(g.count, batch)]
            owner = assign(costs, world)
            total += scale.steps * max(sum(c for c, o in zip(costs, owner) if o == r) for r in range(world))
        return total

    busy = {b: busiest(b) for b in (16, 8, 4, 2, 1) if b <= most}
    return max(b for b, w in busy.items() if w <= 1.05 * min(busy.values()))


class ViewParallel(ViewRunner):
    """A ViewRunner whose UNet calls are spread over the ranks of `group` (default: the default group)."""

    def __init__(self, *args, group: dist.ProcessGroup | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.group = group or default_group()
        self.rank, self.world = dist.get_rank(self.group), dist.get_world_size(self.group)

    def __call__(self, groups: list[Group], t: float, step: int, scale: int, steps: int | None = None
                 ) -> list[torch.Tensor]:
        while True:
            calls = [(g, a, b) for g, (x, _) in enumerate(groups) for a, b in batches(len(x), self.batch)]
            owner = assign([(b - a) * groups[g][0].shape[-2] * groups[g][0].shape[-1] for g, a, b in calls], self.world)
            status, error, mine = OK, None, []
            for c, (g, a, b) in enumerate(calls):
                if owner[c] != self.rank:
                    continue
                x, views = groups[g]
                if status == OK:
                    try:
                        mine.append(self.call(x[a:b], views[a:b], t, step, scale, steps))
                        continue
                    except Exception as err:  # told to every rank through the gather, then raised here
                        status, error = (OUT_OF_MEMORY if is_out_of_memory(err) else FAILED), err
                mine.append(torch.zeros(b - a, *x.shape[1:]))
            specs = [[((1,), torch.uint8)] + [((b - a, *groups[g][0].shape[1:]), torch.float32)
                                              for c, (g, a, b) in enumerate(calls) if owner[c] == q]
                     for q in range(self.world)]
            got = all_gather_tensors([torch.tensor([status], dtype=torch.uint8), *mine], specs, self.group,
                                     self.device)
            statuses = [int(g[0]) for g in got]
            if all(s == OK for s in statuses):
                break
            self._stop_or_halve(statuses, error)
        taken = [1] * self.world  # each rank's next output (index 0 is its status)
        outs: list[list[torch.Tensor]] = [[] for _ in groups]
        for c, (g, a, b) in enumerate(calls):
            outs[g].append(got[owner[c]][taken[owner[c]]])
            taken[owner[c]] += 1
            self.evals, self.calls = self.evals + self.halves * (b - a), self.calls + 1
        return [torch.cat(o) for o in outs]

    def _stop_or_halve(self, statuses: list[int], error: BaseException | None) -> None:
        """After a step some rank could not finish: every rank raises (a failure, or out of memory at one view
        per call) or halves the view batch and redoes the step (out of memory)."""
        if FAILED in statuses:
            messages = [None] * self.world
            dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}",
                                   group=self.group)
            if error is not None and statuses[self.rank] == FAILED:
                raise error
            r = statuses.index(FAILED)
            raise DistributedError(f"rank {r} failed in a UNet call: {messages[r]}")
        if self.batch == 1:
            if error is not None:
                raise error
            raise torch.OutOfMemoryError(f"rank {statuses.index(OUT_OF_MEMORY)} ran out of memory even with one "
                                         "view per UNet call")
        self.halve(self.batch)


def _hull(held: tuple[int, int], need: tuple[int, int]) -> tuple[int, int]:
    if need[1] <= need[0]:
        return held
    if held[1] <= held[0]:
        return need
    return min(held[0], need[0]), max(held[1], need[1])


def split_rows(tiles: list[Box], world: int) -> list[list[Box]]:
    """Each rank's tiles: whole tile rows, contiguous in tile order, as even in number as they divide."""
    rows = sorted({(y0, y1) for y0, y1, _, _ in tiles})
    n = len(rows)
    parts = [set(rows[r * n // world:(r + 1) * n // world]) for r in range(world)]
    return [[box for box in tiles if box[:2] in part] for part in parts]


class GroupShare(TileShare):
    """decode.Alone's counterpart for a group: each rank decodes whole tile rows (contiguous in tile order) and
    holds only its rows of every feature map (decode.py's `_Map` bands)."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device):
        self.group, self.device = group, device
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)

    def split(self, tiles: list[Box]) -> list[list[Box]]:
        return split_rows(tiles, self.world)

    def band(self, data: torch.Tensor, shares: list[list[Box]], height: int) -> _Map:
        spans = [_rows(s) for s in shares]
        return _Map(data, top=spans[self.rank][0], height=height, spans=spans)

    def fetch(self, x: _Map, needs: list[tuple[int, int]]) -> _Map:
        """x with rows needs[rank] held here too (the halos of this rank's tiles), taken from their owners."""
        B, C, H, W = x.shape
        held = x.spans or [(0, H)] * self.world  # no spans: a map every rank holds whole (the latents)
        want = [_hull(h, n) for h, n in zip(held, needs)]
        transfers = []  # (from, to, first row, end row)
        for q, ((w0, w1), (h0, h1)) in enumerate(zip(want, held)):
            for a, b in ((w0, min(w1, h0)), (max(w0, h1), w1)) if h1 > h0 else ((w0, w1),):
                for p, (p0, p1) in enumerate(held):
                    if p != q and max(a, p0) < min(b, p1):
                        transfers.append((p, q, max(a, p0), min(b, p1)))
        if not transfers:
            return x
        specs = [[((B, C, b - a, W), x.data.dtype) for p_, _, a, b in transfers if p_ == p] for p in range(self.world)]
        got = all_gather_tensors([x.rows(a, b) for p, _, a, b in transfers if p == self.rank], specs, self.group,
                                 self.device)
        w0, w1 = want[self.rank]
        data = torch.empty(B, C, w1 - w0, W, dtype=x.data.dtype, device=x.data.device)
        h0, h1 = max(held[self.rank][0], w0), min(held[self.rank][1], w1)
        if h1 > h0:
            data[:, :, h0 - w0:h1 - w0] = x.rows(h0, h1)
        taken = [0] * self.world
        for p, q, a, b in transfers:
            if q == self.rank:
                data[:, :, a - w0:b - w0] = got[p][taken[p]].to(data.device)
            taken[p] += 1
        return _Map(data, x.moments, top=w0, height=H, spans=want)

    def moments(self, mine: list[torch.Tensor], shares: list[list[Box]], shape: tuple[int, ...]) -> torch.Tensor:
        got = all_gather_tensors(mine, [[(shape, torch.float64)] * len(s) for s in shares], self.group, self.device)
        total = 0  # tile by tile in tile order, as one process sums them
        for tensors in got:
            for m in tensors:
                total = total + m
        return total

    def each(self, tiles: list[Box], shares: list[list[Box]], compute: Callable, store: Callable,
             step: Callable[[], None], shapes: Callable[[Box], list[Spec]]) -> None:
        mine = []
        for box in shares[self.rank]:
            mine.extend(compute(box))
            step()
        got = all_gather_tensors(mine, [[sp for box in s for sp in shapes(box)] for s in shares], self.group,
                                 self.device)
        i = 0
        for share, tensors in zip(shares, got):
            k = 0
            for box in share:
                n = len(shapes(box))
                store(i, *tensors[k:k + n])
                i, k = i + 1, k + n

    def whole(self, x: _Map) -> torch.Tensor:
        """The whole map on every rank, from each rank's band."""
        if x.spans is None:
            return x.data
        B, C, H, W = x.shape
        got = all_gather_tensors([x.data], [[((B, C, b - a, W), x.data.dtype)] for a, b in x.spans], self.group,
                                 self.device)
        return torch.cat([g[0].to(x.data.device) for g in got], dim=2)


def view_runner(group: dist.ProcessGroup) -> Callable[..., ViewRunner]:
    """The runner factory `demofusion(runner=...)` takes, for view parallelism over `group`."""
    def make(*args, **kwargs) -> ViewRunner:
        return ViewParallel(*args, group=group, **kwargs)
    return make

