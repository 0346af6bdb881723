"""The Pipeline: the four SDXL networks, the tokenizer, prompt encoding and DemoFusion generation."""
from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Collection, Iterable, Iterator, NamedTuple

import torch
from PIL import Image

from . import distributed, memory, metadata, request
from .checkpoint import Configs, inspect_checkpoint, load_components
from .controlnet import make_control
from .controlnet_file import inspect_controlnet, load_controlnet
from .decode import TileShare, decode_tiled
from .embeddings import Embedding, load_embeddings
from .encode import base_scale_size, encode_tiled, load_image, open_image, sample_latents
from .demofusion import Resume, demofusion
from .files import SavedScale
from .lora import Applied, infotext, open_loras
from .model_files import find_checkpoint
from .noise import NoiseSchedule, detect
from .prompt import Chunk, encode_rows, pad_rows, to_chunks
from .settings import GENERATE, ROWS, SettingError
from .tokenizer import Tokenizer
from .vae_file import inspect_vae, swap_in, vae_dtype_for
from .views import Cond, ViewRunner, is_out_of_memory

log = logging.getLogger("minifusion")
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
MIN_DECODE_TILE = 32
EOS = 49407  # SDXL's encoder 1 pads with end-of-text; encoder 2 pads with 0 ("!")
TEXT_ENCODERS = ("text_encoder_1", "text_encoder_2")


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """float16 on GPUs; on a CPU bfloat16 where it has bf16 arithmetic in hardware (several times faster than
    fp32 there), else float32 (torch then emulates bf16, several times slower than fp32)."""
    if device.type != "cpu":
        return torch.float16
    return torch.bfloat16 if cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"} else torch.float32


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 "flags", Arm "Features"); empty where there is none."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return set()
    return {f for line in lines if line.startswith(("flags", "Features")) for f in line.split(":", 1)[1].split()}


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}  # the dtype setting's


def resolve_device(name: str | None) -> torch.device:
    """The device a `device` setting names (None: the first available), or SettingError when torch or this machine
    has no such device."""
    if name is None:
        return default_device()
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise SettingError("device", lambda w: f"{w('device')} {name}: not a device name; use cuda, cuda:N, mps or "
                           "cpu") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise SettingError("device", lambda w: f"{w('device')} {name}: {why}; use {w('device')} cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise SettingError("device", lambda w: f"{w('device')} {name}: this machine has {n} CUDA device(s), "
                               f"cuda:0 to cuda:{n - 1}")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise SettingError("device", lambda w: f"{w('device')} {name}: MPS is not available here (it needs Apple "
                               f"silicon and a torch built with MPS); use {w('device')} cpu")
    elif dev.type != "cpu":
        raise SettingError("device", lambda w: f"{w('device')} {name}: minifusion runs on cuda, mps or cpu, not "
                           f"{dev.type}")
    return dev


