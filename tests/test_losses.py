"""The feature, relation and response losses on hand-made tensors (spec §3-§5, §8 properties 5-9)."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import LevelMapper

from gid.distill.losses import (
    build_adapter,
    feature_loss,
    relation_loss,
    response_loss,
    roi_response_loss,
)
from gid.distill.pooling import pool_instances
from gid.errors import GidError
from gid.frameworks.view import DenseOutput
from gid.models.roi_align import MatmulMultiScaleRoIAlign, roi_align_by_matmul

FIRST_LEVEL = 3
IMAGE = 512


def fpn_maps(batch: int, channels: int, seed: int = 0, levels: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    sizes = [IMAGE >> (FIRST_LEVEL + i) for i in range(levels)]
    return [torch.randn(batch, channels, size, size, generator=generator) for size in sizes]


def dense(logits, deltas, centerness=None) -> DenseOutput:
    return DenseOutput([], FIRST_LEVEL, cls_logits=logits, bbox_regression=deltas, centerness=centerness)


# --- adapter ---------------------------------------------------------------------------------


def test_build_adapter():
    x = torch.randn(2, 8, 10, 12)
    assert build_adapter("conv3x3", 8, 16)(x).shape == (2, 16, 10, 12)
    assert build_adapter("conv3x3", 8, 16).kernel_size == (3, 3)
    assert build_adapter("conv1x1", 8, 16).kernel_size == (1, 1)
    assert isinstance(build_adapter("none", 8, 8), nn.Identity)
    with pytest.raises(GidError, match="conv3x3 or conv1x1"):
        build_adapter("none", 8, 16)


# --- pooling ---------------------------------------------------------------------------------


def test_pool_instances_picks_the_fpn_level():
    # Each level's map is constant: 10 * image + level, so the pooled values name image and level.
    maps = [
        torch.stack([torch.full((2, IMAGE >> level, IMAGE >> level), 10.0 * b + level) for b in range(2)])
        for level in (3, 4, 5)
    ]
    boxes = [
        torch.tensor(
            [
                [0.0, 0.0, 224.0, 224.0],  # sqrt(area) 224 = canonical: level 4
                [100.0, 100.0, 212.0, 212.0],  # 112: level 3
                [0.0, 0.0, 448.0, 448.0],  # 448: level 5
                [10.0, 10.0, 20.0, 20.0],  # 10: level 1, clamped to 3
                [0.0, 0.0, 500.0, 500.0],  # just above 448: level 5 (6 would be clamped)
                [0.0, 0.0, 223.0, 223.0],  # just below 224: level 3
            ]
        ),
        torch.tensor([[50.0, 50.0, 150.0, 450.0]]),  # sqrt(100 * 400) = 200: level 3
    ]
    pooled = pool_instances(maps, FIRST_LEVEL, boxes, roi_size=4, canonical_size=224.0)
    assert pooled.shape == (7, 2, 4, 4)
    expected = torch.tensor([4.0, 3.0, 5.0, 3.0, 5.0, 3.0, 13.0])
    assert torch.allclose(pooled, expected[:, None, None, None].expand_as(pooled))


def test_pool_instances_is_aligned_roi_align_at_the_level_stride():
    maps = fpn_maps(batch=2, channels=3)
    boxes = [
        torch.tensor([[30.0, 40.0, 130.0, 90.0]]),
        torch.tensor([[0.0, 0.0, 300.0, 400.0], [5.0, 7.0, 61.0, 69.0]]),
    ]
    pooled = pool_instances(maps, FIRST_LEVEL, boxes, roi_size=5, canonical_size=224.0)
    # Levels 3, 4 (sqrt(area) 346) and 3 (clamped); image indices 0, 1, 1.
    expected = [(0, boxes[0][0], 3), (1, boxes[1][0], 4), (1, boxes[1][1], 3)]
    for row, (image, box, level) in enumerate(expected):
        direct = roi_align(
            maps[level - FIRST_LEVEL][image : image + 1],
            [box[None]],
            5,
            spatial_scale=2.0**-level,
            sampling_ratio=2,
            aligned=True,
        )
        assert torch.allclose(pooled[row], direct[0])


def test_pool_instances_with_no_boxes_stays_in_the_graph():
    maps = [m.requires_grad_() for m in fpn_maps(batch=2, channels=3)]
    pooled = pool_instances(maps, FIRST_LEVEL, [torch.zeros(0, 4), torch.zeros(0, 4)], 5, 224.0)
    assert pooled.shape == (0, 3, 5, 5)
    loss = feature_loss(pooled.detach(), pooled)
    loss.backward()
    assert loss.item() == 0.0 and maps[0].grad is not None


def torchvision_roi_align(feature_map, rois, roi_size, spatial_scale, aligned=True):
    return roi_align(feature_map, rois, roi_size, spatial_scale=spatial_scale, sampling_ratio=2, aligned=aligned)


def assert_same_roi_align(feature_map, rois, roi_size, spatial_scale):
    """roi_align_by_matmul gives torchvision's values and gradients w.r.t. the map, aligned or not."""
    for aligned in (True, False):
        assert_same_pooling(
            feature_map, lambda m, a=aligned: roi_align_by_matmul(m, rois, roi_size, spatial_scale, a),
            lambda m, a=aligned: torchvision_roi_align(m, rois, roi_size, spatial_scale, a),
        )


