"""Behaviour kept across refactors: the runs of tests/golden_cases.py, made again, write what the code of
2026-12-07 wrote (tests/golden/): the same PNG text, and the same latents and pixels.

On the machine that made the golden files the pixels and latents are bit-identical; another CPU may round a sum
differently (the same run with 2 threads instead of 1 moves the latents by up to 3e-5), so elsewhere they must
agree within float rounding: latents within 5e-4, each 8 x 8 block's mean pixel within half a level.
Where a fix changes what a PNG records, CHANGES says how, and the expected text is edited by it here, not
regenerated.
"""
import json
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

from golden_cases import RESUME, cases, run_all

GOLDEN = Path(__file__).resolve().parent / "golden"
# (case, what changed in the metadata, edit(expected record) -> the record now expected)
SAMPLING = {"schedule": "leading", "timesteps": None, "guidance_rescale": 0.0, "strength": 1.0,
            "prediction": "epsilon", "zero_snr": False}


def _sampling(rec: dict) -> None:
    settings = rec["minifusion"]["settings"]
    sampler = settings.pop("scheduler")
    settings.update(SAMPLING, sampler=sampler, eta=0.0 if sampler == "ddim" else None)


CHANGES: list = [(case, "issue 20: the sampling settings (sampler, the older scheduler's new name, schedule, "
                        "timesteps, eta, guidance_rescale, strength, prediction, zero_snr) in the JSON; the A1111 "
                        "text unchanged", _sampling)
                 for case in ("text", "euler", "plain", "image", "budget", "adapters", "resume")]


def test_golden_runs_write_what_they_wrote_before(tmp_path, one_thread):
    expected = json.loads((GOLDEN / "expected.json").read_text())
    expected_latents = load_file(str(GOLDEN / "latents.safetensors"))
    for case, _, edit in CHANGES:
        for name, rec in expected[case].items():
            edit(rec)
    results, latents = run_all(tmp_path)
    assert set(results) == {*cases(tmp_path), RESUME}
    exact = True
    for case, files in expected.items():
        assert set(results[case]) == set(files), case
        for name, want in files.items():
            got = results[case][name]
            assert got["size"] == want["size"], (case, name)
            assert got["parameters"] == want["parameters"], (case, name)
            assert got["minifusion"] == want["minifusion"], (case, name)
            key = f"{'adapters_run' if case == 'adapters' else case}/{name}"
            z, z0 = latents[key], expected_latents[key]
            assert z.shape == z0.shape, key
            assert (z - z0).abs().max().item() <= 5e-4, (key, (z - z0).abs().max().item())
            assert np.allclose(got["anchor"], want["anchor"], atol=5e-4), key
            assert np.abs(np.array(got["pixels_pooled"]) - np.array(want["pixels_pooled"])).max() <= 0.5, key
            exact &= got["pixels_sha256"] == want["pixels_sha256"] and got["latents_sha256"] == want["latents_sha256"]
    print("bit-identical to the golden run" if exact else "equal within float rounding (another CPU?)")
