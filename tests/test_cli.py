"""The command line, end to end on the tiny model: files, metadata, reproducibility and every user error."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import load_file, save_file

from minifusion import __main__ as cli
from minifusion import __version__, command, request
from minifusion.files import latent_path, load_latents
from minifusion.metadata import parse_a1111
from minifusion.pipeline import Pipeline

FAST = ["--steps", "2", "--dtype", "float32", "--device", "cpu", "--seed", "0"]
SMALL = ["--height", "512", "--width", "256"]  # 2 scales at half the pixels, where the size does not matter


def run(capsys, *args):
    code = cli.main([str(a) for a in args])
    return code, capsys.readouterr().err


def settings_of(png: Path) -> dict:
    with Image.open(png) as im:
        return json.loads(im.text["minifusion"])


@pytest.fixture(scope="module")
def three_scales(tiny_file, tmp_path_factory):
    """One 3-scale non-square run: 512x768 on the 256 px base."""
    out = tmp_path_factory.mktemp("run") / "fox.png"
    code = cli.main(["a red fox", "--weights", str(tiny_file), "--out", str(out), "--height", "768",
                     "--width", "512", *FAST, "--seed", "7", "--negative", "blurry, dark"])
    return code, out


def test_three_scale_run_writes_every_scale_with_metadata(three_scales, tiny_file):
    code, out = three_scales
    assert code == 0
    files = [out.with_name("fox.x1.png"), out.with_name("fox.x2.png"), out]
    # sizes by the spec: phase 1 at (768 // 3, 512 // 3) px -> 32x21 latents -> 256x168 px; scale 2 at
    # 512 px on the long side and int(512 * 2/3) = 341 px -> 42 latents; scale 3 at 768 x 512
    assert [Image.open(f).size for f in files] == [(168, 256), (336, 512), (512, 768)]
    for scale, f in enumerate(files, start=1):
        meta = settings_of(f)
        assert meta["scale"] == scale and meta["scales"] == 3
        assert meta["settings"]["prompt"] == "a red fox"
        assert meta["settings"]["seed"] == 7 and meta["settings"]["steps"] == 2
        # the run's final size in the settings, the image's own beside it
        assert meta["settings"]["stride"] == 16 and (meta["settings"]["height"], meta["settings"]["width"]) == (768, 512)
        assert tuple(meta["size"]) == Image.open(f).size
        assert meta["settings"]["weights"] == str(tiny_file)
        assert "stats" not in meta and "seconds" not in f.read_bytes().decode("latin-1")
        # timings live in the latents file instead
        assert load_latents(latent_path(f)).stats["unet_evaluations"] > 0
    assert not list(out.parent.glob(".*.tmp"))


def test_automatic1111_parameters_parse_back(three_scales, tiny_file):
    _, out = three_scales
    text = Image.open(out.with_name("fox.x2.png")).text["parameters"]
    lines = text.split("\n")
    assert lines[0] == "a red fox" and lines[1] == "Negative prompt: blurry, dark"
    params = parse_a1111(text)
    assert params["prompt"] == "a red fox" and params["negative"] == "blurry, dark"
    assert (params["Steps"], params["Sampler"], params["CFG scale"], params["Seed"]) == ("2", "DDIM", "7.5", "7")
    assert params["Size"] == "336x512"  # the image's own size; the run's final one apart
    assert params["DemoFusion final size"] == "512x768" and params["DemoFusion scale"] == "2/3"
    assert params["Model"] == "tiny_sdxl"
    assert params["Model hash"] == hashlib.sha256(tiny_file.read_bytes()).hexdigest()[:10]
    assert (params["DemoFusion stride"], params["DemoFusion c1"], params["DemoFusion sigma"]) == ("16", "3", "0.8")
    # a value with a comma is quoted as A1111 does, and comes back whole
    assert parse_a1111('p\nSteps: 2, Sampler: DDIM, Lora hashes: "a: 1, b: 2"')["Lora hashes"] == "a: 1, b: 2"


def test_the_same_seed_gives_byte_identical_pngs(three_scales, tiny_file, tmp_path, capsys):
    _, out = three_scales
    again = tmp_path / "fox.png"
    code, err = run(capsys, "a red fox", "--weights", tiny_file, "--out", again, "--height", "768", "--width", "512",
                    *FAST, "--seed", "7", "--negative", "blurry, dark")
    assert code == 0, err
    for name in ("fox.x1.png", "fox.x2.png", "fox.png"):
        assert (tmp_path / name).read_bytes() == out.with_name(name).read_bytes()


def test_settings_from_a_png_reproduce_it(three_scales, tiny_file, tmp_path, capsys):
    _, out = three_scales
    again = tmp_path / "again.png"
    # the weights come back from the PNG too
    code, err = run(capsys, "--settings-from", out, "--out", again, "--device", "cpu", "--dtype", "float32")
    assert code == 0, err
    assert settings_of(again)["settings"] == settings_of(out)["settings"]
    assert list(Image.open(again).getdata()) == list(Image.open(out).getdata())


def test_existing_files_are_not_overwritten(three_scales, tiny_file, capsys):
    _, out = three_scales
    before = out.read_bytes()
    code, err = run(capsys, "a cat", "--weights", tiny_file, "--out", out, "--height", "768", "--width", "512", *FAST)
    assert code == 2 and "exists; pass --overwrite" in err and "Traceback" not in err
    assert out.read_bytes() == before


def test_no_weights_says_what_to_download(tmp_path, capsys):
    code, err = run(capsys, "a cat", "--weights", tmp_path, "--out", tmp_path / "x.png")
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "sd_xl_base_1.0.safetensors" in err and "weights/README.md" in err


@pytest.mark.parametrize("args,message", [
    (["--height", "500"], "--height 500 is not a multiple of 8; pick e.g. 496"),
    (["--height", "128", "--width", "128"], "below this model's base size"),
    (["--height", "1024", "--width", "32"], "too narrow"),
    (["--steps", "0"], "--steps 0 is invalid; it must be an integer from 1 to 1000"),
    (["--guidance", "nan"], "--guidance nan is invalid"),
    (["--stride", "64"], "--stride 64 is invalid; it must be an integer from 1 to the window size, 32"),
    (["--view-batch", "0"], "--view-batch 0 is invalid"),
    (["--view-batch", "100000"], "--view-batch 100000 is invalid; it must be an integer from 1 to 65536"),
    (["--height", "0", "--width", "256"], "--height 0 is invalid; it must be a positive multiple of 8"),
    (["--width", "0"], "--width 0 is invalid"),
    (["--width", "-256"], "--width -256 is invalid"),
    (["--stride", "0"], "--stride 0 is invalid"),
    (["--seed", str(2 ** 64)], f"--seed {2 ** 64} is invalid; it must be a whole number from 0 to {2 ** 64 - 1}, or -1"),
    (["--seed", "-2"], "--seed -2 is invalid; it must be a whole number"),
    (["--device", "tpu"], "--device tpu: not a device name; use cuda, cuda:N, mps or cpu"),
    (["--device", "xpu"], "--device xpu: minifusion runs on cuda, mps or cpu, not xpu"),
    (["--count", "0"], "--count 0 is invalid; it must be an integer from 1 to 100000"),
    (["--c1", "-1"], "--c1 -1.0 is invalid"),
    (["--sigma", "0"], "--sigma 0.0 is invalid"),
    (["--sigma", "inf"], "--sigma inf is invalid"),
])
def test_bad_requests_are_refused_before_loading(tiny_file, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setattr(command, "load", lambda *a, **k: pytest.fail("loaded the model for a bad request"))
    code, err = run(capsys, "a cat", "--weights", tiny_file, "--out", tmp_path / "x.png", *args)
    assert code == 2 and message in err and err.count("\n") == 1 and err.startswith("error: "), err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("device,message", [
    ("cuda", "--device cuda: "), ("cuda:7", "--device cuda:7: "), ("mps", "--device mps: MPS is not available")])
def test_devices_this_machine_lacks_are_one_line(tiny_file, tmp_path, capsys, monkeypatch, device, message):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setattr(command, "load", lambda *a, **k: pytest.fail("loaded the model for a bad device"))
    code, err = run(capsys, "a cat", "--weights", tiny_file, "--out", tmp_path / "x.png", "--device", device)
    assert code == 2 and err.startswith("error: " + message) and err.count("\n") == 1, err
    assert "use --device cpu" in err


def test_files_of_the_wrong_kind_say_what_they_are(three_scales, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(command, "load", lambda *a, **k: pytest.fail("loaded a model from the wrong file"))
    _, out = three_scales
    png, text, latents = tmp_path / "model.safetensors", tmp_path / "notes.safetensors", latent_path(out)
    png.write_bytes(out.read_bytes())
    text.write_text("weights go here\n")
    cases = [(["--weights", png], "not a safetensors file: it is a PNG image; to rerun a PNG's settings use "
                                  "--settings-from"),
             (["--weights", text], "not a safetensors file: it is a text file"),
             (["--weights", latents], "a minifusion latents file (a finished scale of a run: continue it with "
                                      "--resume, not --weights)"),
             (["--resume", out], "not a safetensors file: it is a PNG image; to rerun a PNG's settings use "
                                 "--settings-from")]
    for args, message in cases:
        code, err = run(capsys, "a cat", *args, "--out", tmp_path / "x.png")
        assert code == 2 and message in err and err.count("\n") == 1 and "truncated" not in err, err


def test_ctrl_c_during_the_start_up_checks_is_one_line(tiny_file, tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(command, "inspect_checkpoint", interrupted)
    code, err = run(capsys, "a cat", "--weights", tiny_file, "--out", tmp_path / "x.png")
    assert code == 130 and err.strip() == "interrupted before anything was written"


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"minifusion {__version__}"


def test_bad_output_paths(tiny_file, tmp_path, capsys):
    code, err = run(capsys, "a cat", "--weights", tiny_file, "--out", tmp_path / "x.jpg")
    assert code == 2 and "use a name ending in .png" in err
    code, err = run(capsys, "a cat", "--weights", tiny_file, "--out", tmp_path / "nowhere" / "x.png")
    assert code == 2 and "does not exist" in err
    code, err = run(capsys, "--weights", tiny_file, "--out", tmp_path / "x.png")
    assert code == 2 and "no prompt given" in err


def test_interrupt_keeps_finished_scales(tiny_file, tmp_path, capsys, monkeypatch):
    decode = Pipeline.decode
    calls = []

    def decode_then_interrupt(self, latents, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return decode(self, latents, **kw)

    monkeypatch.setattr(Pipeline, "decode", decode_then_interrupt)
    out = tmp_path / "cut.png"
    code, err = run(capsys, "a cat", "--weights", tiny_file, "--out", out, "--height", "512", *FAST)
    assert code == 130 and f"kept {tmp_path / 'cut.x1.png'}" in err and "cut.x1.latent.safetensors" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.x1.latent.safetensors", "cut.x1.png"]
    Image.open(tmp_path / "cut.x1.png").verify()
    # the exact command that continues, printed, runs and finishes the same image
    command = err.split("continue with: ", 1)[1].splitlines()[0].split()
    assert command[:5] == ["minifusion", "--resume", str(tmp_path / "cut.x1.latent.safetensors"), "--out", str(out)]
    monkeypatch.setattr(Pipeline, "decode", decode)
    code, err = run(capsys, *command[1:])
    assert code == 0, err
    reference = tmp_path / "whole.png"
    assert run(capsys, "a cat", "--weights", tiny_file, "--out", reference, "--height", "512", *FAST)[0] == 0
    assert Image.open(out).tobytes() == Image.open(reference).tobytes()


def test_out_of_memory_names_the_knob(tiny_file, tmp_path, capsys, monkeypatch):
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")

    real_load = command.load

    def load_with_oom(*a, **k):
        pipe = real_load(*a, **k)
        pipe.unet.forward = oom
        return pipe

    monkeypatch.setattr(command, "load", load_with_oom)
    code, err = run(capsys, "a cat", "--weights", tiny_file, "--out", tmp_path / "x.png", *FAST)
    assert code == 2 and "out of memory even with one view" in err and "--view-batch 1" in err
    assert "kept nothing" in err and "Traceback" not in err


def test_module_entry_point_exit_status(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "minifusion", "a cat", "--weights", str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "no such file or folder" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_each_scale_saves_its_latents_and_resume_continues_the_same_run(three_scales, tiny_file, tmp_path, capsys):
    from minifusion.files import load_latents

    _, out = three_scales
    saved = load_latents(out.with_name("fox.x2.latent.safetensors"))
    assert saved.scale == 2 and saved.latents.shape == (1, 4, 64, 42) and saved.settings["seed"] == 7
    resumed = tmp_path / "resumed.png"
    code, err = run(capsys, "--resume", out.with_name("fox.x2.latent.safetensors"), "--weights", tiny_file,
                    "--out", resumed, "--device", "cpu", "--dtype", "float32")
    assert code == 0, err
    # only scale 3 is computed, and it is the uninterrupted run's scale 3, number for number
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resumed.latent.safetensors", "resumed.png"]
    assert torch.equal(load_latents(tmp_path / "resumed.latent.safetensors").latents,
                       load_latents(out.with_name("fox.latent.safetensors")).latents)
    assert list(Image.open(resumed).getdata()) == list(Image.open(out).getdata())


def test_resume_to_a_larger_size(tiny_file, tmp_path, capsys):
    preview = tmp_path / "preview.png"
    assert run(capsys, "a cat", "--weights", tiny_file, "--out", preview, "--height", "512", "--width", "512", *FAST)[0] == 0
    final = tmp_path / "final.png"
    code, err = run(capsys, "--resume", tmp_path / "preview.latent.safetensors", "--weights", tiny_file,
                    "--out", final, "--height", "768", "--width", "768", "--device", "cpu", "--dtype", "float32")
    assert code == 0, err
    assert Image.open(final).size == (768, 768) and settings_of(final)["scale"] == 3
    code, err = run(capsys, "--resume", tmp_path / "preview.latent.safetensors", "--weights", tiny_file,
                    "--out", tmp_path / "again.png", "--height", "512", "--width", "512", *FAST)
    assert code == 2 and "already reached scale 2" in err
    code, err = run(capsys, "--resume", tmp_path / "preview.latent.safetensors", "--weights", tiny_file,
                    "--out", tmp_path / "wide.png", "--height", "768", "--width", "1024", *FAST)
    assert code == 2 and "keep the aspect ratio" in err and err.count("\n") == 1


def test_resume_from_a_damaged_file(tiny_file, tmp_path, capsys):
    bad = tmp_path / "x.latent.safetensors"
    bad.write_bytes(b"not a safetensors file")
    code, err = run(capsys, "--resume", bad, "--weights", tiny_file, "--out", tmp_path / "y.png")
    assert code == 2 and str(bad) in err and err.count("\n") == 1 and "Traceback" not in err


def test_out_of_memory_halves_the_view_batch_and_keeps_going(tiny_file, tmp_path, capsys, monkeypatch):
    """Fault injection: a UNet that raises torch.OutOfMemoryError on batches of more than 4 rows (2 views)."""
    real_load = command.load
    seen = []

    def load_with_small_memory(*a, **k):
        pipe = real_load(*a, **k)
        forward = pipe.unet.forward

        def limited(latents, *rest):
            seen.append(latents.shape[0])
            if latents.shape[0] > 4:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            return forward(latents, *rest)

        pipe.unet.forward = limited
        return pipe

    monkeypatch.setattr(command, "load", load_with_small_memory)
    out = tmp_path / "small.png"
    code, err = run(capsys, "a cat", "--weights", tiny_file, "--out", out, "--height", "512", "--view-batch", "8", *FAST)
    assert code == 0, err
    assert err.count("out of memory: continuing with") == 2  # 8 -> 4 -> 2 views, told once per halving
    assert max(seen) == 16 and seen[-1] <= 4
    reference = tmp_path / "reference.png"
    assert run(capsys, "a cat", "--weights", tiny_file, "--out", reference, "--height", "512", "--view-batch", "2", *FAST)[0] == 0
    assert torch.equal(load_latents_of(out), load_latents_of(reference))


def load_latents_of(png):
    from minifusion.files import latent_path, load_latents
    return load_latents(latent_path(png)).latents


def test_non_finite_latents_are_an_error_not_a_black_image(tiny_file, tmp_path, capsys, monkeypatch):
    real_load = command.load

    def load_nan(*a, **k):
        pipe = real_load(*a, **k)
        pipe.unet.forward = lambda latents, *rest: torch.full_like(latents, float("nan"))
        return pipe

    monkeypatch.setattr(command, "load", load_nan)
    code, err = run(capsys, "a cat", "--weights", tiny_file, "--out", tmp_path / "nan.png", *FAST)
    assert code == 1 and "NaN or inf" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_full_disk_leaves_no_partial_file(tiny_file, tmp_path, capsys, monkeypatch):
    import errno

    from minifusion import files

    def full(f):
        f.write(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    real = files.atomic_write
    monkeypatch.setattr(command.metadata, "atomic_write", lambda path, write: real(path, full))
    code, err = run(capsys, "a cat", "--weights", tiny_file, "--out", tmp_path / "full.png", *FAST)
    assert code == 2 and "No space left on device" in err
    assert not list(tmp_path.iterdir())


def test_a_long_prompt_is_used_whole(tiny_file, tmp_path, capsys):
    # nothing is cut off any more (75-token chunks, minifusion.prompt): the last word changes the image
    images = []
    for last in ("zebra", "tiger"):
        code, err = run(capsys, "red " * 80 + last, "--weights", tiny_file, "--out", tmp_path / f"{last}.png",
                        *FAST, *SMALL)
        assert code == 0 and "ignored" not in err and "warning" not in err, err
        images.append(Image.open(tmp_path / f"{last}.png").tobytes())
    assert images[0] != images[1]


def test_a_size_the_device_cannot_hold_is_refused_with_its_cost(tiny_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(request, "device_memory", lambda device: 50 * 2**20)  # a 50 MiB machine
    monkeypatch.setattr(command, "load", lambda *a, **k: pytest.fail("loaded the model for a request that cannot fit"))
    code, err = run(capsys, "a cat", "--weights", tiny_file, "--out", tmp_path / "x.png", "--height", "2048",
                    "--width", "2048", *FAST)
    assert code == 2 and "needs about" in err and "has 0.0 GiB" in err and "UNet evaluations" in err
    assert "--force" in err and err.count("\n") == 1


def test_force_skips_the_fit_check(tiny_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(request, "device_memory", lambda device: 50 * 2**20)

    def reached_loading(*a, **k):
        raise RuntimeError("reached loading")

    monkeypatch.setattr(command, "load", reached_loading)
    with pytest.raises(RuntimeError, match="reached loading"):
        cli.main(["a cat", "--weights", str(tiny_file), "--out", str(tmp_path / "x.png"), "--height", "2048",
                  "--width", "2048", "--force", *FAST])


def test_max_memory_picks_view_batch_and_decode_tile(tiny_file, tmp_path, capsys):
    out = tmp_path / "budget.png"
    code, err = run(capsys, "a cat", "--weights", tiny_file, "--out", out, "--height", "512", "--max-memory",
                    "0.3", *FAST)
    assert code == 0, err
    cfgs = command.inspect_checkpoint(tiny_file)
    budget = int(0.3 * 2 ** 30)
    vb, tile, _ = command.memory.plan(budget, cfgs, 512, 512, torch.float32, "cpu", 16)
    assert f"within 0.30 GiB: {vb} view(s) per UNet call, decode in {tile} px tiles" in err
    assert settings_of(out)["settings"]["max_memory"] == budget
    stats = load_latents(latent_path(out)).stats
    assert (stats["view_batch_size"], stats["decode_tile"]) == (vb, tile)
    code, err = run(capsys, "--settings-from", out, "--weights", tiny_file, "--out", tmp_path / "again.png",
                    "--device", "cpu", "--dtype", "float32")
    assert code == 0 and list(Image.open(tmp_path / "again.png").getdata()) == list(Image.open(out).getdata())


def test_max_memory_too_small_is_refused_before_loading(tiny_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(command, "load", lambda *a, **k: pytest.fail("loaded the model for a bad request"))
    code, err = run(capsys, "a cat", "--weights", tiny_file, "--out", tmp_path / "x.png", "--height", "512",
                    "--max-memory", "10MiB", *FAST)
    assert code == 2 and err.count("\n") == 1, err
    assert "--max-memory: 512x512 does not fit in 0.01 GiB" in err and "needs at least" in err
    with pytest.raises(SystemExit) as e:
        cli.main(["a cat", "--out", str(tmp_path / "x.png"), "--max-memory", "lots"])
    assert e.value.code == 2 and "not a memory size" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


# ---- seeds, several images, numbered files ----

def test_no_seed_draws_one_prints_it_and_records_it(tiny_file, tmp_path, capsys):
    out = tmp_path / "r.png"
    code, err = run(capsys, "a cat", "--weights", tiny_file, "--out", out, "--steps", "1", "--device", "cpu",
                    "--dtype", "float32", *SMALL)
    assert code == 0, err
    seed = settings_of(out)["settings"]["seed"]
    assert f"seed {seed} (drawn at random; --seed {seed} makes this image again)" in err
    again = tmp_path / "again.png"
    assert run(capsys, "a cat", "--weights", tiny_file, "--out", again, "--steps", "1", "--device", "cpu",
               "--dtype", "float32", "--seed", str(seed), *SMALL)[0] == 0
    assert again.read_bytes() == out.read_bytes()
    code, err = run(capsys, "a cat", "--weights", tiny_file, "--out", tmp_path / "m.png", "--steps", "1",
                    "--device", "cpu", "--dtype", "float32", "--seed", "-1", *SMALL)
    assert code == 0 and "drawn at random" in err


def test_count_makes_consecutive_seeds_with_distinct_names(tiny_file, tmp_path, capsys):
    out = tmp_path / "cat.png"
    code, err = run(capsys, "a cat", "--weights", tiny_file, "--out", out, "--count", "2", *FAST, *SMALL,
                    "--seed", "41")
    assert code == 0, err
    for i, seed in ((1, 41), (2, 42)):
        png = tmp_path / f"cat-{i:05d}-{seed}.png"
        assert settings_of(png)["settings"]["seed"] == seed and png.with_name(png.stem + ".x1.png").exists()
    single = tmp_path / "single.png"
    assert run(capsys, "a cat", "--weights", tiny_file, "--out", single, *FAST, *SMALL, "--seed", "42")[0] == 0
    assert single.read_bytes() == (tmp_path / "cat-00002-42.png").read_bytes()  # the same image, byte for byte
    code, err = run(capsys, "a cat", "--weights", tiny_file, "--out", out, "--count", "2", *FAST, *SMALL,
                    "--seed", "41")
    assert code == 2 and "cat-00001-41.x1.png exists; pass --overwrite" in err


def test_without_out_images_are_numbered_in_outputs(tiny_file, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\n\n  a cat  \n")
    assert run(capsys, "--prompts", prompts, "--weights", tiny_file, *FAST, *SMALL, "--seed", "5")[0] == 0
    # never refused, never replaced
    assert run(capsys, "a dog", "--weights", tiny_file, *FAST, *SMALL, "--seed", "9")[0] == 0
    finals = sorted(p.name for p in (tmp_path / "outputs").glob("*.png") if ".x" not in p.name)
    assert finals == ["00001-5.png", "00002-6.png", "00003-9.png"]
    assert [settings_of(tmp_path / "outputs" / f)["settings"]["prompt"] for f in finals] == ["a fox", "a cat", "a dog"]
    code, err = run(capsys, "a fox", "--prompts", prompts, "--weights", tiny_file, *FAST)
    assert code == 2 and "not both" in err
    (tmp_path / "empty.txt").write_text("\n")
    code, err = run(capsys, "--prompts", tmp_path / "empty.txt", "--weights", tiny_file, *FAST)
    assert code == 2 and "holds no prompt" in err


def test_settings_from_names_weights_that_are_gone(three_scales, tmp_path, capsys):
    _, out = three_scales
    meta = PngImagePlugin.PngInfo()
    record = settings_of(out)
    record["settings"]["weights"] = str(tmp_path / "gone.safetensors")
    meta.add_text("minifusion", json.dumps(record))
    moved = tmp_path / "moved.png"
    Image.open(out).save(moved, pnginfo=meta)
    code, err = run(capsys, "--settings-from", moved, "--out", tmp_path / "x.png")
    assert code == 2 and f"the weights it names, {tmp_path / 'gone.safetensors'}, no longer exists; pass --weights" in err


def test_settings_from_an_automatic1111_png(tiny_file, tmp_path, capsys):
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", "a castle\nNegative prompt: fog\nSteps: 2, Sampler: Euler, CFG scale: 5, Seed: 12, "
                                "Size: 512x512, Model hash: 0123456789, Model: other")
    a1111 = tmp_path / "a1111.png"
    Image.new("RGB", (8, 8)).save(a1111, pnginfo=meta)
    out = tmp_path / "x.png"
    code, err = run(capsys, "--settings-from", a1111, "--weights", tiny_file, "--out", out, "--device", "cpu",
                    "--dtype", "float32")
    assert code == 0, err
    s = settings_of(out)["settings"]
    assert (s["prompt"], s["negative"], s["steps"], s["sampler"], s["guidance"], s["seed"]) == \
        ("a castle", "fog", 2, "euler", 5.0, 12)
    assert Image.open(out).size == (512, 512)


def test_the_plan_is_said_before_loading(tiny_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(command, "load", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    code, err = run(capsys, "a cat", "--weights", tiny_file, "--out", tmp_path / "x.png", "--height", "768",
                    "--width", "512", *FAST)
    assert code == 130
    # 3 scales; UNet evaluations = 2 (CFG) x 2 steps x (1 + (6 windows + 4 views) + (15 windows + 9 views))
    lines = [line for line in err.splitlines() if not line.startswith("measuring the memory model")]  # once a machine
    assert lines[0] == ("plan: 3 scale(s) 168x256 -> 336x512 -> 512x768, 140 UNet evaluations, about "
                        f"{err.split('about ')[1].split(' GiB')[0]} GiB peak on cpu (float32)")
    assert lines[1] == "sampling: DDIM, leading schedule, 2 steps a scale; the model: epsilon prediction (SDXL's " \
        "scheduler config)"


def test_settings_from_works_from_another_folder_and_after_a_move(tiny_file, tmp_path, capsys, monkeypatch):
    """Relative --weights/--lora/--image were recorded as typed, so the PNG named paths that did not resolve from
    anywhere else; now they are recorded absolute, and a project folder moved whole is still found."""
    project = tmp_path / "project"
    (project / "weights").mkdir(parents=True)
    (project / "outputs").mkdir()
    os.link(tiny_file, project / "weights" / "tiny.safetensors")
    Image.new("RGB", (256, 128), (200, 40, 40)).save(project / "photo.png")
    monkeypatch.chdir(project / "outputs")
    code, err = run(capsys, "a fox", "--weights", "../weights/tiny.safetensors", "--image", "../photo.png",
                    "--out", "fox.png", "--steps", "1", "--dtype", "float32", "--device", "cpu", "--seed", "4")
    assert code == 0, err
    s = settings_of(project / "outputs" / "fox.png")["settings"]
    assert s["weights"] == str(project / "weights" / "tiny.safetensors") and s["image"] == str(project / "photo.png")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, err = run(capsys, "--settings-from", "../project/outputs/fox.png", "--out", "again.png", "--dtype",
                    "float32", "--device", "cpu")
    assert code == 0, err
    assert (elsewhere / "again.png").read_bytes() == (project / "outputs" / "fox.png").read_bytes()
    moved = tmp_path / "moved"
    project.rename(moved)  # weights, picture and outputs together
    code, err = run(capsys, "--settings-from", moved / "outputs" / "fox.png", "--out", "after_move.png", "--dtype",
                    "float32", "--device", "cpu")
    assert code == 0, err
    s = settings_of(elsewhere / "after_move.png")["settings"]
    assert s["weights"] == str(moved / "weights" / "tiny.safetensors") and s["image"] == str(moved / "photo.png")
    assert Image.open(elsewhere / "after_move.png").tobytes() == Image.open(moved / "outputs" / "fox.png").tobytes()


def test_a_weights_folder_holding_one_file_names_and_hashes_that_file(tiny_file, tmp_path, capsys):
    """The README's layout (weights/ holding the single file) gave `Model: weights` and no hash."""
    folder = tmp_path / "weights"
    folder.mkdir()
    os.link(tiny_file, folder / "tiny_sdxl.safetensors")
    out = tmp_path / "x.png"
    code, err = run(capsys, "a fox", "--weights", folder, "--out", out, "--steps", "1", *SMALL, "--dtype", "float32",
                    "--device", "cpu", "--seed", "1")
    assert code == 0, err
    params = parse_a1111(Image.open(out).text["parameters"])
    assert params["Model"] == "tiny_sdxl"
    assert params["Model hash"] == hashlib.sha256(tiny_file.read_bytes()).hexdigest()[:10]
    assert settings_of(out)["settings"]["weights"] == str(folder / "tiny_sdxl.safetensors")


