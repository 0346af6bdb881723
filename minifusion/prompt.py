"""Prompts as Automatic1111 reads them: emphasis, BREAK, any length, textual-inversion embeddings.

Following A1111's modules/prompt_parser.py (parse_prompt_attention), sd_hijack_clip.py (tokenize_line,
process_tokens) and sd_emphasis.py (EmphasisOriginal, its default):
- `(text)` weighs text x1.1, `[text]` /1.1, `(text:w)` xw, nested brackets multiply; `\\(`, `\\)`, `\\[`, `\\]`,
  `\\\\` are literal characters, a lone backslash is dropped; brackets left open at the end still weigh what
  follows them, and closing brackets without an opening one are text. `BREAK` (upper case, a word) ends a chunk.
- Each weighted span is tokenized on its own; the tokens fill chunks of 75. When a chunk is full and a comma came
  within its last 20 tokens, the tokens after that comma move to the next chunk. Each chunk is encoded with BOS and
  EOS on its own (77 positions); the hidden states of the chunks are concatenated along the token axis and the
  pooled embedding comes from the first chunk.
- Emphasis multiplies each token's hidden state by its weight, then rescales the chunk so its mean is the
  unweighted chunk's mean. The pooled embedding is not weighted.
- An embedding's name, written as a word, stands for its n vectors (n token positions, weighted like the text
  around it, never split across chunks).

Where we differ from A1111, on purpose: a BREAK inside brackets still breaks (A1111 weighs its marker and then
encodes the word "BREAK" with weight -1.1); tokens moved to the next chunk at a comma take their embedding vectors
with them (A1111 leaves the vectors at the old positions, on the padding); an embedding's name is matched only where
a word starts (A1111 also matches it at the end of a longer word whose tokens end the same way); the emphasis mean
is taken per prompt (A1111 takes it over the whole batch, which for one prompt is the same).
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Sequence

import torch

from .embeddings import Embedding
from .tokenizer import BOS, EOS, Tokenizer

CHUNK = 75  # prompt tokens per chunk: CLIP's 77 positions less BOS and EOS
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default
ROUND, SQUARE = 1.1, 1 / 1.1

# A1111's re_attention: escapes, a lone backslash, brackets, ":weight)", and runs of other text (":" alone is text)
ATTENTION = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:([+-]?[.\d]+)\)|\)|]|[^\\()\[\]:]+|:")
BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*", re.S)


class Span(NamedTuple):
    text: str
    weight: float


class Break:
    """Where a prompt says BREAK: the chunk ends there."""

    def __repr__(self) -> str:
        return "BREAK"


BREAK = Break()


def parse(text: str) -> list[Span | Break]:
    """A prompt's text as weighted spans and BREAKs; neighbouring spans of equal weight are joined (as A1111 does,
    which matters: each span is tokenized on its own)."""
    res: list[list | Break] = []  # [text, weight] while brackets are still closing
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for item in res[start:]:
            if item is not BREAK:
                item[1] *= factor

    for m in ATTENTION.finditer(text):
        piece, weight = m.group(0), m.group(1)
        if piece.startswith("\\"):
            res.append([piece[1:], 1.0])
        elif piece == "(":
            round_open.append(len(res))
        elif piece == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            try:
                factor = float(weight)
            except ValueError:
                raise ValueError(f"prompt: {piece!r} is not a weight; write (text:1.2), or \\( \\) for literal "
                                 "brackets") from None
            multiply(round_open.pop(), factor)
        elif piece == ")" and round_open:
            multiply(round_open.pop(), ROUND)
        elif piece == "]" and square_open:
            multiply(square_open.pop(), SQUARE)
        else:
            for i, part in enumerate(BREAK_WORD.split(piece)):
                if i:
                    res.append(BREAK)
                res.append([part, 1.0])
    for start in round_open:
        multiply(start, ROUND)
    for start in square_open:
        multiply(start, SQUARE)

    out: list[Span | Break] = []
    for item in res or [["", 1.0]]:
        if item is BREAK:
            out.append(BREAK)
        elif out and out[-1] is not BREAK and out[-1].weight == item[1]:
            out[-1] = Span(out[-1].text + item[0], item[1])
        else:
            out.append(Span(item[0], item[1]))
    return out


class Vector(NamedTuple):
    """A token position filled by vector `index` of the embedding `name`."""
    name: str
    index: int


Token = int | Vector


@dataclass(frozen=True)
class Chunk:
    tokens: tuple[Token, ...]  # CHUNK + 2: BOS, the prompt's tokens, EOS after them and as padding
    weights: tuple[float, ...]  # one per token; 1 for BOS, EOS and padding
    length: int  # how many of the tokens are the prompt's

    @classmethod
    def of(cls, tokens: Sequence[Token], weights: Sequence[float]) -> "Chunk":
        pad = CHUNK - len(tokens)
        return cls((BOS, *tokens, *[EOS] * pad, EOS), (1.0, *weights, *[1.0] * pad, 1.0), len(tokens))


EMPTY = Chunk.of((), ())  # the empty prompt's chunk: what shorter prompts are padded with


def to_chunks(text: str, tokenizer: Tokenizer, embeddings: Mapping[str, Embedding] | None = None) -> list[Chunk]:
    """A prompt as chunks of 75 tokens (at least one), as A1111's tokenize_line."""
    comma = tokenizer.encoder[",</w>"]
    starting: dict[int, list[Embedding]] = {}  # by first token, longest name first (as A1111)
    for e in sorted((embeddings or {}).values(), key=lambda e: -len(e.ids)):
        starting.setdefault(e.ids[0], []).append(e)

    def embedding_at(ids: list[int], p: int) -> Embedding | None:
        # only where a word starts: the previous token ends one (CLIP marks every word's last token with </w>)
        if p and not tokenizer.decoder[ids[p - 1]].endswith("</w>"):
            return None
        return next((e for e in starting.get(ids[p], ()) if tuple(ids[p:p + len(e.ids)]) == e.ids), None)

    done: list[Chunk] = []
    tokens: list[Token] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal tokens, weights, last_comma
        done.append(Chunk.of(tokens, weights))
        tokens, weights, last_comma = [], [], -1

    for span in parse(text):
        if span is BREAK:
            close()
            continue
        ids = tokenizer.encode(span.text)
        p = 0
        while p < len(ids):
            if ids[p] == comma:
                last_comma = len(tokens)
            elif len(tokens) == CHUNK and last_comma != -1 and CHUNK - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1
                moved = tokens[cut:], weights[cut:]
                tokens, weights = tokens[:cut], weights[:cut]
                close()
                tokens, weights = moved
            if len(tokens) == CHUNK:
                close()
            e = embedding_at(ids, p)
            if e is None:
                tokens.append(ids[p])
                weights.append(span.weight)
                p += 1
                continue
            n = e.vectors[0].shape[0]
            if len(tokens) + n > CHUNK:
                close()
            tokens += [Vector(e.name, i) for i in range(n)]
            weights += [span.weight] * n
            p += len(e.ids)
    if tokens or not done:
        close()
    return done


