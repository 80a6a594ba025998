"""torchvision's architectures, pretrained backbones, fine-tuning to other classes, `gid model import/export`.

torchvision-format files are made here the way torchvision publishes them: the state dict of a
builder's model (weights=None, weights_backbone=None, seeded), saved with torch.save.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision import models
from torchvision.models import detection
from torchvision.models.detection.backbone_utils import mobilenet_backbone, resnet_fpn_backbone
from torchvision.ops.misc import FrozenBatchNorm2d

from gid.cli import main
from gid.config import ModelConfig, validate
from gid.engine.loop import build_trainable
from gid.errors import GidError
from gid.frameworks import FRAMEWORKS
from gid.models import build_detector, load_model, read_checkpoint, save_model
from gid.models.roi_align import MatmulMultiScaleRoIAlign
from support import tiny_config_dict

NUM_CLASSES = 7  # the synthetic data's six classes and background, so `gid eval` can score imports
BUILDERS = {
    "retinanet_resnet50_fpn": ("retinanet", "v1", "resnet50"),
    "retinanet_resnet50_fpn_v2": ("retinanet", "v2", "resnet50"),
    "fcos_resnet50_fpn": ("fcos", "v1", "resnet50"),
    "fasterrcnn_resnet50_fpn": ("faster_rcnn", "v1", "resnet50"),
    "fasterrcnn_resnet50_fpn_v2": ("faster_rcnn", "v2", "resnet50"),
    "fasterrcnn_mobilenet_v3_large_fpn": ("faster_rcnn", "v1", "mobilenet_v3_large"),
    "fasterrcnn_mobilenet_v3_large_320_fpn": ("faster_rcnn", "v1", "mobilenet_v3_large"),
}
ARCHITECTURES = [("retinanet", "v1"), ("retinanet", "v2"), ("fcos", "v1"), ("faster_rcnn", "v1"), ("faster_rcnn", "v2")]
#: gid's students, which no torchvision builder makes: FPN-64 on a ResNet-18, and Faster R-CNN on MobileNets too
STUDENTS = [(framework, variant, "resnet18") for framework, variant in ARCHITECTURES] + [
    ("faster_rcnn", "v1", "mobilenet_v3_large"), ("faster_rcnn", "v2", "mobilenet_v3_large"),
    ("faster_rcnn", "v1", "mobilenet_v2")]


def torchvision_model(builder: str, num_classes: int = NUM_CLASSES, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return getattr(detection, builder)(weights=None, weights_backbone=None, num_classes=num_classes)


def torchvision_state_dict(builder: str, num_classes: int = NUM_CLASSES, seed: int = 0) -> dict[str, torch.Tensor]:
    return torchvision_model(builder, num_classes, seed).state_dict()


@pytest.fixture(scope="module", params=list(BUILDERS))
def builder_file(request, tmp_path_factory) -> tuple[str, Path]:
    """One seeded torchvision detector file per builder (each made once)."""
    path = tmp_path_factory.mktemp(request.param) / f"{request.param}.pth"
    torch.save(torchvision_state_dict(request.param), path)
    return request.param, path


def gid_config(framework: str, variant: str, **model) -> ModelConfig:
    return ModelConfig(framework=framework, variant=variant, **model)


# --- 1. torchvision's architectures -----------------------------------------------------------


def test_gid_builds_each_torchvision_builders_module_tree(builder_file):
    builder, path = builder_file
    framework, variant, backbone = BUILDERS[builder]
    theirs = torch.load(path, weights_only=True)
    ours = build_detector(gid_config(framework, variant, backbone=backbone, fpn_channels=256), 800, NUM_CLASSES)
    assert list(ours.state_dict()) == list(theirs)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.items()}
    ours.load_state_dict(theirs, strict=True)
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in theirs.items())


def test_retinanet_v2_uses_giou_and_p6_from_c5():
    v1, v2 = (build_detector(gid_config("retinanet", v), 64, 3) for v in ("v1", "v2"))
    assert v1.head.regression_head._loss_type == "l1" and v2.head.regression_head._loss_type == "giou"
    assert v1.backbone.fpn.extra_blocks.p6.in_channels == 64  # from P5
    assert v2.backbone.fpn.extra_blocks.p6.in_channels == 512  # from C5 (ResNet-18)


@pytest.mark.parametrize(
    "framework, expected", [("retinanet", "v2"), ("fcos", "v1"), ("faster_rcnn", "v1")]
)
def test_each_framework_has_its_default_variant_written_out(framework, expected):
    config = validate({"model": {"framework": framework}})
    assert config.model.variant == expected and config.to_dict()["model"]["variant"] == expected


def test_fcos_has_no_v2():
    with pytest.raises(GidError, match="model: variant v2 is not one of fcos's: v1"):
        validate({"model": {"framework": "fcos", "variant": "v2"}})


@pytest.mark.parametrize("framework, variant", ARCHITECTURES)
def test_each_architecture_trains_on_mobilenet_too(framework, variant):
    model = build_detector(gid_config(framework, variant, backbone="mobilenet_v3_large"), 64, 3)
    target = {"boxes": torch.tensor([[4.0, 4.0, 40.0, 30.0]]), "labels": torch.tensor([1])}
    losses = model([torch.rand(3, 64, 48)], [target])
    assert all(torch.isfinite(v) for v in losses.values())


# --- 2. pretrained backbones ------------------------------------------------------------------


def classifier_file(tmp_path: Path, name: str, seed: int = 1) -> tuple[Path, dict[str, torch.Tensor]]:
    """An ImageNet-format file: a torchvision classifier's state dict, as torchvision publishes them."""
    torch.manual_seed(seed)
    state = getattr(models, name)(weights=None).state_dict()
    path = tmp_path / f"{name}_imagenet.pth"
    torch.save(state, path)
    return path, state


