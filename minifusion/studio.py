"""The web UI's machinery without the page: what a browser or an API client drives, Gradio-free so that tests
drive it directly. The folders beside the checkpoint and what loads from them (Folders, Adapters), the request
shaping (a page's or API's values -> the CLI's settings, checked as the CLI checks them), the progress and ETA of a
run, and Studio: the loaded model and the output folder, one run at a time, with a cancel switch per session.
"""
import gc
import logging
import os
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from PIL import Image

from . import memory, metadata, request
from .checkpoint import CheckpointError, trim_heap
from .controlnet import canny, phase1_condition_size
from .controlnet_file import inspect_controlnet
from .demofusion import scale_sizes
from .files import SavedScale, latent_path, load_latents, numbered, output_paths, save_latents
from .folders import FOLDERS, Adapters, Folders
from .lora import open_loras
from .pipeline import NonFiniteError, Pipeline, load, resident
from .settings import BY_NAME, REQUEST, Setting, SettingError
from .tiny import TINY
from .tokenizer import Tokenizer
from .uploads import Upload, Uploads
from .vae_file import inspect_vae, vae_dtype_for
from .views import is_out_of_memory

log = logging.getLogger("minifusion")
MAX_LORAS = 8  # weight sliders on the page, one per picked LoRA
MAX_LORA_WEIGHT = 10.0  # what a style is worth at most: far beyond it a merge only overflows
# --max-size on a CPU, or a device whose memory torch cannot tell: four scales of SDXL, hours on a CPU already
FIXED_MAX_SIZE = 4096
UNKNOWN_MEMORY = 1 << 50  # a budget's limit where the device's memory is unknown: a number a reply can still carry


class RequestError(ValueError):
    """A request the page refuses before queueing it, worded for the page; `fields` name the settings to fix (the
    table's names: both "height" and "width" for a size)."""

    def __init__(self, fields: str | tuple[str, ...], message: str):
        super().__init__(message)
        self.fields = (fields,) if isinstance(fields, str) else tuple(fields)


def field_word(setting: Setting) -> str:
    """A setting as the page names it: its field's label, without the hint in brackets."""
    return (setting.label or setting.name).split(" (")[0]


def refused(e: SettingError) -> RequestError:
    return RequestError(e.names, e.worded(field_word))


class Cancelled(Exception):
    """Raised from the step callback once cancel is pressed: the run stops after the step in progress."""


class LoadError(ValueError):
    """A LoRA / VAE / embedding / ControlNet set that failed to load; the set loaded before it is back."""


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


def values_of(given: dict) -> dict:
    """A page's or an API client's values as settings: blank fields (None, "") are unset, so that the table's
    defaults apply; text typed for a number, or for a setting with its own syntax (timesteps, eps/v), is read as
    the command line reads it."""
    out = {}
    for name, v in given.items():
        if isinstance(v, str):
            v = v.strip()
        if v is None or v == "" or name not in BY_NAME:
            continue
        row = BY_NAME[name]
        read = row.parse or (row.kind if row.kind in (int, float) else None)
        if isinstance(v, str) and read is not None:
            try:
                v = read(v)
            except ValueError as e:
                why = e if row.parse else f"{v!r} is not {'a whole number' if row.kind is int else 'a number'}"
                raise RequestError(name, f"{field_word(row)}: {why}") from None
        out[name] = v
    return out


@dataclass(frozen=True)
class Limits:
    """What this server runs for a client, beyond what the CLI checks: the longest side of a run (--max-size),
    LoRAs as many as the page offers and weights no merge overflows at, a memory budget the device can hold."""
    max_size: int  # px
    max_memory: int  # bytes
    max_loras: int = MAX_LORAS
    max_lora_weight: float = MAX_LORA_WEIGHT

    @classmethod
    def of(cls, configs, device: torch.device, dtype: torch.dtype, max_size: int | None = None) -> "Limits":
        """The limits for a model on a device; max_size None: on CUDA the largest square, in whole scales, that
        the memory model predicts fits with one view per UNet call (the CLI's check_fits), elsewhere
        FIXED_MAX_SIZE."""
        if max_size is None:
            max_size = FIXED_MAX_SIZE if device.type != "cuda" else _largest_fit(configs, device, dtype)
        return cls(max_size, request.device_memory(device) or UNKNOWN_MEMORY)

    @property
    def max_pixels(self) -> int:
        """The most pixels a client's picture may have: the largest run's, within Pillow's own limit."""
        return min(self.max_size ** 2, Image.MAX_IMAGE_PIXELS)


