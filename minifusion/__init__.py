"""minifusion: DemoFusion (CVPR 2024) on SDXL, written from scratch in PyTorch.

`load` and `Pipeline` are imported on first use, so that `minifusion --help` need not import torch."""
from .settings import VERSION as __version__

__all__ = ["CheckpointError", "Pipeline", "load", "__version__"]


def __getattr__(name: str):
    if name in ("Pipeline", "load"):
        from . import pipeline
        return getattr(pipeline, name)
    if name == "CheckpointError":
        from .checkpoint import CheckpointError
        return CheckpointError
    raise AttributeError(f"module 'minifusion' has no attribute {name!r}")