def test_ctrl_c_while_starting_is_one_line(tiny_file, tmp_path):
    """SIGINT while the command imports torch and checks the request (the first seconds) printed a 40-line
    KeyboardInterrupt traceback; the README promises one line at any point."""
    for delay in (0.3, 1.5):
        proc = subprocess.Popen([sys.executable, "-m", "minifusion", "a cat", "--weights", str(tiny_file), "--out",
                                 str(tmp_path / "x.png"), "--device", "cpu"], stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=60)[1]
        assert proc.returncode == 130, err
        assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted"), err


def test_a_v_prediction_file_is_sampled_as_one_and_the_plan_says_so(tiny_file, tmp_path, capsys):
    """The command line resolved the request against SDXL's own noise schedule, so a file marked v_pred/ztsnr
    was recorded, and sampled, as epsilon prediction unless --prediction was given."""
    marked = tmp_path / "vpred.safetensors"
    save_file({**load_file(str(tiny_file)), "v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}, str(marked),
              metadata={"modelspec.resolution": "256x256"})
    out = tmp_path / "v.png"
    code, err = run(capsys, "a cat", "--weights", marked, "--out", out, "--height", "256", "--width", "256",
                    "--steps", "1", "--dtype", "float32", "--device", "cpu", "--seed", "0", "--guidance", "1",
                    "--negative", "blurry")
    assert code == 0, err
    assert "sampling: DDIM, leading schedule, 1 step a scale; the model: v-prediction, zero terminal SNR (v_pred, " \
           "ztsnr keys)" in err
    assert "warning: --negative is not used at --guidance 1" in err
    s = settings_of(out)["settings"]
    assert (s["prediction"], s["zero_snr"]) == ("v_prediction", True)
    code, err = run(capsys, "a cat", "--weights", marked, "--out", tmp_path / "eps.png", "--height", "256", "--width",
                    "256", "--steps", "1", "--dtype", "float32", "--device", "cpu", "--seed", "0", "--guidance", "1",
                    "--negative", "blurry", "--prediction", "eps")
    assert code == 0 and "the model: epsilon prediction, zero terminal SNR (given)" in err, err
    assert settings_of(tmp_path / "eps.png")["settings"]["prediction"] == "epsilon"
    assert Image.open(out).tobytes() != Image.open(tmp_path / "eps.png").tobytes()
