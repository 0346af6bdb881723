"""The command line, end to end on the tiny model: files, metadata, reproducibility and every user error."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from minifusion import __main__ as cli
from minifusion.pipeline import Pipeline

FAST = ["--steps", "2", "--dtype", "float32", "--device", "cpu"]


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
                     "--width", "512", "--seed", "7", *FAST])
    return code, out


def test_three_scale_run_writes_every_scale_with_metadata(three_scales):
    code, out = three_scales
    assert code == 0
    files = [out.with_name("fox.x1.png"), out.with_name("fox.x2.png"), out]
    # sizes by the spec: phase 1 at (768 // 3, 512 // 3) px -> 32x21 latents -> 256x168 px; scale 2 at
    # 512 px on the long side and int(512 * 2/3) = 341 px -> 42 latents; scale 3 at 768 x 512
    assert [Image.open(f).size for f in files] == [(168, 256), (336, 512), (512, 768)]
    for scale, f in enumerate(files, start=1):
        meta = settings_of(f)
        assert meta["scale"] == scale
        assert meta["settings"]["prompt"] == "a red fox"
        assert meta["settings"]["seed"] == 7 and meta["settings"]["steps"] == 2
        assert meta["settings"]["stride"] == 16 and meta["settings"]["height"] == 768
        assert meta["stats"]["unet_evaluations"] > 0
    assert not list(out.parent.glob(".*.tmp"))


def test_settings_from_a_png_reproduce_it(three_scales, tiny_file, tmp_path, capsys):
    _, out = three_scales
    again = tmp_path / "again.png"
    code, err = run(capsys, "--settings-from", out, "--weights", tiny_file, "--out", again,
                    "--device", "cpu", "--dtype", "float32")
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
    (["--height", "500"], "height 500 is not a multiple of 8"),
    (["--height", "128", "--width", "128"], "below this model's base size"),
    (["--height", "1024", "--width", "32"], "too narrow"),
    (["--steps", "0"], "num_inference_steps 0 is invalid"),
    (["--guidance", "nan"], "guidance_scale nan is invalid"),
    (["--stride", "64"], "stride 64 is invalid; it must be an integer from 1 to the window size, 32"),
    (["--view-batch", "0"], "view_batch_size 0 is invalid"),
    (["--c1", "-1"], "cosine_scale_1 -1.0 is invalid"),
    (["--sigma", "0"], "sigma 0.0 is invalid"),
    (["--sigma", "inf"], "sigma inf is invalid"),
])
def test_bad_requests_are_refused_before_loading(tiny_file, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setattr(cli, "load", lambda *a, **k: pytest.fail("loaded the model for a bad request"))
    code, err = run(capsys, "a cat", "--weights", tiny_file, "--out", tmp_path / "x.png", *args)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())


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
    assert code == 130 and "kept" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.x1.latent.safetensors", "cut.x1.png"]
    Image.open(tmp_path / "cut.x1.png").verify()


def test_out_of_memory_names_the_knob(tiny_file, tmp_path, capsys, monkeypatch):
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")

    real_load = cli.load

    def load_with_oom(*a, **k):
        pipe = real_load(*a, **k)
        pipe.unet.forward = oom
        return pipe

    monkeypatch.setattr(cli, "load", load_with_oom)
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
    real_load = cli.load
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

    monkeypatch.setattr(cli, "load", load_with_small_memory)
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
    real_load = cli.load

    def load_nan(*a, **k):
        pipe = real_load(*a, **k)
        pipe.unet.forward = lambda latents, *rest: torch.full_like(latents, float("nan"))
        return pipe

    monkeypatch.setattr(cli, "load", load_nan)
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
    monkeypatch.setattr(cli, "atomic_write", lambda path, write: real(path, full))
    code, err = run(capsys, "a cat", "--weights", tiny_file, "--out", tmp_path / "full.png", *FAST)
    assert code == 2 and "No space left on device" in err
    assert not list(tmp_path.iterdir())


def test_long_prompt_warns_once(tiny_file, tmp_path, capsys):
    code, err = run(capsys, "red " * 80 + "zebra", "--weights", tiny_file, "--out", tmp_path / "long.png", *FAST)
    assert code == 0
    assert err.count("longer than CLIP's 77 tokens") == 1 and 'ignored: "red red red red red zebra"' in err


def test_a_size_the_device_cannot_hold_is_refused_with_its_cost(tiny_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "device_memory", lambda device: 50 * 2**20)  # a 50 MiB machine
    monkeypatch.setattr(cli, "load", lambda *a, **k: pytest.fail("loaded the model for a request that cannot fit"))
    code, err = run(capsys, "a cat", "--weights", tiny_file, "--out", tmp_path / "x.png", "--height", "2048",
                    "--width", "2048", *FAST)
    assert code == 2 and "needs about" in err and "has 0.0 GiB" in err and "UNet evaluations" in err
    assert "--force" in err and err.count("\n") == 1


def test_force_skips_the_fit_check(tiny_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "device_memory", lambda device: 50 * 2**20)

    def reached_loading(*a, **k):
        raise RuntimeError("reached loading")

    monkeypatch.setattr(cli, "load", reached_loading)
    with pytest.raises(RuntimeError, match="reached loading"):
        cli.main(["a cat", "--weights", str(tiny_file), "--out", str(tmp_path / "x.png"), "--height", "2048",
                  "--width", "2048", "--force", *FAST])


def test_max_memory_picks_view_batch_and_decode_tile(tiny_file, tmp_path, capsys):
    out = tmp_path / "budget.png"
    code, err = run(capsys, "a cat", "--weights", tiny_file, "--out", out, "--height", "512", "--max-memory",
                    "0.25", *FAST)
    assert code == 0, err
    cfgs = cli.inspect_checkpoint(tiny_file)
    vb, tile, _ = cli.memory.plan(1 << 28, cfgs, 512, 512, torch.float32, "cpu", 16)
    assert f"within 0.25 GiB: {vb} view(s) per UNet call, decode in {tile} px tiles" in err
    meta = settings_of(out)
    assert meta["settings"]["max_memory"] == 1 << 28
    assert (meta["stats"]["view_batch_size"], meta["stats"]["decode_tile"]) == (vb, tile)
    code, err = run(capsys, "--settings-from", out, "--weights", tiny_file, "--out", tmp_path / "again.png",
                    "--device", "cpu", "--dtype", "float32")
    assert code == 0 and list(Image.open(tmp_path / "again.png").getdata()) == list(Image.open(out).getdata())


def test_max_memory_too_small_is_refused_before_loading(tiny_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "load", lambda *a, **k: pytest.fail("loaded the model for a bad request"))
    code, err = run(capsys, "a cat", "--weights", tiny_file, "--out", tmp_path / "x.png", "--height", "512",
                    "--max-memory", "10MiB", *FAST)
    assert code == 2 and err.count("\n") == 1, err
    assert "--max-memory: 512x512 does not fit in 0.01 GiB" in err and "needs at least" in err
    with pytest.raises(SystemExit) as e:
        cli.main(["a cat", "--out", str(tmp_path / "x.png"), "--max-memory", "lots"])
    assert e.value.code == 2 and "not a memory size" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
