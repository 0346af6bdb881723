"""The memory model against real CPU runs of the tiny model, and plan() against its own predictions.

The model's numbers come from meta-device runs; here the same code runs for real on the CPU under the same
MemoryTracker, so a wrong simulation (attention on the math path, a missed allocation, a wrong linear fit, a
sampler state that is not what the real sampler holds) shows as a mismatch. Tolerances are stated per test.
"""
import pytest
import torch

from minifusion import memory
from minifusion.checkpoint import Configs
from minifusion.config import VAEConfig
from minifusion.decode import decode_tiled
from minifusion.demofusion import Cond, demofusion
from minifusion.memory import MemoryTracker
from minifusion.models.vae import VAE
from minifusion.tiny import TINY, random_models, randomize

# the tiny model with a two-level VAE (one 2x upsampling), so tiled decodes take a handful of tiles
SMALL = Configs(TINY.unet, VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8),
                TINY.text_encoder_1, TINY.text_encoder_2)
SIZE = 512  # two scales on the tiny model's 256 px base: 32^2 then 64^2 latents
F32 = torch.float32
VBS, TILES = (16, 4, 1), (128, 32)  # short candidate lists keep plan() quick


@pytest.fixture(scope="module")
def models():
    models = random_models(TINY, seed=0)
    models["vae"] = randomize(VAE(SMALL.vae), torch.Generator().manual_seed(1)).eval()
    return models


def test_meta_run_allocates_what_a_cpu_run_allocates(models):
    n, h, w = 3, 21, 32  # odd sizes: every up-sampling goes to its skip's size
    real = memory.unet_activation_bytes(models["unet"], n, h, w)
    assert real > 0
    assert memory.unet_activation_bytes(TINY.unet, n, h, w, F32) == real


def test_activation_profile_predicts_an_unseen_call(models):
    """Fitted at 1 and 2 views of 32^2 and 1 view of 16^2; checked at 5 views of 24x20 (within 5%)."""
    profile = memory.activation_profile(TINY.unet, F32)
    assert profile.per_sample_pixel > 0
    real = memory.unet_activation_bytes(models["unet"], 5, 24, 20)
    assert abs(profile.bytes(5, 24, 20) - real) <= 0.05 * real


@torch.no_grad()
def test_denoising_peak_matches_a_cpu_run(models):
    """The sampler with the real UNet on the CPU, every tensor it allocates tracked, against the prediction of the
    scale's peak over the resident weights (within 10%)."""
    g = torch.Generator().manual_seed(0)
    cond = Cond(torch.randn(2, 77, TINY.unet.context_dim, generator=g),
                torch.randn(2, TINY.unet.pooled_dim, generator=g))
    peaks = []
    tracker = MemoryTracker()
    with tracker:
        run = demofusion(models["unet"], cond, height=SIZE, width=SIZE, base_px=256, window=32, steps=1,
                         guidance_scale=7.5, stride=16, view_batch_size=4, jitter=False)
        for _ in run:
            peaks.append(tracker.peak)
            tracker.peak = tracker.live
    rows = memory.predict(SMALL, SIZE, SIZE, F32, view_batch_size=4)
    resident = sum(memory.weights_bytes(SMALL, F32).values())
    for measured, row in zip(peaks, rows):
        predicted = row["denoise_bytes"] - resident
        assert abs(predicted - measured) <= 0.10 * measured, (row["scale"], predicted, measured)


@torch.no_grad()
@pytest.mark.parametrize("tile", [128, 16])
def test_decode_peak_matches_a_cpu_run(models, tile):
    """decode_tiled for real on the CPU: the device working set (everything but the full-map buffers) and the
    host buffers. Latents within one tile are simulated as they are (equal to 1%); larger ones are simulated at
    the tile's size with the attention's keys and values scaled up, an upper bound (at most 40% over)."""
    vae = models["vae"]
    z = torch.randn(1, 4, 40, 24, generator=torch.Generator().manual_seed(0))
    tracker = MemoryTracker(host_ops={torch.ops.aten.empty.memory_format})
    with tracker:
        decode_tiled(vae, z, tile=tile, storage="cpu")
    predicted = memory.decode_bytes(SMALL.vae, 40, 24, F32, tile)
    if tile >= 40:
        assert abs(predicted["device"] - tracker.peak) <= 0.01 * tracker.peak
        assert abs(predicted["host"] - tracker.peak_host) <= 0.01 * tracker.peak_host
    else:
        assert tracker.peak <= predicted["device"] <= 1.4 * tracker.peak
        assert tracker.peak_host <= predicted["host"] <= 1.4 * tracker.peak_host


