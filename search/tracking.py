"""MLflow tracking of sweeps: a parent run per sweep, a nested child run per trial.

Ray's MLflowLoggerCallback makes flat runs and, after ``Tuner.restore``, opens new runs while
leaving the old ones RUNNING. This callback finds its runs again by tags instead, so a resumed
sweep continues the same runs and MLflow never holds two runs for one trial.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY
from ray.tune import Callback
from ray.tune.experiment import Trial

from gid.config import Config
from gid.engine.loop import PICTURES_DIR
from gid.errors import GidError
from search.trial import trial_config

SWEEP_TAG, FRAMEWORK_TAG, TRIAL_TAG, ROLE_TAG = "gid.sweep", "gid.framework", "gid.trial_id", "gid.role"
# Tune's own bookkeeping in every result: not worth a chart each.
_TEXT_RESULTS = {"worker_nodes"}
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


def connect(tracking_uri: str | None, experiment: str, artifact_location: str | None = None) -> tuple[MlflowClient, str]:
    """A client and the experiment id; a clear error before any compute if MLflow is unreachable."""
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(experiment, artifact_location)
    except Exception as exc:  # noqa: BLE001 - any failure here means "cannot track"
        where = tracking_uri or "the default store"
        raise GidError(f"cannot reach MLflow at {where}: {str(exc).splitlines()[0]}") from None
    return client, experiment_id


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow's batch limit
        client.log_batch(run_id, params=items[start : start + 100])


def find_run(client: MlflowClient, experiment_id: str, tags: dict[str, str]) -> str | None:
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([experiment_id], filter_string=query, max_results=1)
    return runs[0].info.run_id if runs else None


def parent_run(client: MlflowClient, experiment_id: str, sweep: str, settings: dict[str, Any]) -> str:
    """The sweep's parent run, with the sweep file's ``settings`` as params: reused on resume."""
    tags = {SWEEP_TAG: sweep, ROLE_TAG: "sweep"}
    run_id = find_run(client, experiment_id, tags)
    if run_id is None:
        run_id = client.create_run(experiment_id, run_name=sweep, tags=tags).info.run_id
        log_params(client, run_id, flatten(settings))
    else:
        client.update_run(run_id, status="RUNNING")
    return run_id


class MlflowTrialCallback(Callback):
    """Logs each Tune trial as a child run of the sweep's parent run."""

    def __init__(
        self,
        tracking_uri: str | None,
        experiment: str,
        parent_run_id: str,
        sweep: str,
        base: Config,
        trials_path: str,
    ):
        self.tracking_uri, self.experiment, self.parent_run_id = tracking_uri, experiment, parent_run_id
        self.sweep, self.base, self.trials_path = sweep, base, trials_path
        self.framework, self.epochs = base.model.framework, base.train.epochs
        self._client: MlflowClient | None = None
        self._runs: dict[str, str] = {}  # trial id -> run id
        self._last_step: dict[str, int] = {}  # trial id -> last epoch logged (no duplicates on resume)

    # Tune pickles callbacks into its experiment state: keep only the settings.
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None, "_runs": {}, "_last_step": {}}

    def setup(self, **info: Any) -> None:
        self._client, self.experiment_id = connect(self.tracking_uri, self.experiment)

    def _run_for(self, trial: Trial) -> str:
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        client = self._client
        tags = {SWEEP_TAG: self.sweep, FRAMEWORK_TAG: self.framework, TRIAL_TAG: trial.trial_id, ROLE_TAG: "trial"}
        run_id = find_run(client, self.experiment_id, tags)
        if run_id is None:
            run = client.create_run(
                self.experiment_id,
                tags={**tags, MLFLOW_PARENT_RUN_ID: self.parent_run_id, MLFLOW_RUN_NAME: f"{self.framework}/{trial.trial_id}"},
            )
            run_id = run.info.run_id
            config = trial_config(self.base.to_dict(), trial.config, trial.trial_id, self.trials_path).to_dict()
            log_params(client, run_id, flatten(config))
            self._log_yaml(run_id, config, "config.yaml")
            self._last_step[trial.trial_id] = 0
        else:
            history = client.get_metric_history(run_id, "epoch")
            self._last_step[trial.trial_id] = int(max((m.value for m in history), default=0))
            client.update_run(run_id, status="RUNNING")
        self._runs[trial.trial_id] = run_id
        return run_id

    def _log_yaml(self, run_id: str, data: dict, name: str) -> None:
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / name
            path.write_text(yaml.safe_dump(data, sort_keys=False))
            self._client.log_artifact(run_id, str(path))

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._run_for(trial)

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any) -> None:
        run_id = self._run_for(trial)
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        if epoch <= self._last_step.get(trial.trial_id, 0):
            return  # already logged before the sweep was interrupted
        self._last_step[trial.trial_id] = epoch
        timestamp = int(result.get("timestamp", 0) * 1000)
        metrics = [
            Metric(key, float(value), timestamp, epoch)
            for key, value in result.items()
            if key not in _SKIPPED_METRICS and isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value)
        ]
        # Text results (e.g. worker_nodes: the Ray node ids of the trial's workers) become tags.
        tags = [RunTag(f"gid.{k}", v) for k, v in result.items() if k in _TEXT_RESULTS and isinstance(v, str)]
        self._client.log_batch(run_id, metrics=metrics, tags=tags)

    def _finish(self, trial: Trial, status: str, tags: dict[str, str]) -> None:
        run_id = self._run_for(trial)
        client = self._client
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        # The last checkpoint of a distillation holds its GI pictures (local or mounted storage).
        checkpoint = (trial.last_result or {}).get(CHECKPOINT_PATH_KEY)
        if checkpoint and (Path(checkpoint) / PICTURES_DIR).is_dir():
            client.log_artifacts(run_id, str(Path(checkpoint) / PICTURES_DIR), PICTURES_DIR)
        client.set_terminated(run_id, status=status)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        last_epoch = int((trial.last_result or {}).get("epoch", 0))
        pruned = last_epoch < self.epochs
        self._finish(trial, "FINISHED", {"status": "pruned" if pruned else "finished", "pruned": str(pruned).lower()})

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        reason = trial_error(trial)
        self._finish(trial, "FAILED", {"status": "failed", "pruned": "false", "error": reason[:5000]})


def trial_error(trial: Trial) -> str:
    """The last line of the trial's error (e.g. the NaN message), not Ray's whole traceback."""
    path = trial.error_file
    text = Path(path).read_text() if path and Path(path).exists() else str(getattr(trial, "error_msg", "") or "")
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"
