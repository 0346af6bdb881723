"""What the web UI loads beside the checkpoint, Gradio-free as minifusion.studio is: the folders it offers
LoRAs, VAEs, embeddings and ControlNets from (Folders), and a set of them as the pipeline is loaded with
(Adapters)."""
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .checkpoint import CheckpointError
from .embeddings import PICKLE_SUFFIXES, load_embedding

# what loads beside the checkpoint (the CLI's names) -> its folder inside the weights folder
FOLDERS = {"lora": "loras", "vae": "vae", "embedding": "embeddings", "controlnet": "controlnet"}
WHAT = {"lora": "LoRA", "vae": "VAE", "embedding": "embedding", "controlnet": "ControlNet"}


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
        the PNG's metadata to name a file --settings-from finds; ValueError for anything else, so that the
        page and the API load nothing from outside these folders (the message names no folder: it goes to
        clients)."""
        folder = getattr(self, kind)
        path = Path(os.path.normpath(folder / name))
        if not path.is_relative_to(folder) or path == folder:
            raise ValueError(f"{name}: not in the {WHAT[kind]} folder; put it there")
        if not path.exists():
            raise ValueError(f"{name}: no such {WHAT[kind]} in the {WHAT[kind]} folder (rescan the folders to see "
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


def shown_folder(folder: Path) -> str:
    """A folder as a page shows it: from the working folder when it is under it, else by its name alone (a
    page tells its visitors nothing of the server's disk)."""
    relative = os.path.relpath(folder)
    return folder.name if relative.startswith("..") else relative
