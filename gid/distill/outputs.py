"""What a DetectorView hands to the framework-agnostic GID code."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


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


@dataclass
class GeneralInstances:
    """The GIs GISM selected in one image (all tensors detached)."""

    boxes: Tensor  # [k, 4] xyxy in the detector's input frame
    scores: Tensor  # [k] GI scores
    anchor_index: Tensor  # [k] index into the image's anchors
    from_teacher: Tensor  # [k] bool: the box was decoded from the teacher's regression
