"""A VAE from its own file, in place of the checkpoint's: `minifusion.load(..., vae=PATH)`.

Accepted: a single .safetensors with the original (LDM) keys, bare as in sdxl_vae.safetensors or under
`first_stage_model.` as inside a whole checkpoint; a single file with diffusers AutoencoderKL keys (a diffusers
vae/diffusion_pytorch_model.safetensors on its own); a diffusers folder (config.json beside
diffusion_pytorch_model[.fp16].safetensors, or sharded), or a pipeline folder whose vae/ is one. Loading is the
checkpoint loader's, with its strictness and its care with untrusted files: headers validated before any tensor
is read, pickles refused, every missing or misshapen tensor reported in one error.

SD 1.x, SDXL and SDXL's fp16-fix VAEs have the same keys and shapes, so which VAE it is comes from elsewhere:
- the latent scaling factor (SDXL 0.13025, SD 1.x/2.x 0.18215): a config.json states it; a single file may
  state its family in the ModelSpec header key `modelspec.architecture`; otherwise SDXL's is assumed, with a
  warning.
- whether it may run in float16: SDXL's VAE overflows there; madebyollin's sdxl-vae-fp16-fix (the same network
  fine-tuned to smaller activations) does not. Its config says `force_upcast: false`, diffusers' flag for exactly
  this. Its single file carries no marker: no header metadata, and not its name either (it is released as
  sdxl_vae.safetensors, the stock VAE's own name, and users rename it freely). So that released file is
  recognised by its bytes, hashed only when its size matches, which costs other files nothing. Any other
  file runs in float32 where the rest runs in float16: slower, never wrong.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import Configs, TensorSource, _check_plausible, _count, _report, _shapes, check, load_part, vae_config
from .config import SDXL_CLIP_G, SDXL_CLIP_L, SDXL_UNET, SDXL_VAE, VAEConfig
from .families import CHECKPOINTS, identify
from .model_files import diffusers_files, find_part, read_json
from .models import vae
from .safetensors_check import CheckpointError, first_line, show

log = logging.getLogger("minifusion")

STEM = "diffusion_pytorch_model"
SD1_SCALING = 0.18215
NEED_VAE = "pass an SDXL VAE: a .safetensors file (e.g. sdxl_vae.safetensors) or a diffusers VAE folder"

# madebyollin/sdxl-vae-fp16-fix's single file, {size in bytes: SHA-256}; published as both sdxl_vae.safetensors and
# sdxl.vae.safetensors (the same bytes, revision 207b116d), and re-hosted unchanged (e.g. as Pony Diffusion's VAE)
FP16_FIX_FILES = {334_641_162: "235745af8d86bf4a4c1b5b4f529868b37019a10f7c0b2e79ad0abca3a22bc6e1"}

# ModelSpec architecture ids (SwarmUI writes "stable-diffusion-xl-v1-base/vae" into VAE files) -> scaling factor
ARCHITECTURE_SCALING = (("stable-diffusion-xl-", SDXL_VAE.scaling_factor), ("stable-diffusion-v1", SD1_SCALING),
                        ("stable-diffusion-v2", SD1_SCALING))

VAE_KEY = re.compile(r"^(first_stage_model\.)?(encoder|decoder|quant_conv|post_quant_conv)\.")
# Left in some VAE files and never needed: the EMA counters (the stock sdxl_vae.safetensors has them) and the
# training loss's discriminator / LPIPS weights; Automatic1111 drops the same keys.
IGNORED = re.compile(r"^(model_ema\.(decay|num_updates)$|loss\.)")

# Diffusers before 0.15 named the mid attention's projections so; diffusers still renames them on load.
DEPRECATED_ATTENTION = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}

# config.json entries that would make it another network than SDXL's VAE (absent means diffusers' default, which
# is SDXL's): SD3 / Flux VAEs drop the quant convs and shift their latents, some VAEs drop the mid attention.
SDXL_CONFIG = {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
               "shift_factor": None, "latents_mean": None, "latents_std": None}


@dataclass(frozen=True)
class VAEFile:
    """A VAE file or folder, checked from its headers and config alone (no weights read)."""
    where: Path  # the file, or the diffusers folder holding config.json
    files: tuple[Path, ...]  # the safetensors holding its tensors
    config: VAEConfig  # scaling_factor included
    table: dict[str, tuple[str, str]]  # our key -> (file key, op)
    fp16_safe: bool  # may run in float16 (the fp16-fix VAE)
    identified: str  # how its scaling factor and precision were decided, for the log


def inspect_vae(path: str | Path) -> VAEFile:
    """What `load_vae` will load from path, or CheckpointError naming the file and what to do."""
    path = Path(path)
    try:
        kind, where = find_part(path, "vae", "VAE", NEED_VAE)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    if kind == "single" and where.name.startswith(STEM) and (where.parent / "config.json").is_file():
        info = _inspect_folder(where.parent, [where])  # a diffusers folder's weights file: its config says more
    else:
        info = _inspect_folder(where) if kind == "folder" else _inspect_single(where)
    log.info("VAE %s: %s", info.where, info.identified)
    return info


def load_vae(info: VAEFile, device: torch.device, dtype: torch.dtype) -> vae.VAE:
    """The VAE `inspect_vae` found, onto device in dtype; its tensors are checked again (the files may have
    changed since)."""
    return load_part(info, _strict, device, dtype)


def vae_dtype_for(dtype: torch.dtype, fp16_safe: bool = False) -> torch.dtype:
    """The dtype the VAE runs in beside networks in `dtype`: SDXL's VAE overflows in float16 (the reason for
    diffusers' force_upcast), so it runs in float32 there, unless it is the fp16-fix VAE."""
    return torch.float32 if dtype == torch.float16 and not fp16_safe else dtype


