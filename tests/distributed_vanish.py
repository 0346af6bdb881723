"""Run by tests/test_distributed.py as two plain processes (no torchrun to clean up after them): rank 1 dies in
the middle of a step; rank 0 must fail soon after with a clear error instead of waiting forever.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/distributed_vanish.py WEIGHTS OUT
"""
import json
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from minifusion import load


def main(weights: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=20))
    pipe = load(weights, device="cpu", dtype=torch.float32, text_encoders=dist.get_rank() == 0)
    unet, calls = pipe.unet, []

    def dying(*args, **kwargs):
        calls.append(1)
        if dist.get_rank() == 1 and len(calls) == 3:
            os._exit(3)  # as a killed or crashed process: no goodbye to the others
        return unet(*args, **kwargs)

    pipe.unet = dying
    start = time.perf_counter()
    try:
        pipe.generate("a fox", height=512, width=512, num_inference_steps=2, view_batch_size=2)
        outcome = "finished"
    except Exception as e:
        outcome = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    with open(out, "w") as f:
        json.dump({"outcome": outcome, "seconds": time.perf_counter() - start}, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
