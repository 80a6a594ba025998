"""MLflow tracking of sweeps: a parent run per sweep, a nested child run per trial.

Ray's MLflowLoggerCallback makes flat runs and, after ``Tuner.restore``, opens new runs while
leaving the old ones RUNNING. This callback finds its runs again by tags instead, so a resumed
sweep continues the same runs and MLflow never holds two runs for one trial.
"""

from __future__ import annotations

import logging
import math
import queue
import re
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from ray.tune import Callback, ResultGrid
from ray.tune.experiment import Trial

from gid.config import Config
from gid.engine.loop import PICTURES_DIR
from gid.errors import GidError, first_line
from search.metric_names import mlflow_key, mlflow_metrics
from search.names import quoted
from search.space import relevant, with_values
from search.system_metrics import SystemMetrics
from search.outcomes import FINISHED, LOST, FinalScore, trial_status
from search.trial import BASELINE, FINAL, PERCENT_SUFFIX, STUDENT, checkpoint_path, trial_config, trial_params

logger = logging.getLogger(__name__)

SWEEP_TAG, SWEEP_ID_TAG, STORAGE_TAG = "gid.sweep", "gid.sweep_id", "gid.storage"
FRAMEWORK_TAG, TRIAL_TAG, ROLE_TAG = "gid.framework", "gid.trial_id", "gid.role"
STATUS_TAG, ERROR_TAG = "gid.status", "gid.error"
# A trial that failed and restarted from its last checkpoint (run.max_failures): how often, and the last reason.
RESTARTS_TAG, RESTART_REASON_TAG = "gid.restarts", "gid.restart_reason"
# A trial's last checkpoint (its folder): the student it trained, which registering reads (search.registry).
CHECKPOINT_TAG = "gid.checkpoint"
# A finalize run: which configuration it re-trains (its label, the sweep trial it came from) and its seed.
CANDIDATE_TAG, SOURCE_TAG, SEED_TAG = "gid.candidate", "gid.source_trial", "gid.seed"
CANDIDATE_ROLE = "candidate"  # the run that groups one configuration's finalize runs (TrialLogger.group_candidates)
INVOCATION_TAG = "gid.invocation"  # gid.invocation.<n>: the n-th start or --resume of a sweep, with its --set values
# What a trial's MLflow run holds besides the config it ran: the user's base config with the trial's values,
# paths as the user wrote them and no sweep resources, which `gid export` writes out.
PORTABLE_CONFIG = "portable_config.yaml"
# MLflow 3's UI opens an experiment on its GenAI overview unless the experiment says it trains models.
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
# Text results of gid's training loop (the Ray node ids of a trial's workers): tags, not metrics.
_TEXT_RESULTS = {"worker_nodes"}
_CREDENTIALS = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
_SKIPPED_METRICS = {"training_iteration", "timestamp", "pid", "time_this_iter_s", "iterations_since_restore", "checkpoint_dir_name"}


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def check_reachable(tracking_uri: str) -> None:
    """Fail in seconds, not after MLflow's minutes of HTTP retries, when a tracking server is down."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=10):
            pass
    except (OSError, ValueError) as exc:
        raise GidError(f"cannot reach the MLflow server at {redact(tracking_uri)} ({exc}); start it or fix tracking.tracking_uri") from None


def connect(
    tracking_uri: str | None, experiment: str, artifact_location: str | None = None, create: bool = True
) -> tuple[MlflowClient, str]:
    """A client and the experiment id; a clear error before any compute if MLflow is unreachable.

    ``create``: make a missing experiment (a sweep); without it (``gid export`` only reads) a missing
    SQLite store or experiment is an error, rather than an empty store made where a wrong URI points.
    """
    tracking_uri = tracking_uri or mlflow.get_tracking_uri()  # $MLFLOW_TRACKING_URI, else MLflow's default
    if not create:  # before the client, which opens (and so creates) a SQLite store
        check_store_exists(tracking_uri)
    try:
        # The registry with the runs: left unset, MLflow takes the process's own URI ($MLFLOW_TRACKING_URI, else
        # ./mlflow.db), and a `--register` of another store's runs would write its model versions there.
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    except Exception as exc:  # noqa: BLE001 - an unknown scheme, a store MLflow refuses to open
        raise GidError(f"cannot use MLflow at {redact(tracking_uri)}: {first_line(exc)}") from None
    check_reachable(client.tracking_uri)
    try:
        found = client.get_experiment_by_name(experiment)
        if found is None and not create:
            raise GidError(f"no MLflow experiment {experiment!r} at {redact(client.tracking_uri)}; check --mlflow-experiment")
        experiment_id = found.experiment_id if found else client.create_experiment(experiment, artifact_location)
        if found is None or EXPERIMENT_KIND_TAG not in found.tags:
            client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    except GidError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure here means "cannot track"
        raise GidError(f"cannot use MLflow at {redact(client.tracking_uri)}: {first_line(exc)}") from None
    return client, experiment_id


def absolute(tracking_uri: str) -> str:
    """A SQLite store's URI with an absolute path: Ray starts a trial's process in another folder."""
    if tracking_uri.startswith("sqlite:///") and not tracking_uri.startswith("sqlite:////"):
        path, query = tracking_uri.removeprefix("sqlite:///").partition("?")[::2]
        if path and path != ":memory:":
            return f"sqlite:///{Path(path).resolve()}" + (f"?{query}" if query else "")
    return tracking_uri


def check_store_exists(tracking_uri: str) -> None:
    """A SQLite store that is not there (or in memory): opening it would make a new, empty one."""
    if not tracking_uri.startswith("sqlite:"):
        return
    path = tracking_uri.removeprefix("sqlite:///").partition("?")[0] if tracking_uri.startswith("sqlite:///") else ""
    if path in ("", ":memory:") or not Path(path).is_file():
        raise GidError(f"no MLflow store at {redact(tracking_uri)}; pass the sweep's tracking.tracking_uri as --tracking-uri")


def runs_link(tracking_uri: str, experiment_id: str) -> str:
    """Where a person sees an experiment's runs table: the server's, or ``mlflow ui``'s for a local store."""
    server = tracking_uri if tracking_uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{redact(server).rstrip('/')}/#/experiments/{experiment_id}/runs"


