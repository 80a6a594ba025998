"""RetinaNet: one-stage, anchors of three octave scales and three ratios on P3-P7, focal loss."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from torch import Tensor, nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNetHead

from gid.frameworks.base import FpnLayout, FpnLevels, Framework, TorchvisionBuilder, stages
from gid.frameworks.view import AnchorLayout, DenseOutput, Features, OneStageView, gt_loss_names, iou_foreground

if TYPE_CHECKING:
    from gid.config import ModelConfig


class RetinaNetView(OneStageView):
    framework = "retinanet"

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        return self.model.box_coder.decode_single(deltas, anchors)

    def gt_losses(
        self,
        images: ImageList,
        features: Features,
        dense: DenseOutput,
        layout: AnchorLayout,
        targets: list[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        head_outputs = {"cls_logits": dense.cls_logits, "bbox_regression": dense.bbox_regression}
        return gt_loss_names(self.model.compute_loss(targets, head_outputs, layout.anchors))

    def _foreground(self, boxes: Tensor, anchors: Tensor, layout: AnchorLayout) -> Tensor:
        return iou_foreground(self.model.proposal_matcher, boxes, anchors)


class RetinaNetFramework(Framework):
    name = "retinanet"
    detector = RetinaNet
    view = RetinaNetView
    # v1: P6 from P5, unnormalised head, smooth-L1 box loss; v2: P6/P7 from C5, GroupNorm head, GIoU loss.
    variants = ("v1", "v2")
    # v2's GroupNorm head (the one gid's RetinaNet always had) learns from scratch where v1's stalls
    # (ResNet-18, 128 px synthetic data: v1's classification loss stayed at 1.1 for 250 steps and was
    # 0.78 at 400; v2's was 0.62 at 200 and 0.48 at 400).
    default_variant = "v2"
    builders = {
        "retinanet_resnet50_fpn": TorchvisionBuilder("v1", frozen_batchnorm_eps=0.0, anchor_octaves="floor"),
        "retinanet_resnet50_fpn_v2": TorchvisionBuilder("v2", anchor_octaves="floor"),
    }
    settings = ("score_thresh", "nms_thresh", "detections_per_img", "topk_candidates")
    anchor_octaves = True
    coco_anchor_sizes = (32, 64, 128, 256, 512)
    class_layers = ("head.classification_head.cls_logits",)
    class_logits = "head.classification_head.cls_logits.weight"

    def layout(self, levels: FpnLevels, variant: str) -> FpnLayout:
        return FpnLayout(stages(8, 16, 32), "p6p7_from_c5" if variant == "v2" else "p6p7_from_p5")

    def anchor_generator(self, model: ModelConfig, sizes: list[float]) -> AnchorGenerator:
        floor = model.anchor_octaves == "floor"  # as torchvision's builders write them: int(x * 2 ** (k / 3))
        octaves = [2 ** (k / 3) for k in range(3)]  # three octave scales
        per_level = tuple(tuple(float(int(s * o)) if floor and o > 1 else s * o for o in octaves) for s in sizes)
        return AnchorGenerator(per_level, ((0.5, 1.0, 2.0),) * len(per_level))

    def build(
        self, model: ModelConfig, backbone: BackboneWithFPN, anchors: AnchorGenerator, num_classes: int, **settings
    ) -> RetinaNet:
        v2 = model.variant == "v2"
        norm = partial(nn.GroupNorm, 32) if v2 else None
        head = RetinaNetHead(backbone.out_channels, anchors.num_anchors_per_location()[0], num_classes, norm_layer=norm)
        if v2:
            head.regression_head._loss_type = "giou"  # as retinanet_resnet50_fpn_v2 sets it: there is no argument
        return RetinaNet(backbone, num_classes, anchor_generator=anchors, head=head, **settings)

    def num_classes_in(self, logits: Tensor, anchors_per_location: int) -> int:
        return logits.shape[0] // anchors_per_location  # one logit per class and anchor

    def rebuild_call(self, model: ModelConfig, backbone: str, num_classes: int) -> str:
        if model.variant == "v1":  # v1's head is the one RetinaNet builds by default, for gid's 9 anchors
            return f"RetinaNet({backbone}, {num_classes})"
        anchors = self.anchors_per_location(model)
        head = f"RetinaNetHead({model.fpn_channels}, {anchors}, {num_classes}, norm_layer=partial(GroupNorm, 32))"
        return (
            f"RetinaNet({backbone}, {num_classes}, head={head}) "
            "(to train it, set head.regression_head._loss_type = 'giou' as v2 does)"
        )


FRAMEWORK = RetinaNetFramework()
