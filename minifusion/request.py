"""A generation request resolved and checked once, before any weight is read.

minifusion.settings holds each setting's row (names, default, range). Here are the rules that need more than one
row: defaults that depend on the model or the picture (the size, the stride), the seed (drawn once, the same on
every rank), the ControlNet's pairing, a resumed run's fit, the memory budget and the view batch. The command line,
the web UI and `Pipeline.generate` all call `resolve`; a `SettingError` names the settings it is about, and each
front end words them in its own names.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

import torch
from PIL import Image

from . import distributed, memory, work
from .checkpoint import Configs
from .model_files import find_checkpoint
from .demofusion import scale_sizes
from .encode import base_scale_size, open_image
from .files import SavedScale
from .noise import NoiseSchedule
from .samplers import Sampling
from .schedulers import check_sampling
from .settings import (BY_API, BY_NAME, MODEL, RANDOM_SEEDS, REQUEST, SettingError, check, current_names, defaults,
                       invalid, parse_size)
from .views import halves

CONTROL = ("control_scale", "control_start", "control_end", "guess_mode", "canny")  # what steers a ControlNet
SAMPLING = ("sampler", "schedule", "timesteps", "eta")  # what a resumed run keeps unless another sampler is asked
PICTURES = ("image", "control_image")  # settings that name pictures


class Request(NamedTuple):
    settings: dict[str, Any]  # every request setting, resolved (sizes, stride, seed drawn, paths absolute, the
    # sampler and schedule by their short names, the model's prediction type and zero-SNR as run)
    picture: Image.Image | None  # the image-to-image picture, opened
    sizes: list[tuple[int, int]]  # latent (h, w) of every scale
    first: int  # the first scale the sampler computes (after a resumed run's last; 1 otherwise)
    drawn: bool  # the seed was drawn at random
    sampling: Sampling  # the sampler on its schedule, for the model's noise schedule
    noise: NoiseSchedule  # the model's, with the request's overrides


def from_api(prompt, kwargs: dict[str, Any]) -> dict[str, Any]:
    """generate()'s keywords as settings; a TypeError names any it does not take (and the right name where the
    command line's, or diffusers', was used)."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be text, not {type(prompt).__name__}")
    kwargs = current_names(kwargs, key=lambda s: s.api)  # scheduler= is sampler=
    unknown = [k for k in kwargs if k not in BY_API or BY_API[k].name not in REQUEST]
    if unknown:
        hints = {**{s.name: s.api for s in BY_NAME.values() if s.api and s.name != s.api and s.name in REQUEST},
                 "num_steps": "num_inference_steps", "cfg_scale": "guidance_scale", "generator": "seed (an int)",
                 "tile": "multi_decoder", "out": "(none: save result.images yourself)"}
        parts = [f"{k!r}" + (f" (did you mean {hints[k]}?)" if k in hints else "") for k in unknown]
        raise TypeError("generate() got unexpected keyword argument(s) " + ", ".join(parts))
    negative = kwargs.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise TypeError(f"negative_prompt must be text or None, not {type(negative).__name__}")
    return {"prompt": prompt, **{BY_API[k].name: v for k, v in kwargs.items()}}


