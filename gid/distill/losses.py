"""The three GID losses at the general instances: feature, relation and response (spec §3-§5).

Plain tensor code, framework-agnostic. Teacher tensors are detached here as well as by the
caller's no-grad forward: nothing ever back-propagates into the teacher. Every loss is a scalar
that stays attached to the student's graph even when there is nothing to distil, so the
caller can always sum and back-propagate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gid.errors import GidError
from gid.frameworks.view import DenseOutput


def build_adapter(kind: str, student_channels: int, teacher_channels: int) -> nn.Module:
    """Student FPN width -> teacher FPN width, shared by all levels, no activation (spec §3)."""
    if kind == "conv3x3":
        return nn.Conv2d(student_channels, teacher_channels, kernel_size=3, stride=1, padding=1)
    if kind == "conv1x1":
        return nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
    if kind == "none":
        if student_channels != teacher_channels:
            raise GidError(
                f"distill.feature.adapter=none needs equal FPN widths, but the student has "
                f"{student_channels} channels and the teacher {teacher_channels}; use conv3x3 or conv1x1"
            )
        return nn.Identity()
    raise ValueError(f"unknown adapter {kind!r}; expected conv3x3, conv1x1 or none")


def _zero(attached_to: Tensor) -> Tensor:
    """A scalar 0 in the graph of ``attached_to``, so backward works when there is nothing to distil."""
    return attached_to.sum() * 0.0


def feature_loss(pooled_teacher: Tensor, pooled_student: Tensor) -> Tensor:
    """L_feature = sum (t - s)^2 over GIs, channels and bins / (N * roi_size^2); 0 when N == 0."""
    num_instances, bins = pooled_student.shape[0], pooled_student.shape[-2] * pooled_student.shape[-1]
    squared = (pooled_teacher.detach() - pooled_student).pow(2).sum()
    return squared / (max(num_instances, 1) * bins)


def _rkd_distances(features: Tensor) -> Tensor:
    """Euclidean distances of the ``M (M - 1) / 2`` pairs i < j / their mean over the positive ones."""
    # pdist, not cdist: each pair once, which halves the work of a distance matrix that is symmetric
    # with a zero diagonal, and exact differences (no matrix-product shortcut), so identical
    # instances give a zero distance and a zero gradient instead of a round-off blow-up.
    distances = torch.pdist(features)
    positive = distances > 0
    # where, not distances[positive]: a boolean index has a shape that the host must wait for
    mean = torch.where(positive, distances, 0).sum() / positive.sum().clamp(min=1)
    return distances / mean.clamp(min=torch.finfo(distances.dtype).tiny)


def relation_loss(
    pooled_teacher: Tensor, pooled_student: Tensor, counts: list[int], group_images: int
) -> Tensor:
    """RKD distance loss over the GIs of groups of ``group_images`` consecutive images (spec §4).

    Per group of M GIs: d_t, d_s = RKD-normalised pairwise distances of the flattened features;
    L_group = sum_{i != j} SmoothL1_{beta=1}(d_s(i, j) - d_t(i, j)) / (M^2 - M).
    L_relation = mean of L_group over the groups with M >= 3. Groups with M < 3 are left out of the
    mean, not counted as 0: with fewer than three instances the normalised distances are fixed
    (one pair always has distance 1), so such a group carries no relation, and counting it would
    shrink the loss of the other groups depending on how the batch happened to split. 0 when no
    group has 3 GIs. Scaling either model's features by a constant leaves it unchanged.
    """
    teacher = pooled_teacher.detach().flatten(1)
    student = pooled_student.flatten(1)
    sizes = [sum(counts[first : first + group_images]) for first in range(0, len(counts), group_images)]
    rest = [len(student) - sum(sizes)] if len(student) > sum(sizes) else []  # rows beyond the counts: unused
    losses = []
    # One split, not a slice per group: the backward of a slice would spread each group's gradient
    # over a zero tensor the size of all GIs' features, and add those up group after group.
    groups = zip(sizes, teacher.split(sizes + rest), student.split(sizes + rest))  # zip stops before `rest`
    for size, group_teacher, group_student in groups:
        if size >= 3:
            # Both distance matrices are symmetric: the mean over the pairs i < j is the mean over i != j.
            d_teacher, d_student = _rkd_distances(group_teacher), _rkd_distances(group_student)
            losses.append(F.smooth_l1_loss(d_student, d_teacher, beta=1.0, reduction="mean"))
    if not losses:
        return _zero(pooled_student)
    return torch.stack(losses).mean()


def response_loss(
    teacher: DenseOutput, student: DenseOutput, mask: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """Dense head distillation on the anchors ``mask [B, R]`` marks (spec §5) -> (L_cls, L_reg).

    N_m = max(1, number of masked anchors).
    L_cls = T^2 * sum_{masked r, all c} BCE(sigmoid(z_s / T), sigmoid(z_t / T)) / N_m: both logits
    are softened by T, and the T^2 factor (as in Hinton et al.'s distillation) keeps the gradient
    scale independent of T; T = 1 is plain BCE against the teacher's probabilities.
    L_reg = sum_{masked r} |b_s - b_t|_1 / N_m on the regression outputs in the detector's own
    encoding, plus, with centerness (FCOS), sum_{masked r} BCE(sigmoid(c_s), sigmoid(c_t)) / N_m.
    Every anchor is computed and the masked ones summed: selecting them would give tensors whose
    shape the host must wait for.
    """
    masked = mask[..., None]
    num_masked = mask.sum().clamp(min=1)
    teacher_probs = torch.sigmoid(teacher.cls_logits.detach() / temperature)
    cls = F.binary_cross_entropy_with_logits(student.cls_logits / temperature, teacher_probs, reduction="none")
    cls = torch.where(masked, cls, 0).sum() * temperature**2 / num_masked

    reg = torch.where(masked, student.bbox_regression - teacher.bbox_regression.detach(), 0).abs().sum()
    if student.centerness is not None:
        centerness = F.binary_cross_entropy_with_logits(
            student.centerness, torch.sigmoid(teacher.centerness.detach()), reduction="none"
        )
        reg = reg + torch.where(masked, centerness, 0).sum()
    return cls, reg / num_masked


def roi_response_loss(
    teacher_logits: Tensor,
    teacher_deltas: Tensor,
    student_logits: Tensor,
    student_deltas: Tensor,
    temperature: float,
) -> tuple[Tensor, Tensor]:
    """Faster R-CNN second-stage distillation at the GIs (spec §5, the project's interpretation).

    Inputs: box-head class logits ``[N, K]`` (class 0 = background) and box deltas ``[N, K * 4]``.
    L_cls = T^2 * sum_i KL(softmax(z_t,i / T) || softmax(z_s,i / T)) / N  ("batchmean").
    L_reg = sum_i |delta_s,i[c_i] - delta_t,i[c_i]|_1 / N, c_i = the teacher's top foreground class
    (argmax over classes 1..K-1). Both are 0 when N == 0.
    """
    teacher_logits, teacher_deltas = teacher_logits.detach(), teacher_deltas.detach()
    num_instances, num_classes = student_logits.shape
    divisor = max(num_instances, 1)
    cls = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.log_softmax(teacher_logits / temperature, dim=1),
        reduction="sum",
        log_target=True,
    )
    cls = cls * temperature**2 / divisor

    top_class = teacher_logits[:, 1:].argmax(dim=1) + 1
    rows = torch.arange(num_instances, device=top_class.device)
    teacher_box = teacher_deltas.reshape(num_instances, num_classes, 4)[rows, top_class]
    student_box = student_deltas.reshape(num_instances, num_classes, 4)[rows, top_class]
    reg = (student_box - teacher_box).abs().sum() / divisor
    return cls, reg
