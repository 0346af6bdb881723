"""Read safetensors files that may be hostile: the whole header is validated before any tensor is read, and
tensor bytes come from plain file reads.

The format (github.com/huggingface/safetensors): 8 bytes, a little-endian u64 N; N bytes of UTF-8 JSON; then
the data section. The JSON maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (byte
offsets into the data section) and may hold "__metadata__", a str -> str map. The rules enforced are the
reference implementation's (`Metadata::validate`, `read_metadata`): a header of at most 100 MB; byte ranges
that, sorted by offset, tile the data section exactly (each begins where the previous ends: no gap, no
overlap, no bytes after the last); each range as long as its shape times its dtype's size. Stricter than the
reference (safetensors 0.8 accepts both): the header must start with "{" (every writer's does), and a key
named twice is refused rather than one copy silently kept. Header work reads 8 + N bytes, and N is first
checked against the real file size, so a forged length allocates nothing.

Why not safetensors.safe_open: it memory-maps the file, and a file that shrinks after it was mapped (a
download being rewritten, a network drive going away) kills the process with SIGBUS on the next tensor. A
plain read gets a short count or an OSError instead, which becomes a CheckpointError.

Dtypes read: F64 F32 F16 BF16, the two FP8 formats torch has (F8_E4M3 = float8_e4m3fn, F8_E5M2; FP8
fine-tunes of SDXL exist and are upcast on load), and I64 I32 I16 I8 U8 BOOL (position_ids and the like).
Refused with a message saying so: U16 U32 U64, F8_E8M0, F4, F6_*, and anything newer. Tensor bytes are used
as stored, little-endian as the format defines, which is the byte order of x86-64 and ARM64 hosts.
"""
from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import torch

