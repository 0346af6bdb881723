"""Load SDXL weights from safetensors: the single-file layout or the diffusers folder layout.

Loading is strict. Every tensor of every component is checked (present, expected shape after its op, floating
point) from the safetensors headers before a byte of weights is read, and everything that does not fit is
reported in one error. Modules are built on the meta device and filled with `assign=True`, one tensor at a
time, so loading never holds the model twice.

Files are untrusted: whatever is wrong with one, loading raises CheckpointError naming the file and what to do.
Pickle formats are never opened. safetensors_check validates each header in full before a tensor is read.
Architecture counts inferred from keys or config.json are bounded (COUNT_LIMITS), so a forged layer index
cannot make building the meta model run for hours. Which files hold the tensors is model_files' business;
what kind of model a wrong file is, families'.
"""
from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from .config import SDXL_VAE, TextConfig, UNetConfig, VAEConfig
from .families import CHECKPOINTS, identify, pipeline_family
from .keyops import apply_op
from .model_files import diffusers_files, find_checkpoint, read_json
from .models import clip, unet, vae
from .noise import MARKERS
from .safetensors_check import DTYPES, CheckpointError, SafetensorsFile, first_line, show

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

NEED = "minifusion needs SDXL base 1.0 or a fine-tune of it as a .safetensors file"
SHOWN = 5  # how many offending keys an error lists per kind


@dataclass(frozen=True)
class Configs:
    unet: UNetConfig
    vae: VAEConfig
    text_encoder_1: TextConfig
    text_encoder_2: TextConfig


class TensorSource:
    """The tensors of one or more safetensors files: headers validated on opening, data read on demand."""

    def __init__(self, files: list[Path]):
        self.files = files
        self.where: dict[str, Path] = {}
        self.handles: dict[Path, SafetensorsFile] = {}
        self.metadata: dict[str, str] = {}
        try:
            for f in files:
                h = self.handles[f] = SafetensorsFile(f)
                self.metadata.update(h.metadata)
                for k in h.entries:
                    if k in self.where:
                        raise CheckpointError(f"{f}: tensor {show(k)} is also in {self.where[k]}; the shards "
                                              "disagree, download the folder again")
                    self.where[k] = f
        except BaseException:
            self.close()
            raise

    def keys(self):
        return self.where.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self.handles[self.where[key]].entries[key].shape

    def dtype(self, key: str) -> str:
        return self.handles[self.where[key]].entries[key].dtype

    def nbytes(self, key: str) -> int:
        entry = self.handles[self.where[key]].entries[key]
        return entry.end - entry.begin

    def get(self, key: str) -> torch.Tensor:
        return self.handles[self.where[key]].read(key)

    def close(self) -> None:
        for h in self.handles.values():
            h.close()


def _op_shape(shape: tuple[int, ...], op: str) -> tuple[int, ...]:
    return tuple(apply_op(torch.empty(shape, device="meta"), op).shape)


# ---------------------------------------------------------------------------------------------------------
# Architecture of a single file, inferred from tensor shapes (the file carries no config). SDXL conventions
# fill what shows in no tensor: 64-wide attention heads, 32 norm groups, the VAE scaling factor, and the
# activation of each text encoder (CLIP-L quick_gelu, bigG gelu).

