"""The Pipeline: the four SDXL networks, the tokenizer, prompt encoding and DemoFusion generation."""
from __future__ import annotations

import logging
import math
import resource
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Collection, Iterable, Iterator

import torch
from PIL import Image

from . import distributed, memory, metadata, work
from .checkpoint import Configs, find_checkpoint, inspect_checkpoint, load_components
from .controlnet import make_control
from .controlnet_file import inspect_controlnet, load_controlnet
from .decode import decode_tiled
from .embeddings import Embedding, load_embeddings
from .encode import base_scale_size, encode_tiled, load_image, open_image, sample_latents
from .demofusion import Resume, demofusion, scale_sizes
from .files import SavedScale
from .lora import Applied, infotext, open_loras
from .noise import NoiseSchedule, detect
from .prompt import Chunk, encode_rows, pad_rows, to_chunks
from .schedulers import SCHEDULERS, check_sampling
from .tokenizer import Tokenizer
from .vae_file import inspect_vae, swap_in, vae_dtype_for
from .views import Cond, ViewRunner, is_out_of_memory

log = logging.getLogger("minifusion")
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
MIN_DECODE_TILE = 32
EOS = 49407  # SDXL's encoder 1 pads with end-of-text; encoder 2 pads with 0 ("!")
TEXT_ENCODERS = ("text_encoder_1", "text_encoder_2")
MAX_VIEW_BATCH = 1 << 16  # far above any step's view count (4096^2 has 65), so never the real limit


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
    pipe.sources = {"weights": str(path), "lora": [[str(p), w] for p, w in _weighted(loras)],
                    "vae": None if vae is None else str(vae),
                    "embedding": [str(e) for e in ([embeddings] if isinstance(embeddings, (str, Path)) else embeddings)],
                    "controlnet": [str(c) for c in controlnets]}
    return pipe


def _unknown_arguments(unknown: dict) -> str:
    """A TypeError's message for generate()'s unknown keywords, naming the right one where the command line's
    name (or diffusers') was used."""
    names = {**{cli: api for cli, api in metadata.SETTINGS.items() if cli != api},
             "num_steps": "num_inference_steps", "negative": "negative_prompt", "cfg_scale": "guidance_scale",
             "generator": "seed (an int)", "tile": "multi_decoder", "out": "(none: save result.images yourself)"}
    parts = [f"{k!r}" + (f" (did you mean {names[k]}?)" if k in names else "") for k in unknown]
    return "generate() got unexpected keyword argument(s) " + ", ".join(parts)


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


