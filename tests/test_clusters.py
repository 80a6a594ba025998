"""clusters/: the launcher configs and KubeRay manifests are valid, and a sweep runs on a real
two-node Ray cluster on this machine, logging to a real MLflow server, its trials spanning both nodes.

The two-node cluster is separate from the session's in-process Ray instance (``ray_local``): this
process starts its nodes without connecting to them, and the sweep's driver is a subprocess, as on
a real cluster where `gid sweep` connects to a running head.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.util import get_node_ip_address

from gid.config import validate
from gid.engine.state import CHECKPOINT_FILE
from gid.engine.trainer import build_trainer
from gid.models import build_detector, save_model
from search.config import SweepConfig
from search.sweep import sweep_base
from search.tracking import ROLE_TAG, STATUS_TAG, SWEEP_TAG, TRIAL_TAG
from support import SIZE, free_port, tiny_config_dict

REPO = Path(__file__).resolve().parents[1]
CLUSTERS = REPO / "clusters"
LAUNCHER_CONFIGS = {"aws": "s3://", "gcp": "gs://"}


def pinned(package: str) -> str:
    """The version constraints.txt pins ``package`` to: what every cluster must run."""
    for line in (REPO / "constraints.txt").read_text().splitlines():
        name, _, version = line.partition("==")
        if name.strip().lower() == package:
            return version.strip()
    raise AssertionError(f"constraints.txt does not pin {package}")


RAY_VERSION = pinned("ray")


# --- Ray cluster launcher configs -------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


@pytest.mark.parametrize("cloud", sorted(LAUNCHER_CONFIGS))
def test_launcher_config_is_valid_for_ray_and_complete(cloud, ray_schema):
    path = CLUSTERS / cloud / "cluster.yaml"
    text = path.read_text()
    config = yaml.safe_load(text)
    jsonschema.validate(config, ray_schema)  # the schema Ray ships with the cluster launcher
    validate_config(prepare_config(config))  # what `ray up` checks, after filling Ray's defaults

    assert config["provider"]["type"] == cloud
    assert config["docker"]["image"].startswith(f"rayproject/ray:{RAY_VERSION}-"), "the image must run the pinned Ray"
    # A CPU head, GPU worker types with one and eight GPUs, autoscaled from zero within bounds.
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert sorted(t["resources"]["GPU"] for t in workers.values()) == [1, 8]
    credentials = {"aws": "IamInstanceProfile", "gcp": "serviceAccounts"}[cloud]
    for worker in workers.values():
        assert worker["min_workers"] == 0 < worker["max_workers"] <= config["max_workers"]
        assert worker["resources"]["CPU"] >= 1
        assert credentials in worker["node_config"]  # GPU nodes write checkpoints to the bucket
    assert config["idle_timeout_minutes"] > 0

    # The checkout on every node, installed with the pinned versions; the inputs from the bucket.
    assert config["file_mounts"] == {"~/gid-search": "."}
    setup = config["setup_commands"]
    assert any(re.search(r"pip install .*-c constraints\.txt -e \.", command) for command in setup)
    assert any("bucket_copy.py" in command and "$GID_BUCKET/inputs" in command for command in setup)
    # One bucket prefix for storage and MLflow artifacts, given once, as the environment of every node.
    options = " ".join(config["docker"]["run_options"])
    bucket = re.search(r"-e GID_BUCKET=(\S+)", options).group(1)
    assert bucket.startswith(LAUNCHER_CONFIGS[cloud])
    assert "-e MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in options
    # MLflow on the head with a database and the bucket as artifact store; nothing on a public port.
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start
    assert "clusters/mlflow-server.sh restart" in start and 'MLFLOW_ARTIFACTS_DESTINATION="$GID_BUCKET/' in start
    assert "0.0.0.0" not in text


# --- KubeRay manifests -------------------------------------------------------------------------


def kuberay_documents() -> dict[str, list[dict]]:
    return {path.name: list(yaml.safe_load_all(path.read_text())) for path in sorted((CLUSTERS / "kuberay").glob("*.yaml"))}


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def test_kuberay_manifests_have_what_kuberay_needs():
    documents = kuberay_documents()
    assert set(documents) >= {"raycluster.yaml", "rayjob.yaml", "storage.yaml"}
    by_kind: dict[str, list[dict]] = {}
    for name, docs in documents.items():
        for doc in docs:
            assert doc["apiVersion"] and doc["metadata"]["name"], name
            by_kind.setdefault(doc["kind"], []).append(doc)
    claims = {doc["metadata"]["name"] for doc in by_kind["PersistentVolumeClaim"]}
    image_tag = None

    (cluster,) = by_kind["RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    assert spec["rayVersion"] == RAY_VERSION
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"  # reached with kubectl port-forward only
    head_containers = containers(head["template"])
    assert head_containers[0]["name"] == "ray-head"  # KubeRay expects Ray in the first container
    for container in head_containers:
        assert {"cpu", "memory"} <= set(container["resources"]["limits"]), container["name"]
        assert "nvidia.com/gpu" not in container["resources"]["limits"]
        image_tag = image_tag or container["image"]
        assert container["image"] == image_tag
    env = {item["name"]: item["value"] for item in head_containers[0]["env"]}
    assert env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000" and env["GID_STORAGE_PATH"]
    (mlflow,) = [c for c in head_containers if c["name"] == "mlflow"]  # MLflow beside Ray, in the head pod
    assert mlflow["command"][-2:] == ["/home/ray/gid-search/clusters/mlflow-server.sh", "run"]
    gpus = []
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and 0 == group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        (worker,) = containers(group["template"])
        limits = worker["resources"]["limits"]
        assert {"cpu", "memory", "nvidia.com/gpu"} <= set(limits) and worker["image"] == image_tag
        gpus.append(int(limits["nvidia.com/gpu"]))
    assert sorted(gpus) == [1, 8]
    for template in [head["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
        for volume in template["spec"]["volumes"]:
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
    text = (CLUSTERS / "kuberay" / "raycluster.yaml").read_text()
    assert "0.0.0.0" not in text

    (job,) = by_kind["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    entrypoint = job["spec"]["entrypoint"].split()
    assert entrypoint[:2] == ["bash", "/home/ray/gid-search/clusters/run-sweep.sh"]
    assert (REPO / entrypoint[2]).is_file()  # the sweep file is in the image
    env_vars = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert all(isinstance(value, str) for value in env_vars.values())
    assert float(env_vars["GID_GPUS_PER_WORKER"]) > 0

    dockerfile = (CLUSTERS / "kuberay" / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(RAY_VERSION)}-\S+$", dockerfile, re.M)
    assert "pip install --no-cache-dir -c constraints.txt -e ." in dockerfile


# --- resources and helpers ---------------------------------------------------------------------


@pytest.mark.parametrize("workers, gpus", [(4, 1), (1, 0.5), (1, 0.25), (4, 0)])  # fractions: one worker a trial
def test_trial_workers_ask_for_whole_or_fractional_gpus_as_configured(tmp_path, workers, gpus):
    base = {"model": {"framework": "retinanet", "num_classes": 7}, "distill": {"teacher": str(tmp_path / "teacher.pt")}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    sweep = SweepConfig.model_validate({
        "name": "resources",
        "frameworks": {"retinanet": {"config": str(tmp_path / "base.yaml")}},
        "resources": {"workers_per_trial": workers, "cpus_per_worker": 3, "gpus_per_worker": gpus},
    })
    scaling = build_trainer(sweep_base(sweep, sweep.base_config("retinanet"))).scaling_config
    assert scaling.num_workers == workers and scaling.use_gpu == (gpus > 0)
    expected = {"CPU": 3, "GPU": gpus} if gpus else {"CPU": 3}
    assert scaling.resources_per_worker == expected


def test_bucket_copy_copies_folders_and_a_live_sqlite_database(tmp_path):
    (tmp_path / "inputs/data/synth").mkdir(parents=True)
    (tmp_path / "inputs/data/synth/a.json").write_text("{}")
    (tmp_path / "checkout/data").mkdir(parents=True)
    (tmp_path / "checkout/data/kept.txt").write_text("kept")
    database = sqlite3.connect(tmp_path / "mlflow.db")
    database.execute("create table runs (id)")
    database.execute("insert into runs values ('r1')")
    database.commit()  # the connection stays open, like a running MLflow server's

    def bucket_copy(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(CLUSTERS / "bucket_copy.py"), *args], capture_output=True, text=True)

    assert bucket_copy(str(tmp_path / "inputs"), f"file://{tmp_path / 'checkout'}").returncode == 0
    assert (tmp_path / "checkout/data/synth/a.json").is_file() and (tmp_path / "checkout/data/kept.txt").is_file()
    assert bucket_copy(str(tmp_path / "mlflow.db"), str(tmp_path / "backup/mlflow/mlflow.db")).returncode == 0
    copied = sqlite3.connect(tmp_path / "backup/mlflow/mlflow.db")
    assert copied.execute("select id from runs").fetchall() == [("r1",)]
    copied.close()
    database.close()
    assert bucket_copy(str(tmp_path / "missing"), str(tmp_path / "x")).returncode == 1
    assert bucket_copy(str(tmp_path / "missing"), str(tmp_path / "x"), "--missing-ok").returncode == 0


def test_head_state_survives_a_new_head(tmp_path):
    """What only the head holds goes to the bucket before `ray down` and comes back on a new head."""

    def head_state(action: str, head: Path) -> None:
        env = {**os.environ, "GID_BUCKET": f"file://{tmp_path / 'bucket'}/gid", "MLFLOW_HOME": str(head / "mlflow"),
               "GID_WORKDIR": str(head / "gid-search"), "PYTHON": sys.executable}
        done = subprocess.run(["bash", str(CLUSTERS / "head-state.sh"), action], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr

    old, new = tmp_path / "old-head", tmp_path / "new-head"
    (old / "mlflow").mkdir(parents=True)
    database = sqlite3.connect(old / "mlflow/mlflow.db")
    database.execute("create table runs (id)")
    database.commit()
    database.close()
    (old / "gid-search/.gid-sweeps/s1").mkdir(parents=True)
    (old / "gid-search/.gid-sweeps/s1/optuna.db").write_bytes(b"study")
    head_state("restore", old)  # an empty bucket: nothing to restore, nothing lost
    head_state("backup", old)
    head_state("restore", new)
    assert (new / "mlflow/mlflow.db").is_file()
    assert (new / "gid-search/.gid-sweeps/s1/optuna.db").read_bytes() == b"study"


# --- a sweep on a real two-node cluster --------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_on_head(tmp_path_factory):
    """clusters/mlflow-server.sh as the launcher configs run it on the head: a real server on 127.0.0.1."""
    home = tmp_path_factory.mktemp("mlflow-head")
    env = {**os.environ, "MLFLOW_HOME": str(home), "MLFLOW_PORT": str(free_port()), "MLFLOW_WORKERS": "1",
           "PYTHON": sys.executable}
    script = str(CLUSTERS / "mlflow-server.sh")
    started = subprocess.run(["bash", script, "start"], env=env, capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr
    yield f"http://127.0.0.1:{env['MLFLOW_PORT']}"
    subprocess.run(["bash", script, "stop"], env=env, capture_output=True, timeout=60)


@contextlib.contextmanager
def ray_temp_dir(path: str):
    """Ray's temp folder (sessions, and the "current cluster" file a plain ray.init() connects to)."""
    previous = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = path
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = previous