def pad_rows(rows: list[list[Chunk]], count: int) -> list[list[Chunk]]:
    """Each row extended with empty chunks to `count` chunks: the rows of one batch (and both rows of classifier-
    free guidance) must have the same context length."""
    return [row + [EMPTY] * (count - len(row)) for row in rows]


def ids(chunk: Chunk, pad_id: int) -> list[int]:
    """The 77 token ids one encoder sees: embedding positions hold token 0 (their vectors replace its embedding),
    the positions after the prompt's closing EOS hold pad_id (SDXL: EOS for encoder 1, 0 for encoder 2)."""
    end = chunk.length + 2
    return [t if isinstance(t, int) else 0 for t in chunk.tokens[:end]] + [pad_id] * (len(chunk.tokens) - end)


def emphasize(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis on hidden states z (B, L, C) with token weights (B, L): z times its weights,
    rescaled per prompt so the mean over tokens and channels is the unweighted one. Computed in float32, so that
    a float16 chunk's two means are not rounded before their ratio is taken."""
    if bool((weights == 1).all()):
        return z
    zf = z.float()
    weighted = zf * weights.to(zf.device, torch.float32)[..., None]
    scale = zf.mean(dim=(1, 2), keepdim=True) / weighted.mean(dim=(1, 2), keepdim=True)
    return (weighted * scale).to(z.dtype)


@contextmanager
def vectors_in(table: torch.nn.Embedding, batch: list[Chunk], embeddings: Mapping[str, Embedding], which: int):
    """While inside: the token embedding `table` of encoder `which` (0 or 1) returns, at every embedding position
    of the batch's chunks, that embedding's vector instead of token 0's row (A1111's EmbeddingsWithFixes)."""
    where = [(b, p, t) for b, c in enumerate(batch) for p, t in enumerate(c.tokens) if isinstance(t, Vector)]
    if not where:
        yield
        return
    rows = torch.tensor([b for b, _, _ in where])
    cols = torch.tensor([p for _, p, _ in where])
    values = torch.stack([embeddings[t.name].vectors[which][t.index] for _, _, t in where])

    def put(module, args, out):
        out[rows.to(out.device), cols.to(out.device)] = values.to(out.device, out.dtype)
        return out

    handle = table.register_forward_hook(put)
    try:
        yield
    finally:
        handle.remove()


def encode_rows(encoders: Sequence[torch.nn.Module], rows: list[list[Chunk]], embeddings: Mapping[str, Embedding],
                device: torch.device, pad_ids: tuple[int, int] = (EOS, 0)) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of equally many chunks -> (context (B, 77 x chunks, width_1 + width_2), pooled (B, P)): per chunk, each
    encoder's penultimate hidden states with emphasis, side by side; pooled is the last encoder's, of chunk 0."""
    parts, pooled = [], None
    for c in range(len(rows[0])):
        batch = [row[c] for row in rows]
        weights = torch.tensor([chunk.weights for chunk in batch])
        hidden = []
        for which, (encoder, pad_id) in enumerate(zip(encoders, pad_ids)):
            x = torch.tensor([ids(chunk, pad_id) for chunk in batch], device=device)
            with vectors_in(encoder.embeddings.token_embedding, batch, embeddings, which):
                h, p = encoder(x)
            hidden.append(emphasize(h, weights))
            if c == 0 and p is not None:
                pooled = p
        parts.append(torch.cat(hidden, dim=-1))
    return torch.cat(parts, dim=1), pooled
