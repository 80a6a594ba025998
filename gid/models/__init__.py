"""torchvision detectors built from config, and their model files."""

from gid.models.checkpoint import (
    load_backbone_weights,
    load_model,
    load_weights,
    read_checkpoint,
    save_model,
    stored_metrics,
    stored_val_ap,
)
from gid.models.detectors import anchor_sizes, build_detector

__all__ = [
    "anchor_sizes", "build_detector", "load_backbone_weights", "load_model", "load_weights", "read_checkpoint",
    "save_model", "stored_metrics", "stored_val_ap",
]
