"""What a sweep's trials came to: their status, the one rule for "best", and the result types.

The summary, the finalize stage and `gid export` all rank by the sweep's ``objective.mode`` through
:func:`ranked`, and all tell finished trials from pruned and failed ones by :func:`trial_status`.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import optuna
from ray import tune

from gid.config import Config

if TYPE_CHECKING:
    from search.export import ExportedConfig

# What became of a trial: the one rule for MLflow's tags, the sweep summary and `gid export`.
FINISHED, PRUNED, FAILED = "finished", "pruned", "failed"
LOST = "lost"  # started just before the driver died, after Tune last saved its state: run again in its place

T = TypeVar("T")


def trial_status(failed: bool, epochs_trained: int, epochs: int) -> str:
    """Failed if it raised; finished if it trained its whole schedule; otherwise pruned (by ASHA or the budget)."""
    if failed:
        return FAILED
    return FINISHED if epochs_trained >= epochs else PRUNED


def ranked(items: Iterable[T], mode: str, key: Callable[[T], float]) -> list[T]:
    """``items`` best first by ``key`` in the objective's direction (``max`` or ``min``)."""
    return sorted(items, key=key, reverse=mode == "max")


def best(items: Iterable[T], mode: str, key: Callable[[T], float]) -> T | None:
    return next(iter(ranked(items, mode, key)), None)


@dataclass
class TrialRow:
    framework: str
    trial_id: str
    status: str  # FINISHED, PRUNED or FAILED
    epochs: int
    value: float | None  # the objective at the trial's last epoch
    params: dict
    error: str = ""
    checkpoint: str | None = None  # the trial's last checkpoint (a distillation's holds its GI pictures)
    train_time_s: float | None = None  # in training steps, over the trial's epochs
    param_count: int | None = None  # the student's parameters and CPU latency per image (objective.latency_runs)
    latency_ms: float | None = None


def finished(rows: Iterable[TrialRow]) -> list[TrialRow]:
    """The trials that trained their whole schedule and reported the objective (pruned ones stopped early)."""
    return [r for r in rows if r.status == FINISHED and r.value is not None]


def best_row(rows: Iterable[TrialRow], mode: str) -> TrialRow | None:
    return best(finished(rows), mode, key=lambda r: r.value)


@dataclass
class FinalScore:
    """A configuration of the finalize stage (or the student alone) and its objective over seeds."""

    label: str  # "1", "2", ... in the sweep's rank order, or the student alone's
    source: str  # the sweep trial it re-trains ("" for the student alone)
    values: dict[str, Any]
    scores: list[float]  # the objective at the last epoch, one per seed that finished

    @property
    def mean(self) -> float:
        return statistics.fmean(self.scores)

    @property
    def std(self) -> float:
        return statistics.stdev(self.scores) if len(self.scores) > 1 else 0.0


@dataclass
class FrameworkOutcome:
    framework: str
    base: Config
    results: tune.ResultGrid
    study: optuna.Study
    baseline: Path | None  # model file of the student trained alone: the sweep file's, or the one the sweep trained
    defaults: dict[str, Any] | None = None  # GID's defaults, when the sweep's first trial evaluated them
    final: list[FinalScore] = field(default_factory=list)  # the finalize stage's candidates, when it ran
    restarts: dict[str, tuple[int, str]] = field(default_factory=dict)  # trial id -> (restarts, last reason)


@dataclass
class SweepOutcome:
    frameworks: list[FrameworkOutcome]
    summary: str  # Markdown table per framework
    report_dir: Path  # summary.md, trials.csv and plots
    parent_run_id: str
    runs_link: str  # the MLflow experiment's runs table, with the sweep's nested trials
    exported: list[ExportedConfig] = field(default_factory=list)  # with tracking.registered_model: the winners
