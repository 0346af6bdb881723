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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.x1.png"]
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
    assert code == 2 and "out of memory" in err and "--view-batch" in err and "Traceback" not in err


def test_module_entry_point_exit_status(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "minifusion", "a cat", "--weights", str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "no such file or folder" in proc.stderr
    assert "Traceback" not in proc.stderr
