"""Load SDXL weights from safetensors: the single-file layout or the diffusers folder layout.

Loading is strict. Every tensor of every component is checked (present, expected shape after its op) from the
safetensors headers before a byte of weights is read, and everything that does not fit is reported in one
error. Modules are built on the meta device and filled with `assign=True`, one tensor at a time, so loading
never holds the model twice.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .config import SDXL_VAE, TextConfig, UNetConfig, VAEConfig
from .keyops import apply_op
from .models import clip, unet, vae

COMPONENTS = ("unet", "vae", "text_encoder_1", "text_encoder_2")

# Single-file layout (sd_xl_base_1.0.safetensors): one prefix per component. Our module names are the
# single-file names, so the UNet, VAE and CLIP-L load by prefix stripping; bigG keeps open_clip's names.
SINGLE_FILE_PREFIX = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder_1": "conditioner.embedders.0.transformer.text_model.",
    "text_encoder_2": "conditioner.embedders.1.model.",
}
# Present in the official file, absent in some fine-tunes, needed by nobody (position_ids are rebuilt as
# arange(77) because some merged files carry corrupted ones).
SINGLE_FILE_OPTIONAL = (
    "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
    "conditioner.embedders.1.model.logit_scale",
)

# Diffusers folder layout: (sub-folder, weights file stem) per component.
DIFFUSERS_FOLDER = {
    "unet": ("unet", "diffusion_pytorch_model"),
    "vae": ("vae", "diffusion_pytorch_model"),
    "text_encoder_1": ("text_encoder", "model"),
    "text_encoder_2": ("text_encoder_2", "model"),
}
DIFFUSERS_OPTIONAL = ("text_model.embeddings.position_ids", "embeddings.position_ids")

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SHOWN = 5  # how many offending keys an error lists per kind


class CheckpointError(Exception):
    """A checkpoint that cannot be loaded; the message names the file and what to do."""


@dataclass(frozen=True)
class Configs:
    unet: UNetConfig
    vae: VAEConfig
    text_encoder_1: TextConfig
    text_encoder_2: TextConfig


class TensorSource:
    """The tensors of one or more safetensors files, read lazily (headers first, data on demand)."""

    def __init__(self, files: list[Path]):
        self.files = files
        self.where: dict[str, Path] = {}
        self.handles = {}
        self.metadata: dict[str, str] = {}
        for f in files:
            try:
                h = safe_open(str(f), framework="pt")
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{f}: not a readable safetensors file ({_first_line(e)}); "
                                      "the download may be truncated or corrupt, download it again") from None
            self.handles[f] = h
            self.metadata.update(h.metadata() or {})
            for k in h.keys():
                self.where[k] = f

    def keys(self):
        return self.where.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.handles[self.where[key]].get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        f = self.where[key]
        try:
            return self.handles[f].get_tensor(key)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{f}: tensor {key} cannot be read ({_first_line(e)}); "
                                  "the file is corrupt, download it again") from None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _op_shape(shape: tuple[int, ...], op: str) -> tuple[int, ...]:
    return tuple(apply_op(torch.empty(shape, device="meta"), op).shape)


# ---------------------------------------------------------------------------------------------------------
# Which family a set of keys belongs to, so a wrong file gets a name rather than a list of 2000 missing keys.

FAMILIES = [
    (r"(lora_unet_|lora_te|\.lora_down\.|\.lora_up\.|\.lora_A\.|\.lora_B\.)", "a LoRA (load it into a base model, not alone)"),
    (r"^(model\.diffusion_model\.)?joint_blocks\.", "a Stable Diffusion 3 checkpoint"),
    (r"^(model\.diffusion_model\.)?double_blocks\.", "a Flux checkpoint"),
    (r"^cond_stage_model\.transformer\.", "a Stable Diffusion 1.x checkpoint"),
    (r"^cond_stage_model\.model\.", "a Stable Diffusion 2.x checkpoint"),
]


def identify_family(keys) -> str | None:
    """A human name for a non-SDXL checkpoint recognised from its keys, or None."""
    keys = list(keys)
    for pattern, name in FAMILIES:
        rx = re.compile(pattern)
        if any(rx.search(k) for k in keys):
            return name
    # the refiner conditions on bigG alone, which it keeps in the first embedder slot
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys) and \
            not any(k.startswith(SINGLE_FILE_PREFIX["text_encoder_1"]) for k in keys):
        return "an SDXL refiner checkpoint (minifusion needs the SDXL base model)"
    return None


# ---------------------------------------------------------------------------------------------------------
# Architecture of a single file, inferred from tensor shapes (the file carries no config). SDXL conventions
# fill what shows in no tensor: 64-wide attention heads, 32 norm groups, the VAE scaling factor, and the
# activation of each text encoder (CLIP-L quick_gelu, bigG gelu).

def _count(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    found = {m.group(1) for k in keys if (m := rx.match(k))}
    return max((int(i) for i in found), default=-1) + 1


def infer_configs(src: TensorSource, path: Path) -> Configs:
    keys = list(src.keys())
    u, v = SINGLE_FILE_PREFIX["unet"], SINGLE_FILE_PREFIX["vae"]
    t1, t2 = SINGLE_FILE_PREFIX["text_encoder_1"], SINGLE_FILE_PREFIX["text_encoder_2"]
    try:
        te1 = _text_config(src, keys, t1, "embeddings.token_embedding.weight", "embeddings.position_embedding.weight",
                           r"encoder\.layers\.(\d+)\.", "encoder.layers.0.mlp.fc1.weight", None, "quick_gelu")
        te2 = _text_config(src, keys, t2, "token_embedding.weight", "positional_embedding",
                           r"transformer\.resblocks\.(\d+)\.", "transformer.resblocks.0.mlp.c_fc.weight",
                           "text_projection", "gelu")

        ch = src.shape(u + "input_blocks.0.0.weight")
        levels = sum(1 for k in keys if re.fullmatch(re.escape(u) + r"input_blocks\.\d+\.0\.op\.weight", k)) + 1
        n_blocks = _count(keys, re.escape(u) + r"input_blocks\.(\d+)\.")
        per_level = n_blocks // levels - 1
        first = [1 + i * (per_level + 1) for i in range(levels)]
        chans = [src.shape(f"{u}input_blocks.{b}.0.out_layers.3.weight")[0] for b in first]
        depth = tuple(_count(keys, re.escape(f"{u}input_blocks.{b}.1.") + r"transformer_blocks\.(\d+)\.") for b in first)
        ctx_key = next(k for k in keys if k.startswith(u) and k.endswith("attn2.to_k.weight"))
        adm = src.shape(u + "label_emb.0.0.weight")[1]
        width, height = _resolution(src.metadata)
        unet_cfg = UNetConfig(
            in_channels=ch[1], out_channels=src.shape(u + "out.2.weight")[0], model_channels=ch[0],
            channel_mult=tuple(c // ch[0] for c in chans), num_res_blocks=per_level, transformer_depth=depth,
            transformer_depth_middle=_count(keys, re.escape(u + "middle_block.1.") + r"transformer_blocks\.(\d+)\."),
            context_dim=src.shape(ctx_key)[1], adm_in_channels=adm,
            addition_time_embed_dim=(adm - te2.projection_dim) // 6, sample_size=max(width, height) // 8)

        vch = src.shape(v + "encoder.conv_in.weight")
        vlevels = _count(keys, re.escape(v) + r"encoder\.down\.(\d+)\.")
        vae_cfg = VAEConfig(
            in_channels=vch[1], out_channels=src.shape(v + "decoder.conv_out.weight")[0],
            latent_channels=src.shape(v + "post_quant_conv.weight")[0], ch=vch[0],
            ch_mult=tuple(src.shape(f"{v}encoder.down.{i}.block.0.conv1.weight")[0] // vch[0] for i in range(vlevels)),
            num_res_blocks=_count(keys, re.escape(v) + r"encoder\.down\.0\.block\.(\d+)\."),
            scaling_factor=SDXL_VAE.scaling_factor)
    except (KeyError, StopIteration, ZeroDivisionError, IndexError, TypeError) as e:
        raise CheckpointError(f"{path}: not an SDXL checkpoint (cannot find {e}); minifusion needs SDXL base 1.0 "
                              "or a fine-tune of it as a .safetensors file") from None
    return Configs(unet_cfg, vae_cfg, te1, te2)


def _text_config(src, keys, prefix, tok, pos, layer_rx, fc1, projection, act) -> TextConfig:
    vocab, width = src.shape(prefix + tok)
    return TextConfig(vocab_size=vocab, max_length=src.shape(prefix + pos)[0], width=width,
                      layers=_count(keys, re.escape(prefix) + layer_rx), heads=width // 64,
                      mlp_dim=src.shape(prefix + fc1)[0], act=act,
                      projection_dim=src.shape(prefix + projection)[1] if projection else None)


def _resolution(metadata: dict[str, str]) -> tuple[int, int]:
    """The native resolution, from the Stability model-spec header key; SDXL's 1024 when absent."""
    value = metadata.get("modelspec.resolution", "")
    m = re.fullmatch(r"\s*(\d+)\s*[x×]\s*(\d+)\s*", value)
    return (int(m.group(1)), int(m.group(2))) if m else (1024, 1024)


