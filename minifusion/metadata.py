"""What an image says about how it was made, in the two forms readers expect.

- `parameters`: Automatic1111's text, which civitai, image browsers and A1111's own PNG Info read: the prompt,
  a `Negative prompt: ...` line, then one line of `Key: value` pairs (`Steps: 50, Sampler: DDIM, CFG scale:
  7.5, Seed: 0, Size: 4096x4096, Model hash: ..., Model: sd_xl_base_1.0, ...`), DemoFusion's knobs as further
  pairs. Values holding a comma, colon or newline are JSON-quoted, as A1111 writes them.
- `minifusion`: JSON with every setting under the command line's names (what `--settings-from` reads back), the
  run's final size in `settings` and the image's own size and scale beside it.

Nothing that changes between two runs of the same settings (timings, memory) goes in: the same seed gives a
byte-identical PNG. Those go into the latents file (minifusion.files).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from PIL import Image, PngImagePlugin

from .files import atomic_write
from .samplers import METHODS
from .settings import BY_NAME, RECORDED, ROWS, SAMPLERS, SCHEDULES, VERSION, sampler_name, schedule_name

KEY = "minifusion"  # the PNG text chunk holding the JSON
PARAMETERS = "parameters"  # A1111's
# key: value, the value JSON-quoted or up to the next comma (A1111's infotext_utils.re_param)
PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
SIZE = re.compile(r"(\d+)x(\d+)")


def quote(value) -> str:
    text = str(value)
    return text if not any(c in text for c in ",:\n") else json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    if text.startswith('"') and text.endswith('"'):
        try:
            return json.loads(text)
        except ValueError:
            pass
    return text


def _number(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def a1111_parameters(settings: dict, size: tuple[int, int], scale: int, scales: int, model: dict) -> str:
    """A1111's `parameters` text for one image of `size` (width, height), scale `scale` of `scales`: the settings
    with an A1111 key (minifusion.settings), in the table's order, the model's after the seed as A1111 writes
    them, the memory budget after the hashes."""
    pairs = {}
    for row in ROWS:
        v = _a1111_value(row.name, settings)
        if row.a1111 is None or row.name == "max_memory":
            continue
        if v is not None:
            pairs[row.a1111] = _number(v)
        if row.name == "seed":
            pairs["Size"] = f"{size[0]}x{size[1]}"
            pairs.update({k: v for k, v in (("Model hash", model.get("hash")), ("Model", model.get("name")),
                                            ("VAE hash", model.get("vae_hash")), ("VAE", model.get("vae")))
                          if v})
    if model.get("loras"):
        pairs["Lora hashes"] = model["loras"]
    if model.get("embeddings"):
        pairs["TI hashes"] = model["embeddings"]
    if settings.get("max_memory"):
        pairs[BY_NAME["max_memory"].a1111] = str(settings["max_memory"])
    pairs["DemoFusion scale"] = f"{scale}/{scales}"
    pairs["DemoFusion final size"] = f"{settings['width']}x{settings['height']}"
    pairs["Version"] = f"minifusion {VERSION}"
    lines = [settings["prompt"]]
    if settings.get("negative"):
        lines.append(f"Negative prompt: {settings['negative']}")
    lines.append(", ".join(f"{k}: {quote(v)}" for k, v in pairs.items()))
    return "\n".join(lines)


def _a1111_value(name: str, settings: dict):
    """A setting as A1111's text shows it, None to leave it out: samplers and schedules by A1111's names (SDXL's own
    leading spacing is what A1111 runs DDIM and Euler on, so it goes unsaid, as do explicit timesteps' schedule),
    explicit timesteps as a list, eta only where it is not the sampler's own, strength and CFG rescale only where
    they change something."""
    v = settings.get(name)
    if name == "sampler":
        return SAMPLERS.get(v, v)
    if name == "schedule":
        return SCHEDULES.get(v) if v not in (None, "leading") else None
    if name == "timesteps":
        return ",".join(map(str, v)) if v else None
    if name == "eta":
        method = METHODS.get(settings.get("sampler"))
        return None if v is None or method is None or v == method.eta else v
    if name == "strength":
        return None if v in (None, 1.0) else v
    if name == "guidance_rescale":
        return v or None
    return v


def parse_a1111(text: str) -> dict[str, str]:
    """A1111's `parameters` text -> {"prompt": ..., "negative": ..., key: value, ...} (values as text)."""
    lines = text.strip().split("\n")
    out: dict[str, str] = {}
    if len(lines) > 1 and len(PAIR.findall(lines[-1])) >= 3:
        out.update({k: unquote(v) for k, v in PAIR.findall(lines[-1])})
        lines = lines[:-1]
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out["prompt"] = "\n".join(prompt)
    if in_negative:
        out["negative"] = "\n".join(negative)
    return out


def settings_from_a1111(params: dict[str, str]) -> dict:
    """The settings an A1111 `parameters` text gives (its prompt, negative prompt, steps, CFG, seed, size, sampler
    and schedule by A1111's names, older combined ones such as "DPM++ 2M Karras" too, denoising strength, CFG
    rescale, and DemoFusion's own keys when minifusion wrote it); a value that does not read as its setting's type,
    or a sampler minifusion lacks, is left out."""
    out = {"prompt": params["prompt"]}
    if "negative" in params:
        out["negative"] = params["negative"]
    for row in ROWS:
        if row.a1111 not in params:
            continue
        v = params[row.a1111]
        try:
            if row.name == "sampler":
                out["sampler"], implied = sampler_name(v)
                if implied is not None:
                    out["schedule"] = implied
            elif row.name == "schedule":
                out["schedule"] = schedule_name(v)
            elif row.parse is not None:
                out[row.name] = row.parse(v)
            elif row.kind is bool:
                out[row.name] = v == "True"
            elif row.kind in (int, float) or row.name == "max_memory":
                out[row.name] = (int if row.kind is not float else float)(v)
        except ValueError:  # SettingError included
            pass
    size = SIZE.fullmatch(params.get("DemoFusion final size", params.get("Size", "")))
    if size:
        out["width"], out["height"] = int(size.group(1)), int(size.group(2))
    return out


def info(settings: dict, size: tuple[int, int], scale: int, scales: int, model: dict) -> dict[str, str]:
    """The PNG text chunks of one image: {"parameters": A1111's text, "minifusion": JSON}."""
    record = {"settings": settings, "scale": scale, "scales": scales, "size": list(size),
              "model": {k: v for k, v in model.items() if v}, "version": VERSION}
    return {PARAMETERS: a1111_parameters(settings, size, scale, scales, model), KEY: json.dumps(record)}


def save_png(image: Image.Image, path: Path) -> None:
    """Write `image` as a PNG carrying its `parameters` and `minifusion` text, atomically."""
    meta = PngImagePlugin.PngInfo()
    for key in (PARAMETERS, KEY):
        if key in image.info:
            meta.add_text(key, image.info[key])
    atomic_write(path, lambda f: image.save(f, format="PNG", pnginfo=meta))


class NoSettings(ValueError):
    """A file that carries no settings minifusion can read; the message says what it is."""


def read_settings(png: str | Path) -> dict:
    """The settings a PNG records: minifusion's JSON, else A1111's `parameters` text (an image A1111 made)."""
    try:
        with Image.open(png) as im:
            text = dict(getattr(im, "text", {}) or {})
    except (OSError, ValueError) as e:
        raise NoSettings(f"{png}: cannot read it as an image ({e})") from None
    if KEY in text:
        try:
            saved = json.loads(text[KEY])["settings"]
            older = {row.older: row.name for row in ROWS if row.older in saved and row.name not in saved}
            return {older.get(k, k): v for k, v in saved.items() if older.get(k, k) in RECORDED}
        except (ValueError, KeyError, TypeError):
            raise NoSettings(f"{png}: its minifusion settings are unreadable") from None
    if PARAMETERS in text and text[PARAMETERS].strip():
        return settings_from_a1111(parse_a1111(text[PARAMETERS]))
    raise NoSettings(f"{png}: carries no generation settings (neither minifusion's nor Automatic1111's)")


def _cache_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "minifusion" / "hashes.json"


def _key(path: Path) -> str:
    st = path.stat()
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def _known() -> dict:
    try:
        known = json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def cached_hash(path: str | Path) -> str | None:
    """The SHA-256 that file_hash remembers for this file, or None where it would have to read it."""
    value = _known().get(_key(Path(path).resolve()))
    return value if isinstance(value, str) else None


def file_hash(path: str | Path, length: int = 10) -> str:
    """A1111's hash of a file: the first `length` hex digits of its SHA-256 (10 for a model, 12 for an embedding),
    remembered per file (by path, size and modification time) in ~/.cache/minifusion/hashes.json so a multi-GB
    checkpoint is read for it once."""
    digest = cached_hash(path)
    if digest is None:
        path = Path(path).resolve()
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        digest = h.hexdigest()
        known = _known()
        known[_key(path)] = digest
        try:
            _cache_file().parent.mkdir(parents=True, exist_ok=True)
            atomic_write(_cache_file(), lambda f: f.write(json.dumps(known).encode()))
        except OSError:
            pass  # a read-only home: the hash is computed again next time, nothing else is lost
    return digest[:length]
