"""What MLflow's system metrics cost a trial: the time of one sample, against the interval between samples.

Every ``tracking.system_metrics_interval_s`` a thread in the trial's process (search.system_metrics) reads the
system (MLflow's CPU, disk, network and, where there is one, GPU monitors), checks that the run is still running
and writes the sample to MLflow. This script does exactly that work ``--samples`` times against a real store (a
fresh SQLite store, or ``--tracking-uri`` a running server) and reports its CPU and wall time per sample; a
sample's CPU time over the interval bounds the share of the training's time it can take.

    python -m benchmarks.system_metrics_cost --samples 50
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking import MlflowClient

from benchmarks.step_overhead import commit, cpu_name
from search.config import Tracking

TARGET = 0.01  # of the training's time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=50)
    p.add_argument("--tracking-uri", help="a running MLflow server (default: a fresh SQLite store)")
    return p.parse_args(argv)


def sample_costs(tracking_uri: str, samples: int) -> tuple[list[float], list[float]]:
    """CPU and wall seconds of each of ``samples`` samples, as the monitor's loop takes and writes them."""
    client = MlflowClient(tracking_uri)
    experiment_id = client.create_experiment(f"system-metrics-cost-{time.time_ns()}")
    run_id = client.create_run(experiment_id).info.run_id
    monitor = SystemMetricsMonitor(run_id, tracking_uri=tracking_uri)
    monitor.collect_metrics()  # psutil's CPU percentage counts from its first call
    cpu, wall = [], []
    for _ in range(samples):
        cpu_start, wall_start = time.thread_time(), time.perf_counter()
        monitor.collect_metrics()
        client.get_run(run_id)  # the loop's check that the run is still running
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()  # written at once: the upper bound
        cpu.append(time.thread_time() - cpu_start)
        wall.append(time.perf_counter() - wall_start)
    client.set_terminated(run_id)
    return cpu, wall


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gid-sysmetrics-") as root:
        uri = args.tracking_uri or f"sqlite:///{Path(root) / 'mlflow.db'}"
        cpu, wall = sample_costs(uri, args.samples)
    interval = Tracking().system_metrics_interval_s
    cpu_ms, wall_ms = 1e3 * statistics.median(cpu), 1e3 * statistics.median(wall)
    share = cpu_ms / 1e3 / interval
    print("\n".join([
        f"### System metrics: one sample, {args.samples} samples",
        "",
        f"- command: `python -m benchmarks.system_metrics_cost {' '.join(sys.argv[1:])}`",
        f"- machine: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}; commit {commit()}",
        f"- store: {'the MLflow server given' if args.tracking_uri else 'a fresh SQLite store'}",
        "",
        "| per sample | median | max |",
        "|---|---:|---:|",
        f"| CPU time, ms | {cpu_ms:.1f} | {1e3 * max(cpu):.1f} |",
        f"| wall time, ms | {wall_ms:.1f} | {1e3 * max(wall):.1f} |",
        "",
        f"At the default interval ({interval:g} s) a sample's CPU time is **{100 * share:.3f} %** of the time between "
        f"samples (target ≤ {100 * TARGET:.0f} % of the step time{'' if share <= TARGET else ': missed'}).",
    ]))


if __name__ == "__main__":
    main()