def assert_same_pooling(feature_map, pool, expected_pool):
    """``pool(feature_map)`` equals ``expected_pool(feature_map)``, values and gradients w.r.t. the map."""
    feature_map = feature_map.detach().requires_grad_()
    pooled = pool(feature_map)
    upstream = torch.randn(pooled.shape, generator=torch.Generator().manual_seed(9))
    (grad,) = torch.autograd.grad(pooled, feature_map, upstream)
    expected = expected_pool(feature_map)
    (expected_grad,) = torch.autograd.grad(expected, feature_map, upstream)
    assert pooled.shape == expected.shape
    torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-4)


def random_rois(num: int, num_images: int, extent: float, generator) -> torch.Tensor:
    """Boxes anywhere from well outside to inside an image of side ``extent``, of any size."""
    corner = torch.rand(num, 2, generator=generator) * extent * 1.6 - extent * 0.3
    size = torch.rand(num, 2, generator=generator) ** 3 * extent  # many tiny boxes
    image = torch.randint(0, num_images, (num, 1), generator=generator).float()  # in no particular order
    return torch.cat([image, corner, corner + size], dim=1)


@pytest.mark.parametrize("map_size", [(1, 1), (1, 5), (3, 7), (8, 8), (16, 12), (25, 40)])
def test_roi_align_by_matmul_equals_torchvision_on_random_boxes(map_size):
    generator = torch.Generator().manual_seed(sum(map_size))
    stride = 8
    feature_map = torch.randn(3, 5, *map_size, generator=generator)
    rois = random_rois(40, 3, max(map_size) * stride, generator)
    for roi_size in (1, 4, 7):
        assert_same_roi_align(feature_map, rois, roi_size, 1.0 / stride)


def test_roi_align_by_matmul_follows_roi_aligns_boundary_rules():
    # Boxes whose samples land exactly on -1, 0, the last pixel centre and the map edge, just
    # beyond them, or are degenerate (zero or negative size): one wrong comparison would move a
    # whole pixel's weight in or out of a bin.
    height, width = 6, 9
    feature_map = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    edges = [-2.0, -1.5, -1.0, -0.75, -0.5, 0.0, 0.5, 1.0]
    edges += [height - 1.5, height - 0.5, height, height + 0.5, height + 1.0]
    rois = []
    for image, (a, b) in enumerate((a, b) for a in edges for b in edges):
        rois.append([image % 2, a + 0.5, b + 0.5, a + 2.5, b + 0.5])  # zero height
        rois.append([image % 2, a, b, b, a])
        rois.append([image % 2, a, a, b + 1, b + 1])
        rois.append([image % 2, b, a, b, a + 4])  # zero width
    rois = torch.tensor(rois)
    for roi_size in (1, 2, 3):
        assert_same_roi_align(feature_map, rois, roi_size, 1.0)
        assert_same_roi_align(feature_map, rois * torch.tensor([1, 2, 2, 2, 2]), roi_size, 0.5)