def _largest_fit(configs, device: torch.device, dtype: torch.dtype) -> int:
    base, window = configs.unet.sample_size * 8, configs.unet.sample_size
    size = base
    while size < 64 * base:  # 64 scales: far past any device
        try:
            request.check_fits({"height": size + base, "width": size + base, "steps": 1, "stride": window // 2,
                                "guidance": BY_NAME["guidance"].default, "strength": 1.0},
                               configs, device, dtype, resident(device))
        except SettingError:
            break
        size += base
    return size


def check_limits(settings: dict, limits: Limits) -> None:
    """RequestError for what this server runs for no client (Limits), at once, before anything is loaded."""
    check_size(settings["height"], settings["width"], limits)
    loras = settings["lora"] or []
    if len(loras) > limits.max_loras:
        raise RequestError("lora", f"{len(loras)} LoRAs: this server merges at most {limits.max_loras}")
    for path, weight in loras:
        if not abs(weight) <= limits.max_lora_weight:
            raise RequestError("lora", f"{Path(path).name} at {weight:g}: a LoRA's weight must be from "
                               f"-{limits.max_lora_weight:g} to {limits.max_lora_weight:g}")
    budget = settings["max_memory"]
    if budget is not None and budget > limits.max_memory:
        raise RequestError("max_memory", f"a budget of {budget / memory.GiB:.3g} GiB is more than this server's "
                           f"device has ({limits.max_memory / memory.GiB:.1f} GiB); leave it blank for none")


def check_size(height: int, width: int, limits: Limits) -> None:
    if max(height, width) > limits.max_size:
        raise RequestError(("height", "width"), f"{width}x{height} is over this server's limit of {limits.max_size} "
                           "px a side; choose a smaller size")


@dataclass
class RunProgress:
    """What the page shows of a run: a bar per scale, and an ETA for the whole run from the UNet evaluations
    done and left (every view is one native-size UNet evaluation, so they cost about the same)."""
    sizes: list[tuple[int, int]]  # (width, height) px of every scale
    evals: list[int]  # UNet evaluations each scale computes; scales before `first` are not computed
    steps: list[int]  # the steps each scale runs (fewer than asked at a strength below 1)
    first: int = 1
    started: float = field(default_factory=time.perf_counter)
    step_of: dict[int, int] = field(default_factory=dict)
    evals_of: dict[int, int] = field(default_factory=dict)
    seconds_of: dict[int, float | None] = field(default_factory=dict)
    ended: str | None = None  # how a run that stopped early ended ("cancelled"): no ETA is shown after it

    def step(self, ev: Step) -> None:
        self.step_of[ev.scale], self.evals_of[ev.scale] = ev.step, ev.evals

    def finish(self, ev: Finished) -> None:
        self.seconds_of[ev.scale] = ev.seconds
        self.step_of[ev.scale] = self.steps[ev.scale - 1]
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
        if self.ended is not None:
            head = self.ended
        elif len(self.sizes) in self.seconds_of:
            head = f"done in {duration(time.perf_counter() - self.started)}"
        elif self.done == self.total:
            head = "ETA: decoding the last scale"
        else:
            eta = self.eta()
            head = "ETA: after the first step" if eta is None else f"ETA {duration(eta)}"
        rows = [f'<div class="mf-eta">{head} · {self.done} of {self.total} UNet evaluations</div>']
        for s, (w, h) in enumerate(self.sizes, start=1):
            steps = self.steps[s - 1] or 1  # a scale not computed here shows full
            value = self.step_of.get(s, steps if s < self.first else 0)
            if s in self.seconds_of:
                seconds = self.seconds_of[s]
                state = "the input picture" if seconds is None else f"done in {duration(seconds)}"
            elif s < self.first:
                state = "from the run continued"
            elif s in self.step_of:
                state = ("decoding" if value == steps else f"step {value}/{steps}") if self.ended is None else \
                    f"stopped at step {value}/{steps}"
            else:
                state = "waiting"
            rows.append(f'<div class="mf-scale" data-scale="{s}"><span class="mf-name">scale {s} · {w}×{h}</span>'
                        f'<progress max="{steps}" value="{value}"></progress>'
                        f'<span class="mf-state">{state}</span></div>')
        return '<div class="mf-progress">' + "".join(rows) + "</div>"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


def error_line(e: BaseException, settings: dict) -> str:
    """One line for an error a run raised, as the CLI words it."""
    if is_out_of_memory(e):
        return (f"out of memory even with one view per UNet call at {settings['width']}x{settings['height']}; "
                "choose a smaller size or set a memory budget in the advanced settings")
    if isinstance(e, (ValueError, CheckpointError, NonFiniteError, OSError)):  # LatentFileError is a ValueError
        return one_line(e)
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'see the console'}"


