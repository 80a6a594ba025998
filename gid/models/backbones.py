"""Feature pyramid backbones built from torchvision classifiers, never with downloaded weights."""

from __future__ import annotations

import torch
from torch import nn
from torchvision import models
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7


def _feature_body(name: str) -> nn.Sequential:
    """The classifier without its pooling and classification layers."""
    classifier = getattr(models, name)(weights=None)
    if name.startswith("mobilenet"):
        return classifier.features
    return nn.Sequential(
        *[m for n, m in classifier.named_children() if n not in ("avgpool", "fc")]
    )


@torch.no_grad()
def _last_block_per_stride(body: nn.Sequential) -> dict[int, tuple[str, int]]:
    """Map output stride -> (name, channels) of the last block producing it.

    Works for any sequential classifier body, so ResNets and MobileNetV3 share one code path
    (torchvision's own extractors hard-code the stage indices per family instead).
    """
    was_training = body.training
    body.eval()  # a probe must not touch BatchNorm running statistics
    x = torch.zeros(1, 3, 64, 64)
    found: dict[int, tuple[str, int]] = {}
    for name, block in body.named_children():
        x = block(x)
        found[64 // x.shape[-1]] = (name, x.shape[1])
    body.train(was_training)
    return found


def build_fpn_backbone(name: str, fpn_channels: int, strides: tuple[int, ...], p6p7: bool) -> BackboneWithFPN:
    """A backbone + FPN on the stages of the given strides, plus P6/P7 or a max-pooled level.

    RetinaNet and FCOS use C3–C5 with P6/P7 (strides 8–128); Faster R-CNN uses C2–C5 with a
    max-pooled P6 (strides 4–64), as torchvision's own builders do.
    """
    body = _feature_body(name)
    stages = _last_block_per_stride(body)
    chosen = [stages[s] for s in strides]
    extra = LastLevelP6P7(fpn_channels, fpn_channels) if p6p7 else LastLevelMaxPool()
    return BackboneWithFPN(
        body,
        return_layers={stage: str(i) for i, (stage, _) in enumerate(chosen)},
        in_channels_list=[channels for _, channels in chosen],
        out_channels=fpn_channels,
        extra_blocks=extra,
    )
