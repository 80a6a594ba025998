"""What the driver shows of a run while the workers train: a line per epoch, and the progress within it.

The lines are the driver's own, built from what rank 0 sends, so they read the same whether or not
Ray forwards the workers' output (``gid.logs``). One Ray queue carries both to a thread of the driver
(:func:`progress_lines`): each report's metrics, put by :class:`EpochReports` (Ray Train's callbacks run in
its controller actor, not in the driver), and rank 0's progress within the epoch every few seconds
(``gid.engine.step_progress``).

Sweeps show no progress within an epoch: several trials train at once, and Tune's trial table, once
a minute, already says which are running and for how long.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import ray.train
from ray.util.queue import Queue

from gid.engine.step_progress import StepProgress
from gid.logs import show_status, shows_status

logger = logging.getLogger(__name__)


def epoch_line(label: str, metrics: dict, epochs: int) -> str:
    """E.g. ``retinanet resnet18  epoch 2/3  loss 1.234  val AP 12.3  (41 s training)``."""
    parts = [label, f"epoch {metrics['epoch']}/{epochs}", f"loss {metrics['loss']:.3f}"]
    if "val_ap" in metrics:  # evaluated this epoch (train.eval_every)
        parts.append(f"val AP {100 * metrics['val_ap']:.1f}")
    parts.append(f"({duration(metrics['epoch_time_s'])} training)")
    return "  ".join(parts)


def progress_line(label: str, progress: StepProgress, epochs: int) -> str:
    """E.g. ``retinanet resnet18  epoch 2/3  step 120/500  38.2 img/s  ETA 2.1 min``."""
    return "  ".join([
        label, f"epoch {progress.epoch}/{epochs}", f"step {progress.done}/{progress.steps}",
        f"{progress.images_per_s:.1f} img/s", f"ETA {duration(progress.eta_s)}",
    ])


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


class ProgressDisplay:
    """The driver's side: an epoch line per report, and each :class:`StepProgress` in between.

    On a terminal (``in_place``), the progress is a status line rewritten as each arrives (gid.logs), erased
    when its epoch's line is shown. Elsewhere (a pipe, a notebook) it is a plain line, through the log file
    too, at most every ``every_s`` seconds: none in an epoch shorter than that, whose epoch line is enough.
    """

    def __init__(
        self, label: str, epochs: int, in_place: bool, every_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label, self.epochs, self.in_place, self.every_s, self.clock = label, epochs, in_place, every_s, clock
        self.shown: StepProgress | None = None  # on the status line
        self.logged_at = clock()  # of the last plain line

    def progress(self, progress: StepProgress) -> None:
        if self.in_place:
            self.shown = progress
            show_status(progress_line(self.label, progress, self.epochs))
        elif self.clock() - self.logged_at >= self.every_s:
            logger.info(progress_line(self.label, progress, self.epochs))
            self.logged_at = self.clock()

    def epoch(self, metrics: dict) -> None:
        # Rank 0 may already be in the next epoch, whose progress stays below the line.
        if self.shown is not None and self.shown.epoch <= metrics["epoch"]:
            self.close()
        logger.info(epoch_line(self.label, metrics, self.epochs))
        self.logged_at = self.clock()

    def close(self) -> None:
        """Erase the status line."""
        if self.shown is not None:
            self.shown = None
            show_status("")


class EpochReports(ray.train.UserCallback):
    """Puts rank 0's metrics of every report on ``queue`` (only rank 0's hold the evaluation)."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        self.queue.put(metrics[0])


@contextmanager
def progress_lines(label: str, epochs: int, history: list[dict] | None = None) -> Iterator[Queue]:
    """Show a run's progress: the yielded queue takes each report's metrics (give the run ``EpochReports(queue)``)
    and rank 0's :class:`StepProgress` (``gid.engine.loop.train_loop_per_worker``'s ``progress_queue``).

    Each report's metrics are also appended to ``history`` when one is given.
    """
    queue = Queue(actor_options={"num_cpus": 0})  # placed even while the workers hold every CPU
    display = ProgressDisplay(label, epochs, in_place=shows_status())

    def show() -> None:
        while (item := queue.get()) is not None:
            if isinstance(item, StepProgress):
                display.progress(item)
                continue
            display.epoch(item)
            if history is not None:
                history.append(item)

    thread = threading.Thread(target=show, name="progress-lines", daemon=True)
    thread.start()
    try:
        yield queue
    finally:
        queue.put(None)  # after the controller's last report: every line is shown, then the thread ends
        thread.join(timeout=60)
        display.close()
        queue.shutdown()
