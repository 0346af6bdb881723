"""minifusion: DemoFusion (CVPR 2024) on SDXL, written from scratch in PyTorch."""
from .checkpoint import CheckpointError
from .pipeline import Pipeline, load

__all__ = ["CheckpointError", "Pipeline", "load"]
