"""`gid sweep`: one Ray Tune experiment per framework, Optuna sampling, ASHA pruning, MLflow tracking.

Each framework gets its own experiment (and Optuna study) because its trials differ in what
they cost and what mAP they can reach: one TPE model across frameworks would spend its budget
learning the framework gap instead of the GID values that matter within each framework.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from gid.config import Config, DistillConfig
from gid.engine.preflight import check_run_inputs, check_writable
from gid.engine.trainer import ensure_ray
from gid.errors import GidError
from search.config import SweepConfig
from search.leftovers import Leftovers
from search.report import write_sweep_report
from search.space import to_optuna
from search.tracking import MlflowTrialCallback, TrialLogger, connect, flatten, parent_run, sync_results
from search.trial import run_trial


@dataclass
class FrameworkOutcome:
    framework: str
    base: Config
    results: tune.ResultGrid
    study: optuna.Study
    trials_path: str


def experiment_name(sweep: SweepConfig, framework: str) -> str:
    return f"{sweep.name}-{framework}"


def paper_defaults(space: dict[str, Any]) -> dict[str, Any]:
    """The spec's default for every space key its range contains: the first point evaluated."""
    defaults = flatten({"distill": DistillConfig(teacher="-").model_dump(mode="json")})
    return {key: defaults[key] for key, dimension in space.items() if dimension.contains(defaults.get(key))}


def build_searcher(sweep: SweepConfig, framework: str, storage: str) -> OptunaSearch:
    objective = sweep.objective
    metrics, modes = [objective.metric], [objective.mode]
    if objective.second_metric:
        metrics.append(objective.second_metric)
        modes.append(objective.second_mode)
    choice = sweep.sampler
    if choice.type == "tpe":
        sampler = optuna.samplers.TPESampler(n_startup_trials=choice.startup_trials, seed=choice.seed)
    else:
        sampler = optuna.samplers.RandomSampler(choice.seed)
    # OptunaSearch ignores TuneConfig's metric/mode: it must be told itself.
    return OptunaSearch(
        space=to_optuna(sweep.space),
        metric=metrics if len(metrics) > 1 else metrics[0],
        mode=modes if len(modes) > 1 else modes[0],
        points_to_evaluate=[paper_defaults(sweep.space)] if sweep.sampler.paper_defaults_first else None,
        sampler=sampler,
        study_name=experiment_name(sweep, framework),
        storage=optuna.storages.RDBStorage(storage),
    )


def build_scheduler(sweep: SweepConfig, epochs: int):
    if sweep.scheduler.type == "none":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="epoch",
        max_t=epochs,
        grace_period=min(sweep.scheduler.grace_period, epochs),
        reduction_factor=sweep.scheduler.reduction_factor,
    )


