"""What several test files share: the reference SDXL UNet config, the check of a one-line loading error, the
files users load beside the tiny checkpoint and the web UI started in a subprocess."""
import io
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
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


def wait_for(condition, timeout: float, what: str, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(weights: Path, work: Path, log: Path, env: dict, *flags: str) -> tuple[subprocess.Popen, str]:
    """`python -m minifusion.ui` on the tiny checkpoint `weights`, on a free port of 127.0.0.1, run in `work`,
    its console in `log`; (the process, its URL). serving() waits for it."""
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "minifusion.ui", "--weights", str(weights), "--port", str(port),
                                 "--device", "cpu", "--dtype", "float32", *flags], cwd=work, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}/"


def serving(proc: subprocess.Popen, url: str, log: Path, timeout: float = 90) -> None:
    def answers():
        if proc.poll() is not None:
            raise AssertionError(f"the app exited ({proc.returncode}):\n{log.read_text()}")
        try:
            return urllib.request.urlopen(url, timeout=2).status == 200
        except urllib.error.HTTPError:  # a login it asks for is an answer
            return True
        except OSError:
            return False

    wait_for(answers, timeout, "the app to serve")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def uploaded(folder: Path, name: str, picture: Image.Image | bytes, **save) -> str:
    """A file as Gradio's upload route leaves it: in a folder of its own inside the upload folder."""
    path = folder / f"{abs(hash(name)):x}" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(picture, bytes):
        path.write_bytes(picture)
    else:
        picture.save(path, **save)
    return str(path)


def jpeg_header(width: int, height: int) -> bytes:
    """A tiny JPEG whose header claims width x height: a decompression bomb as it looks from outside (the issue's
    was 631 bytes for 9400 x 9400)."""
    buf = io.BytesIO()
    Image.new("L", (16, 16)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)