def _need(vb, tile, device_type, resident=memory.COMPONENTS):
    return memory.needs(memory.predict(SMALL, SIZE, SIZE, F32, vb, tile, resident=resident), device_type)


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_plan_stays_within_budget_and_grows_with_it(device_type):
    least = _need(1, 32, device_type)
    most = _need(16, 128, device_type)
    budgets = sorted({max(least), max(least) + 30_000, (max(least) + max(most)) // 2, max(most), 2 * max(most)})
    chosen = []
    for budget in budgets:
        vb, tile, _ = memory.plan(budget, SMALL, SIZE, SIZE, F32, device_type, view_batch_sizes=VBS,
                                  decode_tiles=TILES)
        denoise, decode = _need(vb, tile, device_type)
        assert denoise <= budget and decode <= budget
        # largest: the next larger candidate would not have fitted
        bigger_vb = [v for v in VBS if v > vb]
        if bigger_vb:
            assert _need(min(bigger_vb), tile, device_type)[0] > budget
        bigger_tile = [t for t in TILES if t > tile]
        if bigger_tile:
            assert _need(vb, min(bigger_tile), device_type)[1] > budget
        chosen.append((vb, tile))
    assert chosen[-1] == (16, 128)
    for (v1, t1), (v2, t2) in zip(chosen, chosen[1:]):
        assert v1 <= v2 and t1 <= t2


def test_plan_refuses_clearly_and_names_the_minimum():
    least = max(_need(1, 32, "cuda"))
    with pytest.raises(ValueError, match=r"needs at least \d+\.\d+ GiB") as e:
        memory.plan(least - 1, SMALL, SIZE, SIZE, F32, "cuda", view_batch_sizes=VBS, decode_tiles=TILES)
    named = float(str(e.value).split("needs at least ")[1].split(" GiB")[0]) * memory.GiB
    assert abs(named - least) <= 0.01 * memory.GiB
    memory.plan(least, SMALL, SIZE, SIZE, F32, "cuda", view_batch_sizes=VBS, decode_tiles=TILES)  # and that is enough


def test_weights_count_only_while_on_the_device():
    weights = memory.weights_bytes(SMALL, F32)
    every = memory.predict(SMALL, SIZE, SIZE, F32, 1, 32)
    text = sum(memory.text_activation_bytes(c, F32) for c in (SMALL.text_encoder_1, SMALL.text_encoder_2))
    assert every[0]["encode_bytes"] == sum(weights.values()) + text and text > 0
    for resident, off_in_denoise, off_in_decode in [
            ((), weights["vae"] + weights["text_encoder_1"] + weights["text_encoder_2"],
             weights["unet"] + weights["text_encoder_1"] + weights["text_encoder_2"]),
            (("unet", "vae"), weights["text_encoder_1"] + weights["text_encoder_2"],
             weights["text_encoder_1"] + weights["text_encoder_2"])]:
        rows = memory.predict(SMALL, SIZE, SIZE, F32, 1, 32, resident=resident)
        # while encoding, both text encoders are there too, whatever stays
        assert every[0]["encode_bytes"] - rows[0]["encode_bytes"] == sum(weights[c] for c in ("unet", "vae")
                                                                          if c not in resident)
        for r, e in zip(rows, every):
            assert e["denoise_bytes"] - r["denoise_bytes"] == off_in_denoise
            assert e["decode_bytes"] - r["decode_bytes"] == off_in_decode


@torch.no_grad()
def test_estimate_counts_the_evaluations_a_run_makes(models):
    cond = Cond(torch.zeros(2, 77, TINY.unet.context_dim), torch.zeros(2, TINY.unet.pooled_dim))
    run = demofusion(lambda x, *a: torch.zeros_like(x), cond, height=SIZE, width=SIZE, base_px=256, window=32,
                     steps=3, guidance_scale=7.5, stride=16, view_batch_size=16, jitter=False)
    evals = sum(r.stats.unet_evals for r in run)
    est = memory.estimate(SMALL, SIZE, SIZE, steps=3, view_batch_size=16, dtype=F32, seconds_per_unet_eval=0.5)
    assert est["unet_evals"] == evals
    assert est["seconds"] == pytest.approx(0.5 * evals)
    assert est["flops"] > evals * memory.unet_flops(TINY.unet, 16, 16)
    assert est["peak_bytes"] == max(r["peak_bytes"] for r in est["scales"])


@pytest.mark.parametrize("text, unit, expected", [
    ("8GiB", 1, 8 << 30), ("12 GB", 1, 12 << 30), ("512MiB", 1, 512 << 20), ("1.5g", 1, 3 << 29),
    ("8", memory.GiB, 8 << 30), (8, memory.GiB, 8 << 30), (1000, 1, 1000), ("2048k", 1, 2 << 20)])
def test_parse_size(text, unit, expected):
    assert memory.parse_size(text, unit) == expected


@pytest.mark.parametrize("text", ["", "eight", "8 GiBs", "-1GiB", "0", "8 PB", "nan", True])
def test_parse_size_refuses_what_is_not_a_size(text):
    with pytest.raises(ValueError, match="memory size"):
        memory.parse_size(text)


def test_plan_prefers_an_untiled_decode_when_it_fits_and_counts_host_maps_off_cuda():
    untiled = memory.needs(memory.predict(SMALL, SIZE, SIZE, F32, 1, None), "cpu")[1]
    assert memory.plan(10 * untiled, SMALL, SIZE, SIZE, F32, "cpu", view_batch_sizes=VBS,
                       decode_tiles=(None,) + TILES)[1] is None
    assert memory.plan(10 * untiled, SMALL, SIZE, SIZE, F32, "cpu", view_batch_sizes=VBS,
                       decode_tiles=TILES)[1] == 128
    rows = memory.predict(SMALL, SIZE, SIZE, F32, 1, 32)
    host = max(r["host_decode_bytes"] for r in rows)
    assert host > 0 and memory.needs(rows, "cpu")[1] == max(r["decode_bytes"] for r in rows) + host


@torch.no_grad()
def test_generate_stays_within_max_memory(tiny_pipe):
    """A whole generate() on the CPU with every tensor it creates tracked: the resident weights plus the tracked
    peak stay within the budget it was given, from the least that fits to ample."""
    cfgs, size = tiny_pipe.configs, 512
    weights = sum(memory.weights_bytes(cfgs, F32).values())
    least = max(memory.needs(memory.predict(cfgs, size, size, F32, 1, memory.DECODE_TILES[-1]), "cpu"))
    chosen = []
    for budget in (least, int(least * 1.15), 4 * least):
        vb, tile, _ = tiny_pipe.plan_memory(budget, size, size)
        tracker = MemoryTracker(host_ops={torch.ops.aten.empty.memory_format})
        with tracker:
            r = tiny_pipe.generate("a lighthouse", height=size, width=size, num_inference_steps=1, max_memory=budget)
        assert weights + tracker.peak_total <= budget, (budget, vb, tile, weights + tracker.peak_total)
        assert {(s["view_batch_size"], s["decode_tile"]) for s in r.stats} == {(vb, tile)}
        chosen.append((vb, tile))
    assert chosen[0][1] < chosen[-1][1]  # on this model the decode sets the budget's floor
    with pytest.raises(ValueError, match=r"needs at least"):
        tiny_pipe.generate("a lighthouse", height=size, width=size, num_inference_steps=1, max_memory=least - 1)


@torch.no_grad()
def test_a_budget_only_taking_turns_fits_moves_the_unet_and_the_vae(tiny_pipe, monkeypatch):
    """Off the CPU, a budget below what two resident networks need but above what one at a time needs: each
    scale runs the UNet with the VAE on the host, then decodes with the UNet on the host; both come back at the
    end. (Moves are recorded, not made: this machine has no second device.)"""
    cfgs, size = tiny_pipe.configs, 512

    def least(resident):
        return max(memory.needs(memory.predict(cfgs, size, size, F32, 1, memory.DECODE_TILES[-1], resident=resident),
                                "cpu"))

    assert least(()) < least(tiny_pipe.resident)
    moves = []
    monkeypatch.setattr(tiny_pipe, "host", torch.device("meta"))
    for name in ("unet", "vae"):
        monkeypatch.setattr(getattr(tiny_pipe, name), "to", lambda where, name=name: moves.append((name, where.type)))
    plan = tiny_pipe.plan_memory(least(()), size, size)
    assert plan.resident == ()
    r = tiny_pipe.generate("a lighthouse", height=size, width=size, num_inference_steps=1, max_memory=least(()))
    assert len(r.images) == 2
    denoise, decode = [("vae", "meta"), ("unet", "cpu")], [("unet", "meta"), ("vae", "cpu")]  # idle one out first
    encode = [("unet", "meta"), ("vae", "meta")]  # neither is needed while the prompts are encoded
    assert moves == encode + denoise[1:] + decode + denoise + decode + [("unet", "cpu")]
    moves.clear()
    tiny_pipe.generate("a lighthouse", height=size, width=size, num_inference_steps=1, max_memory=least(("unet", "vae",
                       "text_encoder_1", "text_encoder_2")))
    assert moves == []
