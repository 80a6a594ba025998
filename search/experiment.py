"""One Tune experiment of a sweep stage: the search, or the finalize stage's grid.

The one place that builds, restores and runs a Tuner: its searcher and scheduler, the epoch
budget, the trials' trainable and resources, the run config (MLflow logging, epoch lines, Tune's
terminal output, checkpoints and failures), and the cleanup after ``fit``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from gid.config import Config, DistillConfig
from gid.distill.terms import TERMS
from gid.engine.progress import epoch_line
from gid.errors import first_line
from gid import logs
from search.config import SweepConfig
from search.leftovers import Leftovers
from search.space import LOSSES, to_optuna
from search.system_metrics import SystemMetrics
from search.tracking import MlflowTrialCallback, TrialLogger, flatten, sync_results
from search.trial import run_trial, shown_in_percent, trains_in_trial, trial_dirname

if TYPE_CHECKING:
    from search.sweep import SweepPaths

logger = logging.getLogger(__name__)


def default_point(space: dict[str, Any]) -> dict[str, Any]:
    """DistillConfig's defaults (the spec's weights, the balance ratios 1/1/3) for every space key whose range
    contains them: the search's first point."""
    defaults = flatten({"distill": DistillConfig(teacher="-").model_dump(mode="json")})
    defaults[LOSSES] = ",".join(TERMS)  # all three
    return {key: defaults[key] for key, dimension in space.items() if dimension.contains(defaults.get(key))}


def build_searcher(sweep: SweepConfig, space: dict[str, Any], study_name: str, storage: str) -> OptunaSearch:
    objective = sweep.objective
    metrics, modes = [objective.metric], [objective.mode]
    if objective.second_metric:
        metrics.append(objective.second_metric)
        modes.append(objective.second_mode)
    choice = sweep.sampler
    if choice.type == "tpe":
        sampler = optuna.samplers.TPESampler(
            n_startup_trials=choice.startup_trials_for(sweep.trials), seed=choice.seed,
            multivariate=choice.multivariate, constant_liar=choice.constant_liar,
        )
    else:
        sampler = optuna.samplers.RandomSampler(choice.seed)
    # OptunaSearch ignores TuneConfig's metric/mode: it must be told itself.
    return OptunaSearch(
        space=to_optuna(space),
        metric=metrics if len(metrics) > 1 else metrics[0],
        mode=modes if len(modes) > 1 else modes[0],
        points_to_evaluate=[default_point(space)] if sweep.sampler.paper_defaults_first else None,
        sampler=sampler,
        study_name=study_name,
        storage=optuna.storages.RDBStorage(storage),
    )


def build_scheduler(sweep: SweepConfig, epochs: int):
    if sweep.scheduler.type == "none":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="epoch",
        max_t=epochs,
        grace_period=sweep.scheduler.grace_period_for(epochs),
        reduction_factor=sweep.scheduler.reduction_factor,
    )


class EpochBudget(tune.Stopper):
    """Ends the experiment once its trials have trained ``budget`` epochs in all.

    Counts each trial's highest reported epoch (Tune repeats a trial's last result when it ends) in
    ``ledger``, a file on the driver: ``Tuner.restore`` brings back the stopper as it was pickled at
    the start, so a resumed sweep reads from the ledger what it already spent instead of starting at 0.
    """

    def __init__(self, budget: int, ledger: Path) -> None:
        self.budget, self.ledger = budget, ledger
        self._epochs: dict[str, int] | None = None  # read from the ledger on first use

    @property
    def epochs(self) -> dict[str, int]:
        if self._epochs is None:
            self._epochs = json.loads(self.ledger.read_text()) if self.ledger.exists() else {}
        return self._epochs

    def __call__(self, trial_id: str, result: dict) -> bool:
        epoch = int(result.get("epoch", 0))
        if epoch > self.epochs.get(trial_id, 0):
            self.epochs[trial_id] = epoch
            self.ledger.write_text(json.dumps(self.epochs))
        return False

    def stop_all(self) -> bool:
        return sum(self.epochs.values()) >= self.budget


class TrialEpochLines(tune.Callback):
    """gid's line per epoch of each trial (Tune runs its callbacks on the driver).

    Unlike ``gid train``, trials show no progress within an epoch: several train at once, and Tune's
    table already says, once a minute, which are running and for how long.
    """

    def __init__(self, label: str, epochs: int) -> None:
        self.label, self.epochs = label, epochs  # label: what names the trials' experiment, e.g. the framework

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any) -> None:
        logger.info(epoch_line(f"{self.label} {trial.trial_id}", result, self.epochs))


# Read when a Tune experiment starts: 0 picks Tune's classic reporter, whose verbosity 1 prints the trial
# table alone (the newer output adds a config and a result table per trial).
TUNE_NEW_OUTPUT_ENV = "RAY_AIR_NEW_OUTPUT"


def tune_output(sweep: SweepConfig) -> dict[str, Any]:
    """RunConfig options for Tune's terminal output: its default, or in a quiet terminal (gid.logs) its trial
    table alone, once a minute (the classic reporter, picked for the rest of the command)."""
    if not logs.quiet():
        return {}
    logs.set_env(TUNE_NEW_OUTPUT_ENV, "0")
    metric = sweep.objective.metric
    shown = shown_in_percent(metric)
    reporter = TrialTable(
        metric_columns={"epoch": "epoch", "loss": "loss", shown: metric if shown == metric else f"{metric} %", "time_total_s": "time (s)"},
        # One value, to keep the table narrow: the summary and MLflow hold them all (an empty dict would mean all).
        parameter_columns={LOSSES: "losses"},
        max_column_length=len(",".join(TERMS)),
        max_report_frequency=60,
        print_intermediate_tables=True,  # at verbosity 1 the default is no table at all
    )
    return {"verbose": 1, "progress_reporter": reporter}


