"""The driver's line per epoch of a run: what a person follows while the workers train.

The line is the driver's own, built from what rank 0 reports, so it reads the same whether or not
Ray forwards the workers' output (``gid.logs``). Ray Train's callbacks run in its controller
actor, not in the driver: :class:`EpochReports` hands each report over through a Ray queue.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import ray.train
from ray.util.queue import Queue

logger = logging.getLogger(__name__)


def epoch_line(label: str, metrics: dict, epochs: int) -> str:
    """E.g. ``retinanet resnet18  epoch 2/3  loss 1.234  val AP 12.3  (41 s training)``."""
    parts = [label, f"epoch {metrics['epoch']}/{epochs}", f"loss {metrics['loss']:.3f}"]
    if "val_ap" in metrics:  # evaluated this epoch (train.eval_every)
        parts.append(f"val AP {100 * metrics['val_ap']:.1f}")
    parts.append(f"({duration(metrics['epoch_time_s'])} training)")
    return "  ".join(parts)


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


class EpochReports(ray.train.UserCallback):
    """Puts rank 0's metrics of every report on ``queue`` (only rank 0's hold the evaluation)."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        self.queue.put(metrics[0])


@contextmanager
def epoch_lines(label: str, epochs: int, history: list[dict] | None = None) -> Iterator[EpochReports]:
    """Log :func:`epoch_line` for each report of the run that the yielded callback is given to.

    Each report's metrics are also appended to ``history`` when one is given.
    """
    queue = Queue(actor_options={"num_cpus": 0})  # placed even while the workers hold every CPU

    def show() -> None:
        while (metrics := queue.get()) is not None:
            logger.info(epoch_line(label, metrics, epochs))
            if history is not None:
                history.append(metrics)

    thread = threading.Thread(target=show, name="epoch-lines", daemon=True)
    thread.start()
    try:
        yield EpochReports(queue)
    finally:
        queue.put(None)  # after the controller's last report: every line is shown, then the thread ends
        thread.join(timeout=60)
        queue.shutdown()
