"""`gid sweep`: one Ray Tune experiment per framework, Optuna sampling, ASHA pruning, MLflow tracking.

Each framework gets its own experiment (and Optuna study) because its trials differ in what
they cost and what mAP they can reach: one TPE model across frameworks would spend its budget
learning the framework gap instead of the GID values that matter within each framework.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from gid.config import Config, DistillConfig
from gid.distill.teacher import ensure_teacher_val_ap
from gid.distill.terms import TERMS
from gid.engine.preflight import check_run_inputs, check_writable
from gid.engine.progress import epoch_line
from gid.engine.trainer import MODEL_FILE, ensure_ray, run_training
from gid.logs import open_log, quiet
from gid.models import read_checkpoint
from gid.errors import GidError, first_line
from search.config import SweepConfig
from search.finalize import FinalScore, candidates, final_points, final_scores, final_seeds
from search.leftovers import Leftovers
from search.report import trial_rows, write_sweep_report
from search.space import LOSSES, STUDENT_ALONE, to_optuna
from search.tracking import (
    MlflowTrialCallback,
    TrialLogger,
    connect,
    flatten,
    parent_run,
    record_invocation,
    runs_link,
    sync_results,
)
from search.trial import BASELINE, FINAL, run_trial, trains_in_trial, trial_config, trial_dirname

logger = logging.getLogger(__name__)


@dataclass
class FrameworkOutcome:
    framework: str
    base: Config
    results: tune.ResultGrid
    study: optuna.Study
    trials_path: str
    baseline: Path | None  # model file of the student trained alone: the sweep file's, or the one the sweep trained
    defaults: dict[str, Any] | None = None  # GID's defaults, when the sweep's first trial evaluated them
    final: list[FinalScore] = field(default_factory=list)  # the finalize stage's candidates, when it ran


def experiment_name(sweep: SweepConfig, framework: str) -> str:
    return f"{sweep.name}-{framework}"


def paper_defaults(space: dict[str, Any]) -> dict[str, Any]:
    """DistillConfig's default (the spec's, and ratios 1) for every space key its range contains: the first point evaluated."""
    defaults = flatten({"distill": DistillConfig(teacher="-").model_dump(mode="json")})
    defaults[LOSSES] = ",".join(TERMS)  # all three
    return {key: defaults[key] for key, dimension in space.items() if dimension.contains(defaults.get(key))}


def build_searcher(sweep: SweepConfig, space: dict[str, Any], framework: str, storage: str) -> OptunaSearch:
    objective = sweep.objective
    metrics, modes = [objective.metric], [objective.mode]
    if objective.second_metric:
        metrics.append(objective.second_metric)
        modes.append(objective.second_mode)
    choice = sweep.sampler
    if choice.type == "tpe":
        sampler = optuna.samplers.TPESampler(n_startup_trials=choice.startup_trials_for(sweep.trials), seed=choice.seed)
    else:
        sampler = optuna.samplers.RandomSampler(choice.seed)
    # OptunaSearch ignores TuneConfig's metric/mode: it must be told itself.
    return OptunaSearch(
        space=to_optuna(space),
        metric=metrics if len(metrics) > 1 else metrics[0],
        mode=modes if len(modes) > 1 else modes[0],
        points_to_evaluate=[paper_defaults(space)] if sweep.sampler.paper_defaults_first else None,
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
    """gid's line per epoch of each trial (Tune runs its callbacks on the driver)."""

    def __init__(self, label: str, epochs: int) -> None:
        self.label, self.epochs = label, epochs  # label: what names the trials' experiment, e.g. the framework

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any) -> None:
        logger.info(epoch_line(f"{self.label} {trial.trial_id}", result, self.epochs))


def tune_output(sweep: SweepConfig) -> dict[str, Any]:
    """RunConfig options for Tune's terminal output: its default, or in a quiet terminal (gid.logs) its trial
    table alone, once a minute (the classic reporter, which gid.logs has Tune pick)."""
    if not quiet():
        return {}
    metric = sweep.objective.metric
    reporter = tune.CLIReporter(
        metric_columns={"epoch": "epoch", "loss": "loss", metric: metric, "time_total_s": "time (s)"},
        # One value, to keep the table narrow: the summary and MLflow hold them all (an empty dict would mean all).
        parameter_columns={LOSSES: "losses"},
        max_column_length=len(",".join(TERMS)),
        max_report_frequency=60,  # its best-trial line takes TuneConfig's metric and mode
        print_intermediate_tables=True,  # at verbosity 1 the default is no table at all
    )
    return {"verbose": 1, "progress_reporter": reporter}