class TrialTable(tune.CLIReporter):
    """Tune's classic trial table whose best-trial line, like its AP column, reads the objective in percent."""

    def set_search_properties(self, metric: str | None, mode: str | None) -> bool:
        # Tune hands over TuneConfig's metric; the trials report its percent twin beside it (search.trial).
        return super().set_search_properties(shown_in_percent(metric) if metric else None, mode)


# A trial function that only drives its TorchTrainer leaves the real resources to the Train workers.
# Tune refuses an empty request, so it asks for a token of memory: a token share of a CPU would leave
# the workers of the last concurrent trial short of a whole CPU, and they would wait for another trial's.
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 2**20}


def trial_resources(base: Config) -> dict[str, float]:
    """What a trial asks Tune for: its one worker's resources when it trains in its own process."""
    if not trains_in_trial(base):
        return TRIAL_DRIVER_RESOURCES
    scaling = base.scaling
    return {"CPU": scaling.cpus_per_worker, **({"GPU": scaling.gpus_per_worker} if scaling.use_gpu else {})}


def trial_trainable(base: Config, trials_path: str, system_metrics: SystemMetrics | None = None):
    trial = tune.with_parameters(run_trial, base=base.to_dict(), trials_path=trials_path, system_metrics=system_metrics)
    return tune.with_resources(trial, trial_resources(base))


def trial_run_config(base: Config) -> dict[str, Any]:
    """RunConfig options for the trials' checkpoints and failures: Tune's for trials that train in their own
    process, Ray Train's (``run.*`` in each Train run) for the others. A multi-worker trial's Train run restarts
    its workers itself; Tune restarts the trial when its own process is lost (its node gone), and the Train run,
    named after the trial, resumes from its last checkpoint."""
    failures = {"failure_config": tune.FailureConfig(max_failures=base.run.max_failures)}
    if not trains_in_trial(base):
        return failures
    return {**failures, "checkpoint_config": tune.CheckpointConfig(num_to_keep=base.run.checkpoints_to_keep)}


def fit(tuner: tune.Tuner, base: Config) -> tune.ResultGrid:
    """``tuner.fit()``, then end what its trials' Train runs left behind (search.leftovers); trials that
    train in their own process start no Train run, so there is nothing to look for."""
    if trains_in_trial(base):
        return tuner.fit()
    leftovers = Leftovers()
    results = tuner.fit()
    if ended := leftovers.end():
        logger.info("ended %d Ray Train run(s) that stopped trials left running", ended)
    return results


def sync_to_mlflow(trials: TrialLogger, results: tune.ResultGrid) -> None:
    try:  # fill in whatever the live callback could not write (MLflow down mid-sweep, a resume)
        sync_results(trials, results)
    except Exception as exc:  # noqa: BLE001 - results are safe in Ray's storage either way
        logger.warning("MLflow unreachable (%s); run the same `gid sweep --resume` later to fill it in", first_line(exc))


def run_experiment(
    sweep: SweepConfig,
    paths: SweepPaths,
    trials: TrialLogger,
    name: str,
    label: str,
    resume: bool,
    *,
    search: Callable[[], dict[str, Any]] = dict,
    param_space: dict[str, Any] | None = None,
    budget: EpochBudget | None = None,
) -> tune.ResultGrid:
    """Run (or, with ``resume``, restore and continue) the Tune experiment ``name`` of the sweep's trials.

    ``search`` builds the TuneConfig options that choose its trials (searcher, scheduler, samples): it is
    called only for a new experiment, as a restored one brings back its own. ``budget`` bounds the epochs
    its trials train in all; ``label`` names its trials in the epoch lines.
    """
    base = trials.base
    trainable = trial_trainable(base, trials.trials_path, trials.system_metrics(sweep.tracking.system_metrics_interval_s))
    experiment_path = paths.join(name)
    if resume and tune.Tuner.can_restore(experiment_path):
        tuner = tune.Tuner.restore(experiment_path, trainable, resume_unfinished=True, resume_errored=False)
        if budget and budget.stop_all():
            results = tuner.get_results()  # spent before the interruption: Tune would still start a trial to stop it
            sync_to_mlflow(trials, results)
            return results
    else:
        if budget:
            budget.ledger.unlink(missing_ok=True)  # a new experiment starts its budget at 0
        objective = sweep.objective
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=objective.metric,
                mode=objective.mode,
                # Tune cannot see what the Train runs of multi-worker trials ask for: bound concurrency here.
                max_concurrent_trials=sweep.resources.max_concurrent_trials,
                trial_dirname_creator=trial_dirname,
                **search(),
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=paths.root,
                callbacks=[
                    MlflowTrialCallback(
                        sweep.tracking.tracking_uri, sweep.tracking.experiment, trials.sweep, base,
                        trials.portable_base, trials.trials_path, role=trials.role,
                    ),
                    TrialEpochLines(label, base.train.epochs),
                ],
                stop=budget,
                **trial_run_config(base),
                **tune_output(sweep),
            ),
        )
    results = fit(tuner, base)
    sync_to_mlflow(trials, results)
    return results
