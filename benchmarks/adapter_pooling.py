"""The feature adapter and the GIs' pooling on CPU: the adapted maps pooled, against the adapter applied to the
pooled bins (``gid.distill.pooling.adapt_pooled``), forward and backward.

Plain PyTorch, no Ray. For a batch of ``--batch`` images, 10 GIs per image (roi_size 10), a 64-channel student
and a 3 x 3 adapter to 256 channels, on RetinaNet's FPN levels (strides 8-128) and Faster R-CNN's (4-64), at
several image sizes: the median over ``--repeats`` runs of each order, and the order ``pools_first`` picks.

Usage: python -m benchmarks.adapter_pooling [--sizes 128 256 512 800] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import subprocess

import torch

from benchmarks.gism_pooling import median_ms
from gid.distill.losses import build_adapter
from gid.distill.pooling import InstancePooler, adapt_pooled, pools_first

LEVELS = {"retinanet": range(3, 8), "faster_rcnn": range(2, 7)}
STUDENT_CHANNELS, TEACHER_CHANNELS, GIS_PER_IMAGE, ROI_SIZE = 64, 256, 10, 10
COCO_SIZE = 800


def case(framework: str, image: int, batch: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    maps = [
        torch.randn(batch, STUDENT_CHANNELS, -(-image // 2**level), -(-image // 2**level), generator=generator)
        for level in LEVELS[framework]
    ]
    boxes = []
    for _ in range(batch):
        side = (torch.rand(GIS_PER_IMAGE, 2, generator=generator) * 0.5 + 0.02) * image
        corner = torch.rand(GIS_PER_IMAGE, 2, generator=generator) * (image - side)
        boxes.append(torch.cat([corner, corner + side], dim=1))
    pool = InstancePooler(boxes, LEVELS[framework][0], len(maps), ROI_SIZE, 224.0 * image / COCO_SIZE)
    return maps, pool


def forward_backward(adapter, pool: InstancePooler, maps: list[torch.Tensor], first: bool) -> None:
    maps = [level.detach().requires_grad_() for level in maps]
    pooled = adapt_pooled(pool, adapter, maps) if first else pool([adapter(level) for level in maps])
    pooled.square().sum().backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512, 800])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"- command: `python -m benchmarks.adapter_pooling {' '.join(map(str, args.sizes))} --batch {args.batch}`")
    print(f"- machine: {platform.processor() or platform.machine()}, {args.threads} thread(s); torch {torch.__version__}; commit {commit}")
    print()
    print("| framework | image px | map positions | GI bins | adapt, then pool (ms) | pool, then adapt (ms) | speed-up | pools_first |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    adapter = build_adapter("conv3x3", STUDENT_CHANNELS, TEACHER_CHANNELS)
    for framework in LEVELS:
        for image in args.sizes:
            maps, pool = case(framework, image, args.batch, seed=image)
            whole = median_ms(lambda: forward_backward(adapter, pool, maps, first=False), args.repeats)
            pooled = median_ms(lambda: forward_backward(adapter, pool, maps, first=True), args.repeats)
            positions = sum(level.shape[0] * level.shape[-2] * level.shape[-1] for level in maps)
            print(
                f"| {framework} | {image} | {positions} | {pool.bins} | {whole:.1f} | {pooled:.1f} | {whole / pooled:.2f}× "
                f"| {'yes' if pools_first(pool, adapter, maps) else 'no'} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
