"""The memory model against real CPU runs of the tiny model, against meta-device runs at the requested size, and
plan() against its own predictions.

The model's coefficients come from small meta-device runs; here the same code runs for real on the CPU under the
same MemoryTracker, so a wrong simulation (attention on the math path, a missed allocation, a wrong linear fit, a
sampler state that is not what the real sampler holds) shows as a mismatch; and the sampler, the tiled decode and
the FLOP counts run on the meta device at the very size asked for (the slow path the model replaces), so a
coefficient that does not carry over to other sizes, strides or view batches shows too. Tolerances per test.
"""
import functools

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from minifusion import memory
from minifusion.checkpoint import Configs
from minifusion.config import SDXL_CLIP_G, SDXL_CLIP_L, SDXL_UNET, SDXL_VAE, VAEConfig
from minifusion.decode import decode_flops, decode_tiled
from minifusion.demofusion import demofusion
from minifusion.memory import MemoryTracker
from minifusion.work import describe
from minifusion.models.unet import UNet
from minifusion.models.vae import VAE
from minifusion.tiny import TINY, random_models, randomize
from minifusion.views import Cond

# the tiny model with a two-level VAE (one 2x upsampling), so tiled decodes take a handful of tiles
SMALL = Configs(TINY.unet, VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8),
                TINY.text_encoder_1, TINY.text_encoder_2)
SDXL = Configs(SDXL_UNET, SDXL_VAE, SDXL_CLIP_L, SDXL_CLIP_G)
SIZE = 512  # two scales on the tiny model's 256 px base: 32^2 then 64^2 latents
F32, F16 = torch.float32, torch.float16
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
    host buffers. Where every stage is one tile the prediction is exact (equal to 1%); with stages of several
    tiles it takes each stage's largest tile with the widest halo, an upper bound (at most 2% over)."""
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
        assert tracker.peak <= predicted["device"] <= 1.02 * tracker.peak
        assert abs(predicted["host"] - tracker.peak_host) <= 0.01 * tracker.peak_host


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
@pytest.mark.parametrize("height, width, stride", [(SIZE, SIZE, 16), (776, 520, 12)])
def test_estimate_counts_the_evaluations_a_run_makes(height, width, stride):
    cond = Cond(torch.zeros(2, 77, TINY.unet.context_dim), torch.zeros(2, TINY.unet.pooled_dim))
    run = demofusion(lambda x, *a: torch.zeros_like(x), cond, height=height, width=width, base_px=256, window=32,
                     steps=3, guidance_scale=7.5, stride=stride, view_batch_size=16, jitter=False)
    evals = [r.stats.unet_evals for r in run]
    est = memory.estimate(SMALL, height, width, steps=3, view_batch_size=16, dtype=F32, stride=stride,
                          seconds_per_unet_eval=0.5)
    assert [r["unet_evals"] for r in est["scales"]] == evals and est["unet_evals"] == sum(evals)
    assert est["seconds"] == pytest.approx(0.5 * sum(evals))
    assert est["flops"] > sum(evals) * memory.unet_flops(TINY.unet, 16, 16)
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


# ---------------------------------------------------------------------------------------------------------
# The coefficients against the slow path they replace: the same code run on the meta device at the very size

GEOMETRIES = [(SIZE, SIZE, None), (768, 512, 8), (520, 776, 24), (1024, 640, 12)]  # px, stride (None: half window)


def _check_denoise(cfgs, height, width, stride, view_batch, dtype, profile=None):
    measured = memory.sampler_calls(cfgs.unet, height, width, view_batch, stride or cfgs.unet.sample_size // 2,
                                    dtype)
    profile = profile or memory.activation_profile(cfgs.unet, dtype)
    unet = memory.weights_bytes(cfgs, dtype)["unet"]
    rows = memory.predict(cfgs, height, width, dtype, view_batch, 256, stride, resident=())
    assert len(rows) == len(measured) >= 2
    for row, steps in zip(rows, measured):
        calls = [call for step in steps for call in step]
        assert row["denoise_bytes"] - unet == max(live + profile.bytes(n, h, w) for live, n, h, w in calls), row
        assert row["max_unet_batch"] == max(n for _, n, _, _ in calls)


@pytest.mark.parametrize("view_batch", memory.VIEW_BATCHES)
def test_denoising_prediction_is_the_sampler_run_at_that_size(view_batch):
    """Every view batch, square and not, default and other strides: the bytes the sampler holds at each UNet call
    of a meta run at that size, plus the activations of the call, equal predict()'s to the byte (its coefficients
    were fitted on runs of a model native at 8 latents)."""
    height, width, stride = GEOMETRIES[memory.VIEW_BATCHES.index(view_batch) % len(GEOMETRIES)]
    _check_denoise(TINY, height, width, stride, view_batch, F16)