# ---------------------------------------------------------------------------------------------------------
# The key tables, one per layout: {component: {our_key: (source_key, op)}}.

def single_file_tables(cfgs: Configs, models: dict[str, torch.nn.Module]) -> dict[str, dict[str, tuple[str, str]]]:
    tables = {c: {k: (SINGLE_FILE_PREFIX[c] + k, "") for k in models[c].state_dict()}
              for c in ("unet", "vae", "text_encoder_1")}
    p2 = SINGLE_FILE_PREFIX["text_encoder_2"]
    tables["text_encoder_2"] = {k: (p2 + s, op) for k, (s, op) in clip.open_clip_keys(cfgs.text_encoder_2).items()}
    return tables


def diffusers_tables(cfgs: Configs, text_prefix: tuple[str, str] = ("text_model.", "text_model.")
                     ) -> dict[str, dict[str, tuple[str, str]]]:
    return {
        "unet": unet.diffusers_keys(cfgs.unet),
        "vae": vae.diffusers_keys(cfgs.vae),
        "text_encoder_1": clip.hf_keys(cfgs.text_encoder_1, text_prefix[0]),
        "text_encoder_2": clip.hf_keys(cfgs.text_encoder_2, text_prefix[1]),
    }


def _text_prefix(src: TensorSource) -> str:
    # transformers >= 5 saves CLIPTextModel without the "text_model." prefix that every SDXL release has
    return "text_model." if any(k.startswith("text_model.") for k in src.keys()) else ""


