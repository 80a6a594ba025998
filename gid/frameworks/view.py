"""DetectorView: a detector seen as the pieces GID needs, and what it hands to the GID code.

A view runs a torchvision detector piece by piece (transform, backbone + FPN, dense head,
anchors, losses) so the GID code can look at the intermediate outputs of teacher and student
without a second forward pass. Every step reuses the detector's own modules (transform, head,
anchor generator, box coder, matcher, losses). Each framework module subclasses it.
"""

from __future__ import annotations

import abc
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor, nn
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou

from gid.errors import GidError

Features = OrderedDict[str, Tensor]

#: Side of the blank image the FPN strides are probed with; P7 (stride 128) still gets 2x2.
_STRIDE_PROBE_SIZE = 256


@dataclass
class AnchorLayout:
    """Anchors (FCOS: locations) of one batch; identical for a compatible teacher and student.

    ``anchors[i]`` is ``[R, 4]`` xyxy in the detector's input frame (after its transform), in the
    order the head flattens its outputs: level by level, then row, column, anchor.
    """

    anchors: list[Tensor]
    num_per_level: list[int]
    image_sizes: list[tuple[int, int]]  # (height, width) of each image after the transform


@dataclass
class DenseOutput:
    """One detector's dense head outputs for a batch, flattened over all FPN levels."""

    features: list[Tensor]  # the FPN maps GIs are pooled from, finest first: [B, C, H_l, W_l]
    first_level: int  # FPN level of features[0]; features[i] has stride 2 ** (first_level + i)
    cls_logits: Tensor  # [B, R, K] (Faster R-CNN: the RPN objectness, K = 1)
    bbox_regression: Tensor  # [B, R, 4] encoded as the detector's own box coder encodes
    centerness: Tensor | None = None  # [B, R, 1] logits, FCOS only


