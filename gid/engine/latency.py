"""What a detector costs to deploy: its parameter count and its CPU inference latency per image (``gid eval``)."""

from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn

WARMUP_RUNS = 3  # untimed: the first calls allocate memory and choose kernels
#: The names a run, a sweep trial and the benchmarks report a model's cost under (cpu_cost).
COST_METRICS = ("params", "latency_ms")


def parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


@torch.inference_mode()
def cpu_latency(model: nn.Module, image_size: int, runs: int) -> float:
    """Median seconds of ``runs`` eval-mode calls on one ``image_size`` square image, after warm-up, on the CPU.

    A square image is the largest input the detector's transform makes at that longest side.
    The model is timed where it is (its parameters on the CPU) with torch's current thread count.
    """
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    image = torch.rand(3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    try:
        for _ in range(WARMUP_RUNS):
            model([image])
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            model([image])
            times.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    return statistics.median(times)


def cpu_cost(model: nn.Module, image_size: int, runs: int) -> dict[str, float]:
    """``params`` and ``latency_ms`` (cpu_latency's median, in ms) of ``model``; one on a GPU is timed as a CPU copy."""
    on_cpu = all(tensor.device.type == "cpu" for tensor in (*model.parameters(), *model.buffers()))
    timed = model if on_cpu else copy.deepcopy(model).cpu()
    return {"params": parameter_count(model), "latency_ms": 1000 * cpu_latency(timed, image_size, runs)}


def format_cost(cost: dict[str, float], image_size: int, runs: int) -> str:
    threads = torch.get_num_threads()
    return (
        f"{cost['params'] / 1e6:.2f} M parameters, {cost['latency_ms']:.1f} ms per {image_size} px image on the CPU "
        f"({threads} thread{'s' if threads > 1 else ''}, median of {runs} runs)"
    )