MODEL_CLASSES = {"unet": unet.UNet, "vae": vae.VAE, "text_encoder_1": clip.TextEncoder,
                 "text_encoder_2": clip.TextEncoder}


def meta_models(cfgs: Configs) -> dict[str, torch.nn.Module]:
    """The four networks without memory: what a checkpoint must fill, key for key and shape for shape."""
    with torch.device("meta"):
        return {c: MODEL_CLASSES[c](getattr(cfgs, c)) for c in COMPONENTS}


# ---------------------------------------------------------------------------------------------------------
# Finding the files.

def _resolve_single(path: Path) -> Path:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: pickle checkpoints are not loaded (they can run code); convert it to "
                              ".safetensors first, or download the .safetensors release")
    return path


def _diffusers_files(folder: Path, sub: str, stem: str) -> list[Path]:
    d = folder / sub
    for variant in ("", ".fp16"):
        index = d / f"{stem}{variant}.safetensors.index.json"
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, AttributeError):
                raise CheckpointError(f"{index}: not a valid safetensors index (no weight_map)") from None
            missing = [s for s in shards if not (d / s).is_file()]
            if missing:
                raise CheckpointError(f"{index}: shard {missing[0]} is missing; download the whole {sub}/ folder")
            return [d / s for s in shards]
        single = d / f"{stem}{variant}.safetensors"
        if single.is_file():
            return [single]
    pickled = [p.name for p in d.glob(f"{stem}*") if p.suffix in PICKLE_SUFFIXES] if d.is_dir() else []
    if pickled:
        raise CheckpointError(f"{d}: only pickle weights ({pickled[0]}) found, which are not loaded (they can run "
                              "code); download the .safetensors variant of this folder")
    raise CheckpointError(f"{d}: no {stem}.safetensors (or .fp16 / sharded variant); download the {sub}/ folder")


