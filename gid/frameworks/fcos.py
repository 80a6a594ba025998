"""FCOS: one-stage and anchor-free, one location per stride on P3-P7, with a centerness branch.

torchvision inlines FCOS's target assignment in ``FCOS.compute_loss``; :func:`fcos_matched_idxs`
mirrors it, the one step of a view that is not the detector's own code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.image_list import ImageList

from gid.frameworks.base import FpnLayout, FpnLevels, Framework, TorchvisionBuilder, stages
from gid.frameworks.view import AnchorLayout, DenseOutput, Features, OneStageView, gt_loss_names

if TYPE_CHECKING:
    from gid.config import ModelConfig


class FCOSView(OneStageView):
    framework = "fcos"

    def signature(self) -> dict[str, object]:
        return {**super().signature(), "center_sampling_radius": self.model.center_sampling_radius}

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        return self.model.box_coder.decode(deltas, anchors)

    def gt_losses(
        self,
        images: ImageList,
        features: Features,
        dense: DenseOutput,
        layout: AnchorLayout,
        targets: list[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        head_outputs = {
            "cls_logits": dense.cls_logits,
            "bbox_regression": dense.bbox_regression,
            "bbox_ctrness": dense.centerness,
        }
        losses = self.model.compute_loss(targets, head_outputs, layout.anchors, layout.num_per_level)
        return gt_loss_names(losses)

    def _foreground(self, boxes: Tensor, anchors: Tensor, layout: AnchorLayout) -> Tensor:
        radius = self.model.center_sampling_radius
        return fcos_matched_idxs(boxes, anchors, layout.num_per_level, radius) >= 0


def fcos_matched_idxs(
    gt_boxes: Tensor, anchors: Tensor, num_per_level: list[int], center_sampling_radius: float
) -> Tensor:
    """The ground-truth index every FCOS location is assigned to, -1 for background: ``[R]``.

    Mirrors the assignment torchvision inlines in ``FCOS.compute_loss`` (it has no function of its
    own), step for step so that the result is identical: a location matches a box when it is
    within ``center_sampling_radius`` anchor sizes of the box centre, inside the box, and its
    largest l/t/r/b distance lies in its level's size range; the smallest-area box wins ties.
    """
    if gt_boxes.numel() == 0:
        return torch.full((anchors.shape[0],), -1, dtype=torch.int64, device=anchors.device)
    gt_centers = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2  # [M, 2]
    centers = (anchors[:, :2] + anchors[:, 2:]) / 2  # [R, 2]
    sizes = anchors[:, 2] - anchors[:, 0]  # FCOS's anchors are square, one per location

    # centre sampling: close enough to the box centre (Chebyshev distance)
    match = (centers[:, None, :] - gt_centers[None, :, :]).abs().max(dim=2).values < (
        center_sampling_radius * sizes[:, None]
    )
    # inside the box
    x, y = centers.unsqueeze(dim=2).unbind(dim=1)  # [R, 1]
    x0, y0, x1, y1 = gt_boxes.unsqueeze(dim=0).unbind(dim=2)  # [1, M]
    ltrb = torch.stack([x - x0, y - y0, x1 - x, y1 - y], dim=2)  # [R, M, 4]
    match &= ltrb.min(dim=2).values > 0
    # per-level size ranges, open-ended at the finest and coarsest level
    lower = sizes * 4
    lower[: num_per_level[0]] = 0
    upper = sizes * 8
    upper[-num_per_level[-1] :] = float("inf")
    reach = ltrb.max(dim=2).values
    match &= (reach > lower[:, None]) & (reach < upper[:, None])

    # among several matches the smallest box wins
    areas = (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])
    best, matched = (match.to(torch.float32) * (1e8 - areas[None, :])).max(dim=1)
    return matched.masked_fill_(best < 1e-5, -1)  # not matched[best < 1e-5]: no host synchronisation


class FCOSFramework(Framework):
    name = "fcos"
    detector = FCOS
    view = FCOSView
    variants = ("v1",)  # torchvision has one FCOS
    default_variant = "v1"
    builders = {"fcos_resnet50_fpn": TorchvisionBuilder("v1")}
    settings = ("score_thresh", "nms_thresh", "detections_per_img", "topk_candidates")
    coco_anchor_sizes = (8, 16, 32, 64, 128)  # = the strides, at any input size
    class_layers = ("head.classification_head.cls_logits",)
    class_logits = "head.classification_head.cls_logits.weight"

    def layout(self, levels: FpnLevels, variant: str) -> FpnLayout:
        return FpnLayout(stages(8, 16, 32), "p6p7_from_p5")

    def anchor_sizes(self, model: ModelConfig, scale: float) -> list[float]:
        """The strides, whatever the input size: FCOS's "anchors" are its locations, and torchvision's
        FCOS derives the centre-sampling radius, the per-level size ranges and the box coder's scale
        from their width."""
        return [float(size) for size in self.coco_anchor_sizes]

    def anchor_generator(self, model: ModelConfig, sizes: list[float]) -> AnchorGenerator:
        # one "anchor" per location: FCOS only uses its centre and size
        return AnchorGenerator(tuple((s,) for s in sizes), ((1.0,),) * len(sizes))

    def build(
        self, model: ModelConfig, backbone: BackboneWithFPN, anchors: AnchorGenerator, num_classes: int, **settings
    ) -> FCOS:
        head = FCOSHead(backbone.out_channels, anchors.num_anchors_per_location()[0], num_classes)
        return FCOS(backbone, num_classes, anchor_generator=anchors, head=head, **settings)

    def rebuild_call(self, model: ModelConfig, backbone: str, num_classes: int) -> str:
        return f"FCOS({backbone}, {num_classes})"


FRAMEWORK = FCOSFramework()
