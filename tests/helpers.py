"""What several test files share: the reference SDXL UNet config, the check of a one-line loading error and the
files users load beside the tiny checkpoint."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from minifusion.checkpoint import single_file_tables
from minifusion.keyops import to_source
from minifusion.models.controlnet import ControlNet, ControlNetConfig, diffusers_keys
from minifusion.safetensors_check import CheckpointError
from minifusion.tiny import TINY, random_models, randomize

SDXL_BASE = dict(  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=[320, 640, 1280], attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, flip_sin_to_cos=True, freq_shift=0,
    norm_num_groups=32, norm_eps=1e-5, act_fn="silu", upcast_attention=False,
)


def refused(inspect, path, *fragments) -> str:
    """inspect(path) raises a CheckpointError of one line naming the file and holding every fragment."""
    with pytest.raises(CheckpointError) as e:
        inspect(path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def write_adapters(lora: Path, vae: Path, embedding: Path, controlnet: Path, picture: Path) -> None:
    """For minifusion.tiny.TINY: a kohya LoRA on one attention projection, another random VAE (the original keys),
    an embedding, a ControlNet (a diffusers folder) and a white square on black for it to follow."""
    g = torch.Generator().manual_seed(11)
    # lora_unet_ + the module path with "_" for "." (kohya's naming of our SDXL module names)
    save_file({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.randn(4, 64, generator=g),
               "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.randn(64, 4, generator=g),
               "lora_unet_input_blocks_4_1_proj_in.alpha": torch.tensor(4.0)}, str(lora))
    models = random_models(TINY, seed=5)
    state = to_source(models["vae"].state_dict(), single_file_tables(TINY, models)["vae"])
    save_file({k[len("first_stage_model."):]: v for k, v in state.items()}, str(vae))
    save_file({"clip_l": torch.randn(2, 64, generator=g), "clip_g": torch.randn(2, 128, generator=g)},
              str(embedding))
    cfg = ControlNetConfig(TINY.unet, (False, True, True), hint_channels=(4, 8, 8, 16))
    net = randomize(ControlNet(cfg), torch.Generator().manual_seed(6))
    controlnet.mkdir()
    (controlnet / "config.json").write_text(json.dumps(cfg.to_diffusers_config()))
    save_file(to_source(net.state_dict(), diffusers_keys(cfg)), str(controlnet / "diffusion_pytorch_model.safetensors"))
    square = np.zeros((256, 256, 3), dtype=np.uint8)
    square[64:192, 64:192] = 255
    Image.fromarray(square).save(picture)