def find_checkpoint(path: Path) -> tuple[str, Path]:
    """('single', file) or ('diffusers', folder)."""
    if path.is_file():
        return "single", _resolve_single(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if (path / "unet").is_dir() or (path / "model_index.json").is_file():
        return "diffusers", path
    files = sorted(path.glob("*.safetensors"))
    if len(files) == 1:
        return "single", files[0]
    if len(files) > 1:
        names = ", ".join(f.name for f in files[:4])
        raise CheckpointError(f"{path}: several .safetensors files ({names}); pass the one to use")
    pickled = [p for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
    if pickled:
        _resolve_single(pickled[0])
    raise CheckpointError(f"{path}: nothing loadable here; put sd_xl_base_1.0.safetensors (or a diffusers-layout "
                          "SDXL folder) there, see weights/README.md")


# ---------------------------------------------------------------------------------------------------------
# Checking and loading.

def check(table: dict[str, tuple[str, str]], expected: dict[str, torch.Size], src: TensorSource,
          source_keys, optional) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, misshapen) for one component."""
    missing, misshapen = [], []
    for ours, (key, op) in table.items():
        if key not in src.where:
            missing.append(key)
            continue
        try:
            got = _op_shape(src.shape(key), op)
        except RuntimeError:
            got = src.shape(key)
        if got != tuple(expected[ours]):
            misshapen.append(f"{key} {list(src.shape(key))} (model wants {list(expected[ours])})")
    used = {key for key, _ in table.values()}
    unexpected = [k for k in source_keys if k not in used and k not in optional]
    return missing, unexpected, misshapen


def _report(where: Path, missing, unexpected, misshapen) -> str:
    parts = []
    for name, items in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)):
        if items:
            more = f", ... ({len(items) - SHOWN} more)" if len(items) > SHOWN else ""
            parts.append(f"{len(items)} {name}: " + ", ".join(items[:SHOWN]) + more)
    return f"{where}: does not match the SDXL architecture; " + "; ".join(parts)


def _materialise(model, table, src: TensorSource, device, dtype) -> torch.nn.Module:
    state = {}
    for ours, (key, op) in table.items():
        t = apply_op(src.get(key), op)
        state[ours] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype).contiguous()
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _open(path: Path) -> tuple[str, Path, TensorSource | None, Configs]:
    layout, where = find_checkpoint(path)
    if layout == "diffusers":
        return layout, where, None, _diffusers_configs(where)
    src = TensorSource([where])
    family = identify_family(src.keys())
    if family:
        raise CheckpointError(f"{where}: this is {family}; minifusion needs SDXL base 1.0 or a fine-tune of it")
    cfgs = infer_configs(src, where)
    _check_consistent(cfgs, where)
    return layout, where, src, cfgs


def inspect_checkpoint(path: str | Path) -> Configs:
    """The architecture of a checkpoint, from headers and config files only (no weights are read)."""
    return _open(Path(path))[3]


def load_components(path: str | Path, device: torch.device, dtypes: dict[str, torch.dtype]):
    """Load the four SDXL networks. Returns ({component: module}, Configs, metadata)."""
    layout, where, src, cfgs = _open(Path(path))
    models = meta_models(cfgs)
    if layout == "single":
        tables = single_file_tables(cfgs, models)
        sources = {c: src for c in COMPONENTS}
        missing, unexpected, misshapen = [], [], []
        for c in COMPONENTS:
            keys = [k for k in src.keys() if k.startswith(SINGLE_FILE_PREFIX[c])]
            m, u, s = check(tables[c], _shapes(models[c]), src, keys, SINGLE_FILE_OPTIONAL)
            missing, unexpected, misshapen = missing + m, unexpected + u, misshapen + s
        unexpected += [k for k in src.keys() if not k.startswith(tuple(SINGLE_FILE_PREFIX.values()))]
        if missing or unexpected or misshapen:
            raise CheckpointError(_report(where, missing, unexpected, misshapen))
    else:
        sources = {c: TensorSource(_diffusers_files(where, *DIFFUSERS_FOLDER[c])) for c in COMPONENTS}
        tables = diffusers_tables(cfgs, (_text_prefix(sources["text_encoder_1"]), _text_prefix(sources["text_encoder_2"])))
        for c in COMPONENTS:
            sub = DIFFUSERS_FOLDER[c][0]
            missing, unexpected, misshapen = check(tables[c], _shapes(models[c]), sources[c], sources[c].keys(),
                                                   DIFFUSERS_OPTIONAL)
            if missing or unexpected or misshapen:
                raise CheckpointError(_report(where / sub, missing, unexpected, misshapen))
    models = {c: _materialise(models[c], tables[c], sources[c], device, dtypes[c]) for c in COMPONENTS}
    return models, cfgs, sources["unet"].metadata


def _shapes(model: torch.nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in model.state_dict().items()}


def _diffusers_configs(folder: Path) -> Configs:
    def read(sub, cls):
        f = folder / sub / "config.json"
        if not f.is_file():
            raise CheckpointError(f"{f}: missing; a diffusers-layout folder needs config.json in {sub}/")
        try:
            return cls.from_diffusers_config(json.loads(f.read_text()))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{f}: not an SDXL {sub} config ({_first_line(e)})") from None
    cfgs = Configs(read("unet", UNetConfig), read("vae", VAEConfig), read("text_encoder", TextConfig),
                   read("text_encoder_2", TextConfig))
    _check_consistent(cfgs, folder)
    return cfgs


def _check_consistent(cfgs: Configs, where: Path) -> None:
    """The UNet reads both encoders: its context is their widths side by side, its pooled input encoder 2's."""
    width = cfgs.text_encoder_1.width + cfgs.text_encoder_2.width
    if cfgs.unet.context_dim != width or cfgs.unet.pooled_dim != cfgs.text_encoder_2.projection_dim:
        raise CheckpointError(f"{where}: the UNet expects context {cfgs.unet.context_dim} / pooled "
                              f"{cfgs.unet.pooled_dim} but the text encoders give {width} / "
                              f"{cfgs.text_encoder_2.projection_dim}; the components are from different models")