def test_denoising_prediction_is_the_sampler_run_for_sdxl(monkeypatch):
    """SDXL's geometry (128-latent windows, 1024 px base), the sampler's bytes alone: UNet activations of none."""
    nothing = memory.ActivationProfile(0, 0, 0.0)
    monkeypatch.setattr(memory.budget, "activation_profile", lambda *args, **kwargs: nothing)  # where predict looks
    _check_denoise(SDXL, 3072, 2048, 96, 4, F16, nothing)


def _meta_decode(cfg, dtype, h, w, tile):
    with torch.device("meta"):
        vae = VAE(cfg).to(dtype)
    z = torch.zeros(1, cfg.latent_channels, h, w, dtype=dtype, device="meta")
    tracker = MemoryTracker(host_ops={torch.ops.aten.empty.memory_format})
    with torch.no_grad(), memory.CPUAttentionOnMeta(), tracker:
        decode_tiled(vae, z, tile=tile, storage="meta") if tile else vae.decode(z)
    return tracker


@pytest.mark.parametrize("cfg, dtype, tile, h, w", [
    (SMALL.vae, F16, 64, 17, 33), (SMALL.vae, F16, 64, 40, 24), (SMALL.vae, F32, 16, 40, 24),
    (SMALL.vae, F16, 24, 13, 50), (SMALL.vae, F32, 128, 40, 24), (TINY.vae, F32, 64, 33, 8),
    (TINY.vae, F16, 96, 45, 30), (TINY.vae, F16, 512, 20, 28), (SMALL.vae, F32, None, 40, 24),
    (TINY.vae, F16, None, 9, 30)])
def test_decode_prediction_against_a_run_at_that_size(cfg, dtype, tile, h, w):
    """decode_tiled at that size, every tile of every stage, on the meta device: never above the prediction, equal
    to it where every stage is one tile (and untiled), within 2% where stages split into tiles; host maps exact."""
    run = _meta_decode(cfg, dtype, h, w, tile)
    predicted = memory.decode_bytes(cfg, h, w, dtype, tile)
    assert predicted["host"] == run.peak_host
    if tile is None or tile >= 2 ** (len(cfg.ch_mult) - 1) * max(h, w):
        assert predicted["device"] == run.peak
    else:
        assert run.peak <= predicted["device"] <= 1.02 * run.peak


def test_estimate_flops_are_what_meta_runs_count():
    """UNet FLOPs from per-level coefficients, decode FLOPs from a fitted polynomial; here FlopCounterMode counts
    one evaluation at every view size of every scale, and each scale's decode, of a non-square request."""
    height, width, stride, steps = 776, 520, 12, 3
    est = memory.estimate(TINY, height, width, steps, dtype=F32, stride=stride)
    with torch.device("meta"):
        unet = UNet(TINY.unet)

    @functools.cache
    def counted(h, w):
        inputs = (torch.zeros(1, 4, h, w, device="meta"), torch.full((1,), 500.0, device="meta"),
                  torch.zeros(1, 77, TINY.unet.context_dim, device="meta"),
                  torch.zeros(1, TINY.unet.pooled_dim, device="meta"), torch.zeros(1, 6, device="meta"))
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            unet(*inputs)
        return counter.get_total_flops()

    expected = 0
    work = describe(height, width, base_px=256, window=32, steps=steps, stride=stride)
    for row, done in zip(est["scales"], work):
        scale = sum(2 * g.count * steps * counted(*g.size) for g in done.groups)
        scale += decode_flops(TINY.vae, (1, TINY.vae.latent_channels, *row["latent_size"]))
        assert row["flops"] == scale
        expected += scale
    assert est["flops"] == expected and len(est["scales"]) == 3


def test_measured_knows_what_a_separate_vae_and_a_controlnet_add(tmp_path, monkeypatch):
    """The CLI says it is measuring exactly when estimate will measure: a fp16-safe VAE's float16 decode and a
    ControlNet's steered calls are measurements of their own."""
    from minifusion.models.controlnet import ControlNetConfig
    monkeypatch.setenv("MINIFUSION_CACHE", str(tmp_path))
    for measurement in memory._Measured.every:
        monkeypatch.setattr(measurement, "memo", {})
    memory.estimate(SMALL, 512, 512, 2, dtype=F16)
    assert memory.measured(SMALL, F16)
    assert not memory.measured(SMALL, F16, vae_dtype=F16)  # SDXL's VAE was measured in fp32 beside fp16
    memory.estimate(SMALL, 512, 512, 2, dtype=F16, vae_dtype=F16)
    assert memory.measured(SMALL, F16, vae_dtype=F16)
    nets = (ControlNetConfig(TINY.unet, (False, True, True), hint_channels=(4, 8, 8, 16)),)
    assert not memory.measured(SMALL, F16, controlnets=nets)
    memory.estimate(SMALL, 512, 512, 2, dtype=F16, controlnets=nets)
    assert memory.measured(SMALL, F16, controlnets=nets)


