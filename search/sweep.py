"""`gid sweep`: one Ray Tune experiment per framework, Optuna sampling, ASHA pruning, MLflow tracking.

Each framework gets its own experiment (and Optuna study) because its trials differ in what
they cost and what mAP they can reach: one TPE model across frameworks would spend its budget
learning the framework gap instead of the GID values that matter within each framework.
"""

from __future__ import annotations

import logging
import os
import shlex
from functools import partial
from pathlib import Path
from typing import Any

import optuna
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE
from ray import tune

from gid.config import Config
from gid.distill.teacher import ensure_teacher_val_ap
from gid.engine.preflight import check_run_inputs, check_writable
from gid.engine.trainer import MODEL_FILE, ensure_ray, run_training
from gid.errors import GidError, first_line
from gid.logs import open_log
from gid.models import read_checkpoint
from search.config import SweepConfig
from search.export import ExportedConfig, export_best
from search.experiment import EpochBudget, build_scheduler, build_searcher, default_point, run_experiment
from search.finalize import candidates, final_points, final_scores, final_seeds
from search.outcomes import FinalScore, FrameworkOutcome, SweepOutcome
from search.report import headline_metrics, trial_rows, write_sweep_report
from search.space import STUDENT_ALONE
from search.storage import SweepPaths
from search.system_metrics import monitored
from search.tracking import TrialLogger, connect, log_metrics, parent_run, record_invocation, redact, runs_link
from search.trial import BASELINE, FINAL, trains_in_trial, trial_config

logger = logging.getLogger(__name__)


def experiment_name(sweep: SweepConfig, framework: str) -> str:
    return f"{sweep.name}-{framework}"


def sweep_base(sweep: SweepConfig, written: Config) -> Config:
    """A framework's base config as its trials run it: paths made absolute, the sweep's trial resources, mAP every
    epoch and the student's cost timed as the objective says."""
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
    # the scheduler needs mAP every epoch
    train = base.train.model_copy(update={"eval_every": 1, "latency_runs": sweep.objective.latency_runs})
    return base.model_copy(update={"scaling": scaling, "train": train})


def trials_path(paths: SweepPaths, base: Config, experiment: str) -> str:
    """Where an experiment's trials keep their files, as their logged configs say: a one-worker trial's are
    in Tune's experiment folder (``<experiment>/<trial id>``), a multi-worker trial's Train run in
    ``trials/<framework>/<trial id>``."""
    return paths.join(experiment) if trains_in_trial(base) else paths.join("trials", base.model.framework)


def train_baseline(base: Config, paths: SweepPaths, trials: TrialLogger, system_metrics_interval_s: float) -> Path:
    """Train the student alone once (a later run of the sweep reuses it) and log it as the sweep's baseline:
    the base config with every GID loss off, on the trials' schedule and resources, as a Train run of its own
    whose workers sample the system into its MLflow run, as a trial's do."""
    config = trial_config(base.to_dict(), STUDENT_ALONE, BASELINE, paths.join("trials", base.model.framework))
    model_file = Path(config.run.storage_path) / BASELINE / MODEL_FILE
    if model_file.is_file():
        metrics = read_checkpoint(model_file)["metrics"]
    else:
        logger.info("%s: training the student alone, the baseline of the GID trials", base.model.framework)
        with trials.baseline_training(system_metrics_interval_s) as system_metrics:
            outcome = run_training(config, around=partial(monitored, system_metrics, BASELINE))
        model_file, metrics = outcome.model_path, outcome.metrics
    trials.log_baseline(metrics, base.train.epochs)
    return model_file


def run_framework(
    sweep: SweepConfig, base: Config, space: dict[str, Any], paths: SweepPaths, trials: TrialLogger, resume: bool
) -> FrameworkOutcome:
    framework = base.model.framework
    baseline = sweep.frameworks[framework].baseline or train_baseline(
        base, paths, trials, sweep.tracking.system_metrics_interval_s
    )
    name = experiment_name(sweep, framework)
    storage = paths.optuna_storage(sweep)
    budget = EpochBudget(sweep.budget_epochs, paths.local / f"{name}.epochs.json") if sweep.budget_epochs else None
    results = run_experiment(
        sweep, paths, trials, name, framework, resume,
        search=lambda: {
            "search_alg": build_searcher(sweep, space, name, storage),
            "scheduler": build_scheduler(sweep, base.train.epochs),
            "num_samples": sweep.trials,
        },
        budget=budget,
    )
    study = optuna.load_study(study_name=name, storage=storage)
    defaults = default_point(space) if sweep.sampler.paper_defaults_first else None
    outcome = FrameworkOutcome(framework, base, results, study, baseline, defaults, restarts=restarted(trials))
    if sweep.finalize:
        outcome.final = run_finalize(sweep, outcome, paths, trials, resume)
    return outcome


