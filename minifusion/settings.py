"""Every setting of minifusion once: its names, default, type and range, and help.

A row names a setting four ways: `name`, the command line's (`--name`, "_" written "-") and the key under which a
PNG's JSON records it; `api`, the keyword of `Pipeline.generate` or `minifusion.load` (diffusers' name where
diffusers has one); `a1111`, the key of Automatic1111's `parameters` text; `label`, the web UI's field. The
command line's parser, the web UI's widgets, generate()'s signature, the PNG reader and the README's flag table
are made from (or tested against) these rows, and a value is checked against its row in `check`: a front end adds
wording, never a second copy of a default or a rule. Rules that need the model, the picture or several settings
at once live in minifusion.request.

This module imports no torch, so `minifusion --help` and `--version` answer at once.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable

VERSION = "0.2.0"
SEED_MAX = 2 ** 64 - 1  # torch.Generator's seeds
RANDOM_SEEDS = 2 ** 32  # a drawn seed is below this: short to type, like Automatic1111's
MAX_VIEW_BATCH = 1 << 16  # far above any step's view count (4096^2 has 65), so never the real limit
GiB = 1 << 30

GENERATE, LOAD, RUN = "generate", "load", "run"  # what a setting belongs to: a request, the model, the command


@dataclass(frozen=True)
class Setting:
    name: str  # the command line's (--name) and the PNG JSON's key
    api: str | None  # generate()'s keyword (load()'s where part is LOAD); None: the command line's own
    help: str  # one line, for --help, the README and the page's tooltips; {name} words another setting
    default: Any = None  # None: none, or worked out per request (the help says how)
    kind: type = str  # int, float, bool or str (paths are str)
    low: float | None = None  # the range of a number: low <= v <= high (low < v where above_low)
    high: float | None = None
    above_low: bool = False
    choices: tuple[str, ...] = ()
    a1111: str | None = None  # Automatic1111's key, or DemoFusion's own in the same text
    label: str | None = None  # the web UI's field; None: not a field of the page
    many: bool = False  # repeatable on the command line, a list in the API
    part: str = GENERATE
    flag: str | None = None  # the command line's flag where it is not --name (e.g. --no-jitter)
    metavar: str | None = None
    rule: str | None = None  # what a value must be, where the range alone says it badly
    resolved: bool = False  # worked out per request (minifusion.request), `default` where nothing else decides
    older: str | None = None  # its name before (generate()'s keyword, --flag and PNG key), still read
    parse: Callable[[str], Any] | None = None  # the value from what a user types (the command line, the page)

    @property
    def option(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def described(self, word: Callable[["Setting"], str]) -> str:
        """The help, naming the settings it mentions with word(setting) (a flag, a keyword, a field's label)."""
        return re.sub(r"\{(\w+)\}", lambda m: word(BY_NAME[m.group(1)]), self.help)


# the samplers by ComfyUI's short names -> Automatic1111's ("Sampler: ..." in its PNG text)
SAMPLERS = {"ddim": "DDIM", "euler": "Euler", "euler_a": "Euler a", "dpmpp_2m": "DPM++ 2M",
            "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_3m_sde": "DPM++ 3M SDE", "unipc": "UniPC", "lcm": "LCM",
            "tcd": "TCD"}
# the schedules -> Automatic1111's "Schedule type" (its "DDIM" type is SDXL's leading spacing)
SCHEDULES = {"leading": "DDIM", "trailing": "SGM Uniform", "karras": "Karras", "exponential": "Exponential",
             "ays": "Align Your Steps"}
AUTOMATIC = "Automatic"  # schedule None: Automatic1111's choice for the sampler (minifusion.schedulers)
SAMPLER_ALIASES = {"euler_ancestral": "euler_a", "k_euler_a": "euler_a", "k_euler": "euler", "uni_pc": "unipc",
                   "k_dpmpp_2m": "dpmpp_2m", "k_dpmpp_2m_sde": "dpmpp_2m_sde", "k_dpmpp_3m_sde": "dpmpp_3m_sde"}
SCHEDULE_ALIASES = {"ddim_uniform": "leading", "sgm_uniform": "trailing", "align_your_steps": "ays"}
COMBINED = ("karras", "exponential")  # Automatic1111 before 1.9 named "DPM++ 2M Karras" as one sampler
PREDICTIONS = {"epsilon": "epsilon", "eps": "epsilon", "v_prediction": "v_prediction", "v": "v_prediction"}
PREDICTION_TYPES = ("epsilon", "v_prediction")  # diffusers' names, what generate() takes
TRAIN_STEPS = 1000  # SDXL's timesteps are 0 .. 999


def _key(name: str) -> str:
    return " ".join(name.split()).lower()


def _names(table: dict[str, str], aliases: dict[str, str]) -> dict[str, str]:
    return {**{_key(k): k for k in table}, **{_key(v): k for k, v in table.items()}, **aliases}


def sampler_name(name) -> tuple[str, str | None]:
    """A user's sampler name, case-insensitive (a short name, Automatic1111's, its older combined "DPM++ 2M
    Karras") -> (short name, the schedule a combined name implies, else None); SettingError listing the names."""
    known = _names(SAMPLERS, SAMPLER_ALIASES)
    for s in COMBINED:
        known.update({f"{_key(v)} {_key(SCHEDULES[s])}": (k, s) for k, v in SAMPLERS.items()})
    found = known.get(_key(name)) if isinstance(name, str) else None
    if found is None:
        raise invalid("sampler", name, f"it must be one of {', '.join(SAMPLERS)} (or Automatic1111's "
                      f"{', '.join(SAMPLERS.values())})")
    return found if isinstance(found, tuple) else (found, None)


def schedule_name(name) -> str | None:
    """A user's schedule name -> its short name; None for automatic (None, "automatic"). SettingError otherwise."""
    if name is None or (isinstance(name, str) and _key(name) == _key(AUTOMATIC)):
        return None
    found = _names(SCHEDULES, SCHEDULE_ALIASES).get(_key(name)) if isinstance(name, str) else None
    if found is None:
        raise invalid("schedule", name, f"it must be one of {', '.join(SCHEDULES)} or None for automatic (or "
                      f"Automatic1111's {', '.join(SCHEDULES.values())}, {AUTOMATIC})")
    return found


def parse_timesteps(text: str) -> list[int]:
    """"999,749,499,249" -> [999, 749, 499, 249] (ValueError otherwise; the rule is checked with the others)."""
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise ValueError(f"{text!r} is not a list of whole numbers such as 999,749,499,249") from None


def parse_prediction(text: str) -> str:
    """"v" / "eps" (or diffusers' "v_prediction" / "epsilon") -> diffusers' name."""
    if text.lower() not in PREDICTIONS:
        raise ValueError(f"{text!r} is not a prediction type; use eps or v")
    return PREDICTIONS[text.lower()]


def _range(low, high) -> dict:
    return {"low": low, "high": high}


ROWS = (
    # the request: what generate() is asked
    Setting("prompt", "prompt", "what to draw (Automatic1111's emphasis syntax: (word:1.3), [word], BREAK; any "
            "length)", label="Prompt (Automatic1111's syntax: (word:1.3), [word], BREAK; any length)"),
    Setting("negative", "negative_prompt", "negative prompt (default: none, i.e. zero embeddings as SDXL base)",
            label="Negative prompt"),
    Setting("height", "height", "final height in px, a multiple of 8 (default: twice the base size, or following "
            "the {image}'s aspect)", kind=int, label="Height", rule="a positive multiple of 8"),
    Setting("width", "width", "final width in px, a multiple of 8 (default: twice the base size, or following the "
            "{image}'s aspect)", kind=int, label="Width", rule="a positive multiple of 8"),
    Setting("steps", "num_inference_steps", "denoising steps per scale", 50, int, **_range(1, 1000), a1111="Steps",
            label="Steps per scale"),
    Setting("sampler", "sampler", "the sampler: " + ", ".join(SAMPLERS) + " (or Automatic1111's names, e.g. \"DPM++ "
            "2M\", \"Euler a\", \"DPM++ 2M Karras\"; case does not matter); a resumed run keeps its own", "ddim",
            a1111="Sampler", label="Sampler", resolved=True, older="scheduler"),
    Setting("schedule", "schedule", "the timestep schedule: " + ", ".join(SCHEDULES) + " (or Automatic1111's names, "
            "e.g. \"SGM Uniform\" = trailing, what Lightning/Hyper/Turbo need); default: Automatic1111's automatic "
            "choice (DPM++ 2M: karras, the SDE samplers: exponential, LCM/TCD: trailing, else the model's own)",
            a1111="Schedule type", label="Schedule"),
    Setting("timesteps", "timesteps", "explicit timesteps instead of a schedule, strictly decreasing, 0 to 999 (e.g. "
            "DMD2's 999,749,499,249)", a1111="Timesteps", label="Timesteps (e.g. 999,749,499,249; blank: the "
            "schedule's)", parse=parse_timesteps, kind=object, metavar="T1,T2,..."),
    Setting("eta", "eta", "the stochastic samplers' eta (Euler a, the SDE samplers, TCD; DDIM's is 0): how much fresh "
            "noise a step adds (default: the sampler's own)", kind=float, low=0, high=1, a1111="Eta", label="Eta"),
    Setting("guidance", "guidance_scale", "classifier-free guidance scale", 7.5, float, 0, math.inf,
            a1111="CFG scale", label="Guidance"),
    Setting("seed", "seed", f"random seed, 0 to {SEED_MAX}; the same seed makes the same image (default, and -1: "
            "a random seed, printed and recorded)", kind=int, **_range(-1, SEED_MAX), a1111="Seed",
            label="Seed (-1: random)", rule=f"a whole number from 0 to {SEED_MAX}, or -1 for a random one"),
    Setting("guidance_rescale", "guidance_rescale", "rescale the guided prediction towards the text-conditioned one's "
            "spread (diffusers' guidance_rescale, Automatic1111's CFG Rescale; 0.7 for v-prediction/zero-SNR models)",
            0.0, float, 0, 1, a1111="CFG Rescale φ", label="CFG rescale"),
    Setting("strength", "strength", "denoising strength of every scale after the first and of an {image}: the last "
            "steps x strength of the schedule run (Automatic1111's denoising strength; 0.5 halves the expensive "
            "scales' work)", 1.0, float, 0, 1, above_low=True, a1111="Denoising strength", label="Denoising strength"),
    Setting("prediction", "prediction_type", "what the model predicts: eps or v (default: what the checkpoint says: a "
            "single file's v_pred key, a diffusers folder's scheduler config)", choices=PREDICTION_TYPES,
            parse=parse_prediction, label="Prediction type (blank: the checkpoint's)", metavar="eps|v"),
    Setting("zero_snr", "rescale_betas_zero_snr", "the model was trained with zero terminal SNR (default: what the "
            "checkpoint says: a ztsnr key, a scheduler config)", kind=bool, label="zero terminal SNR"),
    Setting("stride", "stride", "local window stride in latents (default: half the window, 64 for SDXL)", kind=int,
            low=1, a1111="DemoFusion stride", label="Stride (latents)"),
    Setting("view_batch", "view_batch_size", "views per UNet call (default 16, or the most {max_memory} allows, or "
            "what spreads the calls over the ranks); lower it if memory runs out", 16, int,
            **_range(1, MAX_VIEW_BATCH), a1111="DemoFusion view batch", label="View batch (blank: 16, or the most "
            "the budget allows)", resolved=True),
    Setting("c1", "cosine_scale_1", "cosine_scale_1, the skip residual's decay", 3.0, float, 0, math.inf,
            a1111="DemoFusion c1", label="c1 (skip residual)"),
    Setting("c2", "cosine_scale_2", "cosine_scale_2, the dilated sampling's weight decay", 1.0, float, 0, math.inf,
            a1111="DemoFusion c2", label="c2 (dilated sampling)"),
    Setting("c3", "cosine_scale_3", "cosine_scale_3, the Gaussian blur's decay", 1.0, float, 0, math.inf,
            a1111="DemoFusion c3", label="c3 (blur)"),
    Setting("sigma", "sigma", "standard deviation of the Gaussian blur", 0.8, float, 0, math.inf, above_low=True,
            a1111="DemoFusion sigma", label="sigma (blur std)"),
    Setting("jitter", "jitter", "move the local windows at random by up to a quarter of their overlap", True, bool,
            a1111="DemoFusion jitter", label="window jitter", flag="--no-jitter"),
    Setting("tiled_decode", "multi_decoder", "decode each scale in tiles (the same image as in one piece, less "
            "memory)", True, bool, a1111="DemoFusion tiled decode", label="tiled decode", flag="--no-tiled-decode"),
    Setting("image", "image", "upscale this picture: it replaces the base scale (image-to-image); {height}/{width} "
            "then default to at least its size, keeping its aspect", label="Drop a picture: it replaces the base "
            "scale", kind=object, metavar="IMG"),
    Setting("max_memory", "max_memory", "a device memory budget, e.g. 8 (GiB), 12GiB, 500MiB: picks {view_batch} "
            "and the decode tile to stay under it (predicted by minifusion/memory)", a1111="DemoFusion max memory",
            label="Memory budget (e.g. 8GiB; blank: none)", kind=object, metavar="SIZE"),
    Setting("control_image", "control_image", "the condition image of each {controlnet} (edges, depth, pose, ...)",
            kind=object, label="Control image", many=True, metavar="IMG"),
    Setting("control_scale", "controlnet_conditioning_scale", "ControlNet strength, one for all or one per "
            "{controlnet}", 1.0, float, -math.inf, math.inf, label="Control scale", many=True, metavar="S"),
    Setting("control_start", "control_guidance_start", "fraction of each scale's steps before the ControlNet acts",
            0.0, float, 0, 1, label="Start (of each scale's steps)", many=True, metavar="A"),
    Setting("control_end", "control_guidance_end", "fraction of each scale's steps after which the ControlNet "
            "stops", 1.0, float, 0, 1, label="End", many=True, metavar="B"),
    Setting("guess_mode", "guess_mode", "ControlNet on the conditional rows only, residuals scaled from 0.1 to 1 "
            "(diffusers')", False, bool, label="guess mode"),
    Setting("canny", None, "make each condition from its {control_image} with the Canny edge detector (thresholds "
            "100/200, as the official demo)", False, bool, label="Canny edges of the control image"),
    # the model: what load() is given
    Setting("weights", "path", "SDXL .safetensors file or diffusers folder (default: weights/)", part=LOAD),
    Setting("lora", "loras", "a LoRA / LyCORIS file merged into the weights at WEIGHT (1 by default); repeatable",
            many=True, part=LOAD, metavar="PATH[:WEIGHT]", label="LoRAs, a weight each"),
    Setting("vae", "vae", "a VAE file or diffusers VAE folder instead of the checkpoint's (the fp16-fix VAE runs in "
            "float16 on GPUs)", part=LOAD, label="VAE"),
    Setting("embedding", "embeddings", "an SDXL textual-inversion embedding .safetensors; its file name (without "
            ".safetensors) is the word that calls it; repeatable", many=True, part=LOAD, metavar="PATH"),
    Setting("controlnet", "controlnet", "an SDXL ControlNet (file or folder); repeatable, one {control_image} each",
            many=True, part=LOAD, metavar="PATH", label="ControlNet"),
    Setting("device", "device", "cuda, cuda:N, mps or cpu (default: the first available)", part=LOAD),
    Setting("dtype", "dtype", "default: float16 on GPUs; on CPUs bfloat16 where the CPU has it in hardware, else "
            "float32", choices=("float32", "float16", "bfloat16"), part=LOAD),
    # the command line's run
    Setting("out", None, "final image; scales go to NAME.xS.png (default: numbered files in outputs/)", part=RUN),
    Setting("count", None, "images to make, with seeds seed, seed+1, ...", 1, int, 1, 100_000, part=RUN),
    Setting("prompts", None, "a text file of prompts, one a line: one image each (times {count})", part=RUN,
            metavar="FILE"),
    Setting("settings_from", None, "take the prompt and settings (weights, LoRAs, ... too) from a PNG minifusion or "
            "Automatic1111 wrote (flags still override)", part=RUN, metavar="PNG"),
    Setting("resume", None, "continue from a finished scale's .latent.safetensors with its settings (flags still "
            "override; {height}/{width} may go larger at the same aspect)", part=RUN, metavar="LATENTS"),
    Setting("overwrite", None, "replace existing output files", False, bool, part=RUN),
    Setting("force", None, "run even when the size looks too large for the device", False, bool, part=RUN),
    Setting("timeout", None, "under torchrun: how long a rank waits for the others before giving up", 1800.0, float,
            0, math.inf, above_low=True, part=RUN, metavar="SECONDS"),
)
BY_NAME = {s.name: s for s in ROWS}
BY_API = {s.api: s for s in ROWS if s.api is not None}
REQUEST = tuple(s.name for s in ROWS if s.part == GENERATE)  # what a request holds
MODEL = tuple(s.name for s in ROWS if s.part == LOAD and s.name not in ("device", "dtype"))  # what a PNG names
RECORDED = REQUEST + MODEL  # the settings a PNG's JSON and a latents file record


def defaults(names: Iterable[str] = REQUEST) -> dict[str, Any]:
    """Each setting's default (None for one the request works out); none for a repeatable one is an empty list."""
    rows = [BY_NAME[n] for n in names]
    return {s.name: None if s.resolved else [] if s.many and s.default is None else s.default for s in rows}


class SettingError(ValueError):
    """A value a setting cannot take. `names` are the settings it is about (the command line's names);
    `message(word)` words it with word(setting) for each setting's name, so that every front end names them its
    own way (`--steps` on the command line, the field's label on the page); str() names them as generate() does."""

    def __init__(self, names: str | tuple[str, ...], message: Callable[[Callable[[str], str]], str]):
        self.names = (names,) if isinstance(names, str) else tuple(names)
        self.message = message
        super().__init__(message(api_word))

    def worded(self, word: Callable[[Setting], str]) -> str:
        return self.message(lambda name: word(BY_NAME[name]))


def api_word(name: str) -> str:
    setting = BY_NAME[name]
    return setting.api or setting.option


def cli_word(setting: Setting) -> str:
    return setting.option if setting.kind is not bool else "--" + setting.name.replace("_", "-")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def want(setting: Setting) -> str:
    """What a setting's value must be, in words."""
    s = setting
    if s.rule:
        return s.rule
    if s.choices:
        return "one of " + ", ".join(s.choices)
    if s.kind is bool:
        return "True or False"
    if s.kind is int:
        if s.low is None:
            return "an integer"
        if s.high is None:
            return f"an integer of at least {s.low:g}"
        return f"an integer from {s.low:g} to {s.high:g}" if s.high < math.inf else f"an integer >= {s.low:g}"
    if s.kind is float:
        if s.low == -math.inf:
            return "a finite number"
        above = f"> {s.low:g}" if s.above_low else f">= {s.low:g}"
        return f"a finite number {above}" + (f" and <= {s.high:g}" if s.high < math.inf else "")
    return "text"


def _fits(setting: Setting, v) -> bool:
    s = setting
    if s.kind is object:  # a picture or a memory size: minifusion.request reads it
        return True
    if s.choices:
        return v in s.choices
    if s.kind is bool:
        return isinstance(v, bool)
    if s.kind is int:
        low, high = (-math.inf if s.low is None else s.low), (math.inf if s.high is None else s.high)
        return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high
    if s.kind is float:
        if not _number(v):
            return False
        return (v > s.low if s.above_low else v >= s.low) and v <= s.high
    return isinstance(v, str)


def invalid(name: str, value, why: str | None = None) -> SettingError:
    """"<name> <value> is invalid; it must be <what the row allows>" (or `why`)."""
    why = why or f"it must be {want(BY_NAME[name])}"
    return SettingError(name, lambda word: f"{word(name)} {value!r} is invalid; {why}")


def check(name: str, value) -> None:
    """SettingError unless `value` (None: the default) is one that setting takes, by its row alone; each item of
    a repeatable one. Rules across settings or against the model: minifusion.request."""
    setting = BY_NAME[name]
    if value is None:
        return
    for v in value if setting.many and isinstance(value, (list, tuple)) else [value]:
        if not _fits(setting, v):
            raise invalid(name, v)


def current_names(values: dict[str, Any], key: Callable[[Setting], str] = lambda s: s.name) -> dict[str, Any]:
    """`values` with a value given under a setting's older name (scheduler=) moved to key(setting), its name or
    generate()'s keyword; SettingError when both are given."""
    out = dict(values)
    for s in ROWS:
        if s.older is None or s.older not in out:
            continue
        older = out.pop(s.older)
        if older is not None and out.get(key(s)) is not None:
            raise SettingError(s.name, lambda w, s=s: f"{s.older} is the older name of {w(s.name)}: give "
                               f"{w(s.name)} alone")
        if out.get(key(s)) is None:
            out[key(s)] = older
    return out


def parse_size(text: str | int | float, unit: int = 1) -> int:
    """Bytes from 8589934592, "8GiB", "8 GB", "512MiB" or, with unit=GiB, a plain 8 or "8". Binary units
    throughout (GB is read as GiB, as memory is sold). ValueError if it is not a positive size."""
    units = {"": unit, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
             "mib": 1 << 20, "g": GiB, "gb": GiB, "gib": GiB, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        number, suffix = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
        if m is None or m.group(2) not in units:
            raise ValueError(f"{text!r} is not a memory size; write e.g. 8GiB, 12 GB or 512MiB")
        number, suffix = float(m.group(1)), m.group(2)
    size = number * units[suffix]
    if not math.isfinite(size) or size < 1:
        raise ValueError(f"{text!r} is not a memory size; it must be positive, e.g. 8GiB")
    return int(size)
