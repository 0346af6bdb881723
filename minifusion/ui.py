"""python -m minifusion.ui [--weights W] [--host 127.0.0.1] [--port 7860] [--outputs outputs/]

A web UI (Gradio, the optional extra minifusion[ui]) to keep open all day. The model loads once, at start.
Requests queue: one generation on the device at a time, the queue position shown. Each scale's image appears
as soon as it is decoded, with a progress bar per scale and an ETA for the whole run; "cancel" stops after the
current step and keeps the finished scales; "continue to a larger size" resumes from the last finished scale
(the CLI's --resume). Everything is written under the output folder: each scale's PNG with the CLI's metadata
(`minifusion --settings-from` reads it) and its latents, numbered as the CLI numbers them (00001-<seed>.png,
00001-<seed>.x1.png, ...), the pictures dropped in for image-to-image and as a control image, and Gradio's own
cache (.gradio/); only the cache of the weights' hashes stays where the CLI keeps it (~/.cache/minifusion).

Beside the checkpoint, in the folders loras/, vae/, embeddings/ and controlnet/ inside the weights folder (or
next to the checkpoint file; --lora-dir, --vae-dir, --embeddings-dir, --controlnet-dir choose others): LoRAs
picked with a weight each, a VAE, a ControlNet with its control image (Canny edges optional, previewed at phase
1's size). Every embedding there loads at start, its file name a word prompts can use. These are load-time
choices: the pipeline is loaded again, in the queue, when a request asks for another set than the loaded one.

The same generation is the API endpoint /generate (the CLI's names; LoRAs, VAE and ControlNet by their names in
those folders):

    from gradio_client import Client, handle_file
    pngs, info = Client("http://127.0.0.1:7860/").predict("a lighthouse", width=2048, height=2048,
                                                          lora=["style.safetensors:0.8"], api_name="/generate")
"""
import argparse
import gc
import html
import ipaddress
import logging
import os
import queue
import secrets
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from . import __main__ as cli
from . import memory, metadata
from .checkpoint import CheckpointError, inspect_checkpoint
from .controlnet import canny, phase1_condition_size
from .controlnet_file import inspect_controlnet
from .demofusion import scale_sizes
from .embeddings import PICKLE_SUFFIXES, load_embedding
from .encode import base_scale_size, open_image
from .files import LatentFileError, SavedScale, latent_path, load_latents, save_latents
from .lora import open_loras, parse_spec
from .pipeline import DEFAULT_WEIGHTS, NonFiniteError, Pipeline, Scale, check_request, default_dtype, load, resident
from .schedulers import SCHEDULERS
from .tiny import TINY
from .tokenizer import Tokenizer
from .vae_file import inspect_vae, vae_dtype_for
from .views import is_out_of_memory

log = logging.getLogger("minifusion")
# the first word of check_request's messages (its argument names) -> the page's setting it is about
MESSAGE_FIELDS = {arg: name for name, arg in metadata.SETTINGS.items() if arg in cli.CHECKED}
SIZE = ("width", "height")
# what loads beside the checkpoint (the CLI's names) -> its folder inside the weights folder
FOLDERS = {"lora": "loras", "vae": "vae", "embedding": "embeddings", "controlnet": "controlnet"}
WHAT = {"lora": "LoRA", "vae": "VAE", "embedding": "embedding", "controlnet": "ControlNet"}
ADAPTERS = tuple(FOLDERS)  # their settings, beside metadata.SETTINGS
MAX_LORAS = 8  # weight sliders on the page, one per picked LoRA
OWN_VAE, NO_CONTROLNET = "the checkpoint's own", "none"  # the dropdowns' first choices
TINY_NOTICE = ("**The tiny random model is loaded: its images are noise**, by construction, not a bug. They show "
               "that the whole pipeline runs, not what SDXL draws; start with `--weights` pointing at SDXL for "
               "pictures.")


