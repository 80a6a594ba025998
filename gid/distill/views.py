"""One view per detector framework: the only code in the project that knows a detector's internals.

A :class:`DetectorView` runs a torchvision RetinaNet, FCOS or Faster R-CNN piece by piece
(transform, backbone + FPN, dense head, anchors, losses) so the GID code can look at the
intermediate outputs of teacher and student without a second forward pass. Every step reuses
the detector's own modules (transform, head, anchor generator, box coder, matcher, losses);
the one exception is FCOS's target assignment, which torchvision inlines in
``FCOS.compute_loss`` and :func:`fcos_matched_idxs` mirrors.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import fastrcnn_loss
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import box_iou

from gid.distill.outputs import AnchorLayout, DenseOutput
from gid.errors import GidError

Features = OrderedDict[str, Tensor]

#: Side of the blank image the FPN strides are probed with; P7 (stride 128) still gets 2x2.
_STRIDE_PROBE_SIZE = 256


class DetectorView:
    """A detector seen as the pieces GID needs; subclasses bind them to one framework."""

    framework: str
    first_level: int  # FPN level of DenseOutput.features[0]

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    # --- framework specifics ---------------------------------------------------------------

    @property
    def anchor_generator(self) -> AnchorGenerator:
        raise NotImplementedError

    def num_classes(self) -> int:
        raise NotImplementedError

    def dense(self, features: Features) -> DenseOutput:
        """The dense head outputs, flattened over levels as the head's own loss expects them."""
        raise NotImplementedError

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """``[N, 4]`` regression outputs at ``[N, 4]`` anchors -> ``[N, 4]`` xyxy boxes."""
        raise NotImplementedError

    def gt_losses(
        self,
        images: ImageList,
        features: Features,
        dense: DenseOutput,
        layout: AnchorLayout,
        targets: list[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        """The detector's own training loss from already computed outputs, keys ``loss_gt_*``."""
        raise NotImplementedError

    def _foreground(self, boxes: Tensor, anchors: Tensor, layout: AnchorLayout) -> Tensor:
        """``[R]`` bool: anchors of one image the detector's assignment makes foreground."""
        raise NotImplementedError

    def roi_outputs(
        self, features: Features, boxes: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor]:
        """The second-stage box head at the given boxes: ``(class_logits, box_regression)``."""
        raise TypeError(f"roi_outputs needs a two-stage detector; {self.framework} has no RoI head")

    # --- shared by all frameworks ----------------------------------------------------------

    def transform(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[ImageList, list[dict[str, Tensor]] | None]:
        """Resize, normalise and batch; the teacher must be fed the student's result."""
        return self.model.transform(images, targets)

    def features(self, images: ImageList) -> Features:
        """Backbone + FPN maps, finest first."""
        return self.model.backbone(images.tensors)

    def anchor_layout(self, images: ImageList, features: Features) -> AnchorLayout:
        maps = list(features.values())
        anchors = self.anchor_generator(images, maps)
        per_location = self.anchor_generator.num_anchors_per_location()
        num_per_level = [m.shape[-2] * m.shape[-1] * a for m, a in zip(maps, per_location)]
        return AnchorLayout(anchors, num_per_level, list(images.image_sizes))

    def assign_foreground(self, boxes: list[Tensor], layout: AnchorLayout) -> Tensor:
        """``[B, R]`` bool: the foreground anchors if ``boxes[i]`` were image i's ground truth."""
        return torch.stack(
            [
                self._foreground(b.to(a.dtype), a, layout)
                for b, a in zip(boxes, layout.anchors, strict=True)
            ]
        )

    def feature_channels(self) -> int:
        return self.model.backbone.out_channels

    def signature(self) -> dict[str, object]:
        """What must be equal in teacher and student for them to see the same batch and anchors."""
        transform = self.model.transform
        generator = self.anchor_generator
        return {
            "framework": self.framework,
            "num_classes": self.num_classes(),
            "min_size": tuple(transform.min_size),
            "max_size": transform.max_size,
            "image_mean": tuple(transform.image_mean),
            "image_std": tuple(transform.image_std),
            "size_divisible": transform.size_divisible,
            "fixed_size": transform.fixed_size,
            "strides": self._strides(),
            "anchor_sizes": _rounded(generator.sizes),
            "aspect_ratios": _rounded(generator.aspect_ratios),
        }

    @torch.no_grad()
    def _strides(self) -> tuple[int, ...]:
        """Stride of every FPN level, probed: the modules don't record it, the maps show it."""
        backbone = self.model.backbone
        modes = {module: module.training for module in backbone.modules()}
        backbone.eval()  # a probe must not touch BatchNorm running statistics
        try:
            probe = next(backbone.parameters()).new_zeros(1, 3, _STRIDE_PROBE_SIZE, _STRIDE_PROBE_SIZE)
            maps = backbone(probe)
        finally:
            for module, training in modes.items():
                module.training = training
        return tuple(_STRIDE_PROBE_SIZE // m.shape[-1] for m in maps.values())


class _OneStageView(DetectorView):
    """RetinaNet and FCOS: one dense head on P3–P7, whose maps are also the pooling levels."""

    first_level = 3

    @property
    def anchor_generator(self) -> AnchorGenerator:
        return self.model.anchor_generator

    def num_classes(self) -> int:
        return self.model.head.classification_head.num_classes

    def dense(self, features: Features) -> DenseOutput:
        maps = list(features.values())
        out = self.model.head(maps)
        return DenseOutput(
            maps, self.first_level, out["cls_logits"], out["bbox_regression"], out.get("bbox_ctrness")
        )


class RetinaNetView(_OneStageView):
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
        return _prefixed(self.model.compute_loss(targets, head_outputs, layout.anchors))

    def _foreground(self, boxes: Tensor, anchors: Tensor, layout: AnchorLayout) -> Tensor:
        return _iou_foreground(self.model.proposal_matcher, boxes, anchors)


class FCOSView(_OneStageView):
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
        return _prefixed(losses)

    def _foreground(self, boxes: Tensor, anchors: Tensor, layout: AnchorLayout) -> Tensor:
        radius = self.model.center_sampling_radius
        return fcos_matched_idxs(boxes, anchors, layout.num_per_level, radius) >= 0


class FasterRCNNView(DetectorView):
    """The RPN is the dense part (one objectness "class"); GIs are pooled from the RoI maps."""

    framework = "faster_rcnn"
    first_level = 2

    @property
    def anchor_generator(self) -> AnchorGenerator:
        return self.model.rpn.anchor_generator

    def num_classes(self) -> int:
        return self.model.roi_heads.box_predictor.cls_score.out_features

    def dense(self, features: Features) -> DenseOutput:
        maps = list(features.values())  # the RPN runs on every level, 'pool' included
        objectness, deltas = self.model.rpn.head(maps)
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)  # [B*R, 1], [B*R, 4]
        num_images = maps[0].shape[0]
        # GIs are pooled from the maps the box head pools from (P2-P5), not from 'pool'
        pooled = [features[name] for name in self.model.roi_heads.box_roi_pool.featmap_names]
        return DenseOutput(
            pooled, self.first_level, objectness.view(num_images, -1, 1), deltas.view(num_images, -1, 4)
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
        return _prefixed(
            {
                "loss_objectness": loss_objectness,
                "loss_rpn_box_reg": loss_rpn_box_reg,
                "loss_classifier": loss_classifier,
                "loss_box_reg": loss_box_reg,
            }
        )

    def _foreground(self, boxes: Tensor, anchors: Tensor, layout: AnchorLayout) -> Tensor:
        return _iou_foreground(self.model.rpn.proposal_matcher, boxes, anchors)

    def roi_outputs(
        self, features: Features, boxes: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor]:
        roi_heads = self.model.roi_heads
        pooled = roi_heads.box_roi_pool(features, boxes, image_sizes)
        return roi_heads.box_predictor(roi_heads.box_head(pooled))


def view_for(model: nn.Module) -> DetectorView:
    """The view of a torchvision RetinaNet, FCOS or Faster R-CNN (not wrapped in DDP)."""
    for detector, view in ((RetinaNet, RetinaNetView), (FCOS, FCOSView), (FasterRCNN, FasterRCNNView)):
        if isinstance(model, detector):
            return view(model)
    raise TypeError(
        f"no DetectorView for {type(model).__name__}: expected a torchvision RetinaNet, FCOS or "
        "FasterRCNN (unwrap DistributedDataParallel with .module)"
    )


def check_compatible(teacher: DetectorView, student: DetectorView) -> None:
    """Raise a one-line GidError listing everything that differs between the two signatures."""
    t, s = teacher.signature(), student.signature()
    keys = list(t) + [k for k in s if k not in t]
    differences = [
        f"{key} differs (teacher {t.get(key, 'absent')}, student {s.get(key, 'absent')})"
        for key in keys
        if t.get(key, "absent") != s.get(key, "absent")
    ]
    if differences:
        raise GidError("teacher and student are incompatible: " + "; ".join(differences))


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
    matched[best < 1e-5] = -1
    return matched


def _iou_foreground(matcher: Matcher, boxes: Tensor, anchors: Tensor) -> Tensor:
    """Foreground under an IoU Matcher, as RetinaNet.compute_loss and the RPN run it."""
    if boxes.numel() == 0:
        return torch.zeros(anchors.shape[0], dtype=torch.bool, device=anchors.device)
    return matcher(box_iou(boxes, anchors)) >= 0


def _prefixed(losses: dict[str, Tensor]) -> dict[str, Tensor]:
    return {"loss_gt_" + name.removeprefix("loss_"): value for name, value in losses.items()}


def _rounded(per_level: tuple[tuple[float, ...], ...]) -> tuple[tuple[float, ...], ...]:
    """Anchor sizes / ratios per level, rounded so float noise is not a difference."""
    return tuple(tuple(round(float(v), 4) for v in level) for level in per_level)