def test_roi_align_by_matmul_without_boxes():
    feature_map = torch.randn(2, 3, 8, 8, requires_grad=True)
    pooled = roi_align_by_matmul(feature_map, torch.zeros(0, 5), 4, 0.125)
    assert pooled.shape == (0, 3, 4, 4)
    pooled.sum().backward()
    assert torch.all(feature_map.grad == 0)
    # Images without a box among images with boxes.
    assert_same_roi_align(feature_map, torch.tensor([[1.0, 0.0, 0.0, 30.0, 20.0]] * 3), 4, 0.125)


@pytest.mark.parametrize("featmap_names", [["0", "1", "2", "3"], ["0", "1"]])
def test_matmul_pooler_equals_the_faster_rcnn_pooler(featmap_names):
    # A ResNet FPN's four levels at strides 4-32, and a MobileNet FPN's two levels at the same stride 32,
    # both pooled by torchvision's default box pooler (named levels "0"-"3": a missing name is skipped).
    generator = torch.Generator().manual_seed(len(featmap_names))
    image_sizes = [(128, 120), (96, 128), (128, 128)]
    strides = [4, 8, 16, 32] if len(featmap_names) == 4 else [32, 32]
    sides = [(128 // stride, 128 // stride) for stride in strides]
    boxes = []
    for n in (10, 0, 12):
        corner = torch.rand(n, 2, generator=generator) * 140 - 10
        boxes.append(torch.cat([corner, corner + torch.rand(n, 2, generator=generator) ** 2 * 128], dim=1))
    boxes[0][0, 2:] = boxes[0][0, :2]  # an empty box: the legacy mode widens it to one pixel
    stacked = torch.randn(3, 4, sum(h * w for h, w in sides), generator=generator)

    def box_pooler(kind=MultiScaleRoIAlign):
        return kind(["0", "1", "2", "3"], output_size=7, sampling_ratio=2)

    def as_features(flat):  # one tensor whose slices are the levels, so one gradient covers them all
        maps, start = {}, 0
        for name, (h, w) in zip(featmap_names, sides):
            maps[name] = flat[:, :, start:start + h * w].reshape(3, 4, h, w)
            start += h * w
        return {**maps, "pool": flat.new_zeros(3, 4, 2, 2)}

    with mock.patch("gid.models.roi_align.roi_align_by_matmul", wraps=roi_align_by_matmul) as by_matmul:
        assert_same_pooling(
            stacked, lambda flat: box_pooler(MatmulMultiScaleRoIAlign)(as_features(flat), boxes, image_sizes),
            lambda flat: box_pooler()(as_features(flat), boxes, image_sizes),
        )
        assert by_matmul.call_count == len(featmap_names)  # every level, where a backward follows
        with torch.no_grad():  # evaluation: exactly torchvision's pooling, as in a TorchScript export
            pooled = box_pooler(MatmulMultiScaleRoIAlign)(as_features(stacked), boxes, image_sizes)
        assert by_matmul.call_count == len(featmap_names)
    assert torch.equal(pooled, box_pooler()(as_features(stacked), boxes, image_sizes))


@pytest.mark.parametrize("image", [64, 128])
def test_pool_instances_equals_roi_align_level_by_level(image):
    # Realistic pooling: 5 FPN levels (strides 8-128), GIs of every size, one image without GIs.
    generator = torch.Generator().manual_seed(image)
    sides = [-(-image // 2**level) for level in range(3, 8)]
    maps = [torch.randn(4, 6, side, side, generator=generator).requires_grad_() for side in sides]
    boxes = []
    for n in (10, 0, 7, 10):
        corner = torch.rand(n, 2, generator=generator) * image * 1.2 - image * 0.1
        boxes.append(torch.cat([corner, corner + torch.rand(n, 2, generator=generator) * image + 1], dim=1))
    canonical = 224.0 * image / 800
    pooled = pool_instances(maps, FIRST_LEVEL, boxes, 10, canonical)
    upstream = torch.randn(pooled.shape, generator=generator)
    grads = torch.autograd.grad(pooled, maps, upstream)

    levels = LevelMapper(FIRST_LEVEL, FIRST_LEVEL + 4, canonical, 4)(boxes)
    assert len(levels.unique()) >= 3
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], dim=1) for i, b in enumerate(boxes)])
    expected = torch.zeros_like(pooled)
    for offset, feature_map in enumerate(maps):
        at_level = levels == offset
        stride = 2 ** (FIRST_LEVEL + offset)
        expected[at_level] = torchvision_roi_align(feature_map, rois[at_level], 10, 1.0 / stride)
    expected_grads = torch.autograd.grad(expected, maps, upstream)
    torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-5)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-4)