def load(path: str | Path | None = None, device: str | torch.device | None = None,
         dtype: torch.dtype | None = None, embeddings: str | Path | Iterable[str | Path] = (),
         vae: str | Path | None = None, loras: Iterable[tuple[str | Path, float] | str | Path] = (),
         controlnet: str | Path | Iterable[str | Path] = (), text_encoders: bool = True,
         progress: Callable[[int, int], None] | None = None) -> "Pipeline":
    """Load an SDXL checkpoint: a single .safetensors file or a diffusers-layout folder (default: weights/).
    embeddings: SDXL textual-inversion files (.safetensors); each file's stem becomes a word prompts can use.
    vae: a VAE file or folder in place of the checkpoint's, whose VAE weights are then never read (layouts, and
    how its scaling factor and precision are decided: minifusion.vae_file).
    loras: LoRA / LyCORIS files, each a path or (path, weight) (weight 1 by default), merged into the weights
    as they load, in this order (formats and arithmetic: minifusion.lora); `Pipeline.loras` lists them.
    controlnet: one SDXL ControlNet (file or folder; layouts: minifusion.controlnet_file) or several, kept beside
    the UNet; `generate(control_image=...)` steers with them.
    text_encoders=False: leave both text encoders unread (the ranks of a group other than 0, which are handed the
    encoded prompt); encode_prompt then refuses. progress(bytes read, bytes to read) as the weights load."""
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    own_vae = inspect_vae(vae) if vae is not None else None  # headers only: a bad one fails before the checkpoint
    vae_dtype = vae_dtype_for(dtype, own_vae is not None and own_vae.fp16_safe)
    dtypes = {"unet": dtype, "vae": vae_dtype, "text_encoder_1": dtype, "text_encoder_2": dtype}
    path = path if path is not None else DEFAULT_WEIGHTS
    # every LoRA is checked against the checkpoint's architecture (headers only) before a weight is read
    patch = open_loras(loras, inspect_checkpoint(path)) if loras else None
    controlnets = [controlnet] if isinstance(controlnet, (str, Path)) else list(controlnet)
    # headers only, like the LoRAs: a ControlNet that does not fit the UNet fails before a weight is read
    control_files = [inspect_controlnet(c, inspect_checkpoint(path).unet) for c in controlnets]
    try:
        skip = (("vae",) if own_vae is not None else ()) + (() if text_encoders else TEXT_ENCODERS)
        models, cfgs, header = load_components(path, placement(device), dtypes, skip=skip, patch=patch,
                                               progress=progress)
    finally:
        if patch is not None:
            patch.close()
    if own_vae is not None:
        models["vae"], cfgs = swap_in(own_vae, cfgs, placement(device)["vae"], vae_dtype)
    pipe = Pipeline(models, cfgs, device, dtype, header)
    pipe.noise_schedule = detect(*find_checkpoint(Path(path)))
    pipe.loras = patch.applied if patch is not None else []
    pipe.controlnets = [load_controlnet(f, placement(device)["unet"], dtype) for f in control_files]
    pipe.embeddings = load_embeddings(embeddings, (cfgs.text_encoder_1.width, cfgs.text_encoder_2.width),
                                      pipe.tokenizer.encode)
    # absolute, so that a PNG recording them names the files from anywhere
    pipe.sources = {"weights": request.model_file(path),
                    "lora": [[request.absolute(p), w] for p, w in _weighted(loras)],
                    "vae": request.absolute(vae),
                    "embedding": request.absolute([embeddings] if isinstance(embeddings, (str, Path))
                                                  else list(embeddings)),
                    "controlnet": request.absolute(controlnets)}
    return pipe


def _weighted(loras) -> list[tuple[str | Path, float]]:
    return [(lora, 1.0) if isinstance(lora, (str, Path)) else tuple(lora) for lora in loras]


def placement(device: torch.device) -> dict[str, torch.device]:
    """Where `load` keeps each network. On a GPU the text encoders (1.6 GB in fp16) wait in host memory and
    visit the GPU only to encode; the UNet and the VAE stay."""
    text_device = torch.device("cpu") if device.type == "cuda" else device
    return {"unet": device, "vae": device, "text_encoder_1": text_device, "text_encoder_2": text_device}


def resident(device: torch.device) -> tuple[str, ...]:
    """The networks `load` keeps on the compute device: what the memory model counts as always there."""
    return tuple(c for c, d in placement(device).items() if d == device)


class NonFiniteError(RuntimeError):
    """The model produced NaN or inf: an overflow, typically float16."""


