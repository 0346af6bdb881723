"""python -m bench [--model tiny|sdxl | --weights PATH] [--height H --width W --steps N ...]

Sections (each optional except where noted):
  generation   a DemoFusion run through minifusion's Pipeline, per scale (default on; --no-generate)
  overhead     share of a step outside the UNet: the last scale's step with a no-op UNet (default on)
  components   ours vs diffusers/transformers on shared weights: --components tiny|full|none (default tiny)
  loading      a full-size fp16 single file into our models, in a fresh process: --loading
  memory       the memory model for this model: --predict-sizes 2048,3072,4096 and --max-memory 8,12,24 (GiB;
               the generation, when on, runs within the first)
  samplers     UNet evaluations of a 4096^2 SDXL run at four recipes (always; arithmetic), and --solvers: each
               sampler's accuracy against a 1000-step reference for the UNet evaluations it spends (bench/solvers.py)
  distributed  --ranks 1,2: instead of the above, one image view-parallel over each rank count, measured, and the
               speed-up predicted for 2/4/8 GPUs (bench/distributed.py)
Writes bench/results/<stamp>-<model>-<device>.json and .png (git-ignored) and prints tables.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from minifusion import memory
from minifusion.checkpoint import inspect_checkpoint
from minifusion.pipeline import default_device, default_dtype, resident

from . import chart, components, distributed, generation, loading, solvers
from .measure import fix_mmap_threshold, machine, peak_tflops
from .models import CONFIGS, make_pipeline

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
RESULTS = Path(__file__).resolve().parent / "results"
GiB = float(1 << 30)


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(CONFIGS), default="tiny",
                    help="tiny: small random SDXL-shaped model; sdxl: full SDXL architecture, random weights")
    ap.add_argument("--weights", type=Path, help="a real checkpoint instead of random weights (file or folder)")
    ap.add_argument("--height", type=int, help="final height in px (default: 2x the base size)")
    ap.add_argument("--width", type=int, help="final width in px (default: 2x the base size)")
    ap.add_argument("--steps", type=int, default=50, help="denoising steps per scale (default 50)")
    ap.add_argument("--view-batch", type=int, dest="view_batch",
                    help="views per UNet call (default 16, or what --max-memory allows)")
    ap.add_argument("--dtype", choices=list(DTYPES),
                    help="default as the CLI: float16 on GPUs; bfloat16 on CPUs with bf16 hardware, else float32")
    ap.add_argument("--device", help="cuda, mps or cpu (default: the first available)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--no-tiled-decode", dest="tiled_decode", action="store_false")
    ap.add_argument("--no-generate", dest="generate", action="store_false", help="skip the generation")
    ap.add_argument("--no-overhead", dest="overhead", action="store_false", help="skip the non-UNet share")
    ap.add_argument("--overhead-real", choices=["auto", "yes", "no"], default="auto",
                    help="time the overhead step with the real UNet too (auto: only for the tiny model)")
    ap.add_argument("--components", choices=["none", "tiny", "full"], default="tiny",
                    help="ours vs the reference implementation at the tiny config or at full SDXL size")
    ap.add_argument("--only", default="", help="components: comma-separated subset of unet, vae_decode, "
                    "vae_decode_tiled, text_encoder_1, text_encoder_2")
    ap.add_argument("--repeat", type=int, default=3, help="timed forwards per component (median reported)")
    ap.add_argument("--loading", action="store_true", help="measure loading a full-size fp16 single file")
    ap.add_argument("--loading-dir", type=Path, default=loading.DEFAULT_DIR,
                    help="where the random full-size checkpoint is written once and reused (~7 GB)")
    ap.add_argument("--loading-loras", action="store_true",
                    help="--loading: each load also with two random full-size LoRAs merged (rank 32 and 64)")
    ap.add_argument("--predict-sizes", default="", help="memory model: comma-separated square sizes in px")
    ap.add_argument("--max-memory", type=lambda text: [memory.parse_size(t, unit=GiB) for t in text.split(",")],
                    default=[], help="device memory budgets, comma-separated, e.g. 8 (GiB), 12GiB or 500MiB, as the "
                    "CLI's --max-memory: the memory model plans each; the generation runs within the first "
                    "(generate(max_memory=...)) and its measured peak is checked against it")
    ap.add_argument("--predict-dtype", choices=list(DTYPES), default="float16",
                    help="dtype of the memory model's predictions (default float16, as on a GPU)")
    ap.add_argument("--solvers", action="store_true",
                    help="each sampler x --solver-steps against a reference run of each --solver-sizes")
    ap.add_argument("--solver-steps", type=lambda t: [int(v) for v in t.split(",")], default=[4, 8, 16, 32, 50],
                    help="step counts of the accuracy table (default 4,8,16,32,50)")
    ap.add_argument("--solver-reference", type=int, default=1000, help="DDIM steps of the reference (default 1000)")
    ap.add_argument("--solver-schedule", help="one schedule for every sampler of the accuracy table (default: "
                    "each sampler's automatic one)")
    ap.add_argument("--solver-sizes", type=lambda t: [v for v in t.split(",") if v], default=["64x256", "192x768"],
                    help="WxH of each run of the accuracy table (default 64x256,192x768: phase 1 alone and 3 scales "
                    "on the tiny model, each as narrow as a run may be)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder (default bench/results)")
    distributed.add_arguments(ap)
    return ap.parse_args(argv)


def _gib(b) -> str:
    return "-" if b is None else f"{b / GiB:.2f}"


def print_generation(g: dict, device: torch.device) -> None:
    key = "peak_allocated_bytes" if device.type == "cuda" else "peak_rss_growth_bytes"
    label = "alloc GiB" if device.type == "cuda" else "RSS+ GiB"
    print(f"\n{'scale':>5} {'latent':>9} {'evals':>6} {'denoise s':>10} {'s/eval':>8} {'decode s':>9} "
          f"{'den ' + label:>14} {'dec ' + label:>14} {'TFLOP/s':>8} {'MFU':>7}")
    for r in g["scales"]:
        mfu = f"{r['mfu']:.2%}" if r.get("mfu") is not None else "-"
        print(f"{r['scale']:>5} {'x'.join(map(str, r['latent_size'])):>9} {r['unet_evaluations']:>6} "
              f"{r['denoise_seconds']:>10.2f} {r['seconds_per_unet_evaluation']:>8.4f} {r['decode_seconds']:>9.2f} "
              f"{_gib(r['denoise_memory'].get(key)):>14} {_gib(r['decode_memory'].get(key)):>14} "
              f"{r['denoise_tflops_per_second']:>8.3f} {mfu:>7}")
    f = g["flops"]
    mfu = f"{g['mfu']:.2%}" if g.get("mfu") is not None else "-"
    print(f"FLOPs: UNet {f['unet'] / 1e12:.2f} T, decode {f['decode'] / 1e12:.2f} T, text encoders "
          f"{f['text_encoders'] / 1e12:.4f} T; denoising {g['denoise_tflops_per_second']:.3f} TFLOP/s, MFU {mfu}")


def _mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def print_check(rows: list[dict]) -> None:
    print("\nmemory model vs this run (growth over the resident weights)")
    print(f"{'scale':>5} {'denoise pred MiB':>17} {'measured':>9} {'ratio':>6} {'decode pred MiB':>16} "
          f"{'measured':>9} {'ratio':>6}")
    for r in rows:
        dr = f"{r['denoise_ratio']:.2f}" if r["denoise_ratio"] else "-"
        vr = f"{r['decode_ratio']:.2f}" if r["decode_ratio"] else "-"
        print(f"{r['scale']:>5} {_mib(r['predicted_denoise_growth_bytes']):>17} "
              f"{_mib(r['measured_denoise_growth_bytes']):>9} {dr:>6} {_mib(r['predicted_decode_growth_bytes']):>16} "
              f"{_mib(r['measured_decode_growth_bytes']):>9} {vr:>6}")


def print_components(c: dict) -> None:
    print(f"\ncomponents ({c['config']}, {c['device']}, {c['dtype']}; UNet at {c['unet_latent']}^2 latents x 2, "
          f"VAE at {c['vae_latent']}^2 latents; median of {c['repeat']})")
    print(f"{'component':>17} {'ours s':>9} {'theirs s':>9} {'ours/theirs':>12} {'mem ours MiB':>13} "
          f"{'mem theirs MiB':>15} {'max |diff|':>10}")
    for r in c["rows"]:
        key = "peak_tensor_bytes" if "peak_tensor_bytes" in r["ours_memory"] else "peak_allocated_growth_bytes"
        print(f"{r['component']:>17} {r['ours_seconds']:>9.4f} {r['theirs_seconds']:>9.4f} "
              f"{r['time_ratio_ours_over_theirs']:>12.3f} {r['ours_memory'][key] / 2**20:>13.1f} "
              f"{r['theirs_memory'][key] / 2**20:>15.1f} {r['max_abs_diff']:>10.2e}")


def memory_section(cfgs, sizes: list[int], budgets: list[int], dtype: torch.dtype) -> dict:
    out = {"dtype": str(dtype).replace("torch.", ""), "device": "cuda (predicted)",
           "assumptions": {"fragmentation": memory.FRAGMENTATION, "cuda_context_bytes": memory.CUDA_CONTEXT_BYTES},
           "activation_profile": vars(memory.activation_profile(cfgs.unet, dtype)),
           "weights_bytes": memory.weights_bytes(cfgs, dtype), "predictions": [], "plans": []}
    base = cfgs.unet.sample_size * 8
    print(f"\nmemory model ({out['dtype']}, CUDA, predicted; text encoders wait on the host): weights "
          + ", ".join(f"{k} {_gib(v)} GiB" for k, v in out["weights_bytes"].items()))
    p = out["activation_profile"]
    print(f"UNet activations per call: {p['fixed']} B + n x ({p['per_sample']} B + {p['per_sample_pixel']:.0f} B "
          "x h x w)")
    on_gpu = resident(torch.device("cuda"))
    out["resident_on_gpu"] = list(on_gpu)
    for size in sizes:
        rows = memory.predict(cfgs, size, size, dtype, resident=on_gpu)
        need = max(memory.needs(rows))
        out["predictions"].append({"size": size, "view_batch_size": 16, "decode_tile": 256, "scales": rows,
                                   "required_bytes": need})
        print(f"{size}x{size} (view batch 16, tile 256): " + "; ".join(
            f"x{r['scale']} denoise {_gib(r['denoise_bytes'])} decode {_gib(r['decode_bytes'])} "
            f"(host {_gib(r['host_decode_bytes'])})" for r in rows) + f" GiB -> needs {_gib(need)} GiB")
    print("--max-memory plans (" + ", ".join(on_gpu) + " kept on the GPU as minifusion.load does, unless only "
          "taking turns fits):")
    for size in sizes or [4 * base]:
        for budget in budgets:
            entry = {"max_memory_bytes": budget, "size": size}
            try:
                vb, tile, kept = memory.plan(budget, cfgs, size, size, dtype, resident=on_gpu, may_offload=True)
                rows = memory.predict(cfgs, size, size, dtype, vb, tile, resident=kept)
                need = max(memory.needs(rows))
                entry.update(view_batch_size=vb, decode_tile=tile, resident=list(kept), required_bytes=need,
                             holds=need <= budget)
                print(f"  {_gib(budget)} GiB, {size}x{size}: view_batch_size {vb}, decode tile {tile}"
                      + ("" if kept else ", UNet and VAE take turns") + f" -> needs {_gib(need)} GiB "
                      f"({'holds' if entry['holds'] else 'EXCEEDS'})")
            except ValueError as e:
                entry["error"] = str(e)
                print(f"  {_gib(budget)} GiB: {e}")
            out["plans"].append(entry)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.ranks:  # the distributed mode: its own runs, tables and JSON
        return distributed.run(args)
    mmap_threshold = fix_mmap_threshold()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else default_device()
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype(device)
    cfgs = inspect_checkpoint(args.weights) if args.weights else CONFIGS[args.model]
    base = cfgs.unet.sample_size * 8
    height, width = args.height or 2 * base, args.width or 2 * base
    model = "weights" if args.weights else args.model
    result = {"settings": {"model": model, "weights": str(args.weights) if args.weights else None,
                           "height": height, "width": width, "steps": args.steps, "view_batch": args.view_batch,
                           "max_memory_bytes": args.max_memory,
                           "dtype": str(dtype).replace("torch.", ""), "device": str(device), "seed": args.seed,
                           "tiled_decode": args.tiled_decode, "threads": torch.get_num_threads(),
                           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                           "malloc_mmap_threshold_bytes": mmap_threshold, "argv": sys.argv[1:]},
              "machine": machine(device), "device": str(device), "torch": torch.__version__,
              "dtype": str(dtype).replace("torch.", "")}
    print(f"minifusion bench: {model} on {device} ({result['dtype']}), {width}x{height}, {args.steps} steps, "
          f"{torch.get_num_threads()} threads")

    sections = result["section_seconds"] = {}
    clock = time.perf_counter()

    def lap(name):
        nonlocal clock
        now = time.perf_counter()
        sections[name] = now - clock
        clock = now

    real = args.overhead and (args.overhead_real == "yes" or (args.overhead_real == "auto" and args.model == "tiny"
                                                               and not args.weights))
    pipe = None
    if args.generate or real:
        result["peak"] = peak_tflops(device, dtype)
        print(f"peak: {result['peak']['peak_tflops']:.3f} TFLOP/s ({result['peak']['source']})")
        start = time.perf_counter()
        pipe = make_pipeline(args.model, args.weights, device, dtype)
        result["build_seconds"] = time.perf_counter() - start
        lap("build")
    within = args.max_memory[0] if args.max_memory else None  # the generation runs within the first budget
    if args.generate and within:
        try:
            pipe.plan_memory(within, height, width, untiled_decode=not args.tiled_decode)
        except ValueError as e:
            print(f"error: --max-memory {_gib(within)} GiB (the generation's): {e}; pass --no-generate to only "
                  "plan", file=sys.stderr)
            return 2
    if args.generate:
        g = generation.run(pipe, height, width, args.steps, args.view_batch, args.seed,
                           result["peak"]["peak_tflops"], args.tiled_decode, within)
        result["generation"] = g
        print_generation(g, device)
        result["memory_check"] = generation.predicted_vs_measured(pipe, g, height, width)
        print_check(result["memory_check"])
        if within:
            b = result["max_memory_check"] = generation.max_memory_check(pipe, g, within)
            print(f"max memory {_gib(b['max_memory_bytes'])} GiB: view batch {g['scales'][0]['view_batch_size']}, "
                  f"decode tile {g['scales'][0]['decode_tile']}; used {_gib(b['used_bytes'])} GiB "
                  f"({'holds' if b['holds'] else 'EXCEEDS'})")
        lap("generation")
    if args.overhead:
        o = generation.non_unet_fraction(cfgs, device, dtype, height, width, args.view_batch or 16,
                                         unet=pipe.unet if real else None)
        if not real and args.generate:  # the generation's own step time at the last scale
            o["real_step_seconds"] = result["generation"]["scales"][-1]["denoise_seconds"] / args.steps
            o["real_step_source"] = "generation, last scale, denoise seconds / steps"
            o["non_unet_fraction"] = o["noop_step_seconds"] / o["real_step_seconds"]
        result["overhead"] = o
        frac = f"{o['non_unet_fraction']:.2%}" if "non_unet_fraction" in o else "-"
        real_ms = f"{o['real_step_seconds'] * 1e3:.1f} ms" if "real_step_seconds" in o else "(no real step timed)"
        print(f"\nnon-UNet work of one step at the last scale ({width}x{height}): "
              f"{o['noop_step_seconds'] * 1e3:.1f} ms "
              f"({o['non_unet_ops_per_step']} ops) of {real_ms} -> {frac}")
        lap("overhead")
    del pipe

    if args.components != "none":
        result["components"] = components.run(args.components if args.components == "tiny" else "sdxl", device,
                                              dtype, repeat=args.repeat,
                                              only=tuple(c for c in args.only.split(",") if c) or None)
        print_components(result["components"])
        lap("components")

    if args.loading:
        result["loading"] = loading.run(args.loading_dir, CONFIGS["sdxl"], device="cpu", loras=args.loading_loras)
        print(f"\nloading {result['loading']['file']} ({result['loading']['file_bytes'] / 1e9:.2f} GB):")
        for r in result["loading"]["loads"]:
            loras = f" + {len(r['loras'])} LoRAs ({r['lora_bytes'] / 1e9:.2f} GB)" if r["loras"] else ""
            print(f"  -> {r['dtype']:>9} {'cold' if r['cold'] else 'warm'}{loras}: {r['seconds']:.1f} s, "
                  f"peak RSS growth {r['peak_rss_growth_bytes'] / 1e9:.2f} GB = {r['peak_rss_over_file']:.2f} x file "
                  f"({'meets' if r['target_met'] else 'MISSES'} <= 1.3{' + LoRAs' if loras else ''}), "
                  f"anon {r['peak_anon_growth_bytes'] / 1e9:.2f} GB")
        lap("loading")

    result["evaluations_4096"] = solvers.evaluations()
    solvers.print_evaluations(result["evaluations_4096"])
    if args.solvers:
        pipe = make_pipeline(args.model, args.weights, device, dtype)
        result["solvers"] = solvers.run(pipe, args.solver_sizes, args.solver_steps, args.solver_reference, args.seed,
                                        args.solver_schedule)
        del pipe
        lap("solvers")

    sizes = [int(s) for s in args.predict_sizes.split(",") if s]
    if sizes or args.max_memory:
        result["memory_model"] = memory_section(cfgs, sizes, args.max_memory, DTYPES[args.predict_dtype])
        lap("memory_model")

    print("\nseconds per section: " + ", ".join(f"{k} {v:.1f}" for k, v in sections.items()))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{model}-{device.type}"
    json_path = args.out / f"{stem}.json"
    json_path.write_text(json.dumps(result, indent=1, default=str))
    print(f"\nwrote {json_path}")
    if "generation" in result:
        print(f"wrote {chart.draw(result, args.out / f'{stem}.png')}")
    return 0
