"""The Distiller on real (tiny) torchvision detectors of each framework."""

import pytest
import torch

from gid.config import DistillConfig, ModelConfig
from gid.data import build_dataset, collate
from gid.distill import Distiller
from gid.distill.pictures import save_gi_pictures
from gid.distill.terms import TERMS
from gid.errors import GidError
from gid.models import build_detector

FRAMEWORKS = ["retinanet", "fcos", "faster_rcnn"]
IMAGE_SIZE = 64


def detector(framework: str, backbone: str = "resnet18", fpn: int = 64, num_classes: int = 7, **model):
    return build_detector(
        ModelConfig(framework=framework, backbone=backbone, fpn_channels=fpn, **model), IMAGE_SIZE, num_classes
    )


def distiller(framework: str, teacher: str = "resnet34", student: str = "resnet18", **distill) -> Distiller:
    torch.manual_seed(0)
    config = DistillConfig.model_validate({"teacher": "unused.pt", **distill})
    return Distiller(detector(framework, teacher, fpn=128), detector(framework, student), config, IMAGE_SIZE)


@pytest.fixture(scope="module")
def batch(synth_root):
    from gid.config import DataConfig

    dataset = build_dataset(DataConfig(root=synth_root), "train", train=False)
    images, targets = collate([dataset[i] for i in range(4)])
    return list(images), list(targets)


# Faster R-CNN on MobileNetV3 (torchvision's three FPN levels, two at stride 32) from a wider one
@pytest.mark.parametrize(
    "framework, teacher, student",
    [(framework, "resnet34", "resnet18") for framework in FRAMEWORKS] + [("faster_rcnn", "mobilenet_v3_large", "mobilenet_v3_large")],
)
def test_gradients_reach_student_and_adapter_never_teacher(framework, teacher, student, batch):
    model = distiller(framework, teacher, student).train()
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


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_no_ground_truth_and_no_gis_give_finite_losses(framework, batch):
    images, targets = batch
    empty = [{**t, "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)} for t in targets]
    model = distiller(framework, gism={"min_score": 1.0}).train()  # min_score 1: no GI survives
    for case in (empty, targets):
        losses = model(images, case)
        total = sum(v for k, v in losses.items() if k.startswith("loss_"))
        assert torch.isfinite(total)
        total.backward()
    assert model(images, targets)["gism_gis_per_image"] == 0


def test_all_losses_off_is_the_plain_student(batch):
    off = {"feature": {"enabled": False}, "relation": {"enabled": False}, "response": {"enabled": False}}
    model = distiller("retinanet", **off).train()
    assert model.adapter is None
    torch.manual_seed(1)
    distilled = model(*batch)
    torch.manual_seed(1)
    plain = model.student(*batch)
    assert set(distilled) == {f"loss_gt_{k}" for k in plain}
    for name, value in plain.items():
        torch.testing.assert_close(distilled[f"loss_gt_{name}"], value)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_short_gid_training_lowers_the_total_loss(framework, batch):
    model = distiller(framework).train()
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
    student = detector("retinanet", num_classes=num_classes, **student_kwargs)
    config = DistillConfig(teacher="unused.pt")
    with pytest.raises(GidError, match="teacher and student are incompatible") as caught:
        Distiller(detector("retinanet"), student, config, IMAGE_SIZE)
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_adapter_none_needs_equal_widths():
    config = DistillConfig.model_validate({"teacher": "unused.pt", "feature": {"adapter": "none"}})
    with pytest.raises(GidError, match="conv3x3 or conv1x1"):
        Distiller(detector("fcos", fpn=128), detector("fcos"), config, IMAGE_SIZE)


def test_gi_pictures_are_written(synth_root, tmp_path):
    from gid.config import DataConfig

    dataset = build_dataset(DataConfig(root=synth_root), "val", train=False)
    paths = save_gi_pictures(distiller("retinanet"), dataset, tmp_path, count=2)
    assert len(paths) == 2 and all(p.stat().st_size > 0 for p in paths)


def test_a_teacher_whose_weights_are_all_zero_is_refused(tmp_path):
    from gid.config import validate
    from gid.models import save_model

    config = validate({"model": {"framework": "fcos", "backbone": "resnet18", "fpn_channels": 64}, "data": {"image_size": IMAGE_SIZE}})
    zeroed = {k: torch.zeros_like(v) for k, v in detector("fcos").state_dict().items()}
    save_model(zeroed, config, 7, tmp_path / "zero.pt")
    with pytest.raises(GidError, match="every weight is zero, so none were trained or loaded"):
        Distiller.from_config(detector("fcos"), DistillConfig(teacher=tmp_path / "zero.pt"), IMAGE_SIZE)


def test_a_teacher_no_better_than_the_student_is_a_warning():
    from gid.distill.teacher import teacher_check

    assert teacher_check(0.30, 0.25, "the student alone") is None
    assert teacher_check(None, 0.25, "the student alone") is None and teacher_check(0.3, None, "x") is None
    warning = teacher_check(0.20, 0.25, "the student alone")
    assert warning.startswith("warning: the teacher (20.0 AP) is not better than the student alone (25.0 AP)")
