"""LoRA / LyCORIS merged at load time (minifusion.lora).

Parity: kohya (original SDXL names and diffusers paths), LoCon (every conv: 3x3, 1x1 skips, Down/Upsample,
conv_in/out) and diffusers/PEFT files (written by diffusers itself, alpha in its lora_adapter_metadata header),
built here on the tiny model, merged by minifusion vs applied unmerged by diffusers' load_lora_weights with
cross_attention_kwargs={"scale": m} on the UNet and lora_scale=m on both text encoders (what encode_prompt does
with it: peft's scale_lora_layers), for m = 1 and 0.7; several files at once vs set_adapters.
LoHa, LoKr (whole and decomposed factors, Tucker cores), LoCon's Tucker core and DoRA: against ΔW computed
here from the formulas, by other means (loops over kernel taps, explicit Kronecker blocks).
"""
import copy
import hashlib
import math
import re

import pytest
import torch
from safetensors.torch import save_file

from minifusion import CheckpointError, load
from minifusion.checkpoint import Configs
from minifusion.config import SDXL_CLIP_G, SDXL_CLIP_L, SDXL_UNET, SDXL_VAE
from minifusion.lora import Applied, Target, infotext, module_names, open_loras, parse_spec
from minifusion.tiny import TINY, random_models, write_diffusers, write_single_file

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from diffusers.utils import scale_lora_layers, unscale_lora_layers  # noqa: E402

TOL = 1e-5
RANK, ALPHA = 4, 2.0  # one alpha for every module of a kohya file: diffusers mishandles per-module alphas
TE_LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The same random weights as our single file and as a diffusers folder, and diffusers' networks on them."""
    root = tmp_path_factory.mktemp("lora_tiny")
    models = random_models(TINY, seed=0)
    single = write_single_file(models, TINY, root / "tiny.safetensors")
    folder = write_diffusers(models, TINY, root / "diffusers")
    theirs = {"unet": diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").eval(),
              "text_encoder": transformers.CLIPTextModel.from_pretrained(folder / "text_encoder").eval(),
              "text_encoder_2": transformers.CLIPTextModelWithProjection.from_pretrained(
                  folder / "text_encoder_2").eval()}
    base = load(single, device="cpu", dtype=torch.float32)
    return {"models": models, "single": single, "folder": folder, "theirs": theirs, "base": base, "root": root}


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 49406, (2, 77), generator=g)
    ids[:, 0] = 49406
    ids[0, 9:], ids[1, 30:] = 49407, 49407  # end of text, then padding with it
    return {"x": torch.randn(2, 4, 24, 16, generator=g), "t": torch.tensor([999.0, 421.0]),
            "ctx": torch.randn(2, 77, 192, generator=g), "pooled": torch.randn(2, 96, generator=g),
            "time_ids": torch.tensor([[512.0, 512, 0, 0, 512, 512], [384, 640, 64, 32, 512, 512]]), "ids": ids}


# ---------------------------------------------------------------------------------------------------------
# LoRA files built here

def layers(model, kinds=(torch.nn.Linear, torch.nn.Conv2d)):
    return {n: m.weight.shape for n, m in model.named_modules() if isinstance(m, kinds)}


def lora_pair(shape, rank, g):
    """(down, up) at a size that moves the layer's output by tens of percent."""
    fan_in = math.prod(shape[1:])
    down = torch.randn(rank, *shape[1:], generator=g) / math.sqrt(fan_in)
    up = torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []), generator=g) * 0.5 / math.sqrt(rank)
    return down, up


def kohya_tensors(names: dict[str, torch.Size], g, rank=RANK, alpha=ALPHA) -> dict[str, torch.Tensor]:
    out = {}
    for name, shape in names.items():
        down, up = lora_pair(shape, rank, g)
        out.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                    f"{name}.alpha": torch.tensor(alpha)})
    return out


def te_names(tiny, component, prefix):
    # kohya names the transformers CLIPTextModel modules, with its text_model level
    return {prefix + "text_model_" + n.replace(".", "_"): s for n, s in layers(tiny["models"][component]).items()
            if n.startswith("encoder.layers.") and n.endswith(TE_LAYERS)}


