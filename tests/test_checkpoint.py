"""Loading: both layouts give identical models, architectures are inferred, bad files get clear errors, and the
SDXL-preset models expect exactly the tensors of the real sd_xl_base_1.0.safetensors."""
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minifusion import CheckpointError, load
from minifusion.checkpoint import (COMPONENTS, SINGLE_FILE_OPTIONAL, Configs, TensorSource, infer_configs,
                                   meta_models, single_file_tables)
from minifusion.config import SDXL_CLIP_G, SDXL_CLIP_L, SDXL_UNET, SDXL_VAE
from minifusion.keyops import apply_op
from minifusion.tiny import TINY, random_models, write_diffusers, write_single_file

KEYS_FILE = Path(__file__).resolve().parents[2] / "shared" / "sdxl" / "sd_xl_base_1.0.keys.txt"
SDXL = Configs(SDXL_UNET, SDXL_VAE, SDXL_CLIP_L, SDXL_CLIP_G)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    models = random_models(TINY, seed=1)
    single = write_single_file(models, TINY, root / "tiny.safetensors")
    folder = write_diffusers(models, TINY, root / "diffusers")
    return models, single, folder


def states(pipe):
    return {c: getattr(pipe, c if c != "text_encoder_1" and c != "text_encoder_2" else c).state_dict()
            for c in COMPONENTS}


def assert_same_weights(pipe, models):
    for c in COMPONENTS:
        ours = getattr(pipe, c).state_dict()
        ref = models[c].state_dict()
        assert ours.keys() == ref.keys(), c
        for k in ref:
            assert torch.equal(ours[k], ref[k]), f"{c}.{k}"


def test_single_file_loads_the_written_weights_and_infers_the_architecture(tiny):
    models, single, _ = tiny
    pipe = load(single, device="cpu", dtype=torch.float32)
    assert pipe.configs == TINY
    assert pipe.base_size == 256  # from the modelspec.resolution header
    assert_same_weights(pipe, models)


def test_diffusers_folder_loads_the_same_weights(tiny):
    models, _, folder = tiny
    pipe = load(folder, device="cpu", dtype=torch.float32)
    assert pipe.configs == TINY
    assert_same_weights(pipe, models)


def test_both_layouts_give_identical_outputs(tiny):
    _, single, folder = tiny
    a, b = load(single, device="cpu", dtype=torch.float32), load(folder, device="cpu", dtype=torch.float32)
    ctx_a, pooled_a = a.encode_prompt(["a red fox"], ["blurry"])
    ctx_b, pooled_b = b.encode_prompt(["a red fox"], ["blurry"])
    assert torch.equal(ctx_a, ctx_b) and torch.equal(pooled_a, pooled_b)
    z = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[256, 384, 0, 0, 256, 384]] * 2, dtype=torch.float32)
    assert torch.equal(a.unet(z, torch.tensor([999, 1]), ctx_a, pooled_a, ids),
                       b.unet(z, torch.tensor([999, 1]), ctx_b, pooled_b, ids))
    assert torch.equal(a.vae.decode(z), b.vae.decode(z))