def relay(work: Callable[[Callable], None], cancel: threading.Event) -> Iterator:
    """work(put) in a thread of its own, so that every step reaches the page, not only the finished scales:
    yields what it puts as it puts it, then raises what it raised. Leaving early cancels the work without
    waiting for it (Gradio closes an abandoned run from its event loop, which must not block): the work holds
    the device until it has stopped, so the run after it still waits."""
    events: queue.Queue = queue.Queue()
    end = object()

    def target():
        try:
            work(events.put)
            events.put(end)
        except BaseException as e:  # handed to the consumer, which raises it in the request's thread
            events.put(e)

    threading.Thread(target=target, name="minifusion-run", daemon=True).start()
    try:
        while (ev := events.get()) is not end:
            if isinstance(ev, BaseException):
                raise ev
            yield ev
    finally:
        cancel.set()


class Studio:
    """The loaded model and the output folder: runs a request, writing each scale's PNG and latents as the
    CLI does, loading the pipeline again first when the request asks for other LoRAs, VAE, embeddings or
    ControlNet. One run at a time, whether the page or the API asked for it: each run's thread holds the device
    slot from its first file to its last. Each run has its own cancel switch; a page session's is kept here
    (`arm`, `cancel`) until its run is over or the page is closed."""

    def __init__(self, pipe: Pipeline, weights: Path, outputs: Path, uploads: Uploads, limits: Limits | None = None,
                 folders: Folders | None = None, skipped: Iterable[str] = ()):
        self.pipe, self.weights, self.outputs, self.uploads = pipe, weights, outputs, uploads
        self.limits = limits or Limits.of(pipe.configs, pipe.device, pipe.dtype)
        self.folders = folders or Folders.beside(weights)
        # what requests are checked against and loaded with: `pipe` is let go while another set loads
        self.configs, self.device, self.dtype = pipe.configs, pipe.device, pipe.dtype
        self.noise = pipe.noise_schedule
        self.base, self.window = pipe.base_size, pipe.configs.unet.sample_size
        self.is_tiny = pipe.configs == TINY
        self.loaded: Adapters | None = Adapters.of(pipe.sources)  # None: no pipeline (the last loads failed)
        self.embeddings, self.skipped = list(pipe.sources["embedding"]), list(skipped)  # the folder's, for requests
        self.tokenizer = Tokenizer()
        self._slot = threading.Lock()
        self._switches: dict[str, threading.Event] = {}  # page session -> its next or current run's switch

    def rescan(self) -> None:
        """The embeddings folder again (the other folders are read whenever the page lists them); a change
        loads the pipeline again at the next request."""
        self.embeddings, self.skipped = self.folders.embeddings(self.configs, self.tokenizer.encode)

    def settings(self, values: dict) -> dict:
        """The request's settings, or RequestError for what the CLI refuses before it runs, or this server
        (Limits): LoRAs, VAE and ControlNet named as the page lists them (found in their folders) and checked as
        the CLI checks them, pictures only as uploaded (Uploads), a memory budget nothing fits in. Its message
        is for the client (for_clients)."""
        try:
            return self._settings(values)
        except RequestError as e:
            raise RequestError(e.fields, self.for_clients(str(e))) from None

    def for_clients(self, value):
        """A text, or a run's settings, as a client may see it: a path without the server's own folders before
        it (a LoRA by its name in the LoRA folder, an image by its name in the output folder)."""
        if isinstance(value, str):
            for folder in self._folders:
                value = value.replace(folder, "")
            return value
        if isinstance(value, dict):
            return {k: self.for_clients(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.for_clients(v) for v in value]
        return value

    @property
    def _folders(self) -> list[str]:
        """The server's folders a client's text may name, longest first (one may hold another)."""
        folders = [getattr(self.folders, k) for k in FOLDERS] + [self.outputs, self.uploads.folder,
                                                                 Path(os.path.abspath(self.weights)).parent]
        return sorted({str(f) + os.sep for f in folders}, key=len, reverse=True)

    def _settings(self, values: dict) -> dict:
        pictures = {k: _checked(k, self.uploads.open, values[k]) for k in ("image", "control_image") if values.get(k)}
        paths = self._paths(values)
        given = {**values_of({k: v for k, v in values.items() if k in REQUEST}), **pictures}
        if not (given.get("prompt") or "").strip():
            raise RequestError("prompt", "no prompt given: type what to draw")
        try:
            req = request.resolve(given, self.configs, noise=self.noise, controlnets=len(paths["controlnet"]),
                                  paired=True, open_picture=lambda upload: upload)
        except SettingError as e:
            raise refused(e) from None
        settings = {**req.settings, **paths}
        check_limits(settings, self.limits)
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
        for name in ("image", "control_image"):
            if settings[name] is not None:
                _checked(name, self.uploads.check, settings[name])
        if settings["control_image"] is not None and settings["canny"]:
            _checked("canny", canny_of, self.uploads, settings["control_image"], settings["height"], settings["width"],
                     self.base)
        if settings["max_memory"] is not None:
            # as the CLI plans it: with the ControlNets and the VAE asked for, not those loaded now
            try:
                request.plan_memory(settings, self.configs, self.dtype, self.device.type, resident(self.device),
                                    may_offload=self.device.type != "cpu", controlnets=tuple(n.config for n in nets),
                                    vae_dtype=vae_dtype_for(self.dtype, vae_file.fp16_safe) if vae_file else None)
            except SettingError as e:
                raise refused(e) from None
        return settings

    def _paths(self, values: dict) -> dict:
        """A request's LoRAs ((name, weight) pairs), VAE and ControlNet (names; None for none) as the CLI's
        settings: paths in their folders; the embeddings the folder holds."""
        def path(kind, name):
            return _checked(kind, self.folders.path, kind, name)

        loras = [[path("lora", name), float(weight)] for name, weight in values.get("lora") or ()]
        vae, net = values.get("vae"), values.get("controlnet")
        return {"lora": loras, "vae": path("vae", vae) if vae else None,
                "controlnet": [path("controlnet", net)] if net else [], "embedding": list(self.embeddings)}

    def resume(self, latents: str | None, height: int | None, width: int | None) -> tuple[SavedScale, dict]:
        """The run a page continues from its last finished scale (server state: the latents file this server
        wrote) at a larger size, and its settings, resolved as the CLI's --resume resolves them."""
        if not latents:
            raise RequestError(("height", "width"), "nothing to continue yet: generate first, then ask for a larger "
                               "size")
        saved = load_latents(latents)
        values = {k: v for k, v in saved.settings.items() if k in REQUEST and k != "image"}
        values.update(values_of({"height": height, "width": width}))
        try:
            req = request.resolve(values, self.configs, noise=self.noise, controlnets=len(saved.settings["controlnet"]),
                                  paired=True, resume=saved)
        except SettingError as e:
            raise refused(e) from None
        check_size(req.settings["height"], req.settings["width"], self.limits)
        # its own LoRAs, VAE, ... and pictures: the pipeline reloads if need be; its images still name its picture
        settings = {**saved.settings, **req.settings, "image": saved.settings.get("image")}
        return saved, settings

    def arm(self, session: str) -> threading.Event:
        """A fresh cancel switch for the session's next run, made when its request is sent, so that cancel
        also withdraws a request still waiting in the queue."""
        self._switches[session] = threading.Event()
        return self._switches[session]

    def cancel(self, session: str) -> None:
        if session in self._switches:
            self._switches[session].set()

    def switch(self, session: str | None) -> threading.Event:
        return self._switches.get(session) or self.arm(session or secrets.token_hex(8))

    def release(self, session: str, switch: threading.Event) -> None:
        """The session's run is over: its switch goes, unless a newer request has armed another."""
        if self._switches.get(session) is switch:
            del self._switches[session]

    def forget(self, session: str | None) -> None:
        """The page is closed: its run, queued or running, has no one left to show it to."""
        if (switch := self._switches.pop(session, None)) is not None:
            switch.set()

    def progress(self, settings: dict, first: int = 1) -> RunProgress:
        sizes = [(8 * lw, 8 * lh) for lh, lw in scale_sizes(settings["height"], settings["width"], self.base)]
        work = {w.scale: w for w in request.work_of(settings, self.configs, first=first)}
        return RunProgress(sizes, [work[s].unet_evals if s in work else 0 for s in range(1, len(sizes) + 1)],
                           [work[s].steps if s in work else 0 for s in range(1, len(sizes) + 1)], first)

    def run(self, settings: dict, cancel: threading.Event, resume: SavedScale | None = None
            ) -> Iterator[Loading | Step | Finished]:
        """Generate (or continue `resume`) with the CLI's settings (seed None: drawn); the PNGs and latents go
        to the output folder under the CLI's next number, 00001-<seed>.png, ... Setting `cancel` stops the run
        after the step in progress (Cancelled); so does leaving the iteration early."""
        return relay(lambda put: self._run(settings, cancel, resume, put), cancel)

    def _run(self, settings: dict, cancel: threading.Event, resume: SavedScale | None, put: Callable) -> None:
        with self._slot:  # the file numbers too: two runs would pick the same one
            try:
                self._generate(settings, cancel, resume, put)
            finally:
                # glibc keeps what the run's thread freed (below its mmap threshold, which grows to 32 MiB) in that
                # thread's heap; handed back, the server's resident set returns to where it was between runs
                trim_heap(0)

    def _generate(self, settings: dict, cancel: threading.Event, resume: SavedScale | None, put: Callable) -> None:
        if cancel.is_set():  # pressed while the request waited in the queue
            raise Cancelled("cancelled before the run started")
        n_scales = len(scale_sizes(settings["height"], settings["width"], self.base))
        paths = output_paths(numbered(self.outputs, [settings["seed"]])[0], n_scales)
        if resume is None:  # a resumed run's pictures were kept by the run it continues
            for name, role in (("image", "input"), ("control_image", "control")):
                if settings[name] is not None:
                    settings = {**settings, name: str(self._keep_picture(
                        settings[name], paths[-1], role, (settings["width"], settings["height"])))}
        kwargs = request.api_kwargs(settings)
        # recorded as the CLI records them: the control picture by its path (its edges are handed over as pixels)
        record = {k: settings[k] for k in ("control_image", "canny") if settings.get(k) is not None}
        if resume is not None:  # a resumed run has its picture in its latents already; its images still name it
            kwargs["image"], record["image"] = None, settings["image"]
        if settings["control_image"] is not None and settings["canny"]:
            kwargs["control_image"] = canny(settings["control_image"], phase1_condition_size(
                settings["height"], settings["width"], self.base))
        for ev in self.use(Adapters.of(settings)):
            put(ev)

        def on_step(scale, step, steps, evals):  # step 0: the scale begins
            put(Step(scale, step, steps, evals))
            if cancel.is_set():
                raise Cancelled(f"cancelled after step {step}/{steps} of scale {scale}" if step else
                                f"cancelled as scale {scale} began")

        for scale in self.pipe.iter_generate(settings["prompt"], callback=on_step, resume=resume, record=record,
                                             **kwargs):
            path = paths[scale.scale - 1]
            metadata.save_png(scale.image, path)  # the metadata iter_generate put in the image, as the CLI does
            save_latents(latent_path(path), scale.saved())
            put(Finished(scale.scale, path, latent_path(path), scale.image.size, scale.stats.get("seconds"),
                         scale.settings))

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
                raise LoadError(f"{one_line(e)}; loading the set before it again failed too: "
                                f"{one_line(again)}") from again
            raise LoadError(f"{one_line(e)}; loaded {previous.describe()} again") from None

    def _load(self, want: Adapters) -> Pipeline:
        pipe = load(self.weights, device=self.device, dtype=self.dtype, loras=list(want.lora), vae=want.vae,
                    embeddings=list(want.embedding), controlnet=list(want.controlnet))
        pipe.model_info()  # the new files hashed now, as at start, not in the middle of the first scale
        return pipe

    def _keep_picture(self, picture: Upload, out: Path, role: str, fit: tuple[int, int]) -> Path:
        """A dropped-in picture beside the run's images, as the run reads it: NNNNN-<seed>.input.png,
        .control.png, so that their metadata names a file that stays. Re-encoded: a PNG whatever the client
        sent, never the client's bytes under the client's suffix in a folder the app serves."""
        kept = out.with_name(f"{out.stem}.{role}.png")
        with self.uploads.decoded(picture, fit) as pixels:
            pixels.save(kept, compress_level=1)  # a copy to rerun from: written fast rather than small
        return kept.resolve()


def canny_of(uploads: Uploads, picture: Upload, height: int, width: int, base: int) -> Image.Image:
    """The edges a ControlNet gets from a client's control picture: the CLI's --canny at phase 1's size, from
    the picture as a height x width run keeps it."""
    with uploads.decoded(picture, (width, height)) as pixels:
        return canny(pixels, phase1_condition_size(height, width, base))


def _checked(field: str, check: Callable, *args):
    """check(*args), its error as the RequestError of `field`, in one line."""
    try:
        return check(*args)
    except (CheckpointError, ValueError, ImportError) as e:
        raise RequestError(field, one_line(e)) from None


def one_line(e: BaseException) -> str:
    if is_out_of_memory(e):
        return "out of memory"
    return str(e).splitlines()[0] if str(e) else type(e).__name__
