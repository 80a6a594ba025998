"""The Distiller: a frozen teacher, a student and an adapter; forward returns named losses.

Written once for every framework against :class:`~gid.frameworks.view.DetectorView`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from gid.config import DistillConfig, scaled_to_input
from gid.distill.gism import GeneralInstances, filter_instances, gism_stats, select_general_instances
from gid.distill.losses import (
    build_adapter,
    feature_loss,
    relation_loss,
    response_loss,
    roi_response_loss,
)
from gid.distill.pooling import InstancePooler
from gid.distill.terms import TERMS, enabled_terms
from gid.errors import GidError
from gid.frameworks import view_for
from gid.frameworks.view import DetectorView, check_compatible
from gid.models.checkpoint import model_from_state, read_checkpoint

# The paper's pixel constants at COCO scale (800 px), rescaled for the actual input size.
COCO_MIN_BOX_SIZE = 10.0
COCO_CANONICAL_SIZE = 224.0


class Distiller(nn.Module):
    """Trains ``student`` (and the adapter) with GID under a frozen ``teacher``.

    The teacher is held outside the module tree: DDP, the optimizer and checkpoints see only
    the student and the adapter, and nothing can ever back-propagate into the teacher.
    ``forward`` returns ``loss_*`` terms (summed by the training loop) and ``gism_*`` statistics.
    With all three GID losses off it is exactly the student's own training.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, config: DistillConfig, image_size: int):
        super().__init__()
        self.student = student
        self.config = config
        self._views = (view_for(teacher.eval().requires_grad_(False)), view_for(student))
        check_compatible(*self._views)
        teacher_view, student_view = self._views
        uses_features = config.feature.enabled or config.relation.enabled
        self.adapter = (
            build_adapter(config.feature.adapter, student_view.feature_channels(), teacher_view.feature_channels())
            if uses_features
            else None
        )
        # Multiplies each term's configured weight(s): 1 unless a gradient balance sets it (gid.distill.balance).
        self.term_scales = {term: 1.0 for term in TERMS}
        self.teacher_val_ap: float | None = None  # the teacher's model file's, when it records one
        self.min_box_size = scaled_to_input(config.gism.min_box_size, COCO_MIN_BOX_SIZE, image_size)
        self.canonical_size = scaled_to_input(config.feature.canonical_size, COCO_CANONICAL_SIZE, image_size)

    @classmethod
    def from_config(
        cls, student: nn.Module, config: DistillConfig, image_size: int, device: torch.device | None = None
    ) -> Distiller:
        state = read_checkpoint(Path(config.teacher))
        teacher, _, _ = model_from_state(state, Path(config.teacher))
        if not any(p.any() for p in teacher.parameters() if p.is_floating_point()):
            raise GidError(
                f"distill.teacher {config.teacher}: every weight is zero, so none were trained or loaded; "
                "pass the model file of a trained teacher"
            )
        try:
            distiller = cls(teacher.to(device) if device is not None else teacher, student, config, image_size)
        except GidError as exc:  # name the file: the student comes from the config, the teacher from here
            raise GidError(f"distill.teacher {config.teacher}: {exc}") from None
        distiller.teacher_val_ap = state.get("metrics", {}).get("val_ap")  # None for files that store none
        return distiller

    @property
    def teacher(self) -> nn.Module:
        return self._views[0].model

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        self.teacher.eval()  # BatchNorm statistics and dropout of the teacher stay frozen
        return self

    @property
    def distilling(self) -> bool:
        return bool(enabled_terms(self.config))

    def set_term_scales(self, scales: dict[str, float]) -> None:
        """Train each term in ``scales`` from the next step on at its configured weight(s) times its scale."""
        self.term_scales.update(scales)

    def term_weights(self) -> dict[str, float]:
        """The weight each enabled loss trains with, by the name it is reported under: configured times scale."""
        return {
            name: getattr(getattr(self.config, term), field) * self.term_scales[term]
            for term in enabled_terms(self.config)
            for field, name in TERMS[term].weights.items()
        }

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        teacher, student = self._views
        batch, targets = student.transform(images, targets)
        features = student.features(batch)
        dense = student.dense(features)
        layout = student.anchor_layout(batch, features)
        losses = student.gt_losses(batch, features, dense, layout, targets)
        if not self.distilling:
            return losses

        with torch.no_grad():
            teacher_features = teacher.features(batch)
            teacher_dense = teacher.dense(teacher_features)
        gt_boxes = [t["boxes"] for t in targets]
        gis = self._general_instances(teacher_dense, dense, layout, gt_boxes, student)
        boxes = [gi.boxes for gi in gis]
        c, weights = self.config, self.term_weights()

        if self.adapter is not None:
            adapted = [self.adapter(level) for level in dense.features]
            pool = InstancePooler(
                boxes, dense.first_level, len(dense.features), c.feature.roi_size, self.canonical_size,
                c.feature.canonical_level,
            )
            pooled_student, pooled_teacher = pool(adapted), pool(teacher_dense.features)
            if c.feature.enabled:
                losses["loss_feature"] = weights["feature"] * feature_loss(pooled_teacher, pooled_student)
            if c.relation.enabled:
                counts = [len(b) for b in boxes]
                relation = relation_loss(pooled_teacher, pooled_student, counts, c.relation.group_images)
                losses["loss_relation"] = weights["relation"] * relation

        if c.response.enabled:
            mask = student.assign_foreground(boxes, layout)
            cls_loss, reg_loss = response_loss(teacher_dense, dense, mask, c.response.temperature)
            losses["loss_response_cls"] = weights["response_cls"] * cls_loss
            losses["loss_response_reg"] = weights["response_reg"] * reg_loss
            if student.two_stage and c.response.roi_response:
                with torch.no_grad():
                    teacher_rois = teacher.roi_outputs(teacher_features, boxes, layout.image_sizes)
                student_rois = student.roi_outputs(features, boxes, layout.image_sizes)
                roi_cls, roi_reg = roi_response_loss(*teacher_rois, *student_rois, c.response.temperature)
                losses["loss_response_roi_cls"] = weights["response_cls"] * roi_cls
                losses["loss_response_roi_reg"] = weights["response_reg"] * roi_reg

        return {**losses, **{f"gism_{k}": v for k, v in gism_stats(gis, gt_boxes).items()}}

    def general_instances(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> list[GeneralInstances]:
        """GISM's choice for a batch, boxes in the detector's input frame (for pictures and checks)."""
        teacher, student = self._views
        with torch.no_grad():
            batch, targets = student.transform(images, targets)
            features = student.features(batch)
            dense, layout = student.dense(features), student.anchor_layout(batch, features)
            teacher_dense = teacher.dense(teacher.features(batch))
            return self._general_instances(teacher_dense, dense, layout, [t["boxes"] for t in targets], student)

    def _general_instances(self, teacher_dense, dense, layout, gt_boxes, student: DetectorView):
        gism = self.config.gism
        if gism.instances == "ground_truth":  # ablation: distil at the ground-truth boxes instead
            return [
                GeneralInstances(
                    boxes=b.detach(), scores=torch.ones(len(b), device=b.device),
                    anchor_index=torch.full((len(b),), -1, dtype=torch.long, device=b.device),
                    from_teacher=torch.zeros(len(b), dtype=torch.bool, device=b.device),
                )
                for b in gt_boxes
            ]
        gis = select_general_instances(teacher_dense, dense, layout, student.decode, gism, self.min_box_size)
        if gism.instances != "all":
            gis = filter_instances(gis, gism.instances, gt_boxes, student.assign_foreground(gt_boxes, layout))
        return gis