class RequestError(ValueError):
    """A request the page refuses before queueing it; `field` names the setting to fix."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class Cancelled(Exception):
    """Raised from the step callback once cancel is pressed: the run stops after the step in progress."""


class LoadError(ValueError):
    """A LoRA / VAE / embedding / ControlNet set that failed to load; the set loaded before it is back."""


@dataclass(frozen=True)
class Folders:
    """Where the page finds what loads beside the checkpoint, one folder per kind (FOLDERS)."""
    lora: Path
    vae: Path
    embedding: Path
    controlnet: Path

    @classmethod
    def beside(cls, weights: Path, **given: Path | None) -> "Folders":
        """weights/loras/, ... inside the weights folder, or next to the checkpoint file; `given` overrides."""
        home = weights.parent if weights.is_file() else weights
        return cls(**{k: Path(os.path.abspath(given.get(k) or home / sub)) for k, sub in FOLDERS.items()})

    def entries(self, kind: str) -> list[str]:
        """What there is to pick, as names relative to the folder. LoRAs and embeddings: the .safetensors files
        anywhere under it (embeddings: pickles too, to say why they are skipped). VAEs and ControlNets: the
        .safetensors files and the folders in it; a folder holding config.json is one network (a diffusers
        checkpoint's own vae/, say), whose weights files are not choices of their own."""
        folder = getattr(self, kind)
        try:
            if kind in ("lora", "embedding"):
                suffixes = (".safetensors", *PICKLE_SUFFIXES) if kind == "embedding" else (".safetensors",)
                found = [p for p in folder.rglob("*") if p.suffix.lower() in suffixes and p.is_file()]
            else:
                one = (folder / "config.json").is_file()
                found = [p for p in folder.iterdir()
                         if p.is_dir() or not one and p.suffix.lower() == ".safetensors" and p.is_file()]
        except OSError:  # no such folder (the usual case), or unreadable: nothing to pick
            return []
        names = [p.relative_to(folder).as_posix() for p in found]
        return sorted((n for n in names if not any(part.startswith(".") for part in n.split("/"))), key=str.lower)

    def path(self, kind: str, name: str | Path) -> str:
        """The absolute path of an entry (a name as `entries` gives it, or a path inside the folder), for
        the PNG's metadata to name a file --settings-from finds; RequestError for anything else, so that the
        page and the API load nothing from outside these folders."""
        folder = getattr(self, kind)
        path = Path(os.path.normpath(folder / name))
        if not path.is_relative_to(folder) or path == folder:
            raise RequestError(kind, f"{name}: not in the {WHAT[kind]} folder {_shown(folder)}; put it there")
        if not path.exists():
            raise RequestError(kind, f"{name}: no such {WHAT[kind]} in {_shown(folder)} (rescan the folders to see "
                               "what is there)")
        return str(path)

    def embeddings(self, cfgs, encode: Callable[[str], list[int]]) -> tuple[list[str], list[str]]:
        """The embeddings that load into a checkpoint of `cfgs` (paths), and a line for each that does not:
        skipped, as Automatic1111 skips them, rather than keeping the app from starting."""
        widths = (cfgs.text_encoder_1.width, cfgs.text_encoder_2.width)
        usable, skipped, words = [], [], {}
        for name in self.entries("embedding"):
            path = self.path("embedding", name)
            try:
                ids = load_embedding(path, widths, encode).ids
            except (CheckpointError, ValueError) as e:
                skipped.append(str(e).splitlines()[0])
                continue
            if ids in words:
                skipped.append(f"{path}: the same word as {words[ids]} (prompts are lowercased); rename one")
                continue
            usable.append(path)
            words[ids] = Path(path).name
        return usable, skipped


@dataclass(frozen=True)
class Adapters:
    """What `load` merges into the weights or keeps beside them, under the CLI's names: a request for another
    set than the loaded one loads the pipeline again."""
    lora: tuple[tuple[str, float], ...] = ()
    vae: str | None = None
    embedding: tuple[str, ...] = ()
    controlnet: tuple[str, ...] = ()

    @classmethod
    def of(cls, settings: dict) -> "Adapters":
        return cls(tuple((str(p), float(w)) for p, w in settings.get("lora") or ()), settings.get("vae"),
                   tuple(settings.get("embedding") or ()), tuple(settings.get("controlnet") or ()))

    def describe(self) -> str:
        parts = [f"LoRA {Path(p).name} at {w:g}" for p, w in self.lora]
        parts += [f"VAE {Path(self.vae).name}"] if self.vae else []
        parts += [f"ControlNet {Path(c).name}" for c in self.controlnet]
        n = len(self.embedding)
        parts += [f"{n} embedding{'s' if n > 1 else ''}"] if n else []
        return ", ".join(parts) or "the checkpoint alone"


@dataclass(frozen=True)
class Step:
    scale: int
    step: int
    steps: int
    evals: int  # UNet evaluations so far in this scale


@dataclass(frozen=True)
class Loading:
    what: str  # Adapters.describe() of the set being loaded


@dataclass(frozen=True)
class Finished:
    scale: int
    png: Path
    latents: Path
    size: tuple[int, int]  # (width, height) px
    seconds: float | None  # None: the scale is the input picture, not computed
    settings: dict  # as its PNG records them


def size_presets(base: int) -> dict[str, tuple[int, int]]:
    """Final sizes (width, height) for a model native at `base` px: squares of 2, 3 and 4 scales, and 2-scale
    landscape and portrait sizes at the usual aspect ratios, the short side rounded down to a multiple of 8."""
    presets = {}
    for s in (2, 3, 4):
        presets[f"{s * base} × {s * base} (1:1, {s} scales)"] = (s * base, s * base)
    for a, b in ((4, 3), (3, 2), (16, 9)):
        long, short = 2 * base, 2 * base * b // a // 8 * 8
        presets[f"{long} × {short} ({a}:{b})"] = (long, short)
        presets[f"{short} × {long} ({b}:{a})"] = (short, long)
    return presets


def settings_from(values: dict, base: int, window: int) -> dict:
    """The CLI's settings (its names, meanings and defaults) from the page's or the API's values: blank
    optional fields take the CLI's defaults, a blank negative prompt means none (zero embeddings), and with a
    picture a missing side follows its aspect. LoRAs, VAE, embeddings and ControlNets as paths (Studio.settings
    finds them in their folders)."""
    names = (*metadata.SETTINGS, *ADAPTERS, *metadata.CLI_SETTINGS)
    settings = {k: cli.DEFAULTS.get(k) for k in names}
    settings.update({k: v for k, v in values.items() if k in names and v is not None and v != ""})
    settings["prompt"] = (values.get("prompt") or "").strip()
    settings["negative"] = values.get("negative") or None
    if settings["image"] is not None and None in (settings["height"], settings["width"]):
        try:  # as the CLI's --image: a missing side follows the picture's aspect
            picture = open_image(settings["image"])
            settings["height"], settings["width"] = base_scale_size(
                picture.width, picture.height, base, settings["height"], settings["width"]).final
        except ValueError as e:  # ImageError included
            raise RequestError("image", str(e)) from None
    settings["height"] = settings["height"] or 2 * base
    settings["width"] = settings["width"] or 2 * base
    settings["stride"] = settings["stride"] or window // 2
    settings["view_batch"] = settings["view_batch"] or None  # 0: the CLI's default (16, or what the budget allows)
    if isinstance(settings["max_memory"], str):
        try:
            settings["max_memory"] = memory.parse_size(settings["max_memory"], unit=memory.GiB)
        except ValueError as e:
            raise RequestError("max_memory", str(e)) from None
    return settings


def check(settings: dict, base: int, window: int) -> None:
    """RequestError, with the CLI's message, for what the CLI refuses: a seed, what check_request refuses, a
    picture that cannot be read or whose aspect the size does not keep, a ControlNet's start after its end."""
    if not settings["prompt"]:
        raise RequestError("prompt", "no prompt given: type what to draw")
    try:
        cli.seed_of(settings)
    except cli.UserError as e:
        raise RequestError("seed", str(e)) from None
    try:
        check_request(base, window, settings["height"], settings["width"], settings["steps"], settings["guidance"],
                      16 if settings["view_batch"] is None else settings["view_batch"], settings["stride"],
                      settings["c1"], settings["c2"], settings["c3"], settings["sigma"], settings["scheduler"])
    except ValueError as e:
        raise request_error(e) from None
    if settings["image"] is not None:
        try:
            picture = open_image(settings["image"])
        except ValueError as e:  # ImageError
            raise RequestError("image", str(e)) from None
        try:
            base_scale_size(picture.width, picture.height, base, settings["height"], settings["width"])
        except ValueError as e:
            raise RequestError("size", str(e)) from None
    if settings["controlnet"]:
        a, b = settings["control_start"], settings["control_end"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b)) or not 0 <= a < b <= 1:
            raise RequestError("control_end", f"the ControlNet acts from {a} to {b} of each scale's steps; it "
                               "needs 0 <= start < end <= 1")


