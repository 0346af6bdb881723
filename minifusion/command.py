"""The command line's run: its flags (the parser in __main__.py) become a request, checked whole before any weight is
read (minifusion.request), then the model loads and every scale is written as it finishes."""
from __future__ import annotations

import logging
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import distributed, memory, metadata, request
from .checkpoint import CheckpointError, inspect_checkpoint
from .model_files import find_checkpoint
from .noise import detect
from .samplers import run_steps
from .controlnet import canny, phase1_condition_size
from .controlnet_file import inspect_controlnet
from .demofusion import scale_sizes
from .embeddings import load_embeddings
from .encode import open_image
from .files import LatentFileError, SavedScale, latent_path, load_latents, numbered, output_paths, save_latents
from .lora import open_loras, parse_spec
from .metadata import NoSettings, save_png
from .pipeline import DEFAULT_WEIGHTS, DTYPES, NonFiniteError, default_dtype, load, resident, resolve_device
from .progress import Progress, bar
from .safetensors_check import NotSafetensors
from .settings import MODEL, RECORDED, REQUEST, SAMPLERS, SEED_MAX, SettingError, check, cli_word, defaults
from .tokenizer import Tokenizer
from .vae_file import VAEFile, inspect_vae, vae_dtype_for
from .views import is_out_of_memory

log = logging.getLogger("minifusion")
OUTPUTS = Path("outputs")  # where numbered images go without --out


class UserError(Exception):
    """Something the user can fix; printed as one line, exit status 2."""


USER_ERRORS = (UserError, CheckpointError)
FAILURES = (NonFiniteError, distributed.DistributedError)  # exit status 1


def worded(e: SettingError) -> UserError:
    return UserError(e.worded(cli_word))


def layered(args, resume: SavedScale | None) -> dict:
    """The flags given, over the settings of --resume's run, over those of a --settings-from PNG, over the
    defaults; paths absolute (relative ones are read from here)."""
    settings = defaults(RECORDED)
    if args.settings_from is not None:
        try:
            found = metadata.read_settings(args.settings_from)
        except NoSettings as e:
            raise UserError(str(e)) from None
        settings.update(request.relocated(found, args.settings_from))
        for name in ("weights", "vae"):
            if settings.get(name) and not Path(settings[name]).exists():
                raise UserError(f"--settings-from {args.settings_from}: the {name} it names, {settings[name]}, no "
                                f"longer exists; pass --{name}")
    if resume is not None:
        settings.update({k: v for k, v in resume.settings.items() if k in RECORDED})
    given = {k: getattr(args, k) for k in RECORDED if getattr(args, k, None) is not None}
    if "lora" in given:
        try:
            given["lora"] = [[str(path), weight] for path, weight in map(parse_spec, given["lora"])]
        except ValueError as e:
            raise UserError(str(e)) from None
    for name in ("control_scale", "control_start", "control_end", "control_image"):
        if name in given and len(given[name]) == 1:
            given[name] = given[name][0]
    settings.update(given)
    settings["weights"] = settings["weights"] or str(DEFAULT_WEIGHTS)
    for name in (*request.PICTURES, *MODEL):
        if name == "lora":
            settings[name] = [[request.absolute(p), w] for p, w in settings[name] or []]
        else:
            settings[name] = request.absolute(settings[name])
    return settings


def prompts_of(args, settings: dict) -> list[str]:
    if args.prompts is None:
        if not settings.get("prompt"):
            raise UserError("no prompt given; usage: minifusion \"a prompt\" --out img.png")
        return [settings["prompt"]]
    if args.prompt is not None:
        raise UserError("give a prompt or --prompts FILE, not both")
    try:
        lines = Path(args.prompts).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--prompts {args.prompts}: cannot read it as UTF-8 text ({e})") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise UserError(f"--prompts {args.prompts}: holds no prompt (one a line)")
    return prompts