def api_kwargs(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as generate()'s keywords (those generate() takes; the prompt apart)."""
    return {BY_NAME[k].api: v for k, v in settings.items()
            if k in REQUEST and k != "prompt" and BY_NAME[k].api is not None}


def resolve(values: dict[str, Any], cfgs: Configs, *, noise: NoiseSchedule = NoiseSchedule(), controlnets: int = 0,
            paired: bool = False, resume: SavedScale | None = None, group=None,
            open_picture: Callable = open_image) -> Request:
    """The request `values` asks (settings by name; absent or None: the default) for a checkpoint of `cfgs` whose
    noise schedule is `noise` (minifusion.noise: what it predicts, as its files say), or SettingError.
    controlnets: how many ControlNets the run has; paired: each needs a control image (the command line and the
    page name them per run; a loaded pipeline's may idle). resume: the finished scale a run continues (with its
    sampling, unless another is asked). group: the process group whose ranks make this image together (the seed
    is drawn on rank 0). open_picture(image) -> the picture, or what says its (width, height) `size` (the web
    UI's gate reads a client's picture from its header; the pixels are read when the run starts)."""
    values = {k: v for k, v in values.items() if k in REQUEST and v is not None}
    if resume is not None and "sampler" not in values:  # a resumed run continues with the sampling it began
        saved = current_names(resume.settings)  # an older file's scheduler is its sampler
        values.update({k: saved[k] for k in SAMPLING if saved.get(k) is not None and k not in values})
    s = {**defaults(), **{k: v for k, v in values.items() if v is not None}}
    for name in REQUEST:
        check(name, s[name])
    base, window = cfgs.unet.sample_size * 8, cfgs.unet.sample_size
    picture = None
    if s["image"] is not None:
        if resume is not None:
            raise SettingError(("image", "resume"), lambda w: f"{w('image')} and a resumed run do not go together: "
                               "the run resumed already has its picture")
        picture = _picture("image", s["image"], open_picture)
        try:
            s["height"], s["width"] = base_scale_size(*picture.size, base, values.get("height"),
                                                      values.get("width")).final
        except ValueError as e:
            why = str(e)
            raise SettingError(("height", "width"), lambda w: why) from None
    s["height"] = 2 * base if s["height"] is None else s["height"]
    s["width"] = 2 * base if s["width"] is None else s["width"]
    check_size(s["height"], s["width"], base)
    s["stride"] = window // 2 if s["stride"] is None else s["stride"]
    if s["stride"] > window:
        raise invalid("stride", s["stride"], f"it must be an integer from 1 to the window size, {window}")
    if s["max_memory"] is not None:
        s["max_memory"] = budget_bytes(s["max_memory"])
    _check_control(s, controlnets, paired)
    sampling, noise = _sampling(s, noise)
    sizes = scale_sizes(s["height"], s["width"], base)
    first = 1 if resume is None else _resume_fits(resume, s["height"], s["width"], base, sizes)
    s["seed"], drawn = seed_of(s["seed"], group)
    for name in PICTURES:
        s[name] = absolute(s[name])
    return Request(s, picture, sizes, first, drawn, sampling, noise)


def _sampling(s: dict, model: NoiseSchedule) -> tuple[Sampling, NoiseSchedule]:
    """The sampler on its schedule (schedulers.check_sampling's rules), the settings resolved to what runs: the
    sampler and schedule by their short names ("automatic" made the schedule it picks), the sampler's eta, the
    model's prediction type and zero-SNR with the request's overrides."""
    choice = check_sampling(s["sampler"] or BY_NAME["sampler"].default, s["schedule"], s["steps"], s["timesteps"],
                            s["eta"], s["strength"], s["guidance_rescale"], s["prediction"], s["zero_snr"])
    noise = model.overridden(s["prediction"], s["zero_snr"])
    try:
        sampling = choice.sampling(s["steps"], noise)
    except ValueError as e:  # a schedule that cannot lay out this many steps
        why = str(e)
        raise SettingError("steps", lambda w: why) from None
    s.update(sampler=choice.sampler, schedule=choice.schedule_for(noise), eta=sampling.eta,
             timesteps=None if choice.timesteps is None else list(choice.timesteps), strength=choice.strength,
             prediction=noise.prediction_type, zero_snr=noise.rescale_betas_zero_snr)
    return sampling, noise


def _picture(name: str, value, open_picture: Callable):
    try:
        return open_picture(value)
    except (ValueError, TypeError) as e:  # ImageError included
        why = str(e)
        raise SettingError(name, lambda w: why) from None


def check_size(height: int, width: int, base: int) -> None:
    """SettingError for a final size DemoFusion cannot run on a model native at `base` px."""
    for name, v in (("height", height), ("width", width)):
        if v <= 0:
            raise invalid(name, v, f"it must be a positive multiple of 8, at least {base // 4}")
        if v % 8:
            raise SettingError(name, lambda w, name=name, v=v: f"{w(name)} {v} is not a multiple of 8; pick e.g. "
                               f"{max(8, v // 8 * 8)}")
    if max(height, width) < base:
        raise SettingError(("height", "width"), lambda w: f"size {width}x{height} is below this model's base size: "
                           f"the longer side must be at least {base} px (DemoFusion starts at the base size and "
                           "goes up)")
    if min(height, width) < base // 4:
        raise SettingError(("height", "width"), lambda w: f"size {width}x{height} is too narrow: the shorter side "
                           f"must be at least {base // 4} px")


def _each(value, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def _check_control(s: dict, controlnets: int, paired: bool) -> None:
    """A control image per ControlNet, a value per ControlNet (or one for all), start before end; the control
    settings only with a ControlNet and its image."""
    images = _each(s["control_image"], 1) if s["control_image"] not in (None, []) else []
    if not images:
        asked = [n for n in CONTROL if s[n] not in (BY_NAME[n].default, [BY_NAME[n].default], [])]
        if asked:
            raise SettingError(asked[0], lambda w: f"{w(asked[0])} steers a ControlNet: give {w('controlnet')} and "
                               f"{w('control_image')} too, or leave it out")
        if paired and controlnets:
            raise SettingError("control_image", lambda w: f"{controlnets} {w('controlnet')} but no "
                               f"{w('control_image')}: give one image per ControlNet")
        s["control_image"] = None
        return
    if not controlnets:
        raise SettingError("control_image", lambda w: f"{w('control_image')} steers a ControlNet: give "
                           f"{w('controlnet')} too")
    if len(images) != controlnets:
        raise SettingError("control_image", lambda w: f"{controlnets} {w('controlnet')} but {len(images)} "
                           f"{w('control_image')}: give one image per ControlNet")
    for name in ("control_scale", "control_start", "control_end"):
        values = _each(s[name], controlnets)
        if len(values) != controlnets:
            raise SettingError(name, lambda w: f"{len(values)} values of {w(name)} for {controlnets} ControlNet(s): "
                               "give one, or one per ControlNet")
    for a, b in zip(_each(s["control_start"], controlnets), _each(s["control_end"], controlnets)):
        if not a < b:
            raise SettingError(("control_start", "control_end"), lambda w: f"{w('control_start')} {a} and "
                               f"{w('control_end')} {b}: the ControlNet acts from start to end of each scale's "
                               "steps, so start must be below end")
    for name in ("control_image", "control_scale", "control_start", "control_end"):
        if isinstance(s[name], (list, tuple)) and len(s[name]) == 1:
            s[name] = s[name][0]  # one value for one ControlNet, as recorded before lists
    if isinstance(s["control_image"], list):
        s["control_image"] = images


def budget_bytes(value) -> int:
    """A memory budget (bytes, or text such as "8GiB"; a plain number of GiB as text) in bytes."""
    try:
        size = parse_size(value, unit=memory.GiB if isinstance(value, str) else 1)
    except ValueError as e:
        why = str(e)
        raise SettingError("max_memory", lambda w: f"{w('max_memory')} {why}") from None
    if size > 1 << 60:
        raise invalid("max_memory", value, "it must be below an exbibyte")
    return size


def seed_of(seed: int | None, group=None) -> tuple[int, bool]:
    """(seed, drawn at random): None or -1 draws one, on rank 0 of `group`, shared with its other ranks so that
    they make the same image (every rank draws its own otherwise, and no seed would reproduce theirs)."""
    if seed is not None and seed != -1:
        return seed, False
    drawn = secrets.randbelow(RANDOM_SEEDS)
    if group is not None:
        drawn = distributed.broadcast_object(drawn, group)
    return drawn, True


def _resume_fits(resume: SavedScale, height: int, width: int, base: int, sizes: list[tuple[int, int]]) -> int:
    """The first scale a resumed run computes, or SettingError when the size does not continue it: it must add
    scales and keep the aspect of the run it continues."""
    first = resume.scale + 1
    if first > len(sizes):
        raise SettingError(("height", "width"), lambda w: f"that run already reached scale {first - 1}; ask for a "
                           f"larger {w('height')}/{w('width')} (scale {first} needs the longer side >= "
                           f"{first * base} px)")
    have = tuple(resume.latents.shape[-2:])
    if sizes[first - 2] != have:
        want = sizes[first - 2]
        raise SettingError(("height", "width"), lambda w: f"its scale-{first - 1} latents are {have[1]}x{have[0]}, "
                           f"but a {width}x{height} run has {want[1]}x{want[0]} there; keep the aspect ratio of "
                           "the run you continue")
    return first


def absolute(value):
    """A path (or each of a list) as an absolute path, so that a PNG recording it names the file from anywhere;
    anything else (a picture given as pixels, None) as it is."""
    if isinstance(value, (list, tuple)):
        return [absolute(v) for v in value]
    if isinstance(value, (str, os.PathLike)):
        return os.path.abspath(value)
    return value


def model_file(weights: str | Path) -> str:
    """The checkpoint a --weights names, absolute: the file itself where the folder holds a single file (so the
    PNG names and hashes the model, not the folder), the folder for the diffusers layout."""
    return os.path.abspath(find_checkpoint(Path(weights))[1])


def relocated(settings: dict[str, Any], png: Path) -> dict[str, Any]:
    """A PNG's recorded paths that no longer exist, looked for where the PNG is now: a folder that was moved or
    copied whole (the pictures, weights and outputs of a project) keeps the paths between them. Each missing path
    is tried as its last one, two, ... parts under the PNG's folder and the folders above it, nearest first."""
    out = dict(settings)
    for name in (*PICTURES, *MODEL):
        value = out.get(name)
        if name == "lora" and value:
            out[name] = [[_moved(p, png), w] for p, w in value]
        elif isinstance(value, list):
            out[name] = [_moved(p, png) for p in value]
        elif isinstance(value, str):
            out[name] = _moved(value, png)
    return out


def _moved(path: str, png: Path) -> str:
    p = Path(path)
    if not p.is_absolute() or p.exists():
        return path
    parts = p.parts[1:]
    for folder in Path(os.path.abspath(png)).parents:
        for k in range(len(parts)):
            candidate = folder.joinpath(*parts[k:])
            if candidate.exists():
                return str(candidate)
    return path


def view_batch(settings: dict, cfgs: Configs, planned: int | None, world: int) -> int:
    """Views per UNet call: the one asked for, at most what a memory budget allows (`planned`); with none asked
    and several ranks, the batch that spreads the calls over them (the PNG records it, so one process given it
    makes the same image); else the row's default."""
    asked = settings["view_batch"]
    batch = asked if planned is None else planned if asked is None else min(asked, planned)
    batch = BY_NAME["view_batch"].default if batch is None else batch
    if world > 1 and (asked is None or planned is not None):
        return distributed.view_batch(work_of(settings, cfgs), world, batch)
    return batch


def work_of(settings: dict, cfgs: Configs, view_batch: int | None = None, first: int = 1) -> list:
    """The run's work (minifusion.work: each computed scale's views, UNet calls and evaluations) from scale
    `first` on; an image-to-image run computes from scale 2."""
    return work.describe(settings["height"], settings["width"], base_px=cfgs.unet.sample_size * 8,
                         window=cfgs.unet.sample_size, steps=len(settings["timesteps"] or ()) or settings["steps"],
                         stride=settings["stride"], view_batch=view_batch or settings["view_batch"] or 16,
                         halves=halves(settings["guidance"]), strength=settings["strength"],
                         first_scale=max(first, 2 if settings["image"] else 1))


def plan_memory(settings: dict, cfgs: Configs, dtype, device_type: str, resident: Iterable[str], *,
                may_offload: bool, controlnets: tuple = (), vae_dtype=None) -> memory.MemoryPlan:
    """The view batch, decode tile and networks kept on the device within the request's memory budget, or a
    SettingError naming the least memory that would do."""
    tiles = ((None,) if not settings["tiled_decode"] else ()) + memory.DECODE_TILES
    try:
        return memory.plan(settings["max_memory"], cfgs, settings["height"], settings["width"], dtype, device_type,
                           settings["stride"], tuple(resident), may_offload=may_offload, decode_tiles=tiles,
                           controlnets=controlnets, vae_dtype=vae_dtype)
    except ValueError as e:
        why = str(e)
        raise SettingError("max_memory", lambda w: f"{w('max_memory')}: {why}; raise it or choose a smaller "
                           f"{w('height')}/{w('width')}") from None


def recorded(settings: dict[str, Any]) -> dict[str, Any]:
    """A resolved request as its images record it: pictures by their paths (None where one was given as pixels),
    the ControlNet's settings only with a ControlNet; the Canny choice is recorded by the front end that made the
    edges."""
    out = {k: v for k, v in settings.items() if k != "canny"}
    if settings["control_image"] is None:
        for name in ("control_image", *CONTROL):
            out.pop(name, None)
    for name in PICTURES:
        if name in out:
            out[name] = _path_or_none(out[name])
    return out


def _path_or_none(value):
    if isinstance(value, list):
        return [_path_or_none(v) for v in value]
    return value if isinstance(value, str) else None


def device_memory(device) -> int | None:
    """What the device holds (bytes): a GPU's memory, a CPU machine's RAM; None where torch cannot tell."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu" and hasattr(os, "sysconf"):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


def check_fits(settings: dict, cfgs: Configs, device, dtype, resident: Iterable[str], **extra) -> None:
    """SettingError for a size the device cannot hold even with one view per UNet call and the smallest decode
    tile (where out-of-memory recovery stops), saying what it would cost. extra: the ControlNets and the VAE's
    dtype, as memory.estimate counts them."""
    have = device_memory(device)
    if have is None:
        return
    h, w = settings["height"], settings["width"]
    est = memory.estimate(cfgs, h, w, settings["steps"], view_batch_size=1, dtype=dtype,
                          decode_tile=memory.DECODE_TILES[-1], stride=settings["stride"], resident=tuple(resident),
                          guidance_scale=settings["guidance"], strength=settings["strength"], **extra)
    need = max(memory.needs(est["scales"], device.type))
    if need > have:
        raise SettingError(("height", "width"), lambda word: f"{w}x{h} needs about {need / 2**30:.1f} GiB even with "
                           f"{word('view_batch')} 1, but {device} has {have / 2**30:.1f} GiB; it would also take "
                           f"{est['unet_evals']} UNet evaluations ({est['flops'] / 1e15:.1f} PFLOP). Choose a "
                           "smaller size")
