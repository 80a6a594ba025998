"""GISM on hand-made and real dense outputs (spec §2, §8 properties 1-5)."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import clip_boxes_to_image, nms, remove_small_boxes

from gid.config import GismConfig
from gid.distill.gism import GeneralInstances, filter_instances, gi_scores, gism_stats, select_general_instances
from gid.frameworks import FRAMEWORKS, view_for
from gid.frameworks.view import AnchorLayout, DenseOutput
from support import tiny_detector

# Student probabilities of ~0: the paper score of an anchor is then its teacher probability.
NEVER = -30.0


def add_deltas(deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """A toy box coder: the deltas are pixel offsets of the four corners."""
    return anchors + deltas


def dense(logits, deltas) -> DenseOutput:
    return DenseOutput(features=[], first_level=3, cls_logits=logits, bbox_regression=deltas)


def logit(p) -> torch.Tensor:
    return torch.logit(torch.as_tensor(p, dtype=torch.float32))


def config(**overrides) -> GismConfig:
    values = dict(pre_nms_top_k=3000, min_score=0.0, nms_iou=0.5, top_k=10)
    return GismConfig(**(values | overrides))


def test_score_modes_paper_and_reference():
    p_t = torch.tensor([[[0.9, 0.1], [0.5, 0.2], [0.3, 0.3]]])
    p_s = torch.tensor([[[0.1, 0.9], [0.3, 0.6], [0.3, 0.3]]])
    # Confident about opposite classes: the paper's score sees it, the reference score does not.
    assert torch.allclose(gi_scores(p_t, p_s, "paper"), torch.tensor([[0.8, 0.4, 0.0]]))
    assert torch.allclose(gi_scores(p_t, p_s, "reference"), torch.tensor([[0.0, 0.1, 0.0]]))
    with pytest.raises(ValueError):
        gi_scores(p_t, p_s, "other")


@pytest.mark.parametrize("mode", ["paper", "reference"])
def test_select_uses_score_mode(mode):
    # Anchor 0 disagrees on the class, anchor 1 on the confidence (see the test above).
    anchors = torch.tensor([[0.0, 0.0, 40.0, 40.0], [100.0, 100.0, 150.0, 150.0]])
    teacher = dense(logit([[[0.9, 0.1], [0.5, 0.2]]]), torch.zeros(1, 2, 4))
    student = dense(logit([[[0.1, 0.9], [0.3, 0.6]]]), torch.zeros(1, 2, 4))
    layout = AnchorLayout([anchors], [2], [(200, 200)])
    (gi,) = select_general_instances(teacher, student, layout, add_deltas, config(score_mode=mode), 1.0)
    if mode == "paper":
        assert gi.anchor_index.tolist() == [0, 1]
        assert torch.allclose(gi.scores, torch.tensor([0.8, 0.4]))
    else:
        assert gi.anchor_index.tolist() == [1, 0]
        assert torch.allclose(gi.scores, torch.tensor([0.1, 0.0]), atol=1e-6)


def test_box_comes_from_the_more_confident_model():
    anchors = torch.tensor([[10.0, 10.0, 50.0, 50.0]] * 3 + [[0.0, 0.0, 0.0, 0.0]])
    anchors[1] += 100  # keep the three GIs apart so NMS keeps them all
    anchors[2] += torch.tensor([100.0, 0.0, 100.0, 0.0])
    teacher_deltas = torch.tensor([[5.0, 5.0, 5.0, 5.0]]).expand(4, 4)
    student_deltas = -teacher_deltas
    # Anchor 0: the teacher is more confident; 1: the student; 2: a tie, which goes to the teacher.
    teacher = dense(logit([[[0.9], [0.2], [0.6], [0.5]]]), teacher_deltas[None])
    student = dense(logit([[[0.1], [0.7], [0.6], [0.5]]]), student_deltas[None])
    layout = AnchorLayout([anchors], [4], [(200, 200)])
    (gi,) = select_general_instances(teacher, student, layout, add_deltas, config(score_mode="paper"), 1.0)
    by_anchor = {int(a): i for i, a in enumerate(gi.anchor_index)}
    assert set(by_anchor) == {0, 1, 2}  # the zero-size anchor 3 is dropped
    assert gi.from_teacher[[by_anchor[0], by_anchor[1], by_anchor[2]]].tolist() == [True, False, True]
    assert gi.boxes[by_anchor[0]].tolist() == [15.0, 15.0, 55.0, 55.0]
    assert gi.boxes[by_anchor[1]].tolist() == [105.0, 105.0, 145.0, 145.0]
    assert gi.boxes[by_anchor[2]].tolist() == [115.0, 15.0, 155.0, 55.0]


def test_boxes_are_clipped_to_the_image_height_and_width():
    anchors = torch.tensor([[150.0, 80.0, 250.0, 120.0]])
    teacher = dense(logit([[[0.9]]]), torch.zeros(1, 1, 4))
    student = dense(logit([[[0.1]]]), torch.zeros(1, 1, 4))
    layout = AnchorLayout([anchors], [1], [(100, 200)])  # (height, width)
    (gi,) = select_general_instances(teacher, student, layout, add_deltas, config(), 1.0)
    assert gi.boxes.tolist() == [[150.0, 80.0, 200.0, 100.0]]


# Five anchors over two levels (decoded boxes = anchors: zero deltas), teacher probability = score:
#   0: [0,0,40,40] 0.9     1: [4,0,44,40] 0.8 (IoU 0.82 with 0)           -- level 0
#   2: [100,100,160,160] 0.7   3: [0,120,50,170] 0.6   4: [150,0,155,5] 0.95 (5 px) -- level 1
KNOB_ANCHORS = torch.tensor(
    [
        [0.0, 0.0, 40.0, 40.0],
        [4.0, 0.0, 44.0, 40.0],
        [100.0, 100.0, 160.0, 160.0],
        [0.0, 120.0, 50.0, 170.0],
        [150.0, 0.0, 155.0, 5.0],
    ]
)
KNOB_PROBS = [0.9, 0.8, 0.7, 0.6, 0.95]


def select_knob_case(min_box_size: float = 10.0, **overrides) -> GeneralInstances:
    teacher = dense(logit(KNOB_PROBS)[None, :, None], torch.zeros(1, 5, 4))
    student = dense(torch.full((1, 5, 1), NEVER), torch.zeros(1, 5, 4))
    layout = AnchorLayout([KNOB_ANCHORS], [2, 3], [(200, 200)])
    (gi,) = select_general_instances(teacher, student, layout, add_deltas, config(**overrides), min_box_size)
    return gi


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({}, [0, 2, 3]),  # 4 too small, 1 suppressed by 0
        ({"nms_iou": 0.9}, [0, 1, 2, 3]),  # the overlapping pair survives a lax NMS
        ({"nms_iou": 0.1}, [0, 2, 3]),
        ({"top_k": 2}, [0, 2]),  # the two best survivors
        ({"top_k": 1}, [0]),
        ({"min_score": 0.65}, [0, 2]),
        ({"min_box_size": 1.0}, [4, 0, 2, 3]),
        ({"min_box_size": 50.0}, [2, 3]),  # 3 is exactly 50 px wide: kept
        ({"min_box_size": 1.0, "pre_nms_top_k": 1}, [4]),  # the global best, from the second level
        ({"pre_nms_top_k": 1}, []),  # top-k before the size filter: the best is too small
        ({"pre_nms_top_k": 2}, [0]),
        ({"pre_nms_top_k": 3}, [0]),  # 1 joins, then NMS removes it
        ({"pre_nms_top_k": 4}, [0, 2]),
    ],
)
def test_each_knob_changes_the_selection_as_described(overrides, expected):
    gi = select_knob_case(**overrides)
    assert gi.anchor_index.tolist() == expected
    assert torch.allclose(gi.scores, torch.tensor([KNOB_PROBS[i] for i in expected]))
    assert torch.equal(gi.boxes, KNOB_ANCHORS[expected])
    assert gi.from_teacher.all()


def random_batch(batch: int, anchors: int, classes: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    corners = torch.rand(batch, anchors, 2, generator=generator) * 150
    sizes = torch.rand(batch, anchors, 2, generator=generator) * 60 + 5
    anchor_boxes = torch.cat([corners, corners + sizes], dim=2)
    teacher = dense(
        torch.randn(batch, anchors, classes, generator=generator) * 3,
        torch.randn(batch, anchors, 4, generator=generator) * 4,
    )
    student = dense(
        torch.randn(batch, anchors, classes, generator=generator) * 3,
        torch.randn(batch, anchors, 4, generator=generator) * 4,
    )
    layout = AnchorLayout(list(anchor_boxes), [anchors // 2, anchors - anchors // 2], [(180, 200)] * batch)
    return teacher, student, layout


def slice_image(output: DenseOutput, i: int) -> DenseOutput:
    return dense(output.cls_logits[i : i + 1], output.bbox_regression[i : i + 1])


@pytest.mark.parametrize("mode", ["paper", "reference"])
def test_each_image_is_selected_on_its_own(mode):
    teacher, student, layout = random_batch(batch=3, anchors=200, classes=4)
    cfg = config(score_mode=mode, pre_nms_top_k=50, top_k=8, nms_iou=0.3)
    batched = select_general_instances(teacher, student, layout, add_deltas, cfg, 10.0)
    assert len(batched) == 3
    for i, gi in enumerate(batched):
        single = AnchorLayout([layout.anchors[i]], layout.num_per_level, [layout.image_sizes[i]])
        (alone,) = select_general_instances(
            slice_image(teacher, i), slice_image(student, i), single, add_deltas, cfg, 10.0
        )
        assert 0 < len(gi.boxes) <= 8
        assert torch.equal(gi.anchor_index, alone.anchor_index)
        assert torch.equal(gi.boxes, alone.boxes)
        assert torch.equal(gi.scores, alone.scores)
        assert torch.equal(gi.from_teacher, alone.from_teacher)


def test_general_instances_carry_no_gradient():
    teacher, student, layout = random_batch(batch=2, anchors=60, classes=3)
    for output in (teacher, student):
        output.cls_logits.requires_grad_(True)
        output.bbox_regression.requires_grad_(True)
    gis = select_general_instances(teacher, student, layout, add_deltas, config(), 10.0)
    assert sum(len(gi.boxes) for gi in gis) > 0
    for gi in gis:
        assert not gi.boxes.requires_grad and not gi.scores.requires_grad
        assert gi.boxes.grad_fn is None and gi.scores.grad_fn is None


def test_an_image_may_have_no_general_instance():
    # Teacher and student agree everywhere: every score is 0 and min_score > 0 removes them all.
    logits = torch.randn(2, 30, 3)
    deltas = torch.zeros(2, 30, 4)
    anchors = torch.tensor([[0.0, 0.0, 20.0, 20.0]]).repeat(30, 1)
    layout = AnchorLayout([anchors, anchors], [30], [(64, 64)] * 2)
    gis = select_general_instances(
        dense(logits, deltas), dense(logits.clone(), deltas), layout, add_deltas, config(min_score=0.01), 1.0
    )
    for gi in gis:
        assert gi.boxes.shape == (0, 4) and gi.scores.shape == (0,) and gi.anchor_index.shape == (0,)


def hand_made_gis() -> GeneralInstances:
    gt = [10.0, 10.0, 50.0, 50.0]
    boxes = torch.tensor(
        [
            gt,  # 0: its anchor is foreground                       -> positive
            [10.0, 10.0, 50.0, 46.0],  # 1: IoU 0.9, anchor not fg     -> semi-positive
            [10.0, 10.0, 50.0, 30.0],  # 2: IoU 0.5: neither type
            [100.0, 100.0, 140.0, 140.0],  # 3: IoU 0                  -> negative
        ]
    )
    return GeneralInstances(
        boxes=boxes,
        scores=torch.tensor([0.9, 0.8, 0.7, 0.6]),
        anchor_index=torch.tensor([5, 1, 2, 7]),
        from_teacher=torch.tensor([True, False, True, True]),
    )


@pytest.mark.parametrize(
    ("kind", "expected"),
    [("all", [0, 1, 2, 3]), ("positive", [0]), ("semi_positive", [1]), ("negative", [3])],
)
def test_instance_filter(kind, expected):
    gis = [hand_made_gis()]
    gt_boxes = [torch.tensor([[10.0, 10.0, 50.0, 50.0]])]
    foreground = torch.zeros(1, 8, dtype=torch.bool)
    foreground[0, 5] = True
    (kept,) = filter_instances(gis, kind, gt_boxes, foreground)
    assert kept.anchor_index.tolist() == hand_made_gis().anchor_index[expected].tolist()
    assert torch.equal(kept.boxes, gis[0].boxes[expected])
    assert torch.equal(kept.from_teacher, gis[0].from_teacher[expected])


def test_instance_filter_without_ground_truth():
    gis = [hand_made_gis()]
    no_gt = [torch.zeros(0, 4)]
    foreground = torch.zeros(1, 8, dtype=torch.bool)
    assert len(filter_instances(gis, "positive", no_gt, foreground)[0].boxes) == 0
    assert len(filter_instances(gis, "semi_positive", no_gt, foreground)[0].boxes) == 0
    assert len(filter_instances(gis, "negative", no_gt, foreground)[0].boxes) == 4
    with pytest.raises(ValueError):
        filter_instances(gis, "ground_truth", no_gt, foreground)


def test_gism_stats():
    empty = GeneralInstances(
        torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool)
    )
    gt_boxes = [torch.tensor([[10.0, 10.0, 50.0, 50.0]]), torch.zeros(0, 4)]
    stats = gism_stats([hand_made_gis(), empty], gt_boxes)
    # GIs 0, 1 and 2 (IoU exactly 0.5) overlap the GT; 3 of the 4 GIs come from the teacher.
    assert stats == pytest.approx({"gis_per_image": 2.0, "gi_gt_overlap": 0.75, "gi_from_teacher": 0.75})
    stats = gism_stats([empty, empty], gt_boxes)
    assert stats == {"gis_per_image": 0.0, "gi_gt_overlap": 0.0, "gi_from_teacher": 0.0}


# --- the batched selection equals the per-image algorithm it replaced ---------------------------
#
# The reference below is the selection as it was written before it was batched: one image at a
# time, top-k, decode, clip, size and score filter, then NMS on a growing prefix of the candidates.


def reference_select(teacher, student, layout, decode, config, min_box_size) -> list[GeneralInstances]:
    p_teacher = teacher.cls_logits.detach().float().sigmoid()
    p_student = student.cls_logits.detach().float().sigmoid()
    scores = gi_scores(p_teacher, p_student, config.score_mode)
    teacher_wins = p_teacher.amax(dim=-1) >= p_student.amax(dim=-1)
    return [
        reference_select_one_image(
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


def reference_select_one_image(
    scores, teacher_wins, deltas_teacher, deltas_student, anchors, image_size, decode, config, min_box_size
) -> GeneralInstances:
    scores, index = scores.topk(min(config.pre_nms_top_k, scores.numel()))
    from_teacher = teacher_wins[index]
    deltas = torch.where(from_teacher[:, None], deltas_teacher[index], deltas_student[index])
    boxes = clip_boxes_to_image(decode(deltas.float(), anchors[index]), image_size)
    keep = remove_small_boxes(boxes, min_box_size)
    keep = keep[scores[keep] >= config.min_score]
    keep = keep[reference_nms_top_k(boxes[keep], scores[keep], config.nms_iou, config.top_k)]
    return GeneralInstances(
        boxes=boxes[keep], scores=scores[keep], anchor_index=index[keep], from_teacher=from_teacher[keep]
    )


def reference_nms_top_k(boxes, scores, iou_threshold, k, first_prefix=128):
    """``nms(boxes, scores, iou_threshold)[:k]`` on growing prefixes of score-sorted boxes."""
    num_boxes = len(scores)
    size = max(first_prefix, 8 * k)
    while size < num_boxes:
        kept = nms(boxes[:size], scores[:size], iou_threshold)
        if len(kept) >= k:
            return kept[:k]
        size *= 4
    return nms(boxes, scores, iou_threshold)[:k]


def test_reference_prefix_nms_equals_full_nms_then_top_k():
    generator = torch.Generator().manual_seed(0)
    for trial in range(50):
        n = int(torch.randint(1, 3000, (1,), generator=generator))
        xy = torch.rand(n, 2, generator=generator) * 100
        boxes = torch.cat([xy, xy + 2 + torch.rand(n, 2, generator=generator) * 30], dim=1)
        scores = torch.rand(n, generator=generator).sort(descending=True).values
        iou, k = float(torch.rand(1, generator=generator)) * 0.8 + 0.1, int(torch.randint(1, 100, (1,), generator=generator))
        assert torch.equal(reference_nms_top_k(boxes, scores, iou, k), nms(boxes, scores, iou)[:k]), (trial, n, iou, k)


def assert_same_selection(teacher, student, layout, decode, cfg, min_box_size) -> list[GeneralInstances]:
    """The batched selection returns, image by image, exactly what the reference returns."""
    batched = select_general_instances(teacher, student, layout, decode, cfg, min_box_size)
    expected = reference_select(teacher, student, layout, decode, cfg, min_box_size)
    assert len(batched) == len(expected)
    for i, (gi, ref) in enumerate(zip(batched, expected)):
        for field in ("boxes", "scores", "anchor_index", "from_teacher"):
            got, want = getattr(gi, field), getattr(ref, field)
            assert got.dtype == want.dtype and got.shape == want.shape, (i, field, got.shape, want.shape)
            assert torch.equal(got, want), (i, field)
    return batched


def clustered_batch(batch: int, anchors: int, classes: int, generator: torch.Generator):
    """Anchors crowded around a few objects, as a detector's are: NMS must suppress a lot."""
    centres = torch.rand(batch, 6, 2, generator=generator) * 200
    which = torch.randint(0, 6, (batch, anchors), generator=generator)
    centre = centres.gather(1, which[..., None].expand(-1, -1, 2))
    centre = centre + torch.randn(batch, anchors, 2, generator=generator) * 6
    half = torch.rand(batch, anchors, 2, generator=generator) * 30 + 2
    anchor_boxes = torch.cat([centre - half, centre + half], dim=2)
    outputs = [
        dense(
            torch.randn(batch, anchors, classes, generator=generator) * 3,
            torch.randn(batch, anchors, 4, generator=generator) * 3,
        )
        for _ in range(2)
    ]
    sizes = [tuple(torch.randint(120, 240, (2,), generator=generator).tolist()) for _ in range(batch)]
    return *outputs, AnchorLayout(list(anchor_boxes), [anchors], sizes)