def redact(value: str) -> str:
    """Drop credentials from URLs (``scheme://user:secret@host`` -> ``scheme://***@host``)."""
    return _CREDENTIALS.sub(r"\1***@", value)


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    """Params as text, credentials in URLs redacted (nothing secret ever reaches MLflow)."""
    items = [Param(k, redact(str(v))[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow's batch limit
        client.log_batch(run_id, params=items[start : start + 100])


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float]) -> None:
    """Metrics of a run as a whole (step 0), e.g. the sweep's headline figures; a later call (a resume) updates them."""
    now = int(datetime.now(timezone.utc).timestamp() * 1000)
    client.log_batch(run_id, metrics=[Metric(key, float(value), now, 0) for key, value in metrics.items()])


def tag_filter(tags: dict[str, str]) -> str:
    return " and ".join(f"tags.`{key}` = {quoted(value)}" for key, value in tags.items())


def find_run(client: MlflowClient, experiment_id: str, tags: dict[str, str]) -> str | None:
    runs = client.search_runs([experiment_id], filter_string=tag_filter(tags), max_results=1)
    return runs[0].info.run_id if runs else None


@dataclass(frozen=True)
class SweepRun:
    """A sweep in MLflow: its name, the id recorded when it started (names may repeat), its parent run."""

    name: str
    id: str
    parent_run_id: str


def parent_run(
    client: MlflowClient, experiment_id: str, name: str, sweep_id: str, storage: str, settings: dict[str, Any],
    spaces: dict[str, dict[str, Any]],
) -> SweepRun:
    """The sweep's parent run (reused on resume): the sweep file's ``settings`` and each framework's search space
    (``spaces``) as params."""
    run_id = find_run(client, experiment_id, {SWEEP_ID_TAG: sweep_id, ROLE_TAG: "sweep"})
    if run_id is None:
        tags = {SWEEP_TAG: name, SWEEP_ID_TAG: sweep_id, ROLE_TAG: "sweep", STORAGE_TAG: redact(storage)}
        run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
        described = {f"space.{fw}.{key}": describe(d) for fw, space in spaces.items() for key, d in space.items()}
        log_params(client, run_id, {**flatten(settings), **described})
        log_yaml(client, run_id, spaces, "space.yaml")
    else:
        client.update_run(run_id, status="RUNNING")
    return SweepRun(name, sweep_id, run_id)


def describe(dimension: dict[str, Any]) -> str:
    """A search dimension in one short line, e.g. ``float 5e-05..0.05 log`` or ``choice [1000, 3000]``."""
    if dimension["type"] == "choice":
        return f"choice {dimension['values']}"
    return f"{dimension['type']} {dimension['low']}..{dimension['high']}{' log' if dimension.get('log') else ''}"


def record_invocation(client: MlflowClient, run: SweepRun, resume: bool, overrides: list[str]) -> None:
    """Tag the parent run with this start or resume and its ``--set`` values (params cannot change later)."""
    tags = client.get_run(run.parent_run_id).data.tags
    count = sum(key.startswith(f"{INVOCATION_TAG}.") for key in tags)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    words = [when, "resume" if resume else "start", *(f"--set {o}" for o in overrides)]
    client.set_tag(run.parent_run_id, f"{INVOCATION_TAG}.{count}", redact(" ".join(words)))


def log_yaml(client: MlflowClient, run_id: str, data: dict, name: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        client.log_artifact(run_id, str(path))


class TrialLogger:
    """Child runs of one framework's trials: created once, metrics by epoch, never duplicated.

    Every write is idempotent (runs are found by tags, epochs already in MLflow are skipped),
    so the live callback and a later :func:`sync_results` can both write the same trials.
    ``portable_base`` is the framework's base config as the user wrote it (see ``PORTABLE_CONFIG``);
    ``role`` is ``trial`` for the sweep's trials, ``final`` for the finalize stage's runs. The methods take
    a Tune trial's config, which :func:`~search.trial.trial_params` turns into config values.
    """

    def __init__(
        self, client: MlflowClient, experiment_id: str, sweep: SweepRun, base: Config, portable_base: dict[str, Any],
        trials_path: str, role: str = "trial",
    ):
        self.client, self.experiment_id, self.sweep = client, experiment_id, sweep
        self.base, self.portable_base, self.trials_path, self.role = base, portable_base, trials_path, role
        self.framework, self.epochs = base.model.framework, base.train.epochs
        self._runs: dict[str, str] = {}  # trial id -> run id
        self._last_step: dict[str, int] = {}  # trial id -> last epoch in MLflow

    def _tags(self, **more: str) -> dict[str, str]:
        return {SWEEP_ID_TAG: self.sweep.id, FRAMEWORK_TAG: self.framework, ROLE_TAG: self.role, **more}

    def system_metrics(self, interval_s: float) -> SystemMetrics | None:
        """Where a trial of these finds its run, to sample the system into (None: ``interval_s`` 0, off)."""
        return self._system_metrics(self._tags(), TRIAL_TAG, interval_s)

    def _system_metrics(self, tags: dict[str, str], trial_tag: str | None, interval_s: float) -> SystemMetrics | None:
        if not interval_s:
            return None
        return SystemMetrics(absolute(self.client.tracking_uri), self.experiment_id, tags, trial_tag, interval_s)

    def run_for(self, trial_id: str, trial: dict[str, Any]) -> str:
        if trial_id in self._runs:
            return self._runs[trial_id]
        run_id = find_run(self.client, self.experiment_id, self._tags(**{TRIAL_TAG: trial_id}))
        if run_id is None:
            name, final_tags = f"{self.framework}/{trial_id}", {}
            if final := trial.get(FINAL):
                name = f"{self.framework}/final {final['label']} seed {final['seed']}"
                final_tags = {CANDIDATE_TAG: final["label"], SOURCE_TAG: final["source"], SEED_TAG: str(final["seed"])}
            run_tags = {
                **self._tags(**{TRIAL_TAG: trial_id}), **final_tags, SWEEP_TAG: self.sweep.name,
                MLFLOW_PARENT_RUN_ID: self.sweep.parent_run_id, MLFLOW_RUN_NAME: name,
            }
            run_id = self.client.create_run(self.experiment_id, tags=run_tags).info.run_id
            params = trial_params(trial)
            config = trial_config(self.base.to_dict(), params, trial_id, self.trials_path).to_dict()
            log_params(self.client, run_id, relevant(flatten(config)))
            log_yaml(self.client, run_id, config, "config.yaml")
            portable = Config.model_validate(with_values(self.portable_base, params)).to_dict()
            log_yaml(self.client, run_id, portable, PORTABLE_CONFIG)
            self._last_step[trial_id] = 0
        else:
            history = self.client.get_metric_history(run_id, "epoch")
            self._last_step[trial_id] = int(max((m.value for m in history), default=0))
        self._runs[trial_id] = run_id
        return run_id

    def log_result(self, trial_id: str, trial: dict[str, Any], result: dict[str, Any]) -> None:
        run_id = self.run_for(trial_id, trial)
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        if epoch <= self._last_step.get(trial_id, 0):
            return  # already in MLflow (e.g. logged before the sweep was interrupted)
        timestamp = int(result.get("timestamp", 0) * 1000)
        metrics = [
            Metric(mlflow_key(key), float(value), timestamp, epoch)
            for key, value in result.items()
            if key not in _SKIPPED_METRICS and not key.startswith("config/") and not key.endswith(PERCENT_SUFFIX)
            and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ]
        tags = [RunTag(f"gid.{k}", v) for k, v in result.items() if k in _TEXT_RESULTS and isinstance(v, str)]
        self.client.log_batch(run_id, metrics=metrics, tags=tags)
        self._last_step[trial_id] = epoch

    def finish(
        self, trial_id: str, trial: dict[str, Any], last_result: dict[str, Any], checkpoint: str | None, error: str | None
    ) -> None:
        """Tag the trial's status (finished, pruned or failed, with its reason) and its last checkpoint, and
        close its run."""
        run_id = self.run_for(trial_id, trial)
        status = trial_status(error is not None, int(last_result.get("epoch", 0)), self.epochs)
        tags = [RunTag(STATUS_TAG, status)] + ([RunTag(ERROR_TAG, error[:5000])] if error is not None else [])
        if checkpoint:
            tags.append(RunTag(CHECKPOINT_TAG, redact(checkpoint)))
        self.client.log_batch(run_id, tags=tags)
        # The last checkpoint of a distillation holds its GI pictures (local or mounted storage).
        if checkpoint and (Path(checkpoint) / PICTURES_DIR).is_dir():
            self.client.log_artifacts(run_id, str(Path(checkpoint) / PICTURES_DIR), PICTURES_DIR)
        self.client.set_terminated(run_id, status="FAILED" if error is not None else "FINISHED")

    def log_restart(self, trial_id: str, trial: dict[str, Any], count: int, reason: str) -> None:
        run_id = self.run_for(trial_id, trial)
        self.client.log_batch(run_id, tags=[RunTag(RESTARTS_TAG, str(count)), RunTag(RESTART_REASON_TAG, reason[:5000])])

    def restarts(self) -> dict[str, tuple[int, str]]:
        """Trials that failed and restarted from their last checkpoint: trial id -> (how often, the last reason)."""
        runs = self.client.search_runs([self.experiment_id], filter_string=tag_filter(self._tags()), max_results=10_000)
        return {
            run.data.tags[TRIAL_TAG]: (int(run.data.tags[RESTARTS_TAG]), run.data.tags.get(RESTART_REASON_TAG, ""))
            for run in runs
            if RESTARTS_TAG in run.data.tags and TRIAL_TAG in run.data.tags
        }

    def group_candidates(self, scores: list[FinalScore], metric: str) -> None:
        """The finalize stage's runs grouped by configuration: a run per candidate, nested in the sweep's, with its
        objective's mean and spread over the seeds as metrics (``<metric>_mean``, ``_std``, ``seeds``), and the
        candidate's seed runs nested in it, so MLflow's UI shows a configuration's seeds under one row.
        Idempotent: a resume updates the same runs."""
        for score in scores:
            tags = {**self._tags(), ROLE_TAG: CANDIDATE_ROLE, CANDIDATE_TAG: score.label}
            run_id = find_run(self.client, self.experiment_id, tags)
            if run_id is None:
                name = "student alone" if score.label == STUDENT else f"#{score.label}"
                run_tags = {**tags, SOURCE_TAG: score.source, SWEEP_TAG: self.sweep.name,
                            MLFLOW_PARENT_RUN_ID: self.sweep.parent_run_id,
                            MLFLOW_RUN_NAME: f"{self.framework}/final {name} over seeds"}
                run_id = self.client.create_run(self.experiment_id, tags=run_tags).info.run_id
            log_metrics(self.client, run_id, mlflow_metrics(
                {f"{metric}_mean": score.mean, f"{metric}_std": score.std, "seeds": len(score.scores)}
            ))
            seeds = self.client.search_runs(
                [self.experiment_id], filter_string=tag_filter({**self._tags(), CANDIDATE_TAG: score.label}), max_results=1000
            )
            for run in seeds:
                self.client.set_tag(run.info.run_id, MLFLOW_PARENT_RUN_ID, run_id)
            self.client.set_terminated(run_id, status="FINISHED")

    def _baseline_tags(self) -> dict[str, str]:
        return {SWEEP_ID_TAG: self.sweep.id, FRAMEWORK_TAG: self.framework, ROLE_TAG: BASELINE}

    def _baseline_run(self) -> str:
        """The run of the student trained alone on the trials' schedule: a child run of its own, not a GID trial."""
        tags = self._baseline_tags()
        run_id = find_run(self.client, self.experiment_id, tags)
        if run_id is None:
            run_tags = {**tags, SWEEP_TAG: self.sweep.name, MLFLOW_PARENT_RUN_ID: self.sweep.parent_run_id,
                        MLFLOW_RUN_NAME: f"{self.framework}/{BASELINE}"}
            run_id = self.client.create_run(self.experiment_id, tags=run_tags).info.run_id
        return run_id

    @contextmanager
    def baseline_training(self, interval_s: float) -> Iterator[SystemMetrics | None]:
        """Around the baseline's training: its run made first, so that the training can sample the system into it
        (the spec yielded; None with ``interval_s`` 0), and marked failed if the training fails (a resume finishes
        it)."""
        run_id = self._baseline_run()
        # running again after a failed try: MLflow's monitor samples a running run only
        self.client.update_run(run_id, status="RUNNING")
        try:
            yield self._system_metrics(self._baseline_tags(), None, interval_s)
        except BaseException:
            self.client.set_terminated(run_id, status="FAILED")
            raise

    def log_baseline(self, metrics: dict[str, Any], epochs: int) -> None:
        """The baseline's val metrics at its last epoch, and its run finished."""
        run_id = self._baseline_run()
        if self.client.get_run(run_id).data.tags.get(STATUS_TAG) == FINISHED:
            return  # logged before the sweep was interrupted
        values = [
            Metric(mlflow_key(k), float(v), 0, epochs) for k, v in metrics.items() if k.startswith("val_") and math.isfinite(v)
        ]
        self.client.log_batch(run_id, metrics=values, tags=[RunTag(STATUS_TAG, FINISHED)])
        self.client.set_terminated(run_id, status="FINISHED")

    def close_lost(self) -> None:
        """Mark lost the trial runs still open once every trial of the experiment is written: trials started
        just before the driver died that the experiment state Tune had saved does not hold. A resumed
        experiment runs new trials in their place."""
        query = f"{tag_filter(self._tags())} and attributes.status = 'RUNNING'"
        for run in self.client.search_runs([self.experiment_id], filter_string=query, max_results=10_000):
            self.client.set_tag(run.info.run_id, STATUS_TAG, LOST)
            self.client.set_terminated(run.info.run_id, status="KILLED")


class MlflowTrialCallback(Callback):
    """Logs each Tune trial as a child run of the sweep's parent run, live.

    Writes happen in order on a background thread: Tune's loop never waits for MLflow (a slow
    or vanished server must not stall the trials). If MLflow becomes unreachable, training goes
    on, the results stay in Ray's storage and :func:`sync_results` (run at the end of every
    sweep and on ``--resume``) fills MLflow in.
    """

    def __init__(
        self, tracking_uri: str | None, experiment: str, sweep: SweepRun, base: Config, portable_base: dict[str, Any],
        trials_path: str, role: str = "trial",
    ):
        self.settings = (tracking_uri, experiment, sweep, base, portable_base, trials_path, role)
        self._writes: queue.Queue | None = None

    # Tune pickles callbacks into its experiment state: keep only the settings.
    def __getstate__(self) -> dict[str, Any]:
        return {"settings": self.settings, "_writes": None}

    def setup(self, **info: Any) -> None:
        tracking_uri, experiment, *logger_settings = self.settings
        client, experiment_id = connect(tracking_uri, experiment)
        trials = TrialLogger(client, experiment_id, *logger_settings)
        self._writes = queue.Queue()
        self._writer = threading.Thread(target=self._write_all, args=(trials,), name="mlflow-writer", daemon=True)
        self._writer.start()

    def _write_all(self, trials: TrialLogger) -> None:
        offline = False
        while (item := self._writes.get()) is not None:
            if offline:
                continue  # sync_results catches up from Ray's storage later
            method, args = item
            try:
                getattr(trials, method)(*args)
            except Exception as exc:  # noqa: BLE001 - tracking must never stop training
                logger.warning("MLflow unreachable (%s); training goes on, MLflow is filled in at the end or with --resume", first_line(exc))
                offline = True

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._writes.put(("run_for", (trial.trial_id, dict(trial.config))))

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any) -> None:
        self._writes.put(("log_result", (trial.trial_id, dict(trial.config), dict(result))))

    def on_trial_recover(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        # Tune restarts it from its last checkpoint (run.max_failures): a lost node, a killed process.
        self._writes.put(("log_restart", (trial.trial_id, dict(trial.config), trial.num_failures, trial_error(trial))))

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._finish(trial, None)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._finish(trial, trial_error(trial))

    def _finish(self, trial: Trial, error: str | None) -> None:
        last = dict(trial.last_result or {})
        self._writes.put(("finish", (trial.trial_id, dict(trial.config), last, checkpoint_path(last, trial.checkpoint), error)))

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        self._writes.put(None)
        self._writer.join(timeout=300)


def sync_results(trials: TrialLogger, results: ResultGrid) -> None:
    """Write every trial of a finished experiment from Ray's storage to MLflow (idempotent)."""
    for result in results:
        history = result.metrics_dataframe
        rows = history.to_dict("records") if history is not None else []
        last = result.metrics or (rows[-1] if rows else {})
        trial_id = last.get("trial_id") or Path(result.path).name
        for row in rows:
            trials.log_result(trial_id, result.config or {}, row)
        error = None if result.error is None else error_reason(str(result.error))
        trials.finish(trial_id, result.config or {}, last, checkpoint_path(last, result.checkpoint), error)
    trials.close_lost()


def trial_error(trial: Trial) -> str:
    """The reason the trial failed (e.g. the NaN message), not Ray's whole traceback."""
    path = trial.error_file
    text = Path(path).read_text() if path and Path(path).exists() else str(getattr(trial, "error_msg", "") or "")
    return error_reason(text)


def error_reason(text: str) -> str:
    """The last line of a trial's error; for gid's own errors just the message, as `gid` prints it."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1].removeprefix(f"{GidError.__module__}.{GidError.__name__}: ") if lines else "unknown error"