def request_error(e: ValueError) -> RequestError:
    """check_request's message under the setting it names (one about both sides, e.g. "size ...", under the size)."""
    return RequestError(MESSAGE_FIELDS.get(str(e).split(" ", 1)[0], "size"), str(e))


def check_resume(saved: SavedScale, height: int, width: int, base: int) -> None:
    """The CLI's --resume checks: the new size must add scales and keep the aspect of the run it continues."""
    n_scales = max(1, int(max(height, width) / base))
    first = saved.scale + 1
    if first > n_scales:
        raise RequestError("size", f"that run already reached scale {first - 1}; ask for a larger size (scale "
                           f"{first} needs the longer side >= {first * base} px)")
    want = scale_sizes(height, width, base)[first - 2]
    have = tuple(saved.latents.shape[-2:])
    if want != have:
        raise RequestError("size", f"its scale-{first - 1} latents are {have[1]}x{have[0]}, but a {width}x{height} "
                           f"run has {want[1]}x{want[0]} there; keep the aspect ratio of the run you continue")


def scale_evals(cfg, height: int, width: int, stride: int, steps: int) -> list[int]:
    """UNet evaluations of each scale of a run: 2 (classifier-free guidance) x steps x views."""
    return [2 * steps * sum(n for _, _, n in views) for views in memory.unet_views(cfg, height, width, stride)]


@dataclass
class RunProgress:
    """What the page shows of a run: a bar per scale, and an ETA for the whole run from the UNet evaluations
    done and left (every view is one native-size UNet evaluation, so they cost about the same)."""
    sizes: list[tuple[int, int]]  # (width, height) px of every scale
    evals: list[int]  # UNet evaluations each scale computes; scales before `first` are not computed
    steps: int
    first: int = 1
    started: float = field(default_factory=time.perf_counter)
    step_of: dict[int, int] = field(default_factory=dict)
    evals_of: dict[int, int] = field(default_factory=dict)
    seconds_of: dict[int, float | None] = field(default_factory=dict)

    def step(self, ev: Step) -> None:
        self.step_of[ev.scale], self.evals_of[ev.scale] = ev.step, ev.evals

    def finish(self, ev: Finished) -> None:
        self.seconds_of[ev.scale] = ev.seconds
        self.step_of[ev.scale] = self.steps
        self.evals_of[ev.scale] = self.evals[ev.scale - 1]

    @property
    def total(self) -> int:
        return sum(self.evals[self.first - 1:])

    @property
    def done(self) -> int:
        return sum(self.evals_of.get(s, 0) for s in range(self.first, len(self.evals) + 1))

    def eta(self, now: float | None = None) -> float | None:
        """Seconds left at the rate of the evaluations done so far; None before the first step."""
        if self.done == 0:
            return None
        elapsed = (time.perf_counter() if now is None else now) - self.started
        return elapsed * (self.total - self.done) / self.done

    def html(self) -> str:
        if len(self.sizes) in self.seconds_of:
            head = f"done in {_duration(time.perf_counter() - self.started)}"
        elif self.done == self.total:
            head = "ETA: decoding the last scale"
        else:
            eta = self.eta()
            head = "ETA: after the first step" if eta is None else f"ETA {_duration(eta)}"
        rows = [f'<div class="mf-eta">{head} · {self.done} of {self.total} UNet evaluations</div>']
        for s, (w, h) in enumerate(self.sizes, start=1):
            value = self.step_of.get(s, self.steps if s < self.first else 0)
            if s in self.seconds_of:
                seconds = self.seconds_of[s]
                state = "the input picture" if seconds is None else f"done in {_duration(seconds)}"
            elif s < self.first:
                state = "from the run continued"
            elif s in self.step_of:
                state = "decoding" if value == self.steps else f"step {value}/{self.steps}"
            else:
                state = "waiting"
            rows.append(f'<div class="mf-scale" data-scale="{s}"><span class="mf-name">scale {s} · {w}×{h}</span>'
                        f'<progress max="{self.steps}" value="{value}"></progress>'
                        f'<span class="mf-state">{state}</span></div>')
        return '<div class="mf-progress">' + "".join(rows) + "</div>"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


def _shown(folder: Path) -> str:
    """A folder as the user would type it from here: relative when it is under the working folder."""
    relative = os.path.relpath(folder)
    return str(folder) if relative.startswith("..") else relative


def status_html(text: str, kind: str = "info") -> str:
    """The page's one status line: `kind` info, done or error."""
    return f'<div class="mf-status mf-{kind}">{html.escape(text)}</div>'


def error_line(e: BaseException, settings: dict) -> str:
    """One line for an error a run raised, as the CLI words it."""
    if is_out_of_memory(e):
        return (f"out of memory even with one view per UNet call at {settings['width']}x{settings['height']}; "
                "choose a smaller size or set a memory budget in the advanced settings")
    if isinstance(e, (ValueError, CheckpointError, NonFiniteError, OSError)):  # LatentFileError is a ValueError
        return _why(e)
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'see the console'}"


def stream(pipe: Pipeline, prompt: str, kwargs: dict, cancel: threading.Event) -> Iterator[Step | Scale]:
    """iter_generate in a worker thread, so that every step reaches the page, not only the finished scales:
    yields Step after each step and each Scale once decoded; raises what the run raised (Cancelled once `cancel`
    is set). Leaving early cancels the run and waits for it, so the device is free when this returns."""
    events: queue.Queue = queue.Queue()
    end = object()

    def on_step(scale, step, steps, evals):  # step 0: the scale begins
        events.put(Step(scale, step, steps, evals))
        if cancel.is_set():
            raise Cancelled(f"cancelled after step {step}/{steps} of scale {scale}" if step else
                            f"cancelled as scale {scale} began")

    def work():
        try:
            for scale in pipe.iter_generate(prompt, callback=on_step, **kwargs):
                events.put(scale)
            events.put(end)
        except BaseException as e:  # handed to the consumer, which raises it in the request's thread
            events.put(e)

    worker = threading.Thread(target=work, name="minifusion-run", daemon=True)
    worker.start()
    try:
        while (ev := events.get()) is not end:
            if isinstance(ev, BaseException):
                raise ev
            yield ev
    finally:
        cancel.set()
        worker.join()


