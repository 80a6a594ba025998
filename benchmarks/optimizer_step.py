"""The SGD update of a training step, as torch implements it three ways: a Python loop over the parameter tensors
(torch's default on a CPU), ``foreach`` (grouped tensor operations, its default on a GPU) and ``fused`` (one
kernel, what gid's loop uses: ``gid.engine.state.build_optimizer``), on each framework's default student.

    python -m benchmarks.optimizer_step --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.step_overhead import commit, cpu_name
from gid.config import ModelConfig, TrainConfig
from gid.frameworks import FRAMEWORKS
from gid.models import build_detector

IMPLEMENTATIONS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=50, help="timed updates per implementation (after 5 untimed)")
    p.add_argument("--image-size", type=int, default=128)
    return p.parse_args(argv)


def update_ms(params: list[torch.nn.Parameter], steps: int, **implementation: bool) -> float:
    """Median milliseconds of one SGD update (the loop's settings) over ``params``, whose gradients are set."""
    train = TrainConfig()
    optimizer = torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay, **implementation)
    times = []
    for step in range(5 + steps):
        started = time.perf_counter()
        optimizer.step()
        if step >= 5:
            times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"SGD update per step, median of {args.steps}; {cpu_name()}, {args.threads} threads, commit {commit()}\n")
    print("| student (default) | parameters | tensors | " + " | ".join(f"{name} ms" for name in IMPLEMENTATIONS) + " |")
    print("|---|---:|---:|" + "---:|" * len(IMPLEMENTATIONS))
    for framework in FRAMEWORKS:
        torch.manual_seed(0)
        model = build_detector(ModelConfig(framework=framework), args.image_size, 7)
        params = [p for p in model.parameters() if p.requires_grad]
        for param in params:
            param.grad = torch.randn_like(param)
        times = [update_ms(params, args.steps, **implementation) for implementation in IMPLEMENTATIONS.values()]
        count = sum(p.numel() for p in params) / 1e6
        print(f"| {framework} | {count:.1f} M | {len(params)} | " + " | ".join(f"{t:.1f}" for t in times) + " |")


if __name__ == "__main__":
    main()
