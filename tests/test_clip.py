"""Text encoder parity: ours against transformers' CLIPTextModel(WithProjection) and open_clip's text tower on
identical random weights (fp32, CPU, tiny widths with SDXL's 64-wide heads), plus full-size structure checks on the
meta device against the real single-file SDXL key list and transformers' SDXL text encoders."""
from pathlib import Path

import pytest
import torch
import torch.nn as nn

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

from minifusion.config import SDXL_CLIP_G, SDXL_CLIP_L, TextConfig  # noqa: E402
from minifusion.keyops import apply_op, convert_state_dict  # noqa: E402
from minifusion.models.clip import TextEncoder, hf_keys, open_clip_keys  # noqa: E402
from minifusion.tokenizer import EOS, Tokenizer  # noqa: E402

KEYS_FILE = Path(__file__).resolve().parents[1] / ".." / "shared" / "sdxl" / "sd_xl_base_1.0.keys.txt"
PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "",
    "Café 東京 🐱🚀 it's ((masterpiece)), 8k!!!",
    "a sprawling cyberpunk metropolis at dusk, neon reflections on rain-soaked streets " * 6,  # > 75 tokens
]


@pytest.fixture(scope="module")
def ids():
    tok = Tokenizer()
    # both SDXL paddings: encoder 1 pads with EOS, encoder 2 with 0; argmax pooling must find the first EOS either way
    return torch.cat([tok(PROMPTS, pad_id=EOS), tok(PROMPTS, pad_id=0)])


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Weights at a realistic scale: LayerNorm gains near 1, non-zero biases, fan-in scaled matrices, so that a
    wrong mapping, transpose or activation shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.ndim == 1:
                p.copy_(1 + 0.2 * r if name.endswith("weight") else 0.1 * r)
            elif "embedding" in name:
                p.copy_(0.1 * r)
            else:
                p.copy_(r * p.shape[1] ** -0.5)
    return model.eval()


def check(name: str, ours: torch.Tensor, ref: torch.Tensor):
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max().item()
    print(f"{name}: max abs err {err:.2e}, output scale {scale:.2e}, ratio {err / scale:.2e}")
    assert ours.shape == ref.shape
    assert err <= 1e-5 * scale, f"{name}: max abs err {err:.3e} > 1e-5 x {scale:.3e}"


def hf_config(width, layers, mlp, act, projection):
    return transformers.CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_size=width,
                                       num_hidden_layers=layers, num_attention_heads=width // 64,
                                       intermediate_size=mlp, hidden_act=act, projection_dim=projection)


def text_config(ref_config, architecture) -> TextConfig:
    return TextConfig.from_diffusers_config({**ref_config.to_dict(), "architectures": [architecture]})


def hf_prefix(arch: str) -> str:
    # every hub SDXL text_encoder/model.safetensors (saved by transformers 4) has `text_model.` keys; transformers 5
    # strips that prefix from CLIPTextModel on load and saves without it, while WithProjection keeps it
    if arch == "CLIPTextModelWithProjection" or int(transformers.__version__.split(".")[0]) < 5:
        return "text_model."
    return ""


def load_ours(cfg: TextConfig, source: dict, table: dict) -> TextEncoder:
    model = TextEncoder(cfg)
    model.load_state_dict(convert_state_dict(source, table), strict=True)
    return model.eval()


@torch.no_grad()
def test_encoder1_vs_transformers(ids):
    ref = randomize_(transformers.CLIPTextModel(hf_config(64, 3, 256, "quick_gelu", 64)), seed=1)
    cfg = text_config(ref.config, "CLIPTextModel")
    assert cfg.act == "quick_gelu" and cfg.projection_dim is None
    ours = load_ours(cfg, ref.state_dict(), hf_keys(cfg, prefix=hf_prefix("CLIPTextModel")))
    h, pooled = ours(ids)
    check("encoder 1 penultimate vs transformers", h, ref(ids, output_hidden_states=True).hidden_states[-2])
    assert pooled is None
    # SDXL never reads CLIP-L's last layer: it must not run (a NaN there cannot reach the output)
    for p in ours.encoder.layers[-1].parameters():
        p.fill_(float("nan"))
    assert torch.equal(ours(ids)[0], h)


@torch.no_grad()
def test_encoder2_vs_transformers(ids):
    ref = randomize_(transformers.CLIPTextModelWithProjection(hf_config(128, 3, 512, "gelu", 96)), seed=2)
    cfg = text_config(ref.config, "CLIPTextModelWithProjection")
    assert (cfg.act, cfg.width, cfg.heads, cfg.projection_dim) == ("gelu", 128, 2, 96)
    ours = load_ours(cfg, ref.state_dict(), hf_keys(cfg, prefix=hf_prefix("CLIPTextModelWithProjection")))
    h, pooled = ours(ids)
    out = ref(ids, output_hidden_states=True)
    check("encoder 2 penultimate vs transformers", h, out.hidden_states[-2])
    check("encoder 2 pooled vs transformers", pooled, out.text_embeds)


