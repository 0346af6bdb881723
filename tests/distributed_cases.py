"""Run by tests/test_distributed.py under torchrun (gloo, one thread per rank): the same work as one process,
view-parallel over the ranks. Rank 0 saves what every rank got, for the test to compare with one process.

    python -m torch.distributed.run --nproc-per-node N tests/distributed_cases.py WEIGHTS OUT
"""
import sys
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from minifusion import distributed, load
from minifusion.decode import decode_tiled
from minifusion.encode import encode_tiled

CASES = dict(
    # 3 scales, non-square, views batched 3 at a time: several calls per step, not divisible by the ranks
    text=dict(prompt="a red fox", height=768, width=384, num_inference_steps=2, seed=3, view_batch_size=3),
    euler=dict(prompt="a cat", negative_prompt="blurry", height=512, width=512, num_inference_steps=2, seed=1,
               scheduler="euler", stride=12, view_batch_size=4),
    # one UNet row a view (CFG off) and one noise tensor a step for the whole canvas, drawn alike on every rank
    cfg_off=dict(prompt="a fox", height=512, width=256, num_inference_steps=3, seed=4, guidance_scale=1.0,
                 sampler="dpmpp_2m_sde", view_batch_size=2),
)
# batches of 3 and 4 views at scale 2 (3 windows, 4 dilated views): rank 0 runs out of memory above 1 view a call
OOM = dict(prompt="a cat", height=512, width=256, num_inference_steps=2, seed=1, view_batch_size=4)


def main(weights: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    pipe = load(weights, device="cpu", dtype=torch.float32)
    got = {}
    for name, kw in CASES.items():
        result = pipe.generate(**kw)
        got[name] = {"latents": result.latents, "pixels": [np.asarray(im) for im in result.images],
                     "evals": [s["unet_evaluations"] for s in result.stats]}
    g = torch.Generator().manual_seed(5)
    latents = torch.randn(1, 4, 40, 24, generator=g)
    share = distributed.GroupShare(dist.group.WORLD, torch.device("cpu"))
    got["decode"] = decode_tiled(pipe.vae, latents, tile=64, share=share)
    got["encode"] = encode_tiled(pipe.vae, torch.rand(1, 3, 200, 136, generator=g) * 2 - 1, tile=64, share=share)
    # no view batch asked: the ranks choose one that spreads the calls (distributed.view_batch) and say which
    img2img = pipe.generate("a fox", image=pipe.decode(latents), num_inference_steps=2, seed=2)
    got["img2img"], got["img2img_batch"] = img2img.latents, img2img.stats[-1]["view_batch_size"]

    # a UNet call failing on the last rank: every rank stops with the same error, none hangs
    unet = pipe.unet
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if rank == dist.get_world_size() - 1 and len(calls) == 2:
            raise ValueError("injected failure")
        return unet(*args, **kwargs)

    pipe.unet = failing
    try:
        pipe.generate("a fox", height=512, width=512, num_inference_steps=2, view_batch_size=2)
        got["failure"] = "no error"
    except Exception as e:
        got["failure"] = f"{type(e).__name__}: {e}"

    # out of memory on one rank for batches of more than one view: all ranks halve and redo the step
    def small_memory(x, *args, **kwargs):
        if rank == 0 and x.shape[0] > 2:
            raise torch.OutOfMemoryError("injected: out of memory")
        return unet(x, *args, **kwargs)

    pipe.unet = small_memory
    got["oom"] = pipe.generate(**OOM).latents
    pipe.unet = unet

    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, got)
    if rank == 0:
        torch.save(everyone, out)
    dist.barrier()  # no rank leaves while another is inside the last collective (gloo aborts it then)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
