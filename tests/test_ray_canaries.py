"""Canaries for the Ray 2.60 workarounds listed in docs/ray-workarounds.md.

Each test pins the Ray behaviour a workaround exists for. When one fails after a Ray upgrade, the
workaround it names has become unnecessary or wrong: re-check it against the page, then update both.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import optuna
import pytest
import ray
from ray import tune
from ray.tune.search.optuna import OptunaSearch


def test_tune_refuses_a_zero_cpu_trial_so_trials_ask_for_a_token_of_memory():
    # search/sweep.py: TRIAL_DRIVER_RESOURCES (a multi-worker trial's Train workers hold the CPUs).
    with pytest.raises(ValueError, match="empty head"):
        tune.with_resources(lambda config: None, {"CPU": 0})


def test_optuna_search_ignores_tune_configs_metric_when_given_a_space():
    # search/experiment.py: build_searcher passes metric and mode to OptunaSearch itself.
    searcher = OptunaSearch(space={"x": optuna.distributions.FloatDistribution(0, 1)})
    assert searcher.set_search_properties("val_ap", "max", {}) is False
    assert searcher.metric is None


def test_the_train_controller_and_tune_trial_actor_classes_are_still_named_so():
    # search/leftovers.py finds them by these class names; renamed, the cleanup would silently find nothing.
    from ray.train.v2._internal.execution.controller import TrainController
    from ray.tune.trainable.function_trainable import FunctionTrainable, wrap_function

    from search.leftovers import TRAIN_CONTROLLER, TUNE_TRIAL

    assert TrainController.__name__ == TRAIN_CONTROLLER
    wrapped = wrap_function(lambda config: None)
    assert issubclass(wrapped, FunctionTrainable) and wrapped.__name__ == TUNE_TRIAL


def test_the_public_state_api_still_names_no_owner_or_creator():
    # search/leftovers.py reads owners and creators from the GCS tables (ray._private.state) because
    # ray.util.state's records lack them; once they have them, switch to the public API.
    from ray.util.state.common import ActorState, PlacementGroupState

    assert "owner_address" not in {f.name for f in dataclasses.fields(ActorState)}
    assert "creator_actor_id" not in {f.name for f in dataclasses.fields(PlacementGroupState)}


@ray.remote(num_cpus=0)
class Probe:
    def ok(self) -> bool:
        return True


def test_the_gcs_tables_the_cleanup_reads_have_what_it_needs(ray_local):
    from search.leftovers import job_actors, live_placement_groups_created_by

    probe = Probe.remote()
    ray.get(probe.ok.remote())
    (info,) = job_actors("Probe").values()
    assert {"IPAddress", "Port"} <= set(info["Address"]) and {"IPAddress", "Port"} <= set(info["OwnerAddress"])
    assert info["State"] == "ALIVE" and info["Pid"] > 0
    assert live_placement_groups_created_by(set()) == []
    ray.kill(probe)


def test_train_v2_still_has_the_switches_gid_turns_off():
    # gid/engine/trainer.py: RAY_ENV_VARS turns off structured worker logging (it printed every worker
    # line twice on the driver) and the preemption watcher (an actor per run that gid's loop never asks).
    from ray.train.v2._internal.constants import (
        ENABLE_PREEMPTION_WATCHER_ENV_VAR,
        ENABLE_WORKER_STRUCTURED_LOGGING_ENV_VAR,
        ENV_VARS_TO_PROPAGATE,
    )

    from gid.engine.trainer import RAY_ENV_VARS

    assert set(RAY_ENV_VARS) == {ENABLE_WORKER_STRUCTURED_LOGGING_ENV_VAR, ENABLE_PREEMPTION_WATCHER_ENV_VAR}
    assert ENABLE_WORKER_STRUCTURED_LOGGING_ENV_VAR in ENV_VARS_TO_PROPAGATE  # to the workers, from the controller


def test_ray_trains_placement_group_cleaner_still_asks_the_state_api():
    # gid/engine/trainer.py: ensure_ray starts the dashboard, which serves that API.
    import inspect

    from ray.train.v2._internal.execution.controller import placement_group_cleaner

    assert "RayStateApiException" in inspect.getsource(placement_group_cleaner)


def test_the_developer_api_names_gid_imports_still_exist():
    from ray.tune.experiment import Trial
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback

    assert isinstance(CHECKPOINT_PATH_KEY, str) and callable(TuneReportCallback) and hasattr(Trial, "error_file")


def test_tunes_default_output_still_prints_tables_per_trial_and_the_classic_one_is_still_chosen_so(monkeypatch):
    # search/experiment.py::tune_output sets RAY_AIR_NEW_OUTPUT=0 in a quiet terminal and passes the classic CLIReporter.
    from ray.tune.experimental.output import AirVerbosity, TuneTerminalReporter, get_air_verbosity

    from search.experiment import TUNE_NEW_OUTPUT_ENV

    monkeypatch.delenv(TUNE_NEW_OUTPUT_ENV, raising=False)
    assert get_air_verbosity(1) == AirVerbosity.DEFAULT == TuneTerminalReporter._start_end_verbosity
    monkeypatch.setenv(TUNE_NEW_OUTPUT_ENV, "0")
    assert get_air_verbosity(1) is None  # the classic reporter, which takes progress_reporter


def test_a_driver_refused_for_its_token_fails_in_ray_init_as_gid_expects():
    # gid/engine/trainer.py::ensure_ray and gid/engine/ray_auth.py: token mode without a token fails before
    # connecting, with AuthenticationError (a subprocess: Ray reads the mode once per process; no Ray starts).
    import inspect
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    check = ("from ray._private.authentication.authentication_token_setup import ensure_token_if_auth_enabled\n"
             "from ray.exceptions import AuthenticationError\n"
             "try:\n    ensure_token_if_auth_enabled(None, create_token_if_missing=False)\n"
             "except AuthenticationError as e:\n    print('refused:', e.message)\n")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120,
                          env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": "/nonexistent/auth_token"})
    assert "refused: RAY_AUTH_TOKEN_PATH is set but file cannot be opened or is empty" in done.stdout, done.stderr
    # A refused connection is retried by Ray's GCS connect loop, which catches everything, before ray.init gives up
    # with a ConnectionError from it (the C++ client's warnings on stderr meanwhile: gid sends fd 2 to gid.log),
    # so check_token asks first; the private names it uses are still there.
    from ray._private import node, worker
    from ray._private.grpc_utils import init_grpc_channel
    from ray._private.ray_constants import KV_NAMESPACE_SESSION
    from ray._private.services import canonicalize_bootstrap_address
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    assert "except Exception" in inspect.getsource(node.Node._init_gcs_client)
    init = inspect.getsource(worker.init)
    assert "raise ConnectionError(" in init and "Failed to connect to Ray cluster at" in init
    assert callable(init_grpc_channel) and callable(canonicalize_bootstrap_address) and KV_NAMESPACE_SESSION
    assert {"key", "namespace"} <= set(gcs_service_pb2.InternalKVGetRequest.DESCRIPTOR.fields_by_name)
    assert hasattr(gcs_service_pb2_grpc.InternalKVGcsServiceStub, "__init__")


def test_importing_mlflow_pytorch_still_puts_a_handler_on_the_root_logger():
    # search/registry.py: mlflow_pytorch() imports it and takes the handler back off (mlflow/mlflow#20922).
    code = "import logging, mlflow.pytorch; print(len(logging.getLogger().handlers))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "1"


def test_a_sql_registry_still_resolves_a_models_uri_source_through_the_default_tracking_uri(tmp_path, monkeypatch):
    # search/registry.py registers a version from its logged model's artifact location, not `models:/<model id>`:
    # MLflow's SQL registry store looks that id up with `MlflowClient()`, the process's default store
    # (mlflow/mlflow#23367), not its own, so the id is "not found" (and ./mlflow.db is made).
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment_id = client.create_experiment("canary", artifact_location=str(tmp_path / "artifacts"))
    logged = client.create_logged_model(experiment_id, name="model")
    client.create_registered_model("canary")
    with pytest.raises(MlflowException, match="not found"):
        client.create_model_version("canary", f"models:/{logged.model_id}", model_id=logged.model_id)
    assert (tmp_path / "mlflow.db").exists()