# --- feature loss ----------------------------------------------------------------------------


def identity_conv3x3(channels: int) -> nn.Conv2d:
    conv = build_adapter("conv3x3", channels, channels)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, :, 1, 1] = torch.eye(channels)
        conv.bias.zero_()
    return conv


# Levels 3 and 5 in image 0; 4, 3 and 3 in image 1.
GI_BOXES = [
    torch.tensor([[30.0, 40.0, 130.0, 90.0], [10.0, 10.0, 500.0, 490.0]]),
    torch.tensor([[0.0, 0.0, 300.0, 400.0], [5.0, 7.0, 61.0, 69.0], [300.0, 10.0, 360.0, 200.0]]),
]


@pytest.mark.parametrize("adapter", ["none", "conv3x3"])
def test_feature_loss_is_zero_for_identical_models(adapter):
    maps = fpn_maps(batch=2, channels=4)
    adapt = nn.Identity() if adapter == "none" else identity_conv3x3(4)
    student = [adapt(m) for m in maps]
    pooled_t = pool_instances(maps, FIRST_LEVEL, GI_BOXES, 10, 224.0)
    pooled_s = pool_instances(student, FIRST_LEVEL, GI_BOXES, 10, 224.0)
    assert feature_loss(pooled_t, pooled_s).item() == pytest.approx(0.0, abs=1e-10)


def test_feature_loss_value():
    # Sum over 2 GIs x 3 channels x 16 bins of 1, divided by 2 GIs x 16 bins.
    assert feature_loss(torch.ones(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)).item() == pytest.approx(3.0)


def test_gradients_reach_student_and_adapter_never_the_teacher():
    teacher_maps = [m.requires_grad_() for m in fpn_maps(batch=2, channels=6, seed=1)]
    student_maps = [m.requires_grad_() for m in fpn_maps(batch=2, channels=4, seed=2)]
    adapter = build_adapter("conv3x3", 4, 6)
    pooled_t = pool_instances(teacher_maps, FIRST_LEVEL, GI_BOXES, 10, 224.0)
    pooled_s = pool_instances([adapter(m) for m in student_maps], FIRST_LEVEL, GI_BOXES, 10, 224.0)
    loss = feature_loss(pooled_t, pooled_s) + relation_loss(pooled_t, pooled_s, [2, 3], group_images=2)
    loss.backward()
    assert adapter.weight.grad.abs().sum() > 0 and adapter.bias.grad.abs().sum() > 0
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in student_maps)
    assert all(m.grad is None for m in teacher_maps)


