"""Feature pyramid backbones as torchvision's detection builders make them, never with downloaded weights.

A backbone is torchvision's ``BackboneWithFPN`` over the classifier itself, so its state dict keys
(``body.conv1``, ``body.layer1``, ... for a ResNet) are those of torchvision's detectors; gid
chooses only the FPN width. torchvision's ``_resnet_fpn_extractor`` and ``_mobilenet_extractor``
fix the width at 256, so their two steps, freezing early layers and wrapping the classifier, are
spelled out here.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import torch
from torch import Tensor, nn
from torchvision import models
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from gid.frameworks.base import ExtraLevels, FpnLayout

#: The classification layers of each classifier family, which a detector backbone leaves out.
_CLASSIFIER_HEADS = {"resnet": "fc.", "mobilenet": "classifier."}


def _family(name: str) -> str:
    return "resnet" if name.startswith("resnet") else "mobilenet"


def build_classifier(name: str, frozen_batchnorm: bool, batchnorm_eps: float | None = None) -> nn.Module:
    """The randomly initialised torchvision classifier a backbone is cut from.

    Frozen BatchNorm is torchvision's convention for pretrained backbones: detection batches are
    too small for batch statistics. Otherwise each classifier keeps its own BatchNorm (MobileNetV3's
    has eps 0.001, as gid has always built it; MobileNetV2's torchvision's default). With
    ``batchnorm_eps`` it is ``nn.BatchNorm2d`` (or ``FrozenBatchNorm2d``) with that eps, the norm layer
    torchvision's detection builders pass (MobileNetV3's then has eps 1e-5 and momentum 0.1 too).
    """
    builder = getattr(models, name)
    norm = FrozenBatchNorm2d if frozen_batchnorm else nn.BatchNorm2d
    if batchnorm_eps is not None:
        return builder(weights=None, norm_layer=partial(norm, eps=batchnorm_eps))
    return builder(weights=None, norm_layer=FrozenBatchNorm2d) if frozen_batchnorm else builder(weights=None)


def freeze_early_layers(name: str, classifier: nn.Module, trainable_layers: int) -> None:
    """Stop training all but the last ``trainable_layers`` stages, exactly as torchvision's extractors do."""
    if _family(name) == "resnet":
        trained = ("layer4", "layer3", "layer2", "layer1", "conv1")[:trainable_layers]
        trained += ("bn1",) if trainable_layers == 5 else ()
        for parameter_name, parameter in classifier.named_parameters():
            if not parameter_name.startswith(trained):
                parameter.requires_grad_(False)
        return
    features = classifier.features
    # MobileNet's stages start at the first block and at every strided (``_is_cn``) block.
    starts = [0] + [i for i, block in enumerate(features) if getattr(block, "_is_cn", False)] + [len(features) - 1]
    freeze_before = len(features) if trainable_layers == 0 else starts[len(starts) - trainable_layers]
    features[:freeze_before].requires_grad_(False)


def _resnet_stages(classifier: nn.Module) -> dict[int, list[tuple[str, int]]]:
    """Output stride -> [(name, channels)] of ResNet's stages C2–C5, with torchvision's channel rule."""
    width = classifier.inplanes // 8  # the channels of C2 (layer1) for basic and bottleneck blocks alike
    return {2 ** (i + 1): [(f"layer{i}", width * 2 ** (i - 1))] for i in range(1, 5)}


@torch.no_grad()
def _blocks_per_stride(body: nn.Sequential) -> dict[int, list[tuple[str, int]]]:
    """Output stride -> [(name, channels)] of the blocks of a sequential body producing it, in order (a MobileNet)."""
    was_training = body.training
    body.eval()  # a probe must not touch BatchNorm running statistics
    x = torch.zeros(1, 3, 64, 64)
    found: dict[int, list[tuple[str, int]]] = {}
    for name, block in body.named_children():
        x = block(x)
        found.setdefault(64 // x.shape[-1], []).append((name, x.shape[1]))
    body.train(was_training)
    return found


def feature_stages(name: str, classifier: nn.Module, layout: FpnLayout) -> tuple[nn.Module, list[tuple[str, int]]]:
    """The module the FPN reads from, and the (child name, channels) of each of the layout's stages."""
    if _family(name) == "resnet":
        body, blocks = classifier, _resnet_stages(classifier)
    else:
        body, blocks = classifier.features, _blocks_per_stride(classifier.features)
    return body, [blocks[stage.stride][0 if stage.first else -1] for stage in layout.stages]


def _extra_block(extra: ExtraLevels, c5_channels: int, fpn_channels: int) -> ExtraFPNBlock:
    if extra == "max_pool":
        return LastLevelMaxPool()
    # LastLevelP6P7 reads P5 when its input width is the FPN's, else C5.
    return LastLevelP6P7(fpn_channels if extra == "p6p7_from_p5" else c5_channels, fpn_channels)


def build_fpn_backbone(
    name: str, fpn_channels: int, layout: FpnLayout, *, frozen_batchnorm: bool = False, trainable_layers: int = 5,
    batchnorm_eps: float | None = None,
) -> BackboneWithFPN:
    """The classifier's stages the layout names under an FPN of ``fpn_channels``, plus the layout's extra levels."""
    classifier = build_classifier(name, frozen_batchnorm, batchnorm_eps)
    freeze_early_layers(name, classifier, trainable_layers)
    body, chosen = feature_stages(name, classifier, layout)
    return BackboneWithFPN(
        body,
        return_layers={stage: str(i) for i, (stage, _) in enumerate(chosen)},
        in_channels_list=[channels for _, channels in chosen],
        out_channels=fpn_channels,
        extra_blocks=_extra_block(layout.extra, chosen[-1][1], fpn_channels),
        norm_layer=layout.norm,
    )


def without_classifier_head(name: str, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A classifier state dict without its classification layers, which a detector backbone does not use."""
    head = _CLASSIFIER_HEADS[_family(name)]
    return {key: value for key, value in state.items() if not key.startswith(head)}


def classifier_reference(name: str) -> dict[str, Tensor]:
    """The keys and shapes of torchvision's classifier without its head, as meta tensors (no memory, no init)."""
    with torch.device("meta"):
        return without_classifier_head(name, build_classifier(name, frozen_batchnorm=False).state_dict())


def classifier_body_weights(name: str, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A classifier state dict under the names of the backbone body cut from it (``feature_stages``)."""
    state = without_classifier_head(name, state)
    if _family(name) == "resnet":
        return state
    return {key.removeprefix("features."): value for key, value in state.items()}