def sweep_base(sweep: SweepConfig, written: Config) -> Config:
    """A framework's base config as its trials run it: paths made absolute, the sweep's trial resources."""
    base = written.with_absolute_paths()
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

    root: str  # <storage_path>/<name>: Tune experiments (with the checkpoints of one-worker trials), Train runs
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

    def sweep_id(self, resume: bool) -> str:
        """The id that names this sweep in MLflow: recorded when it starts, read back on ``--resume``."""
        path = self.local / "sweep_id"
        if resume and path.exists():
            return path.read_text().strip()
        self.local.mkdir(parents=True, exist_ok=True)
        path.write_text(sweep_id := uuid.uuid4().hex[:16])
        return sweep_id


def train_baseline(base: Config, trials: TrialLogger) -> Path:
    """Train the student alone once (a later run of the sweep reuses it) and log it as the sweep's baseline:
    the base config with every GID loss off, on the trials' schedule and resources."""
    config = trial_config(base.to_dict(), STUDENT_ALONE, BASELINE, trials.trials_path)
    model_file = Path(config.run.storage_path) / BASELINE / MODEL_FILE
    if model_file.is_file():
        metrics = read_checkpoint(model_file)["metrics"]
    else:
        logger.info("%s: training the student alone, the baseline of the GID trials", base.model.framework)
        outcome = run_training(config)
        model_file, metrics = outcome.model_path, outcome.metrics
    trials.log_baseline(metrics, base.train.epochs)
    return model_file


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


def trial_trainable(base: Config, trials_path: str):
    return tune.with_resources(
        tune.with_parameters(run_trial, base=base.to_dict(), trials_path=trials_path), trial_resources(base)
    )


def trial_run_config(base: Config) -> dict[str, Any]:
    """RunConfig options for the trials' checkpoints and failures: Tune's for trials that train in their own
    process, Ray Train's (``run.*`` in each Train run) for the others."""
    if not trains_in_trial(base):
        return {"failure_config": tune.FailureConfig(max_failures=0)}
    return {
        "failure_config": tune.FailureConfig(max_failures=base.run.max_failures),
        "checkpoint_config": tune.CheckpointConfig(num_to_keep=base.run.checkpoints_to_keep),
    }


def restored_tuner(experiment_path: str, trainable, resume: bool) -> tune.Tuner | None:
    if resume and tune.Tuner.can_restore(experiment_path):
        return tune.Tuner.restore(experiment_path, trainable, resume_unfinished=True, resume_errored=False)
    return None


def fit(tuner: tune.Tuner) -> tune.ResultGrid:
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


def run_framework(
    sweep: SweepConfig, base: Config, space: dict[str, Any], paths: SweepPaths, trials: TrialLogger, resume: bool
) -> FrameworkOutcome:
    framework = base.model.framework
    baseline = sweep.frameworks[framework].baseline or train_baseline(base, trials)
    name = experiment_name(sweep, framework)
    trials_path = trials.trials_path
    trainable = trial_trainable(base, trials_path)
    experiment_path = paths.join(name)
    storage = paths.optuna_storage(sweep)
    ledger = paths.local / f"{name}.epochs.json"
    tuner = restored_tuner(experiment_path, trainable, resume)
    restored = tuner is not None
    if tuner is None:
        ledger.unlink(missing_ok=True)  # a new experiment starts its budget at 0
        budget = EpochBudget(sweep.budget_epochs, ledger) if sweep.budget_epochs else None
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=sweep.objective.metric,
                mode=sweep.objective.mode,
                search_alg=build_searcher(sweep, space, framework, storage),
                scheduler=build_scheduler(sweep, base.train.epochs),
                num_samples=sweep.trials,
                # Tune cannot see what the Train runs of multi-worker trials ask for: bound concurrency here.
                max_concurrent_trials=sweep.resources.max_concurrent_trials,
                trial_dirname_creator=trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=paths.root,
                callbacks=[
                    MlflowTrialCallback(
                        sweep.tracking.tracking_uri, sweep.tracking.experiment, trials.sweep, base,
                        trials.portable_base, trials_path,
                    ),
                    TrialEpochLines(framework, base.train.epochs),
                ],
                stop=budget,
                **trial_run_config(base),
                **tune_output(sweep),
            ),
        )
    if restored and sweep.budget_epochs and EpochBudget(sweep.budget_epochs, ledger).stop_all():
        results = tuner.get_results()  # spent before the interruption: Tune would still start a trial to stop it
    else:
        results = fit(tuner)
    sync_to_mlflow(trials, results)
    study = optuna.load_study(study_name=name, storage=storage)
    defaults = paper_defaults(space) if sweep.sampler.paper_defaults_first else None
    outcome = FrameworkOutcome(framework, base, results, study, trials_path, baseline, defaults)
    if sweep.finalize:
        outcome.final = run_finalize(sweep, outcome, paths, trials, resume)
    return outcome