@pytest.mark.parametrize("seed", range(6))
def test_batched_selection_equals_the_per_image_reference(seed):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(6):
        batch = int(torch.randint(1, 9, (1,), generator=generator))
        anchors = int(torch.randint(1, 4000, (1,), generator=generator))
        teacher, student, layout = clustered_batch(batch, anchors, classes=3, generator=generator)
        cfg = config(
            score_mode=["paper", "reference"][int(torch.randint(0, 2, (1,), generator=generator))],
            pre_nms_top_k=int(torch.randint(1, 3500, (1,), generator=generator)),
            min_score=float(torch.rand(1, generator=generator)) * 0.3,
            nms_iou=float(torch.rand(1, generator=generator)) * 0.6 + 0.1,
            top_k=int(torch.randint(1, 60, (1,), generator=generator)),
        )
        min_box_size = float(torch.rand(1, generator=generator)) * 20
        assert_same_selection(teacher, student, layout, add_deltas, cfg, min_box_size)


@pytest.mark.parametrize("nms_iou", [0.3, 0.5, 1.0])
def test_batched_selection_keeps_the_order_of_ties_and_duplicates(nms_iou):
    # Scores from a handful of values (ties everywhere) and boxes from a handful of shapes
    # (exact duplicates, identical IoUs): the order among equals must be the reference's.
    generator = torch.Generator().manual_seed(1)
    batch, anchors = 5, 600
    shapes = torch.tensor(
        [[0.0, 0.0, 30.0, 30.0], [10.0, 0.0, 40.0, 30.0], [60.0, 60.0, 90.0, 100.0], [0.0, 0.0, 15.0, 15.0]]
    )
    anchor_boxes = shapes[torch.randint(0, 4, (batch, anchors), generator=generator)]
    probs = torch.randint(0, 4, (batch, anchors, 1), generator=generator) / 4 + 0.1
    teacher = dense(logit(probs), torch.zeros(batch, anchors, 4))
    student = dense(torch.full((batch, anchors, 1), NEVER), torch.zeros(batch, anchors, 4))
    layout = AnchorLayout(list(anchor_boxes), [anchors], [(100, 100)] * batch)
    for top_k in (1, 3, 10):
        cfg = config(nms_iou=nms_iou, top_k=top_k)
        gis = assert_same_selection(teacher, student, layout, add_deltas, cfg, 1.0)
        assert top_k == 1 or any(len(gi.boxes) > 1 for gi in gis)