@torch.no_grad()
def test_encoder2_vs_open_clip(ids):
    # open_clip's own text tower in its own names: checks the q/k/v row split of in_proj and the orientation of
    # text_projection ([width, proj], used as x @ P) by output, with width != proj so a transpose cannot pass
    from open_clip.transformer import TextTransformer

    ref = TextTransformer(context_length=77, vocab_size=49408, width=128, heads=2, layers=3, mlp_ratio=4.0,
                         output_dim=96, act_layer=nn.GELU)
    ref = randomize_(ref, seed=3)
    assert ref.text_projection.shape == (128, 96)
    cfg = TextConfig(width=128, layers=3, heads=2, mlp_dim=512, act="gelu", projection_dim=96)
    ours = load_ours(cfg, ref.state_dict(), open_clip_keys(cfg))
    h, pooled = ours(ids)
    # as sgm's FrozenOpenCLIPEmbedder2: penultimate = output of the second-to-last resblock; pooled = ln_final at
    # the argmax token @ text_projection, not normalised
    out = ref.forward_intermediates(ids, output_fmt="NLC")
    check("encoder 2 penultimate vs open_clip", h, out["text_intermediates"][-2])
    check("encoder 2 pooled vs open_clip", pooled, out["text_features"])


def file_shapes(prefix: str) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in KEYS_FILE.read_text().splitlines():
        key, shape = line.split(" ")
        if key.startswith(prefix):
            shapes[key[len(prefix):]] = tuple(int(s) for s in shape.strip("[]").split(",") if s)
    return shapes


def numel(shapes) -> int:
    return sum(torch.Size(s).numel() for s in shapes)


def meta_load(cfg: TextConfig, source_shapes: dict, table: dict) -> TextEncoder:
    """Build ours full size on the meta device and load meta tensors of the source shapes through the table,
    strictly, as the checkpoint loader does."""
    with torch.device("meta"):
        model = TextEncoder(cfg)
        source = {k: torch.empty(s) for k, s in source_shapes.items()}
    model.load_state_dict(convert_state_dict(source, table), strict=True, assign=True)
    return model


@pytest.mark.skipif(not KEYS_FILE.exists(), reason=f"{KEYS_FILE} absent (shared SDXL reference data)")
def test_sdxl_single_file_structure():
    clip_l = file_shapes("conditioner.embedders.0.transformer.text_model.")
    del clip_l["embeddings.position_ids"]
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in TextEncoder(SDXL_CLIP_L).state_dict().items()}
    assert ours == clip_l
    assert numel(ours.values()) == 123_060_480
    meta_load(SDXL_CLIP_L, clip_l, hf_keys(SDXL_CLIP_L, prefix=""))

    big_g = file_shapes("conditioner.embedders.1.model.")
    del big_g["logit_scale"]
    table = open_clip_keys(SDXL_CLIP_G)
    assert {src for src, _ in table.values()} == big_g.keys()
    model = meta_load(SDXL_CLIP_G, big_g, table)
    for k, (src, op) in table.items():
        assert tuple(apply_op(torch.empty(big_g[src], device="meta"), op).shape) == tuple(model.state_dict()[k].shape)
    assert sum(p.numel() for p in model.parameters()) == numel(big_g.values()) == 694_659_840


@pytest.mark.parametrize("arch, width, layers, mlp, act, preset", [
    ("CLIPTextModel", 768, 12, 3072, "quick_gelu", SDXL_CLIP_L),  # diffusers text_encoder/
    ("CLIPTextModelWithProjection", 1280, 32, 5120, "gelu", SDXL_CLIP_G),  # diffusers text_encoder_2/
])
def test_sdxl_diffusers_structure(arch, width, layers, mlp, act, preset):
    config = hf_config(width, layers, mlp, act, width)
    cfg = text_config(config, arch)
    assert cfg == preset
    with torch.device("meta"):
        theirs = {k: tuple(v.shape) for k, v in getattr(transformers, arch)(config).state_dict().items()}
    theirs.pop("text_model.embeddings.position_ids", None)
    table = hf_keys(cfg, prefix=hf_prefix(arch))
    assert {src for src, _ in table.values()} == theirs.keys()
    model = meta_load(cfg, theirs, table)
    assert all(tuple(model.state_dict()[k].shape) == theirs[src] for k, (src, _) in table.items())