def test_fp16_variant_and_sharded_folders(tiny, tmp_path):
    models, _, _ = tiny
    fp16 = write_diffusers(models, TINY, tmp_path / "fp16", dtype=torch.float16, variant="fp16")
    pipe = load(fp16, device="cpu", dtype=torch.float32)
    w = pipe.unet.state_dict()["out.2.weight"]
    assert torch.equal(w, models["unet"].state_dict()["out.2.weight"].half().float())

    sharded = write_diffusers(models, TINY, tmp_path / "sharded")
    unet_dir = sharded / "unet"
    tensors = load_file(unet_dir / "diffusion_pytorch_model.safetensors")
    (unet_dir / "diffusion_pytorch_model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[: len(names) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for shard, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(unet_dir / shard))
        weight_map.update({k: shard for k in keys})
    (unet_dir / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_same_weights(load(sharded, device="cpu", dtype=torch.float32), models)


def test_loading_converts_dtype(tiny):
    _, single, _ = tiny
    pipe = load(single, device="cpu", dtype=torch.bfloat16)
    assert pipe.unet.state_dict()["out.2.weight"].dtype == torch.bfloat16
    assert pipe.vae.state_dict()["decoder.conv_out.weight"].dtype == torch.bfloat16
    assert not any(p.requires_grad for p in pipe.unet.parameters())


def test_missing_negative_prompt_gives_zero_embeddings(tiny):
    _, single, _ = tiny
    pipe = load(single, device="cpu", dtype=torch.float32)
    context, pooled = pipe.encode_prompt("a lighthouse")
    assert context.shape == (2, 77, 64 + 128) and pooled.shape == (2, 96)
    assert not context[0].any() and not pooled[0].any()
    assert context[1].abs().sum() > 0
    empty, _ = pipe.encode_prompt("a lighthouse", "")
    assert empty[0].abs().sum() > 0  # an explicit empty negative prompt is encoded, not zeroed


# ---------------------------------------------------------------------------------------------------------
# Bad input: one clear message naming the file.

def rewrite(single: Path, out: Path, change) -> Path:
    tensors = load_file(single)
    change(tensors)
    save_file(tensors, str(out))
    return out


def test_missing_unexpected_and_misshapen_tensors_are_listed(tiny, tmp_path):
    _, single, _ = tiny

    def damage(t):
        del t["model.diffusion_model.out.2.bias"]
        t["model.diffusion_model.extra.weight"] = torch.zeros(1)
        t["first_stage_model.decoder.conv_out.bias"] = torch.zeros(5)

    bad = rewrite(single, tmp_path / "bad.safetensors", damage)
    with pytest.raises(CheckpointError) as e:
        load(bad, device="cpu")
    msg = str(e.value)
    assert str(bad) in msg
    assert "1 missing: model.diffusion_model.out.2.bias" in msg
    assert "1 unexpected: model.diffusion_model.extra.weight" in msg
    assert "1 misshapen: first_stage_model.decoder.conv_out.bias [5]" in msg


def test_optional_keys_may_be_absent_or_present(tiny, tmp_path):
    models, single, _ = tiny

    def add(t):
        t[SINGLE_FILE_OPTIONAL[0]] = torch.arange(77).unsqueeze(0) * 7  # a corrupted position_ids is ignored
        t[SINGLE_FILE_OPTIONAL[1]] = torch.tensor(4.6)

    assert_same_weights(load(rewrite(single, tmp_path / "opt.safetensors", add), device="cpu",
                             dtype=torch.float32), models)


def test_truncated_file(tiny, tmp_path):
    _, single, _ = tiny
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(single.read_bytes()[: single.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=re.escape(str(cut)) + ".*download it again"):
        load(cut, device="cpu")


@pytest.mark.parametrize("family,key", [
    ("Stable Diffusion 1.x", "cond_stage_model.transformer.text_model.final_layer_norm.weight"),
    ("Stable Diffusion 2.x", "cond_stage_model.model.ln_final.weight"),
    ("LoRA", "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"),
    ("Stable Diffusion 3", "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"),
    ("Flux", "double_blocks.0.img_attn.qkv.weight"),
    ("SDXL refiner", "conditioner.embedders.0.model.ln_final.weight"),
])
def test_wrong_family_is_named(tmp_path, family, key):
    tensors = {key: torch.zeros(2), "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 4, 3, 3)}
    if family == "SDXL refiner":
        tensors["conditioner.embedders.0.model.token_embedding.weight"] = torch.zeros(4, 2)
    path = tmp_path / "other.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=re.escape(family)):
        load(path, device="cpu")


def test_not_sdxl_without_a_known_family(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"some.weight": torch.zeros(3)}, str(path))
    with pytest.raises(CheckpointError, match="not an SDXL checkpoint"):
        load(path, device="cpu")


def test_folder_errors(tiny, tmp_path):
    models, _, _ = tiny
    with pytest.raises(CheckpointError, match="nothing loadable here.*weights/README.md"):
        load(tmp_path, device="cpu")
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load(tmp_path / "absent", device="cpu")
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(CheckpointError, match="pickle.*convert it to .safetensors"):
        load(tmp_path, device="cpu")
    with pytest.raises(CheckpointError, match="pickle"):
        load(tmp_path / "model.ckpt", device="cpu")
    folder = write_diffusers(models, TINY, tmp_path / "noconfig")
    (folder / "vae" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=re.escape(str(folder / "vae" / "config.json")) + ": missing"):
        load(folder, device="cpu")
    folder = write_diffusers(models, TINY, tmp_path / "noweights")
    (folder / "text_encoder_2" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="text_encoder_2: no model.safetensors"):
        load(folder, device="cpu")


# ---------------------------------------------------------------------------------------------------------
# Full size on the meta device: exactly the tensors of the real file.

def real_keys() -> dict[str, tuple[int, ...]]:
    if not KEYS_FILE.is_file():
        pytest.skip(f"{KEYS_FILE} not found (it lives in the project's shared/ folder)")
    out = {}
    for line in KEYS_FILE.read_text().splitlines():
        key, shape = line.split(" ")
        out[key] = tuple(int(d) for d in shape.strip("[]").split(",") if d)
    return out


class HeaderOnly(TensorSource):
    """A TensorSource that knows only names and shapes, as a safetensors header does."""

    def __init__(self, shapes, metadata=None):
        self.shapes, self.metadata, self.where = shapes, metadata or {}, dict.fromkeys(shapes)

    def shape(self, key):
        return self.shapes[key]


def test_sdxl_presets_expect_exactly_the_real_checkpoint():
    keys = real_keys()
    assert len(keys) == 2515
    models = meta_models(SDXL)
    tables = single_file_tables(SDXL, models)
    covered = {}
    for c in COMPONENTS:
        state = models[c].state_dict()
        for ours, (src, op) in tables[c].items():
            assert src in keys, src
            got = tuple(apply_op(torch.empty(keys[src], device="meta"), op).shape)
            assert got == tuple(state[ours].shape), src
            covered[src] = True
    assert set(keys) - set(covered) == set(SINGLE_FILE_OPTIONAL)
    counts = {c: sum(p.numel() for p in models[c].parameters()) for c in COMPONENTS}
    assert counts == {"unet": 2_567_463_684, "vae": 83_653_863,
                      "text_encoder_1": 123_060_480, "text_encoder_2": 694_659_840}


def test_real_checkpoint_header_infers_the_sdxl_presets():
    keys = real_keys()
    assert infer_configs(HeaderOnly(keys), Path("sd_xl_base_1.0.safetensors")) == SDXL
    fine_tune = {k: v for k, v in keys.items() if k not in SINGLE_FILE_OPTIONAL}
    cfgs = infer_configs(HeaderOnly(fine_tune, {"modelspec.resolution": "768x1344"}), Path("x.safetensors"))
    assert cfgs.unet.sample_size == 1344 // 8


def test_folder_saved_by_the_reference_libraries_loads_and_matches_them(tmp_path):
    """A diffusers-layout folder written by diffusers' and transformers' own save_pretrained (configs and
    weights as those libraries lay them out) loads, and our networks reproduce theirs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from minifusion.tiny import randomize

    g = torch.Generator().manual_seed(3)
    unet = randomize(UNet2DConditionModel(**{k: v for k, v in TINY.unet.to_diffusers_config().items()
                                             if not k.startswith("_")}), g).eval()
    vae = randomize(AutoencoderKL(**{k: v for k, v in TINY.vae.to_diffusers_config().items()
                                     if not k.startswith("_")}), g).eval()
    te1 = randomize(CLIPTextModel(CLIPTextConfig(**TINY.text_encoder_1.to_diffusers_config())), g).eval()
    te2 = randomize(CLIPTextModelWithProjection(CLIPTextConfig(**TINY.text_encoder_2.to_diffusers_config())), g).eval()
    for model, sub in ((unet, "unet"), (vae, "vae"), (te1, "text_encoder"), (te2, "text_encoder_2")):
        model.save_pretrained(tmp_path / sub, safe_serialization=True)
    pipe = load(tmp_path, device="cpu", dtype=torch.float32)
    assert pipe.configs == TINY

    ids = pipe.tokenizer(["a watercolour of a heron"], pad_id=0)
    with torch.no_grad():
        ref = te2(ids, output_hidden_states=True)
        h, pooled = pipe.text_encoder_2(ids)
        assert torch.allclose(h, ref.hidden_states[-2], atol=1e-5) and torch.allclose(pooled, ref.text_embeds, atol=1e-5)
        h1, _ = pipe.text_encoder_1(ids)
        assert torch.allclose(h1, te1(ids, output_hidden_states=True).hidden_states[-2], atol=1e-5)
        z = torch.randn(1, 4, 8, 8, generator=g)
        ctx, pooled = torch.randn(1, 77, 192, generator=g), torch.randn(1, 96, generator=g)
        tid = torch.tensor([[256.0, 256, 0, 0, 256, 256]])
        theirs = unet(z, 500, encoder_hidden_states=ctx,
                      added_cond_kwargs={"text_embeds": pooled, "time_ids": tid}).sample
        assert torch.allclose(pipe.unet(z, 500, ctx, pooled, tid), theirs, atol=1e-4)
        assert torch.allclose(pipe.vae.decode(z), vae.decode(z).sample, atol=1e-4)