class Studio:
    """The loaded model and the output folder: runs a request, writing each scale's PNG and latents as the
    CLI does, loading the pipeline again first when the request asks for other LoRAs, VAE, embeddings or
    ControlNet; keeps one cancel switch per browser session."""

    def __init__(self, pipe: Pipeline, weights: Path, outputs: Path, folders: Folders | None = None,
                 skipped: Iterable[str] = ()):
        self.pipe, self.weights, self.outputs = pipe, weights, outputs
        self.folders = folders or Folders.beside(weights)
        # what requests are checked against and loaded with: `pipe` is let go while another set loads
        self.configs, self.device, self.dtype = pipe.configs, pipe.device, pipe.dtype
        self.base, self.window = pipe.base_size, pipe.configs.unet.sample_size
        self.is_tiny = pipe.configs == TINY
        self.loaded: Adapters | None = Adapters.of(pipe.sources)  # None: no pipeline (the last loads failed)
        self.embeddings, self.skipped = list(pipe.sources["embedding"]), list(skipped)  # the folder's, for requests
        self.tokenizer = Tokenizer()
        self._cancels: dict[str, threading.Event] = {}

    def rescan(self) -> None:
        """The embeddings folder again (the other folders are read whenever the page lists them); a change
        loads the pipeline again at the next request."""
        self.embeddings, self.skipped = self.folders.embeddings(self.configs, self.tokenizer.encode)

    def settings(self, values: dict) -> dict:
        """The request's settings, or RequestError for what the CLI refuses before it runs: LoRAs, VAE and
        ControlNet named as the page lists them (found in their folders) and checked as the CLI checks them,
        and a memory budget nothing fits in."""
        settings = settings_from({**values, **self._paths(values)}, self.base, self.window)
        check(settings, self.base, self.window)
        want = Adapters.of(settings)
        vae_file, nets = None, ()
        # a set that loaded is not read again, unless a budget is to be planned with it; another is checked from
        # its headers
        if want != self.loaded or settings["max_memory"] is not None:
            if want.lora and want != self.loaded:
                _checked("lora", lambda: open_loras(want.lora, self.configs).close())
            if want.vae:
                vae_file = _checked("vae", inspect_vae, want.vae)
            nets = tuple(_checked("controlnet", inspect_controlnet, net, self.configs.unet)
                         for net in want.controlnet)
        if settings["control_image"] is not None:
            picture = _checked("control_image", open_image, settings["control_image"])
            if settings["canny"]:
                size = phase1_condition_size(settings["height"], settings["width"], self.base)
                _checked("canny", canny, picture, size)
        if settings["max_memory"] is not None:
            # as the CLI plans it: with the ControlNets and the VAE asked for, not those loaded now
            extra = {"controlnets": tuple(net.config for net in nets),
                     "vae_dtype": vae_dtype_for(self.dtype, vae_file.fp16_safe) if vae_file is not None else None}
            tiles = ((None,) if not settings["tiled_decode"] else ()) + memory.DECODE_TILES
            try:
                memory.plan(settings["max_memory"], self.configs, settings["height"], settings["width"],
                            self.dtype, self.device.type, settings["stride"], resident(self.device),
                            may_offload=self.device.type != "cpu", decode_tiles=tiles, **extra)
            except ValueError as e:
                raise RequestError("max_memory", f"{e}; raise the budget or choose a smaller size") from None
        return settings

    def _paths(self, values: dict) -> dict:
        """A request's LoRAs ((name, weight) pairs), VAE and ControlNet (names; None for none) as the CLI's
        settings: paths in their folders; the embeddings the folder holds. A control image goes with a
        ControlNet."""
        loras = [[self.folders.path("lora", name), float(weight)] for name, weight in values.get("lora") or ()]
        vae, net = values.get("vae"), values.get("controlnet")
        if values.get("control_image") and not net:
            raise RequestError("controlnet", "a control image steers a ControlNet: choose one")
        if net and not values.get("control_image"):
            raise RequestError("control_image", f"the ControlNet {net} needs a control image: drop one here")
        return {"lora": loras, "vae": self.folders.path("vae", vae) if vae else None,
                "controlnet": [self.folders.path("controlnet", net)] if net else [], "embedding": list(self.embeddings)}

    def resume(self, latents: str | None, height: int | None, width: int | None) -> SavedScale:
        if not latents:
            raise RequestError("size", "nothing to continue yet: generate first, then ask for a larger size")
        saved = load_latents(latents)
        height, width = int(height or 0), int(width or 0)
        try:
            check_request(self.base, self.window, height, width, stride=self.window // 2)
        except ValueError as e:
            raise request_error(e) from None
        check_resume(saved, height, width, self.base)
        return saved

    def arm(self, token: str) -> threading.Event:
        """A fresh cancel switch for the session's next run, made when its request is sent, so that cancel
        also withdraws a request still waiting in the queue."""
        self._cancels[token] = threading.Event()
        return self._cancels[token]

    def cancel(self, token: str) -> None:
        if token in self._cancels:
            self._cancels[token].set()

    def switch(self, token: str | None) -> threading.Event:
        return self._cancels.get(token) or self.arm(token or secrets.token_hex(8))

    def progress(self, settings: dict, first: int = 1) -> RunProgress:
        h, w = settings["height"], settings["width"]
        sizes = [(8 * lw, 8 * lh) for lh, lw in scale_sizes(h, w, self.base)]
        evals = scale_evals(self.configs.unet, h, w, settings["stride"], settings["steps"])
        return RunProgress(sizes, evals, settings["steps"], first)

    def run(self, settings: dict, cancel: threading.Event, resume: SavedScale | None = None
            ) -> Iterator[Loading | Step | Finished]:
        """Generate (or continue `resume`) with the CLI's settings (seed None: drawn); the PNGs and latents go
        to the output folder under the CLI's next number, 00001-<seed>.png, ..."""
        settings = {**settings, "seed": cli.seed_of(settings)[0]}
        n_scales = len(scale_sizes(settings["height"], settings["width"], self.base))
        paths = cli.output_paths(cli.numbered(self.outputs, [settings["seed"]])[0], n_scales)
        if resume is None:  # a resumed run's pictures were kept by the run it continues
            for name, role in (("image", "input"), ("control_image", "control")):
                if settings[name] is not None:
                    settings[name] = str(self._keep_picture(Path(settings[name]), paths[-1], role))
        kwargs = {metadata.SETTINGS[k]: v for k, v in settings.items() if k in metadata.SETTINGS and k != "prompt"}
        # recorded as the CLI records them: the control picture by its path (it is handed over as pixels)
        record = {k: settings[k] for k in ("control_image", "canny") if settings.get(k) is not None}
        if resume is not None:  # a resumed run has its picture in its latents already; its images still name it
            kwargs["image"], record["image"] = None, settings["image"]
        if cancel.is_set():  # pressed while the request waited in the queue
            raise Cancelled("cancelled before the run started")
        yield from self.use(Adapters.of(settings))
        try:  # the CLI's condition image: the picture, or its Canny edges at phase 1's size
            cli.control(settings, kwargs, self.configs)
        except cli.UserError as e:
            raise RequestError("control_image", str(e)) from None
        for ev in stream(self.pipe, settings["prompt"], {**kwargs, "resume": resume, "record": record}, cancel):
            if isinstance(ev, Step):
                yield ev
                continue
            path = paths[ev.scale - 1]
            metadata.save_png(ev.image, path)  # the metadata iter_generate put in the image, as the CLI writes it
            save_latents(latent_path(path), ev.saved())
            yield Finished(ev.scale, path, latent_path(path), ev.image.size, ev.stats.get("seconds"), ev.settings)

    def use(self, want: Adapters) -> Iterator[Loading]:
        """Make `pipe` the checkpoint with `want`, loading it when another set is loaded. The loaded pipeline
        is let go first, so that memory holds one model at a time; if `want` fails to load, the set before it
        is loaded again and LoadError says both."""
        if want == self.loaded:
            return
        yield Loading(want.describe())
        previous, self.pipe, self.loaded = self.loaded, None, None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            self.pipe, self.loaded = self._load(want), want
        except Exception as e:
            if previous is None:
                raise
            log.error("loading %s failed", want.describe(), exc_info=e)
            try:
                self.pipe, self.loaded = self._load(previous), previous
            except Exception as again:
                raise LoadError(f"{_why(e)}; loading the set before it again failed too: {_why(again)}") from again
            raise LoadError(f"{_why(e)}; loaded {previous.describe()} again") from None

    def _load(self, want: Adapters) -> Pipeline:
        pipe = load(self.weights, device=self.device, dtype=self.dtype, loras=list(want.lora), vae=want.vae,
                    embeddings=list(want.embedding), controlnet=list(want.controlnet))
        pipe.model_info()  # the new files hashed now, as at start, not in the middle of the first scale
        return pipe

    def _keep_picture(self, picture: Path, out: Path, role: str) -> Path:
        """A dropped-in picture beside the run's images (NNNNN-<seed>.input.png, .control.png), so that their
        metadata names a file that stays."""
        kept = out.with_name(f"{out.stem}.{role}{picture.suffix.lower() or '.png'}")
        shutil.copyfile(picture, kept)
        return kept.resolve()


def _checked(field: str, check: Callable, *args):
    """check(*args), its error as the RequestError of `field`, in one line."""
    try:
        return check(*args)
    except (CheckpointError, ValueError, ImportError) as e:
        raise RequestError(field, _why(e)) from None


def _why(e: BaseException) -> str:
    if is_out_of_memory(e):
        return "out of memory"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def embeddings_html(studio: Studio) -> str:
    """The words the folder's embeddings add to prompts, and the files skipped, in small print."""
    words = ", ".join(f"<code>{html.escape(Path(p).stem)}</code>" for p in studio.embeddings) or "none"
    text = f"Embeddings in {html.escape(_shown(studio.folders.embedding))}/, words for the prompts: {words}"
    text += "".join(f"<br>skipped {html.escape(line)}" for line in studio.skipped)
    return f'<div class="mf-small">{text}</div>'


def build_app(studio: Studio):
    """The page and the /generate endpoint. Gradio is imported here, after main() has pointed its cache into
    the output folder (it reads GRADIO_TEMP_DIR when imported)."""
    import gradio as gr
    from gradio import FileData

    base, folders = studio.base, studio.folders
    presets = size_presets(base)
    default_preset = next(iter(presets))
    with gr.Blocks(title="minifusion", delete_cache=(86400, 86400)) as demo:
        token = gr.State()  # one per page load (set by demo.load below): whose run the cancel button stops
        last = gr.State(None)  # the last finished scale: {"latents", "gallery", "before"}
        picked = gr.State([])  # the LoRAs the weight sliders are showing, in order
        gr.Markdown(f"## minifusion · DemoFusion on SDXL\n{studio.weights.name} on {studio.device} "
                    f"({str(studio.dtype).replace('torch.', '')}), base size {base} px; images go to "
                    f"`{_shown(studio.outputs)}`")
        if studio.is_tiny:
            gr.Markdown(TINY_NOTICE, elem_id="tiny-notice")
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                prompt = gr.Textbox(label="Prompt (Automatic1111's syntax: (word:1.3), [word], BREAK; any length)",
                                    lines=3, elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", lines=2, elem_id="negative",
                                      placeholder="none: zero embeddings, as SDXL base")
                preset = gr.Dropdown(list(presets) + ["custom"], value=default_preset, label="Size",
                                     elem_id="preset")
                with gr.Row():
                    width = gr.Number(presets[default_preset][0], label="Width", precision=0, step=8,
                                      elem_id="width")
                    height = gr.Number(presets[default_preset][1], label="Height", precision=0, step=8,
                                       elem_id="height")
                with gr.Row():
                    steps = gr.Number(50, label="Steps per scale", precision=0, minimum=1, elem_id="steps")
                    guidance = gr.Number(7.5, label="Guidance", step=0.5, elem_id="guidance")
                with gr.Row():
                    seed = gr.Number(0, label="Seed", precision=0, elem_id="seed")
                    random_seed = gr.Checkbox(False, label="random seed", elem_id="random-seed")
                    scheduler = gr.Dropdown(list(SCHEDULERS), value="ddim", label="Scheduler", elem_id="scheduler")
                with gr.Accordion("Image to image: upscale a picture", open=False, elem_id="img2img"):
                    # image_mode None: the file as dropped, which open_image reads as the CLI does (Gradio's
                    # default converts it to RGB first, dropping transparency to black instead of white)
                    image = gr.Image(type="filepath", label="Drop a picture: it replaces the base scale",
                                     sources=["upload", "clipboard"], image_mode=None, elem_id="image")
                with gr.Accordion("Advanced: DemoFusion's knobs", open=False, elem_id="advanced"):
                    with gr.Row():
                        view_batch = gr.Number(0, label="View batch (0: 16, or the most the budget allows)",
                                               precision=0, minimum=0, elem_id="view-batch")
                        stride = gr.Number(studio.window // 2, label="Stride (latents)", precision=0,
                                           elem_id="stride")
                    with gr.Row():
                        c1 = gr.Number(3.0, label="c1 (skip residual)", elem_id="c1")
                        c2 = gr.Number(1.0, label="c2 (dilated sampling)", elem_id="c2")
                        c3 = gr.Number(1.0, label="c3 (blur)", elem_id="c3")
                        sigma = gr.Number(0.8, label="sigma (blur std)", elem_id="sigma")
                    with gr.Row():
                        tiled_decode = gr.Checkbox(True, label="tiled decode", elem_id="tiled-decode")
                        jitter = gr.Checkbox(True, label="window jitter", elem_id="jitter")
                        max_memory = gr.Textbox(label="Memory budget (e.g. 8GiB; blank: none)",
                                                elem_id="max-memory")
                loras, vaes, nets = (folders.entries(k) for k in ("lora", "vae", "controlnet"))
                with gr.Accordion("LoRA, VAE, embeddings", open=bool(loras or vaes), elem_id="models"):
                    lora = gr.Dropdown(loras, value=[], multiselect=True, max_choices=MAX_LORAS,
                                       label="LoRAs, a weight each", info=f"in {_shown(folders.lora)}/; merged into "
                                       "the weights: a change loads the checkpoint again at the next run",
                                       elem_id="lora")
                    with gr.Row():
                        lora_weights = [gr.Slider(-2, 2, value=1.0, step=0.05, visible=False, min_width=200,
                                                  elem_id=f"lora-weight-{i}") for i in range(MAX_LORAS)]
                    vae = gr.Dropdown([OWN_VAE, *vaes], value=OWN_VAE, label="VAE", info=f"in {_shown(folders.vae)}/",
                                      elem_id="vae")
                    with gr.Row(equal_height=True):
                        embeddings = gr.HTML(embeddings_html(studio), elem_id="embeddings")
                        rescan = gr.Button("↻ Rescan the folders", size="sm", scale=0, min_width=170,
                                           elem_id="rescan")
                with gr.Accordion("ControlNet", open=False, elem_id="control"):
                    controlnet = gr.Dropdown([NO_CONTROLNET, *nets], value=NO_CONTROLNET, label="ControlNet",
                                             info=f"in {_shown(folders.controlnet)}/", elem_id="controlnet")
                    with gr.Row():
                        control_image = gr.Image(type="filepath", label="Control image", height=260, image_mode=None,
                                                 sources=["upload", "clipboard"], elem_id="control-image")
                        canny_preview = gr.Image(label="Canny edges", interactive=False, visible=False, height=260,
                                                 format="png", elem_id="canny-preview")
                    with gr.Row():
                        use_canny = gr.Checkbox(False, label="Canny edges of the control image",
                                                info="thresholds 100/200, at phase 1's size: what the ControlNet "
                                                "gets", elem_id="canny")
                        guess_mode = gr.Checkbox(False, label="guess mode", elem_id="guess-mode")
                    control_scale = gr.Slider(0, 2, value=1.0, step=0.05, label="Control scale",
                                              elem_id="control-scale")
                    with gr.Row():
                        control_start = gr.Slider(0, 1, value=0.0, step=0.05, label="Start (of each scale's steps)",
                                                  elem_id="control-start")
                        control_end = gr.Slider(0, 1, value=1.0, step=0.05, label="End", elem_id="control-end")
                with gr.Row():
                    run_button = gr.Button("Generate", variant="primary", elem_id="generate")
                    cancel_button = gr.Button("Cancel", variant="stop", elem_id="cancel")
                continue_button = gr.Button("Continue to a larger size, from the last finished scale",
                                            size="md", elem_id="continue")
            with gr.Column(scale=3, min_width=400):
                status = gr.HTML(status_html("ready"), elem_id="status")
                progress = gr.HTML(elem_id="progress")
                gallery = gr.Gallery(label="Scales, as each is decoded", columns=4, object_fit="contain",
                                     height=300, elem_id="gallery")
                slider = gr.ImageSlider(label="Before / after: the base scale (or your picture) against the last",
                                        type="filepath", elem_id="slider")
                download = gr.File(label="PNG of the last scale, with the settings in its metadata",
                                   elem_id="download")

        fields = {"prompt": prompt, "negative": negative, "width": width, "height": height, "steps": steps,
                  "guidance": guidance, "seed": seed, "random_seed": random_seed, "scheduler": scheduler,
                  "image": image, "view_batch": view_batch, "stride": stride, "c1": c1, "c2": c2, "c3": c3,
                  "sigma": sigma, "tiled_decode": tiled_decode, "jitter": jitter, "max_memory": max_memory,
                  "lora": lora, **{f"lora_weight_{i}": w for i, w in enumerate(lora_weights)}, "vae": vae,
                  "controlnet": controlnet, "control_image": control_image, "canny": use_canny,
                  "control_scale": control_scale, "control_start": control_start, "control_end": control_end,
                  "guess_mode": guess_mode}
        outputs = [status, progress, gallery, slider, download, seed, last]

        def validations(error: RequestError | None, names) -> list:
            """One gr.validate per input, the error on the one it is about ("size": width and height)."""
            def about(name):
                return error is not None and (error.field == name or error.field == "size" and name in SIZE)
            return [gr.validate(not about(n), str(error) if about(n) else "") for n in names]

        def request(values) -> dict:
            """The page's values as the API takes them: the LoRAs (name, weight) in the order picked, no VAE
            for the checkpoint's own, the control image and Canny only with a ControlNet."""
            values = dict(zip(fields, values))
            values["lora"] = [(name, values[f"lora_weight_{i}"]) for i, name in enumerate(values["lora"] or [])]
            values["vae"] = None if values["vae"] == OWN_VAE else values["vae"]
            if values["controlnet"] == NO_CONTROLNET:
                values.update(controlnet=None, control_image=None, canny=False)
            return values

        def validate(token, *values):
            try:
                studio.settings(request(values))
            except RequestError as e:
                return validations(e, ["token", *fields])
            return validations(None, ["token", *fields])

        def show(events: Iterator, progress_of: RunProgress, settings: dict, shown: list, before: str | None):
            """Page updates from a run's events: every step moves its bar, every finished scale joins the
            gallery, the slider and the download; the last line says how it ended."""
            final, loading, loaded = None, None, ""
            running = status_html(f"running: {settings['width']}x{settings['height']}, seed {settings['seed']}")
            yield {status: running, progress: progress_of.html(), gallery: list(shown), seed: settings["seed"]}
            try:
                for ev in events:
                    if isinstance(ev, Loading):
                        loading = (ev.what, time.perf_counter())
                        yield {status: status_html(f"loading: {ev.what}")}
                        continue
                    if loading is not None:  # loaded: the run's clock, which the ETA reads, starts now
                        progress_of.started = time.perf_counter()
                        loaded = f" (after loading {loading[0]} in {_duration(progress_of.started - loading[1])})"
                        loading = None
                        yield {status: running}
                    if isinstance(ev, Step):
                        progress_of.step(ev)
                        yield {progress: progress_of.html()}
                        continue
                    progress_of.finish(ev)
                    shown.append((str(ev.png), f"scale {ev.scale} · {ev.size[0]}×{ev.size[1]}"))
                    before, final = before or str(ev.png), ev
                    kept = {"latents": str(ev.latents), "gallery": list(shown), "before": before}
                    yield {progress: progress_of.html(), gallery: list(shown), slider: (before, str(ev.png)),
                           download: str(ev.png), last: kept}
                line = status_html(f"done: {final.size[0]}x{final.size[1]} in "
                                   f"{_duration(time.perf_counter() - progress_of.started)}{loaded}, saved as "
                                   f"{final.png.name}", "done")
            except Cancelled as e:
                line = status_html(f"{e}; kept {len(shown)} finished scale(s)" if shown else str(e))
            except Exception as e:  # the app keeps serving: one line in the page, the traceback on the console
                log.error("the run failed", exc_info=e)
                line = status_html(f"error: {error_line(e, settings)}", "error")
            yield {status: line, progress: progress_of.html()}

        def page_generate(token, *values):
            values = request(values)
            settings = studio.settings(values)
            if values["random_seed"]:
                settings["seed"] = None
            settings["seed"] = cli.seed_of(settings)[0]  # drawn here, so the page shows it
            before = settings["image"]
            yield from show(studio.run(settings, studio.switch(token)),
                            studio.progress(settings, 1 if before is None else 2), settings, [], before)

        def validate_continue(token, last, width, height):
            try:
                studio.resume((last or {}).get("latents"), height, width)
            except (RequestError, LatentFileError) as e:
                error = e if isinstance(e, RequestError) else RequestError("size", str(e))
                return validations(error, ["token", "last", "width", "height"])
            return validations(None, ["token", "last", "width", "height"])

        def page_continue(token, last, width, height):
            saved = studio.resume(last["latents"], height, width)
            # its own settings, LoRAs, VAE, ... and control image included: the pipeline reloads if need be
            settings = settings_from(saved.settings, base, studio.window)
            settings.update(height=int(height), width=int(width))
            yield from show(studio.run(settings, studio.switch(token), saved),
                            studio.progress(settings, saved.scale + 1), settings, list(last["gallery"]),
                            last["before"])

        def arm(token):
            studio.arm(token)

        def pick_preset(choice):
            if choice not in presets:
                return gr.skip(), gr.skip()
            return presets[choice]

        def size_of_picture(path):
            """A dropped picture sets the size to 2 x base on its longer side, keeping its aspect (the CLI's
            default for --image)."""
            if not path:
                return gr.skip(), gr.skip(), gr.skip()
            try:
                picture = open_image(path)
            except ValueError:
                return gr.skip(), gr.skip(), gr.skip()
            h, w = base_scale_size(picture.width, picture.height, base).final
            return w, h, "custom"

        def pick_loras(names, before, *weights):
            """One weight slider per picked LoRA, in the order picked; a LoRA keeps its weight while others
            come and go."""
            names = names or []
            kept = dict(zip(before, weights))
            return [gr.Slider(visible=True, label=f"{names[i]} weight", value=kept.get(names[i], 1.0))
                    if i < len(names) else gr.Slider(visible=False) for i in range(MAX_LORAS)] + [list(names)]

        def rescan_folders(names, vae_name, net):
            """The folders read again: the dropdowns list what is there now (a choice whose file is gone
            falls back to none), and the embeddings are checked again."""
            studio.rescan()
            loras, vaes, nets = (folders.entries(k) for k in ("lora", "vae", "controlnet"))
            return (gr.Dropdown(choices=loras, value=[n for n in names or [] if n in loras]),
                    gr.Dropdown(choices=[OWN_VAE, *vaes], value=vae_name if vae_name in vaes else OWN_VAE),
                    gr.Dropdown(choices=[NO_CONTROLNET, *nets], value=net if net in nets else NO_CONTROLNET),
                    embeddings_html(studio))

        def preview_canny(path, on, width, height):
            """The edges the ControlNet will see: the CLI's --canny at phase 1's size for the size asked for
            (kept as it is while that size is not a valid one)."""
            if not (path and on):
                return gr.Image(value=None, visible=False)
            try:
                check_request(base, studio.window, int(height), int(width), stride=studio.window // 2)
            except (ValueError, TypeError):
                return gr.skip()
            size = phase1_condition_size(int(height), int(width), base)
            try:
                edges = canny(path, size)
            except (ValueError, ImportError) as e:  # ImageError included
                return gr.Image(value=None, visible=True, label=f"Canny edges: {_why(e)}")
            return gr.Image(value=edges, visible=True, label=f"Canny edges, {size[1]}×{size[0]}")

        lora.change(pick_loras, [lora, picked, *lora_weights], [*lora_weights, picked], queue=False,
                    api_visibility="private")
        rescan.click(rescan_folders, [lora, vae, controlnet], [lora, vae, controlnet, embeddings], queue=False,
                     api_visibility="private")
        gr.on([control_image.change, use_canny.change, width.change, height.change], preview_canny,
              [control_image, use_canny, width, height], canny_preview, queue=False, show_progress="hidden",
              api_visibility="private")
        preset.change(pick_preset, preset, [width, height], queue=False, api_visibility="private")
        gr.on([width.input, height.input], lambda: "custom", None, preset, queue=False, api_visibility="private")
        image.change(size_of_picture, image, [width, height, preset], queue=False, api_visibility="private")
        device = {"concurrency_id": "device", "concurrency_limit": 1}  # one generation on the device at a time
        demo.load(lambda: secrets.token_hex(8), None, token, queue=False, api_visibility="private")
        run_button.click(arm, token, None, queue=False, api_visibility="private").then(
            page_generate, [token, *fields.values()], outputs, validator=validate, show_progress_on=[progress],
            api_visibility="private", **device)
        continue_button.click(arm, token, None, queue=False, api_visibility="private").then(
            page_continue, [token, last, width, height], outputs, validator=validate_continue,
            show_progress_on=[progress], api_visibility="private", **device)
        cancel_button.click(studio.cancel, token, None, queue=False, api_visibility="private")

        def api_generate(prompt: str, negative: str = "", width: int | None = None, height: int | None = None,
                         steps: int = 50, guidance: float = 7.5, seed: int | None = None, scheduler: str = "ddim",
                         view_batch: int | None = None, stride: int | None = None, c1: float = 3.0, c2: float = 1.0,
                         c3: float = 1.0, sigma: float = 0.8, tiled_decode: bool = True, jitter: bool = True,
                         max_memory: str | None = None, image: FileData | None = None,
                         lora: list[str] | None = None, vae: str | None = None, controlnet: str | None = None,
                         control_image: FileData | None = None, canny: bool = False, control_scale: float = 1.0,
                         control_start: float = 0.0, control_end: float = 1.0, guess_mode: bool = False
                         ) -> tuple[list[FileData], dict]:
            """Generate: the PNG of every scale (base scale first, each with the settings in its metadata) and a
            summary (the settings used; per scale its size, seconds and latents file). Arguments as the CLI's
            flags: width/height default to 2 x the base size, seed None or -1 draws one, image upscales a
            picture (gradio_client.handle_file); lora ["NAME:WEIGHT", ...], vae and controlnet by their names
            in the app's folders (as the page lists them), control_image the ControlNet's picture, canny its
            edges."""
            values = dict(locals())
            for name in ("image", "control_image"):
                values[name] = FileData.model_validate(values[name]).path if values[name] is not None else None
            try:
                values["lora"] = [parse_spec(spec) for spec in lora or []]
            except ValueError as e:
                raise gr.Error(str(e), print_exception=False) from None
            try:
                settings = studio.settings(values)
            except RequestError as e:
                raise gr.Error(str(e), print_exception=False) from None
            try:
                done = [ev for ev in studio.run(settings, threading.Event()) if isinstance(ev, Finished)]
            except Exception as e:
                log.error("the run failed", exc_info=e)
                raise gr.Error(error_line(e, settings), print_exception=False) from None
            return ([FileData(path=str(ev.png)) for ev in done],
                    {"settings": done[-1].settings, "scales": [
                        {"scale": ev.scale, "width": ev.size[0], "height": ev.size[1], "seconds": ev.seconds,
                         "latents": str(ev.latents)} for ev in done]})

        gr.api(api_generate, api_name="generate", **device)
    return demo


CSS = """
.mf-status { font-weight: 600; padding: 4px 0; }
.mf-error { color: #c62828; }
.mf-done { color: #2e7d32; }
.mf-progress .mf-eta { margin-bottom: 4px; }
.mf-scale { display: flex; gap: 8px; align-items: center; }
.mf-scale .mf-name { min-width: 11em; }
.mf-scale progress { flex: 1; height: 12px; }
.mf-scale .mf-state { width: 11em; text-align: right; }
.mf-small { font-size: 0.85em; opacity: 0.8; }
"""


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m minifusion.ui", description="minifusion's web UI (Gradio): "
                                 "the model loads once; requests queue, one generation on the device at a time.")
    ap.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS,
                    help="SDXL .safetensors file or diffusers folder (default: weights/)")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0: the network)")
    ap.add_argument("--port", type=int, default=7860, help="default 7860")
    ap.add_argument("--outputs", type=Path, default=Path("outputs"),
                    help="folder for every file the UI writes (default: outputs/)")
    for kind, flags in (("lora", ("--lora-dir", "--loras")), ("vae", ("--vae-dir",)),
                        ("embedding", ("--embeddings-dir",)), ("controlnet", ("--controlnet-dir",))):
        ap.add_argument(*flags, dest=f"{kind}_dir", type=Path, metavar="DIR",
                        help=f"the {WHAT[kind]} files to offer (default: {FOLDERS[kind]}/ inside the weights folder, "
                        "or next to the checkpoint file)" + (", each loaded at start" if kind == "embedding" else ""))
    ap.add_argument("--device", help="cuda, mps or cpu (default: the first available)")
    ap.add_argument("--dtype", choices=list(cli.DTYPES),
                    help="default: float16 on GPUs; on CPUs bfloat16 where the CPU has it in hardware, else float32")
    return ap.parse_args(argv)


