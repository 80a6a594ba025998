"""The Distiller on real (tiny) torchvision detectors of each framework."""

import pytest
import torch

from gid.config import DataConfig, DistillConfig, validate
from gid.data import build_dataset
from gid.distill import Distiller
from gid.distill.pictures import save_gi_pictures
from gid.distill.terms import TERMS
from gid.errors import GidError
from gid.frameworks import FRAMEWORKS
from gid.models import save_model
from support import SIZE, tiny_config_dict, tiny_detector, tiny_distiller


# Faster R-CNN on MobileNetV3 (torchvision's three FPN levels, two at stride 32) from a wider one
@pytest.mark.parametrize(
    "framework, teacher, student",
    [(framework, "resnet34", "resnet18") for framework in FRAMEWORKS] + [("faster_rcnn", "mobilenet_v3_large", "mobilenet_v3_large")],
)
def test_gradients_reach_student_and_adapter_never_teacher(framework, teacher, student, batch):
    model = tiny_distiller(framework, teacher, student).train()
    losses = model(*batch)
    expected = {"loss_feature", "loss_relation", "loss_response_cls", "loss_response_reg"}
    if framework == "faster_rcnn":
        expected |= {"loss_response_roi_cls", "loss_response_roi_reg"}
    assert expected <= set(losses)
    # the balance finds a term's losses by their keys in the table of terms
    assert {k for k in losses if k.startswith("loss_") and not k.startswith("loss_gt_")} <= {
        key for term in TERMS.values() for key in term.losses
    }
    assert losses["gism_gis_per_image"] > 0
    sum(v for k, v in losses.items() if k.startswith("loss_")).backward()

    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert not model.teacher.training
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.student.backbone.parameters())
    assert all(p.grad is not None for p in model.adapter.parameters())
    # The teacher is not part of the module tree: DDP, the optimizer and checkpoints never see it.
    assert not any(name.startswith("teacher") for name in model.state_dict())


@pytest.mark.parametrize("framework", list(FRAMEWORKS))
def test_no_ground_truth_and_no_gis_give_finite_losses(framework, batch):
    images, targets = batch
    empty = [{**t, "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)} for t in targets]
    model = tiny_distiller(framework, gism={"min_score": 1.0}).train()  # min_score 1: no GI survives
    for case in (empty, targets):
        losses = model(images, case)
        total = sum(v for k, v in losses.items() if k.startswith("loss_"))
        assert torch.isfinite(total)
        total.backward()
    assert model(images, targets)["gism_gis_per_image"] == 0


def test_all_losses_off_is_the_plain_student(batch):
    off = {"feature": {"enabled": False}, "relation": {"enabled": False}, "response": {"enabled": False}}
    model = tiny_distiller("retinanet", **off).train()
    assert model.adapter is None
    torch.manual_seed(1)
    distilled = model(*batch)
    torch.manual_seed(1)
    plain = model.student(*batch)
    assert set(distilled) == {f"loss_gt_{k}" for k in plain}
    for name, value in plain.items():
        torch.testing.assert_close(distilled[f"loss_gt_{name}"], value)


@pytest.mark.parametrize("framework", list(FRAMEWORKS))
def test_short_gid_training_lowers_the_total_loss(framework, batch):
    model = tiny_distiller(framework).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    totals = []
    for _ in range(8):
        losses = model(*batch)
        total = sum(v for k, v in losses.items() if k.startswith("loss_"))
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        optimizer.step()
        totals.append(total.item())
    assert all(torch.isfinite(torch.tensor(totals)))
    assert min(totals[-3:]) < totals[0]


@pytest.mark.parametrize(
    "student_kwargs, expected",
    [
        ({"num_classes": 5}, "num_classes differs (teacher 7, student 5)"),
        ({"anchor_sizes": [4, 8, 16, 32, 64]}, "anchor_sizes differs"),
    ],
)
def test_mismatched_teacher_and_student_fail_clearly(student_kwargs, expected):
    num_classes = student_kwargs.pop("num_classes", 7)
    student = tiny_detector("retinanet", num_classes, **student_kwargs)
    config = DistillConfig(teacher="unused.pt")
    with pytest.raises(GidError, match="teacher and student are incompatible") as caught:
        Distiller(tiny_detector("retinanet"), student, config, SIZE)
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_adapter_none_needs_equal_widths():
    config = DistillConfig.model_validate({"teacher": "unused.pt", "feature": {"adapter": "none"}})
    with pytest.raises(GidError, match="conv3x3 or conv1x1"):
        Distiller(tiny_detector("fcos", fpn_channels=128), tiny_detector("fcos"), config, SIZE)


def test_gi_pictures_are_written(synth_root, tmp_path):
    dataset = build_dataset(DataConfig(root=synth_root), "val", train=False)
    paths = save_gi_pictures(tiny_distiller("retinanet"), dataset, tmp_path, count=2)
    assert len(paths) == 2 and all(p.stat().st_size > 0 for p in paths)


def test_a_teacher_whose_weights_are_all_zero_is_refused(synth_root, tmp_path):
    config = validate(tiny_config_dict(synth_root, "fcos"))
    zeroed = {k: torch.zeros_like(v) for k, v in tiny_detector("fcos").state_dict().items()}
    save_model(zeroed, config, 7, tmp_path / "zero.pt")
    with pytest.raises(GidError, match="every weight is zero, so none were trained or loaded"):
        Distiller.from_config(tiny_detector("fcos"), DistillConfig(teacher=tmp_path / "zero.pt"), SIZE)


def test_a_teacher_no_better_than_the_student_is_a_warning():
    from gid.distill.teacher import teacher_check

    assert teacher_check(0.30, 0.25, "the student alone") is None
    assert teacher_check(None, 0.25, "the student alone") is None and teacher_check(0.3, None, "x") is None
    warning = teacher_check(0.20, 0.25, "the student alone")
    assert warning.startswith("warning: the teacher (20.0 AP) is not better than the student alone (25.0 AP)")