def trainable_with(synth_root: Path, tmp_path: Path, model: dict, num_classes: int = NUM_CLASSES) -> nn.Module:
    config = validate(tiny_config_dict(synth_root, model=model, run={"storage_path": str(tmp_path / "runs")}))
    return build_trainable(config, num_classes, torch.device("cpu"))


@pytest.mark.parametrize("backbone, head_prefix", [("resnet18", "fc."), ("mobilenet_v3_large", "classifier.")])
def test_imagenet_weights_load_into_a_frozen_backbone(synth_root, tmp_path, backbone, head_prefix):
    path, imagenet = classifier_file(tmp_path, backbone)
    model = trainable_with(synth_root, tmp_path, {"framework": "retinanet", "backbone": backbone, "backbone_weights": str(path)})
    body = model.backbone.body.state_dict()
    expected = {k.removeprefix("features."): v for k, v in imagenet.items()
                if not k.startswith(head_prefix) and not k.endswith("num_batches_tracked")}
    assert set(body) == set(expected)
    assert all(torch.equal(body[k], v) for k, v in expected.items())
    norms = [m for m in model.backbone.body.modules() if "BatchNorm" in type(m).__name__]
    assert norms and all(isinstance(m, FrozenBatchNorm2d) for m in norms)
    assert all(p.requires_grad for p in model.backbone.fpn.parameters())
    assert all(p.requires_grad for p in model.head.parameters())


def test_without_backbone_weights_all_is_trained_with_batchnorm():
    model = build_detector(ModelConfig(), 64, 3)
    assert all(p.requires_grad for p in model.parameters())
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.backbone.body.modules())


def _trained(body: nn.Module) -> dict[str, bool]:
    return {name: p.requires_grad for name, p in body.named_parameters()}


@pytest.mark.parametrize("layers", range(6))
def test_resnet_trainable_layers_are_torchvisions(layers):
    ours = build_detector(ModelConfig(backbone="resnet18", frozen_batchnorm=True, trainable_backbone_layers=layers), 64, 3)
    theirs = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=layers)
    assert _trained(ours.backbone.body) == _trained(theirs.body)
    assert any(_trained(ours.backbone.body).values()) == (layers > 0)


@pytest.mark.parametrize("layers", range(7))
@pytest.mark.parametrize("backbone", ["mobilenet_v2", "mobilenet_v3_large"])
def test_mobilenet_trainable_layers_are_torchvisions(backbone, layers):
    config = ModelConfig(backbone=backbone, frozen_batchnorm=True, trainable_backbone_layers=layers)
    ours = build_detector(config, 64, 3)
    theirs = mobilenet_backbone(backbone_name=backbone, weights=None, fpn=True, trainable_layers=layers)
    assert _trained(ours.backbone.body) == _trained(theirs.body)


