"""SDXL textual-inversion embeddings: `clip_l` (n x 768) and `clip_g` (n x 1280) vectors for one new word.

As in Automatic1111, the word is the file's stem and stands for n token positions in both text encoders; the
prompt encoder (prompt.py) puts vector i of the file at the i-th of them, in place of the token embedding.
Files are untrusted: safetensors only, read through SafetensorsFile; anything else is a one-line CheckpointError
naming the file and what to do.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from .families import PICKLE_SUFFIXES
from .safetensors_check import DTYPES, CheckpointError, SafetensorsFile, show

KEYS = ("clip_l", "clip_g")  # encoder 1 (CLIP ViT-L), encoder 2 (OpenCLIP bigG), as SDXL embedding files name them
SD15_KEYS = ("emb_params", "string_to_param")  # kohya's and A1111's SD 1.5 formats: one table for one encoder
MAX_VECTORS = 75  # A1111 never splits an embedding across chunks, so it must fit in one chunk's 75 tokens


@dataclass(frozen=True, eq=False)
class Embedding:
    name: str  # the word that calls it in a prompt: the file's stem
    ids: tuple[int, ...]  # that word's tokens, which prompt.py looks for in a prompt's tokens
    vectors: tuple[torch.Tensor, torch.Tensor]  # (n, width) float32 per encoder: clip_l, clip_g


def load_embedding(path: str | Path, widths: tuple[int, int], encode: Callable[[str], list[int]]) -> Embedding:
    """Read one SDXL embedding file. widths: the two text encoders' token widths, which its tables must have;
    encode: the tokenizer's text -> token ids, for the name."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: a pickled embedding ({path.suffix}) is not loaded, since unpickling can run "
                              "code; get the .safetensors version of this embedding")
    f = SafetensorsFile(path)
    try:
        names = set(f.entries)
        if any(k == s or k.startswith(s + ".") for k in names for s in SD15_KEYS):
            raise CheckpointError(f"{path}: an SD 1.5 (or 2.x) embedding, one table ({'/'.join(SD15_KEYS)}); SDXL "
                                  "needs one with clip_l and clip_g tables: get the SDXL version of this embedding")
        if names != set(KEYS):
            extra = ", ".join(show(k, 40) for k in sorted(names - set(KEYS))[:5])
            raise CheckpointError(f"{path}: not an SDXL embedding: it must hold exactly the tensors clip_l and "
                                  f"clip_g, it has {', '.join(show(k, 40) for k in sorted(names)[:5]) or 'none'}"
                                  + (f" (unexpected: {extra})" if extra else ""))
        check_shapes(path, [(f.entries[k].shape, DTYPES[f.entries[k].dtype]) for k in KEYS], widths)
        vectors = tuple(f.read(k).float() for k in KEYS)
    finally:
        f.close()
    if bad := [k for k, v in zip(KEYS, vectors) if not torch.isfinite(v).all()]:
        raise CheckpointError(f"{path}: NaN or inf in {' and '.join(bad)}: the file is damaged, download it again")
    ids = tuple(encode(path.stem))
    if not ids:
        raise CheckpointError(f"{path}: the name {path.stem!r} has no tokens, so no prompt can call it; rename the "
                              "file (its stem is the word that calls the embedding)")
    return Embedding(path.stem, ids, vectors)


def check_shapes(path: Path, tables: list[tuple[tuple[int, ...], torch.dtype]], widths: tuple[int, int]) -> None:
    """Every problem of the two tables' shapes and dtypes, reported in one error."""
    problems = []
    for key, (shape, dtype), width in zip(KEYS, tables, widths):
        if len(shape) != 2 or shape[1] != width:
            problems.append(f"{key} is {' x '.join(map(str, shape)) or 'a scalar'}, not n x {width}")
        elif not dtype.is_floating_point:
            problems.append(f"{key} is {str(dtype).replace('torch.', '')}, not floating point")
    if problems:
        raise CheckpointError(f"{path}: {'; '.join(problems)} (this model's text encoders are {widths[0]} and "
                              f"{widths[1]} wide): an embedding for another model, or a damaged file")
    counts = [shape[0] for shape, _ in tables]
    if counts[0] != counts[1]:
        raise CheckpointError(f"{path}: clip_l has {counts[0]} vectors but clip_g {counts[1]}; both need the same "
                              "number: the file is damaged")
    if not 1 <= counts[0] <= MAX_VECTORS:
        raise CheckpointError(f"{path}: {counts[0]} vectors; an embedding needs 1 to {MAX_VECTORS} (one prompt "
                              "chunk)")


def load_embeddings(paths: str | Path | Iterable[str | Path], widths: tuple[int, int],
                    encode: Callable[[str], list[int]]) -> dict[str, Embedding]:
    """The embeddings by name. Two names with the same tokens (such as "Neg" and "neg": prompts are lowercased)
    would be the same word, so that is an error."""
    out: dict[str, Embedding] = {}
    where: dict[tuple[int, ...], Path] = {}
    for path in [paths] if isinstance(paths, (str, Path)) else paths:  # one path given alone, not its characters
        e = load_embedding(path, widths, encode)
        if e.ids in where:
            raise CheckpointError(f"{path}: its name {e.name!r} is the same word as that of {where[e.ids]}, already "
                                  "loaded; rename one of the files (an embedding's name is its file's stem)")
        out[e.name], where[e.ids] = e, Path(path)
    return out
