"""Anchor coverage: how well each framework's anchors can match the ground truth of a data set.

For every ground-truth box of the split it finds the best IoU over all anchors of the detector the
config would build (``gid.models.detectors.build_anchor_generator``) and the number of anchors at
IoU >= 0.5, the RetinaNet matcher's foreground threshold (the RPN's is 0.7). Boxes with no anchor
near them get only the matcher's low-quality match and train the detector poorly.

    python -m benchmarks.anchor_coverage --root data/synth --image-size 128
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou

from gid.config import ModelConfig
from gid.data.coco import load_coco
from gid.frameworks import FRAMEWORKS
from gid.models.detectors import anchor_sizes, build_anchor_generator


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, required=True, help="a COCO-layout data set (e.g. gid data synth)")
    p.add_argument("--split", default="train")
    p.add_argument("--image-size", type=int, required=True, help="the images' side: the input size used")
    p.add_argument("--boxes", type=int, default=3000, help="ground-truth boxes sampled (the first N)")
    p.add_argument("--anchor-sizes", help="comma-separated sizes to compare with auto, e.g. 5.12,10.24,20.48,40.96,81.92")
    return p.parse_args(argv)


def coverage(config: ModelConfig, image_size: int, boxes: torch.Tensor) -> tuple[float, float, float]:
    """Median best IoU, share of boxes with an anchor at IoU >= 0.5, mean anchors at IoU >= 0.5 per box."""
    strides = FRAMEWORKS[config.framework].fpn_layout(config).strides
    images = ImageList(torch.zeros(1, 3, image_size, image_size), [(image_size, image_size)])
    features = [torch.zeros(1, 1, -(-image_size // s), -(-image_size // s)) for s in strides]
    anchors = build_anchor_generator(config, image_size)(images, features)[0]
    iou = box_iou(boxes, anchors)
    best = iou.max(dim=1).values
    return best.median().item(), (best >= 0.5).float().mean().item(), (iou >= 0.5).sum(dim=1).float().mean().item()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    coco = load_coco(args.root / "annotations" / f"instances_{args.split}.json")
    xywh = torch.tensor([ann["bbox"] for ann in list(coco.anns.values())[: args.boxes]], dtype=torch.float32)
    boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
    print(f"### Anchor coverage: {args.root} [{args.split}], {len(boxes)} boxes, input {args.image_size} px\n")
    print(f"- command: `python -m benchmarks.anchor_coverage {' '.join(argv)}`\n")
    print("| framework | anchor sizes per level | median best IoU | boxes with an anchor at IoU ≥ 0.5 | anchors at IoU ≥ 0.5 per box |")
    print("|---|---|---:|---:|---:|")
    for framework in ("retinanet", "faster_rcnn"):
        variants = [ModelConfig(framework=framework)]
        if args.anchor_sizes:
            variants.append(ModelConfig(framework=framework, anchor_sizes=[float(s) for s in args.anchor_sizes.split(",")]))
        for config in variants:
            sizes = ", ".join(f"{s:g}" for s in anchor_sizes(config, args.image_size))
            label = "auto" if config.anchor_sizes == "auto" else "given"
            median, share, count = coverage(config, args.image_size, boxes)
            print(f"| {framework} | {label}: {sizes} | {median:.2f} | {100 * share:.0f}% | {count:.1f} |")


if __name__ == "__main__":
    main()
