"""The runs the golden test repeats: command lines on the tiny model covering every path through a generation
(text, a picture, resume, a memory budget, both samplers, LoRA + VAE + embedding + ControlNet with Canny).

`python tests/golden_cases.py DIR` ran them with the code of 2026-12-07 (before the request model, issue 18) and
wrote tests/golden/expected.json: per PNG its pixels' SHA-256 and its metadata, per latents file its tensor's
SHA-256 and a few numbers. tests/test_golden.py runs them again and compares.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

FAST = ["--dtype", "float32", "--device", "cpu"]


def cases(d: Path) -> dict[str, list[str]]:
    """name -> the command line's arguments, with every file under the folder d."""
    w, a = str(d / "tiny_sdxl.safetensors"), d / "adapters"
    return {
        "text": ["a red fox", "--weights", w, "--out", str(d / "text" / "fox.png"), "--height", "256",
                 "--width", "512", "--steps", "3", "--seed", "7", *FAST],
        "euler": ["(a lighthouse:1.3), [fog] BREAK at dawn", "--negative", "blurry, dark", "--weights", w,
                  "--out", str(d / "euler" / "house.png"), "--height", "768", "--width", "256", "--steps", "2",
                  "--seed", "123456789012", "--scheduler", "euler", "--guidance", "5", "--stride", "12",
                  "--view-batch", "3", "--c1", "2", "--c2", "0.5", "--c3", "1.5", "--sigma", "1.2", *FAST],
        "plain": ["a cat", "--weights", w, "--out", str(d / "plain" / "cat.png"), "--height", "256", "--width",
                  "512", "--steps", "2", "--seed", "3", "--no-jitter", "--no-tiled-decode", *FAST],
        "image": ["an owl", "--weights", w, "--out", str(d / "image" / "owl.png"), "--image", str(a / "square.png"),
                  "--steps", "2", "--seed", "5", *FAST],
        "budget": ["a boat", "--weights", w, "--out", str(d / "budget" / "boat.png"), "--height", "512", "--width",
                   "256", "--steps", "2", "--seed", "11", "--max-memory", "300MiB", *FAST],
        "adapters": ["a tree, myword", "--weights", w, "--out", str(d / "adapters_run" / "tree.png"), "--height",
                     "512", "--width", "256", "--steps", "2", "--seed", "9", "--lora", f"{a / 'style.safetensors'}:0.7",
                     "--vae", str(a / "vae.safetensors"), "--embedding", str(a / "myword.safetensors"),
                     "--controlnet", str(a / "controlnet"), "--control-image", str(a / "square.png"), "--canny",
                     "--control-scale", "0.8", "--control-start", "0.1", "--control-end", "0.9", *FAST],
    }


RESUME = "resume"  # continues "text" from its scale 1 to 768x384 (3 scales), at 2 steps instead of 3


def resume_case(d: Path) -> list[str]:
    return ["--resume", str(d / "text" / "fox.x1.latent.safetensors"), "--out", str(d / RESUME / "fox.png"),
            "--height", "384", "--width", "768", "--steps", "2", *FAST]


def prepare(d: Path) -> None:
    """The tiny checkpoint and the adapters (tests/helpers.write_adapters), and a folder per case."""
    from helpers import write_adapters
    from minifusion.tiny import TINY, random_models, write_single_file
    write_single_file(random_models(TINY, seed=0), TINY, d / "tiny_sdxl.safetensors")
    a = d / "adapters"
    a.mkdir()
    write_adapters(a / "style.safetensors", a / "vae.safetensors", a / "myword.safetensors", a / "controlnet",
                   a / "square.png")
    for name in (*cases(d), RESUME):
        (d / name).mkdir(exist_ok=True)
    (d / "adapters_run").mkdir(exist_ok=True)


def file_hashes(d: Path) -> dict[str, str]:
    """SHA-256 of every file under d, by its path relative to d: the metadata names them by A1111's short hashes,
    and a checkpoint's header (safetensors keeps its metadata in a hash map) is not byte-stable between writes."""
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*.safetensors")) if "latent" not in p.name}


def plain(value, d: Path, hashes: dict[str, str]):
    """The metadata with the run's folder written as $DIR and the files' hashes as $SHA(name), so runs in two
    folders compare."""
    if isinstance(value, str):
        for name, digest in hashes.items():
            value = value.replace(digest[:12], f"$SHA({name})").replace(digest[:10], f"$SHA({name})")
        return value.replace(str(d), "$DIR")
    if isinstance(value, list):
        return [plain(v, d, hashes) for v in value]
    if isinstance(value, dict):
        return {k: plain(v, d, hashes) for k, v in value.items()}
    return value


def pooled(pixels: np.ndarray) -> list:
    """The picture's 8 x 8 block means per channel: what a real change moves, beyond float rounding."""
    h, w, c = pixels.shape
    x = pixels[: h // 8 * 8, : w // 8 * 8].astype(np.float64).reshape(8, h // 8, 8, w // 8, c)
    return x.mean(axis=(1, 3)).round(3).tolist()


def record(d: Path, folder: Path, latents: dict) -> dict:
    """What the run wrote into `folder`: PNG pixels and text; its latents go into `latents` by case/file."""
    from minifusion.files import load_latents
    hashes = file_hashes(d)
    out = {}
    for png in sorted(folder.glob("*.png")):
        if png.name.endswith((".input.png", ".control.png")):
            continue
        with Image.open(png) as im:
            pixels = np.asarray(im.convert("RGB"))
            text = dict(im.text)
        saved = load_latents(png.with_name(png.stem + ".latent.safetensors"))
        z = saved.latents.contiguous()
        latents[f"{folder.name}/{png.name}"] = z
        out[png.name] = {
            "size": [int(pixels.shape[1]), int(pixels.shape[0])],
            "pixels_sha256": hashlib.sha256(pixels.tobytes()).hexdigest(),
            "pixels_pooled": pooled(pixels),
            "parameters": plain(text.get("parameters"), d, hashes),
            "minifusion": plain(json.loads(text["minifusion"]), d, hashes),
            "latents_sha256": hashlib.sha256(z.numpy().tobytes()).hexdigest(),
            "anchor": [saved.anchor_mean, saved.anchor_std],
        }
    return out


def run_all(d: Path) -> tuple[dict, dict]:
    """Every case run in d: (what each wrote, by case and file; their latents, by "folder/file")."""
    from minifusion.__main__ import main
    prepare(d)
    results, latents = {}, {}
    for name, args in [*cases(d).items(), (RESUME, resume_case(d))]:
        code = main(args)
        assert code == 0, (name, code)
        results[name] = record(d, Path(args[args.index("--out") + 1]).parent, latents)
    return results, latents


if __name__ == "__main__":
    from safetensors.torch import save_file
    torch.set_num_threads(1)
    target = Path(sys.argv[1])
    target.mkdir(parents=True, exist_ok=False)
    expected, latents = run_all(target)
    (HERE / "golden" / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    save_file(latents, str(HERE / "golden" / "latents.safetensors"))
