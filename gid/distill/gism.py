"""General Instance Selection Module (GISM): where teacher and student disagree most.

Framework-agnostic: it reads the dense outputs a DetectorView hands over and never looks at
ground truth, except in the ablation filter and the logging statistics at the end.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import box_iou

from gid.config import GismConfig
from gid.frameworks.view import AnchorLayout, DenseOutput

#: IoU thresholds of the instance-type ablation (spec §2.7) and the logged GT overlap (spec §2).
SEMI_POSITIVE_IOU = 0.7
NEGATIVE_IOU = 0.3
GT_OVERLAP_IOU = 0.5

#: Candidates per image the first NMS round looks at on a CPU (see _first_nms_survivors); any value
#: gives the same result.
_NMS_FIRST_PREFIX = 128


@dataclass
class GeneralInstances:
    """The GIs GISM selected in one image (all tensors detached)."""

    boxes: Tensor  # [k, 4] xyxy in the detector's input frame
    scores: Tensor  # [k] GI scores
    anchor_index: Tensor  # [k] index into the image's anchors
    from_teacher: Tensor  # [k] bool: the box was decoded from the teacher's regression


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

    All images are processed together (one top-k, one decode, NMS for all at once), but nothing
    crosses from one image to another: every step works on the rows of ``[B, pre_nms_top_k]``
    candidate tensors, one row per image.
    ``decode(deltas [N, 4], anchors [N, 4]) -> boxes [N, 4]`` is the detector's own box decoder;
    ``min_box_size`` is in pixels (already scaled to the input size). Everything returned is
    detached: GIs are places to distil at, not something to learn.
    """
    p_teacher = teacher.cls_logits.detach().float().sigmoid()
    p_student = student.cls_logits.detach().float().sigmoid()
    scores = gi_scores(p_teacher, p_student, config.score_mode)
    teacher_wins = p_teacher.amax(dim=-1) >= p_student.amax(dim=-1)

    # Candidates: the pre_nms_top_k best anchors of each image over all levels, best first.
    scores, index = scores.topk(min(config.pre_nms_top_k, scores.shape[1]), dim=1)
    from_teacher = teacher_wins.gather(1, index)
    boxes = _decode_candidates(teacher, student, layout, decode, index, from_teacher)
    boxes = _clip_to_images(boxes, layout.image_sizes)
    widths, heights = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    eligible = (widths >= min_box_size) & (heights >= min_box_size) & (scores >= config.min_score)

    survivor, counts = _first_nms_survivors(boxes, eligible, config.nms_iou, config.top_k)
    position = survivor.clamp(min=0)
    picked = [
        boxes.gather(1, position[..., None].expand(-1, -1, 4)),
        scores.gather(1, position),
        index.gather(1, position),
        from_teacher.gather(1, position),
    ]
    # Survivors come first in each row: an image's GIs are the first `count` of its row.
    return [GeneralInstances(*(tensor[i, :count] for tensor in picked)) for i, count in enumerate(counts)]


def _decode_candidates(
    teacher: DenseOutput,
    student: DenseOutput,
    layout: AnchorLayout,
    decode: Callable[[Tensor, Tensor], Tensor],
    index: Tensor,
    from_teacher: Tensor,
) -> Tensor:
    """``[B, N, 4]`` boxes of the candidates ``index [B, N]``, from the more confident model's deltas.

    Ties go to the teacher (``from_teacher``); only the candidates are decoded, in one call.
    """
    corners = index[..., None].expand(-1, -1, 4)
    deltas = torch.where(
        from_teacher[..., None],
        teacher.bbox_regression.detach().gather(1, corners),
        student.bbox_regression.detach().gather(1, corners),
    )
    anchors = torch.stack(layout.anchors).gather(1, corners)
    return decode(deltas.float().flatten(0, 1), anchors.flatten(0, 1)).reshape(deltas.shape)


def _clip_to_images(boxes: Tensor, image_sizes: list[tuple[int, int]]) -> Tensor:
    """``clip_boxes_to_image`` of every image's boxes ``[B, N, 4]`` to its own (height, width)."""
    # Made on the host and copied without waiting: a blocking copy would wait for the device's queue.
    limits = torch.tensor([[w, h, w, h] for h, w in image_sizes], dtype=boxes.dtype)
    return boxes.clamp(min=0).minimum(limits.to(boxes.device, non_blocking=True)[:, None, :])


