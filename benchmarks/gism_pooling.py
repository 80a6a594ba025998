"""GISM selection and GI pooling on CPU: the per-image / torchvision versions against gid's.

Plain PyTorch, no Ray. Times, with 2 threads and with 1, the median over ``--repeats`` runs of

* GISM selection (``select_general_instances``) on RetinaNet-like dense outputs of a batch of 8
  (9 anchors per location, FPN strides 8-128, scores smooth over space so that the best
  candidates crowd around a few places, as a detector's do) against the per-image algorithm it
  replaced (top-k, decode, clip, filters and prefix NMS image by image), and against
  torchvision's ``batched_nms`` over all candidates of the batch;
* pooling the GIs of a batch of 8 (10 GIs per image, roi_size 10, FPN strides 8-128), forward and
  backward, with gid's ``pool_instances`` against the same function on torchvision's roi_align.

Usage: python -m benchmarks.gism_pooling [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from unittest import mock

import torch
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import batched_nms, clip_boxes_to_image, nms, remove_small_boxes

from gid.config import GismConfig
from gid.distill.gism import GeneralInstances, gi_scores, select_general_instances
from gid.distill.pooling import pool_instances
from gid.frameworks.view import AnchorLayout, DenseOutput
from gid.models import roi_align

BATCH = 8
NUM_CLASSES = 4
LEVELS = range(3, 8)  # FPN strides 8 ... 128
COCO_SIZE = 800


def median_ms(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


# --- GISM -------------------------------------------------------------------------------------


def dense_outputs(image: int, seed: int) -> tuple[DenseOutput, DenseOutput, AnchorLayout]:
    """Teacher and student outputs of a RetinaNet-like head on ``BATCH`` square images."""
    generator = torch.Generator().manual_seed(seed)
    scale = image / COCO_SIZE
    sizes = tuple(tuple(s * scale * 2 ** (i / 3) for i in range(3)) for s in (32, 64, 128, 256, 512))
    anchor_generator = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)
    grids = [(-(-image // 2**level),) * 2 for level in LEVELS]
    images = ImageList(torch.zeros(BATCH, 3, image, image), [(image, image)] * BATCH)
    anchors = anchor_generator(images, [torch.zeros(BATCH, 1, *grid) for grid in grids])

    def head() -> DenseOutput:
        logits = []
        for grid in grids:  # smooth over space: neighbouring anchors agree, as in a detector
            coarse = torch.randn(BATCH, 9 * NUM_CLASSES, *(max(1, g // 4) for g in grid), generator=generator)
            smooth = torch.nn.functional.interpolate(coarse, size=grid, mode="bilinear", align_corners=False)
            noisy = 3 * smooth + 0.3 * torch.randn(smooth.shape, generator=generator)
            logits.append(noisy.permute(0, 2, 3, 1).reshape(BATCH, -1, NUM_CLASSES))
        logits = torch.cat(logits, dim=1)
        deltas = 0.2 * torch.randn(BATCH, logits.shape[1], 4, generator=generator)
        return DenseOutput([], LEVELS[0], logits, deltas)

    num_per_level = [9 * h * w for h, w in grids]
    return head(), head(), AnchorLayout(anchors, num_per_level, [(image, image)] * BATCH)


def per_image_selection(teacher, student, layout, decode, config, min_box_size) -> list[GeneralInstances]:
    """GISM as it was: image by image, NMS on a growing prefix of each image's candidates."""
    p_teacher, p_student = teacher.cls_logits.float().sigmoid(), student.cls_logits.float().sigmoid()
    all_scores = gi_scores(p_teacher, p_student, config.score_mode)
    all_teacher_wins = p_teacher.amax(dim=-1) >= p_student.amax(dim=-1)
    selected = []
    for i in range(all_scores.shape[0]):
        scores, index = all_scores[i].topk(min(config.pre_nms_top_k, all_scores.shape[1]))
        from_teacher = all_teacher_wins[i, index]
        deltas = torch.where(
            from_teacher[:, None], teacher.bbox_regression[i, index], student.bbox_regression[i, index]
        )
        boxes = clip_boxes_to_image(decode(deltas.float(), layout.anchors[i][index]), layout.image_sizes[i])
        keep = remove_small_boxes(boxes, min_box_size)
        keep = keep[scores[keep] >= config.min_score]
        keep = keep[prefix_nms_top_k(boxes[keep], scores[keep], config.nms_iou, config.top_k)]
        selected.append(GeneralInstances(boxes[keep], scores[keep], index[keep], from_teacher[keep]))
    return selected


def prefix_nms_top_k(boxes, scores, iou_threshold, k):
    size = max(128, 8 * k)
    while size < len(scores):
        kept = nms(boxes[:size], scores[:size], iou_threshold)
        if len(kept) >= k:
            return kept[:k]
        size *= 4
    return nms(boxes, scores, iou_threshold)[:k]


