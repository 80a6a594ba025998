"""Faults on real Ray and a real MLflow server: nothing finished is lost, nothing is logged twice."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from ray.util.state import list_actors

from gid.engine.trainer import build_trainer
from gid.errors import GidError
from gid.models.checkpoint import atomic_save
from search.config import load_sweep
from search.leftovers import TUNE_TRIAL
from search.sweep import run_sweep
from search.tracking import STATUS_TAG, connect, parent_run, redact
from support import EpochLog, free_port, start_mlflow_server, write_base_configs, write_sweep


def test_a_killed_worker_restarts_from_its_last_checkpoint(ray_local, tiny_config, tmp_path):
    config = tiny_config("retinanet", train={"epochs": 3}, run={"name": "killed", "max_failures": 1})
    log = tmp_path / "epochs.txt"
    checkpoints = Path(config.run.storage_path) / "killed"

    def kill_a_worker_after_the_first_checkpoint():
        deadline = time.time() + 240
        while not list(checkpoints.glob("checkpoint_*")) and time.time() < deadline:
            time.sleep(0.5)
        (worker,) = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        os.kill(worker.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_a_worker_after_the_first_checkpoint)
    killer.start()
    result = build_trainer(config, callbacks=[EpochLog(log)]).fit()
    killer.join()
    epochs = [int(e) for e in log.read_text().split()]
    assert result.metrics["epoch"] == 3 and epochs[-1] == 3
    assert epochs.count(1) == 1  # the restart resumed after epoch 1 instead of starting over
    assert sorted(set(epochs)) == [1, 2, 3]


def test_a_killed_one_worker_trial_restarts_from_its_last_checkpoint(ray_local, synth_root, tmp_path):
    # A one-worker trial trains in its Tune trial's process: Tune restores it, Ray Train is not involved.
    write_base_configs(synth_root, tmp_path, ["retinanet"], epochs=3)
    base = tmp_path / "retinanet_gid.yaml"
    base.write_text(yaml.safe_dump({**yaml.safe_load(base.read_text()), "run": {"max_failures": 1}}))
    path = write_sweep(
        tmp_path, "restart", f"sqlite:///{tmp_path / 'mlflow.db'}", frameworks=["retinanet"], trials=1,
        scheduler={"type": "none"}, resources={"max_concurrent_trials": 1},
    )
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")

    def trial_runs() -> list:
        experiment = client.get_experiment_by_name("gid-test")
        return client.search_runs([experiment.experiment_id], "tags.`gid.role` = 'trial'") if experiment else []

    def kill_the_trial_once_its_first_epoch_is_logged():
        # logged: Tune has the epoch's result and checkpoint, so the restart can resume after it
        deadline = time.time() + 240
        while not any("epoch" in run.data.metrics for run in trial_runs()):
            assert time.time() < deadline
            time.sleep(0.5)
        (trial,) = list_actors(filters=[("class_name", "=", TUNE_TRIAL), ("state", "=", "ALIVE")])
        os.kill(trial.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_the_trial_once_its_first_epoch_is_logged)
    killer.start()
    outcome = run_sweep(load_sweep(path))
    killer.join()
    (framework,) = outcome.frameworks
    (result,) = framework.results
    assert result.error is None and result.metrics["epoch"] == 3
    assert result.metrics["iterations_since_restore"] < 3  # restored, then trained what was left
    (run,) = trial_runs()
    assert run.data.tags[STATUS_TAG] == "finished"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "epoch")] == [1, 2, 3]  # none trained twice
    # the run and the summary say that it restarted, and why
    trial_id = run.data.tags["gid.trial_id"]
    assert run.data.tags["gid.restarts"] == "1" and run.data.tags["gid.restart_reason"]
    assert f"- retinanet {trial_id}: 1× (" in outcome.summary


def sweep_file(synth_root: Path, root: Path, tracking_uri: str, **extra) -> Path:
    write_base_configs(synth_root, root, ["retinanet"])
    return write_sweep(
        root, "faults", tracking_uri, frameworks=["retinanet"], scheduler={"type": "none"},
        resources={"max_concurrent_trials": 1}, **extra,
    )


def test_mlflow_down_at_start_fails_before_any_compute(ray_local, synth_root, tmp_path):
    path = sweep_file(synth_root, tmp_path, f"http://127.0.0.1:{free_port()}")
    started = time.time()
    with pytest.raises(GidError, match="cannot reach the MLflow server"):
        run_sweep(load_sweep(path))
    assert time.time() - started < 30
    assert not (tmp_path / "sweeps").exists()


def test_mlflow_down_mid_sweep_is_filled_in_on_resume(ray_local, synth_root, tmp_path):
    db = tmp_path / "mlflow"
    server, uri = start_mlflow_server(db)
    path = sweep_file(synth_root, tmp_path, uri, trials=2)
    client = MlflowClient(uri)

    def stop_server_once_the_first_trial_starts():
        deadline = time.time() + 240
        while time.time() < deadline:
            experiment = client.get_experiment_by_name("gid-test")
            if experiment and client.search_runs([experiment.experiment_id], "tags.`gid.role` = 'trial'"):
                break
            time.sleep(1)
        server.terminate()
        server.wait()

    stopper = threading.Thread(target=stop_server_once_the_first_trial_starts)
    stopper.start()
    outcome = run_sweep(load_sweep(path))  # training goes on without MLflow
    stopper.join()
    assert len(outcome.frameworks[0].results) == 2 and not outcome.frameworks[0].results.errors

    server, uri = start_mlflow_server(db, port=int(uri.rsplit(":", 1)[1]))
    try:
        run_sweep(load_sweep(path), resume=True)
        experiment = client.get_experiment_by_name("gid-test")
        runs = client.search_runs([experiment.experiment_id], "tags.`gid.role` = 'trial'")
        assert len(runs) == 2 and len({r.data.tags["gid.trial_id"] for r in runs}) == 2
        for run in runs:
            assert run.data.tags[STATUS_TAG] == "finished"
            assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/ap")] == [1, 2]
    finally:
        server.terminate()
        server.wait()


def test_credentials_never_reach_mlflow(mlflow_server):
    assert redact("http://alice:s3cret@mlflow.internal:5000/x") == "http://***@mlflow.internal:5000/x"
    assert redact("postgresql://u:pw@db/mlflow?x=1") == "postgresql://***@db/mlflow?x=1"
    client, experiment_id = connect(mlflow_server, "gid-secrets")
    settings = {"tracking": {"tracking_uri": "https://bob:hunter2@tracking.example"}, "optuna_storage": "mysql://o:pw9@h/db"}
    run = parent_run(client, experiment_id, "secrets", "id0", "s3://k:pw7@bucket/sweeps", settings, {})
    params, tags = client.get_run(run.parent_run_id).data.params, client.get_run(run.parent_run_id).data.tags
    assert "pw7" not in str(tags)
    assert "hunter2" not in str(params) and "pw9" not in str(params)
    assert params["tracking.tracking_uri"] == "https://***@tracking.example"


def test_a_failed_save_leaves_the_previous_file_intact(tmp_path):
    path = tmp_path / "checkpoint.pt"
    atomic_save({"epoch": 1}, path)
    with pytest.raises(Exception):
        atomic_save({"epoch": 2, "unpicklable": lambda: None}, path)  # fails mid-write
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left
