"""Faster R-CNN: two-stage; an RPN on every FPN level, then a box head on RoIs pooled from P2-P5.

With ``model.fpn_levels: mobilenet`` (``auto`` on a MobileNetV3) it is
``fasterrcnn_mobilenet_v3_large_fpn``'s architecture: the FPN reads the start and the end of the
last stage (both stride 32) and max-pools a third level, and every level has all five anchor
sizes. With ``resnet`` any backbone has the ResNet builders' levels, P2-P5 and the pooled P6.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import fastrcnn_loss
from torchvision.models.detection.rpn import RPNHead, concat_box_prediction_layers

from gid.frameworks.base import FpnLayout, FpnLevels, Framework, Stage, TorchvisionBuilder, stages
from gid.frameworks.view import AnchorLayout, DenseOutput, DetectorView, Features, gt_loss_names, iou_foreground

if TYPE_CHECKING:
    from gid.config import ModelConfig

ROI_SIZE = 7  # FasterRCNN's default MultiScaleRoIAlign output size, which its box head reads
_RATIOS = (0.5, 1.0, 2.0)


class FasterRCNNView(DetectorView):
    """The RPN is the dense part (one objectness "class"); GIs are pooled from the RoI maps."""

    framework = "faster_rcnn"
    two_stage = True

    @property
    def anchor_generator(self) -> AnchorGenerator:
        return self.model.rpn.anchor_generator

    def num_classes(self) -> int:
        return self.model.roi_heads.box_predictor.cls_score.out_features

    def _pooling_maps(self) -> list[str]:
        # the maps the box head pools from (P2-P5), not 'pool'
        return [name for name in self.model.roi_heads.box_roi_pool.featmap_names if name in self.level_strides]

    def dense(self, features: Features) -> DenseOutput:
        maps = list(features.values())  # the RPN runs on every level, 'pool' included
        objectness, deltas = self.model.rpn.head(maps)
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)  # [B*R, 1], [B*R, 4]
        num_images = maps[0].shape[0]
        return DenseOutput(
            self.pooled(features), self.first_level, objectness.view(num_images, -1, 1), deltas.view(num_images, -1, 4)
        )

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        return self.model.rpn.box_coder.decode_single(deltas, anchors)

    def gt_losses(
        self,
        images: ImageList,
        features: Features,
        dense: DenseOutput,
        layout: AnchorLayout,
        targets: list[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        rpn = self.model.rpn
        # back to concat_box_prediction_layers' layout, which the RPN's own functions take
        objectness = dense.cls_logits.reshape(-1, 1)
        deltas = dense.bbox_regression.reshape(-1, 4)

        # proposals as RegionProposalNetwork.forward makes them: no backprop through them
        proposals = rpn.box_coder.decode(deltas.detach(), layout.anchors).view(len(layout.anchors), -1, 4)
        proposals, _ = rpn.filter_proposals(proposals, objectness, images.image_sizes, layout.num_per_level)

        labels, matched_gt_boxes = rpn.assign_targets_to_anchors(layout.anchors, targets)
        regression_targets = rpn.box_coder.encode(matched_gt_boxes, layout.anchors)
        loss_objectness, loss_rpn_box_reg = rpn.compute_loss(objectness, deltas, labels, regression_targets)

        # RoIHeads.forward's training branch, spelled out so the loss exists in eval mode too
        roi_heads = self.model.roi_heads
        proposals, _, labels, regression_targets = roi_heads.select_training_samples(proposals, targets)
        class_logits, box_regression = self.roi_outputs(features, proposals, images.image_sizes)
        loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
        return gt_loss_names(
            {
                "loss_objectness": loss_objectness,
                "loss_rpn_box_reg": loss_rpn_box_reg,
                "loss_classifier": loss_classifier,
                "loss_box_reg": loss_box_reg,
            }
        )

    def _foreground(self, boxes: Tensor, anchors: Tensor, layout: AnchorLayout) -> Tensor:
        return iou_foreground(self.model.rpn.proposal_matcher, boxes, anchors)

    def roi_outputs(
        self, features: Features, boxes: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor]:
        roi_heads = self.model.roi_heads
        return roi_heads.box_predictor(roi_heads.box_head(roi_heads.box_roi_pool(features, boxes, image_sizes)))


class FasterRCNNFramework(Framework):
    name = "faster_rcnn"
    detector = FasterRCNN
    view = FasterRCNNView
    # v2: BatchNorm FPN, two-conv RPN head, four-conv box head.
    variants = ("v1", "v2")
    # v1 is what the benchmarks measured; v2's four-conv box head multiplies the second stage's cost per RoI.
    default_variant = "v1"
    builders = {
        "fasterrcnn_resnet50_fpn": TorchvisionBuilder("v1", frozen_batchnorm_eps=0.0),
        "fasterrcnn_resnet50_fpn_v2": TorchvisionBuilder("v2"),
        "fasterrcnn_mobilenet_v3_large_fpn": TorchvisionBuilder(
            "v1", "mobilenet_v3_large", fpn_levels="mobilenet", settings={"rpn_score_thresh": 0.05}
        ),
        # the same module tree, its COCO weights trained on images of 320 px
        "fasterrcnn_mobilenet_v3_large_320_fpn": TorchvisionBuilder(
            "v1", "mobilenet_v3_large", image_size=320, fpn_levels="mobilenet",
            settings={"min_size": 320, "max_size": 640, "rpn_pre_nms_top_n_test": 150, "rpn_post_nms_top_n_test": 150,
                      "rpn_score_thresh": 0.05},
        ),
    }
    settings = (
        "rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train", "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test",
        "rpn_nms_thresh", "rpn_score_thresh", "box_score_thresh", "box_nms_thresh", "box_detections_per_img",
        "box_batch_size_per_image",
    )
    # Fewer proposals and sampled RoIs than torchvision's COCO defaults: small images hold far fewer
    # objects, and the defaults would make the second stage dominate step time.
    gid_settings = {
        "rpn_pre_nms_top_n_train": 1000, "rpn_post_nms_top_n_train": 500, "rpn_pre_nms_top_n_test": 500,
        "rpn_post_nms_top_n_test": 300, "box_batch_size_per_image": 128,
    }
    coco_anchor_sizes = (32, 64, 128, 256, 512)
    class_layers = ("roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred")
    class_logits = "roi_heads.box_predictor.cls_score.weight"
    fpn_levels = ("resnet", "mobilenet")

    def layout(self, levels: FpnLevels, variant: str) -> FpnLayout:
        norm = nn.BatchNorm2d if variant == "v2" else None
        if levels == "mobilenet":  # torchvision's _mobilenet_extractor: the last stage's first and last blocks
            return FpnLayout((Stage(32, first=True), Stage(32)), "max_pool", norm)
        return FpnLayout(stages(4, 8, 16, 32), "max_pool", norm)

    def anchor_sizes(self, model: ModelConfig, scale: float) -> list[float]:
        """On the MobileNet levels all sizes are on every level, so each is kept at least the (one) stride of
        the stages instead: torchvision's smallest, 32, is that stride, and COCO scale keeps its sizes."""
        if self.levels(model) != "mobilenet":
            return super().anchor_sizes(model, scale)
        finest = self.fpn_layout(model).strides[0]
        return [max(size * scale, float(finest)) for size in self.coco_anchor_sizes]

    def anchor_generator(self, model: ModelConfig, sizes: list[float]) -> AnchorGenerator:
        levels = len(self.fpn_layout(model).strides)
        per_level = (tuple(sizes),) * levels if self.levels(model) == "mobilenet" else tuple((s,) for s in sizes)
        return AnchorGenerator(per_level, (_RATIOS,) * levels)

    def build(
        self, model: ModelConfig, backbone: BackboneWithFPN, anchors: AnchorGenerator, num_classes: int, **settings
    ) -> FasterRCNN:
        heads = {}
        if model.variant == "v2":  # fasterrcnn_resnet50_fpn_v2's heads, their convolutions as wide as the FPN
            width = backbone.out_channels
            heads = dict(
                rpn_head=RPNHead(width, anchors.num_anchors_per_location()[0], conv_depth=2),
                box_head=FastRCNNConvFCHead((width, ROI_SIZE, ROI_SIZE), [width] * 4, [1024], norm_layer=nn.BatchNorm2d),
            )
        return FasterRCNN(backbone, num_classes, rpn_anchor_generator=anchors, **heads, **settings)

    def rebuild_call(self, model: ModelConfig, backbone: str, num_classes: int) -> str:
        arguments = ""
        if self.levels(model) == "mobilenet":  # FasterRCNN's default anchors are one size on each of five levels
            levels = len(self.fpn_layout(model).strides)
            generator = f"AnchorGenerator(({self.coco_anchor_sizes},) * {levels}, ({_RATIOS},) * {levels})"
            arguments += f", rpn_anchor_generator={generator}"
        if model.variant == "v2":
            width, anchors = model.fpn_channels, self.anchors_per_location(model)
            arguments += (
                f", rpn_head=RPNHead({width}, {anchors}, conv_depth=2), box_head=FastRCNNConvFCHead(({width}, "
                f"{ROI_SIZE}, {ROI_SIZE}), {[width] * 4}, [1024], norm_layer=BatchNorm2d)"
            )
        return f"FasterRCNN({backbone}, {num_classes}{arguments})"


FRAMEWORK = FasterRCNNFramework()
