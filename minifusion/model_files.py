"""Where a model's tensors are: one .safetensors file, a diffusers folder (config.json beside the weights, .fp16
variants, shards named by an index), or a folder holding one file. Pickle formats are refused by name, with the
way to convert them. Paths chosen by the user are followed, symlinks included (the Hugging Face cache is made of
them); the shard names inside an index.json are not the user's choice, so they must be plain file names in the
index's own folder. Small JSON files are read with a size bound, never trusted to be small.
"""
from __future__ import annotations

import json
from pathlib import Path

from .families import PICKLE_SUFFIXES
from .safetensors_check import CheckpointError, first_line, show

JSON_LIMIT = 50_000_000  # config.json / index.json; SDXL's largest, the UNet index, is about 100 kB


def _resolve_single(path: Path) -> Path:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        # converting unpickles, so only a file from a source the user trusts, and with torch's restricted
        # unpickler (weights_only=True refuses anything but tensors and plain containers)
        out = path.with_suffix(".safetensors")
        raise CheckpointError(f"{path}: pickle checkpoints are not loaded (unpickling can run code); download the "
                              ".safetensors release, or, if you trust the file's source, convert it to .safetensors: "
                              f"python -c \"import torch, safetensors.torch as st; sd = torch.load({str(path)!r}, "
                              f"weights_only=True); st.save_file(sd.get('state_dict', sd), {str(out)!r})\"")
    return path


def read_json(f: Path) -> dict:
    """A small JSON object from a config or index file, or CheckpointError (never a hang on a forged size)."""
    try:
        size = f.stat().st_size
        if size > JSON_LIMIT:
            raise CheckpointError(f"{f}: {size} bytes, far too large for a config file; download it again")
        data = json.loads(f.read_bytes())
    except OSError as e:
        raise CheckpointError(f"{f}: cannot be read ({e.strerror or e})") from None
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{f}: not valid JSON ({first_line(e)[:80]}); download it again") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{f}: not a JSON object; download it again")
    return data


def _shard_names(index: Path) -> list[str]:
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or \
            not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: not a valid safetensors index (its weight_map is not tensor -> shard file)")
    shards = sorted(set(weight_map.values()))
    for s in shards:
        # a shard is a file beside its index: anything else ("../../x", "/etc/x", "a/b") is refused unopened
        if Path(s).name != s or s in (".", "..") or "\\" in s or not s.endswith(".safetensors"):
            raise CheckpointError(f"{index}: shard name {show(s)} is not a .safetensors file name in the index's "
                                  "own folder; the index is corrupt or hostile, download the folder again")
    return shards


def diffusers_files(folder: Path, sub: str, stem: str) -> list[Path]:
    d = folder / sub
    for variant in ("", ".fp16"):
        index = d / f"{stem}{variant}.safetensors.index.json"
        if index.is_file():
            shards = _shard_names(index)
            missing = [s for s in shards if not (d / s).is_file()]
            if missing:
                raise CheckpointError(f"{index}: shard {missing[0]} is missing; download the whole {sub}/ folder")
            return [d / s for s in shards]
        single = d / f"{stem}{variant}.safetensors"
        if single.is_file():
            return [single]
    pickled = [p.name for p in d.glob(f"{stem}*") if p.suffix in PICKLE_SUFFIXES] if d.is_dir() else []
    if pickled:
        raise CheckpointError(f"{d}: only pickle weights ({pickled[0]}) found, which are not loaded (unpickling can "
                              "run code); download the .safetensors variant of this folder")
    raise CheckpointError(f"{d}: no {stem}.safetensors (or .fp16 / sharded variant); download the {sub}/ folder")


def find_part(path: Path, sub: str, what: str, need: str) -> tuple[str, Path]:
    """('single', file) or ('folder', a diffusers folder of one network: `path` itself, or its `sub`/ where path
    is a pipeline folder), for a network given beside the checkpoint (a VAE, a ControlNet)."""
    if _is_file(path):
        return "single", _resolve_single(path)
    folder = path / sub if (path / sub).is_dir() else path
    if (folder / "config.json").is_file():
        return "folder", folder
    return "single", _lone_file(folder, " and no config.json", f"no {what} here (neither config.json with "
                                f"diffusion_pytorch_model.safetensors nor a .safetensors file); {need}")


def _is_file(path: Path) -> bool:
    """True for a file, False for a folder; anything else is an error."""
    if path.is_file():
        return True
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if not path.is_dir():
        raise CheckpointError(f"{path}: neither a file nor a folder (a device, pipe or socket)")
    return False


def _lone_file(folder: Path, several: str, none: str) -> Path:
    """The one .safetensors file in a folder with no config; several or none is an error (pickles named)."""
    files = sorted(f for f in folder.glob("*.safetensors") if f.is_file())
    if len(files) == 1:
        return files[0]
    if len(files) > 1:
        names = ", ".join(f.name for f in files[:4])
        raise CheckpointError(f"{folder}: several .safetensors files ({names}){several}; pass the one to use")
    pickled = sorted(p for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickled:
        _resolve_single(pickled[0])
    raise CheckpointError(f"{folder}: {none}")


def find_checkpoint(path: Path) -> tuple[str, Path]:
    """('single', file) or ('diffusers', folder)."""
    try:
        return _find(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None


def _find(path: Path) -> tuple[str, Path]:
    if _is_file(path):
        return "single", _resolve_single(path)
    if (path / "unet").is_dir() or (path / "model_index.json").is_file():
        return "diffusers", path
    return "single", _lone_file(path, "", "nothing loadable here; put sd_xl_base_1.0.safetensors (or a "
                                "diffusers-layout SDXL folder) there, see weights/README.md")