# --- relation loss ---------------------------------------------------------------------------


def test_relation_loss_hand_computed():
    # 1-D features. Teacher 0, 1, 3: distances (1, 3, 2), mean 2 -> (0.5, 1.5, 1).
    # Student 0, 1, 2: distances (1, 2, 1), mean 4/3 -> (0.75, 1.5, 0.75).
    # Differences -0.25, 0, 0.25: SmoothL1 0.03125 twice, over 6 ordered pairs -> 2 * 0.0625 / 6.
    teacher = torch.tensor([0.0, 1.0, 3.0]).reshape(3, 1, 1, 1)
    student = torch.tensor([0.0, 1.0, 2.0]).reshape(3, 1, 1, 1)
    assert relation_loss(teacher, student, [3], group_images=1).item() == pytest.approx(0.125 / 6)


def test_relation_loss_is_invariant_to_feature_scale():
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(7, 4, 3, 3, generator=generator)
    student = torch.randn(7, 4, 3, 3, generator=generator)
    counts = [3, 2, 2]
    loss = relation_loss(teacher, student, counts, group_images=2)
    assert loss.item() > 0
    assert torch.allclose(relation_loss(teacher * 37.0, student, counts, 2), loss, rtol=1e-5)
    assert torch.allclose(relation_loss(teacher, student * 0.01, counts, 2), loss, rtol=1e-5)


@pytest.mark.parametrize(
    ("counts", "group_images"), [([2], 1), ([1, 1], 2), ([2, 0], 2), ([0, 0], 2), ([2, 2], 1)]
)
def test_relation_loss_is_zero_with_fewer_than_three_instances(counts, group_images):
    student = torch.randn(sum(counts), 4, 3, 3, requires_grad=True)
    loss = relation_loss(torch.randn(sum(counts), 4, 3, 3), student, counts, group_images)
    assert loss.item() == 0.0
    loss.backward()
    assert student.grad is not None and torch.all(student.grad == 0)


def test_relation_loss_groups_consecutive_images_and_averages_groups_with_three_instances():
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(9, 2, 2, 2, generator=generator)
    student = torch.randn(9, 2, 2, 2, generator=generator)
    first = relation_loss(teacher[:3], student[:3], [3], 1)  # images 0 + 1 (2 + 1 GIs)
    second = relation_loss(teacher[3:7], student[3:7], [4], 1)  # images 2 + 3 (4 + 0 GIs)
    # Images 4 + 5 hold 2 GIs: that group has no relation and is left out of the mean, not counted as 0.
    loss = relation_loss(teacher, student, [2, 1, 4, 0, 2, 0], group_images=2)
    assert torch.allclose(loss, (first + second) / 2)
    # Per image (group_images=1) only image 2 has 3 or more GIs.
    assert torch.allclose(relation_loss(teacher, student, [2, 1, 4, 0, 2, 0], 1), second)


