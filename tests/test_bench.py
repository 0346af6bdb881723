"""`make bench` keeps working: the tiny model, 1 step, through the same entry point (`python -m bench`), in a
subprocess, with every section that runs in seconds. Checks the JSON carries every field and the chart is a
PNG whose title names the view batch the run used; asserts no timings (benchmarks never gate CI), only that they
were measured."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from bench import chart

ROOT = Path(__file__).resolve().parents[1]

SETTINGS = {"model", "weights", "height", "width", "steps", "view_batch", "max_memory_bytes", "dtype", "device", "seed",
            "tiled_decode", "threads", "omp_wait_policy", "malloc_mmap_threshold_bytes", "argv"}
MACHINE = {"platform", "python", "torch", "cpu", "cpu_count", "torch_threads", "cpu_capability", "memory_bytes",
           "load_average"}
SCALE = {"scale", "latent_size", "image_size", "unet_evaluations", "unet_calls", "windows", "dilated_views",
         "denoise_seconds", "seconds_per_unet_evaluation", "decode_seconds", "seconds", "denoise_memory",
         "decode_memory", "unet_flops", "decode_flops", "denoise_tflops_per_second", "mfu"}
CPU_MEMORY = {"peak_rss_bytes", "peak_rss_growth_bytes", "peak_anon_growth_bytes"}
COMPONENT = {"component", "output_shape", "ours_seconds", "theirs_seconds", "time_ratio_ours_over_theirs",
             "speedup_theirs_over_ours", "ours_memory", "theirs_memory", "memory_ratio_ours_over_theirs",
             "max_abs_diff", "output_scale"}
CHECK = {"scale", "predicted_denoise_growth_bytes", "measured_denoise_growth_bytes", "predicted_decode_growth_bytes",
         "measured_decode_growth_bytes", "denoise_ratio", "decode_ratio"}


def test_bench_tiny_one_step(tmp_path):
    cmd = [sys.executable, "-m", "bench", "--model", "tiny", "--steps", "1", "--height", "512", "--width", "256",
           "--device", "cpu", "--dtype", "float32",
           "--repeat", "1", "--overhead-real", "no", "--out", str(tmp_path), "--predict-sizes", "512",
           "--max-memory", "1,0.0001",  # the generation runs within the first; the memory model plans both
           "--solvers", "--solver-steps", "1,2", "--solver-reference", "3", "--solver-sizes", "64x256"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (json_path,) = tmp_path.glob("*.json")
    (png_path,) = tmp_path.glob("*.png")
    r = json.loads(json_path.read_text())

    assert SETTINGS <= r["settings"].keys() and r["settings"]["steps"] == 1 and r["settings"]["height"] == 512
    assert r["settings"]["max_memory_bytes"] == [1 << 30, int(0.0001 * (1 << 30))]
    assert MACHINE <= r["machine"].keys()
    assert r["device"] == "cpu" and r["dtype"] == "float32" and r["torch"]
    assert r["peak"]["peak_tflops"] > 0

    g = r["generation"]
    assert [s["scale"] for s in g["scales"]] == [1, 2]  # 512 px on the tiny model's 256 px base
    assert [s["latent_size"] for s in g["scales"]] == [[32, 16], [64, 32]]
    for s in g["scales"]:
        assert SCALE <= s.keys(), SCALE - s.keys()
        assert CPU_MEMORY <= s["denoise_memory"].keys() and CPU_MEMORY <= s["decode_memory"].keys()
        assert s["unet_evaluations"] > 0 and s["denoise_seconds"] > 0 and s["decode_seconds"] > 0
        assert s["unet_flops"] > 0 and s["decode_flops"] > 0
    assert g["scales"][1]["unet_evaluations"] == 2 * (3 + 4)  # 3x1 windows + 2x2 dilated views, doubled for CFG
    assert {"unet", "decode", "text_encoders", "total"} <= g["flops"].keys() and g["mfu"] > 0

    assert r["max_memory_check"]["max_memory_bytes"] == 1 << 30 and r["max_memory_check"]["holds"]
    assert {s["view_batch_size"] for s in g["scales"]} == {64}  # 1 GiB leaves the tiny model every view at once
    assert ", view batch 64, decode tile " in chart.title(r)  # what ran, not the --view-batch asked for (none)
    for row in r["memory_check"]:
        assert CHECK <= row.keys()
    overhead = {"noop_step_seconds", "real_step_seconds", "non_unet_fraction", "non_unet_ops_per_step"}
    assert overhead <= r["overhead"].keys()

    c = r["components"]
    assert [row["component"] for row in c["rows"]] == ["unet", "vae_decode", "vae_decode_tiled", "text_encoder_1",
                                                      "text_encoder_2"]
    for row in c["rows"]:
        assert COMPONENT <= row.keys()
        # the same weights and inputs give the same outputs: the comparison is like for like (fp32)
        assert row["max_abs_diff"] <= 1e-4 * row["output_scale"], row["component"]

    m = r["memory_model"]
    assert {"activation_profile", "weights_bytes", "predictions", "plans", "assumptions"} <= m.keys()
    assert m["predictions"][0]["size"] == 512 and len(m["predictions"][0]["scales"]) == 2
    fits, impossible = m["plans"]
    assert fits["max_memory_bytes"] == 1 << 30 and fits["holds"] and fits["view_batch_size"] >= 1
    assert "needs at least" in impossible["error"]

    with Image.open(png_path) as im:
        assert im.format == "PNG" and im.size[0] > 0

    # samplers: 4096^2 evaluations from the work description, and the accuracy table's fields
    assert [e["total"] for e in r["evaluations_4096"]] == [11300, 4520, 904, 5700]
    (table,) = r["solvers"]
    # steps 1 and 2 for every sampler, and DDIM's 50, the target
    assert table["reference_steps"] == 3 and len(table["rows"]) == 2 * 9 + 1 and table["ddim_50_error"] > 0
    for row in table["rows"]:  # phase 1 alone: one view, two CFG rows a step
        assert row["evaluations"] == 2 * row["steps"] and math.isfinite(row["error"]) and row["error"] > 0
    assert "random weights: solvers on a smooth denoiser, not image quality" in proc.stdout


def test_bench_has_one_name_for_the_memory_budget():
    from bench.run import parse_args
    assert parse_args(["--max-memory", "8,500MiB"]).max_memory == [8 << 30, 500 << 20]
    with pytest.raises(SystemExit):
        parse_args(["--budget", "8"])  # the CLI's name is --max-memory; bench has no other


@pytest.mark.parametrize("largest", [0.0371, 0.99, 1.0, 7.01, 82.3, 1024.0, 3.2e9, 1e-7])
def test_chart_gridlines_are_round_and_cover_the_largest_value(largest):
    grid = chart.ticks(largest)
    step = grid[1]
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert any(math.isclose(mantissa, m) for m in (1, 2, 2.5, 5)), grid
    assert grid[0] == 0 and all(math.isclose(b - a, step) for a, b in zip(grid, grid[1:]))
    assert grid[-2] < largest <= grid[-1] and len(grid) <= 6


# the distributed mode (bench/distributed.py): JSON fields, not timings
RANK_SCALE = {"scale", "latent_size", "steps", "view_batch_size", "decode_tile", "views_per_step", "unet_evaluations",
              "unet_calls", "denoise_seconds", "step_seconds", "seconds_per_step", "decode_seconds", "seconds", "unet",
              "collective", "decode_collective", "latents_checksum", "image_checksum"}
ROW = {"ranks", "seconds", "seconds_per_scale", "denoise_seconds", "seconds_per_step", "decode_seconds",
       "collective_share", "collective_share_per_scale", "collective_seconds_per_step", "bytes_received_per_step",
       "decode_collective_seconds", "unet_seconds_per_rank", "checksums", "outputs_equal", "machine", "speedup",
       "denoise_speedup", "decode_speedup", "same_as_one_rank"}


def test_bench_distributed_mode_tiny(tmp_path):
    cmd = [sys.executable, "-m", "bench", "--ranks", "1,2", "--steps", "1", "--height", "512", "--width", "256",
           "--device", "cpu", "--dtype", "float32", "--warmup-steps", "0", "--predict-gpus", "", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (json_path,) = tmp_path.glob("*-distributed-tiny-cpu.json")
    r = json.loads(json_path.read_text())
    assert r["mode"] == "distributed" and r["settings"]["ranks"] == [1, 2] and r["settings"]["threads_per_rank"] == 1
    assert MACHINE <= r["machine"].keys()
    one, two = r["runs"]
    assert (one["ranks"], one["backend"], len(one["per_rank"])) == (1, None, 1)
    assert (two["ranks"], two["backend"], len(two["per_rank"])) == (2, "gloo", 2)
    for run in r["runs"]:
        assert run["outputs_equal"]  # every rank got the same latents and pixels
        for rank in run["per_rank"]:
            assert [s["scale"] for s in rank["scales"]] == [1, 2]
            for s in rank["scales"]:
                assert RANK_SCALE <= s.keys(), RANK_SCALE - s.keys()
                assert s["denoise_seconds"] > 0 and s["decode_seconds"] > 0 and len(s["step_seconds"]) == 1
    # the 2 ranks share each step's UNet calls: together they made the calls one process made, once
    calls = [sum(rank["scales"][1]["unet"]["calls"] for rank in run["per_rank"]) for run in r["runs"]]
    assert calls[0] == calls[1] > 0 and min(rank["scales"][1]["unet"]["calls"] for rank in two["per_rank"]) > 0
    assert two["per_rank"][0]["scales"][1]["collective"]["calls"] == 1  # one all_gather per step
    assert two["per_rank"][0]["scales"][1]["collective"]["bytes_received"] > 0
    rows = r["table"]
    assert [row["ranks"] for row in rows] == [1, 2]
    for row in rows:
        assert ROW <= row.keys(), ROW - row.keys()
    assert rows[1]["same_as_one_rank"]  # fp32, one thread a rank: bit for bit what one process makes
    assert "work_count_bound" in rows[1]
    assert r["target"]["ranks"] == 2 and r["target"]["speedup"] == 1.7 and "met" in r["target"]
    assert "target: 2 ranks >= 1.7x of 1 rank" in proc.stdout


def test_distributed_prediction_counts_the_work():
    from bench.distributed import decode_share, decode_stages, predict, step_calls
    from minifusion.tiny import TINY
    # the tiny model at 1024^2 has SDXL's geometry at 4096^2 in latents / 4: 1, 13, 34, 65 views a step
    calls = step_calls(TINY.unet, 1024, 1024, 16)
    assert [sum(n for n, _, _ in c) for c in calls] == [1, 13, 34, 65]
    assert [n for n, _, _ in calls[3]] == [16, 16, 16, 1, 16]  # 49 windows, then 16 dilated views
    p = predict(TINY, 1024, 1024, [2, 4], 16)
    two = p["worlds"][2]["scales"]
    assert two[0]["busiest_rank_unet_share"] == 1  # phase 1's one view: one rank works, the other waits
    assert math.isclose(two[3]["busiest_rank_unet_share"], 33 / 65)  # 16 + 16 + 1 against 16 + 16
    for world, w in p["worlds"].items():
        assert 1 < w["speedup"] < world and all(s["gather_bytes_per_step"] > 0 for s in w["scales"][1:])
    stages = decode_stages(TINY.vae, 64, 64)  # a 512 px image: its last stages have 2 tile rows of 256
    total, busiest = decode_share(stages, 1, 256)
    assert total == busiest > 0 and decode_share(stages, 2, 256)[1] < total
