"""A VAE from its own file (minifusion.vae_file): every accepted layout of one tiny random VAE loads to the network
diffusers' AutoencoderKL loads from the same file (encode and decode within 1e-5 of the output scale); the
pipeline decodes with the swapped VAE and its scaling factor, without reading the checkpoint's VAE; the fp16-fix
VAE is told from the stock one; an SD 1.x VAE is named; every bad file is one error naming it."""
import hashlib
import json
import logging

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import load_file, save_file

from minifusion import checkpoint, load, vae_file
from minifusion.config import SDXL_VAE, VAEConfig
from minifusion.keyops import to_source
from minifusion.models.vae import VAE, diffusers_keys
from minifusion.pipeline import to_pil
from minifusion.safetensors_check import CheckpointError, SafetensorsFile
from minifusion.tiny import TINY, randomize
from minifusion.vae_file import inspect_vae, load_vae, vae_dtype_for
from helpers import refused as one_line_error

CFG = TINY.vae  # four levels of distinct widths: a reversed or shifted block order cannot load
SDXL_SCALING, SD1_SCALING = 0.13025, 0.18215


def random_vae(cfg: VAEConfig = CFG, seed: int = 7) -> dict[str, torch.Tensor]:
    """Our state dict of a random VAE; seed 7 differs from the tiny checkpoint's VAE."""
    return randomize(VAE(cfg), torch.Generator().manual_seed(seed)).state_dict()


@pytest.fixture(scope="module")
def weights():
    return random_vae()


def config(cfg: VAEConfig = CFG, **extra) -> dict:
    return {**cfg.to_diffusers_config(), **extra}


def write_ldm(path, state, prefix="", metadata=None, extra=None):
    tensors = {prefix + k: v.contiguous() for k, v in state.items()} | (extra or {})
    save_file(tensors, str(path), metadata=metadata)
    return path


def write_diffusers_file(path, state, cfg=CFG):
    save_file(to_source(state, diffusers_keys(cfg)), str(path))
    return path


def write_folder(folder, state, cfg_json, variant=None, dtype=torch.float32, rename=None, shards=1):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg_json))
    tensors = {k: v.to(dtype) for k, v in to_source(state, diffusers_keys(CFG)).items()}
    tensors = {(rename(k) if rename else k): v for k, v in tensors.items()}
    stem = "diffusion_pytorch_model" + (f".{variant}" if variant else "")
    if shards == 1:
        save_file(tensors, str(folder / f"{stem}.safetensors"))
        return folder
    keys, weight_map = sorted(tensors), {}
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: tensors[k] for k in part}, str(folder / name))
        weight_map |= dict.fromkeys(part, name)
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index))
    return folder


def write_pipeline_folder(folder, state):
    write_folder(folder / "vae", state, config())
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    return folder


def diffusers_model(cfg_json, state_dict) -> AutoencoderKL:
    model = AutoencoderKL(**{k: v for k, v in cfg_json.items() if not k.startswith("_")}).eval()
    model.load_state_dict(state_dict, strict=True)
    return model


def old_attention_names(key: str) -> str:
    for new, old in ((".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."), (".to_out.0.", ".proj_attn.")):
        key = key.replace(new, old)
    return key


# Each layout: how to write the VAE, and how diffusers loads the same file (its own single-file conversion for the
# LDM layout, from_pretrained for folders).
LAYOUTS = {
    "ldm": lambda d, w: (write_ldm(d / "sdxl_vae.safetensors", w),
                         lambda f: diffusers_model(config(), convert_ldm_vae_checkpoint(load_file(f), config()))),
    "ldm first_stage_model.": lambda d, w: (
        write_ldm(d / "vae.safetensors", w, "first_stage_model."),
        lambda f: diffusers_model(config(), convert_ldm_vae_checkpoint(load_file(f), config()))),
    "diffusers keys, one file": lambda d, w: (write_diffusers_file(d / "vae.safetensors", w),
                                              lambda f: diffusers_model(config(), load_file(f))),
    "diffusers folder": lambda d, w: (write_folder(d / "vae", w, config()), AutoencoderKL.from_pretrained),
    "diffusers folder, fp16 variant": lambda d, w: (
        write_folder(d / "vae", w, config(), variant="fp16", dtype=torch.float16),
        lambda f: AutoencoderKL.from_pretrained(f, variant="fp16", torch_dtype=torch.float32)),
    "diffusers folder, sharded": lambda d, w: (write_folder(d / "vae", w, config(), shards=3),
                                               AutoencoderKL.from_pretrained),
    "diffusers folder, pre-0.15 attention names": lambda d, w: (
        write_folder(d / "vae", w, config(), rename=old_attention_names), AutoencoderKL.from_pretrained),
    "pipeline folder": lambda d, w: (write_pipeline_folder(d / "pipe", w),
                                     lambda f: AutoencoderKL.from_pretrained(f, subfolder="vae")),
}


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5):
    scale = b.abs().max().item()
    err = (a - b).abs().max().item()
    assert scale > 0.1, "degenerate reference output"
    assert err <= rel * scale, f"max abs err {err:.3g} > {rel:g} x output scale {scale:.3g}"