def check_request(base: int, window: int, height: int, width: int, num_inference_steps: int = 50,
                  guidance_scale: float = 7.5, view_batch_size: int = 16, stride: int = 64,
                  cosine_scale_1: float = 3.0, cosine_scale_2: float = 1.0, cosine_scale_3: float = 1.0,
                  sigma: float = 0.8, scheduler: str = "ddim") -> None:
    """Refuse a bad request before any work, saying what was wrong and what to do.

    base: the model's native image size (px); window: its native latent size.
    """
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{name} {v!r} is invalid; it must be a positive multiple of 8, at least {base // 4}")
        if v % 8:
            raise ValueError(f"{name} {v!r} is not a multiple of 8; pick e.g. {max(8, int(v) // 8 * 8)}")
    if max(height, width) < base:
        raise ValueError(f"size {width}x{height} is below this model's base size: the longer side must be at "
                         f"least {base} px (DemoFusion starts at the base size and goes up)")
    if min(height, width) < base // 4:
        raise ValueError(f"size {width}x{height} is too narrow: the shorter side must be at least {base // 4} px")

    def number(v, low, strict=False):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) \
            and (v > low if strict else v >= low)

    def integer(v, low, high):
        return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high

    checks = [
        ("num_inference_steps", num_inference_steps, integer(num_inference_steps, 1, 1000), "an integer from 1 to 1000"),
        ("guidance_scale", guidance_scale, number(guidance_scale, 0), "a finite number >= 0"),
        ("view_batch_size", view_batch_size, integer(view_batch_size, 1, MAX_VIEW_BATCH),
         f"an integer from 1 to {MAX_VIEW_BATCH}"),
        ("stride", stride, integer(stride, 1, window), f"an integer from 1 to the window size, {window}"),
        ("cosine_scale_1", cosine_scale_1, number(cosine_scale_1, 0), "a finite number >= 0"),
        ("cosine_scale_2", cosine_scale_2, number(cosine_scale_2, 0), "a finite number >= 0"),
        ("cosine_scale_3", cosine_scale_3, number(cosine_scale_3, 0), "a finite number >= 0"),
        ("sigma", sigma, number(sigma, 0, strict=True), "a finite number > 0"),
        ("scheduler", scheduler, scheduler in SCHEDULERS, "one of " + ", ".join(SCHEDULERS)),
    ]
    for name, value, ok, want in checks:
        if not ok:
            raise ValueError(f"{name} {value!r} is invalid; it must be {want}")


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
    def iter_generate(self, prompt: str, negative_prompt: str | None = None, height: int | None = None,
                      width: int | None = None, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                      seed: int | None = 0, view_batch_size: int | None = None, stride: int | None = None,
                      cosine_scale_1: float = 3.0, cosine_scale_2: float = 1.0, cosine_scale_3: float = 1.0,
                      sigma: float = 0.8, multi_decoder: bool = True, jitter: bool = True,
                      latents: torch.Tensor | None = None, noise: list[torch.Tensor] | None = None,
                      sampler: str | None = None, schedule: str | None = None, timesteps: list[int] | None = None,
                      eta: float | None = None, guidance_rescale: float = 0.0, strength: float = 1.0,
                      prediction_type: str | None = None, rescale_betas_zero_snr: bool | None = None,
                      scheduler: str | None = None, callback: Callable[[int, int, int, int], None] | None = None,
                      decode_progress: bool | Callable[[int, int], None] | None = None,
                      resume: SavedScale | None = None, image: Image.Image | str | Path | None = None,
                      max_memory: int | str | None = None, view_parallel: bool = True,
                      control_image=None, controlnet_conditioning_scale: float | list[float] = 1.0,
                      control_guidance_start: float | list[float] = 0.0,
                      control_guidance_end: float | list[float] = 1.0, guess_mode: bool = False,
                      record: dict | None = None, **unknown) -> Iterator["Scale"]:
        """Yield each scale as soon as it is decoded (base scale first). Arguments as `generate`."""
        if unknown:
            raise TypeError(_unknown_arguments(unknown))
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be text, not {type(prompt).__name__}")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise TypeError(f"negative_prompt must be text or None, not {type(negative_prompt).__name__}")
        image_path = str(image) if isinstance(image, (str, Path)) else None
        control_paths = [str(c) if isinstance(c, (str, Path)) else None for c in
                         (control_image if isinstance(control_image, (list, tuple)) else [control_image])]
        if image is not None:
            if resume is not None:
                raise ValueError("pass either image or resume, not both")
            image = open_image(image)
            height, width = base_scale_size(image.width, image.height, self.base_size, height, width).final
        height = self.base_size * 2 if height is None else height
        width = self.base_size * 2 if width is None else width
        stride = self.configs.unet.sample_size // 2 if stride is None else stride  # 64 for SDXL
        if sampler is not None and scheduler is not None and sampler != scheduler:
            raise ValueError(f"sampler {sampler!r} and scheduler {scheduler!r}: scheduler is the older name of "
                             "sampler; pass one")
        sampler = sampler or scheduler
        if resume is not None and sampler is None:  # a resumed run continues with the sampling it started with
            saved = resume.settings
            sampler, eta = saved.get("sampler", saved.get("scheduler")), saved.get("eta") if eta is None else eta
            if schedule is None and timesteps is None:
                schedule, timesteps = saved.get("schedule"), saved.get("timesteps")
        check_request(self.base_size, self.configs.unet.sample_size, height, width, num_inference_steps,
                      guidance_scale, 16 if view_batch_size is None else view_batch_size, stride, cosine_scale_1,
                      cosine_scale_2, cosine_scale_3, sigma)
        choice = check_sampling(sampler or "ddim", schedule, num_inference_steps, timesteps, eta, strength,
                                guidance_rescale, prediction_type, rescale_betas_zero_snr)
        noise_schedule = self.noise_schedule.overridden(prediction_type, rescale_betas_zero_snr)
        sampling = choice.sampling(num_inference_steps, noise_schedule)
        decode_tile, kept = 256 if multi_decoder else None, ("unet", "vae")  # kept: nothing moves unless planned
        if max_memory is not None:
            planned = self.plan_memory(max_memory, height, width, stride, not multi_decoder)
            decode_tile, kept = planned.decode_tile, planned.resident
            vb = planned.view_batch_size
            view_batch_size = vb if view_batch_size is None else min(view_batch_size, vb)
        group = distributed.default_group() if view_parallel else None
        if group is not None and (view_batch_size is None or max_memory is not None):
            # none asked for: spread the calls over the ranks (a single process given the recorded view batch
            # makes the same image)
            view_batch_size = distributed.view_batch(
                work.describe(height, width, base_px=self.base_size, window=self.configs.unet.sample_size,
                              steps=sampling.steps, stride=stride, strength=choice.strength), distributed.world(group),
                view_batch_size or 16)
        view_batch_size = 16 if view_batch_size is None else view_batch_size
        settings = {"prompt": prompt, "negative": negative_prompt, "height": height, "width": width,
                    "steps": num_inference_steps, "guidance": guidance_scale, "seed": seed,
                    # "scheduler" is the sampler's older name, which metadata's A1111 text still reads
                    "scheduler": choice.sampler, "sampler": choice.sampler,
                    "schedule": choice.schedule_for(noise_schedule),
                    "timesteps": None if choice.timesteps is None else list(choice.timesteps), "eta": sampling.eta,
                    "guidance_rescale": guidance_rescale, "strength": choice.strength,
                    "prediction": noise_schedule.prediction_type, "zero_snr": noise_schedule.rescale_betas_zero_snr,
                    "stride": stride, "view_batch": view_batch_size, "c1": cosine_scale_1, "c2": cosine_scale_2,
                    "c3": cosine_scale_3, "sigma": sigma, "tiled_decode": multi_decoder, "jitter": jitter,
                    "image": image_path, "max_memory": max_memory, **self.sources}
        if control_image is not None:
            settings.update({"control_image": control_paths, "control_scale": controlnet_conditioning_scale,
                             "control_start": control_guidance_start, "control_end": control_guidance_end,
                             "guess_mode": guess_mode})
        settings.update(record or {})
        scales = len(scale_sizes(height, width, self.base_size))
        control = None if control_image is None else make_control(
            self.controlnets, control_image, controlnet_conditioning_scale, control_guidance_start,
            control_guidance_end, guess_mode, height=height, width=width, base_px=self.base_size,
            steps=sampling.steps)
        try:
            self._place(None, kept)
            runner = distributed.view_runner(group) if group is not None else ViewRunner
            share = distributed.TileShare(group, self.device) if group is not None else None
            if group is None:
                context, pooled = self.encode_prompt(prompt, negative_prompt)
            else:  # encoded once, on rank 0: the other ranks need not hold the text encoders
                context, pooled = distributed.broadcast_tensors(
                    self.encode_prompt(prompt, negative_prompt) if distributed.rank(group) == 0 else None,
                    [self.dtype, self.dtype], group, self.device)
                # the files are hashed by rank 0 alone, not read again by every rank
                self._model_info = distributed.broadcast_object(
                    self.model_info() if distributed.rank(group) == 0 else None, group)
            generator = torch.Generator().manual_seed(seed) if seed is not None else None
            start_from = None
            if image is not None:
                # image-to-image: the picture, encoded at phase 1's size, replaces phase 1
                self._place("vae", kept)
                z = self.encode_image(image, height, width, generator, tile=decode_tile if max_memory else None,
                                      share=share)
                start_from = Resume(1, z, z.mean().item(), z.std().item())
                image = self.decode(z, tiled=decode_tile is not None, tile=decode_tile, progress=decode_progress,
                                    share=share)
                image.info.update(metadata.info(settings, image.size, 1, scales, self.model_info()))
                yield Scale(1, image, z, {"scale": 1, "latent_size": tuple(z.shape[-2:]), "encoded_from_image": True},
                            (start_from.anchor_mean, start_from.anchor_std),
                            generator.get_state() if generator is not None else None, settings)
            if resume is not None:
                start_from = Resume(resume.scale, resume.latents, resume.anchor_mean, resume.anchor_std)
                if generator is not None and resume.generator_state is not None:
                    generator.set_state(resume.generator_state)
            run = demofusion(self.unet, Cond(context, pooled), height=height, width=width, base_px=self.base_size,
                             window=self.configs.unet.sample_size, steps=num_inference_steps,
                             guidance_scale=guidance_scale, generator=generator, stride=stride,
                             view_batch_size=view_batch_size, cosine_scale_1=cosine_scale_1,
                             cosine_scale_2=cosine_scale_2, cosine_scale_3=cosine_scale_3, sigma=sigma, jitter=jitter,
                             latents=latents, noise=noise, sampler=sampling, strength=choice.strength,
                             guidance_rescale=guidance_rescale, progress=callback, resume=start_from,
                             on_out_of_memory=lambda n: log.warning(
                                 "out of memory: continuing with %d view(s) per UNet call (view_batch_size)", n),
                             runner=runner if control is None else partial(runner, control=control))
            anchor = (start_from.anchor_mean, start_from.anchor_std) if start_from else None
            done = start_from.scale if start_from else 0
            while done < scales:
                _reset_peak(self.device)
                start = time.perf_counter()
                self._place("unet", kept)
                scale = next(run)
                done = scale.scale
                if not torch.isfinite(scale.latents).all():
                    raise NonFiniteError(f"scale {scale.scale}'s latents contain NaN or inf: the UNet overflowed in "
                                         f"{str(self.dtype).replace('torch.', '')}; use bfloat16 or float32")
                if anchor is None:
                    anchor = (scale.latents.mean().item(), scale.latents.std().item())
                denoised = time.perf_counter() - start
                self._place("vae", kept)
                image = self.decode(scale.latents, tiled=decode_tile is not None, tile=decode_tile,
                                    progress=decode_progress, share=share)
                stats = {"scale": scale.scale, "latent_size": scale.stats.latent_size,
                         "seconds": time.perf_counter() - start, "denoise_seconds": denoised,
                         "view_batch_size": view_batch_size, "decode_tile": decode_tile,
                         "unet_evaluations": scale.stats.unet_evals, "unet_calls": scale.stats.unet_calls,
                         "windows": scale.stats.windows,
                         "dilated_views": scale.stats.dilated_views, "peak_memory_bytes": _peak(self.device)}
                state = generator.get_state() if generator is not None else None
                image.info.update(metadata.info(settings, image.size, scale.scale, scales, self.model_info()))
                yield Scale(scale.scale, image, scale.latents, stats, anchor, state, settings)
        finally:
            for name in ("unet", "vae"):  # back where load left them
                self._place(name, ("unet", "vae"))

    def generate(self, prompt: str, **kwargs) -> "Result":
        """DemoFusion text-to-image: one image per scale, from the base size up to (height, width).

        Knobs as the reference DemoFusion pipeline: view_batch_size (views per UNet call, default 16; lower it to
        save memory), stride (local window stride in latents; default half the window, 64 for SDXL),
        cosine_scale_1/2/3 (skip residual, fusion and blur decay), sigma (blur std), multi_decoder (tiled
        decode), plus jitter=False, latents (phase-1 noise) and noise (one re-noising tensor per scale >= 2) to
        compare runs number for number. `seed` alone reproduces a run on the same device.
        callback(scale, step, steps, unet_evaluations) after each step.
        image: a picture (PIL image or path) that replaces phase 1 (image-to-image upscaling); height and
        width then default to 2 x base on its longer side and follow its aspect ratio.
        max_memory: a budget for the compute device (bytes, or text such as "8GiB"): view_batch_size (at most
        the one given) and the decode tile are the largest the memory model (minifusion.memory) predicts to fit,
        the decode tiled even with multi_decoder=False when one piece would not fit. If nothing fits with the
        UNet and the VAE both resident, each waits on the host while the other runs (the UNet's weights cross
        to the host and back once per scale). ValueError, naming the least memory that would do, when nothing
        fits at all. A prediction: out-of-memory recovery still stands behind it.
        control_image: steer with the ControlNets of `load(controlnet=...)`, one condition image each (PIL image,
        path, or float tensor (1, 3, H, W) in [0, 1]; a list for several), resized to phase 1's size and cut for
        every view as the official DemoFusion ControlNet pipeline does (minifusion.controlnet);
        controlnet_conditioning_scale (strength), control_guidance_start / control_guidance_end (the fraction of
        each scale's steps it acts in) and guess_mode as diffusers' ControlNet pipelines take them, a list giving
        one value per ControlNet. Without control_image the ControlNets stay idle.
        view_parallel: when a torch.distributed default group of more than one rank is initialised, every rank
        calls generate with the same arguments, shares the work of each step and of the decode (exact: the same
        result as one process; minifusion.distributed) and gets the same Result; False runs this process alone.
        sampler: "ddim" (default, the paper's), "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde",
        "unipc", "lcm" or "tcd", or Automatic1111's names ("DPM++ 2M Karras"); scheduler is its older name.
        schedule: "leading", "trailing", "karras", "exponential", "ays", or None for Automatic1111's automatic
        choice (minifusion.schedulers); timesteps: explicit integer timesteps instead (DMD2: [999, 749, 499, 249]);
        eta: the stochastic samplers' eta (None: the sampler's default). Every sampler sees DemoFusion as one
        denoiser of the whole canvas (minifusion.demofusion). guidance_rescale: diffusers' (Automatic1111's CFG
        Rescale), per view. guidance_scale <= 1 runs the text-conditioned half only, half the UNet evaluations.
        strength: scales >= 2 (and an `image`'s) re-noise to the point that leaves the last
        steps x strength steps and run those (diffusers' img2img rule); 1 is the paper's.
        prediction_type ("epsilon" / "v_prediction") and rescale_betas_zero_snr override what the checkpoint says
        (`pipe.noise_schedule`, minifusion.noise). resume: continues with the sampler it started with unless one
        is given.
        record: more settings to record in the images' metadata (the command line's own).
        Keywords take generate()'s names; the command line's (steps, negative, ...) get a TypeError naming them.
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
        tiles = ((None,) if untiled_decode else ()) + memory.DECODE_TILES
        return memory.plan(memory.parse_size(max_memory), self.configs, height, width, self.dtype, self.device.type,
                           stride, self.resident, may_offload=self.host != self.device, decode_tiles=tiles,
                           controlnets=tuple(net.control for net in self.controlnets), vae_dtype=self.vae_dtype)

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
                     share: distributed.TileShare | None = None) -> torch.Tensor:
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
               share: distributed.TileShare | None = None) -> Image.Image:
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
