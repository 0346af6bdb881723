"""minifusion "a prompt" --out img.png [--height 4096 --width 4096 ...]      (or: python -m minifusion ...)

Writes every scale as soon as it is ready: img.x1.png (the base size), img.x2.png, ..., and the last scale as
img.png, each with its latents beside it (img.x2.latent.safetensors). Each PNG carries the prompt and every
setting (Automatic1111's `parameters` text and minifusion's JSON); `--settings-from img.png` runs them again, and
`--resume img.x2.latent.safetensors` continues that run from scale 2, to the same or a larger size. Without
--out, images are numbered in outputs/ (00001-<seed>.png, ...). Under torchrun the ranks share each image's
work (view parallel) or, with --count / --prompts, the images (image parallel).
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import secrets
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import distributed, memory, metadata
from .checkpoint import CheckpointError, inspect_checkpoint
from .controlnet import canny, phase1_condition_size
from .controlnet_file import inspect_controlnet
from .demofusion import scale_sizes
from .embeddings import load_embeddings
from .encode import ImageError, base_scale_size, open_image
from .files import LatentFileError, SavedScale, latent_path, load_latents, save_latents
from .lora import open_loras, parse_spec
from .metadata import CLI_SETTINGS, MODEL_SETTINGS, SETTINGS, NoSettings, save_png
from .pipeline import DEFAULT_WEIGHTS, NonFiniteError, check_request, default_device, default_dtype, load, resident
from .safetensors_check import NotSafetensors
from .schedulers import SCHEDULERS
from .tokenizer import Tokenizer
from .vae_file import VAEFile, inspect_vae, vae_dtype_for
from .views import is_out_of_memory

log = logging.getLogger("minifusion")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULTS = {"negative": None, "height": None, "width": None, "steps": 50, "guidance": 7.5, "seed": None,
            "scheduler": "ddim", "stride": None, "view_batch": None, "c1": 3.0, "c2": 1.0, "c3": 1.0,
            "sigma": 0.8, "tiled_decode": True, "jitter": True, "image": None, "max_memory": None,
            "weights": None, "lora": [], "vae": None, "embedding": [], "controlnet": [], "control_image": None,
            "control_scale": 1.0, "control_start": 0.0, "control_end": 1.0, "guess_mode": False, "canny": False}
CHECKED = ("height", "width", "num_inference_steps", "guidance_scale", "view_batch_size", "stride", "cosine_scale_1",
           "cosine_scale_2", "cosine_scale_3", "sigma", "scheduler")  # what check_request validates
SEED_MAX = 2 ** 64 - 1  # torch.Generator's seeds
RANDOM_SEEDS = 2 ** 32  # a drawn seed is below this: short to type, like Automatic1111's
COUNT_MAX = 100_000
OUTPUTS = Path("outputs")  # where numbered images go without --out


class UserError(Exception):
    """Something the user can fix; printed as one line, exit status 2."""


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="minifusion", description="DemoFusion high-resolution text-to-image on "
                                 "SDXL: one image per scale, from the base size up.")
    ap.add_argument("prompt", nargs="?", help="what to draw (Automatic1111's emphasis syntax: (word:1.3), [word], "
                    "BREAK; any length)")
    ap.add_argument("--version", action="version", version=f"minifusion {metadata.VERSION}")
    ap.add_argument("--out", type=Path, help="final image; scales go to NAME.xS.png (default: numbered files in "
                    "outputs/)")
    ap.add_argument("--count", type=int, default=1, help="images to make, with seeds seed, seed+1, ... (default 1)")
    ap.add_argument("--prompts", type=Path, help="a text file of prompts, one a line: one image each (times "
                    "--count)")
    ap.add_argument("--image", type=str, help="upscale this picture: it replaces the base scale (image-to-image); "
                    "--height/--width then default to at least its size, keeping its aspect")
    ap.add_argument("--negative", help="negative prompt (default: none, i.e. zero embeddings as SDXL base)")
    ap.add_argument("--height", type=int, help="final height in px, a multiple of 8 (default: 2x the base size)")
    ap.add_argument("--width", type=int, help="final width in px, a multiple of 8 (default: 2x the base size)")
    ap.add_argument("--steps", type=int, help="denoising steps per scale (default 50)")
    ap.add_argument("--guidance", type=float, help="classifier-free guidance scale (default 7.5)")
    ap.add_argument("--seed", type=int, help="random seed; the same seed reproduces a run (default, and -1: a random "
                    "seed, printed and recorded in the PNG)")
    ap.add_argument("--scheduler", choices=list(SCHEDULERS), help="default ddim")
    ap.add_argument("--stride", type=int, help="local window stride in latents (default: half the window, 64 for SDXL)")
    ap.add_argument("--view-batch", type=int, dest="view_batch",
                    help="views per UNet call (default 16, or the most --max-memory allows); lower it if memory "
                    "runs out")
    ap.add_argument("--max-memory", type=memory_size, dest="max_memory", metavar="SIZE",
                    help="a device memory budget, e.g. 8 (GiB), 12GiB, 500MiB: picks --view-batch and the decode "
                    "tile to stay under it (predicted by minifusion/memory/)")
    ap.add_argument("--c1", type=float, help="cosine_scale_1, skip-residual decay (default 3)")
    ap.add_argument("--c2", type=float, help="cosine_scale_2, dilated-sampling weight decay (default 1)")
    ap.add_argument("--c3", type=float, help="cosine_scale_3, Gaussian blur decay (default 1)")
    ap.add_argument("--sigma", type=float, help="std of the Gaussian blur (default 0.8)")
    ap.add_argument("--no-tiled-decode", dest="tiled_decode", action="store_const", const=False,
                    help="decode each scale in one piece (more memory)")
    ap.add_argument("--no-jitter", dest="jitter", action="store_const", const=False,
                    help="place local windows without random jitter")
    ap.add_argument("--weights", type=Path, help="SDXL .safetensors file or diffusers folder (default: weights/)")
    ap.add_argument("--lora", action="append", metavar="PATH[:WEIGHT]",
                    help="a LoRA / LyCORIS file merged into the weights (weight 1 by default); repeatable")
    ap.add_argument("--vae", type=Path, help="a VAE file or diffusers VAE folder instead of the checkpoint's (the "
                    "fp16-fix VAE runs in float16 on GPUs)")
    ap.add_argument("--embedding", action="append", metavar="PATH", help="an SDXL textual-inversion embedding "
                    ".safetensors; its file name (without .safetensors) is the word that calls it; repeatable")
    ap.add_argument("--controlnet", action="append", metavar="PATH", help="an SDXL ControlNet (file or folder); "
                    "repeatable, one --control-image each")
    ap.add_argument("--control-image", action="append", dest="control_image", metavar="IMG",
                    help="the condition image of each --controlnet (edges, depth, pose, ...)")
    ap.add_argument("--canny", action="store_const", const=True, help="make each condition from its --control-image with the "
                    "Canny edge detector (thresholds 100/200, as the official demo)")
    ap.add_argument("--control-scale", type=float, action="append", dest="control_scale", metavar="S",
                    help="ControlNet strength (default 1), one for all or one per --controlnet")
    ap.add_argument("--control-start", type=float, action="append", dest="control_start", metavar="A",
                    help="fraction of each scale's steps before the ControlNet acts (default 0)")
    ap.add_argument("--control-end", type=float, action="append", dest="control_end", metavar="B",
                    help="fraction of each scale's steps after which it stops (default 1)")
    ap.add_argument("--guess-mode", dest="guess_mode", action="store_const", const=True,
                    help="ControlNet on the conditional rows only, residuals scaled from 0.1 to 1 (diffusers')")
    ap.add_argument("--device", help="cuda, cuda:N, mps or cpu (default: the first available)")
    ap.add_argument("--dtype", choices=list(DTYPES),
                    help="default: float16 on GPUs; on CPUs bfloat16 where the CPU has it in hardware, else float32")
    ap.add_argument("--settings-from", type=Path, dest="settings_from",
                    help="take the prompt and settings (weights, LoRAs, ... too) from a PNG minifusion or "
                    "Automatic1111 wrote (flags still override)")
    ap.add_argument("--resume", type=Path, help="continue from a finished scale's .latent.safetensors with its "
                    "settings (flags still override; --height/--width may go larger at the same aspect)")
    ap.add_argument("--overwrite", action="store_true", help="replace existing output files")
    ap.add_argument("--force", action="store_true", help="run even when the size looks too large for the device")
    ap.add_argument("--timeout", type=float, default=distributed.DEFAULT_TIMEOUT_S, metavar="SECONDS",
                    help="under torchrun: how long a rank waits for the others before giving up (default "
                    f"{distributed.DEFAULT_TIMEOUT_S})")
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
        try:
            settings.update(metadata.read_settings(args.settings_from))
        except NoSettings as e:
            raise UserError(str(e)) from None
        for name in ("weights", "vae"):
            if settings.get(name) and not Path(settings[name]).exists():
                raise UserError(f"--settings-from {args.settings_from}: the {name} it names, {settings[name]}, no "
                                f"longer exist; pass --{name}")
    if resume is not None:
        settings.update({k: v for k, v in resume.settings.items() if k in (*SETTINGS, *MODEL_SETTINGS, *CLI_SETTINGS)})
    given = {k: getattr(args, k) for k in (*SETTINGS, *MODEL_SETTINGS, *CLI_SETTINGS)
             if getattr(args, k, None) is not None}
    if "lora" in given:
        try:
            given["lora"] = [[str(path), weight] for path, weight in map(parse_spec, given["lora"])]
        except ValueError as e:
            raise UserError(str(e)) from None
    for name in ("weights", "vae"):
        if name in given:
            given[name] = str(given[name])
    for name in ("control_scale", "control_start", "control_end", "control_image"):
        if name in given and len(given[name]) == 1:
            given[name] = given[name][0]
    settings.update(given)
    if args.image is not None:
        settings["image"] = str(Path(args.image).resolve())  # absolute, so --settings-from finds it again
    settings["weights"] = settings["weights"] or str(DEFAULT_WEIGHTS)
    return settings


def prompts_of(args, settings: dict) -> list[str]:
    if args.prompts is None:
        if not settings.get("prompt"):
            raise UserError("no prompt given; usage: minifusion \"a prompt\" --out img.png")
        return [settings["prompt"]]
    if args.prompt is not None:
        raise UserError("give a prompt or --prompts FILE, not both")
    try:
        lines = args.prompts.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--prompts {args.prompts}: cannot read it as UTF-8 text ({e})") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise UserError(f"--prompts {args.prompts}: holds no prompt (one a line)")
    return prompts


def seed_of(settings: dict) -> tuple[int, bool]:
    """(seed, drawn at random)."""
    seed = settings["seed"]
    if seed is None or seed == -1:
        return secrets.randbelow(RANDOM_SEEDS), True
    if not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise UserError(f"--seed {seed}: a seed is a whole number from 0 to {SEED_MAX}, or -1 for a random one")
    return seed, False


def output_paths(out: Path, n_scales: int) -> list[Path]:
    """img.png -> [img.x1.png, ..., img.x{S-1}.png, img.png]."""
    return [out.with_name(f"{out.stem}.x{s}{out.suffix}") for s in range(1, n_scales)] + [out]


def numbered(folder: Path, seeds: list[int]) -> list[Path]:
    """The next free numbers in `folder`, Automatic1111 style: 00001-<seed>.png, 00002-<seed>.png, ..."""
    taken = [int(m.group(1)) for p in folder.glob("*.png") if (m := re.match(r"(\d+)-", p.name))]
    first = max(taken, default=0) + 1
    return [folder / f"{first + i:05d}-{seed}.png" for i, seed in enumerate(seeds)]


def check_free_space(folder: Path, height: int, width: int, n_scales: int, images: int) -> None:
    """Refuse up front when the images cannot fit: PNGs of noise-like images approach 3 bytes a pixel."""
    need = images * sum(3 * (height * s // n_scales) * (width * s // n_scales) for s in range(1, n_scales + 1))
    free = shutil.disk_usage(folder).free
    if free < need:
        raise UserError(f"{folder}: only {free / 2**20:.0f} MiB free, the images may need up to "
                        f"{need / 2**20:.0f} MiB; free some space or choose another --out folder")


def resolve_device(name: str | None) -> torch.device:
    """The device a --device names, refused in one line when torch or this machine has no such device."""
    if name is None:
        return default_device()
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {name}: not a device name; use cuda, cuda:N, mps or cpu") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise UserError(f"--device {name}: {why}; use --device cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise UserError(f"--device {name}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UserError(f"--device {name}: MPS is not available here (it needs Apple silicon and a torch built "
                            "with MPS); use --device cpu")
    elif dev.type != "cpu":
        raise UserError(f"--device {name}: minifusion runs on cuda, mps or cpu, not {dev.type}")
    return dev


@dataclass
class Job:
    """One image: its prompt, seed and the files of its scales."""
    prompt: str
    seed: int
    paths: list[Path]


@dataclass
class Plan:
    device: torch.device
    dtype: torch.dtype
    settings: dict
    kwargs: dict  # generate() arguments shared by every image
    jobs: list[Job]
    first: int  # the first scale this run computes (> 1 when resuming)
    resume: SavedScale | None
    cfgs: object
    record: dict  # settings only the command line knows, recorded beside the pipeline's in every image
    lines: list[str] = field(default_factory=list)  # what to tell the user before loading


def plan(args, device: torch.device | None = None) -> Plan:
    """Everything checked that can be checked before a model is loaded: paths, sizes, knobs, files, device."""
    resume = None
    if args.resume is not None:
        if args.image is not None:
            raise UserError("--image and --resume do not go together: a resumed run already has its picture")
        try:
            resume = load_latents(args.resume)
        except NotSafetensors as e:
            hint = "; to rerun a PNG's settings use --settings-from" if "image" in e.kind else ""
            raise UserError(f"--resume {e}{hint}") from None
        except LatentFileError as e:
            raise UserError(str(e)) from None
    settings = resolve_settings(args, resume)
    prompts = prompts_of(args, settings)
    if not 1 <= args.count <= COUNT_MAX:
        raise UserError(f"--count {args.count}: make from 1 to {COUNT_MAX} images")
    seed, drawn = seed_of(settings)
    lines = []
    out = args.out
    if out is not None:
        if out.suffix.lower() != ".png":
            raise UserError(f"--out {out}: minifusion writes PNG files; use a name ending in .png")
        if not out.parent.is_dir():
            raise UserError(f"--out {out}: folder {out.parent} does not exist")
        if not os.access(out.parent, os.W_OK):
            raise UserError(f"--out {out}: folder {out.parent} is not writable")
    elif OUTPUTS.exists() and not (OUTPUTS.is_dir() and os.access(OUTPUTS, os.W_OK)):
        raise UserError(f"{OUTPUTS}/ is not a writable folder; pass --out")

    try:
        cfgs = inspect_checkpoint(settings["weights"])  # headers only
    except NotSafetensors as e:
        hint = "; to rerun a PNG's settings use --settings-from" if "image" in e.kind else ""
        raise UserError(f"{e}{hint}") from None
    base, window = cfgs.unet.sample_size * 8, cfgs.unet.sample_size
    if settings["image"] is not None:
        try:
            img = open_image(settings["image"])
            sizes = base_scale_size(img.width, img.height, base, settings["height"], settings["width"])
        except ValueError as e:  # ImageError included
            raise UserError(str(e)) from None
        if settings["height"] is None and settings["width"] is None:
            lines.append(f"image-to-image: the {img.width}x{img.height} picture becomes {sizes.final[1]}x"
                         f"{sizes.final[0]} (at least twice the {base} px base size and at least the picture's own "
                         f"size, on the {base} px grid of scales, keeping its aspect); --height/--width choose another")
        settings["height"], settings["width"] = sizes.final
    settings["height"] = 2 * base if settings["height"] is None else settings["height"]
    settings["width"] = 2 * base if settings["width"] is None else settings["width"]
    settings["stride"] = window // 2 if settings["stride"] is None else settings["stride"]
    kwargs = {SETTINGS[k]: v for k, v in settings.items() if k in SETTINGS and k not in ("prompt", "seed")}
    try:
        check_request(base, window, **{k: kwargs[k] for k in CHECKED if kwargs[k] is not None})
    except ValueError as e:
        raise UserError(str(e)) from None
    vae_file = check_adapters(settings, cfgs)
    nets = control(settings, kwargs, cfgs)

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
    images = [(p, (seed + k) % (SEED_MAX + 1)) for k, p in enumerate(q for q in prompts for _ in range(args.count))]
    if len(images) == 1:
        finals = [out] if out is not None else numbered(OUTPUTS, [images[0][1]])
    elif out is not None:
        finals = [out.with_name(f"{out.stem}-{i + 1:05d}-{s}{out.suffix}") for i, (_, s) in enumerate(images)]
    else:
        finals = numbered(OUTPUTS, [s for _, s in images])
    jobs = [Job(p, s, output_paths(f, n_scales)) for (p, s), f in zip(images, finals)]
    existing = [str(q) for job in jobs for p in job.paths[first - 1:] for q in (p, latent_path(p)) if q.exists()]
    if existing and not args.overwrite:
        raise UserError(f"{existing[0]} exists; pass --overwrite to replace it, or choose another --out")
    check_free_space(out.parent if out is not None else Path("."), settings["height"], settings["width"], n_scales,
                     len(jobs))
    device = device or resolve_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype(device)
    settings["seed"] = seed
    if drawn:
        lines.append(f"seed {seed} (drawn at random; --seed {seed} makes " + ("this image" if len(jobs) == 1 else
                     "these images") + " again)")
    extra = {"controlnets": nets, "vae_dtype": vae_dtype_for(dtype, vae_file.fp16_safe)
             if vae_file is not None else None}  # what the memory model counts beyond the checkpoint
    if not memory.measured(cfgs, dtype, **extra) and distributed.rank() == 0:
        print("measuring the memory model of this configuration on the meta device (once per machine, seconds)",
              file=sys.stderr)
    if not args.force:
        check_fits(cfgs, settings, device, dtype, extra)
    if settings["max_memory"] is not None:
        lines.append(plan_memory(cfgs, settings, device, dtype, extra))
    lines.append(describe(cfgs, settings, first, device, dtype, len(jobs), extra))
    if out is None:
        OUTPUTS.mkdir(exist_ok=True)
    record = {k: settings[k] for k in ("control_image", "canny") if settings.get(k) is not None}
    return Plan(device, dtype, settings, kwargs, jobs, first, resume, cfgs, record, lines)


def check_adapters(settings: dict, cfgs) -> VAEFile | None:
    """LoRAs, a VAE and embeddings checked against the checkpoint before anything loads (headers, and the
    embeddings' few vectors): a bad one is one line before the long wait, not after it. The VAE found, if any
    (the memory model counts its dtype)."""
    try:
        if settings["lora"]:
            open_loras([tuple(x) for x in settings["lora"]], cfgs).close()
        vae_file = inspect_vae(settings["vae"]) if settings["vae"] else None
        if settings["embedding"]:
            load_embeddings(settings["embedding"], (cfgs.text_encoder_1.width, cfgs.text_encoder_2.width),
                            Tokenizer().encode)
    except ValueError as e:
        raise UserError(str(e)) from None
    return vae_file


def control(settings: dict, kwargs: dict, cfgs) -> tuple:
    """Check the ControlNet flags against each other and the checkpoint (headers only) and, with --canny, make
    the edge images at phase 1's size. The ControlNets' configs, for the memory model."""
    nets, images = settings["controlnet"] or [], settings["control_image"]
    images = [] if images is None else images if isinstance(images, list) else [images]
    if not nets and not images:
        for name in ("control_image", "control_scale", "control_start", "control_end", "guess_mode"):
            kwargs.pop(SETTINGS[name], None)
        return ()
    if len(images) != len(nets):
        raise UserError(f"{len(nets)} --controlnet but {len(images)} --control-image: give one image per ControlNet")
    configs = tuple(inspect_controlnet(n, cfgs.unet).config for n in nets)
    try:
        pictures = [open_image(i) for i in images]
        if settings["canny"]:
            size = phase1_condition_size(settings["height"], settings["width"], cfgs.unet.sample_size * 8)
            pictures = [canny(p, size) for p in pictures]
    except (ImageError, ValueError, ImportError) as e:
        raise UserError(str(e)) from None
    kwargs["control_image"] = pictures if len(pictures) > 1 else pictures[0]
    return configs


def describe(cfgs, settings: dict, first: int, device: torch.device, dtype: torch.dtype, images: int,
             extra: dict) -> str:
    """One line: the scales and their sizes, the UNet evaluations and the predicted peak memory."""
    h, w = settings["height"], settings["width"]
    base = cfgs.unet.sample_size * 8
    sizes = [(8 * a, 8 * b) for a, b in scale_sizes(h, w, base)]
    est = memory.estimate(cfgs, h, w, settings["steps"], view_batch_size=settings["view_batch"] or 16, dtype=dtype,
                          decode_tile=256 if settings["tiled_decode"] else None, stride=settings["stride"],
                          resident=resident(device), **extra)
    evals = total_evals(cfgs, settings, first)
    peak = max(memory.needs(est["scales"], device.type))
    scales = " -> ".join(f"{b}x{a}" for a, b in sizes[first - 1:])
    return (f"plan: {len(sizes) - first + 1} scale(s) {scales}, {evals * images} UNet evaluations"
            + (f" ({images} images)" if images > 1 else "")
            + f", about {peak / memory.GiB:.1f} GiB peak on {device.type} ({str(dtype).replace('torch.', '')})")


def device_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu" and hasattr(os, "sysconf"):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


def check_fits(cfgs, settings: dict, device: torch.device, dtype: torch.dtype, extra: dict) -> None:
    """Refuse a request that cannot fit the device even with one view per UNet call and the smallest decode
    tile (out-of-memory recovery stops there), saying what it would cost."""
    have = device_memory(device)
    if have is None:
        return
    est = memory.estimate(cfgs, settings["height"], settings["width"], settings["steps"], view_batch_size=1,
                          dtype=dtype, decode_tile=memory.DECODE_TILES[-1], stride=settings["stride"],
                          resident=resident(device), **extra)
    need = max(memory.needs(est["scales"], device.type))
    if need > have:
        raise UserError(f"{settings['width']}x{settings['height']} needs about {need / 2**30:.1f} GiB even with "
                        f"--view-batch 1, but {device} has {have / 2**30:.1f} GiB; it would also take "
                        f"{est['unet_evals']} UNet evaluations ({est['flops'] / 1e15:.1f} PFLOP). Choose a smaller "
                        "size, or pass --force to try anyway")


def plan_memory(cfgs, settings: dict, device: torch.device, dtype: torch.dtype, extra: dict) -> str:
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
                                     decode_tiles=tiles, **extra)
    except ValueError as e:
        raise UserError(f"--max-memory: {e}; raise it or choose a smaller --height/--width") from None
    if settings["view_batch"] is not None:
        vb = min(vb, settings["view_batch"])
    return (f"within {budget / memory.GiB:.2f} GiB: {vb} view(s) per UNet call, decode "
            + (f"in {tile} px tiles" if tile else "in one piece")
            + ("" if kept else "; the UNet and the VAE take turns on the device"))


def bar(nested: bool = False, **kwargs) -> tqdm:
    # in a terminal, live bars one under the other; in a log (CI, a pipe) only the outer ones, a line every half
    # minute, as nested bars there are cursor-movement garbage
    tty = sys.stderr.isatty()
    if nested and not tty:
        kwargs["disable"] = True
    return tqdm(**kwargs, file=sys.stderr, dynamic_ncols=True, mininterval=0.1 if tty else 30,
                position=(1 if nested else 0) if tty else None)


class Progress:
    """On stderr: the whole run's UNet evaluations with its ETA, each scale's steps (its bar appearing as the
    scale begins), each decode's tiles. Quiet where `shown` is False (ranks other than 0)."""

    def __init__(self, total_evals: int, n_scales: int, shown: bool):
        self.shown, self.n_scales = shown, n_scales
        self.overall = bar(total=total_evals, desc="all", unit="eval", disable=not shown)
        self.bar: tqdm | None = None
        self.decoding = False
        self.evals = 0

    def step(self, scale: int, step: int, steps: int, evals: int) -> None:
        if step == 0:  # a scale begins
            self._close()
            self.bar = bar(True, total=steps, desc=f"scale {scale}/{self.n_scales}", unit="step",
                           disable=not self.shown, leave=False)
            self.decoding, self.evals = False, 0
            return
        self.overall.update(evals - self.evals)
        self.evals = evals
        self.bar.update(step - self.bar.n)

    def tile(self, done: int, total: int) -> None:
        if not self.decoding:
            self._close()
            self.bar = bar(True, total=total, desc="VAE decode", unit="tile", disable=not self.shown,
                           leave=False)
            self.decoding = True
        self.bar.update(done - self.bar.n)

    def write(self, text: str) -> None:
        if self.shown:
            tqdm.write(text, file=sys.stderr)

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self._close()
        self.overall.close()


def total_evals(cfgs, settings: dict, first: int) -> int:
    """UNet evaluations of one image from scale `first` on (an encoded picture's scale 1 costs none)."""
    views = memory.unet_views(cfgs.unet, settings["height"], settings["width"], settings["stride"])
    start = max(first, 2 if settings["image"] else 1)
    return sum(2 * settings["steps"] * n for s, vs in enumerate(views, 1) if s >= start for *_, n in vs)


def load_pipeline(p: Plan, shown: bool, text_encoders: bool):
    s = p.settings
    loading = bar(desc="loading", unit="B", unit_scale=True, unit_divisor=1024, disable=not shown)

    def read(done: int, total: int) -> None:
        loading.total = total
        loading.update(done - loading.n)

    started = time.perf_counter()
    try:
        pipe = load(s["weights"], device=p.device, dtype=p.dtype, loras=[tuple(x) for x in s["lora"] or []],
                    vae=s["vae"], embeddings=s["embedding"] or [], controlnet=s["controlnet"] or [],
                    text_encoders=text_encoders, progress=read)
    finally:
        loading.close()
    if shown:
        print(f"loaded {s['weights']} on {p.device} ({str(p.dtype).replace('torch.', '')}) in "
              f"{time.perf_counter() - started:.1f} s", file=sys.stderr)
        weights = Path(s["weights"])
        if weights.is_file() and metadata.cached_hash(weights) is None:
            print(f"hashing {weights.name} for the PNG metadata (once per file)", file=sys.stderr)
            pipe.model_info()
    return pipe


def resume_command(args, latents: Path, out: Path) -> str:
    words = ["minifusion", "--resume", str(latents), "--out", str(out)]
    for flag in ("device", "dtype"):
        if getattr(args, flag):
            words += [f"--{flag}", getattr(args, flag)]
    return shlex.join(words)


def run(argv=None) -> int:
    args = parse_args(argv)
    device = None
    if distributed.launched():
        device = distributed.init(resolve_device(args.device).type if args.device else None, args.timeout)
    rank, world = distributed.rank(), distributed.world()
    try:
        p = plan(args, device)
    except (UserError, CheckpointError):
        if rank != 0:
            return 2  # every rank plans alike: rank 0 says it once
        raise
    for line in p.lines if rank == 0 else ():
        print(line, file=sys.stderr)
    # one image: all ranks share its work (view parallel); several: each rank makes its own (image parallel)
    view_parallel = len(p.jobs) == 1
    mine = p.jobs if view_parallel else [p.jobs[i] for i in distributed.images_of_rank(len(p.jobs), rank, world)]
    writes = rank == 0 or not view_parallel
    shown = rank == 0
    if not mine:
        return 0  # more ranks than images
    pipe = load_pipeline(p, shown, text_encoders=rank == 0 or not view_parallel)
    progress = Progress(total_evals(p.cfgs, p.settings, p.first) * len(mine), len(p.jobs[0].paths), shown)
    if not (shown or writes):
        logging.getLogger("minifusion").setLevel(logging.ERROR)
    job, written = None, []
    try:
        for job in mine:
            written = []
            progress.write("encoding the prompt" if p.resume is not None or not p.settings["image"]
                           else "encoding the prompt and the picture")
            for scale in pipe.iter_generate(job.prompt, seed=job.seed, callback=progress.step,
                                            decode_progress=progress.tile, resume=p.resume,
                                            view_parallel=view_parallel, record=p.record, **p.kwargs):
                if writes:
                    path = job.paths[scale.scale - 1]
                    try:
                        save_png(scale.image, path)
                        save_latents(latent_path(path), scale.saved())
                    except OSError as e:
                        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
                    written.append(path)
                    took = f"{scale.stats['seconds']:.1f} s" if "seconds" in scale.stats else "the input picture"
                    line = f"wrote {path} ({scale.image.width}x{scale.image.height}, {took})"
                    progress.write(line) if shown else print(f"rank {rank}: {line}", file=sys.stderr)
    except KeyboardInterrupt:
        progress.close()
        if shown:
            print(f"\ninterrupted; kept {_listing(written)}", file=sys.stderr)
            if written and job is not None and len(written) < len(job.paths):
                print(f"continue with: {resume_command(args, latent_path(written[-1]), job.paths[-1])}",
                      file=sys.stderr)
        return 130
    except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
        progress.close()
        if not is_out_of_memory(e):
            raise
        raise UserError(f"out of memory even with one view per UNet call (--view-batch 1) at "
                        f"{p.settings['width']}x{p.settings['height']}; use a smaller --height/--width or a device "
                        f"with more memory (kept {_listing(written)})") from None
    except UserError as e:
        progress.close()
        raise UserError(f"{e} (kept {_listing(written)})") from None
    progress.close()
    if view_parallel and world > 1:
        # every rank past its last collective before any tears the group down: a rank leaving while another is
        # still inside the last all_gather aborted it now and then (gloo: "terminate called ...")
        torch.distributed.barrier()
    return 0


def _listing(paths: list[Path]) -> str:
    if not paths:
        return "nothing"
    return ", ".join(map(str, paths)) + f" and the latents beside them ({latent_path(paths[-1]).name} ...)"


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def main(argv=None) -> int:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine())
    logger = logging.getLogger("minifusion")
    logger.addHandler(handler)
    rank = os.environ.get("RANK", "0") if distributed.launched() else "0"
    prefix = f"rank {rank}: " if rank != "0" else ""
    try:
        return run(argv)
    except KeyboardInterrupt:
        print("\ninterrupted before anything was written", file=sys.stderr)
        return 130
    except (UserError, CheckpointError) as e:
        print(f"error: {prefix}{e}", file=sys.stderr)
        return 2
    except (NonFiniteError, distributed.DistributedError) as e:
        print(f"error: {prefix}{e}", file=sys.stderr)
        return 1
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
        if distributed.default_group() is not None:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
