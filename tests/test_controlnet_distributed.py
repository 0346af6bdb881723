"""ControlNet under view parallelism: the control lives behind the sampler's seam (views.ViewRunner.call), so 2
gloo ranks running a ControlNet-steered generation give what one process gives, bit for bit."""
import socket
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import controlnet_distributed_case as case  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_view_parallel_control_equals_one_process(tiny_file, tmp_path):
    from minifusion import load
    controlnet = case.write_controlnet(tmp_path / "controlnet")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(Path(case.__file__)), str(tiny_file), str(controlnet),
           str(tmp_path / "got.pt")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs: the same kernels, so the same bits
    try:
        pipe = load(tiny_file, device="cpu", dtype=torch.float32, controlnet=controlnet)
        alone = case.run(pipe)
        plain = pipe.generate(**{k: v for k, v in case.CASES["control"].items()
                                 if not k.startswith("control")}).latents
    finally:
        torch.set_num_threads(n)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    everyone = torch.load(tmp_path / "got.pt", weights_only=False)
    assert len(everyone) == 2
    for got in everyone:
        for name in case.CASES:
            assert len(got[name]) == len(alone[name]) == 2
            assert all(torch.equal(a, b) for a, b in zip(got[name], alone[name])), name
    assert (alone["control"][1] - plain[1]).abs().max() > 1e-3  # the ControlNet steers the run