def check_free_space(folder: Path, height: int, width: int, n_scales: int, images: int) -> None:
    """Refuse up front when the images cannot fit: PNGs of noise-like images approach 3 bytes a pixel."""
    need = images * sum(3 * (height * s // n_scales) * (width * s // n_scales) for s in range(1, n_scales + 1))
    free = shutil.disk_usage(folder).free
    if free < need:
        raise UserError(f"{folder}: only {free / 2**20:.0f} MiB free, the images may need up to "
                        f"{need / 2**20:.0f} MiB; free some space or choose another --out folder")


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
    settings: dict  # the run's settings, resolved (the command line's names)
    kwargs: dict  # generate() arguments shared by every image
    jobs: list[Job]
    first: int  # the first scale this run computes (> 1 when resuming)
    resume: SavedScale | None
    cfgs: object
    record: dict  # settings only the command line knows, recorded beside the pipeline's in every image
    lines: list[str] = field(default_factory=list)  # what to tell the user before loading


def _out(args) -> Path | None:
    out = Path(args.out) if args.out is not None else None
    if out is not None:
        if out.suffix.lower() != ".png":
            raise UserError(f"--out {out}: minifusion writes PNG files; use a name ending in .png")
        if not out.parent.is_dir():
            raise UserError(f"--out {out}: folder {out.parent} does not exist")
        if not os.access(out.parent, os.W_OK):
            raise UserError(f"--out {out}: folder {out.parent} is not writable")
    elif OUTPUTS.exists() and not (OUTPUTS.is_dir() and os.access(OUTPUTS, os.W_OK)):
        raise UserError(f"{OUTPUTS}/ is not a writable folder; pass --out")
    return out


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
    settings = layered(args, resume)
    given_view_batch = settings["view_batch"]  # the pipeline resolves it again, alike (with the ranks, if any)
    prompts = prompts_of(args, settings)
    try:
        for name in REQUEST:
            check(name, settings[name])  # every value by its row now, before the files are read
        for name in ("count", "timeout"):
            check(name, getattr(args, name))
    except SettingError as e:
        raise worded(e) from None
    out = _out(args)
    try:
        cfgs = inspect_checkpoint(settings["weights"])  # headers only
        noise = detect(*find_checkpoint(Path(settings["weights"])))  # v-prediction, zero SNR: what its files say
        settings["weights"] = request.model_file(settings["weights"])
    except NotSafetensors as e:
        hint = "; to rerun a PNG's settings use --settings-from" if "image" in e.kind else ""
        raise UserError(f"{e}{hint}") from None
    group = distributed.default_group()
    # a resumed run has its picture in its latents already; its images still name it
    picture = settings["image"] if resume is not None else None
    try:
        req = request.resolve({**settings, "prompt": prompts[0], "image": None if resume else settings["image"]},
                              cfgs, noise=noise, controlnets=len(settings["controlnet"]), paired=True, resume=resume,
                              group=group)
    except SettingError as e:
        raise worded(e) from None
    lines = []
    if req.picture is not None and settings["height"] is None and settings["width"] is None:
        h, w = req.settings["height"], req.settings["width"]
        base = cfgs.unet.sample_size * 8
        lines.append(f"image-to-image: the {req.picture.width}x{req.picture.height} picture becomes {w}x{h} (at "
                     f"least twice the {base} px base size and at least the picture's own size, on the {base} px "
                     "grid of scales, keeping its aspect); --height/--width choose another")
    settings.update(req.settings)
    vae_file = check_adapters(settings, cfgs)
    kwargs = request.api_kwargs({k: v for k, v in settings.items() if k != "seed"})
    kwargs["view_batch_size"] = given_view_batch
    nets = control(settings, kwargs, cfgs)

    seed = req.settings["seed"]
    images = [(p, (seed + k) % (SEED_MAX + 1)) for k, p in enumerate(q for q in prompts for _ in range(args.count))]
    if len(images) == 1:
        finals = [out] if out is not None else numbered(OUTPUTS, [images[0][1]])
    elif out is not None:
        finals = [out.with_name(f"{out.stem}-{i + 1:05d}-{s}{out.suffix}") for i, (_, s) in enumerate(images)]
    else:
        finals = numbered(OUTPUTS, [s for _, s in images])
    jobs = [Job(p, s, output_paths(f, len(req.sizes))) for (p, s), f in zip(images, finals)]
    existing = [str(q) for job in jobs for p in job.paths[req.first - 1:] for q in (p, latent_path(p)) if q.exists()]
    if existing and not args.overwrite:
        raise UserError(f"{existing[0]} exists; pass --overwrite to replace it, or choose another --out")
    check_free_space(out.parent if out is not None else Path("."), settings["height"], settings["width"],
                     len(req.sizes), len(jobs))
    try:
        device = device or resolve_device(args.device)
    except SettingError as e:
        raise worded(e) from None
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype(device)
    if req.drawn:
        lines.append(f"seed {seed} (drawn at random; --seed {seed} makes " + ("this image" if len(jobs) == 1 else
                     "these images") + " again)")
    extra = {"controlnets": nets, "vae_dtype": vae_dtype_for(dtype, vae_file.fp16_safe)
             if vae_file is not None else None}  # what the memory model counts beyond the checkpoint
    if not memory.measured(cfgs, dtype, **extra) and distributed.rank() == 0:
        print("measuring the memory model of this configuration on the meta device (once per machine, seconds)",
              file=sys.stderr)
    if not args.force:
        check_fits(cfgs, settings, device, dtype, extra)
    planned = None
    if settings["max_memory"] is not None:
        line, planned = plan_memory(cfgs, settings, device, dtype, extra)
        lines.append(line)
    world = distributed.world(group) if group is not None and len(jobs) == 1 else 1
    settings["view_batch"] = request.view_batch(settings, cfgs, planned, world)
    lines.append(describe(cfgs, settings, req.first, device, dtype, len(jobs), extra))
    lines.append(sampling_line(req))
    if settings["guidance"] <= 1 and settings["negative"]:
        lines.append(f"warning: --negative is not used at --guidance {settings['guidance']:g}: at 1 or below "
                     "classifier-free guidance is off and only the prompt's half runs")
    if out is None:
        OUTPUTS.mkdir(exist_ok=True)
    record = {k: settings[k] for k in ("control_image", "canny") if settings.get(k) is not None}
    if picture is not None:
        record["image"] = picture
    return Plan(device, dtype, settings, kwargs, jobs, req.first, resume, cfgs, record, lines)


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
    """The ControlNets checked against the checkpoint (headers only) and, with --canny, the edge images made at
    phase 1's size; the pairing of nets, images and values is request.resolve's. The ControlNets' configs, for
    the memory model."""
    nets, images = settings["controlnet"], settings["control_image"]
    if images is None:
        return ()
    images = images if isinstance(images, list) else [images]
    configs = tuple(inspect_controlnet(n, cfgs.unet).config for n in nets)
    try:
        pictures = [open_image(i) for i in images]
        if settings["canny"]:
            size = phase1_condition_size(settings["height"], settings["width"], cfgs.unet.sample_size * 8)
            pictures = [canny(p, size) for p in pictures]
    except (ValueError, ImportError) as e:  # ImageError included
        raise UserError(str(e)) from None
    kwargs["control_image"] = pictures if len(pictures) > 1 else pictures[0]
    return configs


def describe(cfgs, settings: dict, first: int, device: torch.device, dtype: torch.dtype, images: int,
             extra: dict) -> str:
    """One line: the scales and their sizes, the UNet evaluations and the predicted peak memory."""
    h, w = settings["height"], settings["width"]
    base = cfgs.unet.sample_size * 8
    sizes = [(8 * a, 8 * b) for a, b in scale_sizes(h, w, base)]
    est = memory.estimate(cfgs, h, w, settings["steps"], view_batch_size=settings["view_batch"], dtype=dtype,
                          decode_tile=256 if settings["tiled_decode"] else None, stride=settings["stride"],
                          resident=resident(device), guidance_scale=settings["guidance"], **extra)
    evals = total_evals(cfgs, settings, first)
    peak = max(memory.needs(est["scales"], device.type))
    scales = " -> ".join(f"{b}x{a}" for a, b in sizes[first - 1:])
    return (f"plan: {len(sizes) - first + 1} scale(s) {scales}, {evals * images} UNet evaluations"
            + (f" ({images} images)" if images > 1 else "")
            + f", about {peak / memory.GiB:.1f} GiB peak on {device.type} ({str(dtype).replace('torch.', '')})")


def sampling_line(req: "request.Request") -> str:
    """One line: the sampler on its schedule, the steps each scale runs, and what the model predicts (as its files
    say, or as told)."""
    s = req.settings
    run = req.sampling
    if s["timesteps"]:
        steps = f"timesteps {','.join(map(str, s['timesteps']))}"
    else:
        steps = f"{s['steps']} step" + "s" * (s["steps"] != 1)
    part = run_steps(run.steps, s["strength"])
    return (f"sampling: {SAMPLERS[s['sampler']]}, {s['schedule']} schedule, {steps} a scale"
            + (f" ({part} of them after the first scale, at strength {s['strength']:g})" if part < run.steps else "")
            + f"; the model: {req.noise.describe()}")


def check_fits(cfgs, settings: dict, device: torch.device, dtype: torch.dtype, extra: dict) -> None:
    """Refuse a request the device cannot hold (request.check_fits), before loading."""
    try:
        request.check_fits(settings, cfgs, device, dtype, resident(device), **extra)
    except SettingError as e:
        raise UserError(f"{e.worded(cli_word)}, or pass --force to try anyway") from None


def plan_memory(cfgs, settings: dict, device: torch.device, dtype: torch.dtype, extra: dict) -> tuple[str, int]:
    """Refuse a --max-memory nothing fits in, before loading; say what it chose. (The line, the view batch it
    allows.)"""
    budget = settings["max_memory"]
    have = request.device_memory(device)
    if have is not None and budget > have:
        log.warning("--max-memory %.1f GiB is more than %s has (%.1f GiB)", budget / memory.GiB, device,
                    have / memory.GiB)
    try:
        vb, tile, kept = request.plan_memory(settings, cfgs, dtype, device.type, resident(device),
                                             may_offload=device.type != "cpu", **extra)
    except SettingError as e:
        raise worded(e) from None
    shown = vb if settings["view_batch"] is None else min(vb, settings["view_batch"])
    return (f"within {budget / memory.GiB:.2f} GiB: {shown} view(s) per UNet call, decode "
            + (f"in {tile} px tiles" if tile else "in one piece")
            + ("" if kept else "; the UNet and the VAE take turns on the device")), vb


def total_evals(cfgs, settings: dict, first: int) -> int:
    """UNet evaluations of one image from scale `first` on (an encoded picture's scale 1 costs none)."""
    return sum(scale.unet_evals for scale in request.work_of(settings, cfgs, first=first))


def load_pipeline(p: Plan, shown: bool, text_encoders: bool):
    s = p.settings
    loading = bar(desc="loading", unit="B", unit_scale=True, unit_divisor=1024, disable=not shown)

    def read(done: int, total: int) -> None:
        loading.total = total
        loading.update(done - loading.n)

    started = time.perf_counter()
    try:
        pipe = load(s["weights"], device=p.device, dtype=p.dtype, loras=[tuple(x) for x in s["lora"]],
                    vae=s["vae"], embeddings=s["embedding"], controlnet=s["controlnet"],
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


def run(args) -> int:
    device = None
    try:
        if distributed.launched():
            try:
                asked = resolve_device(args.device).type if args.device else None
            except SettingError as e:
                raise worded(e) from None
            device = distributed.init(asked, args.timeout)
        return _run(args, device)
    finally:
        if distributed.default_group() is not None:
            torch.distributed.destroy_process_group()


def _run(args, device) -> int:
    rank, world = distributed.rank(), distributed.world()
    try:
        p = plan(args, device)
    except USER_ERRORS:
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
