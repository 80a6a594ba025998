"""MLflow on PostgreSQL, as a team runs it (clusters/mlflow-server.sh with a postgresql:// backend store): a real
`mlflow server` over a real PostgreSQL on loopback (the ``postgres_mlflow_server`` fixture), written to by many
writers at once and by a sweep of concurrent trials. Every metric of every epoch arrives once, no run is
duplicated, and a resumed sweep adds nothing."""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from gid.engine.state import CHECKPOINT_FILE
from search.config import load_sweep
from search.metric_names import gid_name
from search.sweep import run_sweep
from search.trial import PERCENT_SUFFIX
from search.tracking import (
    _SKIPPED_METRICS,
    FRAMEWORK_TAG,
    INVOCATION_TAG,
    ROLE_TAG,
    STATUS_TAG,
    SWEEP_ID_TAG,
    SWEEP_TAG,
    TRIAL_TAG,
    connect,
    find_run,
    log_params,
    parent_run,
    tag_filter,
)
from support import free_port, mlflow_server_script, write_base_configs, write_sweep

def test_mlflow_server_sh_names_the_missing_postgres_driver_and_hides_the_password(tmp_path):
    shadow = tmp_path / "shadow"  # a psycopg that cannot be imported, as where the extra is not installed
    shadow.mkdir()
    (shadow / "psycopg.py").write_text('raise ImportError("not installed")\n')
    env = {
        "MLFLOW_HOME": str(tmp_path / "home"), "MLFLOW_PORT": str(free_port()), "PYTHON": sys.executable,
        "PYTHONPATH": str(shadow), "MLFLOW_BACKEND_STORE_URI": "postgresql+psycopg://gid:s3cret@127.0.0.1:9/mlflow",
    }
    for command in ("start", "run"):
        done = mlflow_server_script(command, env, timeout=120)
        assert done.returncode == 2 and not done.stdout, done.stdout + done.stderr
        (line,) = done.stderr.splitlines()
        assert "postgresql+psycopg://***@127.0.0.1:9/mlflow needs the psycopg driver" in line
        assert "pip install -c constraints.txt -e '.[postgres]'" in line and "s3cret" not in line
    assert not (tmp_path / "home" / "server.pid").exists()  # nothing was started


# --- many writers at once, no Ray --------------------------------------------------------------------

WRITERS = 8
STEPS = 20
INTERRUPTED_AT = 12  # the first pass stops here, as a killed sweep would, with its runs still open
METRICS = ("epoch", "loss", "val_ap", "val_ap50", "lr")
PARAMS = 150  # two of MLflow's 100-param batches


def value(writer: int, key: str, step: int) -> float:
    """What writer ``writer`` logs for ``key`` at ``step``: distinct everywhere, exact in binary floating point."""
    return float(step) if key == "epoch" else writer * 1000 + step + METRICS.index(key) / 8


def write_trial(uri: str, experiment_id: str, sweep, writer: int, steps: range, start: threading.Barrier, finish: bool) -> str:
    """One trial's writes, as gid's TrialLogger makes them: find the run by its tags or create it nested under the
    sweep's, then one batch of metrics per step not yet in MLflow (so a resumed writer adds no duplicates)."""
    client = MlflowClient(uri)
    tags = {SWEEP_ID_TAG: sweep.id, ROLE_TAG: "trial", TRIAL_TAG: f"w{writer:04d}"}
    start.wait(timeout=60)  # every writer starts at once
    run_id = find_run(client, experiment_id, tags)
    if run_id is None:
        run_tags = {**tags, SWEEP_TAG: sweep.name, MLFLOW_PARENT_RUN_ID: sweep.parent_run_id, MLFLOW_RUN_NAME: f"writer/{writer}"}
        run_id = client.create_run(experiment_id, tags=run_tags).info.run_id
        log_params(client, run_id, {f"param.{n}": n for n in range(PARAMS)})
    done = {int(m.step) for m in client.get_metric_history(run_id, "epoch")}
    for step in steps:
        if step not in done:
            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(key, value(writer, key, step), now, step) for key in METRICS])
    if finish:
        client.set_terminated(run_id, status="FINISHED")
    return run_id


def test_concurrent_writers_on_postgres_lose_no_metric_and_duplicate_no_run(postgres_mlflow_server):
    uri = postgres_mlflow_server
    client, experiment_id = connect(uri, "gid-postgres-writers")
    sweep = parent_run(client, experiment_id, "writers", "writers-0001", "/tmp/storage", {"trials": WRITERS}, {})

    def run_all(steps: range, finish: bool) -> list[str]:
        start = threading.Barrier(WRITERS)
        with ThreadPoolExecutor(WRITERS) as pool:
            jobs = [pool.submit(write_trial, uri, experiment_id, sweep, w, steps, start, finish) for w in range(WRITERS)]
            return [job.result(timeout=300) for job in jobs]

    first = run_all(range(1, INTERRUPTED_AT + 1), finish=False)  # interrupted: runs left open
    again = run_all(range(1, STEPS + 1), finish=True)  # resumed from the start: finds its run, adds what is missing
    assert again == first and len(set(first)) == WRITERS

    runs = client.search_runs([experiment_id], filter_string=tag_filter({SWEEP_ID_TAG: sweep.id, ROLE_TAG: "trial"}))
    assert len(runs) == WRITERS  # one run per writer: none created twice
    assert sorted(r.data.tags[TRIAL_TAG] for r in runs) == [f"w{w:04d}" for w in range(WRITERS)]
    assert len(client.search_runs([experiment_id])) == WRITERS + 1  # and the sweep's own run
    for run in runs:
        writer = int(run.data.tags[TRIAL_TAG][1:])
        assert run.info.status == "FINISHED" and run.data.tags[MLFLOW_PARENT_RUN_ID] == sweep.parent_run_id
        assert len(run.data.params) == PARAMS
        for key in METRICS:  # every step's value, each once, in order
            history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            assert history == [(step, value(writer, key, step)) for step in range(1, STEPS + 1)], (writer, key)
        assert run.data.metrics["val_ap"] == value(writer, "val_ap", STEPS)  # the latest value is the last step's


