"""One Tune trial: the framework's base distill config plus sampled values, trained.

A trial with one worker trains in its own process and reports to Tune, which keeps its
checkpoints in the trial's folder of the experiment (``<experiment>/<trial id>/``) and hands the
latest back when the trial is restored or retried: no Ray Train run to start, about 10 s less per
trial. A trial with more workers builds a TorchTrainer (DDP, Ray Train V2) that reports to Tune
through ``TuneReportCallback`` (:class:`ReportToTune`); that Train run is named after the trial id and lives in the
sweep's ``trials/<framework>/`` folder, so a restored trial resumes its own Train checkpoint.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import ray
import torch
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
from torch import nn
from torch.utils.data import DataLoader

from gid.config import Config, set_value
from gid.engine.loop import train_loop
from gid.engine.trainer import build_trainer, raise_user_error
from search.space import with_values
from search.system_metrics import SystemMetrics, monitored

BASELINE = "baseline"  # the MLflow role (and Train run name) of the student trained alone, when the sweep trains it
# The finalize stage's Tune trials hold their point under this key: a config label, its source trial and a seed.
FINAL = "final"
STUDENT = "student"  # the finalize label of the student alone


# Tune's terminal (its trial table and best-trial line) shows AP as a person reads it, in percent with one
# decimal, under these names; MLflow, the reports and the files keep the fractions (tracking leaves them out).
PERCENT_SUFFIX = "_percent"


def shown_in_percent(metric: str) -> str:
    """The name Tune's terminal shows ``metric`` under: its percent twin for an AP, else itself."""
    return f"{metric}{PERCENT_SUFFIX}" if metric.startswith("val_ap") else metric


def with_percentages(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` and, for each AP among them, its value in percent (one decimal) under :func:`shown_in_percent`."""
    percent = {
        shown_in_percent(key): round(100 * value, 1)
        for key, value in metrics.items()
        if shown_in_percent(key) != key and isinstance(value, float)
    }
    return {**metrics, **percent}


def trial_params(config: dict[str, Any]) -> dict[str, Any]:
    """The values a Tune trial sets in the base config: the sampled point, or a finalize run's values and seed."""
    final = config.get(FINAL)
    return config if final is None else {**final["values"], "train.seed": final["seed"]}


def trial_config(base: dict[str, Any], params: dict[str, Any], trial_id: str, trials_path: str) -> Config:
    """The full config of one trial, as it runs and as its MLflow run logs it."""
    data = with_values(base, params)
    set_value(data, "run.name", trial_id)
    set_value(data, "run.storage_path", trials_path)
    return Config.model_validate(data)


def trains_in_trial(config: Config) -> bool:
    """Whether the trial's training runs in the Tune trial's own process (one worker) or as a Train run."""
    return config.scaling.num_workers == 1


def checkpoint_path(result: dict[str, Any], checkpoint: tune.Checkpoint | None) -> str | None:
    """A trial's last checkpoint: Tune's own for a trial that trained in its process, else its Train run's."""
    return checkpoint.path if checkpoint is not None else result.get(CHECKPOINT_PATH_KEY)


def trial_dirname(trial: Trial) -> str:
    """The trial's folder in its experiment, where Tune keeps the checkpoints of a trial that trains in it."""
    return trial.trial_id


class TuneTrial:
    """The process of a Tune trial with one worker, as the loop's session (gid.engine.session.Session):
    Tune persists its checkpoints and restores them."""

    rank = 0

    def __init__(self) -> None:
        # Tune gives the trial the GPUs it asked for through CUDA_VISIBLE_DEVICES: the first is cuda:0.
        self.device = torch.device("cuda", 0) if ray.get_gpu_ids() else torch.device("cpu")

    def resume_from(self) -> tune.Checkpoint | None:
        return tune.get_checkpoint()

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def prepare_loader(self, loader: DataLoader) -> DataLoader:
        return loader

    def report(self, metrics: dict, directory: str | None) -> None:
        checkpoint = None if directory is None else tune.Checkpoint.from_directory(directory)
        tune.report(with_percentages(metrics), checkpoint=checkpoint)


class ReportToTune(TuneReportCallback):
    """Tune's report callback for a trial's Train run, with the APs also in percent (as :class:`TuneTrial`)."""

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        super().after_report(run_context, [with_percentages(metrics[0])], checkpoint)


def run_trial(
    params: dict[str, Any], *, base: dict[str, Any], trials_path: str, system_metrics: SystemMetrics | None = None
) -> None:
    """Train one trial; ``system_metrics``: where its MLflow run is, to sample the system into while it trains:
    in this process, or in each of a multi-worker trial's Train workers."""
    trial_id = tune.get_context().get_trial_id()
    config = trial_config(base, trial_params(params), trial_id, trials_path)
    with raise_user_error():
        if trains_in_trial(config):
            with monitored(system_metrics, trial_id):
                train_loop(config.to_dict(), TuneTrial())
        else:
            build_trainer(config, callbacks=[ReportToTune()], around=partial(monitored, system_metrics, trial_id)).fit()