def reachable_from_network(host: str) -> bool:
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host != "localhost"


def main(argv=None) -> int:
    args = parse_args(argv)
    outputs = args.outputs.resolve()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    log.addHandler(handler)
    started = time.perf_counter()
    try:
        device = cli.resolve_device(args.device)
        dtype = cli.DTYPES[args.dtype] if args.dtype else default_dtype(device)
        folders = Folders.beside(args.weights, **{k: getattr(args, f"{k}_dir") for k in FOLDERS})
        embeddings, skipped = folders.embeddings(inspect_checkpoint(args.weights), Tokenizer().encode)
        for line in skipped:
            log.warning("embedding skipped: %s", line)
        pipe = load(args.weights, device=device, dtype=dtype, embeddings=embeddings)
        pipe.model_info()  # hashes the weights for the images' metadata now, not before the first image
        outputs.mkdir(parents=True, exist_ok=True)
    except (cli.UserError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: --outputs {args.outputs}: cannot create it ({e.strerror or e})", file=sys.stderr)
        return 2
    # Gradio keeps uploads and copies of the files it serves under GRADIO_TEMP_DIR, read when it is imported
    os.environ["GRADIO_TEMP_DIR"] = str(outputs / ".gradio")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    studio = Studio(pipe, args.weights, outputs, folders, skipped)
    print(f"loaded {args.weights} on {device} ({str(dtype).replace('torch.', '')}) in "
          f"{time.perf_counter() - started:.1f} s" + ("; the tiny random model: its images are noise"
                                                      if studio.is_tiny else ""), file=sys.stderr)
    demo = build_app(studio)
    demo.queue(default_concurrency_limit=1)
    try:
        _, url, _ = demo.launch(server_name=args.host, server_port=args.port, quiet=True, prevent_thread_lock=True,
                                allowed_paths=[str(outputs)], css=CSS, footer_links=["api"])
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port} ({e}); choose another --port", file=sys.stderr)
        return 2
    print(f"minifusion UI on http://{args.host}:{args.port}/ (outputs in {outputs})", file=sys.stderr)
    if reachable_from_network(args.host):
        print(f"--host {args.host}: the UI is reachable from the network; anyone who can reach this machine on "
              f"port {args.port} can generate images and download what is in {outputs}", file=sys.stderr)
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        demo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
