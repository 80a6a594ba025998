"""Data loading: samples per second of the training loader, against what a training step consumes.

It times the exact loader a worker builds (``build_dataset`` with training augmentation, ``collate``,
``--batch-size``) over a synthetic set for each ``--workers`` count, then times ``--steps`` GID
training steps of the student on batches from memory, so the two rates come from the same machine.

    python -m benchmarks.loader_throughput --image-size 64 --batches 60 --workers 0,1,2
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from benchmarks.step_overhead import cpu_name
from gid.config import DataConfig, DistillConfig, ModelConfig
from gid.data import build_dataset, collate, make_synthetic
from gid.distill import Distiller
from gid.engine.loop import apply_gradients
from gid.models import build_detector


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=60, help="batches timed per loader")
    p.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    p.add_argument("--steps", type=int, default=5, help="GID steps timed (after one warm-up)")
    p.add_argument("--framework", default="fcos")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="where the GID steps run: cpu or cuda")
    p.add_argument("--amp", action="store_true", help="float16 autocast + gradient scaling, as on GPUs (cuda only)")
    args = p.parse_args(argv)
    if args.amp and not args.device.startswith("cuda"):
        p.error("--amp needs --device cuda (the training loop uses AMP on GPUs only)")
    return args


def loader_rate(dataset, batch_size: int, workers: int, batches: int) -> float:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, collate_fn=collate)
    iterator = iter(loader)
    next(iterator)  # worker start-up is paid once per run, not per batch
    started = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - started)


def step_rate(args: argparse.Namespace, dataset) -> float:
    """Images per second of a GID training step (forward, then the training loop's backward and SGD step) on
    batches already on the device."""
    device = torch.device(args.device)
    teacher = build_detector(ModelConfig(framework=args.framework, backbone="resnet50", fpn_channels=128),
                             args.image_size, dataset.num_classes)
    student = build_detector(ModelConfig(framework=args.framework), args.image_size, dataset.num_classes)
    distiller = Distiller(teacher, copy.deepcopy(student), DistillConfig(teacher="unused"), args.image_size)
    distiller = distiller.to(device).train()
    params = [p for p in distiller.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler(enabled=args.amp)
    constant_lr = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)
    images, targets = collate([dataset[i] for i in range(args.batch_size)])
    images = [image.to(device) for image in images]
    targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for step in range(args.steps + 1):
        sync()
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.float16, enabled=args.amp):
            losses = distiller(images, targets)
            loss = sum(v for k, v in losses.items() if k.startswith("loss_"))
        apply_gradients(loss, optimizer, scaler, constant_lr, params, clip_grad_norm=None)
        sync()
        if step:  # the first step pays for lazy initialisation
            times.append(time.perf_counter() - started)
    return args.batch_size / statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="gid-loader-") as root:
        images = max(args.batches + 1, args.batch_size) * args.batch_size
        make_synthetic(Path(root), train=images, val=0, image_size=args.image_size, max_objects=4, min_object_size=12)
        dataset = build_dataset(DataConfig(root=Path(root), image_size=args.image_size), "train", train=True)
        rates = {w: loader_rate(dataset, args.batch_size, w, args.batches) for w in map(int, args.workers.split(","))}
        consumed = step_rate(args, dataset)
    lines = [
        f"### Loader throughput: image {args.image_size}, batch {args.batch_size}",
        "",
        f"- command: `python -m benchmarks.loader_throughput {' '.join(argv)}`",
        f"- machine: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}, {args.threads} threads",
        "",
        "| loader workers | samples/s | × what a GID step consumes |",
        "|---:|---:|---:|",
    ]
    lines += [f"| {w} | {rate:.0f} | {rate / consumed:.1f}× |" for w, rate in rates.items()]
    where = f"on {torch.cuda.get_device_name()}{' with AMP' if args.amp else ''}" if args.device.startswith("cuda") else "here"
    lines += ["", f"A GID training step ({args.framework}, ResNet-50 teacher, ResNet-18 student) consumes "
              f"{consumed:.1f} images/s {where}."]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
