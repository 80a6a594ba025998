"""General Instance Selection Module (GISM): where teacher and student disagree most.

Framework-agnostic: it reads the dense outputs a DetectorView hands over and never looks at
ground truth, except in the ablation filter and the logging statistics at the end.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torchvision.ops import box_iou, clip_boxes_to_image, nms, remove_small_boxes

from gid.config import GismConfig
from gid.distill.outputs import AnchorLayout, DenseOutput, GeneralInstances

#: IoU thresholds of the instance-type ablation (spec §2.7) and the logged GT overlap (spec §2).
SEMI_POSITIVE_IOU = 0.7
NEGATIVE_IOU = 0.3
GT_OVERLAP_IOU = 0.5

#: Candidates the first NMS pass looks at (see _nms_top_k); any value gives the same result.
_NMS_FIRST_PREFIX = 128


def gi_scores(p_teacher: Tensor, p_student: Tensor, mode: str) -> Tensor:
    """GI score of every anchor from class probabilities ``[..., R, K]`` -> ``[..., R]``.

    ``paper``:     score(r) = max_c |p_t(r, c) - p_s(r, c)|
    ``reference``: score(r) = |max_c p_t(r, c) - max_c p_s(r, c)|  (the authors' public code)
    """
    if mode == "paper":
        return (p_teacher - p_student).abs().amax(dim=-1)
    if mode == "reference":
        return (p_teacher.amax(dim=-1) - p_student.amax(dim=-1)).abs()
    raise ValueError(f"unknown GI score mode {mode!r}; expected 'paper' or 'reference'")


@torch.no_grad()
def select_general_instances(
    teacher: DenseOutput,
    student: DenseOutput,
    layout: AnchorLayout,
    decode: Callable[[Tensor, Tensor], Tensor],
    config: GismConfig,
    min_box_size: float,
) -> list[GeneralInstances]:
    """Select the GIs of every image of the batch, each image on its own (spec §2).

    ``decode(deltas [N, 4], anchors [N, 4]) -> boxes [N, 4]`` is the detector's own box decoder;
    ``min_box_size`` is in pixels (already scaled to the input size). Everything returned is
    detached: GIs are places to distil at, not something to learn.
    """
    p_teacher = teacher.cls_logits.detach().float().sigmoid()
    p_student = student.cls_logits.detach().float().sigmoid()
    scores = gi_scores(p_teacher, p_student, config.score_mode)
    teacher_wins = p_teacher.amax(dim=-1) >= p_student.amax(dim=-1)
    return [
        _select_one_image(
            scores[i],
            teacher_wins[i],
            teacher.bbox_regression[i].detach(),
            student.bbox_regression[i].detach(),
            layout.anchors[i],
            layout.image_sizes[i],
            decode,
            config,
            min_box_size,
        )
        for i in range(scores.shape[0])
    ]


def _select_one_image(
    scores: Tensor,
    teacher_wins: Tensor,
    deltas_teacher: Tensor,
    deltas_student: Tensor,
    anchors: Tensor,
    image_size: tuple[int, int],
    decode: Callable[[Tensor, Tensor], Tensor],
    config: GismConfig,
    min_box_size: float,
) -> GeneralInstances:
    """Top-k over all levels, decode, clip, size and score filter, class-agnostic NMS, top-K."""
    scores, index = scores.topk(min(config.pre_nms_top_k, scores.numel()))
    from_teacher = teacher_wins[index]
    # The box of the more confident model (ties go to the teacher); only candidates are decoded.
    deltas = torch.where(from_teacher[:, None], deltas_teacher[index], deltas_student[index])
    boxes = clip_boxes_to_image(decode(deltas.float(), anchors[index]), image_size)

    keep = remove_small_boxes(boxes, min_box_size)
    keep = keep[scores[keep] >= config.min_score]
    keep = keep[_nms_top_k(boxes[keep], scores[keep], config.nms_iou, config.top_k)]
    return GeneralInstances(
        boxes=boxes[keep], scores=scores[keep], anchor_index=index[keep], from_teacher=from_teacher[keep]
    )


def _nms_top_k(boxes: Tensor, scores: Tensor, iou_threshold: float, k: int) -> Tensor:
    """``nms(boxes, scores, iou_threshold)[:k]`` for ``scores`` sorted in descending order.

    Greedy NMS keeps a box unless a higher-scoring kept box overlaps it, so whether a box is kept
    depends only on the boxes before it: NMS over the first n candidates keeps exactly the first
    survivors of NMS over all of them (torchvision's NMS sorts stably, so ties keep their order).
    The first k survivors are therefore found on a growing prefix instead of suppressing all
    ``pre_nms_top_k`` candidates against each other, the selection's main cost otherwise.
    """
    num_boxes = len(scores)
    size = max(_NMS_FIRST_PREFIX, 8 * k)
    while size < num_boxes:
        kept = nms(boxes[:size], scores[:size], iou_threshold)
        if len(kept) >= k:
            return kept[:k]
        size *= 4
    return nms(boxes, scores, iou_threshold)[:k]


def _subset(gi: GeneralInstances, keep: Tensor) -> GeneralInstances:
    return GeneralInstances(gi.boxes[keep], gi.scores[keep], gi.anchor_index[keep], gi.from_teacher[keep])


def _max_iou(boxes: Tensor, gt_boxes: Tensor) -> Tensor:
    """Best IoU of each box with any GT box; 0 for an image without ground truth."""
    if gt_boxes.numel() == 0:
        return boxes.new_zeros(boxes.shape[0])
    return box_iou(boxes, gt_boxes.to(boxes)).amax(dim=1)


@torch.no_grad()
def filter_instances(
    gis: list[GeneralInstances], kind: str, gt_boxes: list[Tensor], gt_foreground: Tensor
) -> list[GeneralInstances]:
    """Keep one type of GI, for the paper's instance-type ablation only (spec §2.7).

    ``gt_foreground[i, r]`` says whether anchor r of image i is foreground for the ground truth
    (the detector's own target assignment). ``all``: every GI; ``positive``: its anchor is
    foreground; ``semi_positive``: not foreground, but its box has IoU >= 0.7 with a GT box;
    ``negative``: not foreground and IoU < 0.3 with every GT box. ``ground_truth`` (distil at the GT
    boxes) replaces the GIs altogether and is the caller's business.
    """
    if kind == "all":
        return gis
    if kind not in ("positive", "semi_positive", "negative"):
        raise ValueError(f"unknown GI filter {kind!r}; the caller substitutes GT boxes for 'ground_truth'")
    filtered = []
    for i, gi in enumerate(gis):
        foreground = gt_foreground[i, gi.anchor_index]
        max_iou = _max_iou(gi.boxes, gt_boxes[i])
        if kind == "positive":
            keep = foreground
        elif kind == "semi_positive":
            keep = ~foreground & (max_iou >= SEMI_POSITIVE_IOU)
        else:
            keep = ~foreground & (max_iou < NEGATIVE_IOU)
        filtered.append(_subset(gi, keep))
    return filtered


@torch.no_grad()
def gism_stats(gis: list[GeneralInstances], gt_boxes: list[Tensor]) -> dict[str, float]:
    """Logging only: GIs per image, fraction with IoU >= 0.5 to a GT box, fraction from the teacher.

    The two fractions are over all GIs of the batch and 0 when there are none.
    """
    total = sum(len(gi.boxes) for gi in gis)
    overlapping = sum(int((_max_iou(gi.boxes, gt) >= GT_OVERLAP_IOU).sum()) for gi, gt in zip(gis, gt_boxes))
    from_teacher = sum(int(gi.from_teacher.sum()) for gi in gis)
    return {
        "gis_per_image": total / len(gis) if gis else 0.0,
        "gi_gt_overlap": overlapping / total if total else 0.0,
        "gi_from_teacher": from_teacher / total if total else 0.0,
    }