class DetectorView(abc.ABC):
    """A detector seen as the pieces GID needs; subclasses bind them to one framework."""

    framework: str
    two_stage = False  # whether roi_outputs exists (the response loss then distils the second stage too)

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    # --- framework specifics ---------------------------------------------------------------

    @property
    @abc.abstractmethod
    def anchor_generator(self) -> AnchorGenerator:
        raise NotImplementedError

    @abc.abstractmethod
    def num_classes(self) -> int:
        raise NotImplementedError

    @abc.abstractmethod
    def dense(self, features: Features) -> DenseOutput:
        """The dense head outputs, flattened over levels as the head's own loss expects them."""
        raise NotImplementedError

    @abc.abstractmethod
    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """``[N, 4]`` regression outputs at ``[N, 4]`` anchors -> ``[N, 4]`` xyxy boxes."""
        raise NotImplementedError

    @abc.abstractmethod
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

    @abc.abstractmethod
    def _foreground(self, boxes: Tensor, anchors: Tensor, layout: AnchorLayout) -> Tensor:
        """``[R]`` bool: anchors of one image the detector's assignment makes foreground."""
        raise NotImplementedError

    def _pooling_maps(self) -> list[str]:
        """The names of the FPN maps GIs may be pooled from; one-stage detectors: all of them."""
        return list(self.level_strides)

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

    def pooled(self, features: Features) -> list[Tensor]:
        """The maps GIs are pooled from, finest first (``DenseOutput.features``)."""
        return [features[name] for name in self._pooling[0]]

    @property
    def first_level(self) -> int:
        """FPN level of the first map GIs are pooled from: its stride is ``2 ** first_level``."""
        return self._pooling[1]

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
            "strides": tuple(self.level_strides.values()),
            "anchor_sizes": _rounded(generator.sizes),
            "aspect_ratios": _rounded(generator.aspect_ratios),
        }

    @cached_property
    def level_strides(self) -> dict[str, int]:
        """Stride of every FPN level by name, probed: the modules don't record it, the maps show it."""
        backbone = self.model.backbone
        modes = {module: module.training for module in backbone.modules()}
        backbone.eval()  # a probe must not touch BatchNorm running statistics
        try:
            with torch.no_grad():
                probe = next(backbone.parameters()).new_zeros(1, 3, _STRIDE_PROBE_SIZE, _STRIDE_PROBE_SIZE)
                maps = backbone(probe)
        finally:
            for module, training in modes.items():
                module.training = training
        return {name: _STRIDE_PROBE_SIZE // m.shape[-1] for name, m in maps.items()}

    @cached_property
    def _pooling(self) -> tuple[list[str], int]:
        """The maps GIs are pooled from, one per stride, and the level of the first.

        Of several maps of one stride (torchvision's MobileNetV3 FPN has two at 32) the first is
        kept: it is the one torchvision's MultiScaleRoIAlign pools every box from.
        """
        names: list[str] = []
        for name in self._pooling_maps():
            if all(self.level_strides[kept] != self.level_strides[name] for kept in names):
                names.append(name)
        strides = [self.level_strides[name] for name in names]
        first = strides[0].bit_length() - 1
        if strides != [2 ** (first + i) for i in range(len(strides))]:
            raise GidError(
                f"{self.framework}: GIs are pooled from FPN levels whose strides are powers of 2, doubling from "
                f"level to level; this detector's are {strides}"
            )
        return names, first


class OneStageView(DetectorView):
    """RetinaNet and FCOS: one dense head on every FPN level, whose maps are also the pooling levels."""

    @property
    def anchor_generator(self) -> AnchorGenerator:
        return self.model.anchor_generator

    def num_classes(self) -> int:
        return self.model.head.classification_head.num_classes

    def dense(self, features: Features) -> DenseOutput:
        out = self.model.head(list(features.values()))
        return DenseOutput(
            self.pooled(features), self.first_level, out["cls_logits"], out["bbox_regression"], out.get("bbox_ctrness")
        )


def check_compatible(teacher: DetectorView, student: DetectorView) -> None:
    """Raise a one-line GidError listing everything that differs between the two signatures, and the
    ``model.fpn_levels`` that gives the student the teacher's levels where that is the fix."""
    from gid.frameworks import FRAMEWORKS  # the registry imports this module

    t, s = teacher.signature(), student.signature()
    keys = list(t) + [k for k in s if k not in t]
    differences = [
        f"{key} differs (teacher {t.get(key, 'absent')}, student {s.get(key, 'absent')})"
        for key in keys
        if t.get(key, "absent") != s.get(key, "absent")
    ]
    if not differences:
        return
    fix = ""
    if t["framework"] == s["framework"] and t["strides"] != s["strides"]:
        levels = FRAMEWORKS[s["framework"]].levels_with_strides(t["strides"])
        fix = f"; to read the teacher's levels, set the student's model.fpn_levels: {levels}" if levels else ""
    elif any(t[key] != s[key] for key in ("min_size", "max_size", "anchor_sizes")):
        # a model file keeps its transform and anchors; an imported one its torchvision builder's
        fix = (
            "; give the student the teacher's model.detector.min_size and max_size, model.anchor_sizes and "
            "model.anchor_octaves (its model file's config has them)"
        )
    raise GidError("teacher and student are incompatible: " + "; ".join(differences) + fix)


def iou_foreground(matcher: Matcher, boxes: Tensor, anchors: Tensor) -> Tensor:
    """Foreground under an IoU Matcher, as RetinaNet.compute_loss and the RPN run it."""
    if boxes.numel() == 0:
        return torch.zeros(anchors.shape[0], dtype=torch.bool, device=anchors.device)
    return matcher(box_iou(boxes, anchors)) >= 0


def gt_loss_names(losses: dict[str, Tensor]) -> dict[str, Tensor]:
    """The detector's own losses under the names GID reports them by: ``loss_x`` -> ``loss_gt_x``."""
    return {"loss_gt_" + name.removeprefix("loss_"): value for name, value in losses.items()}


def _rounded(per_level: tuple[tuple[float, ...], ...]) -> tuple[tuple[float, ...], ...]:
    """Anchor sizes / ratios per level, rounded so float noise is not a difference."""
    return tuple(tuple(round(float(v), 4) for v in level) for level in per_level)
