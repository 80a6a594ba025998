"""Transforms on ``(image, target)`` pairs, shared by the COCO and VOC data sets.

Only what must change the boxes together with the pixels lives here. Resizing to
``data.image_size`` and mean/std normalisation are done by the detector's own
``GeneralizedRCNNTransform``, which also maps its predictions back to the input size, so images
and boxes stay in original pixel coordinates here (which is what COCO evaluation expects).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torchvision.transforms.functional as F
from PIL import Image

Target = dict[str, Any]
Transform = Callable[[Any, Target], tuple[Any, Target]]


class Compose:
    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Any, target: Target) -> tuple[Any, Target]:
        for t in self.transforms:
            image, target = t(image, target)
        return image, target


def to_tensor(image: Image.Image, target: Target) -> tuple[torch.Tensor, Target]:
    """PIL image to a float32 ``[C, H, W]`` tensor in [0, 1]."""
    return F.convert_image_dtype(F.pil_to_tensor(image), torch.float32), target


class RandomHorizontalFlip:
    """Mirror a tensor image and its ``xyxy`` boxes left-right with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        if torch.rand(1).item() >= self.p:
            return image, target
        width = image.shape[-1]
        boxes = target["boxes"][:, [2, 1, 0, 3]] * torch.tensor([-1.0, 1.0, -1.0, 1.0])
        boxes[:, [0, 2]] += width
        return image.flip(-1), {**target, "boxes": boxes}