def restarted(trials: TrialLogger) -> dict[str, tuple[int, str]]:
    """The trials that restarted from a checkpoint, as MLflow recorded them (none known while it is unreachable)."""
    try:
        return trials.restarts()
    except Exception as exc:  # noqa: BLE001 - the summary goes without them
        logger.warning("MLflow unreachable (%s): the summary cannot say which trials restarted", first_line(exc))
        return {}


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
    name = f"{experiment_name(sweep, outcome.framework)}-{FINAL}"
    final = TrialLogger(
        trials.client, trials.experiment_id, trials.sweep, base,
        finalize.applied_to(trials.portable_base, outcome.framework).to_dict(),
        trials_path(paths, base, name), role=FINAL,
    )
    results = run_experiment(
        sweep, paths, final, name, f"{outcome.framework} {FINAL}", resume,
        param_space={FINAL: tune.grid_search(final_points(chosen, seeds))},
    )
    scores = final_scores(results, objective.metric, base.train.epochs)
    try:
        final.group_candidates(scores, objective.metric)
    except Exception as exc:  # noqa: BLE001 - the summary holds the same figures
        logger.warning("MLflow unreachable (%s); a --resume groups the finalize runs by configuration", first_line(exc))
    return scores


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
    # Ray before the sweep's run: a cluster that refuses this client (its token) leaves no run in MLflow.
    ensure_ray(address)
    settings = sweep.model_dump(mode="json", exclude={"space"})
    logged_spaces = {fw: {key: d.model_dump(mode="json") for key, d in space.items()} for fw, space in spaces.items()}
    sweep_run = parent_run(client, experiment_id, sweep.name, paths.sweep_id(resume), paths.root, settings, logged_spaces)
    record_invocation(client, sweep_run, resume, overrides or [])
    outcomes = []
    for framework, base in bases.items():
        where = trials_path(paths, base, experiment_name(sweep, framework))
        trials = TrialLogger(client, experiment_id, sweep_run, base, written[framework].to_dict(), where)
        outcomes.append(run_framework(sweep, base, spaces[framework], paths, trials, resume))
    summary, report_dir = write_sweep_report(sweep, outcomes, paths.local)
    try:
        client.log_artifacts(sweep_run.parent_run_id, str(report_dir), "report")
        log_metrics(client, sweep_run.parent_run_id, headline_metrics(sweep, outcomes))
        client.set_tag(sweep_run.parent_run_id, MLFLOW_RUN_NOTE, summary)  # shown as the run's description
        client.set_terminated(sweep_run.parent_run_id, status="FINISHED")
    except Exception as exc:  # noqa: BLE001 - the report is on disk either way
        logger.warning("MLflow unreachable (%s); the report is in %s", first_line(exc), report_dir)
    exported = register_winners(sweep, paths, sweep_run.id) if tracking.registered_model else []
    return SweepOutcome(
        outcomes, summary, report_dir, sweep_run.parent_run_id, runs_link(client.tracking_uri, experiment_id), exported
    )


def register_winners(sweep: SweepConfig, paths: SweepPaths, sweep_id: str) -> list[ExportedConfig]:
    """``tracking.registered_model``: what `gid export --register` does, at the end of the sweep: each framework's
    winner exported to ``<sweep folder>/export`` and the student it trained registered. A failure leaves the
    sweep's results as they are, with the command that registers them later."""
    tracking, out, metric = sweep.tracking, paths.local / "export", sweep.objective.metric
    try:
        return export_best(
            out, tracking_uri=tracking.tracking_uri, experiment=tracking.experiment, sweep=sweep_id, metric=metric,
            register=tracking.registered_model,
        )
    except Exception as exc:  # noqa: BLE001 - the sweep's results are in MLflow either way
        where = f" --tracking-uri {shlex.quote(redact(tracking.tracking_uri))}" if tracking.tracking_uri else ""
        logger.warning(
            "registering the winners failed (%s); register them later: gid export --sweep %s --metric %s --register %s "
            "--mlflow-experiment %s%s --out %s",
            first_line(exc), sweep_id, metric, tracking.registered_model, shlex.quote(tracking.experiment), where,
            shlex.quote(str(out)),
        )
        return []
