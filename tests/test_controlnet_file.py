"""Loading a ControlNet (minifusion.controlnet_file): the diffusers folder diffusers itself writes, its single file
alone, the original cldm layout (checked against diffusers' own cldm -> diffusers converter), -mid/-small
variants, and the strict, named refusals of everything else."""
import json
import shutil

import pytest
import torch
from diffusers import ControlNetModel
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, convert_controlnet_checkpoint
from safetensors.torch import load_file, save_file

from minifusion.config import UNetConfig
from minifusion.controlnet_file import inspect_controlnet, load_controlnet
from minifusion.keyops import convert_state_dict
from minifusion.models.controlnet import ControlNetConfig, diffusers_keys
from minifusion.safetensors_check import CheckpointError
from minifusion.tiny import randomize
from helpers import refused as one_line_error

POOLED, CTX = 40, 64
UNET = UNetConfig(model_channels=32, transformer_depth=(0, 2, 2), transformer_depth_middle=2, context_dim=CTX,
                  adm_in_channels=POOLED + 48, addition_time_embed_dim=8, sample_size=32)
DIFFUSERS = dict(  # a "-mid"-like SDXL ControlNet at toy width: level 2's attention has no transformer blocks
    in_channels=4, layers_per_block=2, block_out_channels=[32, 64, 128], attention_head_dim=[1, 1, 2],
    transformer_layers_per_block=[1, 0, 2], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D",
                                                               "CrossAttnDownBlock2D"],
    cross_attention_dim=CTX, use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=POOLED + 48, norm_num_groups=32)
EXPECTED = ControlNetConfig(UNetConfig(**{**UNET.__dict__, "transformer_depth": (0, 0, 2)}), (False, True, True))


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: thread start-up would dominate


def make(seed=0, **overrides):
    theirs = ControlNetModel(**{**DIFFUSERS, **overrides}).eval()
    return randomize(theirs, torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def theirs():
    return make()


@pytest.fixture(scope="module")
def folder(theirs, tmp_path_factory):
    path = tmp_path_factory.mktemp("cn") / "controlnet-canny-tiny"
    theirs.save_pretrained(path, safe_serialization=True)
    return path


def outputs(net, diffusers_model=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, ctx, pooled = torch.randn(2, 4, 11, 14, generator=g), torch.randn(2, 77, CTX, generator=g), \
        torch.randn(2, POOLED, generator=g)
    t, ids = torch.tensor([900.0, 20.0]), torch.tensor([[512.0, 512, 0, 0, 512, 512], [256, 768, 8, 16, 256, 768]])
    cond = torch.rand(2, 3, 88, 112, generator=g)
    with torch.no_grad():
        if diffusers_model:
            down, mid = net(x, t, ctx, cond, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids},
                            return_dict=False)
        else:
            down, mid = net(x, t, ctx, pooled, ids, cond)
    return [*down, mid]


def assert_same(ours, theirs):
    got, ref = outputs(ours), outputs(theirs, diffusers_model=True)
    assert max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, ref)) <= 1e-5


def load(path, dtype=torch.float32):
    return load_controlnet(inspect_controlnet(path, UNET), torch.device("cpu"), dtype)


def test_diffusers_folder(folder, theirs):
    assert inspect_controlnet(folder, UNET).config == EXPECTED
    assert_same(load(folder), theirs)


def test_diffusers_single_file_infers_the_config(folder, theirs, tmp_path):
    single = tmp_path / "diffusers_xl_canny_mid.safetensors"
    shutil.copy(folder / "diffusion_pytorch_model.safetensors", single)
    assert inspect_controlnet(single, UNET).config == EXPECTED
    assert_same(load(single), theirs)