@pytest.fixture(scope="module")
def two_nodes():
    """A head and a worker node, one CPU each, on this machine; the test process does not connect.

    The nodes keep their files in a temp folder of their own: a plain ray.init() elsewhere on the
    machine (this session's in-process instance, other test runs) must not find and join them.
    """
    from ray.cluster_utils import Cluster

    port = free_port()
    address = f"{get_node_ip_address()}:{port}"
    # Ray processes that look the cluster up themselves (e.g. Train's placement group cleaner) find it.
    node = {"num_cpus": 1, "object_store_memory": 300 * 1024**2, "env_vars": {"RAY_ADDRESS": address}}
    temp_dir = tempfile.mkdtemp(prefix="gid-ray-", dir="/tmp")  # short: Ray's socket paths must fit
    cluster = None
    try:
        with ray_temp_dir(temp_dir):
            cluster = Cluster(
                initialize_head=True, connect=False,
                head_node_args={**node, "gcs_server_port": port, "include_dashboard": True,
                                "dashboard_host": "127.0.0.1", "dashboard_port": free_port(),
                                "dashboard_agent_listen_port": free_port()},
            )
            cluster.add_node(**node)
            cluster.wait_for_nodes()
        assert cluster.address == address
        yield cluster
    finally:
        with ray_temp_dir(temp_dir):
            if cluster is not None:
                cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster_sweep(synth_root, tmp_path_factory) -> Path:
    """A tiny sweep file with no storage path or tracking URI: those come from the environment."""
    root = tmp_path_factory.mktemp("cluster-sweep")
    base = tiny_config_dict(synth_root, data={"batch_size": 8})
    teacher_config = validate(base)
    for role in ("teacher", "student"):  # an untrained student stands for the baseline
        save_model(build_detector(teacher_config.model, SIZE, 7), teacher_config, 7, root / f"{role}.pt")
    base["distill"] = {"teacher": str(root / "teacher.pt")}
    (root / "retinanet_gid.yaml").write_text(yaml.safe_dump(base))
    sweep = {
        "name": "two-nodes",
        "frameworks": {"retinanet": {"config": "retinanet_gid.yaml", "baseline": "student.pt"}},  # relative: to GID_WORKDIR
        "trials": 2,
        "scheduler": {"type": "none"},
        "sampler": {"type": "random", "seed": 0},
        "tracking": {"experiment": "gid-clusters"},
    }
    (root / "sweep.yaml").write_text(yaml.safe_dump(sweep, sort_keys=False))
    return root


