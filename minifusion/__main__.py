"""python -m minifusion "a prompt" --out img.png [--height 4096 --width 4096 ...]

Writes every scale as soon as it is ready: img.x1.png (the base size), img.x2.png, ..., and the last scale as
img.png, each with its latents beside it (img.x2.latent.safetensors). Each PNG carries the prompt and every
setting in its text metadata; `--settings-from img.png` runs those settings again, and
`--resume img.x2.latent.safetensors` continues that run from scale 2, to the same or a larger size.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin
from tqdm.auto import tqdm

from . import memory
from .checkpoint import CheckpointError, inspect_checkpoint
from .encode import base_scale_size, open_image
from .files import LatentFileError, SavedScale, atomic_write, latent_path, load_latents, save_latents
from .demofusion import scale_sizes
from .views import is_out_of_memory
from .pipeline import DEFAULT_WEIGHTS, NonFiniteError, check_request, default_device, default_dtype, load, resident
from .schedulers import SCHEDULERS

log = logging.getLogger("minifusion")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
METADATA_KEY = "minifusion"
# the settings a PNG records, CLI flag -> generate() argument
SETTINGS = {"prompt": "prompt", "negative": "negative_prompt", "height": "height", "width": "width",
            "steps": "num_inference_steps", "guidance": "guidance_scale", "seed": "seed",
            "scheduler": "scheduler", "stride": "stride", "view_batch": "view_batch_size",
            "c1": "cosine_scale_1", "c2": "cosine_scale_2", "c3": "cosine_scale_3", "sigma": "sigma",
            "tiled_decode": "multi_decoder", "jitter": "jitter", "image": "image", "max_memory": "max_memory"}
DEFAULTS = {"negative": None, "height": None, "width": None, "steps": 50, "guidance": 7.5, "seed": 0,
            "scheduler": "ddim", "stride": None, "view_batch": None, "c1": 3.0, "c2": 1.0, "c3": 1.0,
            "sigma": 0.8, "tiled_decode": True, "jitter": True, "image": None, "max_memory": None}
CHECKED = ("height", "width", "num_inference_steps", "guidance_scale", "view_batch_size", "stride", "cosine_scale_1",
           "cosine_scale_2", "cosine_scale_3", "sigma", "scheduler")  # what check_request validates


class UserError(Exception):
    """Something the user can fix; printed as one line, exit status 2."""


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m minifusion", description="DemoFusion high-resolution "
                                 "text-to-image on SDXL: one image per scale, from the base size up.")
    ap.add_argument("prompt", nargs="?", help="what to draw")
    ap.add_argument("--out", type=Path, default=Path("out.png"), help="final image; scales go to NAME.xS.png")
    ap.add_argument("--image", type=str, help="upscale this picture: it replaces the base scale (image-to-image); "
                    "--height/--width then default to 2x the base size keeping its aspect")
    ap.add_argument("--negative", help="negative prompt (default: none, i.e. zero embeddings as SDXL base)")
    ap.add_argument("--height", type=int, help="final height in px, a multiple of 8 (default: 2x the base size)")
    ap.add_argument("--width", type=int, help="final width in px, a multiple of 8 (default: 2x the base size)")
    ap.add_argument("--steps", type=int, help="denoising steps per scale (default 50)")
    ap.add_argument("--guidance", type=float, help="classifier-free guidance scale (default 7.5)")
    ap.add_argument("--seed", type=int, help="random seed; the same seed reproduces a run (default 0)")
    ap.add_argument("--scheduler", choices=list(SCHEDULERS), help="default ddim")
    ap.add_argument("--stride", type=int, help="local window stride in latents (default: half the window, 64 for SDXL)")
    ap.add_argument("--view-batch", type=int, dest="view_batch",
                    help="views per UNet call (default 16, or the most --max-memory allows); lower it if memory "
                    "runs out")
    ap.add_argument("--max-memory", type=memory_size, dest="max_memory", metavar="SIZE",
                    help="a device memory budget, e.g. 8 (GiB), 12GiB, 500MiB: picks --view-batch and the decode "
                    "tile to stay under it (predicted by minifusion/memory.py)")
    ap.add_argument("--c1", type=float, help="cosine_scale_1, skip-residual decay (default 3)")
    ap.add_argument("--c2", type=float, help="cosine_scale_2, dilated-sampling weight decay (default 1)")
    ap.add_argument("--c3", type=float, help="cosine_scale_3, Gaussian blur decay (default 1)")
    ap.add_argument("--sigma", type=float, help="std of the Gaussian blur (default 0.8)")
    ap.add_argument("--no-tiled-decode", dest="tiled_decode", action="store_const", const=False,
                    help="decode each scale in one piece (more memory)")
    ap.add_argument("--no-jitter", dest="jitter", action="store_const", const=False,
                    help="place local windows without random jitter")
    ap.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS,
                    help="SDXL .safetensors file or diffusers folder (default: weights/)")
    ap.add_argument("--device", help="cuda, mps or cpu (default: the first available)")
    ap.add_argument("--dtype", choices=list(DTYPES),
                    help="default: float16 on GPUs; on CPUs bfloat16 where the CPU has it in hardware, else float32")
    ap.add_argument("--settings-from", type=Path, dest="settings_from",
                    help="take the prompt and settings from a PNG minifusion wrote (flags still override)")
    ap.add_argument("--resume", type=Path, help="continue from a finished scale's .latent.safetensors with its "
                    "settings (flags still override; --height/--width may go larger at the same aspect)")
    ap.add_argument("--overwrite", action="store_true", help="replace existing output files")
    ap.add_argument("--force", action="store_true", help="run even when the size looks too large for the device")
    return ap.parse_args(argv)


def memory_size(text: str) -> int:
    try:
        return memory.parse_size(text, unit=memory.GiB)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def resolve_settings(args, resume: SavedScale | None = None) -> dict:
    """Flags given on the command line, over settings from --settings-from or --resume, over the defaults."""
    settings = dict(DEFAULTS)
    if args.settings_from is not None:
        settings.update(read_settings(args.settings_from))
    if resume is not None:
        settings.update({k: v for k, v in resume.settings.items() if k in SETTINGS})
    settings.update({k: v for k in list(SETTINGS) if (v := getattr(args, k, None)) is not None})
    if args.image is not None:
        settings["image"] = str(Path(args.image).resolve())  # absolute, so --settings-from finds it again
    if not settings.get("prompt"):
        raise UserError("no prompt given; usage: python -m minifusion \"a prompt\" --out img.png")
    return settings


def read_settings(png: Path) -> dict:
    try:
        with Image.open(png) as im:
            text = im.text.get(METADATA_KEY) if hasattr(im, "text") else None
    except (OSError, ValueError) as e:
        raise UserError(f"{png}: cannot read it as an image ({e})") from None
    if not text:
        raise UserError(f"{png}: carries no minifusion settings (only PNGs written by minifusion do)")
    try:
        saved = json.loads(text)["settings"]
        return {k: saved[k] for k in SETTINGS if k in saved}
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{png}: its minifusion settings are unreadable") from None


def output_paths(out: Path, n_scales: int) -> list[Path]:
    """img.png -> [img.x1.png, ..., img.x{S-1}.png, img.png]."""
    return [out.with_name(f"{out.stem}.x{s}{out.suffix}") for s in range(1, n_scales)] + [out]


def save_png(image: Image.Image, path: Path, info: dict) -> None:
    meta = PngImagePlugin.PngInfo()
    meta.add_text(METADATA_KEY, json.dumps(info))
    meta.add_text("parameters", info["settings"]["prompt"])
    atomic_write(path, lambda f: image.save(f, format="PNG", pnginfo=meta))


def check_free_space(folder: Path, height: int, width: int, n_scales: int) -> None:
    """Refuse up front when the images cannot fit: PNGs of noise-like images approach 3 bytes a pixel."""
    need = sum(3 * (height * s // n_scales) * (width * s // n_scales) for s in range(1, n_scales + 1))
    free = shutil.disk_usage(folder).free
    if free < need:
        raise UserError(f"{folder}: only {free / 2**20:.0f} MiB free, the images may need up to "
                        f"{need / 2**20:.0f} MiB; free some space or choose another --out folder")


@dataclass
class Plan:
    device: torch.device
    dtype: torch.dtype
    settings: dict
    kwargs: dict  # generate() arguments
    paths: list[Path]  # one per scale
    first: int  # the first scale this run computes (> 1 when resuming)
    resume: SavedScale | None


def plan(args) -> Plan:
    """Everything checked that can be checked before a model is loaded: paths, sizes, knobs, files."""
    resume = None
    if args.resume is not None:
        if args.image is not None:
            raise UserError("--image and --resume do not go together: a resumed run already has its picture")
        try:
            resume = load_latents(args.resume)
        except LatentFileError as e:
            raise UserError(str(e)) from None
    settings = resolve_settings(args, resume)
    out = args.out
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out}: minifusion writes PNG files; use a name ending in .png")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK):
        raise UserError(f"--out {out}: folder {out.parent} is not writable")

    cfgs = inspect_checkpoint(args.weights)  # headers only
    base, window = cfgs.unet.sample_size * 8, cfgs.unet.sample_size
    if settings["image"] is not None:
        try:
            img = open_image(settings["image"])
            settings["height"], settings["width"] = base_scale_size(
                img.width, img.height, base, settings["height"], settings["width"]).final
        except ValueError as e:  # ImageError included
            raise UserError(str(e)) from None
    settings["height"] = settings["height"] or 2 * base
    settings["width"] = settings["width"] or 2 * base
    settings["stride"] = settings["stride"] or window // 2
    kwargs = {SETTINGS[k]: v for k, v in settings.items() if k != "prompt"}
    try:
        check_request(base, window, **{k: kwargs[k] for k in CHECKED if kwargs[k] is not None})
    except ValueError as e:
        raise UserError(str(e)) from None

    n_scales = max(1, int(max(settings["height"], settings["width"]) / base))
    first = resume.scale + 1 if resume is not None else 1
    if first > n_scales:
        raise UserError(f"--resume {args.resume}: that run already reached scale {first - 1}; ask for a larger "
                        f"--height/--width (scale {first} needs the longer side >= {first * base} px)")
    if resume is not None:
        want = scale_sizes(settings["height"], settings["width"], base)[first - 2]
        have = tuple(resume.latents.shape[-2:])
        if want != have:
            raise UserError(f"--resume {args.resume}: its scale-{first - 1} latents are {have[1]}x{have[0]}, but a "
                            f"{settings['width']}x{settings['height']} run has {want[1]}x{want[0]} there; keep the "
                            "aspect ratio of the run you resume")
    paths = output_paths(out, n_scales)
    existing = [str(q) for p in paths[first - 1:] for q in (p, latent_path(p)) if q.exists()]
    if existing and not args.overwrite:
        raise UserError(f"{existing[0]} exists; pass --overwrite to replace it, or choose another --out")
    check_free_space(out.parent, settings["height"], settings["width"], n_scales)
    device = torch.device(args.device) if args.device else default_device()
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype(device)
    if not args.force:
        check_fits(cfgs, settings, device, dtype)
    if settings["max_memory"] is not None:
        plan_memory(cfgs, settings, device, dtype)
    return Plan(device, dtype, settings, kwargs, paths, first, resume)


def device_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu" and hasattr(os, "sysconf"):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


def check_fits(cfgs, settings: dict, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a request that cannot fit the device even with one view per UNet call and the smallest decode
    tile (out-of-memory recovery stops there), saying what it would cost."""
    have = device_memory(device)
    if have is None:
        return
    est = memory.estimate(cfgs, settings["height"], settings["width"], settings["steps"], view_batch_size=1,
                          dtype=dtype, decode_tile=memory.DECODE_TILES[-1], stride=settings["stride"],
                          resident=resident(device))
    need = max(memory.needs(est["scales"], device.type))
    if need > have:
        raise UserError(f"{settings['width']}x{settings['height']} needs about {need / 2**30:.1f} GiB even with "
                        f"--view-batch 1, but {device} has {have / 2**30:.1f} GiB; it would also take "
                        f"{est['unet_evals']} UNet evaluations ({est['flops'] / 1e15:.1f} PFLOP). Choose a smaller "
                        "size, or pass --force to try anyway")