class EpochBudget(tune.Stopper):
    """Ends the experiment once its trials have trained ``budget`` epochs in all.

    Counts each trial's highest reported epoch (Tune repeats a trial's last result when it ends).
    A resumed sweep counts only the trials it runs or continues, so it gets the budget again.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.epochs: dict[str, int] = {}

    def __call__(self, trial_id: str, result: dict) -> bool:
        self.epochs[trial_id] = max(self.epochs.get(trial_id, 0), int(result.get("epoch", 0)))
        return False

    def stop_all(self) -> bool:
        return sum(self.epochs.values()) >= self.budget


def sweep_base(sweep: SweepConfig, framework: str) -> Config:
    """The framework's base config with the sweep's trial resources, paths made absolute."""
    base = sweep.base_config(framework).with_absolute_paths()
    resources = sweep.resources
    scaling = base.scaling.model_copy(
        update={
            "num_workers": resources.workers_per_trial,
            "cpus_per_worker": resources.cpus_per_worker,
            "use_gpu": resources.gpus_per_worker > 0,
            "gpus_per_worker": resources.gpus_per_worker or 1,
        }
    )
    train = base.train.model_copy(update={"eval_every": 1})  # the scheduler needs mAP every epoch
    return base.model_copy(update={"scaling": scaling, "train": train})


@dataclass(frozen=True)
class SweepPaths:
    """Where a sweep keeps things: ``root`` may be a bucket URI on clusters, ``local`` is on this machine."""

    root: str  # <storage_path>/<name>: Tune experiments and the trials' Train runs
    local: Path  # the report and the default Optuna database

    @classmethod
    def of(cls, sweep: SweepConfig) -> SweepPaths:
        if "://" in sweep.storage_path:  # cloud storage: keep driver-side files next to the driver
            return cls(f"{sweep.storage_path.rstrip('/')}/{sweep.name}", Path(".gid-sweeps").resolve() / sweep.name)
        local = Path(sweep.storage_path).expanduser().resolve() / sweep.name
        return cls(str(local), local)

    def join(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def optuna_storage(self, sweep: SweepConfig) -> str:
        return sweep.optuna_storage or f"sqlite:///{self.local / 'optuna.db'}"


def run_framework(
    sweep: SweepConfig, base: Config, paths: SweepPaths, logger: TrialLogger, resume: bool
) -> FrameworkOutcome:
    framework = base.model.framework
    name = experiment_name(sweep, framework)
    trials_path = logger.trials_path
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base.to_dict(), trials_path=trials_path),
        # The trial function only drives its TorchTrainer, whose workers ask for the real resources
        # (Tune refuses an empty request, hence a token share of a CPU).
        {"CPU": 0.01},
    )
    experiment_path = paths.join(name)
    storage = paths.optuna_storage(sweep)
    if resume and tune.Tuner.can_restore(experiment_path):
        tuner = tune.Tuner.restore(experiment_path, trainable, resume_unfinished=True, resume_errored=False)
    else:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=sweep.objective.metric,
                mode=sweep.objective.mode,
                search_alg=build_searcher(sweep, framework, storage),
                scheduler=build_scheduler(sweep, base.train.epochs),
                num_samples=sweep.trials,
                # Tune cannot see the Train workers' resources: bound concurrency here.
                max_concurrent_trials=sweep.resources.max_concurrent_trials,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=paths.root,
                callbacks=[
                    MlflowTrialCallback(
                        sweep.tracking.tracking_uri, sweep.tracking.experiment, logger.parent_run_id, sweep.name, base,
                        trials_path,
                    )
                ],
                failure_config=tune.FailureConfig(max_failures=0),
                stop=EpochBudget(sweep.budget_epochs) if sweep.budget_epochs else None,
            ),
        )
    leftovers = Leftovers()
    results = tuner.fit()
    if ended := leftovers.end():
        print(f"ended {ended} Ray Train run(s) that stopped trials left running")
    try:  # fill in whatever the live callback could not write (MLflow down mid-sweep, a resume)
        sync_results(logger, results)
    except Exception as exc:  # noqa: BLE001 - results are safe in Ray's storage either way
        print(f"MLflow unreachable ({str(exc).splitlines()[0]}); run the same `gid sweep --resume` later to fill it in")
    study = optuna.load_study(study_name=name, storage=storage)
    return FrameworkOutcome(framework, base, results, study, trials_path)


@dataclass
class SweepOutcome:
    frameworks: list[FrameworkOutcome]
    summary: str  # Markdown table per framework
    report_dir: Path  # summary.md, trials.csv and plots
    parent_run_id: str


def run_sweep(sweep: SweepConfig, resume: bool = False, address: str | None = None) -> SweepOutcome:
    """Run (or resume) every framework's experiment of the sweep."""
    # A tracking server that goes away must cost seconds, not MLflow's default minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    paths = SweepPaths.of(sweep)
    if not resume and any(tune.Tuner.can_restore(paths.join(experiment_name(sweep, fw))) for fw in sweep.frameworks):
        raise GidError(f"sweep {sweep.name!r} already exists in {paths.root}; pass --resume to continue it or pick another name")
    # Bad input fails here, before MLflow or Ray see the sweep.
    bases = [sweep_base(sweep, framework) for framework in sweep.frameworks]
    check_writable(sweep.storage_path, "storage_path")
    for base in bases:
        check_run_inputs(base)
    tracking = sweep.tracking
    client, experiment_id = connect(tracking.tracking_uri, tracking.experiment, tracking.artifact_location)
    parent_run_id = parent_run(client, experiment_id, sweep.name, sweep.model_dump(mode="json", exclude={"space"}))
    ensure_ray(address)
    paths.local.mkdir(parents=True, exist_ok=True)
    outcomes = []
    for base in bases:
        trials_path = paths.join("trials", base.model.framework)
        logger = TrialLogger(client, experiment_id, parent_run_id, sweep.name, base, trials_path)
        outcomes.append(run_framework(sweep, base, paths, logger, resume))
    summary, report_dir = write_sweep_report(sweep, outcomes, paths.local)
    try:
        client.log_artifacts(parent_run_id, str(report_dir), "report")
        client.set_terminated(parent_run_id, status="FINISHED")
    except Exception as exc:  # noqa: BLE001 - the report is on disk either way
        print(f"MLflow unreachable ({str(exc).splitlines()[0]}); the report is in {report_dir}")
    return SweepOutcome(outcomes, summary, report_dir, parent_run_id)