def full_matrix_relation(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """The spec's formula for one group as written: all M x M ordered pairs, the diagonal excluded."""
    def normalised(features):
        distances = torch.cdist(features, features, compute_mode="donot_use_mm_for_euclid_dist")
        off_diagonal = ~torch.eye(len(features), dtype=torch.bool)
        return distances / distances[off_diagonal & (distances > 0)].mean()

    size = len(student)
    pairs = F.smooth_l1_loss(normalised(student.flatten(1)), normalised(teacher.flatten(1)), reduction="sum")
    return pairs / (size**2 - size)


def test_relation_loss_equals_the_full_matrix_formula_in_value_and_gradient():
    generator = torch.Generator().manual_seed(3)
    teacher = torch.randn(20, 8, 3, 3, generator=generator, dtype=torch.float64)
    student = torch.randn(20, 8, 3, 3, generator=generator, dtype=torch.float64)
    student[5] = student[4]  # a duplicate GI: a zero distance in the student only
    student.requires_grad_()
    loss = relation_loss(teacher, student, [6, 5, 9, 0], group_images=2)
    (gradient,) = torch.autograd.grad(loss, student)
    expected = (full_matrix_relation(teacher[:11], student[:11]) + full_matrix_relation(teacher[11:], student[11:])) / 2
    (expected_gradient,) = torch.autograd.grad(expected, student)
    assert torch.allclose(loss, expected, rtol=1e-12)
    assert torch.allclose(gradient, expected_gradient, rtol=1e-10, atol=1e-14)


def test_relation_loss_of_identical_instances_is_finite():
    # Duplicate GIs (zero distances) must not produce NaN gradients.
    student = torch.ones(4, 2, 2, 2, requires_grad=True)
    loss = relation_loss(torch.randn(4, 2, 2, 2), student, [4], 1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


# --- response losses -------------------------------------------------------------------------


def response_case(centerness: bool = False):
    generator = torch.Generator().manual_seed(0)
    t_logits = torch.randn(2, 5, 3, generator=generator)
    s_logits = t_logits.clone()
    s_logits[0, 1] += torch.tensor([0.5, 0.0, -1.0])  # masked, differs in classes 0 and 2
    s_logits[1, 3] += 2.0  # differs but not masked
    t_deltas = torch.randn(2, 5, 4, generator=generator)
    s_deltas = t_deltas + 0.25
    t_ctr = torch.randn(2, 5, 1, generator=generator) if centerness else None
    s_ctr = t_ctr.clone() if centerness else None
    teacher = dense(t_logits.requires_grad_(), t_deltas.requires_grad_(), t_ctr)
    student = dense(s_logits.requires_grad_(), s_deltas.requires_grad_(), s_ctr)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 1] = mask[0, 2] = mask[1, 0] = True
    return teacher, student, mask


def test_response_cls_gradient_is_zero_where_the_logits_agree():
    teacher, student, mask = response_case()
    cls, _ = response_loss(teacher, student, mask, temperature=1.0)
    cls.backward()
    grad = student.cls_logits.grad
    assert torch.all(grad[0, 1, [0, 2]] != 0)
    differs = torch.zeros_like(grad, dtype=torch.bool)
    differs[0, 1, [0, 2]] = True
    assert torch.all(grad[~differs] == 0)  # equal logits, or not masked (incl. [1, 3], which differs)
    assert teacher.cls_logits.grad is None and teacher.bbox_regression.grad is None


def test_response_loss_values():
    teacher, student, mask = response_case()
    cls, reg = response_loss(teacher, student, mask, temperature=1.0)
    t, s = teacher.cls_logits.detach()[mask], student.cls_logits.detach()[mask]
    expected = F.binary_cross_entropy_with_logits(s, t.sigmoid(), reduction="sum").item() / 3
    assert cls.item() == pytest.approx(expected)
    assert reg.item() == pytest.approx(3 * 4 * 0.25 / 3)  # L1 over 3 masked anchors x 4, / N_m = 3
    # Temperature: both logits softened by T, times T^2.
    cls_t2, _ = response_loss(teacher, student, mask, temperature=2.0)
    expected = 4 * F.binary_cross_entropy_with_logits(s / 2, (t / 2).sigmoid(), reduction="sum").item() / 3
    assert cls_t2.item() == pytest.approx(expected)


def test_response_reg_adds_centerness_bce():
    teacher, student, mask = response_case(centerness=True)
    with torch.no_grad():
        student.centerness[0, 1] += 1.0
    _, reg = response_loss(teacher, student, mask, temperature=1.0)
    t, s = teacher.centerness[mask], student.centerness[mask]
    centerness = F.binary_cross_entropy_with_logits(s, t.sigmoid(), reduction="sum").item()
    assert reg.item() == pytest.approx((3 * 4 * 0.25 + centerness) / 3)


def test_response_loss_with_an_empty_mask():
    teacher, student, _ = response_case(centerness=True)
    student.centerness.requires_grad_()
    cls, reg = response_loss(teacher, student, torch.zeros(2, 5, dtype=torch.bool), temperature=2.0)
    assert cls.item() == 0.0 and reg.item() == 0.0
    (cls + reg).backward()
    assert torch.all(student.cls_logits.grad == 0) and torch.all(student.bbox_regression.grad == 0)


def roi_case(num: int, classes: int = 4):
    generator = torch.Generator().manual_seed(0)
    t_logits = torch.randn(num, classes, generator=generator)
    t_deltas = torch.randn(num, classes * 4, generator=generator)
    return t_logits, t_deltas


def test_roi_response_loss():
    t_logits = torch.tensor([[9.0, 1.0, 3.0, 2.0], [0.0, 5.0, 1.0, 1.0]])  # top foreground: 2 and 1
    t_deltas = torch.zeros(2, 16)
    s_deltas = torch.zeros(2, 16)
    s_deltas[0, 8:12] = torch.tensor([1.0, -1.0, 0.5, 0.0])  # image 0, class 2: used
    s_deltas[0, 0:4] = 7.0  # background slot of the teacher's top-scoring class: ignored
    s_deltas[1, 8:12] = 3.0  # not GI 1's top foreground class: ignored
    s_logits = t_logits.clone().requires_grad_()
    cls, reg = roi_response_loss(t_logits, t_deltas, s_logits, s_deltas.requires_grad_(), temperature=1.0)
    assert cls.item() == pytest.approx(0.0, abs=1e-6)
    assert reg.item() == pytest.approx(2.5 / 2)
    cls.backward()
    assert torch.allclose(s_logits.grad, torch.zeros_like(s_logits), atol=1e-7)


def test_roi_response_kl_with_temperature():
    t_logits, t_deltas = roi_case(3)
    s_logits = torch.randn(3, 4)
    cls, _ = roi_response_loss(t_logits, t_deltas, s_logits, t_deltas.clone(), temperature=2.0)
    p_t = (t_logits / 2).softmax(1)
    kl = (p_t * (p_t.log() - (s_logits / 2).log_softmax(1))).sum() / 3
    assert cls.item() == pytest.approx(4 * kl.item(), rel=1e-5)


# --- no GI, no ground truth ------------------------------------------------------------------


def test_all_losses_are_finite_without_general_instances():
    # No GI in any image (e.g. an image without ground truth and models in agreement).
    teacher_maps = fpn_maps(batch=2, channels=4, seed=1)
    student_maps = [m.requires_grad_() for m in fpn_maps(batch=2, channels=4, seed=2)]
    adapter = build_adapter("conv3x3", 4, 4)
    no_boxes = [torch.zeros(0, 4), torch.zeros(0, 4)]
    pooled_t = pool_instances(teacher_maps, FIRST_LEVEL, no_boxes, 10, 224.0)
    pooled_s = pool_instances([adapter(m) for m in student_maps], FIRST_LEVEL, no_boxes, 10, 224.0)
    teacher, student, _ = response_case(centerness=True)
    student.centerness.requires_grad_()
    roi_student = torch.zeros(0, 4, requires_grad=True)
    losses = [
        feature_loss(pooled_t, pooled_s),
        relation_loss(pooled_t, pooled_s, [0, 0], group_images=2),
        *response_loss(teacher, student, torch.zeros(2, 5, dtype=torch.bool), temperature=1.0),
        *roi_response_loss(torch.zeros(0, 4), torch.zeros(0, 16), roi_student, torch.zeros(0, 16), 1.0),
    ]
    assert all(torch.isfinite(loss) and loss.item() == 0.0 for loss in losses)
    sum(losses).backward()
    assert adapter.weight.grad is not None and torch.all(adapter.weight.grad == 0)
    assert not any(math.isnan(g.sum().item()) for g in (student.cls_logits.grad, roi_student.grad))