def batched_nms_selection(teacher, student, layout, decode, config, min_box_size) -> list[Tensor]:
    """All images' candidates at once, then torchvision's batched_nms over all of them."""
    p_teacher, p_student = teacher.cls_logits.float().sigmoid(), student.cls_logits.float().sigmoid()
    scores = gi_scores(p_teacher, p_student, config.score_mode)
    teacher_wins = p_teacher.amax(dim=-1) >= p_student.amax(dim=-1)
    scores, index = scores.topk(min(config.pre_nms_top_k, scores.shape[1]), dim=1)
    corners = index[..., None].expand(-1, -1, 4)
    deltas = torch.where(
        teacher_wins.gather(1, index)[..., None],
        teacher.bbox_regression.gather(1, corners),
        student.bbox_regression.gather(1, corners),
    )
    anchors = torch.stack(layout.anchors).gather(1, corners)
    # (the images are all square and of one size here)
    boxes = decode(deltas.flatten(0, 1), anchors.flatten(0, 1)).clamp(min=0, max=layout.image_sizes[0][0])
    scores = scores.flatten()
    image = torch.arange(len(layout.anchors)).repeat_interleave(index.shape[1])
    sides = boxes[:, 2:] - boxes[:, :2]
    eligible = torch.nonzero((sides >= min_box_size).all(dim=1) & (scores >= config.min_score)).squeeze(1)
    kept = eligible[batched_nms(boxes[eligible], scores[eligible], image[eligible], config.nms_iou)]
    return [kept[image[kept] == i][: config.top_k] for i in range(len(layout.anchors))]


def gism_rows(repeats: int) -> list[tuple[str, str, float, float, float]]:
    decode = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0)).decode_single
    rows = []
    for image, top_k in ((128, 10), (256, 10), (512, 10), (512, 100)):
        teacher, student, layout = dense_outputs(image, seed=image)
        config = GismConfig(pre_nms_top_k=3000, top_k=top_k, nms_iou=0.3)
        min_box_size = 10.0 * image / COCO_SIZE
        args = (teacher, student, layout, decode, config, min_box_size)
        for before, after in zip(per_image_selection(*args), select_general_instances(*args)):
            assert torch.equal(before.anchor_index, after.anchor_index)
            assert torch.equal(before.boxes, after.boxes)
        old = median_ms(lambda: per_image_selection(*args), repeats)
        new = median_ms(lambda: select_general_instances(*args), repeats)
        full = median_ms(lambda: batched_nms_selection(*args), repeats)
        anchors = sum(layout.num_per_level)
        rows.append((f"GISM, {image} px, R = {anchors}, top_k {top_k}", "per-image", old, new, full))
    return rows


# --- pooling ----------------------------------------------------------------------------------


def pooling_case(image: int, channels: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """FPN maps (strides 8-128) of ``BATCH`` images and 10 GI boxes per image, of every size."""
    generator = torch.Generator().manual_seed(seed)
    maps = [
        torch.randn(BATCH, channels, -(-image // 2**level), -(-image // 2**level), generator=generator)
        for level in LEVELS
    ]
    boxes = []
    for _ in range(BATCH):
        side = (torch.rand(10, 2, generator=generator) * 0.9 + 0.1) * image
        corner = torch.rand(10, 2, generator=generator) * (image - side)
        boxes.append(torch.cat([corner, corner + side], dim=1))
    return maps, boxes


def pool_forward_backward(maps: list[torch.Tensor], boxes: list[torch.Tensor], image: int) -> None:
    maps = [m.detach().requires_grad_() for m in maps]
    pooled = pool_instances(maps, LEVELS[0], boxes, roi_size=10, canonical_size=224.0 * image / COCO_SIZE)
    pooled.square().sum().backward()


def pooling_rows(repeats: int) -> list[tuple[str, str, float, float, float | None]]:
    rows = []
    for image in (64, 128):
        for channels in (64, 128, 256):
            maps, boxes = pooling_case(image, channels, seed=image + channels)
            new = median_ms(lambda: pool_forward_backward(maps, boxes, image), repeats)
            # torchvision's roi_align on every level, as on CUDA (the fallback of roi_align.fast_roi_align)
            with mock.patch.object(roi_align, "_MATMUL_ROI_ALIGN_MAX_AREA", 0):
                old = median_ms(lambda: pool_forward_backward(maps, boxes, image), repeats)
            rows.append((f"pooling fwd+bwd, {image} px, {channels} ch", "torchvision", old, new, None))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed runs per measurement (median)")
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    args = parser.parse_args()
    torch.set_grad_enabled(True)

    print("| case | threads | before: | before (ms) | gid (ms) | speed-up | batched_nms, all candidates (ms) |")
    print("|---|---|---|---|---|---|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for case, before, old, new, full in gism_rows(args.repeats) + pooling_rows(args.repeats):
            extra = f"{full:.2f}" if full is not None else ""
            row = f"| {case} | {threads} | {before} | {old:.2f} | {new:.2f} | {old / new:.1f}x | {extra} |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
