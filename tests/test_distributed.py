"""View parallelism on torch.distributed (gloo, one thread per rank): 2 and 3 ranks give what one process gives,
bit for bit — latents, pixels, tiled decode and encode, image-to-image — and a failure or out of memory on one
rank reaches every rank."""
import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minifusion.decode import decode_tiled
from minifusion.distributed import assign, images_of_rank
from minifusion.encode import encode_tiled
from minifusion.files import load_latents

sys.path.insert(0, str(Path(__file__).parent))
import distributed_cases as cases  # noqa: E402

CASES_SCRIPT = Path(__file__).with_name("distributed_cases.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(n: int, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def alone(tiny_pipe, one_thread):
    """What one process computes for every case of distributed_cases.py."""
    out = {name: tiny_pipe.generate(**kw) for name, kw in cases.CASES.items()}
    g = torch.Generator().manual_seed(5)
    latents = torch.randn(1, 4, 40, 24, generator=g)
    out["decode"] = decode_tiled(tiny_pipe.vae, latents, tile=64)
    out["encode"] = encode_tiled(tiny_pipe.vae, torch.rand(1, 3, 200, 136, generator=g) * 2 - 1, tile=64)
    out["img2img"] = {b: tiny_pipe.generate("a fox", image=tiny_pipe.decode(latents), num_inference_steps=2, seed=2,
                                            view_batch_size=b) for b in (4, 2)}
    # out of memory on one rank halves the view batch, as it does in one process: the rest runs 1 view a call
    out["oom"] = tiny_pipe.generate(**(cases.OOM | {"view_batch_size": 1}))
    return out


@pytest.mark.parametrize("n", [2, 3])
def test_view_parallel_equals_one_process(n, tiny_file, alone, tmp_path):
    proc = torchrun(n, CASES_SCRIPT, tiny_file, tmp_path / "got.pt")
    assert proc.returncode == 0, proc.stderr[-3000:]
    everyone = torch.load(tmp_path / "got.pt", weights_only=False)
    assert len(everyone) == n
    for got in everyone:
        for name in cases.CASES:
            want = alone[name]
            assert len(got[name]["latents"]) == len(want.latents)
            for a, b in zip(got[name]["latents"], want.latents):
                assert torch.equal(a, b), name
            for a, b in zip(got[name]["pixels"], want.images):
                assert np.array_equal(a, np.asarray(b)), name
            assert got[name]["evals"] == [s["unet_evaluations"] for s in want.stats]
        assert torch.equal(got["decode"], alone["decode"])
        assert all(torch.equal(a, b) for a, b in zip(got["encode"], alone["encode"]))
        # the batch the ranks chose spreads the 512x304 run's 6 windows (32^2) + 4 dilated views (32x19)
        # (distributed.view_batch; by hand, the busiest rank's latent pixels: 2 ranks 4 -> 5088, 1 -> 4896 best;
        # 3 ranks 2 and 1 -> 3872), and one process given that batch makes the same image
        assert got["img2img_batch"] == {2: 4, 3: 2}[n]
        assert all(torch.equal(a, b) for a, b in zip(got["img2img"], alone["img2img"][got["img2img_batch"]].latents))
        assert all(torch.equal(a, b) for a, b in zip(got["oom"], alone["oom"].latents))
    # the injected failure on the last rank: that rank raises it, every other rank names it and the rank
    assert everyone[-1]["failure"] == "ValueError: injected failure"
    for got in everyone[:-1]:
        assert got["failure"] == f"DistributedError: rank {n - 1} failed in a UNet call: ValueError: injected failure"


def test_assign_balances_whole_calls():
    # the costliest call first, each to the least loaded rank; ties to the lower rank
    assert assign([16, 16, 16, 1, 16], 4) == [0, 1, 2, 0, 3]
    assert assign([5, 3, 3], 2) == [0, 1, 1]
    assert assign([1, 1, 1], 1) == [0, 0, 0]
    assert assign([], 3) == []


def test_images_of_rank_split_without_overlap():
    assert [images_of_rank(7, r, 3) for r in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]
    assert images_of_rank(1, 1, 2) == []


CLI = ["a red fox", "--height", "768", "--width", "384", "--steps", "2", "--seed", "3", "--view-batch", "3",
       "--device", "cpu", "--dtype", "float32"]
# image parallel needs no large image, only more images than ranks: 2 scales, a quarter of CLI's pixels
MANY = [*CLI, "--height", "512", "--width", "256", "--count", "3"]


def files_of(folder: Path) -> dict[str, object]:
    """PNGs as bytes; latents files as what they hold but their timings (which differ between any two runs)."""
    out = {}
    for p in sorted(folder.iterdir()):
        if p.name.endswith(".latent.safetensors"):
            saved = load_latents(p)
            out[p.name] = (saved.latents.numpy().tobytes(), saved.generator_state.numpy().tobytes(), saved.scale,
                           saved.anchor_mean, saved.anchor_std, json.dumps(saved.settings, sort_keys=True))
        else:
            out[p.name] = p.read_bytes()
    return out


@pytest.fixture(scope="module")
def cli_alone(tiny_file, tmp_path_factory):
    """One process's files: one image (view parallel's reference) and three (image parallel's)."""
    out = tmp_path_factory.mktemp("alone")
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    for name, args in (("one", CLI), ("three", MANY)):
        (out / name).mkdir()
        proc = subprocess.run([sys.executable, "-m", "minifusion", *args, "--weights", str(tiny_file),
                               "--out", str(out / name / "fox.png")], capture_output=True, text=True, timeout=300,
                              env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("n", [2, 3])
def test_torchrun_writes_the_files_one_process_writes(n, tiny_file, cli_alone, tmp_path):
    # one image: the ranks share every step; rank 0 alone writes, says the plan and shows progress
    proc = torchrun(n, "-m", "minifusion", *CLI, "--weights", tiny_file, "--out", tmp_path / "fox.png")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert files_of(tmp_path) == files_of(cli_alone / "one")  # PNGs byte for byte, latents bit for bit
    assert proc.stderr.count("plan: 3 scale(s)") == 1 and proc.stderr.count("wrote ") == 3


def test_torchrun_splits_several_images_over_the_ranks(tiny_file, cli_alone, tmp_path):
    proc = torchrun(2, "-m", "minifusion", *MANY, "--weights", tiny_file, "--out", tmp_path / "fox.png")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert files_of(tmp_path) == files_of(cli_alone / "three")
    assert "rank 1: wrote" in proc.stderr  # each rank writes its own images


def test_without_a_seed_the_ranks_share_the_one_drawn(tiny_file, tmp_path):
    """Every rank drew its own seed, so the ranks' views disagreed from scale 2 on and no seed reproduced the
    image; with --count, rank 1's files carried another seed than the one printed. The seed is drawn once."""
    small = ["a red fox", "--height", "512", "--width", "256", "--steps", "2", "--device", "cpu", "--dtype", "float32"]
    ranks, alone = tmp_path / "ranks", tmp_path / "alone"
    ranks.mkdir()
    alone.mkdir()
    proc = torchrun(2, "-m", "minifusion", *small, "--weights", tiny_file, "--out", ranks / "fox.png")
    assert proc.returncode == 0, proc.stderr[-3000:]
    seed = json.loads(Image.open(ranks / "fox.png").text["minifusion"])["settings"]["seed"]
    assert proc.stderr.count(f"seed {seed} (drawn at random") == 1
    # one process given the PNG's settings (its seed, and the view batch the ranks chose) makes the same files
    done = subprocess.run([sys.executable, "-m", "minifusion", "--settings-from", str(ranks / "fox.png"), "--out",
                           str(alone / "fox.png"), "--device", "cpu", "--dtype", "float32"], capture_output=True,
                          text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert files_of(ranks) == files_of(alone)  # PNGs byte for byte, latents bit for bit
    many = tmp_path / "many"
    many.mkdir()
    proc = torchrun(2, "-m", "minifusion", *small, "--steps", "1", "--count", "2", "--weights", tiny_file,
                    "--out", many / "fox.png")
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = int(proc.stderr.split("seed ", 1)[1].split(" ")[0])
    names = sorted(p.name for p in many.glob("fox-*.png") if ".x1." not in p.name)
    assert names == [f"fox-00001-{first}.png", f"fox-00002-{first + 1}.png"]
    for name, seed in zip(names, (first, first + 1)):  # rank 1 wrote the second, under the shared seed + 1
        assert json.loads(Image.open(many / name).text["minifusion"])["settings"]["seed"] == seed


def test_a_bad_request_under_torchrun_is_said_once(tiny_file, tmp_path):
    proc = torchrun(2, "-m", "minifusion", "a cat", "--weights", tiny_file, "--out", tmp_path / "x.png",
                    "--height", "500", timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("error: --height 500 is not a multiple of 8; pick e.g. 496") == 1
    # no rank raised (torchrun then prints its frames as "[rankN]: ..."); torchrun's own report of the exit
    # status follows, which is torchrun's doing
    assert "[rank" not in proc.stderr and "minifusion/__main__.py" not in proc.stderr


def test_a_rank_that_dies_does_not_leave_the_others_waiting(tiny_file, tmp_path):
    port = free_port()
    script = Path(__file__).with_name("distributed_vanish.py")
    procs = [subprocess.Popen([sys.executable, str(script), str(tiny_file), str(tmp_path / f"rank{r}.json")],
                              env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "RANK": str(r),
                                   "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for r in (0, 1)]
    codes = [p.wait(timeout=240) for p in procs]
    assert codes[1] == 3  # it died as told
    got = json.loads((tmp_path / "rank0.json").read_text())
    # rank 0 stops with an error well before its 20 s collective timeout would have to end the wait
    assert got["outcome"] != "finished" and got["outcome"].split(":")[0].endswith("Error"), got
    assert got["seconds"] < 60


def test_with_no_view_batch_asked_the_ranks_get_calls_to_share():
    from minifusion.distributed import view_batch
    from minifusion.work import describe
    # all views 128^2 latents; worked by hand, the busiest rank's views summed over the scales (phase 1: 1 view)
    at_2048, at_4096 = (describe(size, size, base_px=1024, window=128, steps=1) for size in (2048, 4096))
    assert view_batch(at_2048, 1) == 16 and view_batch(at_4096, 1) == 16  # one rank: every batch does all the work
    # 2048^2 (9 windows + 4 dilated views): 2 ranks 16: 10, 8: 9, 4: 9, 2: 8, 1: 8 -> the largest within 5 % of 8
    assert view_batch(at_2048, 2) == 2
    assert view_batch(at_2048, 4) == 4  # 16: 10, 8: 9, 4: 5, 2: 5, 1: 5
    assert view_batch(at_2048, 8) == 2  # 4: 5, 2: 3, 1: 3
    # 4096^2 (13, 34, 65 views): 2 ranks 16: 61, 8: 59, 4: 59, 2: 58, 1: 58 -> 8 (59 <= 60.9)
    assert view_batch(at_4096, 2) == 8
    assert view_batch(at_4096, 8) == 2  # 16: 42, 8: 26, 4: 19, 2: 17, 1: 17
    assert view_batch(at_4096, 2, most=4) == 4  # 4: 59 within 5 % of 58
    # the scales weigh by their steps: strength 0.5 halves scales >= 2 alike, so nothing changes
    assert view_batch(describe(4096, 4096, base_px=1024, window=128, steps=50, strength=0.5), 8) == 2