def plan_memory(cfgs, settings: dict, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a --max-memory nothing fits in, before loading; say what it chose."""
    budget = settings["max_memory"]
    have = device_memory(device)
    if have is not None and budget > have:
        log.warning("--max-memory %.1f GiB is more than %s has (%.1f GiB)", budget / memory.GiB, device,
                    have / memory.GiB)
    tiles = ((None,) if not settings["tiled_decode"] else ()) + memory.DECODE_TILES
    try:
        vb, tile, kept = memory.plan(budget, cfgs, settings["height"], settings["width"], dtype, device.type,
                                     settings["stride"], resident(device), may_offload=device.type != "cpu",
                                     decode_tiles=tiles)
    except ValueError as e:
        raise UserError(f"--max-memory: {e}; raise it or choose a smaller --height/--width") from None
    if settings["view_batch"] is not None:
        vb = min(vb, settings["view_batch"])
    print(f"within {budget / memory.GiB:.2f} GiB: {vb} view(s) per UNet call, decode "
          + (f"in {tile} px tiles" if tile else "in one piece")
          + ("" if kept else "; the UNet and the VAE take turns on the device"), file=sys.stderr)


def run(argv=None) -> int:
    args = parse_args(argv)
    p = plan(args)
    device, dtype = p.device, p.dtype
    started = time.perf_counter()
    pipe = load(args.weights, device=device, dtype=dtype)
    n_scales = len(p.paths)
    print(f"loaded {args.weights} on {device} ({str(dtype).replace('torch.', '')}) in "
          f"{time.perf_counter() - started:.1f} s; {n_scales} scale(s) up to "
          f"{p.settings['width']}x{p.settings['height']}", file=sys.stderr)

    bars: dict[int, tqdm] = {}

    def on_step(scale, step, steps, evals):
        bar = bars.get(scale)
        if bar is None:
            bar = bars[scale] = tqdm(total=steps, desc=f"scale {scale}/{n_scales}", unit="step", leave=True)
        bar.update(step - bar.n)
        bar.set_postfix_str(f"{evals} UNet evals")
        if step == steps:
            bar.close()

    info = {"settings": p.settings, "weights": str(args.weights), "device": str(device),
            "dtype": str(dtype).replace("torch.", ""), "minifusion": "0.1.0"}
    if p.resume is not None:
        info["resumed_from"] = str(args.resume)
    written = []
    try:
        for scale in pipe.iter_generate(p.settings["prompt"], callback=on_step, decode_progress=True,
                                        resume=p.resume, **p.kwargs):
            path = p.paths[scale.scale - 1]
            try:
                save_png(scale.image, path, {**info, "scale": scale.scale, "stats": scale.stats})
                save_latents(latent_path(path), scale.saved(p.settings))
            except OSError as e:
                raise UserError(f"cannot write {path}: {e.strerror or e}") from None
            written.append(path)
            print(f"wrote {path} ({scale.image.width}x{scale.image.height}"
                  + (f", {scale.stats['seconds']:.1f} s)" if "seconds" in scale.stats else ", the input picture)"),
                  file=sys.stderr)
    except KeyboardInterrupt:
        print(f"\ninterrupted; kept {_listing(written)}", file=sys.stderr)
        return 130
    except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
        if not is_out_of_memory(e):
            raise
        raise UserError(f"out of memory even with one view per UNet call (--view-batch 1) at "
                        f"{p.settings['width']}x{p.settings['height']}; use a smaller --height/--width or a device "
                        f"with more memory (kept {_listing(written)})") from None
    except UserError as e:
        raise UserError(f"{e} (kept {_listing(written)})") from None
    return 0


def _listing(paths: list[Path]) -> str:
    return ", ".join(map(str, paths)) or "nothing"


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def main(argv=None) -> int:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine())
    logging.getLogger("minifusion").addHandler(handler)
    try:
        return run(argv)
    except (UserError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        logging.getLogger("minifusion").removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