def _count(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    found = {m.group(1) for k in keys if (m := rx.match(k))}
    n = max((int(i) for i in found), default=-1) + 1
    if n > max(COUNT_LIMITS.values()):
        raise ValueError(f"a block index of {n - 1}")
    return n


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

        vae_cfg = vae_config(src, keys, v)
    except KeyError as e:
        raise CheckpointError(f"{path}: not an SDXL checkpoint (no tensor {show(e.args[0])}); {NEED}") from None
    except StopIteration:
        raise CheckpointError(f"{path}: not an SDXL checkpoint (no cross-attention in its UNet); {NEED}") from None
    except (ZeroDivisionError, IndexError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: not an SDXL checkpoint (its tensor shapes do not describe an SDXL network: "
                              f"{str(e)[:100] or type(e).__name__}); {NEED}") from None
    return Configs(unet_cfg, vae_cfg, te1, te2)


def vae_config(src, keys, prefix: str) -> VAEConfig:
    """The VAE's architecture from its single-file (LDM) tensors under `prefix`; KeyError, ValueError,
    IndexError or ZeroDivisionError where they do not describe one."""
    ch = src.shape(prefix + "encoder.conv_in.weight")
    levels = _count(keys, re.escape(prefix) + r"encoder\.down\.(\d+)\.")
    return VAEConfig(
        in_channels=ch[1], out_channels=src.shape(prefix + "decoder.conv_out.weight")[0],
        latent_channels=src.shape(prefix + "post_quant_conv.weight")[0], ch=ch[0],
        ch_mult=tuple(src.shape(f"{prefix}encoder.down.{i}.block.0.conv1.weight")[0] // ch[0] for i in range(levels)),
        num_res_blocks=_count(keys, re.escape(prefix) + r"encoder\.down\.0\.block\.(\d+)\."),
        scaling_factor=SDXL_VAE.scaling_factor)


def _text_config(src, keys, prefix, tok, pos, layer_rx, fc1, projection, act) -> TextConfig:
    vocab, width = src.shape(prefix + tok)
    return TextConfig(vocab_size=vocab, max_length=src.shape(prefix + pos)[0], width=width,
                      layers=_count(keys, re.escape(prefix) + layer_rx), heads=width // 64,
                      mlp_dim=src.shape(prefix + fc1)[0], act=act,
                      projection_dim=src.shape(prefix + projection)[1] if projection else None)


def _resolution(metadata: dict[str, str]) -> tuple[int, int]:
    """The native resolution, from the Stability model-spec header key; SDXL's 1024 when absent or implausible."""
    value = metadata.get("modelspec.resolution", "")
    m = re.fullmatch(r"\s*(\d{1,5})\s*[x×]\s*(\d{1,5})\s*", value)
    size = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    return size if all(64 <= v <= 16384 and v % 8 == 0 for v in size) else (1024, 1024)


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
# Checking and loading.

FLOATS = {name for name, dt in DTYPES.items() if dt.is_floating_point}


def check(table: dict[str, tuple[str, str]], expected: dict[str, torch.Size], src: TensorSource,
          source_keys, optional) -> tuple[list[str], list[str], list[str], list[str]]:
    """(missing, unexpected, misshapen, not floating point) for one component."""
    missing, misshapen, integer = [], [], []
    for ours, (key, op) in table.items():
        if key not in src.where:
            missing.append(key)
            continue
        try:
            got = _op_shape(src.shape(key), op)
        except (RuntimeError, IndexError):
            got = src.shape(key)
        if got != tuple(expected[ours]):
            misshapen.append(f"{key} {show(list(src.shape(key)), 60)} (model wants {list(expected[ours])})")
        elif src.dtype(key) not in FLOATS:
            integer.append(f"{key} {src.dtype(key)}")
    used = {key for key, _ in table.values()}
    unexpected = [k for k in source_keys if k not in used and k not in optional]
    return missing, unexpected, misshapen, integer


def _plain(s: str) -> str:
    """A key as is, unless it would break the one-line message (file keys are attacker-controlled)."""
    return s if s.isprintable() and len(s) <= 200 else show(s, 200)


def _report(where: Path, missing, unexpected, misshapen, integer) -> str:
    parts = []
    for name, items in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen),
                        ("not floating point", integer)):
        if items:
            more = f", ... ({len(items) - SHOWN} more)" if len(items) > SHOWN else ""
            parts.append(f"{len(items)} {name}: " + ", ".join(_plain(k) for k in items[:SHOWN]) + more)
    return f"{where}: does not match the SDXL architecture; " + "; ".join(parts)


def _heap_trimmer() -> Callable[[], object]:
    # glibc keeps freed blocks below its mmap threshold (which grows to 32 MiB as big blocks are freed) in the heap,
    # between the weights loaded after them; malloc_trim hands their pages back. Other C libraries: nothing to do
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None) or (lambda *_: None)
    except (OSError, TypeError):
        return lambda *_: None


trim_heap = _heap_trimmer()


def load_part(info, strict, device, dtype) -> torch.nn.Module:
    """A network found beside the checkpoint (a VAE, a ControlNet: `info` with files, where, config and table)
    onto device in dtype; `strict` builds it and checks its tensors again (the files may have changed since)."""
    src = TensorSource(list(info.files))
    try:
        return _materialise(strict(info.where, info.config, info.table, src), info.table, src, device, dtype)
    finally:
        src.close()