def _first_nms_survivors(
    boxes: Tensor, eligible: Tensor, iou_threshold: float, k: int
) -> tuple[Tensor, list[int]]:
    """Positions ``[B, k]`` of the first k survivors of NMS over the ``eligible`` boxes of each row, and
    how many each row has.

    Equals ``nms(boxes[i][eligible[i]], scores, iou_threshold)[:k]`` image by image for boxes
    sorted by decreasing score (torchvision's NMS sorts stably, so ties keep their order), -1
    after the survivors of an image that has fewer. Greedy NMS keeps a box unless a better kept box
    overlaps it, so whether a box is kept depends only on the boxes before it: the first k survivors
    among the first n candidates are the first k of all. On a CPU, whose cost grows with the number
    of candidates, they are looked for in a prefix of every image's candidates, grown only while some
    image has fewer than k survivors in it. Elsewhere all candidates are searched at once: a GPU's cost
    is the number of kernels, not their width, and each further prefix would be a host synchronisation.
    """
    threshold = _below_or_at(iou_threshold, boxes.dtype)
    prefix = max(_NMS_FIRST_PREFIX, 8 * k) if boxes.device.type == "cpu" else boxes.shape[1]
    while True:
        survivors = _greedy_nms(boxes[:, :prefix], eligible[:, :prefix], threshold, k)
        # GISM's one host synchronisation per prefix: how many survivors each image has in it.
        counts = (survivors >= 0).sum(dim=1).tolist()
        if prefix >= boxes.shape[1] or all(count == survivors.shape[1] for count in counts):
            return survivors, counts
        prefix *= 4


def _greedy_nms(boxes: Tensor, eligible: Tensor, threshold: float, k: int) -> Tensor:
    """The first k survivors of greedy NMS in each row, found in k steps for all images together.

    Each step keeps every image's best box not yet suppressed and suppresses the image's boxes
    whose IoU with it is above ``threshold``. The IoU is computed as torchvision's CPU kernel
    computes it, operation by operation, so that every comparison comes out the same.
    """
    areas = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    images = torch.arange(boxes.shape[0], device=boxes.device)
    available = eligible.clone()  # neither kept nor suppressed yet
    survivors = torch.full((boxes.shape[0], min(k, boxes.shape[1])), -1, device=boxes.device)
    for step in range(survivors.shape[1]):
        found, best = available.max(dim=1)  # the first available box: the best remaining score
        survivors[:, step] = torch.where(found, best, -1)
        kept, kept_area = boxes[images, best, None], areas[images, best, None]
        sides = torch.minimum(boxes[..., 2:], kept[..., 2:]) - torch.maximum(boxes[..., :2], kept[..., :2])
        sides = sides.clamp_(min=0)
        inter = sides[..., 0] * sides[..., 1]
        iou = inter / (kept_area + areas - inter)
        available.masked_fill_(iou > threshold, False)  # not `iou <= threshold`: a NaN IoU suppresses nothing
        available[images, best] = False
    return survivors


@functools.cache  # the same few thresholds on every step
def _below_or_at(threshold: float, dtype: torch.dtype) -> float:
    """The largest ``dtype`` value t <= ``threshold``: for x of that dtype, x > t iff x > threshold.

    torchvision's NMS compares its IoU with the threshold in double precision; comparing a float32
    tensor with a Python float rounds the threshold to float32 instead, which can round it up.
    """
    rounded = torch.tensor(threshold, dtype=dtype)
    if rounded.item() > threshold:
        rounded = torch.nextafter(rounded, torch.tensor(-math.inf, dtype=dtype))
    return rounded.item()


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
def gism_stats(gis: list[GeneralInstances], gt_boxes: list[Tensor]) -> dict[str, Tensor]:
    """Logging only: GIs per image, fraction with IoU >= 0.5 to a GT box, fraction from the teacher.

    The two fractions are over all GIs of the batch and 0 when there are none. Scalars on the GIs'
    device, which the host reads only when it logs them.
    """
    total = sum(len(gi.boxes) for gi in gis)  # shapes: known on the host
    overlapping = sum((_max_iou(gi.boxes, gt) >= GT_OVERLAP_IOU).sum() for gi, gt in zip(gis, gt_boxes))
    from_teacher = sum(gi.from_teacher.sum() for gi in gis)
    # float64 quotients rounded to float32: the values torch.tensor(a / b) made of Python's quotients
    return {
        "gis_per_image": gis[0].boxes.new_full((), total / len(gis), dtype=torch.float64).float(),
        "gi_gt_overlap": (overlapping.double() / max(total, 1)).float(),
        "gi_from_teacher": (from_teacher.double() / max(total, 1)).float(),
    }