class Pipeline:
    def __init__(self, models: dict[str, torch.nn.Module], cfgs: Configs, device: torch.device,
                 dtype: torch.dtype, metadata: dict[str, str] | None = None):
        self.unet = models["unet"]
        self.vae = models["vae"]
        self.text_encoder_1 = models.get("text_encoder_1")  # None when load(text_encoders=False)
        self.text_encoder_2 = models.get("text_encoder_2")
        self.tokenizer = Tokenizer()
        self.configs = cfgs
        self.device = device
        self.dtype = dtype
        self.metadata = metadata or {}
        self.embeddings: dict[str, Embedding] = {}  # textual inversion, by name (see `load`)
        self.loras: list[Applied] = []  # merged LoRAs: file name, weight, A1111 short hash (lora.infotext)
        self.controlnets: list = []  # ControlNets (models.controlnet), on the UNet's device (see `load`)
        self.sources: dict = {"weights": None}  # what `load` was given, recorded in every image's metadata
        self.noise_schedule = NoiseSchedule()  # what the model predicts, on which alphas (see `load`)
        self.host = torch.device("cpu")  # where idle networks wait when a memory budget needs them off the device
        self._where: dict[str, torch.device] = {}  # where _place moved a network; absent: where load left it
        self._model_info: dict | None = None

    @property
    def base_size(self) -> int:
        """The native image size in pixels (1024 for SDXL): DemoFusion's phase-1 size."""
        return self.configs.unet.sample_size * 8

    @property
    def vae_dtype(self) -> torch.dtype:
        """What the VAE runs in: float32 beside a float16 UNet, unless it is the fp16-fix VAE (vae_file)."""
        return self.vae.post_quant_conv.weight.dtype

    @torch.no_grad()
    def encode_prompt(self, prompts: str | list[str], negative_prompts: str | list[str] | None = None):
        """(context, pooled), negatives first then positives, as classifier-free guidance wants them.

        Prompts are read as Automatic1111 reads them (minifusion.prompt): emphasis such as (word:1.3), BREAK,
        textual-inversion words (`load(embeddings=...)`), and any length, in chunks of 75 tokens. context is both
        encoders' penultimate hidden states side by side, 77 tokens per chunk: (2B, 77k, 768 + 1280), every row
        padded with empty chunks to the longest prompt's k; pooled (2B, 1280) is encoder 2's projected
        end-of-text embedding of each prompt's first chunk. No negative prompt at all means all-zero negative
        embeddings, as SDXL base does (force_zeros_for_empty_prompt); an explicit "" is encoded.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("encode_prompt needs at least one prompt")
        negatives = None
        if negative_prompts is not None:
            negatives = [negative_prompts] * len(prompts) if isinstance(negative_prompts, str) else list(negative_prompts)
            if len(negatives) != len(prompts):
                raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        rows = [to_chunks(p, self.tokenizer, self.embeddings) for p in prompts]
        neg_rows = [to_chunks(p, self.tokenizer, self.embeddings) for p in negatives or []]
        count = max(len(row) for row in rows + neg_rows)
        # positives and negatives encoded apart, as before long prompts: a prompt of one chunk keeps its exact numbers
        context, pooled = self._encode(pad_rows(rows, count))
        if negatives is None:
            neg_context, neg_pooled = torch.zeros_like(context), torch.zeros_like(pooled)
        else:
            neg_context, neg_pooled = self._encode(pad_rows(neg_rows, count))
        return torch.cat([neg_context, context]), torch.cat([neg_pooled, pooled])

    def _encode(self, rows: list[list[Chunk]]):
        if self.text_encoder_1 is None:
            raise RuntimeError("this pipeline was loaded without its text encoders (load(text_encoders=False))")
        home = next(self.text_encoder_1.parameters()).device
        encoders = (self.text_encoder_1.to(self.device), self.text_encoder_2.to(self.device))
        try:
            context, pooled = encode_rows(encoders, rows, self.embeddings, self.device, pad_ids=(EOS, 0))
        finally:
            for encoder in encoders:
                encoder.to(home)
        return context.to(self.dtype), pooled.to(self.dtype)

    @torch.no_grad()
    def iter_generate(self, prompt: str, *, callback: Callable[[int, int, int, int], None] | None = None,
                      decode_progress: bool | Callable[[int, int], None] | None = None,
                      resume: SavedScale | None = None, latents: torch.Tensor | None = None,
                      noise: list[torch.Tensor] | None = None, view_parallel: bool = True, record: dict | None = None,
                      **settings) -> Iterator["Scale"]:
        """Yield each scale as soon as it is decoded (base scale first). Arguments as `generate`."""
        group = distributed.default_group() if view_parallel else None
        req = request.resolve(request.from_api(prompt, settings), self.configs, noise=self.noise_schedule,
                              controlnets=len(self.controlnets), resume=resume, group=group)
        plan = self._plan(req.settings, group)
        recorded = {**request.recorded(req.settings), "view_batch": plan.view_batch, **self.sources, **(record or {})}
        try:
            self._place(None, plan.kept)
            cond = self._condition(req.settings, group)
            generator = torch.Generator().manual_seed(req.settings["seed"])
            if req.picture is not None:
                start = yield from self._from_picture(req, plan, generator, recorded, decode_progress)
            elif resume is not None:
                start = Resume(resume.scale, resume.latents, resume.anchor_mean, resume.anchor_std)
                if resume.generator_state is not None:
                    generator.set_state(resume.generator_state)
            else:
                start = None
            yield from self._scales(req, plan, cond, generator, start, recorded, latents=latents, noise=noise,
                                    callback=callback, decode_progress=decode_progress)
        finally:
            for name in ("unet", "vae"):  # back where load left them
                self._place(name, ("unet", "vae"))

    def _plan(self, settings: dict, group) -> "RunPlan":
        """Views per UNet call, the decode tile and the networks kept on the device: within the memory budget,
        spread over the ranks of `group`."""
        planned, tile, kept = None, 256 if settings["tiled_decode"] else None, ("unet", "vae")
        if settings["max_memory"] is not None:
            planned, tile, kept = self._memory_plan(settings)
        world = distributed.world(group) if group is not None else 1
        return RunPlan(request.view_batch(settings, self.configs, planned, world), tile, kept,
                       distributed.GroupShare(group, self.device) if group is not None else None,
                       settings["max_memory"] is not None)

    def _condition(self, settings: dict, group) -> Cond:
        """The prompt encoded; under a group, on rank 0 alone (the other ranks need not hold the text encoders),
        which also hashes the model's files for the images' metadata once for all."""
        prompt, negative = settings["prompt"], settings["negative"]
        if group is None:
            return Cond(*self.encode_prompt(prompt, negative))
        first = distributed.rank(group) == 0
        context, pooled = distributed.broadcast_tensors(self.encode_prompt(prompt, negative) if first else None,
                                                        [self.dtype, self.dtype], group, self.device)
        self._model_info = distributed.broadcast_object(self.model_info() if first else None, group)
        return Cond(context, pooled)

    def _from_picture(self, req: "request.Request", plan: "RunPlan", generator: torch.Generator, recorded: dict,
                      decode_progress):
        """Image-to-image: the picture encoded at phase 1's size replaces phase 1; yields it as scale 1 and returns
        where the sampler starts."""
        self._place("vae", plan.kept)
        s = req.settings
        z = self.encode_image(req.picture, s["height"], s["width"], generator,
                              tile=plan.decode_tile if plan.budgeted else None, share=plan.share)
        start = Resume(1, z, z.mean().item(), z.std().item())
        image = self.decode(z, tiled=plan.decode_tile is not None, tile=plan.decode_tile, progress=decode_progress,
                            share=plan.share)
        image.info.update(metadata.info(recorded, image.size, 1, len(req.sizes), self.model_info()))
        yield Scale(1, image, z, {"scale": 1, "latent_size": tuple(z.shape[-2:]), "encoded_from_image": True},
                    (start.anchor_mean, start.anchor_std), generator.get_state(), recorded)
        return start

    def _scales(self, req: "request.Request", plan: "RunPlan", cond: Cond, generator: torch.Generator,
                start: Resume | None, recorded: dict, *, latents, noise, callback, decode_progress):
        """DemoFusion's scales, each decoded and yielded as it finishes."""
        s = req.settings
        control = None if s["control_image"] is None else make_control(
            self.controlnets, s["control_image"], s["control_scale"], s["control_start"], s["control_end"],
            s["guess_mode"], height=s["height"], width=s["width"], base_px=self.base_size, steps=req.sampling.steps)
        runner = distributed.view_runner(plan.share.group) if plan.share is not None else ViewRunner
        run = demofusion(self.unet, cond, height=s["height"], width=s["width"], base_px=self.base_size,
                         window=self.configs.unet.sample_size, steps=s["steps"], guidance_scale=s["guidance"],
                         generator=generator, stride=s["stride"], view_batch_size=plan.view_batch,
                         cosine_scale_1=s["c1"], cosine_scale_2=s["c2"], cosine_scale_3=s["c3"], sigma=s["sigma"],
                         jitter=s["jitter"], latents=latents, noise=noise, sampler=req.sampling,
                         strength=s["strength"], guidance_rescale=s["guidance_rescale"], progress=callback,
                         resume=start, on_out_of_memory=lambda n: log.warning(
                             "out of memory: continuing with %d view(s) per UNet call (view_batch_size)", n),
                         runner=runner if control is None else partial(runner, control=control))
        done = start.scale if start else 0
        while done < len(req.sizes):
            _reset_peak(self.device)
            began = time.perf_counter()
            self._place("unet", plan.kept)
            scale = next(run)
            done = scale.scale
            if not torch.isfinite(scale.latents).all():
                raise NonFiniteError(f"scale {scale.scale}'s latents contain NaN or inf: the UNet overflowed in "
                                     f"{str(self.dtype).replace('torch.', '')}; use bfloat16 or float32")
            denoised = time.perf_counter() - began
            self._place("vae", plan.kept)
            image = self.decode(scale.latents, tiled=plan.decode_tile is not None, tile=plan.decode_tile,
                                progress=decode_progress, share=plan.share)
            stats = {"scale": scale.scale, "latent_size": scale.stats.latent_size,
                     "seconds": time.perf_counter() - began, "denoise_seconds": denoised,
                     "view_batch_size": plan.view_batch, "decode_tile": plan.decode_tile,
                     "unet_evaluations": scale.stats.unet_evals, "unet_calls": scale.stats.unet_calls,
                     "windows": scale.stats.windows, "dilated_views": scale.stats.dilated_views,
                     "peak_memory_bytes": _peak(self.device)}
            image.info.update(metadata.info(recorded, image.size, scale.scale, len(req.sizes), self.model_info()))
            anchor = (float(scale.anchor[0]), float(scale.anchor[1]))
            yield Scale(scale.scale, image, scale.latents, stats, anchor, generator.get_state(), recorded)

    def generate(self, prompt: str, **kwargs) -> "Result":
        """DemoFusion text-to-image: one image per scale, from the base size up to (height, width).

        The settings (below, from minifusion.settings: diffusers' names, the reference DemoFusion pipeline's knobs)
        are resolved and checked before any work (minifusion.request): a bad one is a ValueError naming it. `seed`
        reproduces a run on the same device; none (or -1) draws one, recorded in the images' metadata.
        image: a picture (PIL image or path) that replaces phase 1 (image-to-image upscaling); height and width
        then default to 2 x base on its longer side and follow its aspect ratio.
        max_memory: a budget for the compute device (bytes, or text such as "8GiB"): view_batch_size (at most
        the one given) and the decode tile are the largest the memory model (minifusion.memory) predicts to fit,
        the decode tiled even with multi_decoder=False when one piece would not fit. If nothing fits with the
        UNet and the VAE both resident, each waits on the host while the other runs (the UNet's weights cross
        to the host and back once per scale). A prediction: out-of-memory recovery still stands behind it.
        control_image: steer with the ControlNets of `load(controlnet=...)`, one condition image each (PIL image,
        path, or float tensor (1, 3, H, W) in [0, 1]; a list for several), resized to phase 1's size and cut for
        every view as the official DemoFusion ControlNet pipeline does (minifusion.controlnet); the control
        settings as diffusers' ControlNet pipelines take them, a list giving one value per ControlNet. Without
        control_image the ControlNets stay idle.

        Beside the settings: callback(scale, step, steps, unet_evaluations) after each step; decode_progress(done,
        tiles); latents (phase-1 noise) and noise (one re-noising tensor per scale >= 2), with jitter=False, to
        compare runs number for number; resume (a finished scale, minifusion.files.load_latents) to continue;
        view_parallel: when a torch.distributed default group of more than one rank is initialised, every rank
        calls generate with the same arguments, shares the work of each step and of the decode (exact: the same
        result as one process; minifusion.distributed) and gets the same Result; False runs this process alone.
        record: more settings to record in the images' metadata (the command line's own).
        Keywords take generate()'s names; the command line's (steps, negative, ...) get a TypeError naming them.

        Settings:
        """
        result = Result()
        for scale in self.iter_generate(prompt, **kwargs):
            result.images.append(scale.image)
            result.latents.append(scale.latents)
            result.stats.append(scale.stats)
        return result

    def model_info(self) -> dict:
        """Names and Automatic1111's hashes of what `load` was given, for the images' metadata (each file is
        hashed once; see metadata.file_hash)."""
        if self._model_info is None:
            weights, vae = self.sources.get("weights"), self.sources.get("vae")
            info = {"name": Path(weights).stem if weights else None,
                    "hash": metadata.file_hash(weights) if weights and Path(weights).is_file() else None,
                    "vae": Path(vae).name if vae else None,
                    "vae_hash": metadata.file_hash(vae) if vae and Path(vae).is_file() else None,
                    "loras": infotext(self.loras) if self.loras else None,
                    "embeddings": ", ".join(f"{Path(e).stem}: {metadata.file_hash(e, 12)}"
                                            for e in self.sources.get("embedding", ())) or None}
            self._model_info = info
        return self._model_info

    @property
    def resident(self) -> tuple[str, ...]:
        """The networks whose weights stay on the compute device between uses."""
        models = {"unet": self.unet, "vae": self.vae, "text_encoder_1": self.text_encoder_1,
                  "text_encoder_2": self.text_encoder_2}
        return tuple(c for c, m in models.items()
                     if m is not None and next(m.parameters()).device.type == self.device.type)

    def plan_memory(self, max_memory: int | str, height: int, width: int, stride: int | None = None,
                    untiled_decode: bool = False) -> memory.MemoryPlan:
        """View batch, decode tile and the networks kept on the device for a height x width run within
        max_memory (see `generate`). Loaded ControlNets are counted as steering every UNet call."""
        return self._memory_plan({"max_memory": request.budget_bytes(max_memory), "height": height, "width": width,
                                  "stride": stride or self.configs.unet.sample_size // 2,
                                  "tiled_decode": not untiled_decode})

    def _memory_plan(self, settings: dict) -> memory.MemoryPlan:
        return request.plan_memory(settings, self.configs, self.dtype, self.device.type, self.resident,
                                   may_offload=self.host != self.device,
                                   controlnets=tuple(net.control for net in self.controlnets),
                                   vae_dtype=self.vae_dtype)

    def _place(self, running: str | None, kept: Collection[str]) -> None:
        """Before `running` ("unet", "vae", or None while the text encoders run): of the UNet and the VAE, those
        neither running nor kept leave for the host first, then the running one comes to the device."""
        idle = {"unet", "vae"} - {running} - set(kept)
        moves = [(name, self.host) for name in sorted(idle)] + ([(running, self.device)] if running else [])
        for name, where in moves:
            module = getattr(self, name)
            if self._where.get(name, self.device) != where:
                module.to(where)
                for net in self.controlnets if name == "unet" else ():
                    net.to(where)  # a ControlNet runs beside the UNet, in every UNet call
                self._where[name] = where
                if where == self.host and self.device.type == "cuda":
                    torch.cuda.empty_cache()  # its blocks back to the driver, free for other shapes

    @torch.no_grad()
    def encode_image(self, image: Image.Image | str | Path, height: int, width: int,
                     generator: torch.Generator | None = None, tile: int | None = None,
                     share: TileShare | None = None) -> torch.Tensor:
        """The scaled latents of a picture resized to phase 1's size for a height x width run: a sample of
        the VAE's latent distribution (as the reference does), drawn from `generator`. Encoded in one piece,
        or in tiles of `tile` px (the same result, see encode.py); out of memory, in ever smaller tiles.
        share: split the tiles over the ranks of a group (minifusion.distributed)."""
        h, w = base_scale_size(*open_image(image).size, self.base_size, height, width).base
        dtype = self.vae.post_quant_conv.weight.dtype
        x = load_image(image, h, w).to(self.device, dtype)
        mean, logvar = self._fit_in_memory(
            "encode", lambda t: encode_tiled(self.vae, x, tile=t, share=share) if t else self.vae.encode(x),
            tile=tile, alone=share is None)
        z = sample_latents(mean.to(self.device), logvar.to(self.device), generator)
        return (z * self.configs.vae.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tiled: bool = True, tile: int = 256,
               progress: bool | Callable[[int, int], None] | None = None,
               share: TileShare | None = None) -> Image.Image:
        """Latents (scaled, as the sampler returns them) -> PIL image. share: split the tiles over the ranks of a
        group (minifusion.distributed)."""
        z = (latents / self.configs.vae.scaling_factor).to(self.vae.post_quant_conv.weight.dtype)
        x = self._fit_in_memory(
            "decode", lambda t: decode_tiled(self.vae, z, tile=t, progress=progress, share=share) if t
            else self.vae.decode(z), tile=tile if tiled else None, alone=share is None)
        if not torch.isfinite(x).all():
            raise NonFiniteError("the VAE decode produced NaN or inf (a float16 overflow); decode in float32")
        return to_pil(x[0])

    def _fit_in_memory(self, what: str, run: Callable[[int | None], torch.Tensor], tile: int | None,
                       alone: bool = True):
        """run(tile), tile None meaning in one piece; out of memory, retry in tiles of half the size (the
        result is the same, see decode.py) until a tile would be smaller than MIN_DECODE_TILE. Not when the
        tiles are shared by a group (`alone` False): the other ranks wait in a collective of the failed run."""
        while True:
            try:
                return run(tile)
            except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
                if not is_out_of_memory(err) or not alone or (tile is not None and tile // 2 < MIN_DECODE_TILE):
                    raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            tile = 256 if tile is None else tile // 2
            log.warning("out of memory in the VAE %s: working in tiles of %d px", what, tile)


class RunPlan(NamedTuple):
    view_batch: int
    decode_tile: int | None  # None: in one piece
    kept: tuple[str, ...]  # of the UNet and the VAE, those that stay on the device while the other runs
    share: distributed.GroupShare | None  # the group's split of the decode, under view parallelism
    budgeted: bool  # a memory budget chose the decode tile (the encode then tiles too)


@dataclass
class Scale:
    scale: int
    image: Image.Image
    latents: torch.Tensor
    stats: dict
    anchor: tuple[float, float]  # phase 1's latent mean and std, which every later scale is renormalised to
    generator_state: torch.Tensor | None  # the random stream after this scale, to resume from it
    settings: dict  # what the run was asked, under the command line's names (as the image's metadata records)

    def saved(self) -> SavedScale:
        return SavedScale(self.scale, self.latents, *self.anchor, self.generator_state, self.settings, self.stats)


@dataclass
class Result:
    images: list[Image.Image] = field(default_factory=list)  # one per scale, base scale first
    latents: list[torch.Tensor] = field(default_factory=list)  # final latents of each scale, before decoding
    stats: list[dict] = field(default_factory=list)  # per scale: seconds, UNet evaluations, peak memory


def to_pil(x: torch.Tensor) -> Image.Image:
    pixels = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy())


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # process peak RSS so far (Linux: KiB)


def _settings_doc() -> str:
    rows = [r for r in ROWS if r.part == GENERATE and r.api not in (None, "prompt")]
    return "\n".join(f"        {r.api}={r.default!r}: {r.described(lambda o: o.api or o.option)}" for r in rows) + "\n"


Pipeline.generate.__doc__ += _settings_doc()