@pytest.mark.parametrize("layout", LAYOUTS)
@torch.no_grad()
def test_every_layout_matches_diffusers(layout, tmp_path, weights):
    path, reference = LAYOUTS[layout](tmp_path, weights)
    info = inspect_vae(path)
    ours = load_vae(info, torch.device("cpu"), torch.float32)
    theirs = reference(path).float().eval()
    assert info.config == VAEConfig(**{**CFG.__dict__, "scaling_factor": SDXL_SCALING})
    x = torch.rand(2, 3, 40, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mean, logvar = ours.encode(x)
    dist = theirs.encode(x).latent_dist
    close(mean, dist.mean)
    close(logvar, dist.logvar)
    z = torch.randn(2, 4, 5, 3, generator=torch.Generator().manual_seed(2))
    close(ours.decode(z), theirs.decode(z).sample)


@torch.no_grad()
def test_pipeline_decodes_with_the_swapped_vae(tiny_file, tiny_pipe, tmp_path, weights, monkeypatch):
    """The checkpoint's VAE is replaced, not read at all, and decode uses the new VAE's own scaling factor."""
    folder = write_folder(tmp_path / "vae", weights, config(scaling_factor=0.5))
    read, original = [], SafetensorsFile.read
    monkeypatch.setattr(SafetensorsFile, "read", lambda self, name: (read.append(name), original(self, name))[1])
    pipe = load(tiny_file, device="cpu", dtype=torch.float32, vae=folder)
    assert read and not any(k.startswith("first_stage_model.") for k in read)
    assert pipe.configs.vae.scaling_factor == 0.5
    assert pipe.configs.unet == tiny_pipe.configs.unet

    latents = torch.randn(1, 4, 6, 5, generator=torch.Generator().manual_seed(3))
    want = np.asarray(to_pil(AutoencoderKL.from_pretrained(folder).decode(latents / 0.5).sample[0]), dtype=int)
    got = np.asarray(pipe.decode(latents), dtype=int)
    checkpoint_vae = np.asarray(tiny_pipe.decode(latents), dtype=int)
    assert np.abs(got - want).max() <= 1  # uint8 rounding
    assert np.abs(checkpoint_vae - want).mean() > 10


def test_fp16_fix_folder_runs_in_float16(tiny_file, tmp_path, weights):
    fix = write_folder(tmp_path / "fix", weights, config(force_upcast=False))
    stock = write_folder(tmp_path / "stock", weights, config(force_upcast=True))
    unsaid = write_folder(tmp_path / "unsaid", weights, config())  # diffusers' default is force_upcast true
    assert [inspect_vae(f).fp16_safe for f in (fix, stock, unsaid)] == [True, False, False]
    pipe = load(tiny_file, device="cpu", dtype=torch.float16, vae=fix)
    assert pipe.vae_dtype == torch.float16 and next(pipe.unet.parameters()).dtype == torch.float16
    assert load(tiny_file, device="cpu", dtype=torch.float16, vae=stock).vae_dtype == torch.float32
    assert load(tiny_file, device="cpu", dtype=torch.float16).vae_dtype == torch.float32


def test_fp16_fix_single_file_is_recognised_by_its_bytes_not_its_name(tmp_path, weights, monkeypatch):
    release = write_ldm(tmp_path / "sdxl_vae.safetensors", weights)
    data = release.read_bytes()
    # stands in for the published release (334,641,162 bytes, SHA-256 235745af...), which cannot be downloaded here
    monkeypatch.setattr(vae_file, "FP16_FIX_FILES", {len(data): hashlib.sha256(data).hexdigest()})
    info = inspect_vae(release)
    assert info.fp16_safe and info.config.scaling_factor == SDXL_SCALING

    changed = bytearray(data)
    changed[-1] ^= 1  # one weight bit: same size, another file
    (tmp_path / "sdxl_vae_fp16_fix.safetensors").write_bytes(changed)
    assert not inspect_vae(tmp_path / "sdxl_vae_fp16_fix.safetensors").fp16_safe


def test_weights_file_of_a_folder_keeps_its_config(tmp_path, weights):
    folder = write_folder(tmp_path / "vae", weights, config(force_upcast=False, scaling_factor=0.25), variant="fp16",
                          dtype=torch.float16)
    info = inspect_vae(folder / "diffusion_pytorch_model.fp16.safetensors")
    assert info.fp16_safe and info.config.scaling_factor == 0.25 and info.where == folder


def test_full_size_sdxl_vae_configs_inferred():
    """The architecture read from SDXL-sized tensors of both namings is SDXL's VAE (meta tensors, no memory)."""
    class Headers:  # what config inference reads of a TensorSource
        def __init__(self, state):
            self.shapes = {k: tuple(v.shape) for k, v in state.items()}

        def shape(self, key):
            return self.shapes[key]
    with torch.device("meta"):
        ours = VAE(SDXL_VAE).state_dict()
        theirs = AutoencoderKL(**{k: v for k, v in config(SDXL_VAE).items() if k != "_class_name"}).state_dict()
    ldm = {"first_stage_model." + k: v for k, v in ours.items()}
    assert checkpoint.vae_config(Headers(ldm), list(ldm), "first_stage_model.") == SDXL_VAE
    assert vae_file._diffusers_key_config(Headers(theirs), list(theirs)) == SDXL_VAE


def test_vae_dtype_rule():
    assert vae_dtype_for(torch.float16) == torch.float32
    assert vae_dtype_for(torch.float16, fp16_safe=True) == torch.float16
    assert vae_dtype_for(torch.bfloat16) == torch.bfloat16
    assert vae_dtype_for(torch.float32, fp16_safe=True) == torch.float32


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "minifusion"]


