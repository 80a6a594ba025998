"""Build torchvision RetinaNet, FCOS and Faster R-CNN detectors from the config.

What differs between the frameworks (FPN layout, anchors, heads) is their ``gid.frameworks``
module's; this module assembles a detector from it and the backbone.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN

from gid.config import MAX_TRAINABLE_LAYERS, ModelConfig
from gid.errors import GidError, first_line
from gid.frameworks import COCO_IMAGE_SIZE, FRAMEWORKS
from gid.models.backbones import build_fpn_backbone
from gid.models.roi_align import with_matmul_poolers


def anchor_sizes(config: ModelConfig, image_size: int) -> list[float]:
    """The config's anchor sizes, or for ``auto`` the framework's COCO sizes fitted to the input size."""
    if config.anchor_sizes != "auto":
        return list(config.anchor_sizes)
    return FRAMEWORKS[config.framework].anchor_sizes(config, image_size / COCO_IMAGE_SIZE)


def build_anchor_generator(config: ModelConfig, image_size: int) -> AnchorGenerator:
    return FRAMEWORKS[config.framework].anchor_generator(config, anchor_sizes(config, image_size))


def uses_frozen_batchnorm(config: ModelConfig) -> bool:
    """torchvision's rule: a pretrained backbone has frozen BatchNorm; one trained from scratch does not."""
    return config.backbone_weights is not None if config.frozen_batchnorm == "auto" else config.frozen_batchnorm


def trainable_backbone_layers(config: ModelConfig) -> int:
    """torchvision's rule: 3 stages trained from a pretrained backbone, all of them from scratch."""
    if config.trainable_backbone_layers != "auto":
        return config.trainable_backbone_layers
    return 3 if config.backbone_weights is not None else MAX_TRAINABLE_LAYERS[config.backbone]


def build_backbone(config: ModelConfig) -> BackboneWithFPN:
    """The backbone + FPN torchvision's builder of the framework and variant makes, ``fpn_channels`` wide."""
    return build_fpn_backbone(
        config.backbone, config.fpn_channels, FRAMEWORKS[config.framework].fpn_layout(config),
        frozen_batchnorm=uses_frozen_batchnorm(config), trainable_layers=trainable_backbone_layers(config),
        batchnorm_eps=None if config.batchnorm_eps == "auto" else config.batchnorm_eps,
    )


def detector_settings(config: ModelConfig, image_size: int) -> dict[str, float]:
    """The keyword arguments gid passes torchvision's detector class: ``model.detector`` with ``auto`` resolved.

    ``auto`` sizes are ``image_size`` (the longest side gid feeds); an ``auto`` setting is gid's where the
    framework has one, else left out (the class's default). `gid model import` writes every one out.
    """
    gid = FRAMEWORKS[config.framework].gid_settings
    return {"min_size": image_size, "max_size": image_size, **gid, **config.detector.given()}


def user_detector(config: ModelConfig, num_classes: int) -> nn.Module:
    """``model.builder``'s detector: the user's function called with ``num_classes``, checked to be the framework's."""
    module_name, _, function_name = config.builder.partition(":")
    try:
        builder = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise GidError(
            f"model.builder {config.builder}: cannot import it ({first_line(exc)}); it must be importable here "
            "and on every Ray node (an installed package, or a folder on PYTHONPATH)"
        ) from None
    model = builder(num_classes=num_classes)
    expected = FRAMEWORKS[config.framework].detector
    if not isinstance(model, expected):
        raise GidError(
            f"model.builder {config.builder} returned a {type(model).__name__}, not the torchvision {expected.__name__} "
            f"that model.framework {config.framework} needs"
        )
    return model


def build_detector(config: ModelConfig, image_size: int, num_classes: int) -> nn.Module:
    """A randomly initialised detector; ``num_classes`` includes the background class.

    All three frameworks take images whose longest side is ``image_size`` (unless ``model.detector``'s
    ``min_size`` and ``max_size`` say otherwise) and normalise them inside the model, so teacher and
    student of one config see the same input tensor; ``model.detector`` sets the class's
    thresholds and proposal counts (``detector_settings``). For the
    backbone and FPN width of one of torchvision's builders of the framework and variant (e.g.
    ``retinanet_resnet50_fpn_v2``: ResNet-50, 256) the module tree is the builder's: their state
    dicts load into each other. With ``model.builder`` the detector is the user's, as their function builds it.
    Either way its box RoI pooler (Faster R-CNN's) back-propagates on every CPU core (``gid.models.roi_align``).
    """
    if config.builder is not None:
        return with_matmul_poolers(user_detector(config, num_classes))
    anchors = build_anchor_generator(config, image_size)
    return with_matmul_poolers(FRAMEWORKS[config.framework].build(
        config, build_backbone(config), anchors, num_classes, **detector_settings(config, image_size)
    ))


def class_layer_keys(framework: str, state: Mapping[str, Tensor]) -> list[str]:
    """The keys of ``state`` that belong to the framework's class-dependent layers."""
    prefixes = tuple(f"{layer}." for layer in FRAMEWORKS[framework].class_layers)
    return [key for key in state if key.startswith(prefixes)]


def num_classes_in(framework: str, state: Mapping[str, Tensor], anchors_per_location: int) -> int | None:
    """The class count (background included) a detector state dict was made for; None without its logits."""
    spec = FRAMEWORKS[framework]
    logits = state.get(spec.class_logits)
    if logits is None or logits.dim() < 1:
        return None
    return spec.num_classes_in(logits, anchors_per_location)
