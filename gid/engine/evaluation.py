"""COCO-style evaluation with pycocotools: AP, AP50, AP75 and AP by object size."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor, nn
from torch.utils.data import DataLoader

from gid.config import DataConfig
from gid.data import build_dataset, collate
from gid.models import load_model

# Names of COCOeval.stats[0:6], the figures every run reports.
COCO_METRICS = ("ap", "ap50", "ap75", "aps", "apm", "apl")


def to_coco_detections(
    outputs: Iterable[dict[str, Tensor]], image_ids: Iterable[int], label_to_category_id: dict[int, int]
) -> list[dict]:
    """Detector outputs (xyxy boxes in original image pixels) as COCO result records."""
    records = []
    for output, image_id in zip(outputs, image_ids):
        boxes = output["boxes"].detach().cpu()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        for box, score, label in zip(xywh, output["scores"].tolist(), output["labels"].tolist()):
            if label in label_to_category_id:  # label 0 (background) never maps to a category
                records.append(
                    {"image_id": int(image_id), "category_id": label_to_category_id[label], "bbox": box, "score": score}
                )
    return records


def coco_metrics(coco_gt: COCO, detections: list[dict]) -> dict[str, float]:
    """COCOeval bbox metrics in [0, 1]; all zeros when there are no detections."""
    if not detections:
        return dict.fromkeys(COCO_METRICS, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its progress and table
        coco_dt = coco_gt.loadRes(detections)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.imgIds = sorted(coco_gt.getImgIds())
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # COCOeval writes -1 where a size range has no ground truth; report that as 0.
    return {name: float(max(value, 0.0)) for name, value in zip(COCO_METRICS, np.asarray(evaluator.stats[:6]))}


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, label_to_category_id: dict[int, int], device: torch.device) -> list[dict]:
    """Run ``model`` in eval mode over ``loader`` and return COCO detection records."""
    was_training = model.training
    model.eval()
    records: list[dict] = []
    for images, targets in loader:
        outputs = model([image.to(device) for image in images])
        records += to_coco_detections(outputs, (int(t["image_id"]) for t in targets), label_to_category_id)
    model.train(was_training)
    return records


def format_metrics(metrics: dict[str, float]) -> str:
    return "  ".join(f"{name.upper()} {100 * metrics[name]:.1f}" for name in COCO_METRICS if name in metrics)


@dataclass(frozen=True)
class ModelFileEvaluation:
    """What :func:`evaluate_model_file` measured, with the detector and data it measured, for what comes next."""

    metrics: dict[str, float]  # COCO_METRICS, in [0, 1]
    model: nn.Module  # the file's detector
    data: DataConfig  # the data set it was evaluated on


def evaluate_model_file(
    path: Path,
    split: str,
    data: DataConfig | Mapping[str, Any] | None = None,
    *,
    device: torch.device = torch.device("cpu"),
    batch_size: int | None = None,
) -> ModelFileEvaluation:
    """COCO metrics of a model file's detector on ``split`` of a data set.

    ``data`` is the data set: None for the one the file was trained on, a mapping for that one with
    some values replaced (e.g. ``{"root": ...}``, another copy of it), or a whole DataConfig (a teacher
    on its student's data). ``batch_size`` defaults to the data config's.
    """
    model, config, _ = load_model(Path(path))
    if not isinstance(data, DataConfig):
        data = config.data.model_copy(update=dict(data or {}))
    dataset = build_dataset(data, split, train=False)
    dataset.check_image_files()  # fail before predicting, not half-way through
    loader = DataLoader(dataset, batch_size=batch_size or data.batch_size, collate_fn=collate)
    records = predict(model.to(device), loader, dataset.label_to_category_id, device)
    return ModelFileEvaluation(coco_metrics(dataset.coco, records), model, data)