def _materialise(model, table, src: TensorSource, device, dtype, patch=None, read=None) -> torch.nn.Module:
    state = {}
    for ours, (key, op) in table.items():
        t = apply_op(src.get(key), op)
        if read is not None:
            read(src.nbytes(key))
        if patch is not None:
            merged = patch(ours, t)  # before the cast: merged in float32, an fp16 model is rounded once
            if merged is not t:
                # the merge's float32 temporaries would stay resident as holes: two SDXL LoRAs, 10.6 GB of
                # resident memory growth for a 6.9 GB file instead of 7.3
                trim_heap(0)
            t = merged
        state[ours] = t.to(device=device, dtype=dtype).contiguous()
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _open(path: Path) -> tuple[str, Path, TensorSource | None, Configs]:
    layout, where = find_checkpoint(path)
    if layout == "diffusers":
        family = _folder_family(where)
        if family:
            raise CheckpointError(f"{where}: this is {family}; minifusion needs SDXL base 1.0 or a fine-tune of it")
        return layout, where, None, _diffusers_configs(where)
    src = TensorSource([where])
    try:
        family = identify(src.keys(), CHECKPOINTS)
        if family:
            raise CheckpointError(f"{where}: this is {family}; minifusion needs SDXL base 1.0 or a fine-tune of it")
        cfgs = infer_configs(src, where)
        _check_plausible(cfgs, where)
        _check_consistent(cfgs, where)
    except BaseException:
        src.close()
        raise
    return layout, where, src, cfgs


def inspect_checkpoint(path: str | Path) -> Configs:
    """The architecture of a checkpoint, from headers and config files only (no weights are read)."""
    _, _, src, cfgs = _open(Path(path))
    if src is not None:
        src.close()
    return cfgs


def load_components(path: str | Path, devices: torch.device | dict[str, torch.device],
                    dtypes: dict[str, torch.dtype], skip: tuple[str, ...] = (), patch=None,
                    progress: Callable[[int, int], None] | None = None):
    """Load the four SDXL networks, each onto its device (one for all, or one per component) in its dtype.
    Components in `skip` are checked like the others but not read (a VAE given in its own file replaces the
    checkpoint's). patch(component, our_key, tensor) -> tensor, if given, sees every tensor as read (file dtype,
    our layout) before it is cast and placed: LoRAs merge there (minifusion.lora).
    progress(bytes read, bytes to read) after every tensor.
    Returns ({component: module}, Configs, metadata)."""
    if not isinstance(devices, dict):
        devices = dict.fromkeys(COMPONENTS, devices)
    layout, where, src, cfgs = _open(Path(path))
    sources: dict[str, TensorSource] = {}
    try:
        try:
            models = meta_models(cfgs)
        except (ValueError, TypeError, ZeroDivisionError, RuntimeError) as e:
            # bounded but odd numbers (say 30 channels in 32 norm groups) that no SDXL network has
            raise CheckpointError(f"{where}: the architecture it describes cannot be built ({first_line(e)[:100]}); "
                                  f"{NEED}") from None
        if layout == "single":
            tables = single_file_tables(cfgs, models)
            sources = {c: src for c in COMPONENTS}
            problems = [[], [], [], []]
            for c in COMPONENTS:
                keys = [k for k in src.keys() if k.startswith(SINGLE_FILE_PREFIX[c])]
                for acc, found in zip(problems, check(tables[c], _shapes(models[c]), src, keys, SINGLE_FILE_OPTIONAL)):
                    acc += found
            problems[1] += [k for k in src.keys() if not k.startswith(tuple(SINGLE_FILE_PREFIX.values()))
                            and k not in MARKERS]  # v_pred / ztsnr: read by minifusion.noise
            if any(problems):
                raise CheckpointError(_report(where, *problems))
        else:
            for c in COMPONENTS:
                sources[c] = TensorSource(diffusers_files(where, *DIFFUSERS_FOLDER[c]))
            tables = diffusers_tables(cfgs, (_text_prefix(sources["text_encoder_1"]),
                                             _text_prefix(sources["text_encoder_2"])))
            for c in COMPONENTS:
                problems = check(tables[c], _shapes(models[c]), sources[c], sources[c].keys(), DIFFUSERS_OPTIONAL)
                if any(problems):
                    raise CheckpointError(_report(where / DIFFUSERS_FOLDER[c][0], *problems))
        wanted = [c for c in COMPONENTS if c not in skip]
        total, done = sum(sources[c].nbytes(key) for c in wanted for key, _ in tables[c].values()), 0

        def read(n: int) -> None:
            nonlocal done
            done += n
            progress(done, total)

        models = {c: _materialise(models[c], tables[c], sources[c], devices[c], dtypes[c],
                                  partial(patch, c) if patch else None, read if progress else None)
                  for c in wanted}
        return models, cfgs, sources["unet"].metadata
    finally:
        for s in (src, *sources.values()):
            if s is not None:
                s.close()