def test_backbone_weights_default_to_three_trained_stages(synth_root, tmp_path):
    path, _ = classifier_file(tmp_path, "resnet18")
    model = trainable_with(synth_root, tmp_path, {"backbone": "resnet18", "backbone_weights": str(path)})
    trained = {name.split(".")[0] for name, p in model.backbone.body.named_parameters() if p.requires_grad}
    frozen = {name.split(".")[0] for name, p in model.backbone.body.named_parameters() if not p.requires_grad}
    assert trained == {"layer2", "layer3", "layer4"} and frozen == {"conv1", "layer1"}


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: models.resnet34(weights=None).state_dict(), "classifier weights: 80 unexpected (e.g. layer1.2.conv1.weight)"),
        (lambda: {"conv1.weight": torch.zeros(64, 3, 3, 3)}, "classifier weights: 99 keys missing (e.g. bn1.weight), "
         "1 of another shape (e.g. conv1.weight: [64, 3, 3, 3], expected [64, 3, 7, 7])"),
        (lambda: [1, 2, 3], "not a state dict (a dict of tensors)"),
    ],
    ids=["another ResNet", "a few keys", "a list"],
)
def test_a_file_that_is_not_the_classifier_is_one_line_saying_what_differs(synth_root, tmp_path, make, expected):
    path = tmp_path / "bad.pth"
    torch.save(make(), path)
    with pytest.raises(GidError) as info:
        trainable_with(synth_root, tmp_path, {"backbone": "resnet18", "backbone_weights": str(path)})
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"model.backbone_weights {path}: ")
    assert expected in message


# --- 3. fine-tuning to another class count ----------------------------------------------------


@pytest.mark.parametrize("framework, variant", ARCHITECTURES)
def test_weights_of_another_class_count_load_all_but_the_class_layers(synth_root, tmp_path, caplog, framework, variant):
    config = validate(tiny_config_dict(synth_root, framework, model={"variant": variant}))
    torch.manual_seed(3)
    pretrained = build_detector(config.model, 64, 4)
    save_model(pretrained, config, 4, tmp_path / "four_classes.pt")
    with caplog.at_level(logging.INFO, logger="gid"):
        model = trainable_with(
            synth_root, tmp_path, {"framework": framework, "variant": variant, "weights": str(tmp_path / "four_classes.pt")}
        )
    before, after = pretrained.state_dict(), model.state_dict()
    layers = FRAMEWORKS[framework].class_layers
    is_class_layer = lambda key: key.startswith(tuple(f"{layer}." for layer in layers))  # noqa: E731
    assert all(torch.equal(after[k], v) for k, v in before.items() if not is_class_layer(k))
    reinitialised = [k for k in after if is_class_layer(k)]
    assert reinitialised and all(after[k].shape != before[k].shape for k in reinitialised)
    (line,) = [r.getMessage() for r in caplog.records if "re-initialised" in r.getMessage()]
    assert "holds 4 classes, this model 7" in line and all(layer in line for layer in layers)


def test_weights_of_another_architecture_still_fail_in_one_line(synth_root, tmp_path):
    config = validate({"model": {"framework": "retinanet", "variant": "v1"}})
    save_model(build_detector(config.model, 64, 4), config, 4, tmp_path / "v1.pt")
    with pytest.raises(GidError, match=r"weights do not fit this model \(the file holds a retinanet resnet18 v1 with 64"):
        trainable_with(synth_root, tmp_path, {"framework": "retinanet", "variant": "v2", "weights": str(tmp_path / "v1.pt")})


def test_model_files_of_the_earlier_layout_are_refused_with_the_reason(tmp_path):
    config = validate({})
    save_model(build_detector(config.model, 64, 4), config, 4, tmp_path / "m.pt")
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    torch.save({**state, "format": "gid-model/1"}, tmp_path / "old.pt")
    with pytest.raises(GidError, match=r"a model file of an earlier gid \(gid-model/1\).*train it again"):
        load_model(tmp_path / "old.pt")


# --- 4 and 5. gid model import / export -------------------------------------------------------