def swap_in(info: VAEFile, cfgs: Configs, device: torch.device, dtype: torch.dtype) -> tuple[vae.VAE, Configs]:
    """The VAE loaded, and the checkpoint's configs with its config (scaling factor included) in place."""
    latent, unet = info.config.latent_channels, cfgs.unet.in_channels
    if latent != unet:
        raise CheckpointError(f"{info.where}: a VAE with {latent} latent channels (SD3 and Flux VAEs have 16), but "
                              f"the checkpoint's UNet works on {unet}; {NEED_VAE}")
    return load_vae(info, device, dtype), dataclasses.replace(cfgs, vae=info.config)


# ---------------------------------------------------------------------------------------------------------

def _inspect_folder(folder: Path, files: list[Path] | None = None) -> VAEFile:
    f = folder / "config.json"
    raw = read_json(f)
    cls = raw.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise CheckpointError(f"{f}: a {show(cls)}, not an AutoencoderKL like SDXL's VAE; {NEED_VAE}")
    for key, want in SDXL_CONFIG.items():
        if raw.get(key, want) != want:
            raise CheckpointError(f"{f}: {key} = {show(raw[key], 60)} describes another network than SDXL's VAE "
                                  f"(SDXL's: {want}); {NEED_VAE}")
    try:
        cfg = VAEConfig.from_diffusers_config(raw)
    except (ValueError, KeyError, TypeError, ZeroDivisionError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{f}: not an SDXL VAE config ({first_line(e)[:100]})") from None
    _plausible(cfg, f)
    fp16_safe = raw.get("force_upcast", True) is False
    src = TensorSource(files or diffusers_files(folder.parent, folder.name, STEM))
    try:
        table = _diffusers_table(cfg, src)
        _strict(folder, cfg, table, src)
        found = tuple(src.files)
    finally:
        src.close()
    how = f"config.json: scaling factor {cfg.scaling_factor}, force_upcast {raw.get('force_upcast', True)}"
    _warn_if_sd1(folder, cfg.scaling_factor)
    return VAEFile(folder, found, cfg, table, fp16_safe, how + (" (fp16-fix: may run in float16)" if fp16_safe else ""))


def _inspect_single(file: Path) -> VAEFile:
    src = TensorSource([file])
    try:
        keys = [k for k in src.keys() if not IGNORED.match(k)]
        _refuse_other_models(file, src, keys)
        prefix = "first_stage_model." if any(k.startswith("first_stage_model.") for k in keys) else ""
        diffusers = not prefix and any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in keys)
        cfg = _infer(file, src, keys, prefix, diffusers)
        _plausible(cfg, file)
        table = _diffusers_table(cfg, src) if diffusers else {k: (prefix + k, "") for k in _state_keys(cfg, file)}
        _strict(file, cfg, table, src)
        metadata = dict(src.metadata)
    finally:
        src.close()
    if is_fp16_fix_release(file):
        return VAEFile(file, (file,), cfg, table, True,
                       "madebyollin's sdxl-vae-fp16-fix, recognised by its SHA-256 (scaling factor 0.13025; may run "
                       "in float16)")
    scaling, how = _scaling_from_metadata(metadata)
    if scaling is None:
        log.warning("%s: a VAE file without a config; SDXL's latent scaling factor %s is assumed. An SD 1.x/2.x VAE "
                    "has the same tensors but needs %s (and is not made for SDXL's latents); a diffusers VAE "
                    "folder's config.json states the factor", file, SDXL_VAE.scaling_factor, SD1_SCALING)
        scaling, how = SDXL_VAE.scaling_factor, "no config: SDXL's scaling factor 0.13025 assumed"
    _warn_if_sd1(file, scaling)
    cfg = dataclasses.replace(cfg, scaling_factor=scaling)
    return VAEFile(file, (file,), cfg, table, False, how)


def is_fp16_fix_release(file: Path) -> bool:
    """Whether file is byte for byte the fp16-fix VAE's released single file (read only if its size matches)."""
    try:
        want = FP16_FIX_FILES.get(file.stat().st_size)
        if want is None:
            return False
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError as e:
        raise CheckpointError(f"{file}: cannot be read ({e.strerror or e})") from None
    return digest.hexdigest() == want