def test_fp16_variant_folder(theirs, tmp_path):
    half = make().half()
    half.save_pretrained(tmp_path / "fp16", safe_serialization=True, variant="fp16")
    assert (tmp_path / "fp16" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    net = load(tmp_path / "fp16", torch.float16)
    assert net.zero_convs[3][0].weight.dtype == torch.float16
    assert torch.equal(net.zero_convs[3][0].weight, half.controlnet_down_blocks[3].weight)


def cldm_state(theirs, cfg=EXPECTED):
    """Our state dict, whose names are the original cldm checkpoints', of a diffusers model's weights."""
    return {k: v.contiguous() for k, v in convert_state_dict(theirs.state_dict(), diffusers_keys(cfg)).items()}


def test_cldm_names_are_what_diffusers_converts_from(theirs):
    """diffusers' converter of original ControlNet checkpoints takes our names to exactly its own state dict (it
    knows SD 1.x's: SDXL's text_time embedding is mapped with its own table, which the converter leaves out;
    it hard-codes the default condition embedding, which this model has)."""
    ours = cldm_state(theirs)
    converted = convert_controlnet_checkpoint(ours, dict(theirs.config))
    for diffusers_key, ldm_key in DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"].items():
        converted[diffusers_key] = ours[ldm_key]
    ref = theirs.state_dict()
    assert converted.keys() == ref.keys()
    assert all(torch.equal(converted[k], ref[k]) for k in ref)


@pytest.mark.parametrize("prefix", ["", "control_model."])
def test_cldm_single_file(theirs, tmp_path, prefix):
    path = tmp_path / "cldm.safetensors"
    save_file({prefix + k: v for k, v in cldm_state(theirs).items()}, str(path))
    assert inspect_controlnet(path, UNET).config == EXPECTED
    assert_same(load(path), theirs)


@pytest.mark.parametrize("layout", ["diffusers", "cldm"])
def test_small_variant_and_other_condition_widths(tmp_path, layout):
    """-small: attention modules without transformer blocks at every level and in the middle; a condition
    embedding of other widths than the default."""
    theirs = make(seed=3, transformer_layers_per_block=[0, 0, 0], conditioning_embedding_out_channels=(8, 16, 24, 40),
                  down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"])
    folder = tmp_path / "small"
    theirs.save_pretrained(folder, safe_serialization=True)
    expected = ControlNetConfig(UNetConfig(**{**UNET.__dict__, "transformer_depth": (0, 0, 0),
                                              "transformer_depth_middle": 0}), (False, True, True), (8, 16, 24, 40))
    assert inspect_controlnet(folder, UNET).config == expected
    if layout == "diffusers":
        path = folder / "diffusion_pytorch_model.safetensors"
    else:
        path = tmp_path / "small_cldm.safetensors"
        save_file(cldm_state(theirs, expected), str(path))
    assert inspect_controlnet(path, UNET).config == expected
    assert_same(load(path), theirs)


# ---- refusals ----

def refused(path, *fragments, unet=UNET):
    return one_line_error(lambda p: inspect_controlnet(p, unet), path, *fragments)


def test_every_bad_tensor_in_one_error(folder, tmp_path):
    state = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    del state["controlnet_down_blocks.4.bias"]
    state["controlnet_mid_block.weight"] = torch.zeros(128, 128, 3, 3)
    state["controlnet_extra.weight"] = torch.zeros(1)
    state["time_embedding.linear_1.bias"] = torch.zeros(128, dtype=torch.int32)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    refused(path, "1 missing: controlnet_down_blocks.4.bias", "1 unexpected: controlnet_extra.weight",
            "1 misshapen: controlnet_mid_block.weight", "1 not floating point: time_embedding.linear_1.bias")


@pytest.mark.parametrize("suffix", [".bin", ".pth", ".ckpt", ".pt"])
def test_pickles_are_refused_unopened(tmp_path, suffix):
    path = tmp_path / f"control_sd15_canny{suffix}"
    path.write_bytes(b"\x80\x04not really a pickle")
    refused(path, "pickle")


@pytest.mark.parametrize("keys, name", [
    (["lora_controlnet", "input_blocks.1.0.in_layers.2.up", "input_hint_block.0.weight"], "a Control-LoRA"),
    (["lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.conditioning1.0.weight"], "ControlNet-LLLite"),
    (["adapter.conv_in.weight", "adapter.body.0.resnets.0.block1.weight"], "a T2I-Adapter"),
    (["body.0.block1.weight", "conv_in.weight"], "a T2I-Adapter"),
    (["task_embedding", "transformer_layes.0.attn.in_proj_weight", "controlnet_cond_embedding.conv_in.weight"],
     "a ControlNet-Union"),
    (["control_model.task_embedding", "control_model.input_hint_block.0.weight"], "a ControlNet-Union"),
    (["ctrl_conv_in.weight", "down_blocks.0.base_to_ctrl.0.weight"], "a ControlNet-XS"),
    (["input_hint_block.0.weight", "input_blocks.0.0.weight", "time_embed.0.weight"], "Stable Diffusion 1.x / 2.x"),
    (["encoder.conv_in.weight", "decoder.conv_out.weight"], "this is a VAE on its own;"),
    (["down_blocks.0.resnets.0.conv1.weight", "conv_in.weight"], "this is the UNet file of a diffusers-layout folder;"),
    (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], "a LoRA"),
    (["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.decoder.conv_in.weight"],
     "not a ControlNet"),
])
def test_other_families_are_named(tmp_path, keys, name):
    path = tmp_path / "other.safetensors"
    save_file({k: torch.zeros(1) for k in keys}, str(path))
    refused(path, name)


def test_a_controlnet_for_another_unet(folder, tmp_path):
    wide = UNetConfig(**{**UNET.__dict__, "model_channels": 64})
    refused(folder, "for a UNet with channels (32, 64, 128)", "has (64, 128, 256)", unet=wide)
    other_text = UNetConfig(**{**UNET.__dict__, "context_dim": 2048})
    single = tmp_path / "one.safetensors"
    shutil.copy(folder / "diffusion_pytorch_model.safetensors", single)
    refused(single, "context_dim 64", unet=other_text)


@pytest.mark.parametrize("change, fragment", [
    ({"use_linear_projection": False}, "use_linear_projection = False"),
    ({"_class_name": "ControlNetUnionModel"}, "a ControlNet-Union"),
    ({"_class_name": "T2IAdapter"}, "a T2I-Adapter"),
    ({"addition_embed_type": None}, "Stable Diffusion 1.x / 2.x"),
    ({"mid_block_type": "UNetMidBlock2D"}, "mid_block_type"),
    ({"conditioning_channels": 4}, "4-channel conditions"),
    ({"controlnet_conditioning_channel_order": "rgba"}, "controlnet_conditioning_channel_order"),
    ({"attention_head_dim": [1, 2, 4]}, "not 64 wide"),
    ({"transformer_layers_per_block": [1, 0, 10 ** 9]}, "not a plausible"),
    ({"block_out_channels": [32, 64]}, "down_block_types"),
])
def test_bad_configs_are_refused(folder, tmp_path, change, fragment):
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    config = json.loads((folder / "config.json").read_text()) | change
    (bad / "config.json").write_text(json.dumps(config))
    refused(bad, fragment)


def test_forged_block_index_is_refused_quickly(theirs, tmp_path):
    state = cldm_state(theirs)
    state["input_blocks.4.1.transformer_blocks.100000.attn1.to_q.weight"] = torch.zeros(1)
    path = tmp_path / "forged.safetensors"
    save_file(state, str(path))
    refused(path, "not an SDXL ControlNet")


def test_nothing_loadable(tmp_path):
    refused(tmp_path / "missing", "no such file")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "no ControlNet here")
    for name in ("a.safetensors", "b.safetensors"):
        save_file({"x": torch.zeros(1)}, str(tmp_path / "empty" / name))
    refused(tmp_path / "empty", "several .safetensors files")


def test_pipeline_refuses_a_bad_controlnet_before_reading_weights(tiny_file, tmp_path, monkeypatch):
    import minifusion.pipeline as pl
    monkeypatch.setattr(pl, "load_components", lambda *a, **k: pytest.fail("read the checkpoint's weights"))
    path = tmp_path / "t2i.safetensors"
    save_file({"adapter.body.0.resnets.0.block1.weight": torch.zeros(1)}, str(path))
    with pytest.raises(CheckpointError, match="T2I-Adapter"):
        pl.load(tiny_file, device="cpu", dtype=torch.float32, controlnet=path)