def test_batched_selection_at_an_iou_equal_to_the_threshold():
    # Two boxes with IoU exactly 1/3 in float32 but above the float64 threshold 1/3 rounds to:
    # torchvision compares in double, and so must the batched NMS.
    anchors = torch.tensor([[0.0, 0.0, 20.0, 10.0], [10.0, 0.0, 30.0, 10.0]])  # IoU 100 / 300
    teacher = dense(logit([[[0.9], [0.8]]]), torch.zeros(1, 2, 4))
    student = dense(torch.full((1, 2, 1), NEVER), torch.zeros(1, 2, 4))
    layout = AnchorLayout([anchors], [2], [(50, 50)])
    iou = float(torch.tensor(1 / 3))  # the float32 IoU, as a double
    for threshold in (iou, 1 / 3, 0.3333333, 0.33333334):
        assert_same_selection(teacher, student, layout, add_deltas, config(nms_iou=threshold), 1.0)


def test_batched_selection_when_nothing_survives_in_some_images():
    generator = torch.Generator().manual_seed(2)
    teacher, student, layout = clustered_batch(4, 500, classes=2, generator=generator)
    # Image 1: every box tiny; image 2: teacher and student agree (all scores 0).
    anchors = [a.clone() for a in layout.anchors]
    anchors[1][:, 2:] = anchors[1][:, :2] + 1.0
    student.cls_logits[2] = teacher.cls_logits[2]
    student.bbox_regression[1] = teacher.bbox_regression[1] = 0.0
    layout = AnchorLayout(anchors, layout.num_per_level, layout.image_sizes)
    gis = assert_same_selection(teacher, student, layout, add_deltas, config(min_score=0.01), 5.0)
    assert [len(gi.boxes) for gi in gis][1:3] == [0, 0] and len(gis[0].boxes) > 0
    # Nothing anywhere: no candidate passes the score filter.
    gis = assert_same_selection(teacher, student, layout, add_deltas, config(min_score=1.0), 5.0)
    assert all(gi.boxes.shape == (0, 4) for gi in gis)


