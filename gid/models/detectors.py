"""Build torchvision RetinaNet, FCOS and Faster R-CNN detectors from the config."""

from __future__ import annotations

from functools import partial

from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.retinanet import RetinaNetHead

from gid.config import COCO_IMAGE_SIZE, ModelConfig
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


def build_detector(config: ModelConfig, image_size: int, num_classes: int) -> nn.Module:
    """A detector trained from scratch; ``num_classes`` includes the background class.

    All three frameworks take images whose longest side is ``image_size`` and normalise them
    inside the model, so teacher and student of one config see the same input tensor.
    """
    framework = config.framework
    backbone = build_fpn_backbone(
        config.backbone, config.fpn_channels, BACKBONE_STRIDES[framework], p6p7=framework != "faster_rcnn"
    )
    anchors = build_anchor_generator(config, image_size)
    common = dict(min_size=image_size, max_size=image_size)
    num_anchors = anchors.num_anchors_per_location()[0]
    if framework == "retinanet":
        # GroupNorm in the head (as in torchvision's RetinaNet v2) makes training from scratch stable.
        head = RetinaNetHead(
            config.fpn_channels, num_anchors, num_classes, norm_layer=partial(nn.GroupNorm, 32)
        )
        return RetinaNet(backbone, num_classes, anchor_generator=anchors, head=head, **common)
    if framework == "fcos":
        head = FCOSHead(config.fpn_channels, num_anchors, num_classes)
        return FCOS(backbone, num_classes, anchor_generator=anchors, head=head, **common)
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
        **common,
    )