def test_import_eval_export_gives_back_the_torchvision_file(builder_file, synth_root, tmp_path, capsys):
    builder, path = builder_file
    framework, variant, backbone = BUILDERS[builder]
    model_file = tmp_path / "imported.pt"
    # 32 px: few anchors, so the builder's proposal counts (up to 1000) stay small for gid eval
    assert main(["model", "import", str(path), "--builder", builder, "--image-size", "32", "--out", str(model_file)]) == 0
    model, config, num_classes = load_model(model_file)
    assert (config.model.framework, config.model.variant, config.model.backbone, config.model.fpn_channels) == (
        framework, variant, backbone, 256)
    assert config.model.fpn_levels == ("mobilenet" if backbone.startswith("mobilenet") else "resnet")
    assert num_classes == NUM_CLASSES and config.data.image_size == 32 and config.model.frozen_batchnorm is False

    assert main(["eval", str(model_file), "--data", str(synth_root)]) == 0
    assert "AP " in capsys.readouterr().out

    exported = tmp_path / "exported.pth"
    assert main(["model", "export", str(model_file), "--format", "torchvision", "--out", str(exported)]) == 0
    named = builder.replace("_320_fpn", "_fpn")  # the 320 px builder makes the same module tree
    assert f"torchvision.models.detection.{named}(weights=None, weights_backbone=None, num_classes=7)" in capsys.readouterr().out
    original, back = torch.load(path, weights_only=True), torch.load(exported, weights_only=True)
    assert list(back) == list(original)
    for key, tensor in original.items():
        assert torch.equal(back[key], tensor), key
    getattr(detection, builder)(weights=None, weights_backbone=None, num_classes=NUM_CLASSES).load_state_dict(back, strict=True)


def test_an_imported_model_is_a_teacher_and_initial_weights(builder_file, synth_root, tmp_path):
    builder, path = builder_file
    framework, variant, backbone = BUILDERS[builder]
    model_file = tmp_path / "imported.pt"
    assert main(["model", "import", str(path), "--builder", builder, "--image-size", "64", "--out", str(model_file)]) == 0
    original = torch.load(path, weights_only=True)

    # a ResNet-18 FPN-64 under the ResNet-50 FPN-256; a MobileNetV3 FPN-64 under the FPN-256 (the same levels),
    # with the teacher's anchors: the builder's, which the imported file keeps
    held = read_checkpoint(model_file)["config"]["model"]
    student = {"framework": framework, "variant": variant, "backbone": "resnet18" if backbone == "resnet50" else backbone,
               "anchor_sizes": held["anchor_sizes"], "anchor_octaves": held["anchor_octaves"]}
    config = validate(tiny_config_dict(synth_root, model=student, distill={"teacher": str(model_file)}))
    distiller = build_trainable(config, NUM_CLASSES, torch.device("cpu"))
    assert all(torch.equal(distiller.teacher.state_dict()[k], v) for k, v in original.items())
    with torch.device("meta"):  # the builder's settings, without initialising its weights
        builders = settings_of(torchvision_model(builder), transform=False)
    assert settings_of(distiller.teacher, transform=False) == builders

    # training from it keeps the config's settings, gid's unless it says otherwise
    same = {**student, "backbone": backbone, "fpn_channels": 256, "weights": str(model_file)}
    initialised = trainable_with(synth_root, tmp_path, same)
    assert all(torch.equal(initialised.state_dict()[k], v) for k, v in original.items())
    gid_built = build_detector(validate({"model": same}).model, 64, NUM_CLASSES)
    assert settings_of(initialised) == settings_of(gid_built)


# torchvision's builders overwrite the eps of the FrozenBatchNorm2d of these two with their published (COCO_V1) weights
@pytest.mark.parametrize("builder, eps", [("fcos_resnet50_fpn", 1e-5), ("retinanet_resnet50_fpn", 0.0)])
def test_import_takes_frozen_batchnorm_files_as_torchvisions_pretrained_detectors_are(tmp_path, builder, eps):
    """torchvision's published detectors were saved with FrozenBatchNorm2d: no num_batches_tracked."""
    state = {k: v for k, v in torchvision_state_dict(builder).items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "pretrained.pth")
    assert main(["model", "import", str(tmp_path / "pretrained.pth"), "--builder", builder,
                 "--out", str(tmp_path / "m.pt")]) == 0
    model, config, _ = load_model(tmp_path / "m.pt")
    assert config.model.frozen_batchnorm is True and config.data.image_size == 800  # torchvision's COCO size
    assert isinstance(model.backbone.body.bn1, FrozenBatchNorm2d)
    assert {m.eps for m in model.modules() if isinstance(m, FrozenBatchNorm2d)} == {eps}
    assert model.state_dict().keys() == state.keys()