@pytest.mark.parametrize("framework", list(FRAMEWORKS))
def test_batched_selection_on_real_detector_outputs(framework):
    # Untrained teacher and student of different seeds, images of different shapes (so the
    # transform gives each its own image size and pads the batch).
    teacher_view, student_view = (view_for(tiny_detector(framework, 4, seed=seed).eval()) for seed in (0, 1))
    generator = torch.Generator().manual_seed(3)
    images = [torch.rand(3, h, w, generator=generator) for h, w in [(64, 64), (48, 64), (64, 40), (56, 56)]]
    with torch.no_grad():
        batch, _ = student_view.transform(images)
        features = student_view.features(batch)
        student = student_view.dense(features)
        layout = student_view.anchor_layout(batch, features)
        teacher = teacher_view.dense(teacher_view.features(batch))
    assert len(set(layout.image_sizes)) > 1
    knobs = [
        ({}, 0.8),
        ({"nms_iou": 0.5, "top_k": 30, "pre_nms_top_k": 300}, 2.0),
        ({"score_mode": "reference", "top_k": 100}, 0.0),  # zero-area boxes too: NaN IoUs
    ]
    for overrides, min_box_size in knobs:
        cfg = config(**overrides)
        gis = assert_same_selection(teacher, student, layout, student_view.decode, cfg, min_box_size)
        assert sum(len(gi.boxes) for gi in gis) > 0