# --- a sweep of concurrent trials on a real Ray instance ---------------------------------------------

EPOCHS = 2
TRIALS = 3
NAME = "on-postgres"


@pytest.fixture(scope="module")
def workspace(synth_root, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep-postgres")
    write_base_configs(synth_root, root, ["fcos"], EPOCHS)
    return root


def reported(trial_folder: Path) -> dict[str, list[tuple[int, float]]]:
    """What a Tune trial reported (its result.json), as gid logs it to MLflow: metric -> [(epoch, value)]."""
    metrics: dict[str, list[tuple[int, float]]] = {}
    for line in (trial_folder / "result.json").read_text().splitlines():
        result = json.loads(line)
        for key, number in result.items():
            if (key not in _SKIPPED_METRICS and not key.endswith(PERCENT_SUFFIX)  # Tune's terminal's, not MLflow's
                    and isinstance(number, (int, float)) and not isinstance(number, bool) and math.isfinite(number)):
                epoch = int(result.get("epoch", result.get("training_iteration", 0)))
                metrics.setdefault(key, []).append((epoch, float(number)))
    return metrics


def logged(client: MlflowClient, run) -> dict[str, list[tuple[int, float]]]:
    """What MLflow holds of a trial, under gid's names (MLflow's keys have sections: val/ap)."""
    return {
        gid_name(key): sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        for key in run.data.metrics
    }


def checkpoint_files(folder: Path) -> list[tuple[str, int]]:
    """A trial's checkpoints, each with its model file's time: the same if nothing trained again."""
    return sorted((p.name, (p / CHECKPOINT_FILE).stat().st_mtime_ns) for p in folder.glob("checkpoint_*"))


def test_a_sweep_of_concurrent_trials_on_postgres_logs_every_epoch_once_and_resumes_without_duplicates(
    ray_local, workspace, postgres_mlflow_server
):
    uri = postgres_mlflow_server
    path = write_sweep(
        workspace, NAME, uri, frameworks=["fcos"], trials=TRIALS, scheduler={"type": "none"},
        resources={"workers_per_trial": 1, "cpus_per_worker": 1, "max_concurrent_trials": TRIALS},
    )
    (framework,) = run_sweep(load_sweep(path)).frameworks
    assert len(framework.results) == TRIALS and not framework.results.errors

    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name("gid-test").experiment_id
    (parent,) = client.search_runs([experiment_id], filter_string=tag_filter({SWEEP_TAG: NAME, ROLE_TAG: "sweep"}))
    trial_tags = {SWEEP_ID_TAG: parent.data.tags[SWEEP_ID_TAG], ROLE_TAG: "trial"}

    def trial_runs() -> list:
        return client.search_runs([experiment_id], filter_string=tag_filter(trial_tags))

    experiment_dir = workspace / "sweeps" / NAME / f"{NAME}-fcos"
    folders = {path.parent.name: path.parent for path in experiment_dir.glob("*/result.json")}
    runs = trial_runs()
    assert len(runs) == TRIALS and sorted(r.data.tags[TRIAL_TAG] for r in runs) == sorted(folders)  # one run per trial
    # the trials ran side by side: every trial's run was open before any was closed
    assert max(r.info.start_time for r in runs) < min(r.info.end_time for r in runs)
    histories = {}
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags[STATUS_TAG] == "finished"
        assert run.data.tags[MLFLOW_PARENT_RUN_ID] == parent.info.run_id
        history = logged(client, run)
        assert [step for step, _ in history["val_ap"]] == list(range(1, EPOCHS + 1))  # every epoch, once, no gap
        # every metric of every epoch the trial reported, with its value, and nothing else
        expected = reported(folders[run.data.tags[TRIAL_TAG]])
        assert history.keys() == expected.keys()
        for key, values in expected.items():
            assert [step for step, _ in history[key]] == [step for step, _ in values], key
            assert [v for _, v in history[key]] == pytest.approx([v for _, v in values]), key
        histories[run.info.run_id] = history
    checkpoints = {trial: checkpoint_files(folder) for trial, folder in folders.items()}
    assert all(len(files) == EPOCHS for files in checkpoints.values()), checkpoints

    # A trial that started just before a kill, after Tune last saved its state: its run is left open.
    unsaved = client.create_run(
        experiment_id, tags={**trial_tags, SWEEP_TAG: NAME, FRAMEWORK_TAG: "fcos", TRIAL_TAG: "lost0000"}
    ).info.run_id

    (again,) = run_sweep(load_sweep(path), resume=True).frameworks
    assert len(again.results) == TRIALS
    (parent,) = client.search_runs([experiment_id], filter_string=tag_filter({SWEEP_TAG: NAME, ROLE_TAG: "sweep"}))
    assert parent.data.tags[f"{INVOCATION_TAG}.1"].endswith(" resume")
    lost = client.get_run(unsaved)
    assert lost.info.status == "KILLED" and lost.data.tags[STATUS_TAG] == "lost"
    runs = [r for r in trial_runs() if r.info.run_id != unsaved]
    assert sorted(r.info.run_id for r in runs) == sorted(histories)  # the same runs, none added
    for run in runs:  # nothing logged twice, nothing trained again
        assert logged(client, run) == histories[run.info.run_id]
    assert {trial: checkpoint_files(folder) for trial, folder in folders.items()} == checkpoints
