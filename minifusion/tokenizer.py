"""CLIP byte-level BPE tokenizer (OpenAI CLIP / open_clip), shared by both SDXL text encoders.

The 49,152-entry merge list is the one open_clip ships (bpe_simple_vocab_16e6.txt.gz); we read that file from
the installed package without importing open_clip, so tokenizing works offline and needs no model folder.
Text is cleaned as CLIP's own tokenizer does (ftfy, HTML unescape twice, whitespace collapse, lowercase).
"""
from __future__ import annotations

import gzip
import html
import importlib.util
from functools import lru_cache
from pathlib import Path

import ftfy
import regex
import torch

BOS, EOS = 49406, 49407
CONTEXT = 77

# CLIP's pre-tokenizer: its special tokens, English contractions, letter runs, single digits, other symbol runs
PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


def bundled_bpe_path() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("CLIP BPE vocabulary not found: install open_clip_torch (it bundles "
                                "bpe_simple_vocab_16e6.txt.gz) or pass bpe_path")
    return Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"


def bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level alphabet: printable bytes stand for themselves, the other 68 bytes are moved to
    # code points 256.. so that no BPE symbol is whitespace or a control character
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


def clean(text: str) -> str:
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


class Tokenizer:
    def __init__(self, bpe_path: str | Path | None = None):
        lines = gzip.open(bpe_path or bundled_bpe_path()).read().decode("utf-8").split("\n")
        # the file starts with a version line; CLIP uses the first 49152 - 256 - 2 merges (vocab 49408)
        merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
        self.byte_encoder = bytes_to_unicode()
        chars = list(self.byte_encoder.values())
        vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.decoder = dict(enumerate(vocab))
        assert (self.encoder["<|startoftext|>"], self.encoder["<|endoftext|>"]) == (BOS, EOS)
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.bpe = lru_cache(maxsize=1 << 16)(self._bpe)

    def _bpe(self, word: str) -> tuple[str, ...]:
        if word in ("<|startoftext|>", "<|endoftext|>"):
            return (word,)
        parts = (*word[:-1], word[-1] + "</w>")
        while len(parts) > 1:
            # merge the lowest-ranked adjacent pair everywhere it occurs, until no known pair is left
            pairs = set(zip(parts, parts[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = tuple(merged)
        return parts

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt, without BOS/EOS and without truncation."""
        ids = []
        for word in PATTERN.findall(clean(text)):
            word = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(word))
        return ids

    def __call__(self, prompts: str | list[str], pad_id: int) -> torch.Tensor:
        """(B, 77) ids: BOS, at most 75 tokens, EOS, then pad_id (SDXL: EOS for encoder 1, 0 for encoder 2)."""
        prompts = [prompts] if isinstance(prompts, str) else prompts
        out = torch.full((len(prompts), CONTEXT), pad_id, dtype=torch.long)
        for row, prompt in zip(out, prompts):
            ids = [BOS, *self.encode(prompt)[:CONTEXT - 2], EOS]
            row[:len(ids)] = torch.tensor(ids)
        return out
