"""A tiny random SDXL-architecture checkpoint, so the whole pipeline runs in seconds on a CPU.

    python -m minifusion.tiny DIR [--layout single|diffusers] [--seed 0]

Same architecture and key layout as SDXL (three UNet levels, attention with 64-wide heads on the two deeper
ones, text_time conditioning, two CLIP text encoders, a four-level VAE), only narrow and shallow. The weights
are random: images made with it are noise, by construction. Its native size is 32 latents (a 256 px base),
written into the single file's `modelspec.resolution` header as real SDXL files do.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import checkpoint
from .checkpoint import COMPONENTS, DIFFUSERS_FOLDER, Configs
from .config import TextConfig, UNetConfig, VAEConfig
from .keyops import to_source

TINY = Configs(
    unet=UNetConfig(model_channels=32, channel_mult=(1, 2, 4), num_res_blocks=2, transformer_depth=(0, 2, 2),
                    transformer_depth_middle=2, context_dim=64 + 128, adm_in_channels=96 + 6 * 8,
                    addition_time_embed_dim=8, sample_size=32),
    # distinct channel counts per level, so a reversed decoder block order cannot load
    vae=VAEConfig(ch=32, ch_mult=(1, 2, 3, 4), num_res_blocks=1),
    text_encoder_1=TextConfig(width=64, layers=3, heads=1, mlp_dim=128),
    # projection size differs from the width, so a transposed text_projection cannot load
    text_encoder_2=TextConfig(width=128, layers=3, heads=2, mlp_dim=256, act="gelu", projection_dim=96),
)


def randomize(model: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """Random weights at the scale of trained ones: no zero-initialised layer may hide a wiring mistake."""
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if isinstance(module, norms):
                    p.copy_((1.0 if name == "weight" else 0.0) + 0.1 * torch.randn(p.shape, generator=generator))
                elif p.dim() >= 2:
                    bound = math.sqrt(3.0 / p[0].numel())
                    p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1) * bound)
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    return model


def random_models(cfgs: Configs = TINY, seed: int = 0) -> dict[str, torch.nn.Module]:
    g = torch.Generator().manual_seed(seed)
    models = {}
    for c in COMPONENTS:
        models[c] = randomize(checkpoint.MODEL_CLASSES[c](getattr(cfgs, c)), g).eval()
    return models


def write_single_file(models, cfgs: Configs, path: Path, dtype=torch.float32) -> Path:
    tables = checkpoint.single_file_tables(cfgs, models)
    tensors = {}
    for c in COMPONENTS:
        state = {k: v.to(dtype) for k, v in models[c].state_dict().items()}
        tensors.update(to_source(state, tables[c]))
    size = cfgs.unet.sample_size * 8
    save_file(tensors, str(path), metadata={"modelspec.architecture": "stable-diffusion-xl-v1-base",
                                            "modelspec.resolution": f"{size}x{size}"})
    return path


def write_diffusers(models, cfgs: Configs, folder: Path, dtype=torch.float32, variant: str | None = None) -> Path:
    tables = checkpoint.diffusers_tables(cfgs)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}, indent=2))
    for c in COMPONENTS:
        sub, stem = DIFFUSERS_FOLDER[c]
        (folder / sub).mkdir(exist_ok=True)
        config = getattr(cfgs, c).to_diffusers_config()
        (folder / sub / "config.json").write_text(json.dumps(config, indent=2))
        state = {k: v.to(dtype) for k, v in models[c].state_dict().items()}
        name = f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors"
        save_file(to_source(state, tables[c]), str(folder / sub / name))
    return folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minifusion.tiny", description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", type=Path, help="where to write the checkpoint")
    ap.add_argument("--layout", choices=["single", "diffusers"], default="single")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    models = random_models(TINY, args.seed)
    if args.layout == "single":
        args.dir.mkdir(parents=True, exist_ok=True)
        out = args.dir / "tiny_sdxl.safetensors"
        if out.exists():
            print(f"error: {out} exists; remove it or choose another folder", file=sys.stderr)
            return 1
        write_single_file(models, TINY, out)
    else:
        if (args.dir / "unet").exists():
            print(f"error: {args.dir} already holds a diffusers checkpoint; choose another folder", file=sys.stderr)
            return 1
        out = write_diffusers(models, TINY, args.dir)
    print(f"wrote a tiny random SDXL-architecture checkpoint to {out} (its images are noise)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
