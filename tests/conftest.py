import pytest
import torch

from minifusion import load
from minifusion.tiny import TINY, random_models, write_single_file


@pytest.fixture(scope="session")
def tiny_file(tmp_path_factory):
    """A tiny random SDXL-architecture checkpoint in the single-file layout (256 px base, 32-latent window)."""
    path = tmp_path_factory.mktemp("weights") / "tiny_sdxl.safetensors"
    return write_single_file(random_models(TINY, seed=0), TINY, path)


@pytest.fixture(scope="session")
def tiny_pipe(tiny_file):
    return load(tiny_file, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: its tensors are tiny (thread start-up, not arithmetic, would dominate on a
    busy 2-core machine), and each rank of the distributed tests runs so (the same kernels, so the same bits)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
