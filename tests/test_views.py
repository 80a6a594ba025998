"""DetectorView: the piecewise forward of each framework must be the detector's own."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from torchvision.models.detection import FasterRCNN

from gid.errors import GidError
from gid.frameworks import FRAMEWORKS, view_for
from gid.frameworks.base import FpnLayout, stages
from gid.frameworks.fcos import fcos_matched_idxs
from gid.frameworks.view import check_compatible
from gid.models.backbones import build_fpn_backbone
from support import SIZE as IMAGE_SIZE, tiny_detector

NUM_CLASSES = 4


# FCOS's "auto" locations are its strides at any input size (gid.models.anchor_sizes), so its
# assignment has real matches at 64 px too.
tiny = partial(tiny_detector, num_classes=NUM_CLASSES, seed=0)


@pytest.fixture(scope="module", params=list(FRAMEWORKS))
def model(request) -> torch.nn.Module:
    return tiny(request.param)


def batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Two images of different shapes (so the batch is padded); the second has no boxes."""
    generator = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 64, 64, generator=generator), torch.rand(3, 48, 64, generator=generator)]
    targets = [
        {
            "boxes": torch.tensor([[10.0, 10.0, 30.0, 34.0], [30.0, 5.0, 60.0, 60.0], [2.0, 40.0, 12.0, 50.0]]),
            "labels": torch.tensor([1, 2, 3]),
        },
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    return images, targets


def run(view, targets=True):
    """The view's piecewise forward of the test batch."""
    images, gt = batch()
    image_list, gt = view.transform(images, gt if targets else None)
    features = view.features(image_list)
    return image_list, gt, features, view.dense(features), view.anchor_layout(image_list, features)


def test_dense_outputs_match_the_layout(model):
    view = view_for(model.eval())
    images, _, features, dense, layout = run(view)
    num_images, height, width = images.tensors.shape[0], *images.tensors.shape[-2:]

    R = sum(layout.num_per_level)
    assert len(layout.num_per_level) == len(features) == 5
    assert all(len(a) == R for a in layout.anchors)
    assert layout.image_sizes == [(64, 64), (48, 64)]
    classes = 1 if view.framework == "faster_rcnn" else NUM_CLASSES
    assert dense.cls_logits.shape == (num_images, R, classes)
    assert dense.bbox_regression.shape == (num_images, R, 4)
    assert (dense.centerness is None) == (view.framework != "fcos")
    if dense.centerness is not None:
        assert dense.centerness.shape == (num_images, R, 1)

    # pooling maps: P3-P7 for the one-stage detectors, P2-P5 (the box head's maps) for Faster R-CNN
    assert view.first_level == dense.first_level == (2 if view.framework == "faster_rcnn" else 3)
    assert len(dense.features) == (4 if view.framework == "faster_rcnn" else 5)
    for i, level in enumerate(dense.features):
        stride = 2 ** (dense.first_level + i)
        assert level.shape[-2:] == (math.ceil(height / stride), math.ceil(width / stride))
        assert level.shape[1] == view.feature_channels() == 64
    first = 4 if view.framework == "faster_rcnn" else 8
    assert view.signature()["strides"] == tuple(first * 2**i for i in range(5))


def test_decode_agrees_with_the_detectors_own_decoding(model, monkeypatch):
    """Every box the detector's own post-processing derives is one the view decodes."""
    view = view_for(model.eval())
    images, _, features, dense, layout = run(view, targets=False)
    with torch.no_grad():
        decoded = [
            view.decode(deltas, anchors) for deltas, anchors in zip(dense.bbox_regression, layout.anchors)
        ]
        if view.framework == "faster_rcnn":
            proposals = torch.stack(decoded)
            own, _ = model.rpn.filter_proposals(proposals, dense.cls_logits, images.image_sizes, layout.num_per_level)
            # filter_proposals only selects and clips; the RPN's forward decodes with its box coder
            rpn_boxes, _ = model.rpn(images, features)
            for a, b in zip(own, rpn_boxes):
                torch.testing.assert_close(a, b)
        else:
            # keep every anchor and class: no score threshold, no top-k, no NMS
            for name, value in (("score_thresh", -1.0), ("nms_thresh", 1.0), ("topk_candidates", 10**6)):
                monkeypatch.setattr(model, name, value)
            monkeypatch.setattr(model, "detections_per_img", 10**6)
            split = {
                "cls_logits": list(dense.cls_logits.split(layout.num_per_level, dim=1)),
                "bbox_regression": list(dense.bbox_regression.split(layout.num_per_level, dim=1)),
            }
            if dense.centerness is not None:
                split["bbox_ctrness"] = list(dense.centerness.split(layout.num_per_level, dim=1))
            anchors = [list(a.split(layout.num_per_level)) for a in layout.anchors]
            own = [d["boxes"] for d in model.postprocess_detections(split, anchors, images.image_sizes)]
    for boxes, mine, size in zip(own, decoded, images.image_sizes):
        clipped = mine.clone()
        clipped[:, 0::2] = clipped[:, 0::2].clamp(0, size[1])
        clipped[:, 1::2] = clipped[:, 1::2].clamp(0, size[0])
        assert len(boxes) > 0
        assert torch.cdist(boxes, clipped, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values.max() < 1e-4


def test_gt_losses_equal_the_detectors_training_loss_and_backprop(model):
    """Same weights, same inputs: the view's loss is model(images, targets)'s loss.

    Faster R-CNN samples anchors and RoIs at random (and the transform draws a size even with one
    choice), so both paths start from the same seed; the draws happen in the same order.
    """
    view = view_for(model.train())
    model.zero_grad()
    torch.manual_seed(123)
    images, targets, features, dense, layout = run(view)
    losses = view.gt_losses(images, features, dense, layout, targets)

    torch.manual_seed(123)
    expected = model(*batch())
    assert set(losses) == {"loss_gt_" + k.removeprefix("loss_") for k in expected}
    for name, value in expected.items():
        torch.testing.assert_close(losses["loss_gt_" + name.removeprefix("loss_")], value)

    sum(losses.values()).backward()
    gradients = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in gradients.values())
    assert any(g.abs().sum() > 0 for n, g in gradients.items() if n.startswith("backbone.body"))


def test_gt_losses_in_eval_mode_are_finite(model):
    view = view_for(model.eval())
    with torch.no_grad():
        images, targets, features, dense, layout = run(view)
        losses = view.gt_losses(images, features, dense, layout, targets)
    assert losses and all(torch.isfinite(v) for v in losses.values())


def test_assign_foreground_marks_a_box_equal_to_an_anchor(model):
    view = view_for(model.eval())
    with torch.no_grad():
        _, _, _, _, layout = run(view, targets=False)
    anchors = layout.anchors[0]
    index = sum(layout.num_per_level[:2]) + 1  # an anchor of the third level
    assert (anchors[index, 2:] > anchors[index, :2]).all()

    empty = torch.zeros(0, 4)
    mask = view.assign_foreground([empty, empty], layout)
    assert mask.shape == (2, len(anchors)) and mask.dtype == torch.bool and not mask.any()
    if view.framework == "fcos":
        return  # a location's "anchor" is not a box FCOS matches; see the next test
    mask = view.assign_foreground([anchors[index : index + 1], empty], layout)
    assert mask[0, index] and not mask[1].any()


def test_fcos_assignment_equals_torchvisions(monkeypatch):
    model = tiny("fcos").train()
    view = view_for(model)
    captured = []
    compute_loss = model.head.compute_loss

    def capture(targets, head_outputs, anchors, matched_idxs):
        captured.extend(matched_idxs)
        return compute_loss(targets, head_outputs, anchors, matched_idxs)

    monkeypatch.setattr(model.head, "compute_loss", capture)
    with torch.no_grad():
        model(*batch())
        _, targets, _, _, layout = run(view)
    boxes = [t["boxes"] for t in targets]
    mine = [
        fcos_matched_idxs(b, a, layout.num_per_level, model.center_sampling_radius)
        for b, a in zip(boxes, layout.anchors)
    ]
    assert (captured[0] >= 0).sum() > 0  # real matches, not two empty masks
    for theirs, ours in zip(captured, mine):
        assert torch.equal(theirs, ours)
    assert torch.equal(view.assign_foreground(boxes, layout), torch.stack(captured) >= 0)


def test_roi_outputs(model):
    view = view_for(model.eval())
    with torch.no_grad():
        images, _, features, _, _ = run(view, targets=False)
        boxes = [torch.tensor([[4.0, 4.0, 20.0, 30.0], [0.0, 0.0, 64.0, 64.0], [30.0, 10.0, 50.0, 20.0]]), torch.zeros(0, 4)]
        if view.framework != "faster_rcnn":
            with pytest.raises(TypeError):
                view.roi_outputs(features, boxes, images.image_sizes)
            return
        class_logits, box_regression = view.roi_outputs(features, boxes, images.image_sizes)
    assert class_logits.shape == (3, NUM_CLASSES)
    assert box_regression.shape == (3, NUM_CLASSES * 4)


# --- Faster R-CNN on MobileNetV3: torchvision's three levels, two of them at stride 32 ----------


@pytest.fixture(scope="module")
def mobilenet_faster_rcnn() -> torch.nn.Module:
    return tiny("faster_rcnn", backbone="mobilenet_v3_large")


def test_mobilenet_faster_rcnn_pools_gis_where_its_box_head_pools(mobilenet_faster_rcnn):
    view = view_for(mobilenet_faster_rcnn.eval())
    images, _, features, dense, layout = run(view, targets=False)
    assert view.signature()["strides"] == (32, 32, 64)
    assert layout.num_per_level == [2 * 2 * 15, 2 * 2 * 15, 1 * 1 * 15]  # five sizes x three ratios everywhere
    assert dense.cls_logits.shape == (2, sum(layout.num_per_level), 1)
    # torchvision's MultiScaleRoIAlign maps every box to '0', the first of its two stride-32 maps
    boxes = [torch.tensor([[4.0, 4.0, 12.0, 12.0], [0.0, 0.0, 64.0, 64.0]]), torch.zeros(0, 4)]
    pooler = mobilenet_faster_rcnn.roi_heads.box_roi_pool
    with torch.no_grad():
        pooler(features, boxes, images.image_sizes)
    assert pooler.scales == [1 / 32, 1 / 32] and pooler.map_levels(boxes).unique().tolist() == [0]
    assert view.first_level == dense.first_level == 5
    assert len(dense.features) == 1 and dense.features[0] is features["0"]


def test_mobilenet_faster_rcnn_views_are_the_detectors_own(mobilenet_faster_rcnn, monkeypatch):
    """The checks every framework's view passes above, on this architecture."""
    test_decode_agrees_with_the_detectors_own_decoding(mobilenet_faster_rcnn, monkeypatch)
    test_gt_losses_equal_the_detectors_training_loss_and_backprop(mobilenet_faster_rcnn)
    test_assign_foreground_marks_a_box_equal_to_an_anchor(mobilenet_faster_rcnn)
    test_roi_outputs(mobilenet_faster_rcnn)


def test_views_refuse_pooling_levels_that_do_not_double():
    """A detector of the user's (model.builder) whose FPN skips stride 16: its levels have no FPN level rule."""
    backbone = build_fpn_backbone("resnet18", 64, FpnLayout(stages(8, 32), "max_pool"))
    view = view_for(FasterRCNN(backbone, NUM_CLASSES, min_size=IMAGE_SIZE, max_size=IMAGE_SIZE))
    with pytest.raises(GidError, match=r"faster_rcnn: GIs are pooled from FPN levels .* this detector's are \[8, 32\]"):
        view.first_level


def test_view_for_rejects_other_modules():
    with pytest.raises(TypeError, match="RetinaNet, FCOS or FasterRCNN"):
        view_for(torch.nn.Linear(2, 2))


def incompatibility(teacher: torch.nn.Module, student: torch.nn.Module) -> str:
    with pytest.raises(GidError) as error:
        check_compatible(view_for(teacher), view_for(student))
    message = str(error.value)
    assert "\n" not in message and message.startswith("teacher and student are incompatible: ")
    return message


def test_compatible_across_backbones_and_fpn_widths():
    teacher = tiny("retinanet", backbone="resnet34", fpn_channels=128)
    student = tiny("retinanet")
    check_compatible(view_for(teacher), view_for(student))
    assert view_for(teacher).feature_channels() == 128


def test_incompatible_num_classes():
    message = incompatibility(tiny("retinanet", num_classes=7), tiny("retinanet", num_classes=5))
    assert message == "teacher and student are incompatible: num_classes differs (teacher 7, student 5)"


def test_incompatible_transform():
    message = incompatibility(tiny("faster_rcnn", image_size=96), tiny("faster_rcnn"))
    assert "min_size differs (teacher (96,), student (64,))" in message
    assert "max_size differs (teacher 96, student 64)" in message


def test_incompatible_anchor_sizes():
    message = incompatibility(tiny("retinanet", anchor_sizes=[4, 8, 16, 32, 64]), tiny("retinanet"))
    assert message.startswith("teacher and student are incompatible: anchor_sizes differs (teacher ((4.0,")
    assert message.count(" differs (") == 1  # nothing else differs
    assert message.endswith("; give the student the teacher's model.detector.min_size and max_size, model.anchor_sizes "
                            "and model.anchor_octaves (its model file's config has them)")


def test_incompatible_framework():
    message = incompatibility(tiny("retinanet"), tiny("fcos"))
    assert "framework differs (teacher retinanet, student fcos)" in message
    assert "center_sampling_radius differs (teacher absent, student 1.5)" in message


def test_signature_probe_leaves_the_model_untouched():
    model = tiny("retinanet").train()
    model.backbone.body["conv1"].eval()  # a frozen stem, say: its mode must survive too
    before = {k: v.clone() for k, v in model.state_dict().items()}
    view_for(model).signature()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.training and not model.backbone.body["conv1"].training and model.backbone.body["bn1"].training
