"""Shared fixtures: one small synthetic data set and one local Ray instance for the whole run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gid.config import Config, validate

# Two cores: keep intra-op threads to one per process so Ray workers don't oversubscribe.
torch.set_num_threads(1)


# Tests on a real Ray instance or MLflow server (seconds to minutes each); `pytest -m "not integration"`
# runs the rest in a few minutes (README: the measured time), CI runs everything.
INTEGRATION_FIXTURES = {"ray_local", "mlflow_server", "postgres_mlflow_server", "two_nodes", "mlflow_on_head"}


def pytest_collection_modifyitems(items):
    for item in items:
        if INTEGRATION_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    from gid.data import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("synth"), train=32, val=16, image_size=64, seed=0)


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray instance shared by every test that needs Ray."""
    import ray

    from gid.engine.trainer import RAY_ENV_VARS
    from support import free_port

    # Workers import helpers defined in test modules (e.g. Train callbacks) by module name.
    env_vars = {**RAY_ENV_VARS, "PYTHONPATH": str(Path(__file__).parent)}
    # A dashboard port of its own: Train needs the dashboard's state API, and another Ray on the
    # machine (a developer's, a demo) may hold the default port.
    ray.init(num_cpus=4, dashboard_port=free_port(), runtime_env={"env_vars": env_vars})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def batch(synth_root: Path):
    """Four unaugmented training images of the synthetic data and their targets."""
    from support import synth_batch

    return synth_batch(synth_root, 4)


@pytest.fixture
def tiny_config(synth_root: Path, tmp_path: Path):
    """Factory of configs small enough for a few CPU steps per test, their runs in ``tmp_path``."""
    from support import tiny_config_dict

    def make(framework: str = "retinanet", run: dict | None = None, **sections) -> Config:
        run = {"name": f"tiny_{framework}", "storage_path": str(tmp_path / "runs"), **(run or {})}
        return validate(tiny_config_dict(synth_root, framework, run=run, **sections))

    return make


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on loopback for the whole session; yields its tracking URI."""
    from support import start_mlflow_server

    process, uri = start_mlflow_server(tmp_path_factory.mktemp("mlflow"))
    yield uri
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="session")
def postgres_mlflow_server(tmp_path_factory):
    """A team's MLflow: clusters/mlflow-server.sh (two server processes, its default) on loopback, whose backend
    store is a real PostgreSQL, a throwaway cluster (`initdb`) on a free port of 127.0.0.1; both are stopped and
    the cluster deleted at the end. Yields the server's URI.

    Fails, never skips, where PostgreSQL is not installed: .ci/run installs it."""
    import sys

    from support import PostgresMissing, free_port, mlflow_server_script, start_postgres

    try:
        postgres, missing = start_postgres("mlflow"), None
    except PostgresMissing as exc:
        missing = str(exc)
    if missing:
        pytest.fail(missing, pytrace=False)
    port = free_port()
    env = {
        "MLFLOW_HOME": str(tmp_path_factory.mktemp("mlflow-postgres")), "MLFLOW_PORT": str(port),
        "MLFLOW_BACKEND_STORE_URI": postgres.url("mlflow"), "PYTHON": sys.executable,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # MLflow's job runner: gid starts no jobs
    }
    try:
        started = mlflow_server_script("start", env)
        assert started.returncode == 0, f"clusters/mlflow-server.sh start failed: {started.stdout}{started.stderr}"
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            mlflow_server_script("stop", env, timeout=120)
        finally:
            postgres.stop()