@pytest.mark.parametrize("metadata, scaling, warned", [
    (None, SDXL_SCALING, "is assumed"),
    ({"modelspec.architecture": "stable-diffusion-xl-v1-base/vae"}, SDXL_SCALING, None),
    ({"modelspec.architecture": "stable-diffusion-v1/vae"}, SD1_SCALING, "SD 1.x/2.x VAE"),
])
def test_single_file_scaling_factor(metadata, scaling, warned, tmp_path, weights, caplog):
    f = write_ldm(tmp_path / "vae.safetensors", weights, metadata=metadata)
    with caplog.at_level(logging.INFO, logger="minifusion"):
        assert inspect_vae(f).config.scaling_factor == scaling
    found = warnings_of(caplog)
    assert [warned in m for m in found] == ([True] if warned else [])


@pytest.mark.parametrize("scaling, warned", [(SDXL_SCALING, False), (SD1_SCALING, True)])
def test_folder_scaling_factor_from_config(scaling, warned, tmp_path, weights, caplog):
    folder = write_folder(tmp_path / "vae", weights, config(scaling_factor=scaling))
    with caplog.at_level(logging.INFO, logger="minifusion"):
        assert inspect_vae(folder).config.scaling_factor == scaling
    assert [("SD 1.x/2.x VAE" in m) for m in warnings_of(caplog)] == ([True] if warned else [])


def test_leftover_training_keys_are_ignored(tmp_path, weights):
    extra = {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(5, dtype=torch.int32),
             "loss.discriminator.main.0.weight": torch.zeros(2, 3, 4, 4)}
    info = inspect_vae(write_ldm(tmp_path / "vae.safetensors", weights, extra=extra))
    state = load_vae(info, torch.device("cpu"), torch.float32).state_dict()
    assert state.keys() == weights.keys() and all(torch.equal(state[k], weights[k]) for k in weights)


# ---------------------------------------------------------------------------------------------------------
# Every error: a CheckpointError, one line, naming the file.

def refused(path, *fragments):
    return one_line_error(inspect_vae, path, *fragments)