def _refuse_other_models(file: Path, src: TensorSource, keys: list[str]) -> None:
    """Name what a file that is not a VAE on its own is, rather than list its hundreds of unexpected keys."""
    if all(VAE_KEY.match(k) for k in keys) and keys:
        return
    family = identify(src.keys(), CHECKPOINTS)
    if family:
        raise CheckpointError(f"{file}: this is {family.name}, not a VAE; {NEED_VAE}")
    if any(k.startswith("first_stage_model.") for k in keys) and any(k.startswith("model.diffusion_model.")
                                                                    for k in keys):
        raise CheckpointError(f"{file}: a whole SDXL checkpoint (UNet, text encoders and VAE), not a VAE on its own; "
                              f"pass it as the checkpoint, or {NEED_VAE}")
    if not any(VAE_KEY.match(k) for k in keys):
        raise CheckpointError(f"{file}: not a VAE (none of its {len(src.where)} tensors is a VAE's encoder or "
                              f"decoder); {NEED_VAE}")


def _infer(file: Path, src: TensorSource, keys: list[str], prefix: str, diffusers: bool) -> VAEConfig:
    try:
        return _diffusers_key_config(src, keys) if diffusers else vae_config(src, keys, prefix)
    except KeyError as e:
        hint = " (SD3 and Flux VAEs, with 16 latent channels, have none)" if "quant_conv" in e.args[0] else ""
        raise CheckpointError(f"{file}: not an SDXL VAE (no tensor {show(e.args[0])}{hint}); {NEED_VAE}") from None
    except (ZeroDivisionError, IndexError, TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: not an SDXL VAE (its tensor shapes do not describe one: "
                              f"{str(e)[:100] or type(e).__name__}); {NEED_VAE}") from None


def _diffusers_key_config(src: TensorSource, keys: list[str]) -> VAEConfig:
    """As checkpoint.vae_config, for a file with diffusers AutoencoderKL names."""
    ch = src.shape("encoder.conv_in.weight")
    levels = _count(keys, r"encoder\.down_blocks\.(\d+)\.")
    return VAEConfig(
        in_channels=ch[1], out_channels=src.shape("decoder.conv_out.weight")[0],
        latent_channels=src.shape("post_quant_conv.weight")[0], ch=ch[0],
        ch_mult=tuple(src.shape(f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0] // ch[0] for i in range(levels)),
        num_res_blocks=_count(keys, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."),
        scaling_factor=SDXL_VAE.scaling_factor)


def _diffusers_table(cfg: VAEConfig, src: TensorSource) -> dict[str, tuple[str, str]]:
    """models.vae's diffusers table, with the mid attention's pre-0.15 names where the file has those."""
    table = {}
    for ours, (key, op) in vae.diffusers_keys(cfg).items():
        for new, old in DEPRECATED_ATTENTION.items():
            if new in key and key not in src.where and key.replace(new, old) in src.where:
                key = key.replace(new, old)
        table[ours] = (key, op)
    return table


def _plausible(cfg: VAEConfig, where: Path) -> None:
    # the checkpoint loader's bounds; the presets beside the VAE pass them, so only the VAE's numbers are judged
    _check_plausible(Configs(SDXL_UNET, cfg, SDXL_CLIP_L, SDXL_CLIP_G), where)


def _meta_vae(cfg: VAEConfig, where: Path) -> vae.VAE:
    try:
        with torch.device("meta"):
            return vae.VAE(cfg)
    except (ValueError, TypeError, ZeroDivisionError, RuntimeError) as e:
        raise CheckpointError(f"{where}: the VAE it describes cannot be built ({first_line(e)[:100]}); "
                              f"{NEED_VAE}") from None


def _state_keys(cfg: VAEConfig, where: Path) -> list[str]:
    return list(_meta_vae(cfg, where).state_dict())


def _strict(where: Path, cfg: VAEConfig, table: dict[str, tuple[str, str]], src: TensorSource) -> vae.VAE:
    """The meta VAE, once every tensor of table is in src with its shape and nothing else is."""
    model = _meta_vae(cfg, where)
    keys = [k for k in src.keys() if not IGNORED.match(k)]
    problems = check(table, _shapes(model), src, keys, ())
    if any(problems):
        raise CheckpointError(_report(where, *problems))
    return model


def _scaling_from_metadata(metadata: dict[str, str]) -> tuple[float | None, str]:
    arch = metadata.get("modelspec.architecture", "")
    for prefix, scaling in ARCHITECTURE_SCALING:
        if arch.startswith(prefix):
            return scaling, f"modelspec.architecture {show(arch, 80)}: scaling factor {scaling}"
    return None, ""


def _warn_if_sd1(where: Path, scaling: float) -> None:
    if scaling == SD1_SCALING:
        log.warning("%s: an SD 1.x/2.x VAE (scaling factor %s), not SDXL's: SDXL's UNet makes latents for SDXL's "
                    "VAE, so colours and detail will come out wrong; use an SDXL VAE", where, SD1_SCALING)
