"""MLflow's system metrics (CPU, memory, disk, network; GPU utilisation and memory where there are GPUs) on a
trial's run, sampled by MLflow's own monitor in the process that trains: a host-bound or starved trial shows in
its run's system-metrics tab.

The driver creates each trial's run when the trial starts (search.tracking.TrialLogger), and the baseline's (the
student trained alone) before it trains; the training finds its run by its tags and hands its id to the monitor.
One sample costs a few milliseconds of one thread every ``tracking.system_metrics_interval_s``
(docs/benchmarks.md, "System metrics: what they cost").
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from gid.errors import first_line

logger = logging.getLogger(__name__)

RUN_WAIT_S = 60  # how long a trial looks for the run the driver makes for it before it trains unmonitored


@dataclass(frozen=True)
class SystemMetrics:
    """Where a trial's run is: its experiment and the tags that, with the trial's id under ``trial_tag`` (if set),
    find it."""

    tracking_uri: str
    experiment_id: str
    tags: dict[str, str]
    trial_tag: str | None
    interval_s: float

    def run_tags(self, trial_id: str) -> dict[str, str]:
        return self.tags if self.trial_tag is None else {**self.tags, self.trial_tag: trial_id}


@contextmanager
def monitored(spec: SystemMetrics | None, trial_id: str, rank: int = 0) -> Iterator[None]:
    """Sample the system into the trial's MLflow run while the block runs (nothing with no ``spec``).

    ``rank``: the trial's worker that samples, where a trial trains on several (Ray Train's workers, each on its
    node): rank 0's keys are a one-worker trial's (``system/cpu_utilization_percentage``), another rank's carry it
    (``system/rank1/cpu_utilization_percentage``). The run is looked for beside the training, which never waits for
    it. A resumed trial continues its run's system-metric steps. Should MLflow be unreachable, the trial trains all
    the same: its metrics are the product, the system's are a view of it.
    """
    if spec is None:
        yield
        return
    monitor = _Monitor(spec, trial_id, None if rank == 0 else f"rank{rank}")
    monitor.start()
    try:
        yield
    finally:
        monitor.stop()


class _Monitor(threading.Thread):
    def __init__(self, spec: SystemMetrics, trial_id: str, node_id: str | None) -> None:
        super().__init__(name="gid-system-metrics", daemon=True)
        self.spec, self.trial_id, self.node_id = spec, trial_id, node_id
        self.stopped = threading.Event()
        self.sampler = None

    def run(self) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        from mlflow.tracking import MlflowClient

        from search.tracking import check_store_exists, find_run

        spec, tags = self.spec, self.spec.run_tags(self.trial_id)
        try:
            check_store_exists(spec.tracking_uri)  # a SQLite file on another node: never make an empty one here
            client = MlflowClient(spec.tracking_uri)
            deadline = time.monotonic() + RUN_WAIT_S
            while (run_id := find_run(client, spec.experiment_id, tags)) is None and time.monotonic() < deadline:
                if self.stopped.wait(0.5):
                    return
            if run_id is None:
                logger.warning("no MLflow run of trial %s after %d s: no system metrics", self.trial_id, RUN_WAIT_S)
                return
            sampler = SystemMetricsMonitor(
                run_id, sampling_interval=spec.interval_s, resume_logging=True, node_id=self.node_id,
                tracking_uri=spec.tracking_uri,
            )
        except Exception as exc:  # noqa: BLE001 - MLflow down, refusing, or its store not on this node
            logger.warning("no system metrics for trial %s: %s", self.trial_id, first_line(exc))
            return
        if not self.stopped.is_set():
            sampler.start()
            self.sampler = sampler

    def stop(self) -> None:
        self.stopped.set()
        self.join()
        if self.sampler is not None:
            self.sampler.finish()
