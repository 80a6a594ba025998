"""Detection data sets (COCO and Pascal VOC layouts) and the synthetic data generator."""

from __future__ import annotations

from typing import Any

import torch

from gid.config import DataConfig
from gid.data.coco import CocoDetection, DetectionDataset
from gid.data.synthetic import DEFAULT_CLASSES, make_synthetic
from gid.data.transforms import Compose, RandomHorizontalFlip, to_tensor
from gid.data.voc import VOC_CLASSES, VocDetection
from gid.errors import GidError

__all__ = [
    "DEFAULT_CLASSES",
    "VOC_CLASSES",
    "CocoDetection",
    "Compose",
    "DetectionDataset",
    "RandomHorizontalFlip",
    "VocDetection",
    "build_dataset",
    "collate",
    "make_synthetic",
    "to_tensor",
]


def build_dataset(cfg: DataConfig, split: str, *, train: bool) -> DetectionDataset:
    """The data set ``cfg`` describes, for ``split`` (training augmentation when ``train``)."""
    if cfg.format == "voc":
        return VocDetection(cfg.root, split, classes=cfg.classes, train=train, hflip_prob=cfg.hflip_prob)
    if cfg.classes is not None:
        raise GidError("data.classes applies to VOC data only; COCO files name their own categories")
    return CocoDetection(cfg.root, split, train=train, hflip_prob=cfg.hflip_prob)


def collate(batch: list[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Batch as lists: detection images differ in size and targets in box count."""
    images, targets = zip(*batch)
    return list(images), list(targets)