def kohya_file(tiny, path, convs: bool, diffusers_names: bool, seed: int):
    """kohya-ss SDXL LoRA: the UNet's Linear layers (or, LoCon, every layer with its convs) under the original
    SDXL names (ours) or under diffusers' module paths, plus both text encoders."""
    g = torch.Generator().manual_seed(seed)
    unet = tiny["theirs"]["unet"] if diffusers_names else tiny["models"]["unet"]
    kinds = (torch.nn.Linear, torch.nn.Conv2d) if convs else (torch.nn.Linear,)
    # diffusers' converter cannot name add_embedding.linear_1/2 in kohya spelling (it drops the digit), so the
    # oracle would skip them: that pair is covered under its original name (label_emb) instead
    names = {"lora_unet_" + n.replace(".", "_"): s for n, s in layers(unet, kinds).items()
             if not n.startswith("add_embedding.")}
    names |= te_names(tiny, "text_encoder_1", "lora_te1_") | te_names(tiny, "text_encoder_2", "lora_te2_")
    save_file(kohya_tensors(names, g), str(path), metadata={"ss_network_module": "networks.lora"})
    return path


def peft_file(tiny, path, seed: int):
    """A diffusers / PEFT LoRA written by diffusers' own save_lora_weights, with its lora_adapter_metadata: r 4,
    lora_alpha 8, and per-module exceptions (to_k: alpha 2; to_v: rank 2) in alpha_pattern / rank_pattern."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    configs = {
        "unet": LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, alpha_pattern={"to_k": 2},
                           rank_pattern={"to_v": 2},
                           target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2",
                                           "conv1", "conv2", "conv_shortcut", "time_emb_proj"]),
        "text_encoder": LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                   target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]),
        "text_encoder_2": LoraConfig(r=4, lora_alpha=6, init_lora_weights=False,
                                     target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]),
    }
    state, metadata = {}, {}
    for name, config in configs.items():
        model = copy.deepcopy(tiny["theirs"][name])
        # what add_adapter does (transformers' wants a newer peft than the test extra pins)
        model = inject_adapter_in_model(config, model)  # init_lora_weights=False: lora_B random, not zero
        state[name] = get_peft_model_state_dict(model)
        metadata[name] = config.to_dict()
    diffusers.StableDiffusionXLPipeline.save_lora_weights(
        path.parent, weight_name=path.name, unet_lora_layers=state["unet"],
        text_encoder_lora_layers=state["text_encoder"], text_encoder_2_lora_layers=state["text_encoder_2"],
        unet_lora_adapter_metadata=metadata["unet"], text_encoder_lora_adapter_metadata=metadata["text_encoder"],
        text_encoder_2_lora_adapter_metadata=metadata["text_encoder_2"])
    return path


FORMATS = {
    "kohya": lambda tiny, path: kohya_file(tiny, path, convs=False, diffusers_names=False, seed=1),
    "kohya_diffusers_paths": lambda tiny, path: kohya_file(tiny, path, convs=False, diffusers_names=True, seed=2),
    "locon": lambda tiny, path: kohya_file(tiny, path, convs=True, diffusers_names=False, seed=3),
    "peft": lambda tiny, path: peft_file(tiny, path, seed=4),
}


@pytest.fixture(scope="module")
def files(tiny):
    d = tiny["root"] / "loras"
    d.mkdir()
    return {name: make(tiny, d / f"{name}.safetensors") for name, make in FORMATS.items()}


# ---------------------------------------------------------------------------------------------------------
# Oracle: diffusers with the LoRA applied, unmerged

def oracle_pipe(tiny, loads):
    """A StableDiffusionXLPipeline around copies of diffusers' networks, each file loaded with load_lora_weights:
    loads = [(path, adapter_name)]."""
    t = {k: copy.deepcopy(v) for k, v in tiny["theirs"].items()}
    pipe = diffusers.StableDiffusionXLPipeline(vae=None, text_encoder=t["text_encoder"],
                                               text_encoder_2=t["text_encoder_2"], tokenizer=None, tokenizer_2=None,
                                               unet=t["unet"], scheduler=diffusers.DDIMScheduler())
    for path, name in loads:
        pipe.load_lora_weights(str(path), adapter_name=name)
    return pipe


@torch.no_grad()
def their_outputs(pipe, inputs, m=None):
    """UNet with cross_attention_kwargs={"scale": m}; text encoders with lora_scale=m (scale_lora_layers, as
    encode_prompt applies it). m None: no scale (set_adapters' weights alone)."""
    kw = {} if m is None else {"cross_attention_kwargs": {"scale": m}}
    unet = pipe.unet(inputs["x"], inputs["t"], encoder_hidden_states=inputs["ctx"],
                     added_cond_kwargs={"text_embeds": inputs["pooled"], "time_ids": inputs["time_ids"]}, **kw).sample
    out = {"unet": unet}
    for name, encoder in (("text_encoder_1", pipe.text_encoder), ("text_encoder_2", pipe.text_encoder_2)):
        if m is not None:
            scale_lora_layers(encoder, m)
        r = encoder(inputs["ids"], output_hidden_states=True)
        if m is not None:
            unscale_lora_layers(encoder, m)
        out[name] = r.hidden_states[-2]
        if name == "text_encoder_2":
            out["pooled"] = r.text_embeds
    return out


@torch.no_grad()
def our_outputs(pipe, inputs):
    i = inputs
    h2, pooled = pipe.text_encoder_2(i["ids"])
    return {"unet": pipe.unet(i["x"], i["t"], i["ctx"], i["pooled"], i["time_ids"]),
            "text_encoder_1": pipe.text_encoder_1(i["ids"])[0], "text_encoder_2": h2, "pooled": pooled}


def assert_parity(ours, theirs, base):
    for k in theirs:
        scale = theirs[k].abs().max().item()
        err = (ours[k] - theirs[k]).abs().max().item()
        moved = (base[k] - theirs[k]).abs().max().item()
        print(f"{k}: max abs err {err:.2e} (relative {err / scale:.2e}), the LoRA moved it by {moved / scale:.2e}")
        assert err <= TOL * scale, k
        assert moved > 1e-2 * scale, f"{k}: the LoRA barely changes the output; the comparison proves nothing"


@pytest.fixture(scope="module")
def oracle(tiny, files):
    """One diffusers pipeline holding every file as an adapter of its own name; set_adapters picks which apply."""
    return oracle_pipe(tiny, [(path, fmt) for fmt, path in files.items()])


@pytest.fixture(scope="module")
def ours(tiny, files):
    """Our pipelines with one file merged, made once: ours(format, m, dtype)."""
    made = {}

    def make(fmt, m, dtype=torch.float32):
        if (fmt, m, dtype) not in made:
            made[fmt, m, dtype] = load(tiny["single"], device="cpu", dtype=dtype, loras=[(files[fmt], m)])
        return made[fmt, m, dtype]

    return make


@pytest.mark.parametrize("m", [1.0, 0.7])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_parity_with_diffusers(tiny, ours, oracle, inputs, fmt, m):
    oracle.set_adapters([fmt])
    pipe = ours(fmt, m)
    assert_parity(our_outputs(pipe, inputs), their_outputs(oracle, inputs, m), our_outputs(tiny["base"], inputs))
    assert pipe.loras == [Applied(fmt, m, pipe.loras[0].hash)]


def test_several_loras_at_once_match_diffusers_set_adapters(tiny, files, oracle, inputs):
    """Three files with their own weights, merged while loading the diffusers-layout folder: W + Σ m_i ΔW_i."""
    weights = {"kohya": 0.7, "locon": -0.4, "peft": 1.3}
    pipe = load(tiny["folder"], device="cpu", dtype=torch.float32, loras=[(files[k], w) for k, w in weights.items()])
    oracle.set_adapters(list(weights), adapter_weights=list(weights.values()))
    assert_parity(our_outputs(pipe, inputs), their_outputs(oracle, inputs), our_outputs(tiny["base"], inputs))
    assert [(a.name, a.weight) for a in pipe.loras] == list(weights.items())


def test_float16_model_is_merged_in_float32_and_rounded_once(tiny, ours):
    """The merged fp16 weight is exactly the fp32 merge rounded: nothing was rounded before the update."""
    full, half = ours("locon", 0.7).unet.state_dict(), ours("locon", 0.7, torch.float16).unet.state_dict()
    base = tiny["base"].unet.state_dict()
    rounded_first = 0
    for k, w in full.items():
        assert torch.equal(half[k], w.half()), k
        rounded_first += int((base[k].half().float() + (w - base[k])).half().ne(half[k]).any())
    assert rounded_first > 0  # rounding the base weight first would have given other fp16 weights


# ---------------------------------------------------------------------------------------------------------
# LyCORIS, LoCon's Tucker core, DoRA and alpha against ΔW written out here, one file with every case on a
# layer of its own

M = 0.7


def taps(core, left, right):
    """Σ_ab left[a, o] core[a, b, h, w] right[b, i] -> (o, i, h, w), one kernel tap at a time."""
    out = torch.empty(left.shape[1], right.shape[1], *core.shape[2:])
    for h in range(core.shape[2]):
        for w in range(core.shape[3]):
            out[:, :, h, w] = left.T @ core[:, :, h, w] @ right
    return out


def kron_blocks(a, b):
    """Kronecker product written as blocks: rows i·B + k, columns j·D + l hold a[i, j] · b[k, l, ...]."""
    A, C = a.shape
    B, D = b.shape[:2]
    out = torch.empty(A * B, C * D, *b.shape[2:])
    for i in range(A):
        for j in range(C):
            out[i * B:(i + 1) * B, j * D:(j + 1) * D] = a[i, j] * b
    return out


def loha(w, rnd, r=3):
    out, fan = w.shape[0], w.shape[1:]
    w1a, w1b, w2a, w2b = rnd(out, r), rnd(r, *fan), rnd(out, r), rnd(r, *fan)
    expected = ((w1a @ w1b.reshape(r, -1)) * (w2a @ w2b.reshape(r, -1))).reshape(w.shape)
    return {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b, "alpha": torch.tensor(1.5)}, \
        M * 1.5 / r * expected


def lokr(w, rnd):
    """out = 4 · out/4, in = 2 · in/2: the small factor whole, the large one a rank-2 product."""
    k1, k2a, k2b = rnd(4, 2), rnd(w.shape[0] // 4, 2), rnd(2, w.shape[1] // 2, *w.shape[2:])
    k2 = (k2a @ k2b.reshape(2, -1)).reshape(w.shape[0] // 4, w.shape[1] // 2, *w.shape[2:])
    return {"lokr_w1": k1, "lokr_w2_a": k2a, "lokr_w2_b": k2b, "alpha": torch.tensor(4.0)}, \
        M * 4.0 / 2 * kron_blocks(k1, k2)


def lokr_whole(w, rnd):
    """Both factors whole: alpha is ignored (scale 1)."""
    k1, k2 = rnd(8, 4), rnd(w.shape[0] // 8, w.shape[1] // 4)
    return {"lokr_w1": k1, "lokr_w2": k2, "alpha": torch.tensor(7.0)}, M * kron_blocks(k1, k2)


def lokr_both_decomposed(w, rnd):
    """Both factors products: the second factor's rank (3) divides alpha."""
    k1a, k1b, k2a, k2b = rnd(8, 2), rnd(2, 4), rnd(w.shape[0] // 8, 3), rnd(3, w.shape[1] // 4)
    return {"lokr_w1_a": k1a, "lokr_w1_b": k1b, "lokr_w2_a": k2a, "lokr_w2_b": k2b, "alpha": torch.tensor(1.0)}, \
        M / 3 * kron_blocks(k1a @ k1b, k2a @ k2b)


def loha_tucker(w, rnd, r=3):
    t1, t2, a1, b1, a2, b2 = (rnd(r, r, 3, 3), rnd(r, r, 3, 3), rnd(r, w.shape[0]), rnd(r, w.shape[1]),
                              rnd(r, w.shape[0]), rnd(r, w.shape[1]))
    return {"hada_t1": t1, "hada_t2": t2, "hada_w1_a": a1, "hada_w1_b": b1, "hada_w2_a": a2, "hada_w2_b": b2,
            "alpha": torch.tensor(2.0)}, M * 2.0 / r * taps(t1, a1, b1) * taps(t2, a2, b2)


def lokr_tucker(w, rnd, r=3):
    k1, t, ka, kb = rnd(4, 2), rnd(r, r, 3, 3), rnd(r, w.shape[0] // 4), rnd(r, w.shape[1] // 2)
    return {"lokr_w1": k1, "lokr_t2": t, "lokr_w2_a": ka, "lokr_w2_b": kb, "alpha": torch.tensor(1.0)}, \
        M / r * kron_blocks(k1, taps(t, ka, kb))


def locon_tucker(w, rnd, r=3):
    mid, up, down = rnd(r, r, 3, 3), rnd(w.shape[0], r, 1, 1), rnd(r, w.shape[1], 1, 1)
    return {"lora_mid.weight": mid, "lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(6.0)}, \
        M * 6.0 / r * taps(mid, up[:, :, 0, 0].T, down[:, :, 0, 0])


def lora_alpha(alpha):
    """Plain LoRA; a missing or zero alpha means the rank (scale 1)."""
    def case(w, rnd, r=RANK):
        down, up = rnd(r, *w.shape[1:]), rnd(w.shape[0], r, *([1, 1] if w.dim() == 4 else []))
        delta = (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
        parts = {"lora_down.weight": down, "lora_up.weight": up}
        return parts | ({} if alpha is None else {"alpha": torch.tensor(alpha)}), M * (alpha / r if alpha else 1.0) * delta
    case.__name__ = f"lora_alpha_{alpha}"
    return case


def dora(axis):
    """W' = W + m·(dora_scale ⊙ V/‖V‖ − W), V = W + (alpha/rank)·up@down, the norm per input channel for a
    (1, in, ...) dora_scale, per output channel for (out, 1, ...)."""
    def case(w, rnd, r=RANK, alpha=2.0):
        down, up = rnd(r, *w.shape[1:]), rnd(w.shape[0], r, *([1, 1] if w.dim() == 4 else []))
        v = w + alpha / r * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
        if axis == 1:
            norm = torch.stack([v[:, i].norm() for i in range(w.shape[1])]).reshape(1, -1, *[1] * (w.dim() - 2))
        else:
            norm = torch.stack([v[o].norm() for o in range(w.shape[0])]).reshape(-1, *[1] * (w.dim() - 1))
        dora_scale = norm * (1 + 0.3 * rnd(*norm.shape).abs())  # trained magnitudes drift from ‖V‖
        return {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(alpha),
                "dora_scale": dora_scale}, M * (dora_scale * v / norm - w)
    case.__name__ = f"dora_axis_{axis}"
    return case


HAND = [  # (case, layer kind)
    (loha, "linear"), (loha, "conv3"), (loha, "conv1"), (lokr, "linear"), (lokr, "conv3"), (lokr, "conv1"),
    (lokr_whole, "linear"), (lokr_both_decomposed, "linear"), (loha_tucker, "conv3"), (lokr_tucker, "conv3"),
    (locon_tucker, "conv3"), (lora_alpha(None), "linear"), (lora_alpha(0.0), "linear"), (lora_alpha(8.0), "conv3"),
    (dora(1), "conv3"), (dora(0), "linear"), (dora(1), "linear"), (dora(0), "conv1"),
]


def layer_pool(model, kind):
    """Our UNet's layers of a kind whose sizes the factorisations above divide."""
    for name, m in model.named_modules():
        shape = getattr(m, "weight", torch.empty(0)).shape
        conv = isinstance(m, torch.nn.Conv2d) and shape[0] % 4 == 0 and shape[1] % 2 == 0
        ok = {"linear": isinstance(m, torch.nn.Linear) and shape[0] % 8 == 0 and shape[1] % 4 == 0,
              "conv3": conv and shape[2:] == (3, 3), "conv1": conv and shape[2:] == (1, 1)}
        if ok[kind]:
            yield name


def test_lycoris_tucker_dora_and_alpha_match_the_formulas(tiny, tmp_path):
    unet, g = tiny["models"]["unet"], torch.Generator().manual_seed(11)
    pools = {k: layer_pool(unet, k) for k in ("linear", "conv3", "conv1")}
    tensors, expected = {}, {}
    for case, kind in HAND:
        name = next(pools[kind])
        w = unet.get_submodule(name).weight.detach()
        parts, expected[name] = case(w, lambda *s: torch.randn(*s, generator=g) * 0.3)
        tensors |= {f"lora_unet_{name.replace('.', '_')}.{part}": t.contiguous() for part, t in parts.items()}
    path = tmp_path / "hand.safetensors"
    save_file(tensors, str(path))
    merged = load(tiny["single"], device="cpu", dtype=torch.float32, loras=[(path, M)]).unet.state_dict()
    base = tiny["base"].unet.state_dict()
    for (case, kind), (name, want) in zip(HAND, expected.items()):
        got = merged[name + ".weight"] - base[name + ".weight"]
        err = (got - want).abs().max().item()
        print(f"{case.__name__} on {kind} {name}: max abs err {err:.2e} of {want.abs().max().item():.2e}")
        assert got.shape == want.shape and err <= 1e-6 * want.abs().max().item(), (case.__name__, name)
    untouched = set(base) - {n + ".weight" for n in expected}
    assert all(torch.equal(merged[k], base[k]) for k in untouched)


# ---------------------------------------------------------------------------------------------------------
# Names, hashes, errors

def test_sdxl_names_of_real_lora_files_reach_the_right_layers():
    """Module names as real SDXL LoRAs carry them (kohya over the original names and over diffusers paths,
    diffusers/PEFT), on the full-size model (meta device): every name is unique and lands where it should."""
    names = module_names(Configs(SDXL_UNET, SDXL_VAE, SDXL_CLIP_L, SDXL_CLIP_G))
    attn = Target("unet", "input_blocks.4.1.transformer_blocks.0.attn1.to_q")
    expected = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": attn,
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q": attn,
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": attn,
        "lora_unet_middle_block_1_transformer_blocks_9_ff_net_0_proj":
            Target("unet", "middle_block.1.transformer_blocks.9.ff.net.0.proj"),
        "lora_unet_output_blocks_2_2_conv": Target("unet", "output_blocks.2.2.conv"),
        "lora_unet_up_blocks_0_upsamplers_0_conv": Target("unet", "output_blocks.2.2.conv"),
        "lora_unet_input_blocks_3_0_op": Target("unet", "input_blocks.3.0.op"),
        "unet.down_blocks.0.downsamplers.0.conv": Target("unet", "input_blocks.3.0.op"),
        "lora_unet_output_blocks_0_0_skip_connection": Target("unet", "output_blocks.0.0.skip_connection"),
        "lora_unet_up_blocks_0_resnets_0_conv_shortcut": Target("unet", "output_blocks.0.0.skip_connection"),
        "lora_unet_input_blocks_1_0_emb_layers_1": Target("unet", "input_blocks.1.0.emb_layers.1"),
        "lora_unet_label_emb_0_0": Target("unet", "label_emb.0.0"),
        "lora_te1_text_model_encoder_layers_11_self_attn_out_proj":
            Target("text_encoder_1", "encoder.layers.11.self_attn.out_proj"),
        "lora_te2_text_model_encoder_layers_31_mlp_fc2": Target("text_encoder_2", "encoder.layers.31.mlp.fc2"),
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj":
            Target("text_encoder_2", "encoder.layers.0.self_attn.q_proj"),
        "text_encoder.encoder.layers.3.mlp.fc1": Target("text_encoder_1", "encoder.layers.3.mlp.fc1"),
        "lora_te2_text_projection": Target("text_encoder_2", "text_projection"),
    }
    for name, target in expected.items():
        assert names[name] == target, name
    # 2 kohya names + 1 diffusers name per UNet layer, 1 kohya + 2 diffusers per text-encoder layer
    unet_layers = sum(1 for t in set(names.values()) if t.component == "unet")
    assert sum(1 for t in names.values() if t.component == "unet") == 3 * unet_layers
    assert "lora_te1_text_projection" not in names  # CLIP-L has no projection in SDXL


def test_hash_is_a1111s_addnet_hash_or_the_stored_one(files, tmp_path):
    """A1111: the header's sshs_model_hash if kohya wrote one, else SHA-256 of the bytes after the header."""
    stored = "ab" * 32
    tensors = kohya_tensors({"lora_unet_input_blocks_0_0": (32, 4, 3, 3)}, torch.Generator().manual_seed(0))
    save_file(tensors, str(tmp_path / "my,lora:v2.safetensors"), metadata={"sshs_model_hash": stored})
    patch = open_loras([files["kohya"], (files["peft"], 0.5), (tmp_path / "my,lora:v2.safetensors", 2)], TINY)
    patch.close()
    data = [f.read_bytes() for f in (files["kohya"], files["peft"])]
    addnet = [hashlib.sha256(d[8 + int.from_bytes(d[:8], "little"):]).hexdigest()[:12] for d in data]
    assert patch.applied == [Applied("kohya", 1.0, addnet[0]), Applied("peft", 0.5, addnet[1]),
                             Applied("my,lora:v2", 2.0, stored[:12])]
    assert hashlib.sha256(data[0]).hexdigest()[:12] != addnet[0]  # the header is not hashed
    assert infotext([Applied("a:b,c", 1.0, "0123456789ab"), Applied("d", 0.5, "ba9876543210")]) == \
        "abc: 0123456789ab, d: ba9876543210"


@pytest.mark.parametrize("spec, expected", [("a.safetensors", ("a.safetensors", 1.0)),
                                            ("dir/a.safetensors:0.6", ("dir/a.safetensors", 0.6)),
                                            ("a.safetensors:-1", ("a.safetensors", -1.0)),
                                            ("C:\\loras\\a.safetensors", ("C:\\loras\\a.safetensors", 1.0))])
def test_cli_spec(spec, expected):
    path, weight = parse_spec(spec)
    assert (str(path), weight) == expected


def fails(tiny, path, match, weight=1.0):
    with pytest.raises(CheckpointError) as e:
        load(tiny["single"], device="cpu", dtype=torch.float32, loras=[(path, weight)])
    message = str(e.value)
    assert "\n" not in message and str(path) in message, message
    assert re.search(match, message), message
    return message


def one_module(name, shape, g=None):
    return kohya_tensors({name: shape}, g or torch.Generator().manual_seed(0))


def test_errors_are_one_line_naming_the_file(tiny, tmp_path):
    ok = one_module("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", (64, 64))
    pt = tmp_path / "style.pt"
    pt.write_bytes(b"PK\x03\x04 not opened")
    fails(tiny, pt, r"pickle .*not loaded as a LoRA")
    fake = tmp_path / "zip.safetensors"
    fake.write_bytes(b"PK\x03\x04" + bytes(100))
    fails(tiny, fake, r"pickle")

    bogus = {f"lora_unet_nowhere_{i}": (8, 8) for i in range(7)}
    path = tmp_path / "unmatched.safetensors"
    save_file(ok | kohya_tensors(bogus, torch.Generator().manual_seed(1)), str(path))
    fails(tiny, path, r"7 matching no SDXL layer: lora_unet_nowhere_\d, .*\(2 more\)")

    path = tmp_path / "allmiss.safetensors"
    save_file(kohya_tensors(bogus, torch.Generator().manual_seed(1)), str(path))
    fails(tiny, path, r"none of its 7 modules is a layer of this SDXL model .*not a LoRA for SDXL")

    path = tmp_path / "misshapen.safetensors"
    save_file(one_module("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", (64, 32)), str(path))
    fails(tiny, path, r"1 misshapen: lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q "
                      r"\(lora_down.weight \[4, 32\], lora_up.weight \[64, 4\]; the layer is \[64, 64\]\)")

    path = tmp_path / "incomplete.safetensors"
    save_file({k: v for k, v in ok.items() if "lora_up" not in k}, str(path))
    fails(tiny, path, r"1 incomplete: .*attn1_to_q \(has alpha, lora_down.weight\)")

    path = tmp_path / "ints.safetensors"
    save_file({k: (v * 100).to(torch.int16) if "down" in k else v for k, v in ok.items()}, str(path))
    fails(tiny, path, r"1 not floating point: .*lora_down.weight I16")

    path = tmp_path / "twice.safetensors"
    save_file(ok | one_module("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", (64, 64)), str(path))
    fails(tiny, path, r"patching a layer twice: .*attn1_to_q and unet\.down_blocks")

    path = tmp_path / "peft_dora.safetensors"
    save_file({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 64),
               "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(64, 4),
               "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_magnitude_vector": torch.ones(64)},
              str(path))
    fails(tiny, path, r"1 unsupported: .*PEFT's DoRA")

    fails(tiny, tiny["single"], r"not a LoRA / LyCORIS file")
    # another model is named as the VAE and ControlNet loaders name it: without the advice meant for --weights
    path = tmp_path / "vae.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(2), "decoder.conv_out.weight": torch.zeros(2)}, str(path))
    fails(tiny, path, r"not a LoRA / LyCORIS file \(.*\); this is a VAE on its own$")
    fails(tiny, tmp_path / "missing.safetensors", r"no such LoRA file")
    with pytest.raises(ValueError, match="weight nan is not a finite number"):
        load(tiny["single"], device="cpu", dtype=torch.float32, loras=[(path, float("nan"))])


@pytest.mark.parametrize("family, names", [
    ("Stable Diffusion 1.x", {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (320, 768),
                              "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (768, 768)}),
    ("Stable Diffusion 2.x", {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": (640, 1024)}),
    ("Stable Diffusion 1.x / 2.x", {"lora_te_text_model_encoder_layers_0_mlp_fc1": (3072, 768)}),
    # the refiner's layers share SDXL's names but attend to bigG alone (1280 wide)
    ("the SDXL refiner", {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (64, 1280)}),
    ("Flux", {"lora_unet_double_blocks_0_img_attn_proj": (3072, 3072)}),
    ("Flux", {"transformer.single_transformer_blocks.0.attn.to_k": (3072, 3072)}),
    ("Stable Diffusion 3", {"lora_unet_joint_blocks_0_x_block_attn_qkv": (4608, 1536)}),
])
def test_loras_for_other_families_are_named(tiny, tmp_path, family, names):
    path = tmp_path / "other.safetensors"
    save_file(kohya_tensors({n: torch.Size(s) for n, s in names.items()}, torch.Generator().manual_seed(0)),
              str(path))
    fails(tiny, path, rf"this is a LoRA for {re.escape(family)}; minifusion needs a LoRA for SDXL")


def test_a_bad_lora_fails_before_the_checkpoint_is_read(tiny, tmp_path, monkeypatch):
    from minifusion import checkpoint
    monkeypatch.setattr(checkpoint, "_materialise", lambda *a, **k: pytest.fail("weights were read"))
    path = tmp_path / "bad.safetensors"
    save_file(one_module("lora_unet_nowhere", (4, 4)), str(path))
    fails(tiny, path, "none of its 1 modules")



def test_bench_loading_with_loras_on_the_tiny_model(tmp_path):
    """bench/loading.py's LoRA option end to end on the tiny model (the full-size run is the bench's): the random
    LoRAs it writes fit the model, and a load with them merged is measured in a fresh process."""
    from bench import loading

    checkpoint = loading.write_random_checkpoint(tmp_path / "tiny.safetensors", TINY)
    loras = tuple(loading.ensure_loras(tmp_path, TINY, ranks=(2, 4)))
    patch = open_loras(loras, TINY)  # every layer the bench names exists, with its shapes
    patch.close()
    assert sum(len(a.modules) for a in patch.adapters) == 2 * (len(loading.lora_layout(TINY, 2)) // 3)
    merged = loading.measure_load(checkpoint, "float32", "cpu", cold=False, loras=loras)
    assert merged["loras"] == [f.name for f in loras] and merged["lora_bytes"] == sum(f.stat().st_size for f in loras)
    params = sum(p.numel() * 4 for m in random_models(TINY).values() for p in m.parameters())
    assert merged["parameter_bytes"] == params and merged["seconds"] > 0
    assert {"peak_rss_growth_bytes", "peak_anon_growth_bytes", "target_met"} <= merged.keys()