def run_finalize(
    sweep: SweepConfig, outcome: FrameworkOutcome, paths: SweepPaths, trials: TrialLogger, resume: bool
) -> list[FinalScore]:
    """Re-train the framework's best configurations and the student alone over new seeds (search.finalize)."""
    finalize, objective = sweep.finalize, sweep.objective
    chosen = candidates(trial_rows(outcome, objective.metric), finalize.top, objective.mode)
    if not chosen:
        logger.warning("%s: no trial finished, nothing to finalize", outcome.framework)
        return []
    base = finalize.applied_to(outcome.base.to_dict(), outcome.framework)
    seeds = final_seeds(base, finalize.seeds)
    logger.info(
        "%s: finalizing %d configuration(s) and the student alone over seeds %s",
        outcome.framework, len(chosen) - 1, ", ".join(map(str, seeds)),
    )
    final = TrialLogger(
        trials.client, trials.experiment_id, trials.sweep, base,
        finalize.applied_to(trials.portable_base, outcome.framework).to_dict(),
        trials.trials_path, role=FINAL,
    )
    name = f"{experiment_name(sweep, outcome.framework)}-{FINAL}"
    trainable = trial_trainable(base, trials.trials_path)
    tuner = restored_tuner(paths.join(name), trainable, resume) or tune.Tuner(
        trainable,
        param_space={FINAL: tune.grid_search(final_points(chosen, seeds))},
        tune_config=tune.TuneConfig(
            metric=objective.metric, mode=objective.mode, max_concurrent_trials=sweep.resources.max_concurrent_trials,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=paths.root,
            callbacks=[
                MlflowTrialCallback(
                    sweep.tracking.tracking_uri, sweep.tracking.experiment, final.sweep, base, final.portable_base,
                    final.trials_path, role=FINAL,
                ),
                TrialEpochLines(f"{outcome.framework} {FINAL}", base.train.epochs),
            ],
            **trial_run_config(base),
            **tune_output(sweep),
        ),
    )
    results = fit(tuner)
    sync_to_mlflow(final, results)
    return final_scores(results, objective.metric, base.train.epochs)


@dataclass
class SweepOutcome:
    frameworks: list[FrameworkOutcome]
    summary: str  # Markdown table per framework
    report_dir: Path  # summary.md, trials.csv and plots
    parent_run_id: str
    runs_link: str  # the MLflow experiment's runs table, with the sweep's nested trials


def run_sweep(
    sweep: SweepConfig, resume: bool = False, address: str | None = None, overrides: list[str] | None = None
) -> SweepOutcome:
    """Run (or resume) every framework's experiment of the sweep; ``overrides`` are the ``--set`` values given."""
    # A tracking server that goes away must cost seconds, not MLflow's default minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    paths = SweepPaths.of(sweep)
    if not resume and any(tune.Tuner.can_restore(paths.join(experiment_name(sweep, fw))) for fw in sweep.frameworks):
        raise GidError(f"sweep {sweep.name!r} already exists in {paths.root}; pass --resume to continue it or pick another name")
    # Bad input fails here, before MLflow or Ray see the sweep.
    written = {framework: sweep.base_config(framework) for framework in sweep.frameworks}
    bases = {framework: sweep_base(sweep, config) for framework, config in written.items()}
    spaces = {framework: sweep.space_for(config) for framework, config in written.items()}
    check_writable(sweep.storage_path, "storage_path")
    for base in bases.values():
        check_run_inputs(base)
    open_log(paths.local)
    for base in bases.values():
        ensure_teacher_val_ap(base)  # once per sweep: its trials read it (gid.distill.teacher)
    tracking = sweep.tracking
    client, experiment_id = connect(tracking.tracking_uri, tracking.experiment, tracking.artifact_location)
    settings = sweep.model_dump(mode="json", exclude={"space"})
    logged_spaces = {fw: {key: d.model_dump(mode="json") for key, d in space.items()} for fw, space in spaces.items()}
    sweep_run = parent_run(client, experiment_id, sweep.name, paths.sweep_id(resume), paths.root, settings, logged_spaces)
    record_invocation(client, sweep_run, resume, overrides or [])
    ensure_ray(address)
    outcomes = []
    for framework, base in bases.items():
        trials_path = paths.join("trials", framework)
        trials = TrialLogger(client, experiment_id, sweep_run, base, written[framework].to_dict(), trials_path)
        outcomes.append(run_framework(sweep, base, spaces[framework], paths, trials, resume))
    summary, report_dir = write_sweep_report(sweep, outcomes, paths.local)
    try:
        client.log_artifacts(sweep_run.parent_run_id, str(report_dir), "report")
        client.set_tag(sweep_run.parent_run_id, MLFLOW_RUN_NOTE, summary)  # shown as the run's description
        client.set_terminated(sweep_run.parent_run_id, status="FINISHED")
    except Exception as exc:  # noqa: BLE001 - the report is on disk either way
        logger.warning("MLflow unreachable (%s); the report is in %s", first_line(exc), report_dir)
    return SweepOutcome(outcomes, summary, report_dir, sweep_run.parent_run_id, runs_link(client.tracking_uri, experiment_id))