MAX_HEADER = 100_000_000  # the reference implementation's limit
MAX_DIM = 2**63 - 1  # a dimension torch (int64 sizes) can hold

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
ITEMSIZE = {name: torch.empty((), dtype=dt).element_size() for name, dt in DTYPES.items()}
KNOWN_UNSUPPORTED = ("U16", "U32", "U64", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64")
CORRUPT = "the download is truncated or corrupt, download it again"


class CheckpointError(Exception):
    """A checkpoint that cannot be loaded; the message names the file and what to do."""


@dataclass(frozen=True)
class Entry:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def show(s, limit: int = 160) -> str:
    """A name from the file, quoted, on one line and of bounded length (names are attacker-controlled)."""
    r = repr(s)
    return r if len(r) <= limit else r[:limit - 3] + "..."


def first_line(e: Exception) -> str:
    """An exception's message cut to its first line, for the one-line errors every loader gives."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class SafetensorsFile:
    """One validated safetensors file, kept open so tensors come from the very file whose header was checked."""

    def __init__(self, path: Path):
        self.path = path
        self._f = _open_regular(path)
        try:
            size = os.fstat(self._f.fileno()).st_size
            self.data_start, self.entries, self.metadata = read_header(self._f, size, path)
        except OSError as e:
            self._f.close()
            raise CheckpointError(f"{path}: reading the header failed ({e.strerror or e}); check the disk, or "
                                  "download the file again") from None
        except BaseException:
            self._f.close()
            raise

    def read(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        n = e.end - e.begin
        if n == 0:
            return torch.empty(e.shape, dtype=DTYPES[e.dtype])
        buf = bytearray(n)
        try:
            self._f.seek(self.data_start + e.begin)
            got = _read_into(self._f, buf)
        except OSError as err:
            raise CheckpointError(f"{self.path}: reading tensor {show(name)} failed ({err.strerror or err}); "
                                  "check the disk, or download the file again") from None
        if got != n:
            raise CheckpointError(f"{self.path}: the file ended inside tensor {show(name)}: it was cut short or "
                                  "changed while loading; download it again")
        return torch.frombuffer(buf, dtype=DTYPES[e.dtype]).reshape(e.shape)

    def close(self) -> None:
        self._f.close()


def _open_regular(path: Path):
    # O_NONBLOCK: opening a FIFO must not wait for a writer; it is then refused as not a regular file
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be opened ({e.strerror or e})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{path}: not a regular file")
    return os.fdopen(fd, "rb", buffering=0)


def _read_into(f, buf: bytearray) -> int:
    # one read() returns at most ~2 GiB on Linux, and any count on other systems: loop until full or EOF
    view, got = memoryview(buf), 0
    while got < len(buf):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _looks_pickled(prefix: bytes) -> bool:
    # torch.save writes a zip (PK\x03\x04); older torch and Lightning .ckpt a raw pickle (\x80, protocol 2-5)
    return prefix.startswith(b"PK\x03\x04") or (prefix[:1] == b"\x80" and 2 <= prefix[1] <= 5)


# files people pass by mistake, by their first bytes: named, they point the right way instead of "truncated"
MAGIC = [(b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
         (b"RIFF", "a RIFF file (WebP image, WAV, AVI)"), (b"%PDF", "a PDF document"),
         (b"\x1f\x8b", "a gzip archive"), (b"7z\xbc\xaf", "a 7-Zip archive"), (b"Rar!", "a RAR archive"),
         (b"version https://git-lfs", "a Git LFS pointer (the real file was never downloaded: git lfs pull)"),
         (b"<!DOCTYPE", "an HTML page (a download that saved the web page)"),
         (b"<html", "an HTML page (a download that saved the web page)")]


class NotSafetensors(CheckpointError):
    """A file of another kind altogether; `kind` says which ("a PNG image", "a text file", ...)."""

    def __init__(self, path: Path, kind: str):
        super().__init__(f"{path}: not a safetensors file: it is {kind}")
        self.kind = kind


def file_kind(start: bytes) -> str | None:
    """What a file is, from its first bytes, when it is one of the kinds people pass instead of a safetensors."""
    for magic, kind in MAGIC:
        if start.lower().startswith(magic.lower()) if magic.startswith(b"<") else start.startswith(magic):
            return kind
    try:
        text = start.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return "a text file" if all(c.isprintable() or c in "\r\n\t" for c in text) else None


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_header(f, size: int, path: Path) -> tuple[int, dict[str, Entry], dict[str, str]]:
    """(data section start, {name: Entry}, metadata) of an open file of `size` bytes, or CheckpointError."""
    def corrupt(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: {what}; {CORRUPT}")

    if size == 0:
        raise corrupt("the file is empty")
    if size < 8:
        kind = file_kind(f.read(size))  # a few bytes of text is a note, not a download cut short
        if kind is not None:
            raise NotSafetensors(path, kind)
        raise corrupt(f"the file has only {size} bytes, less than a header")
    prefix = f.read(8)
    if len(prefix) != 8:
        raise corrupt("the file ended inside its header")
    n = int.from_bytes(prefix, "little")
    if n > MAX_HEADER or n > size - 8:
        kind = file_kind(prefix + f.read(56))
        if kind is not None:
            raise NotSafetensors(path, kind)
        if _looks_pickled(prefix):
            raise CheckpointError(f"{path}: a PyTorch pickle checkpoint (zip or raw pickle) named .safetensors; it "
                                  "is not loaded, since unpickling can run code; download the real .safetensors release")
        limit = "the 100 MB the format allows" if n > MAX_HEADER else f"the {size - 8} bytes after it"
        raise corrupt(f"the header claims {n} bytes, more than {limit}")
    raw = bytearray(n)
    if _read_into(f, raw) != n:
        raise corrupt("the file ended inside its header")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise corrupt(f"the header is not UTF-8 (byte {e.start})") from None
    if not text.startswith("{"):
        raise corrupt("the header is not a JSON object")
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except _Duplicate as e:
        raise corrupt(f"the header names {show(e.args[0])} twice") from None
    except (ValueError, RecursionError) as e:
        raise corrupt(f"the header is not valid JSON ({str(e)[:80]})") from None

    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise corrupt("__metadata__ is not a map of strings to strings")

    data_size = size - 8 - n
    entries = {name: _entry(name, info, data_size, path, corrupt) for name, info in header.items()}

    pos = 0
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if e.begin < pos:
            raise corrupt(f"tensor {show(name)} overlaps another (bytes {e.begin}..{pos})")
        if e.begin > pos:
            raise corrupt(f"bytes {pos}..{e.begin} of the data section belong to no tensor")
        pos = e.end
    if pos != data_size:
        raise corrupt(f"{data_size - pos} bytes after the last tensor belong to no tensor")
    return 8 + n, entries, metadata


def _numel(shape: list[int], cap: int) -> int:
    """The element count, or cap + 1 once it exceeds cap: a forged shape of a million huge sizes would
    otherwise build an integer of tens of megabytes, one slow multiplication at a time."""
    if 0 in shape:
        return 0
    n = 1
    for d in shape:
        n *= d
        if n > cap:
            return cap + 1
    return n


def _entry(name: str, info, data_size: int, path: Path, corrupt) -> Entry:
    if not isinstance(info, dict):
        raise corrupt(f"the entry of tensor {show(name)} is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPES:
        if dtype in KNOWN_UNSUPPORTED:
            raise CheckpointError(f"{path}: tensor {show(name)} is stored as {dtype}, which minifusion does not "
                                  f"read (it reads {' '.join(DTYPES)}); this is not a Stable Diffusion checkpoint")
        raise corrupt(f"tensor {show(name)} has unknown dtype {show(dtype, 40)}")
    if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape):
        raise corrupt(f"tensor {show(name)} has shape {show(shape, 60)}, not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise corrupt(f"tensor {show(name)} has data_offsets {show(offsets, 60)}, not [begin, end]")
    begin, end = offsets
    if end > data_size:
        raise corrupt(f"tensor {show(name)} ends at byte {end} of a data section of {data_size} bytes: "
                      "the file is cut short")
    nbytes = _numel(shape, data_size) * ITEMSIZE[dtype]
    if end - begin != nbytes:
        raise corrupt(f"tensor {show(name)} of shape {show(shape, 60)} {dtype} needs {nbytes} bytes but spans "
                      f"{end - begin}")
    return Entry(dtype, tuple(shape), begin, end)
