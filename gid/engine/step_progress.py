"""Rank 0's progress within an epoch, as it goes to the driver (``gid.engine.progress`` shows it).

Light on imports: the driver's queue actor unpickles these messages, and so imports this module.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ray.util.queue import Queue


@dataclass(frozen=True)
class StepProgress:
    """Where rank 0 is in an epoch.

    The rate is measured from the end of the epoch's first step, whose start-up (the loader's first
    batches, cuDNN's autotuning) would skew it.
    """

    epoch: int  # counted from 1, as the epoch lines count
    done: int  # steps done in the epoch (at least 2: the rate needs one after the first)
    steps: int  # the epoch's steps
    images: int  # trained by all workers since the first step
    seconds: float  # since the first step

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds

    @property
    def eta_s(self) -> float:
        """Until the epoch's last step is done, at the rate so far."""
        return (self.steps - self.done) * self.seconds / (self.done - 1)


class ProgressSender:
    """Puts a :class:`StepProgress` on the driver's ``queue`` once an epoch's rate is known (its second step),
    then at most every ``every_s`` seconds.

    Cheap: one small Ray call every few seconds, not one per step, and no wait on the device (the images
    are counted from the batch's length).
    """

    def __init__(
        self, queue: Queue, steps: int, workers: int, every_s: float = 5.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.queue, self.steps, self.workers, self.every_s, self.clock = queue, steps, workers, every_s, clock
        self.started, self.sent, self.images = 0.0, -math.inf, 0

    def step(self, epoch: int, it: int, images: int) -> None:
        """Step ``it`` (from 0) of ``epoch`` (from 0) is done, on a batch of ``images``."""
        now = self.clock()
        if it == 0:
            self.started, self.sent, self.images = now, -math.inf, 0  # the next step sends at once
            return
        self.images += images * self.workers  # each worker trains as many batches (the distributed sampler pads)
        if now - self.sent >= self.every_s:
            self.sent = now
            self.queue.put_nowait(StepProgress(epoch + 1, it + 1, self.steps, self.images, now - self.started))