def _shapes(model: torch.nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in model.state_dict().items()}


def _folder_family(folder: Path) -> str | None:
    """A human name for a non-SDXL-base diffusers folder, from its model_index.json, or None."""
    index = folder / "model_index.json"
    return pipeline_family(read_json(index)) if index.is_file() else None


def _diffusers_configs(folder: Path) -> Configs:
    def read(sub, cls):
        f = folder / sub / "config.json"
        if not f.is_file():
            raise CheckpointError(f"{f}: missing; a diffusers-layout folder needs config.json in {sub}/")
        config = read_json(f)
        try:
            return cls.from_diffusers_config(config)
        except (ValueError, KeyError, TypeError, ZeroDivisionError, IndexError, AttributeError) as e:
            raise CheckpointError(f"{f}: not an SDXL {sub} config ({first_line(e)[:100]})") from None
    cfgs = Configs(read("unet", UNetConfig), read("vae", VAEConfig), read("text_encoder", TextConfig),
                   read("text_encoder_2", TextConfig))
    _check_plausible(cfgs, folder)
    _check_consistent(cfgs, folder)
    return cfgs


# Bounds on every count of a config (SDXL's values in brackets), so that a forged layer index or config.json
# cannot make building the meta model run for hours: about 10^4 transformer blocks at worst, seconds to build.
LEVEL_LIMIT = 8  # UNet / VAE resolution levels [3 / 4]: the length of every per-level tuple
COUNT_LIMITS = {"num_res_blocks": 8, "transformer_depth": 64, "transformer_depth_middle": 64,  # [2, 10, 10]
                "layers": 128}  # [12 / 32]
ZERO_OK = ("transformer_depth", "transformer_depth_middle")  # a level without attention
WIDTH_LIMIT = 1 << 20  # any width or size; SDXL's largest is the 49408-token vocabulary


def _check_plausible(cfgs: Configs, where: Path) -> None:
    """Every number of every config is of its type, positive where it must be, and bounded."""
    for comp in COMPONENTS:
        cfg = getattr(cfgs, comp)
        for f in fields(cfg):
            value = getattr(cfg, f.name)
            if f.name == "act" or value is None:
                continue  # the text encoder refuses an activation it does not know
            if f.type in ("float", float):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < WIDTH_LIMIT
            else:
                items = value if isinstance(value, tuple) else (value,)
                low = 0 if f.name in ZERO_OK else 1
                high = COUNT_LIMITS.get(f.name, WIDTH_LIMIT)
                ok = 1 <= len(items) <= LEVEL_LIMIT and \
                    all(isinstance(x, int) and not isinstance(x, bool) and low <= x <= high for x in items)
            if not ok:
                raise CheckpointError(f"{where}: {comp} {f.name} = {show(value, 60)} is not a plausible SDXL value; "
                                      f"{NEED}")


def _check_consistent(cfgs: Configs, where: Path) -> None:
    """The UNet reads both encoders (its context is their widths side by side, its pooled input encoder 2's)
    and works on the VAE's latents."""
    width = cfgs.text_encoder_1.width + cfgs.text_encoder_2.width
    if cfgs.unet.context_dim != width or cfgs.unet.pooled_dim != cfgs.text_encoder_2.projection_dim:
        raise CheckpointError(f"{where}: the UNet expects context {cfgs.unet.context_dim} / pooled "
                              f"{cfgs.unet.pooled_dim} but the text encoders give {width} / "
                              f"{cfgs.text_encoder_2.projection_dim}; the components are from different models")
    latent = cfgs.vae.latent_channels
    if cfgs.unet.in_channels != latent or cfgs.unet.out_channels != latent:
        raise CheckpointError(f"{where}: the UNet takes {cfgs.unet.in_channels} channels and makes "
                              f"{cfgs.unet.out_channels}, the VAE's latents have {latent}: an inpainting or "
                              "instruct-pix2pix model, not a text-to-image one; " + NEED)