def test_ray_job_submit_hands_the_sweep_its_environment(two_nodes, tmp_path):
    """The recipe of clusters/local/README.md: `ray job submit --runtime-env-json` reaches run-sweep.sh."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    runtime_env = {"env_vars": {"GID_STORAGE_PATH": str(tmp_path / "shared"), "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}}
    submitted = subprocess.run(
        ["ray", "job", "submit", "--address", f"http://{two_nodes.webui_url}", "--runtime-env-json", json.dumps(runtime_env),
         "--", "bash", "-c", 'echo "storage=$GID_STORAGE_PATH mlflow=$MLFLOW_TRACKING_URI"'],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert f"storage={tmp_path / 'shared'} mlflow=http://127.0.0.1:5000" in submitted.stdout


def test_a_sweep_runs_on_a_two_node_cluster_with_trials_spanning_both_nodes(two_nodes, mlflow_on_head, cluster_sweep, tmp_path):
    shared = tmp_path / "shared"  # stands in for the bucket: one path every node reaches
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
        "PYTHON": sys.executable,
        "GID_WORKDIR": str(cluster_sweep),
        "GID_STORAGE_PATH": str(shared),
        "MLFLOW_TRACKING_URI": mlflow_on_head,
        # Each node has one CPU: a trial's two DDP workers (0.75 CPU each) cannot share a node.
        "GID_WORKERS_PER_TRIAL": "2",
        "GID_CPUS_PER_WORKER": "0.75",
        "GID_MAX_CONCURRENT_TRIALS": "1",
    }
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "driver.log"
    with log.open("w") as out:
        driver = subprocess.run(
            ["bash", str(CLUSTERS / "run-sweep.sh"), "sweep.yaml", "--address", two_nodes.address],
            env=env, stdout=out, stderr=subprocess.STDOUT, timeout=420,
        )
    assert driver.returncode == 0, log.read_text()[-6000:]

    client = MlflowClient(mlflow_on_head)
    experiment = client.get_experiment_by_name("gid-clusters")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = 'two-nodes'")
    (parent,) = [r for r in runs if r.data.tags[ROLE_TAG] == "sweep"]
    trials = [r for r in runs if r.data.tags[ROLE_TAG] == "trial"]
    assert parent.info.status == "FINISHED" and parent.data.params["storage_path"] == str(shared)
    assert parent.data.params["resources.workers_per_trial"] == "2"
    assert len(trials) == 2
    nodes = {two_nodes.head_node.node_id, *(n.node_id for n in two_nodes.worker_nodes)}
    assert len(nodes) == 2
    for run in trials:
        assert run.info.status == "FINISHED" and run.data.tags[STATUS_TAG] == "finished"
        assert "val_ap" in run.data.metrics
        # Placement: the trial's workers ran on both nodes, and its MLflow run says which.
        assert set(run.data.tags["gid.worker_nodes"].split(",")) == nodes

    # Results and checkpoints are in the shared storage path.
    experiment_dir = shared / "two-nodes" / "two-nodes-retinanet"
    assert list(experiment_dir.glob("experiment_state-*.json")) and (experiment_dir / "tuner.pkl").is_file()
    assert sorted(path.parent.name for path in experiment_dir.glob("*/result.json")) == sorted(r.data.tags[TRIAL_TAG] for r in trials)
    for run in trials:
        train_run = shared / "two-nodes" / "trials" / "retinanet" / run.data.tags[TRIAL_TAG]
        checkpoints = [path for path in train_run.glob("checkpoint_*") if path.is_dir()]
        assert checkpoints and all((path / CHECKPOINT_FILE).is_file() for path in checkpoints)
    assert (shared / "two-nodes" / "report" / "summary.md").is_file()
