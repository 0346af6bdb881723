"""Untrusted checkpoint files: a corrupt or hostile file gives one CheckpointError naming it (never another
exception, a crash, a hang, or an allocation sized by a forged number), nothing is ever unpickled, and files
of other model families are named.

`pytest -s` prints the outcome counts of the generated corpus."""
import ast
import collections
import dataclasses
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minifusion import CheckpointError, load
from minifusion.checkpoint import COMPONENTS, Configs, TensorSource, inspect_checkpoint, load_components
from minifusion.config import TextConfig, UNetConfig, VAEConfig
from minifusion.families import CHECKPOINTS, identify
from minifusion.safetensors_check import SafetensorsFile
from minifusion.tiny import random_models, write_diffusers, write_single_file

KEYS_FILE = Path(__file__).resolve().parents[2] / "shared" / "sdxl" / "sd_xl_base_1.0.keys.txt"
PACKAGE = Path(__file__).resolve().parents[1] / "minifusion"

# SDXL's architecture at its smallest (one level without attention, one with; one-layer encoders; a
# 100-token vocabulary): a 7 MB file, so hundreds of corrupt copies are written and loaded in seconds.
SMALL = Configs(
    unet=UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(0, 1),
                    transformer_depth_middle=1, context_dim=64 + 64, adm_in_channels=64 + 6 * 8,
                    addition_time_embed_dim=8, sample_size=8),
    vae=VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1),
    text_encoder_1=TextConfig(vocab_size=100, width=64, layers=1, heads=1, mlp_dim=64),
    text_encoder_2=TextConfig(vocab_size=100, width=64, layers=1, heads=1, mlp_dim=64, act="gelu",
                              projection_dim=64),
)
FP32 = dict.fromkeys(COMPONENTS, torch.float32)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(models, path, bytes) of a valid small checkpoint; checks that it loads, so corrupt copies start valid."""
    models = random_models(SMALL, seed=5)
    path = write_single_file(models, SMALL, tmp_path_factory.mktemp("small") / "small.safetensors")
    loaded, cfgs, _ = load_components(path, CPU, FP32)
    assert cfgs == SMALL
    assert torch.equal(loaded["unet"].state_dict()["out.2.weight"], models["unet"].state_dict()["out.2.weight"])
    return models, path, path.read_bytes()


@pytest.fixture(scope="module")
def small_folder(small, tmp_path_factory):
    """The same weights in the diffusers layout."""
    return write_diffusers(small[0], SMALL, tmp_path_factory.mktemp("small_folder") / "folder")


def copy_folder(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "folder"))


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging: SIGALRM interrupts a blocking call (a FIFO open, a runaway loop)."""
    def expire(*_):
        raise TimeoutError(f"no answer within {seconds} s")
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def split(blob: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def build(header, data: bytes = b"") -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


def by_offset(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


CATEGORIES = [  # message fragment -> outcome name, for the counts
    ("pickle", "refused: pickle"),
    ("the download is truncated or corrupt", "refused: corrupt file"),
    ("which minifusion does not read", "refused: unsupported dtype"),
    ("cut short or changed while loading", "refused: file changed while loading"),
    ("; this is ", "refused: other model family"),
    ("not a plausible", "refused: implausible architecture"),
    ("cannot be built", "refused: architecture cannot be built"),
    ("not an SDXL checkpoint", "refused: not SDXL (architecture not inferable)"),
    ("does not match the SDXL architecture", "refused: tensors do not match the architecture"),
    ("the UNet", "refused: components do not fit together"),
]


def outcome(path: Path, full: bool = True) -> str:
    """'loaded' or the kind of CheckpointError; any other exception fails the test."""
    try:
        with deadline(30):
            inspect_checkpoint(path)
            if full:
                load_components(path, CPU, FP32)
        return "loaded"
    except CheckpointError as e:
        msg = str(e)
        assert msg.startswith(str(path)) and "\n" not in msg and len(msg) < 2000, msg
        return next((name for frag, name in CATEGORIES if frag in msg), "refused: " + msg[len(str(path)):][:60])


def report(title: str, counts: collections.Counter) -> None:
    print(f"\n{title}: {sum(counts.values())} files")
    for name, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"  {n:5d}  {name}")


# ---------------------------------------------------------------------------------------------------------
# The named corpus: each corruption once, with the error it must give.

def named_corruptions(blob: bytes) -> dict:
    """{name: (corrupt bytes, regex the message must match, or None for: it must load)}."""
    header, data = split(blob)
    first, second, *_ = by_offset(header)
    last = by_offset(header)[-1]
    n = int.from_bytes(blob[:8], "little")

    def edit(change, base=header, payload=data):
        h = json.loads(json.dumps(base))
        change(h)
        return build(h, payload)

    def entry(key, **fields):
        return lambda h: h[key].update(fields)

    def shape_of(key, shape):
        return entry(key, shape=shape)

    def two_tensors(h2):  # a minimal file of two F32 tensors, a 4-vector and a 2x2
        return build({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                      "b": {"dtype": "F32", "shape": [2, 2], "data_offsets": [16, 32]}, **h2}, bytes(32))

    nan = bytearray(data)
    b0, _ = header[first]["data_offsets"]
    nan[b0:b0 + 4] = bytes.fromhex("0000c07f")  # float32 NaN
    f32 = next(k for k in by_offset(header) if header[k]["dtype"] == "F32" and k.endswith(".weight"))
    evil = pickle.dumps({"weights": Evil()}, protocol=2)
    return {
        "empty file": (b"", "the file is empty"),
        "4 bytes": (blob[:4], "less than a header"),
        # named as longer text files are, not called a cut-short download (a note saved under the weights' name)
        "a text file of 6 bytes": (b"hello\n", "not a safetensors file: it is a text file$"),
        "header length larger than the file": (len(blob).to_bytes(8, "little") + blob[8:], "header claims"),
        "header length zero": ((0).to_bytes(8, "little") + blob[8:], "not a JSON object"),
        "header length 2**64-1": (b"\xff" * 8 + blob[8:], "100 MB"),
        "header length 100 MB + 1 (file smaller)": ((100_000_001).to_bytes(8, "little") + blob[8:], "100 MB"),
        # the header ends in padding spaces or "}": one short leaves a byte between header and data
        "header length one short": ((n - 1).to_bytes(8, "little") + blob[8:], "not valid JSON|after the last tensor"),
        "header length one long": ((n + 1).to_bytes(8, "little") + blob[8:], "not valid JSON|not UTF-8"),
        "header not JSON": (build(b"{this is not json}", data), "not valid JSON"),
        "header a JSON array": (build(b"[1, 2, 3]", data), "not a JSON object"),
        "header a JSON string": (build(b'"abc"', data), "not a JSON object"),
        "header with leading whitespace": (build(b" " + json.dumps(header).encode(), data), "not a JSON object"),
        "header with trailing garbage": (build(json.dumps(header).encode() + b"}", data), "not valid JSON"),
        "header not UTF-8": (build(json.dumps(header).encode().replace(b'"' + first.encode(), b'"\xff\xfe', 1), data),
                             "not UTF-8"),
        "header nested 100000 deep": (build(b'{"a": ' + b"[" * 100000 + b"]" * 100000 + b"}", data), "not valid JSON"),
        "integer of 5000 digits": (build(b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], '
                                         b'"data_offsets": [0, 4]}}', bytes(4)), "not valid JSON"),
        "entry not an object": (edit(lambda h: h.__setitem__(first, [1, 2])), "is not an object"),
        "entry a string": (edit(lambda h: h.__setitem__(first, "F32")), "is not an object"),
        "dtype missing": (edit(lambda h: h[first].pop("dtype")), "unknown dtype None"),
        "unknown dtype": (edit(entry(first, dtype="F17")), "unknown dtype 'F17'"),
        "dtype lower-case": (edit(entry(first, dtype="f32")), "unknown dtype"),
        "dtype U32 (valid safetensors, not read)": (edit(entry(first, dtype="U32")), "stored as U32"),
        "dtype F8_E8M0 (valid safetensors, not read)": (edit(entry(first, dtype="F8_E8M0")), "stored as F8_E8M0"),
        "dtype F32 -> F16 (byte length no longer matches)": (edit(entry(f32, dtype="F16")), "needs"),
        "dtype F32 -> I32 (same size: a well-formed file of integers)": (edit(entry(f32, dtype="I32")),
                                                                         "not floating point"),
        "shape missing": (edit(lambda h: h[first].pop("shape")), "not a list of sizes"),
        "shape negative": (edit(shape_of(first, [-1, 4])), "not a list of sizes"),
        "shape with a float": (edit(shape_of(first, [2.5])), "not a list of sizes"),
        "shape with a bool": (edit(shape_of(first, [True])), "not a list of sizes"),
        "shape a string": (edit(shape_of(first, "[2, 2]")), "not a list of sizes"),
        "shape with NaN": (build(json.dumps(header).encode().replace(
            json.dumps(header[first]["shape"]).encode(), b"[NaN]", 1), data), "not a list of sizes"),
        "shape dimension 2**64": (edit(shape_of(first, [2**64])), "not a list of sizes"),
        "shape of huge numel": (edit(shape_of(first, [2**62, 2**62, 2**62])), "needs"),
        "shape of 200000 huge dimensions": (edit(shape_of(first, [2**62] * 200000)), "needs"),
        "shape with a zero among huge dimensions": (edit(shape_of(first, [0] + [2**62] * 10)), "needs 0 bytes"),
        "shape product does not match the bytes": (edit(shape_of(first, header[first]["shape"] + [2])), "needs"),
        "offsets missing": (edit(lambda h: h[first].pop("data_offsets")), "not \\[begin, end\\]"),
        "offsets negative": (edit(entry(first, data_offsets=[-4, 0])), "not \\[begin, end\\]"),
        "offsets reversed": (edit(entry(second, data_offsets=header[second]["data_offsets"][::-1])),
                             "not \\[begin, end\\]"),
        "offsets of three numbers": (edit(entry(first, data_offsets=[0, 4, 8])), "not \\[begin, end\\]"),
        "offsets as floats": (edit(entry(first, data_offsets=[0.0, 4.0])), "not \\[begin, end\\]"),
        "offsets past the data": (edit(entry(last, data_offsets=[len(data), len(data) + 4], shape=[1], dtype="F32")),
                                  "cut short"),
        "offsets far past the data (2**62)": (edit(entry(last, data_offsets=[2**62, 2**62 + 4], shape=[1],
                                                         dtype="F32")), "cut short"),
        "two tensors on the same bytes": (two_tensors({"c": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}),
                                          "overlaps"),
        "overlapping ranges": (two_tensors({"c": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}), "overlaps"),
        "a gap between tensors": (build({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                                         "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}, bytes(12)),
                                  "belong to no tensor"),
        "bytes after the last tensor": (blob + b"\0" * 16, "after the last tensor"),
        "data section empty, tensors declared": (build(header), "cut short"),
        "metadata not str -> str": (edit(lambda h: h["__metadata__"].update({"modelspec.resolution": 64})),
                                    "__metadata__"),
        "metadata a list": (edit(lambda h: h.__setitem__("__metadata__", ["a"])), "__metadata__"),
        "a key named twice": (build(json.dumps(header).encode()[:-1] + b', "' + first.encode() + b'": '
                                    + json.dumps(header[first]).encode() + b"}", data), "twice"),
        "a field named twice in an entry": (build(json.dumps(header).encode().replace(
            b'"dtype": "F32"', b'"dtype": "F32", "dtype": "F16"', 1), data), "twice"),
        "cut inside the 8-byte length": (blob[:5], "less than a header"),
        "cut inside the header": (blob[:8 + n // 2], "header claims"),
        "cut at the end of the header": (blob[:8 + n], "cut short"),
        "cut in the middle of the data": (blob[:len(blob) // 2], "cut short"),
        "cut one byte short": (blob[:-1], "cut short"),
        "zip (torch.save) renamed .safetensors": (zip_pickle(), "PyTorch pickle checkpoint \\(zip or raw pickle\\)"),
        "raw pickle renamed .safetensors": (evil + bytes(64), "PyTorch pickle checkpoint \\(zip or raw pickle\\)"),
        # Not format errors: these must load.
        "NaN in the tensor data": (blob[:8 + n] + bytes(nan), None),
        "header padded with spaces (as the reference writes it)": (build(json.dumps(header).encode() + b"   ", data),
                                                                   None),
        "unknown extra field in an entry (the reference ignores it)": (edit(entry(first, note="x")), None),
        "modelspec.resolution of 5000 digits (falls back to 1024)": (
            edit(lambda h: h["__metadata__"].update({"modelspec.resolution": "9" * 5000 + "x64"})), None),
        "two same-size tensors with swapped bytes": (edit(lambda h: swap_offsets(h)), None),
    }


class Evil:
    """Unpickling this creates a marker file: proof that a pickle was (or was not) run."""
    marker: Path = Path("/nonexistent")

    def __reduce__(self):
        return open, (str(Evil.marker), "w")


def zip_pickle() -> bytes:
    import io
    buf = io.BytesIO()
    torch.save({"state_dict": {"w": torch.zeros(2)}, "evil": Evil()}, buf)
    return buf.getvalue()


def swap_offsets(h: dict) -> None:
    sizes = collections.defaultdict(list)
    for k in by_offset(h):
        sizes[(h[k]["dtype"], tuple(h[k]["shape"]))].append(k)
    a, b = next(v for v in sizes.values() if len(v) >= 2)[:2]
    h[a]["data_offsets"], h[b]["data_offsets"] = h[b]["data_offsets"], h[a]["data_offsets"]


def test_named_corruptions(small, tmp_path):
    _, _, blob = small
    Evil.marker = tmp_path / "UNPICKLED"
    cases = named_corruptions(blob)
    assert len(cases) >= 50
    counts, lines = collections.Counter(), []
    for i, (name, (data, expect)) in enumerate(cases.items()):
        path = tmp_path / f"case{i}.safetensors"
        path.write_bytes(data)
        try:
            with deadline(30):
                inspect_checkpoint(path)
                load_components(path, CPU, FP32)
        except CheckpointError as e:
            msg = str(e)
            assert expect is not None, f"{name}: must load, got {msg}"
            assert re.search(expect, msg), f"{name}: {msg}"
            assert msg.startswith(str(path)) and "\n" not in msg, f"{name}: {msg}"
            result = next((n for frag, n in CATEGORIES if frag in msg), "other")
            lines.append(f"  {name}: {msg[len(str(path)) + 2:][:110]}")
        except Exception as e:
            pytest.fail(f"{name}: {type(e).__name__}: {e}")
        else:
            assert expect is None, f"{name}: loaded, but must fail with {expect!r}"
            result = "loaded"
            lines.append(f"  {name}: loaded")
        counts[result] += 1
        path.unlink()
    assert not Evil.marker.exists(), "a pickle was unpickled"
    print("\n" + "\n".join(lines))
    report("named corruptions", counts)


# ---------------------------------------------------------------------------------------------------------
# The random corpus: a seeded mix of byte flips, truncations and header edits of the valid file.

def mutants(blob: bytes, rng: random.Random):
    """Yields (kind, bytes, touches the header)."""
    n = int.from_bytes(blob[:8], "little")
    header, data = split(blob)
    names = by_offset(header)
    for _ in range(200):  # one byte of the length or header replaced
        i = rng.randrange(8 + n)
        b = bytearray(blob[:8 + n])
        b[i] = rng.choice([x for x in range(256) if x != b[i]])
        yield "header byte flip", bytes(b) + data, True
    for _ in range(50):  # a digit of the header changed: offsets, shapes, key indices, the resolution
        text = bytearray(blob[8:8 + n])
        i = rng.choice([j for j in range(len(text)) if 48 <= text[j] <= 57])
        text[i] = rng.choice([d for d in b"0123456789" if d != text[i]])
        yield "header digit edit", blob[:8] + bytes(text) + data, True
    for _ in range(25):  # a header byte deleted or inserted, the length left as it was
        i = rng.randrange(8, 8 + n)
        yield "header byte deleted", blob[:i] + blob[i + 1:], True
        yield "header byte inserted", blob[:i] + bytes([rng.randrange(256)]) + blob[i:], True
    edits = [
        ("shape dimensions permuted", lambda h, k: h[k].update(shape=h[k]["shape"][::-1])),
        ("dtype swapped for one of the same size",
         lambda h, k: h[k].update(dtype={"F32": "I32", "F16": "BF16", "I64": "F64"}.get(h[k]["dtype"], "U8"))),
        ("key renamed", lambda h, k: h.__setitem__(k.replace(".", "_", 1), h.pop(k))),
        ("key deleted", lambda h, k: h.pop(k)),
    ]
    matrices = [k for k in names if len(set(header[k]["shape"])) > 1]  # reversing their shape changes it
    for _ in range(15):  # well-formed headers that describe something else
        for kind, change in edits:
            h = json.loads(json.dumps(header))
            change(h, rng.choice(matrices if kind.startswith("shape") else names))
            yield kind, build(h, data), True
    for _ in range(100):  # cut anywhere
        yield "truncated", blob[:rng.randrange(len(blob))], True
    for _ in range(60):  # one byte flipped anywhere; almost always in the tensor data
        b = bytearray(blob)
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
        yield "byte flip anywhere", bytes(b), i < 8 + n


def test_random_corpus(small, tmp_path):
    _, _, blob = small
    rng = random.Random(20231116)
    counts, by_kind = collections.Counter(), collections.defaultdict(collections.Counter)
    path = tmp_path / "mutant.safetensors"
    full_loads = 0
    for kind, data, touches_header in mutants(blob, rng):
        path.write_bytes(data)
        # the header-level path (validation, family, inferred architecture) for every file; the full load
        # (key and shape check, meta model, reading every tensor) for every file that passes it and whose
        # header changed, and for a sample of the data-only flips
        full = touches_header or by_kind[kind]["loaded"] < 10
        try:
            result = outcome(path, full=False)
            if result == "loaded" and full:
                full_loads += 1
                result = outcome(path, full=True)
        except Exception as e:
            pytest.fail(f"{kind}: {type(e).__name__}: {e}")
        counts[result] += 1
        by_kind[kind][result] += 1
    report(f"random corpus ({full_loads} fully loaded)", counts)
    for kind, c in by_kind.items():
        print(f"  {kind}: " + ", ".join(f"{v} {k}" for k, v in c.most_common()))
    assert sum(counts.values()) >= 500
    assert by_kind["truncated"]["loaded"] == 0  # every cut short file is refused
    assert by_kind["byte flip anywhere"]["loaded"] > 0  # flips in the data are weights, not format errors


# ---------------------------------------------------------------------------------------------------------
# Reading tensor data, files that are not regular, no unpickling anywhere.

def test_a_file_cut_short_while_loading_is_an_error_not_a_crash(small, tmp_path):
    """safetensors.safe_open memory-maps; a mapped file that shrinks kills the process with SIGBUS. Run in a
    child process, so that a regression crashes the child, not the test session."""
    _, _, blob = small
    path = tmp_path / "shrinks.safetensors"
    path.write_bytes(blob)
    code = textwrap.dedent(f"""
        import os
        from minifusion.checkpoint import CheckpointError, TensorSource
        src = TensorSource([__import__("pathlib").Path({str(path)!r})])
        last = max(src.keys(), key=lambda k: src.handles[src.where[k]].entries[k].end)
        os.truncate({str(path)!r}, {len(blob) // 2})
        try:
            src.get(last)
        except CheckpointError as e:
            print("REFUSED", e)
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"child died with {run.returncode}: {run.stderr[-500:]}"
    assert "REFUSED" in run.stdout and "cut short or changed while loading" in run.stdout, run.stdout


def test_read_errors_become_checkpoint_errors(small):
    """A disk that fails under a validated file (EIO): the read error names the file and tensor."""
    _, path, _ = small
    src = TensorSource([path])
    key = next(iter(src.keys()))

    class FailingDisk:
        def seek(self, n):
            pass

        def readinto(self, buf):
            raise OSError(5, "Input/output error")

        def close(self):
            pass

    src.handles[path].close()
    src.handles[path]._f = FailingDisk()
    with pytest.raises(CheckpointError, match="reading tensor .* failed \\(Input/output error\\)"):
        src.get(key)


def test_fifos_devices_and_symlinks(small, tmp_path):
    _, path, _ = small
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with deadline(10):
        with pytest.raises(CheckpointError, match="neither a file nor a folder"):
            load(fifo, device="cpu")
        with pytest.raises(CheckpointError, match="not a regular file"):
            SafetensorsFile(fifo)
        link = tmp_path / "link_to_pipe.safetensors"
        link.symlink_to(fifo)
        with pytest.raises(CheckpointError, match="neither a file nor a folder"):
            load(link, device="cpu")
        with pytest.raises(CheckpointError, match="not a regular file"):
            SafetensorsFile(Path("/dev/zero"))
    # a symlink to a real file is followed: it is how the Hugging Face cache stores every file
    linked = tmp_path / "linked.safetensors"
    linked.symlink_to(path)
    assert inspect_checkpoint(linked) == SMALL
    (tmp_path / "dangling.safetensors").symlink_to(tmp_path / "gone")
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load(tmp_path / "dangling.safetensors", device="cpu")


def test_nothing_is_ever_unpickled(small_folder, tmp_path):
    """Pickle payloads under every name, loose and in a folder: refused, and the payload never runs."""
    Evil.marker = tmp_path / "UNPICKLED"
    raw = pickle.dumps({"state_dict": {"w": Evil()}}, protocol=2)
    for name, payload in [("a.ckpt", raw), ("a.pt", zip_pickle()), ("a.pth", raw), ("a.bin", zip_pickle()),
                          ("a.CKPT", raw), ("raw.safetensors", raw + bytes(16)),
                          ("zip.safetensors", zip_pickle())]:
        d = tmp_path / name.replace(".", "_")
        d.mkdir()
        (d / name).write_bytes(payload)
        for target in (d / name, d):
            with pytest.raises(CheckpointError, match="pickle"):
                load(target, device="cpu")
    folder = copy_folder(small_folder, tmp_path)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(zip_pickle())
    with pytest.raises(CheckpointError, match="only pickle weights"):
        load(folder, device="cpu")
    assert not Evil.marker.exists()
    # and no code path could: the package neither imports an unpickler nor calls a loader that unpickles
    for source in PACKAGE.rglob("*.py"):
        assert not list(unpickling(source.read_text())), source


def unpickling(source: str):
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            if {n.split(".")[0] for n in names} & {"pickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve",
                                                   "marshal"}:
                yield ast.unparse(node)
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            if name in ("torch.load", "torch.jit.load", "np.load", "numpy.load", "Unpickler") or \
                    name.endswith((".Unpickler", "pickle.load", "pickle.loads")):
                yield name


def test_the_conversion_command_in_the_pickle_message_works(small, tmp_path):
    models, path, _ = small
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(path), "global_step": 1}, ckpt)
    with pytest.raises(CheckpointError) as e:
        load(ckpt, device="cpu")
    command = re.search(r'python -c "(.*)"$', str(e.value)).group(1)
    subprocess.run([sys.executable, "-c", command], check=True, timeout=120)
    # no modelspec header in the converted file: SDXL's native 1024 px is assumed
    assert inspect_checkpoint(tmp_path / "model.safetensors") == dataclasses.replace(
        SMALL, unet=dataclasses.replace(SMALL.unet, sample_size=128))


# ---------------------------------------------------------------------------------------------------------
# Diffusers folders: index files cannot point outside, configs cannot ask for a billion layers.

@pytest.mark.parametrize("shard", ["../../etc/passwd", "/etc/passwd", "../outside.safetensors", "sub/x.safetensors",
                                   "..", "..\\x.safetensors", "x.bin", ""])
def test_index_shards_must_be_files_beside_the_index(small_folder, tmp_path, shard):
    folder = copy_folder(small_folder, tmp_path)
    save_file({"w": torch.zeros(1)}, str(tmp_path / "outside.safetensors"))  # exists: must still be refused
    unet = folder / "unet"
    tensors = load_file(unet / "diffusion_pytorch_model.safetensors")
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    save_file(tensors, str(unet / "part.safetensors"))
    weight_map = dict.fromkeys(tensors, "part.safetensors")
    weight_map[next(iter(tensors))] = shard
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="is not a .safetensors file name in the index's own folder"):
        load(folder, device="cpu")


@pytest.mark.parametrize("index", [[], {"weight_map": []}, {"weight_map": {"a": ["x"]}}, {"weight_map": {}},
                                   {"weight_map": {"a": 3}}, "[[[[", {"weight_map": {"a": "x.safetensors"}}])
def test_malformed_index_files(small_folder, tmp_path, index):
    folder = copy_folder(small_folder, tmp_path)
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "vae" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        index if isinstance(index, str) else json.dumps(index))
    with pytest.raises(CheckpointError, match="index"):
        load(folder, device="cpu")


def test_shards_that_both_hold_a_tensor(small_folder, tmp_path):
    folder = copy_folder(small_folder, tmp_path)
    vae = folder / "vae"
    tensors = load_file(vae / "diffusion_pytorch_model.safetensors")
    (vae / "diffusion_pytorch_model.safetensors").unlink()
    save_file(tensors, str(vae / "a.safetensors"))
    save_file({"decoder.conv_out.bias": torch.zeros(3)}, str(vae / "b.safetensors"))
    weight_map = dict.fromkeys(tensors, "a.safetensors") | {"decoder.conv_out.bias": "b.safetensors"}
    (vae / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="decoder.conv_out.bias' is also in .*a.safetensors"):
        load(folder, device="cpu")


def test_symlinked_shards_load_as_in_the_hugging_face_cache(small, tmp_path):
    models, _, _ = small
    folder = write_diffusers(models, SMALL, tmp_path / "snapshot")
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2"):
        for f in list((folder / sub).glob("*.safetensors")):
            f.rename(blobs / f"{sub}-{f.name}")
            f.symlink_to(blobs / f"{sub}-{f.name}")
    loaded, cfgs, _ = load_components(folder, CPU, FP32)
    assert cfgs == SMALL
    assert torch.equal(loaded["vae"].state_dict()["decoder.conv_out.weight"],
                       models["vae"].state_dict()["decoder.conv_out.weight"])


@pytest.mark.parametrize("sub,change,expect", [
    ("text_encoder", {"num_hidden_layers": 10**9}, "not a plausible"),
    ("text_encoder", {"num_hidden_layers": 10**400}, "not a plausible"),
    ("text_encoder", {"hidden_size": "wide"}, "not a plausible"),
    ("text_encoder", {"hidden_act": "mystery"}, "cannot be built"),
    ("text_encoder_2", {"layer_norm_eps": float("nan")}, "not a plausible"),
    ("unet", {"layers_per_block": 10**6}, "not a plausible"),
    ("unet", {"block_out_channels": []}, "not an SDXL unet config"),
    ("unet", {"block_out_channels": [64] * 1000, "down_block_types": ["CrossAttnDownBlock2D"] * 1000,
              "attention_head_dim": [1] * 1000, "transformer_layers_per_block": [1] * 1000}, "not a plausible"),
    ("unet", {"attention_head_dim": 0}, "not an SDXL unet config"),
    ("unet", {"norm_num_groups": 7}, "cannot be built"),
    ("unet", {"sample_size": -8}, "not a plausible"),
    ("unet", {"in_channels": 9}, "inpainting"),
    ("vae", {"scaling_factor": "0.13"}, "not a plausible"),
    ("vae", {"block_out_channels": "abc"}, "not an SDXL vae config|not a plausible"),
])
def test_hostile_config_json(small_folder, tmp_path, sub, change, expect):
    folder = copy_folder(small_folder, tmp_path)
    f = folder / sub / "config.json"
    f.write_text(json.dumps(json.loads(f.read_text()) | change))
    start = time.monotonic()
    with deadline(20), pytest.raises(CheckpointError, match=expect):
        load(folder, device="cpu")
    assert time.monotonic() - start < 10


def test_config_json_that_is_not_an_object_or_too_deep(small_folder, tmp_path):
    folder = copy_folder(small_folder, tmp_path)
    for text, expect in ((b"[1, 2]", "not a JSON object"), (b"[" * 100000, "not valid JSON"),
                         (b'{"a": "\xff"}', "not valid JSON")):
        (folder / "vae" / "config.json").write_bytes(text)
        with pytest.raises(CheckpointError, match=expect):
            load(folder, device="cpu")


@pytest.mark.parametrize("key", ["model.diffusion_model.input_blocks.999999999.0.weight",
                                 "model.diffusion_model.input_blocks.1.1.transformer_blocks.99999.norm1.weight",
                                 "conditioner.embedders.1.model.transformer.resblocks.4000.ln_1.weight",
                                 "first_stage_model.encoder.down.0.block.9" + "9" * 5000 + ".conv1.weight"])
def test_forged_block_indices_are_refused_quickly(small, tmp_path, key):
    """The architecture is counted from key indices: a forged index must not build a billion-layer model."""
    tensors = load_file(small[1])
    tensors[key] = torch.zeros(1)
    path = tmp_path / "forged.safetensors"
    save_file(tensors, str(path))
    start = time.monotonic()
    with deadline(20), pytest.raises(CheckpointError, match="not an SDXL checkpoint|not a plausible"):
        load(path, device="cpu")
    assert time.monotonic() - start < 10


def test_reduced_precision_files_load(small, tmp_path):
    models, path, _ = small
    tensors = load_file(path)
    for dtype in (torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        out = tmp_path / f"{str(dtype)[6:]}.safetensors"
        save_file({k: v.to(dtype) for k, v in tensors.items()}, str(out),
                  metadata={"modelspec.resolution": "64x64"})
        loaded, _, _ = load_components(out, CPU, FP32)
        w = models["unet"].state_dict()["out.2.weight"]
        assert torch.equal(loaded["unet"].state_dict()["out.2.weight"], w.to(dtype).float()), dtype


# ---------------------------------------------------------------------------------------------------------
# Other families, from realistic subsets of their real key names.

FAMILY_KEYS = {
    "SD 1.5 (v1-5-pruned)": ("Stable Diffusion 1.x", [
        "model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.input_blocks.1.1.proj_in.weight",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight", "model.diffusion_model.time_embed.0.weight",
        "model.diffusion_model.out.2.weight", "first_stage_model.decoder.conv_in.weight",
        "first_stage_model.encoder.down.0.block.0.conv1.weight", "first_stage_model.quant_conv.weight",
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight", "model_ema.decay"]),
    "SD 1.x, pre-text_model naming": ("Stable Diffusion 1.x", [
        "model.diffusion_model.input_blocks.0.0.weight",
        "cond_stage_model.transformer.encoder.layers.0.self_attn.k_proj.weight",
        "cond_stage_model.transformer.embeddings.position_ids"]),
    "SD 2.1 (v2-1_768-ema-pruned)": ("Stable Diffusion 2.x", [
        "model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.input_blocks.1.1.proj_in.weight",
        "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight",
        "first_stage_model.post_quant_conv.weight",
        "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
        "cond_stage_model.model.transformer.resblocks.22.mlp.c_proj.bias",
        "cond_stage_model.model.token_embedding.weight", "cond_stage_model.model.positional_embedding",
        "cond_stage_model.model.ln_final.weight", "cond_stage_model.model.text_projection",
        "cond_stage_model.model.logit_scale"]),
    "SDXL refiner (sd_xl_refiner_1.0)": ("SDXL refiner", [
        "model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.label_emb.0.0.weight",
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
        "first_stage_model.decoder.conv_out.weight",
        "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias",
        "conditioner.embedders.0.model.transformer.resblocks.31.attn.in_proj_weight",
        "conditioner.embedders.0.model.token_embedding.weight", "conditioner.embedders.0.model.positional_embedding",
        "conditioner.embedders.0.model.ln_final.weight", "conditioner.embedders.0.model.text_projection",
        "conditioner.embedders.0.model.logit_scale"]),
    "SD3 medium (sd3_medium_incl_clips_t5xxlfp8)": ("Stable Diffusion 3", [
        "model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias",
        "model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight",
        "model.diffusion_model.joint_blocks.23.x_block.mlp.fc1.weight", "model.diffusion_model.x_embedder.proj.weight",
        "model.diffusion_model.pos_embed", "model.diffusion_model.context_embedder.weight",
        "model.diffusion_model.t_embedder.mlp.0.weight", "model.diffusion_model.y_embedder.mlp.0.weight",
        "model.diffusion_model.final_layer.linear.weight", "first_stage_model.decoder.conv_in.weight",
        "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight",
        "text_encoders.clip_g.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
        "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight"]),
    "SD3 transformer, diffusers layout": ("Stable Diffusion 3", [
        "transformer_blocks.0.attn.add_q_proj.weight", "transformer_blocks.0.attn.to_q.weight",
        "transformer_blocks.0.ff_context.net.0.proj.weight", "pos_embed.proj.weight", "context_embedder.weight",
        "time_text_embed.text_embedder.linear_1.weight", "norm_out.linear.weight", "proj_out.weight"]),
    "Flux dev (flux1-dev)": ("Flux", [
        "double_blocks.0.img_attn.norm.key_norm.scale", "double_blocks.0.img_attn.qkv.weight",
        "double_blocks.18.txt_mlp.0.weight", "single_blocks.0.linear1.weight", "single_blocks.37.modulation.lin.weight",
        "img_in.weight", "txt_in.weight", "time_in.in_layer.weight", "vector_in.in_layer.weight",
        "guidance_in.in_layer.weight", "final_layer.linear.weight"]),
    "Flux all-in-one (ComfyUI repack, with T5)": ("Flux", [
        "model.diffusion_model.double_blocks.0.img_attn.qkv.weight", "model.diffusion_model.img_in.weight",
        "vae.decoder.conv_in.weight", "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight",
        "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight"]),
    "Flux transformer, diffusers layout": ("Flux", [
        "transformer_blocks.0.attn.add_q_proj.weight", "single_transformer_blocks.0.attn.to_q.weight",
        "x_embedder.weight", "time_text_embed.timestep_embedder.linear_1.weight", "context_embedder.weight",
        "norm_out.linear.weight", "proj_out.weight"]),
    "kohya LoRA for SDXL": ("LoRA", [
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k.lora_down.weight",
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k.lora_up.weight",
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k.alpha",
        "lora_te1_text_model_encoder_layers_0_self_attn_k_proj.lora_down.weight",
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"]),
    "kohya LoRA for SD 1.5": ("LoRA", [
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight",
        "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"]),
    "LyCORIS LoHa": ("LoRA", [
        "lora_unet_output_blocks_2_1_transformer_blocks_0_ff_net_2.hada_w1_a",
        "lora_unet_output_blocks_2_1_transformer_blocks_0_ff_net_2.hada_w2_b"]),
    "diffusers / PEFT LoRA": ("LoRA", [
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.lora_A.weight",
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.lora_B.weight",
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight",
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"]),
    "older diffusers LoRA": ("LoRA", [
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_k_lora.down.weight",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight"]),
    "Flux LoRA (PEFT)": ("LoRA", [
        "transformer.single_transformer_blocks.0.attn.to_k.lora_A.weight",
        "transformer.single_transformer_blocks.0.attn.to_k.lora_B.weight"]),
    "Playground v2.5": ("Playground v2.5", [
        "model.diffusion_model.input_blocks.0.0.weight",
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
        "conditioner.embedders.1.model.ln_final.weight", "edm_mean", "edm_std"]),
    "SDXL VAE alone (sdxl_vae)": ("VAE on its own", [
        "encoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight", "decoder.up.3.block.2.conv2.weight",
        "quant_conv.weight", "post_quant_conv.weight", "decoder.conv_out.bias"]),
    "diffusers VAE alone": ("VAE on its own", [
        "encoder.down_blocks.0.resnets.0.conv1.weight", "decoder.mid_block.attentions.0.to_q.weight",
        "quant_conv.bias"]),
    "diffusers SDXL UNet file alone": ("UNet file of a diffusers-layout folder", [
        "conv_in.weight", "time_embedding.linear_1.weight", "add_embedding.linear_1.weight",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight", "mid_block.resnets.0.conv1.weight",
        "up_blocks.0.resnets.0.conv1.weight", "conv_norm_out.weight", "conv_out.weight"]),
    "LDM UNet alone": ("UNet on its own", [
        "model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.out.2.weight"]),
    "CLIP text encoder alone": ("text encoder on its own", [
        "text_model.embeddings.token_embedding.weight", "text_model.encoder.layers.0.self_attn.q_proj.weight",
        "text_model.final_layer_norm.weight", "text_projection.weight"]),
    "textual inversion for SDXL": ("textual-inversion embedding", ["clip_l", "clip_g"]),
    "textual inversion for SD 1.5": ("textual-inversion embedding", ["emb_params"]),
    "no tensors at all": ("empty safetensors file", []),
}


@pytest.mark.parametrize("what", FAMILY_KEYS)
def test_other_families_are_named(tmp_path, what):
    name, keys = FAMILY_KEYS[what]
    path = tmp_path / "other.safetensors"
    save_file({k: torch.zeros(2) for k in keys}, str(path))
    with pytest.raises(CheckpointError, match=re.escape(name)) as e:
        load(path, device="cpu")
    assert str(e.value).startswith(f"{path}: this is ")


def test_real_sdxl_keys_are_not_mistaken_for_another_family():
    if not KEYS_FILE.is_file():
        pytest.skip(f"{KEYS_FILE} not found (it lives in the project's shared/ folder)")
    keys = [line.split(" ")[0] for line in KEYS_FILE.read_text().splitlines()]
    assert len(keys) == 2515 and identify(keys, CHECKPOINTS) is None
    for part in ("model.diffusion_model.", "first_stage_model."):  # nor is any part of it mistaken for a family
        assert identify([k for k in keys if not k.startswith(part)], CHECKPOINTS) is None


def test_inpainting_unet_is_named(small, tmp_path):
    tensors = load_file(small[1])
    w = tensors["model.diffusion_model.input_blocks.0.0.weight"]
    tensors["model.diffusion_model.input_blocks.0.0.weight"] = torch.cat([w, w, w[:, :1]], dim=1)  # 9 channels
    path = tmp_path / "inpaint.safetensors"
    save_file(tensors, str(path), metadata={"modelspec.resolution": "64x64"})
    with pytest.raises(CheckpointError, match="takes 9 channels .* an inpainting or instruct-pix2pix model"):
        load(path, device="cpu")


@pytest.mark.parametrize("index,expect", [
    ({"_class_name": "StableDiffusionPipeline"}, "Stable Diffusion 1.x / 2.x folder"),
    ({"_class_name": "StableDiffusion3Pipeline"}, "Stable Diffusion 3 folder"),
    ({"_class_name": "FluxPipeline"}, "Flux folder"),
    ({"_class_name": "StableDiffusionXLImg2ImgPipeline", "requires_aesthetics_score": True,
      "text_encoder": [None, None]}, "SDXL refiner folder"),
    ({"_class_name": "KandinskyV22Pipeline"}, "'KandinskyV22Pipeline' folder"),
])
def test_other_family_folders_are_named(small_folder, tmp_path, index, expect):
    folder = copy_folder(small_folder, tmp_path)
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=re.escape(expect)):
        load(folder, device="cpu")
