"""What several test files share: the reference SDXL UNet config and the check of a one-line loading error."""
import pytest

from minifusion.safetensors_check import CheckpointError

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