def one_line_error(argv: list[str], capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("gid: error: ")
    return line


def test_import_refuses_a_class_count_other_than_the_files(tmp_path, capsys):
    torch.save(torchvision_state_dict("fasterrcnn_resnet50_fpn", num_classes=91), tmp_path / "coco.pth")
    line = one_line_error(["model", "import", str(tmp_path / "coco.pth"), "--builder", "fasterrcnn_resnet50_fpn",
                           "--num-classes", "7", "--out", str(tmp_path / "m.pt")], capsys)
    assert "its classification layer has 91 classes, not --num-classes 7" in line
    assert not (tmp_path / "m.pt").exists()
    assert main(["model", "import", str(tmp_path / "coco.pth"), "--builder", "fasterrcnn_resnet50_fpn",
                 "--num-classes", "91", "--out", str(tmp_path / "m.pt")]) == 0


@pytest.mark.parametrize("builder, size", [("fasterrcnn_mobilenet_v3_large_fpn", 800), ("fasterrcnn_mobilenet_v3_large_320_fpn", 320)])
def test_import_feeds_the_input_size_the_builders_weights_were_trained_for(tmp_path, builder, size):
    torch.save(torchvision_state_dict(builder), tmp_path / "m.pth")
    assert main(["model", "import", str(tmp_path / "m.pth"), "--builder", builder, "--out", str(tmp_path / "m.pt")]) == 0
    model, config, _ = load_model(tmp_path / "m.pt")
    assert config.data.image_size == size and model.transform.min_size == (size,)  # the builder's transform:
    assert model.transform.max_size == {800: 1333, 320: 640}[size]  # a longer side up to 1333 (640)


def test_import_image_size_feeds_that_longest_side_and_keeps_the_rest(builder_file, tmp_path):
    builder, path = builder_file
    assert main(["model", "import", str(path), "--builder", builder, "--image-size", "64", "--out", str(tmp_path / "m.pt")]) == 0
    held = read_checkpoint(tmp_path / "m.pt")["config"]
    framework = FRAMEWORKS[held["model"]["framework"]]
    builders_own = framework.torchvision_settings(framework.builders[builder])
    assert held["data"]["image_size"] == 64
    given = {name: value for name, value in held["model"]["detector"].items() if value != "auto"}
    assert given == {**builders_own, "min_size": 64, "max_size": 64}
    assert held["model"]["anchor_sizes"] == list(framework.coco_anchor_sizes)  # the builder's, at any input size


def test_a_model_file_whose_weights_do_not_fit_its_own_config_is_one_line(tmp_path):
    """As a Faster R-CNN on MobileNetV3 of an earlier gid, whose FPN had five levels, is now."""
    config = validate({"model": {"framework": "faster_rcnn", "backbone": "mobilenet_v3_large"}})
    earlier = validate({"model": {"framework": "faster_rcnn", "backbone": "resnet18"}})
    save_model(build_detector(earlier.model, 64, 4), config, 4, tmp_path / "m.pt")
    with pytest.raises(GidError) as info:
        load_model(tmp_path / "m.pt")
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{tmp_path / 'm.pt'}: weights do not fit the architecture its own")
    assert message.endswith("train it again")


# --- 4b. imported detectors detect what torchvision's builders do ------------------------------


def settings_of(model: nn.Module, transform: bool = True) -> dict[str, object]:
    """What a torchvision detector's detections depend on besides its weights: input size, anchors, BatchNorm
    eps, thresholds, proposal counts (and the RoIs Faster R-CNN samples in training)."""
    found: dict[str, object] = {}
    if transform:
        found |= {"min_size": tuple(model.transform.min_size), "max_size": model.transform.max_size}
    if isinstance(model, detection.FasterRCNN):
        rpn, roi = model.rpn, model.roi_heads
        found |= {"pre_nms_top_n": rpn._pre_nms_top_n, "post_nms_top_n": rpn._post_nms_top_n,
                  "rpn_nms_thresh": rpn.nms_thresh, "rpn_score_thresh": rpn.score_thresh,
                  "box_score_thresh": roi.score_thresh, "box_nms_thresh": roi.nms_thresh,
                  "box_detections_per_img": roi.detections_per_img,
                  "box_batch_size_per_image": roi.fg_bg_sampler.batch_size_per_image}
        generator = rpn.anchor_generator
    else:
        found |= {name: getattr(model, name) for name in ("score_thresh", "nms_thresh", "detections_per_img", "topk_candidates")}
        generator = model.anchor_generator
    found["anchor_sizes"] = [[float(size) for size in level] for level in generator.sizes]
    found["aspect_ratios"] = [[float(r) for r in level] for level in generator.aspect_ratios]
    norms = (nn.BatchNorm2d, FrozenBatchNorm2d)
    found["batchnorm"] = sorted({(type(m).__name__, m.eps) for m in model.backbone.modules() if isinstance(m, norms)})
    return found


#: torchvision's transform enlarges an image to a shorter side of 800 (the 320 px builder's: 320) unless its longer
#: side would pass 1333 (640): a strip is the cheapest image its resize rule runs on (to 32 x 1333 and 15 x 640)
STRIP = torch.rand(3, 24, 1000, generator=torch.Generator().manual_seed(3))
#: a camera's image, whose shorter side sets the scale, for the one builder that is quick at it (to 320 x 427)
PHOTO = torch.rand(3, 480, 640, generator=torch.Generator().manual_seed(4))
#: TorchScript export checked on one builder per framework (scripting takes seconds)
SCRIPTED = {"retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn", "fasterrcnn_mobilenet_v3_large_320_fpn"}


def assert_same_detections(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert len(theirs["boxes"]) > 0
    for key in ("boxes", "scores", "labels"):
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)


def test_an_imported_detector_detects_what_its_torchvision_builder_does(builder_file, tmp_path, capsys):
    builder, path = builder_file
    theirs = getattr(detection, builder)(weights=None, weights_backbone=None, num_classes=NUM_CLASSES).eval()
    theirs.load_state_dict(torch.load(path, weights_only=True))
    # random weights that detect something: a one-stage head's class bias at 0 instead of its prior's -4.6
    # puts scores over the score threshold (Faster R-CNN's already are); the file is then the model's
    if hasattr(theirs, "head"):
        nn.init.zeros_(theirs.head.classification_head.cls_logits.bias)
    torch.save(theirs.state_dict(), tmp_path / "detecting.pth")
    model_file = tmp_path / "imported.pt"
    assert main(["model", "import", str(tmp_path / "detecting.pth"), "--builder", builder, "--out", str(model_file)]) == 0
    ours, _, _ = load_model(model_file)  # what gid eval runs, and gid distill as a teacher
    assert settings_of(ours) == settings_of(theirs)
    image = PHOTO if builder.endswith("_320_fpn") else STRIP
    with torch.no_grad():
        (expected,) = theirs([image])
        (detected,) = ours.eval()([image])
    assert_same_detections(detected, expected)

    # its torchvision export needs the builder call only; its TorchScript export detects the same
    capsys.readouterr()
    assert main(["model", "export", str(model_file), "--format", "torchvision", "--out", str(tmp_path / "m.pth")]) == 0
    assert "other settings" not in capsys.readouterr().out
    if builder in SCRIPTED:
        assert main(["model", "export", str(model_file), "--format", "torchscript", "--out", str(tmp_path / "m.ts")]) == 0
        with torch.no_grad():
            _, (scripted,) = torch.jit.load(tmp_path / "m.ts")([image])
        assert_same_detections(scripted, expected)


def test_gid_trained_detectors_keep_gids_settings_which_their_export_names(tmp_path, capsys):
    model = {"framework": "faster_rcnn", "backbone": "mobilenet_v3_large", "fpn_channels": 256}
    config = validate({"data": {"image_size": 64}, "model": model})
    detector = build_detector(config.model, 64, NUM_CLASSES)
    assert settings_of(detector) | {"batchnorm": None} == {
        "min_size": (64,), "max_size": 64,  # longest side data.image_size
        "pre_nms_top_n": {"training": 1000, "testing": 500}, "post_nms_top_n": {"training": 500, "testing": 300},
        "rpn_nms_thresh": 0.7, "rpn_score_thresh": 0.0, "box_score_thresh": 0.05, "box_nms_thresh": 0.5,
        "box_detections_per_img": 100, "box_batch_size_per_image": 128,
        "anchor_sizes": [[32.0, 32.0, 32.0, 32.0, 40.96]] * 3,  # COCO's scaled to 64 px, at least the stride
        "aspect_ratios": [[0.5, 1.0, 2.0]] * 3, "batchnorm": None,
    }
    save_model(detector, config, NUM_CLASSES, tmp_path / "m.pt")
    assert main(["model", "export", str(tmp_path / "m.pt"), "--format", "torchvision", "--out", str(tmp_path / "m.pth")]) == 0
    assert ("fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=7) loads it with "
            "strict=True (gid built it with other settings than torchvision's: pass min_size=64, max_size=64, "
            "rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=500, rpn_pre_nms_top_n_test=500, "
            "rpn_post_nms_top_n_test=300, rpn_score_thresh=0.0, box_batch_size_per_image=128 for the same input, "
            "proposals and thresholds)") in capsys.readouterr().out


# --- 5. export of gid's own architectures -----------------------------------------------------


def confident(model: nn.Module, framework: str) -> nn.Module:
    """A random detector whose scores clear the score thresholds, so that there are detections to compare."""
    if framework != "faster_rcnn":  # Faster R-CNN's softmax over 7 classes already does
        nn.init.constant_(model.head.classification_head.cls_logits.bias, 1.0)
    return model.eval()


@pytest.fixture(scope="module")
def gid_model_files(tmp_path_factory) -> dict[tuple[str, str, str], Path]:
    """A model file per student architecture (``STUDENTS``)."""
    root = tmp_path_factory.mktemp("students")
    files = {}
    for framework, variant, backbone in STUDENTS:
        model = {"framework": framework, "variant": variant, "backbone": backbone}
        config = validate({"data": {"image_size": 64}, "model": model})
        torch.manual_seed(5)
        path = root / f"{framework}_{variant}_{backbone}.pt"
        save_model(confident(build_detector(config.model, 64, NUM_CLASSES), framework), config, NUM_CLASSES, path)
        files[framework, variant, backbone] = path
    return files


IMAGES = [torch.rand(3, 64, 48, generator=torch.Generator().manual_seed(9)), torch.rand(3, 40, 64)]


@pytest.mark.parametrize("framework, variant, backbone", STUDENTS)
def test_torchscript_detections_equal_gids(gid_model_files, tmp_path, capsys, framework, variant, backbone):
    out = tmp_path / "model.ts"
    assert main(["model", "export", str(gid_model_files[framework, variant, backbone]), "--format", "torchscript", "--out", str(out)]) == 0
    assert "torch.jit.load it" in capsys.readouterr().out
    model, _, _ = load_model(gid_model_files[framework, variant, backbone])
    with torch.no_grad():
        expected = model.eval()(IMAGES)
        _, scripted = torch.jit.load(out)(IMAGES)
    assert all(len(e["boxes"]) > 0 for e in expected)
    for ours, theirs in zip(expected, scripted, strict=True):
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(theirs[key], ours[key], rtol=0, atol=0)


def test_torchscript_runs_without_gid(gid_model_files, tmp_path):
    out = tmp_path / "model.ts"
    assert main(["model", "export", str(gid_model_files["faster_rcnn", "v2", "resnet18"]), "--format", "torchscript", "--out", str(out)]) == 0
    torch.save(IMAGES, tmp_path / "images.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["gid"] = None  # importing gid (or anything under it) now fails
        import torch, torchvision  # torchvision registers the detection ops (nms, roi_align)
        torch.set_num_threads({torch.get_num_threads()})  # float sums depend on the thread count: match this process
        _, detections = torch.jit.load({str(out)!r})(torch.load({str(tmp_path / "images.pt")!r}))
        torch.save(detections, {str(tmp_path / "detections.pt")!r})
        """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300, cwd=tmp_path)
    model, _, _ = load_model(gid_model_files["faster_rcnn", "v2", "resnet18"])
    with torch.no_grad():
        expected = model.eval()(IMAGES)
    for ours, theirs in zip(expected, torch.load(tmp_path / "detections.pt", weights_only=True), strict=True):
        assert len(ours["boxes"]) > 0
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(theirs[key], ours[key], rtol=0, atol=0)


def test_a_faster_rcnn_trains_with_gids_pooler_and_exports_torchvisions(gid_model_files, tmp_path):
    path = gid_model_files["faster_rcnn", "v1", "resnet18"]
    assert type(load_model(path)[0].roi_heads.box_roi_pool) is MatmulMultiScaleRoIAlign
    out = tmp_path / "model.ts"
    assert main(["model", "export", str(path), "--format", "torchscript", "--out", str(out)]) == 0
    assert torch.jit.load(out).roi_heads.box_roi_pool.original_name == "MultiScaleRoIAlign"


TORCHVISION_NAMES = {
    **{name: getattr(models, name) for name in ("resnet18", "mobilenet_v2", "mobilenet_v3_large")},
    **{name: getattr(detection, name) for name in ("RetinaNet", "FCOS", "FasterRCNN")},
    "AnchorGenerator": detection.anchor_utils.AnchorGenerator,
    "BackboneWithFPN": detection.backbone_utils.BackboneWithFPN,
    "RetinaNetHead": detection.retinanet.RetinaNetHead,
    "RPNHead": detection.rpn.RPNHead,
    "FastRCNNConvFCHead": detection.faster_rcnn.FastRCNNConvFCHead,
    "LastLevelP6P7": __import__("torchvision").ops.feature_pyramid_network.LastLevelP6P7,
    "LastLevelMaxPool": __import__("torchvision").ops.feature_pyramid_network.LastLevelMaxPool,
    "FrozenBatchNorm2d": FrozenBatchNorm2d,
    "BatchNorm2d": nn.BatchNorm2d,
    "GroupNorm": nn.GroupNorm,
    "partial": partial,
}


@pytest.mark.parametrize("framework, variant, backbone", STUDENTS)
def test_a_students_export_names_the_torchvision_call_that_loads_it(gid_model_files, tmp_path, capsys, framework, variant, backbone):
    out = tmp_path / "student.pth"
    assert main(["model", "export", str(gid_model_files[framework, variant, backbone]), "--format", "torchvision", "--out", str(out)]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert "no torchvision builder makes this architecture; " in line
    call = line.split("no torchvision builder makes this architecture; ")[1].split(" loads it with strict=True")[0]
    call = call.split(" (to train it")[0]
    rebuilt = eval(call, dict(TORCHVISION_NAMES))  # the printed constructor, run as it is
    rebuilt.load_state_dict(torch.load(out, weights_only=True), strict=True)
    saved = torch.load(gid_model_files[framework, variant, backbone], weights_only=True)["model"]
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in saved.items())
    with torch.no_grad():
        rebuilt.eval()(IMAGES)  # it runs too: its anchors fit its heads


@pytest.mark.parametrize("backbone", ["mobilenet_v2", "mobilenet_v3_large"])
def test_the_printed_call_covers_mobilenet_and_frozen_batchnorm(tmp_path, capsys, backbone):
    config = validate({"data": {"image_size": 64}, "model": {"backbone": backbone, "frozen_batchnorm": True}})
    save_model(build_detector(config.model, 64, 3), config, 3, tmp_path / "m.pt")
    assert main(["model", "export", str(tmp_path / "m.pt"), "--format", "torchvision", "--out", str(tmp_path / "m.pth")]) == 0
    call = capsys.readouterr().out.split("architecture; ")[1].split(" loads it with strict=True")[0].split(" (to train it")[0]
    assert f"{backbone}(norm_layer=FrozenBatchNorm2d).features" in call
    eval(call, dict(TORCHVISION_NAMES)).load_state_dict(torch.load(tmp_path / "m.pth", weights_only=True), strict=True)
