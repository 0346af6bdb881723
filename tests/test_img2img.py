"""Image-to-image DemoFusion: a picture replaces phase 1 and the scales grow from it (tiny model)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from minifusion import __main__ as cli
from minifusion import __version__, command
from minifusion.encode import load_image


def picture(mode="RGB", size=(300, 200)):
    x = torch.linspace(0, 255, size[0]).round().to(torch.uint8)
    rgb = Image.merge("RGB", [Image.frombytes("L", size, bytes(x.repeat(size[1]).tolist()))] * 3)
    return rgb.convert(mode)


def test_api_upscales_a_picture_with_both_schedulers(tiny_pipe):
    for scheduler in ("ddim", "euler"):
        result = tiny_pipe.generate("a gradient", image=picture(), num_inference_steps=2, scheduler=scheduler)
        # a 300x200 picture on a 256 px base: final 512 x 344 (aspect kept, multiple of 8); phase 1 at half
        assert [im.size for im in result.images] == [(256, 168), (512, 344)]
        assert result.stats[0]["encoded_from_image"] and result.stats[1]["unet_evaluations"] > 0
        assert torch.isfinite(result.latents[1]).all()


def test_the_encoded_picture_is_phase_1(tiny_pipe):
    img = picture()
    g = torch.Generator().manual_seed(5)
    z = tiny_pipe.encode_image(img, 344, 512, g)
    assert z.shape == (1, 4, 21, 32)
    result = tiny_pipe.generate("a gradient", image=img, seed=5, num_inference_steps=2)
    assert torch.equal(result.latents[0], z)
    # the renormalisation anchor is the encoded picture's statistics
    assert abs(result.latents[1].mean().item() - z.mean().item()) < 1e-4
    assert abs(result.latents[1].std().item() - z.std().item()) < 1e-4


def test_aspect_must_be_kept(tiny_pipe):
    with pytest.raises(ValueError, match="aspect"):
        tiny_pipe.generate("x", image=picture(), height=512, width=512, num_inference_steps=1)


@pytest.mark.parametrize("mode", ["RGBA", "CMYK", "L", "P", "I;16"])
def test_cli_end_to_end_with_any_picture_mode(tiny_file, tmp_path, capsys, mode):
    src = tmp_path / ("in.jpg" if mode == "CMYK" else "in.png")  # PNG has no CMYK
    if mode == "I;16":  # a 16-bit greyscale PNG
        Image.fromarray(np.asarray(picture("L"), dtype=np.uint16) * 257).save(src)
    else:
        picture(mode).save(src)
    out = tmp_path / "up.png"
    code = cli.main(["a gradient", "--image", str(src), "--weights", str(tiny_file), "--out", str(out),
                     "--steps", "1", "--device", "cpu", "--dtype", "float32"])
    assert code == 0, capsys.readouterr().err
    assert Image.open(out).size == (512, 344) and Image.open(out.with_name("up.x1.png")).size == (256, 168)
    settings = json.loads(Image.open(out).text["minifusion"])["settings"]
    assert settings["image"] == str(src.resolve())


@pytest.mark.parametrize("content,message", [
    (b"", "empty"),
    (b"this is not a picture", "not a readable image"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00", "truncated"),
])
def test_cli_refuses_bad_pictures_before_loading(tiny_file, tmp_path, capsys, monkeypatch, content, message):
    monkeypatch.setattr(command, "load", lambda *a, **k: pytest.fail("loaded the model for a bad picture"))
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    code = cli.main(["x", "--image", str(bad), "--weights", str(tiny_file), "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert code == 2 and str(bad) in err and err.count("\n") == 1, err
    assert message in err.lower()


def test_cli_refuses_a_missing_picture_and_image_with_resume(tiny_file, tmp_path, capsys):
    code = cli.main(["x", "--image", str(tmp_path / "none.png"), "--weights", str(tiny_file),
                     "--out", str(tmp_path / "o.png")])
    assert code == 2 and "none.png" in capsys.readouterr().err
    code = cli.main(["x", "--image", "a.png", "--resume", "b.latent.safetensors", "--weights", str(tiny_file)])
    assert code == 2 and "do not go together" in capsys.readouterr().err


def test_huge_picture_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    big = tmp_path / "big.png"
    picture(size=(100, 100)).save(big)
    with pytest.raises(ValueError, match="too large"):
        load_image(big, 64, 64)
