"""Run by tests/test_controlnet_distributed.py under torchrun (gloo, one thread per rank): ControlNet-steered runs,
view-parallel over the ranks. Rank 0 saves what every rank got, for the test to compare with one process.

    python -m torch.distributed.run --nproc-per-node N tests/controlnet_distributed_case.py WEIGHTS CONTROLNET OUT
"""
import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


def control_image() -> torch.Tensor:
    return torch.rand(1, 3, 64, 256, generator=torch.Generator().manual_seed(7))


# windows and dilated views batched 2 at a time: several calls per step, spread over the ranks
CASES = dict(
    control=dict(prompt="a red fox", height=136, width=512, num_inference_steps=2, seed=3, view_batch_size=2,
                 controlnet_conditioning_scale=0.7, control_guidance_end=0.5),
    guess=dict(prompt="a cat", height=136, width=512, num_inference_steps=2, seed=1, view_batch_size=2,
               guess_mode=True),
)


def write_controlnet(folder: Path, seed: int = 6) -> Path:
    """A tiny random ControlNet for minifusion.tiny's model, as a diffusers folder; its zero convs are not zero."""
    from safetensors.torch import save_file

    from minifusion.keyops import to_source
    from minifusion.models.controlnet import ControlNet, ControlNetConfig, diffusers_keys
    from minifusion.tiny import TINY, randomize
    cfg = ControlNetConfig(TINY.unet, (False, True, True), hint_channels=(4, 8, 8, 16))
    net = randomize(ControlNet(cfg), torch.Generator().manual_seed(seed))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg.to_diffusers_config()))
    save_file(to_source(net.state_dict(), diffusers_keys(cfg)), str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


def run(pipe) -> dict:
    return {name: pipe.generate(control_image=control_image(), **kw).latents for name, kw in CASES.items()}


def main(weights: str, controlnet: str, out: str) -> None:
    from minifusion import load
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    got = run(load(weights, device="cpu", dtype=torch.float32, controlnet=controlnet))
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, got)
    if dist.get_rank() == 0:
        torch.save(everyone, out)
    dist.barrier()  # no rank leaves while another is inside the last collective (gloo aborts it then)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
