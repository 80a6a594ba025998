"""Learning curve: does a detector trained from scratch learn on a data set within N iterations?

A plain single-process loop (no Ray), so many settings can run side by side on one machine or one
GPU: SGD (or AdamW), linear warm-up then cosine decay, gradient clipping at 10, COCO evaluation of
the validation split at the iterations given by ``--evals``. Used to choose the benchmarks' data,
models and schedules, and to find the anchor defect described in docs/benchmarks.md.

    python -m benchmarks.learning_curve --root data/synth --image-size 128 --framework retinanet --iters 1500 --evals 300,600,1000
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from gid.config import DataConfig, ModelConfig
from gid.data import build_dataset, collate
from gid.engine.evaluation import coco_metrics, format_metrics, predict
from gid.engine.loop import apply_gradients
from gid.models import build_detector


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--framework", default="retinanet")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--fpn", type=int, default=64)
    p.add_argument("--iters", type=int, default=1000)
    p.add_argument("--evals", default="", help="comma-separated iterations to evaluate at (the last always is)")
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--loader-workers", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    data = DataConfig(root=args.root, image_size=args.image_size, batch_size=args.batch_size)
    train_set = build_dataset(data, "train", train=True)
    val_set = build_dataset(data, "val", train=False)
    model_config = ModelConfig(framework=args.framework, backbone=args.backbone, fpn_channels=args.fpn)
    model = build_detector(model_config, args.image_size, train_set.num_classes).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=1e-4)
    else:
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: min(1.0, (it + 1) / 100) * 0.5 * (1 + math.cos(math.pi * it / args.iters))
    )
    scaler = torch.amp.GradScaler(enabled=False)  # float32
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, collate_fn=collate,
                              drop_last=True, num_workers=args.loader_workers)
    val_loader = DataLoader(val_set, batch_size=16, collate_fn=collate)
    evals = {int(x) for x in args.evals.split(",") if x} | {args.iters}
    it, started = 0, time.perf_counter()
    while it < args.iters:
        for images, targets in train_loader:
            images = [image.to(device) for image in images]
            targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
            loss = sum(model(images, targets).values())
            apply_gradients(loss, optimizer, scaler, schedule, params, clip_grad_norm=10.0)
            it += 1
            if it % 100 == 0:
                print(f"it {it} loss {loss.item():.3f} {time.perf_counter() - started:.0f}s", flush=True)
            if it in evals:
                metrics = coco_metrics(val_set.coco, predict(model, val_loader, val_set.label_to_category_id, device))
                print(f"EVAL it {it} {time.perf_counter() - started:.0f}s {format_metrics(metrics)}", flush=True)
            if it >= args.iters:
                break


if __name__ == "__main__":
    main()