def test_coefficients_are_measured_once_then_read_from_disk(tmp_path, monkeypatch):
    """A fresh cache measures and writes; a new process (nothing in memory) reads the same coefficients without
    measuring; a damaged file is measured again rather than trusted."""
    monkeypatch.setenv("MINIFUSION_CACHE", str(tmp_path))
    measuring = {m: m.fn for m in memory._Measured.every}
    for measurement in measuring:
        monkeypatch.setattr(measurement, "memo", {})
    assert not memory.measured(SMALL, F32)
    first = memory.estimate(SMALL, 768, 512, 2, dtype=F32)
    assert memory.measured(SMALL, F32)
    made = {m.path(*args) for m in measuring for args in m.memo}
    assert set(tmp_path.rglob("*.json")) == made and len(made) >= 8  # each measurement made, in its own file

    def refuse(*args):
        raise AssertionError(f"measured again: {args}")

    for measurement in measuring:
        monkeypatch.setattr(measurement, "memo", {})
        monkeypatch.setattr(measurement, "fn", refuse)
    assert memory.estimate(SMALL, 768, 512, 2, dtype=F32) == first

    decode, again = memory._decode_fit, []
    decode.path(SMALL.vae, F32).write_text("{")
    monkeypatch.setattr(decode, "memo", {})
    monkeypatch.setattr(decode, "fn", lambda *args: again.append(args) or measuring[decode](*args))
    assert memory.estimate(SMALL, 768, 512, 2, dtype=F32) == first
    assert again == [(SMALL.vae, F32)]
    monkeypatch.setattr(decode, "memo", {})
    assert decode(SMALL.vae, F32) == decode.memo[(SMALL.vae, F32)] and again == [(SMALL.vae, F32)]  # rewritten


def test_the_cache_is_keyed_on_every_module_a_measurement_runs(tmp_path, monkeypatch):
    """A measurement runs the networks, the sampler and the decode, not only the memory model: an edit to any
    module of minifusion/ keys new measurements."""
    from minifusion.memory import cache
    package = tmp_path / "minifusion"
    for name in ("demofusion.py", "models/unet.py", "memory/decoding.py"):
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text("x = 1\n")
    monkeypatch.setattr(cache, "PACKAGE", package)
    versions = set()
    for name in ("demofusion.py", "models/unet.py", "memory/decoding.py"):
        cache._code_version.cache_clear()
        versions.add(cache._code_version())
        (package / name).write_text("x = 2\n")
    cache._code_version.cache_clear()
    versions.add(cache._code_version())
    monkeypatch.undo()
    cache._code_version.cache_clear()
    assert len(versions) == 4
    assert (cache.PACKAGE / "demofusion.py").is_file() and (cache.PACKAGE / "memory" / "cache.py").is_file()


class _Calls(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def test_a_measured_configuration_decides_any_size_at_once():
    """Once a configuration is measured, estimate() and plan() at 16384 x 12288 px (64 scales, 127 x 95 local
    windows per step at the last) call no torch function at all: arithmetic on the coefficients (a meta run of the
    sampler at that size took more than 10 minutes)."""
    memory.estimate(TINY, SIZE, SIZE, dtype=F16)
    calls = _Calls()
    with calls:
        est = memory.estimate(TINY, 12288, 16384, 50, view_batch_size=1, dtype=F16, decode_tile=memory.DECODE_TILES[-1])
        chosen = memory.plan(24 << 30, TINY, 12288, 16384, F16, may_offload=True)
    assert calls.count == 0
    assert len(est["scales"]) == 64 and est["scales"][-1]["latent_size"] == (1536, 2048)
    windows = describe(12288, 16384, base_px=256, window=32, steps=50)[-1].groups[0]
    assert (windows.count, windows.size) == (95 * 127, (32, 32))
    assert chosen.view_batch_size in memory.VIEW_BATCHES


def test_an_fp16_vae_is_counted_in_fp16():
    # the fp16-fix VAE (vae_file) runs in float16 beside a float16 UNet: its weights and decode count half
    stock = memory.predict(TINY, 512, 512, torch.float16)
    fixed = memory.predict(TINY, 512, 512, torch.float16, vae_dtype=torch.float16)
    vae_params = sum(p.numel() for p in VAE(TINY.vae).parameters())
    assert [r["denoise_bytes"] for r in stock] == [r["denoise_bytes"] + 2 * vae_params for r in fixed]
    assert all(f["decode_bytes"] < s["decode_bytes"] for f, s in zip(fixed, stock))