def test_every_bad_tensor_in_one_error(tmp_path, weights):
    state = dict(weights)
    del state["decoder.conv_out.bias"]
    state["decoder.mid.block_1.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    extra = {"decoder.extra.weight": torch.zeros(1), "cond_extra.weight": torch.zeros(1)}
    refused(write_ldm(tmp_path / "vae.safetensors", state, extra=extra), "1 missing: decoder.conv_out.bias",
            "2 unexpected: ", "decoder.extra.weight", "cond_extra.weight",
            "1 misshapen: decoder.mid.block_1.conv1.weight [3, 3, 3, 3]")


def test_integer_tensor_refused(tmp_path, weights):
    state = dict(weights, **{"decoder.conv_out.bias": torch.zeros(3, dtype=torch.int32)})
    refused(write_ldm(tmp_path / "vae.safetensors", state), "1 not floating point: decoder.conv_out.bias")


def test_folder_whose_config_disagrees_with_its_weights(tmp_path, weights):
    other = VAEConfig(ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=1)
    refused(write_folder(tmp_path / "vae", weights, config(other)), "misshapen")


def test_unet_lora_and_checkpoint_are_named(tmp_path, tiny_file):
    everything = load_file(tiny_file)
    unet = {k: v for k, v in everything.items() if k.startswith("model.diffusion_model.")}
    refused(write_ldm(tmp_path / "unet.safetensors", unet), "this is a UNet on its own, not a VAE")
    lora = {"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 64),
            "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(64, 4),
            "lora_unet_input_blocks_4_1_proj_in.alpha": torch.tensor(4.0)}
    refused(write_ldm(tmp_path / "lora.safetensors", lora), "this is a LoRA / LyCORIS adapter, not a VAE")
    refused(tiny_file, "a whole SDXL checkpoint", "not a VAE on its own")
    refused(write_ldm(tmp_path / "te.safetensors", {"text_model.embeddings.token_embedding.weight": torch.zeros(4, 2)}),
            "a CLIP text encoder on its own, not a VAE")


def test_sd3_flux_vae_without_quant_convs(tmp_path):
    state = {k: v for k, v in random_vae(VAEConfig(ch=32, ch_mult=(1, 2, 3, 4), num_res_blocks=1,
                                                   latent_channels=16)).items() if "quant_conv" not in k}
    refused(write_ldm(tmp_path / "ae.safetensors", state), "post_quant_conv.weight", "Flux")


def test_latent_channels_must_fit_the_unet(tmp_path, tiny_file):
    wide = write_ldm(tmp_path / "vae16.safetensors", random_vae(VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1,
                                                                           latent_channels=16)))
    with pytest.raises(CheckpointError, match="16 latent channels.*UNet works on 4"):
        load(tiny_file, device="cpu", dtype=torch.float32, vae=wide)


def test_bad_vae_fails_before_the_checkpoint_is_looked_at(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder") as e:
        load(tmp_path / "no_checkpoint.safetensors", device="cpu", vae=tmp_path / "missing.safetensors")
    assert "missing.safetensors" in str(e.value)


def test_pickles_are_refused(tmp_path, weights):
    pt = tmp_path / "vae.pt"
    torch.save(weights, pt)
    refused(pt, "pickle checkpoints are not loaded")
    renamed = tmp_path / "vae.safetensors"
    renamed.write_bytes(pt.read_bytes())
    refused(renamed, "a PyTorch pickle checkpoint")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config()))
    (folder / "diffusion_pytorch_model.bin").write_bytes(pt.read_bytes())
    refused(folder, "only pickle weights")


def test_missing_and_empty_paths(tmp_path):
    refused(tmp_path / "missing.safetensors", "no such file or folder")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "no VAE here")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps(config()))
    refused(tmp_path / "noweights", "no diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("entry, fragment", [
    ({"_class_name": "AutoencoderTiny"}, "not an AutoencoderKL"),
    ({"shift_factor": 0.0609}, "shift_factor = 0.0609"),
    ({"use_quant_conv": False}, "use_quant_conv = False"),
    ({"layers_per_block": 10**9}, "not a plausible"),
])
def test_configs_of_other_networks(entry, fragment, tmp_path, weights):
    refused(write_folder(tmp_path / "vae", weights, config(**entry)), fragment)
