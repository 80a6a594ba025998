"""Build torchvision RetinaNet, FCOS and Faster R-CNN detectors from the config."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from functools import partial
from typing import Any

from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.rpn import RPNHead

from gid.config import COCO_IMAGE_SIZE, MAX_TRAINABLE_LAYERS, ModelConfig
from gid.errors import GidError, first_line
from gid.models.backbones import build_fpn_backbone

# Per-level anchor sizes torchvision uses for each framework at COCO scale (800 px).
COCO_ANCHOR_SIZES = {
    "retinanet": (32, 64, 128, 256, 512),
    "fcos": (8, 16, 32, 64, 128),  # = the strides, at any input size
    "faster_rcnn": (32, 64, 128, 256, 512),
}
BACKBONE_STRIDES = {
    "retinanet": (8, 16, 32),  # + P6, P7
    "fcos": (8, 16, 32),  # + P6, P7
    "faster_rcnn": (4, 8, 16, 32),  # + max-pooled P6
}
#: Layers whose shape depends on the number of classes: fine-tuning to other classes starts them afresh.
CLASS_LAYERS = {
    "retinanet": ("head.classification_head.cls_logits",),
    "fcos": ("head.classification_head.cls_logits",),
    "faster_rcnn": ("roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred"),
}
#: The weight whose first dimension counts the classes (times the anchors per location, for RetinaNet).
CLASS_LOGITS = {
    "retinanet": "head.classification_head.cls_logits.weight",
    "fcos": "head.classification_head.cls_logits.weight",
    "faster_rcnn": "roi_heads.box_predictor.cls_score.weight",
}
FASTER_RCNN_ROI_SIZE = 7  # FasterRCNN's default MultiScaleRoIAlign output size, which its box head reads


def level_strides(framework: str) -> tuple[int, ...]:
    """Output stride of each FPN level: the backbone stages, then the extra levels (×2 each)."""
    strides = BACKBONE_STRIDES[framework]
    extra = 2 if framework in ("retinanet", "fcos") else 1  # P6+P7, or the max-pooled P6
    return strides + tuple(strides[-1] * 2 ** (i + 1) for i in range(extra))


def anchor_sizes(config: ModelConfig, image_size: int) -> list[float]:
    """One base size per FPN level: the config's list, or COCO's scaled to the input size.

    Scaled sizes are kept at least twice their level's stride: strides do not shrink with the
    input, and anchors much smaller than their stride tile the image too sparsely to match the
    ground truth (at 128 px, unfloored, only a quarter of the synthetic boxes had an anchor at
    IoU >= 0.5; floored, two thirds to all of them).

    FCOS's "anchors" are its locations and must stay stride-sized whatever the input size:
    torchvision's FCOS derives the centre-sampling radius, the per-level size ranges and the
    box coder's scale from their width.
    """
    if config.anchor_sizes != "auto":
        return list(config.anchor_sizes)
    if config.framework == "fcos":
        return [float(size) for size in COCO_ANCHOR_SIZES["fcos"]]
    scale = image_size / COCO_IMAGE_SIZE
    return [
        max(size * scale, 2.0 * stride)
        for size, stride in zip(COCO_ANCHOR_SIZES[config.framework], level_strides(config.framework))
    ]


def build_anchor_generator(config: ModelConfig, image_size: int) -> AnchorGenerator:
    sizes = anchor_sizes(config, image_size)
    if config.framework == "retinanet":  # three octave scales per level
        per_level = tuple((s, s * 2 ** (1 / 3), s * 2 ** (2 / 3)) for s in sizes)
        ratios = (0.5, 1.0, 2.0)
    elif config.framework == "fcos":  # one "anchor" per location: FCOS only uses its centre and size
        per_level, ratios = tuple((s,) for s in sizes), (1.0,)
    else:
        per_level, ratios = tuple((s,) for s in sizes), (0.5, 1.0, 2.0)
    return AnchorGenerator(per_level, (ratios,) * len(per_level))


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
    v2 = config.variant == "v2"
    if config.framework == "faster_rcnn":
        extra, fpn_norm = "max_pool", (nn.BatchNorm2d if v2 else None)
    else:
        extra, fpn_norm = ("p6p7_from_c5" if v2 else "p6p7_from_p5"), None
    return build_fpn_backbone(
        config.backbone, config.fpn_channels, BACKBONE_STRIDES[config.framework], extra, fpn_norm=fpn_norm,
        frozen_batchnorm=uses_frozen_batchnorm(config), trainable_layers=trainable_backbone_layers(config),
    )


DETECTOR_CLASSES = {"retinanet": RetinaNet, "fcos": FCOS, "faster_rcnn": FasterRCNN}


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
    expected = DETECTOR_CLASSES[config.framework]
    if not isinstance(model, expected):
        raise GidError(
            f"model.builder {config.builder} returned a {type(model).__name__}, not the torchvision {expected.__name__} "
            f"that model.framework {config.framework} needs"
        )
    return model


def build_detector(config: ModelConfig, image_size: int, num_classes: int) -> nn.Module:
    """A randomly initialised detector; ``num_classes`` includes the background class.

    All three frameworks take images whose longest side is ``image_size`` and normalise them
    inside the model, so teacher and student of one config see the same input tensor. For a
    ResNet-50 with 256 FPN channels the module tree is that of torchvision's builder of the
    framework and variant (e.g. ``retinanet_resnet50_fpn_v2``): their state dicts load into each other.
    With ``model.builder`` the detector is the user's, as their function builds it.
    """
    if config.builder is not None:
        return user_detector(config, num_classes)
    backbone = build_backbone(config)
    anchors = build_anchor_generator(config, image_size)
    common = dict(min_size=image_size, max_size=image_size)
    if config.framework == "retinanet":
        return _retinanet(config, backbone, anchors, num_classes, common)
    if config.framework == "fcos":
        head = FCOSHead(backbone.out_channels, anchors.num_anchors_per_location()[0], num_classes)
        return FCOS(backbone, num_classes, anchor_generator=anchors, head=head, **common)
    return _faster_rcnn(config, backbone, anchors, num_classes, common)


def _retinanet(
    config: ModelConfig, backbone: BackboneWithFPN, anchors: AnchorGenerator, num_classes: int, common: dict[str, Any]
) -> RetinaNet:
    v2 = config.variant == "v2"
    norm = partial(nn.GroupNorm, 32) if v2 else None
    head = RetinaNetHead(backbone.out_channels, anchors.num_anchors_per_location()[0], num_classes, norm_layer=norm)
    if v2:
        head.regression_head._loss_type = "giou"  # as retinanet_resnet50_fpn_v2 sets it: there is no argument
    return RetinaNet(backbone, num_classes, anchor_generator=anchors, head=head, **common)


def _faster_rcnn(
    config: ModelConfig, backbone: BackboneWithFPN, anchors: AnchorGenerator, num_classes: int, common: dict[str, Any]
) -> FasterRCNN:
    heads = {}
    if config.variant == "v2":  # fasterrcnn_resnet50_fpn_v2's heads, their convolutions as wide as the FPN
        width = backbone.out_channels
        heads = dict(
            rpn_head=RPNHead(width, anchors.num_anchors_per_location()[0], conv_depth=2),
            box_head=FastRCNNConvFCHead(
                (width, FASTER_RCNN_ROI_SIZE, FASTER_RCNN_ROI_SIZE), [width] * 4, [1024], norm_layer=nn.BatchNorm2d
            ),
        )
    # Fewer proposals and sampled RoIs than torchvision's COCO defaults: small images hold
    # far fewer objects, and the defaults would make the second stage dominate step time.
    return FasterRCNN(
        backbone,
        num_classes,
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=1000,
        rpn_post_nms_top_n_train=500,
        rpn_pre_nms_top_n_test=500,
        rpn_post_nms_top_n_test=300,
        box_batch_size_per_image=128,
        **heads,
        **common,
    )


def class_layer_keys(framework: str, state: Mapping[str, Tensor]) -> list[str]:
    """The keys of ``state`` that belong to the framework's class-dependent layers."""
    prefixes = tuple(f"{layer}." for layer in CLASS_LAYERS[framework])
    return [key for key in state if key.startswith(prefixes)]


def num_classes_in(framework: str, state: Mapping[str, Tensor], anchors_per_location: int) -> int | None:
    """The class count (background included) a detector state dict was made for; None without its logits."""
    logits = state.get(CLASS_LOGITS[framework])
    if logits is None or logits.dim() < 1:
        return None
    return logits.shape[0] // (anchors_per_location if framework == "retinanet" else 1)
