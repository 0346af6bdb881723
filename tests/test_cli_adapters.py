"""The command line with what users load beside the checkpoint — LoRA, a separate VAE, an embedding, a ControlNet
(with Canny) — on the tiny model: each changes the image, is recorded in the PNG, and --settings-from brings it
back. (The numerics of each are proven against diffusers/peft in their own test files.)"""
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from helpers import write_adapters
from minifusion import __main__ as cli
from minifusion import __version__, command
from minifusion.metadata import parse_a1111

FAST = ["--steps", "1", "--dtype", "float32", "--device", "cpu", "--seed", "0", "--height", "512", "--width", "512"]


def run(capsys, *args):
    code = cli.main([str(a) for a in args])
    return code, capsys.readouterr().err


def meta(png):
    with Image.open(png) as im:
        return json.loads(im.text["minifusion"]), im.text["parameters"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A kohya LoRA on one attention projection, another random VAE, an embedding and a ControlNet picture."""
    d = tmp_path_factory.mktemp("adapters")
    write_adapters(d / "style.safetensors", d / "other_vae.safetensors", d / "neggy.safetensors", d / "cn",
                   d / "square.png")
    return d


@pytest.fixture(scope="module")
def plain(tiny_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "plain.png"
    assert cli.main(["a fox", "--weights", str(tiny_file), "--out", str(out), *FAST]) == 0
    return Image.open(out).tobytes()


@pytest.mark.parametrize("flags,recorded,a1111", [
    (["--lora", "{d}/style.safetensors:0.7"], ("lora", [["{d}/style.safetensors", 0.7]]), "Lora hashes"),
    (["--vae", "{d}/other_vae.safetensors"], ("vae", "{d}/other_vae.safetensors"), "VAE hash"),
    (["--embedding", "{d}/neggy.safetensors", "--negative", "neggy"], ("embedding", ["{d}/neggy.safetensors"]),
     "TI hashes"),
    (["--controlnet", "{d}/cn", "--control-image", "{d}/square.png", "--canny", "--control-scale", "0.8"],
     ("controlnet", ["{d}/cn"]), None),
])
def test_each_changes_the_image_and_comes_back_with_settings_from(tiny_file, adapters, plain, tmp_path, capsys,
                                                                  flags, recorded, a1111):
    flags = [f.format(d=adapters) for f in flags]
    out = tmp_path / "x.png"
    code, err = run(capsys, "a fox", "--weights", tiny_file, "--out", out, *FAST, *flags)
    assert code == 0, err
    assert Image.open(out).tobytes() != plain
    record, parameters = meta(out)
    name, value = recorded
    want = json.loads(json.dumps(value).replace("{d}", str(adapters)))
    assert record["settings"][name] == want
    if a1111:
        assert a1111 in parse_a1111(parameters)
    again = tmp_path / "again.png"
    code, err = run(capsys, "--settings-from", out, "--out", again, "--device", "cpu", "--dtype", "float32")
    assert code == 0, err
    assert again.read_bytes() == out.read_bytes()


def test_control_flags_must_pair_up(tiny_file, adapters, tmp_path, capsys):
    code, err = run(capsys, "a fox", "--weights", tiny_file, "--out", tmp_path / "x.png", *FAST,
                    "--controlnet", adapters / "cn")
    assert code == 2 and "1 --controlnet but no --control-image" in err and err.count("\n") == 1
    # a colon after an existing file is a weight, and "lots" is not one (it was called a missing file)
    code, err = run(capsys, "a fox", "--weights", tiny_file, "--out", tmp_path / "x.png", *FAST,
                    "--lora", f"{adapters}/style.safetensors:lots")
    assert code == 2 and "the weight 'lots' is not a number" in err and err.count("\n") == 1, err
    assert "no such" not in err
    # with no such file before the colon, the colon belongs to the path, which then does not exist
    code, err = run(capsys, "a fox", "--weights", tiny_file, "--out", tmp_path / "x.png", *FAST,
                    "--lora", f"{adapters}/other.safetensors:lots")
    assert code == 2 and f"{adapters}/other.safetensors:lots" in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("flags,names", [
    (["--control-start", "0.8", "--control-end", "0.2"], "--control-start 0.8 and --control-end 0.2"),
    (["--control-start", "0.5", "--control-end", "0.5"], "--control-start 0.5 and --control-end 0.5"),
    (["--control-start", "1.5"], "--control-start 1.5 is invalid"),
])
def test_controlnet_start_and_end_are_refused_before_loading(tiny_file, adapters, tmp_path, capsys, monkeypatch,
                                                             flags, names):
    """They were checked only after the whole model had loaded, and refused with a ValueError traceback."""
    monkeypatch.setattr(command, "load", lambda *a, **k: pytest.fail("loaded the model for a bad request"))
    code, err = run(capsys, "a fox", "--weights", tiny_file, "--out", tmp_path / "x.png", *FAST,
                    "--controlnet", adapters / "cn", "--control-image", adapters / "square.png", *flags)
    assert code == 2 and err.startswith(f"error: {names}") and err.count("\n") == 1, err


@pytest.mark.parametrize("flags", [["--canny"], ["--control-scale", "0.5"], ["--control-start", "0.2"],
                                   ["--control-end", "0.7"], ["--guess-mode"]])
def test_control_flags_without_a_controlnet_are_refused_not_ignored(tiny_file, tmp_path, capsys, monkeypatch, flags):
    monkeypatch.setattr(command, "load", lambda *a, **k: pytest.fail("loaded the model for a bad request"))
    code, err = run(capsys, "a fox", "--weights", tiny_file, "--out", tmp_path / "x.png", *FAST, *flags)
    assert code == 2 and err.startswith(f"error: {flags[0]} steers a ControlNet: give --controlnet and "
                                        "--control-image too") and err.count("\n") == 1, err


def test_a_bad_lora_is_one_line_before_the_checkpoint_loads(tiny_file, tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    save_file({"lora_unet_nowhere.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_nowhere.lora_up.weight": torch.zeros(8, 4)}, str(bad))
    code, err = run(capsys, "a fox", "--weights", tiny_file, "--out", tmp_path / "x.png", *FAST, "--lora", bad)
    assert code == 2 and err.startswith("error: ") and str(bad) in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.png").exists()
