"""The Python API on the tiny model: reproducibility, injected randomness, faults in the decode."""
import pytest
import torch

from minifusion import pipeline as pl

SMALL = dict(height=512, width=384, num_inference_steps=2)


def pixels(result):
    return [list(im.getdata()) for im in result.images]


def test_same_seed_same_images_other_seed_other_images(tiny_pipe):
    a = tiny_pipe.generate("a fox", seed=3, **SMALL)
    b = tiny_pipe.generate("a fox", seed=3, **SMALL)
    c = tiny_pipe.generate("a fox", seed=4, **SMALL)
    assert [im.size for im in a.images] == [(192, 256), (384, 512)]
    assert pixels(a) == pixels(b)
    assert all(torch.equal(x, y) for x, y in zip(a.latents, b.latents))
    assert not torch.equal(a.latents[1], c.latents[1])
    assert [s["scale"] for s in a.stats] == [1, 2] and all(s["unet_evaluations"] > 0 for s in a.stats)


def test_injected_noise_without_jitter_needs_no_seed(tiny_pipe):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 32, 24, generator=g)
    noise = [torch.randn(1, 4, 64, 48, generator=g)]
    runs = [tiny_pipe.generate("a fox", seed=seed, latents=latents, noise=noise, jitter=False, **SMALL)
            for seed in (None, 1)]
    assert torch.equal(runs[0].latents[1], runs[1].latents[1])


def test_decode_halves_the_tile_when_memory_runs_out(tiny_pipe, monkeypatch, caplog):
    z = torch.randn(1, 4, 40, 24, generator=torch.Generator().manual_seed(1))
    reference = torch.tensor(list(tiny_pipe.decode(z).getdata()))
    real = pl.decode_tiled
    tiles = []

    def small_memory(vae, latents, tile, **kw):
        tiles.append(tile)
        if tile > 64:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(vae, latents, tile=tile, **kw)

    monkeypatch.setattr(pl, "decode_tiled", small_memory)
    # the same image: tiles change float rounding only (a pixel may move by one 8-bit level)
    assert (torch.tensor(list(tiny_pipe.decode(z).getdata())) - reference).abs().max() <= 1
    assert tiles == [256, 128, 64]
    assert caplog.text.count("decode: working in tiles of") == 2
    with pytest.raises(torch.OutOfMemoryError):
        monkeypatch.setattr(pl, "decode_tiled", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("x")))
        tiny_pipe.decode(z)


def test_bad_arguments_are_refused_before_any_work(tiny_pipe, monkeypatch):
    monkeypatch.setattr(tiny_pipe, "encode_prompt", lambda *a, **k: pytest.fail("did work for a bad request"))
    for kwargs, message in [({"height": 500}, "not a multiple of 8"), ({"stride": 0}, "stride 0 is invalid"),
                            ({"num_inference_steps": 0}, "num_inference_steps 0"),
                            ({"cosine_scale_2": float("nan")}, "cosine_scale_2 nan"),
                            ({"scheduler": "pndm"}, "one of ddim, euler")]:
        with pytest.raises(ValueError, match=message):
            tiny_pipe.generate("a fox", **{**SMALL, **kwargs})
    with pytest.raises(TypeError, match="prompt must be text"):
        tiny_pipe.generate(["a fox"], **SMALL)


@pytest.mark.parametrize("flags, expected", [({"avx512f", "avx512_bf16"}, torch.bfloat16),
                                             ({"avx512f", "amx_bf16", "amx_tile"}, torch.bfloat16),
                                             ({"asimd", "bf16"}, torch.bfloat16),
                                             ({"avx512f", "avx2"}, torch.float32), (set(), torch.float32)])
def test_cpu_default_dtype_is_bfloat16_only_with_bf16_hardware(monkeypatch, flags, expected):
    monkeypatch.setattr(pl, "cpu_flags", lambda: flags)
    assert pl.default_dtype(torch.device("cpu")) == expected
    assert pl.default_dtype(torch.device("cuda")) == torch.float16


def test_command_line_names_get_a_type_error_naming_generates(tiny_pipe):
    with pytest.raises(TypeError, match=r"'steps' \(did you mean num_inference_steps\?\)"):
        tiny_pipe.generate("a fox", steps=2)
    with pytest.raises(TypeError, match=r"'negative' \(did you mean negative_prompt\?\)"):
        list(tiny_pipe.iter_generate("a fox", negative="dark"))


def test_returned_images_carry_the_metadata_the_files_get(tiny_pipe, tmp_path):
    import json

    from PIL import Image

    from minifusion.metadata import parse_a1111, save_png
    result = tiny_pipe.generate("a fox", negative_prompt="fog", seed=3, **SMALL)
    for scale, image in enumerate(result.images, start=1):
        params = parse_a1111(image.info["parameters"])
        assert (params["prompt"], params["negative"], params["Seed"], params["Steps"]) == ("a fox", "fog", "3", "2")
        assert params["Size"] == f"{image.width}x{image.height}"
        record = json.loads(image.info["minifusion"])
        assert record["scale"] == scale and record["settings"]["height"] == 512
    save_png(result.images[-1], tmp_path / "x.png")
    assert Image.open(tmp_path / "x.png").text == {k: result.images[-1].info[k] for k in ("parameters", "minifusion")}
