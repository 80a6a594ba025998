"""clusters/: the launcher configs and KubeRay manifests are valid and turn Ray's token authentication on,
and a sweep runs on a real two-node Ray cluster on this machine that demands a token, logging to a real
MLflow server, its trials spanning both nodes; clients without the token are refused in one line.

The two-node cluster is separate from the session's in-process Ray instance (``ray_local``): a process
of its own keeps its nodes (tests/loopback_cluster.py), and the sweep's driver is a subprocess, as on
a real cluster where `gid sweep` connects to a running head.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jsonschema
import pytest
import ray
import torch
import yaml
from mlflow.tracking import MlflowClient
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.util import get_node_ip_address

from gid import logs
from gid.config import validate
from gid.engine.state import CHECKPOINT_FILE
from gid.engine.trainer import build_trainer, driver_env_vars
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

    # The checkout on every node, installed with the pinned versions; the inputs from the bucket; the
    # cluster's token from the user's machine (test_launcher_configs_run_every_node_with_token_authentication).
    assert config["file_mounts"] == {"~/gid-search": ".", "~/.ray/auth_token": "~/.ray/auth_token"}
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


# --- token authentication in every recipe ------------------------------------------------------

AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
TOKEN_ON = "RAY_AUTH_MODE=token"


@pytest.mark.parametrize("cloud", sorted(LAUNCHER_CONFIGS))
def test_launcher_configs_run_every_node_with_token_authentication(cloud):
    config = yaml.safe_load((CLUSTERS / cloud / "cluster.yaml").read_text())
    # Every process of every node's container: Ray, the sweep's driver, `ray exec` commands.
    assert f"-e {TOKEN_ON}" in config["docker"]["run_options"]
    # And each `ray start` says so itself, the head's and the workers'.
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        starts = [c for c in commands if "ray start" in c]
        assert starts and all(f"{TOKEN_ON} ray start" in " ".join(c.split()) for c in starts), starts
    # The token comes from the user's machine to Ray's default path on every node, never from the checkout.
    local = config["file_mounts"]["~/.ray/auth_token"]
    assert local.startswith(("~/", "/")) and not Path(local).expanduser().resolve().is_relative_to(REPO)


def test_the_kuberay_cluster_turns_token_authentication_on_and_holds_no_token():
    documents = kuberay_documents()
    (cluster,) = [d for d in documents["raycluster.yaml"] if d["kind"] == "RayCluster"]
    assert cluster["spec"]["authOptions"] == {"mode": "token"}  # the operator makes the token and hands it out
    templates = [cluster["spec"]["headGroupSpec"]["template"]] + [g["template"] for g in cluster["spec"]["workerGroupSpecs"]]
    for template in templates:
        for container in template["spec"]["containers"]:
            for item in container.get("env", []):
                assert item["name"] != "RAY_AUTH_TOKEN" or "value" not in item, container["name"]  # a Secret, never a literal
    (job,) = [d for d in documents["rayjob.yaml"] if d["kind"] == "RayJob"]
    assert not set(yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]) & set(AUTH_ENV)
    # authOptions needs KubeRay 1.5.1: the walk-through says so, and how to check.
    readme = (CLUSTERS / "kuberay" / "README.md").read_text()
    assert "1.5.1" in readme and "kubectl get secret gid" in readme


def markdown_commands(text: str) -> list[list[str]]:
    """The shell lines of a Markdown page, a list per fenced block or inline code span."""
    blocks = [block.splitlines() for block in re.findall(r"^```(?:bash|sh)?\n(.*?)^```", text, re.S | re.M)]
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return blocks + [[span] for span in re.findall(r"`([^`\n]+)`", prose)]


def test_every_ray_start_in_the_walk_throughs_runs_with_token_authentication():
    starts = 0
    for page in sorted(CLUSTERS.rglob("*.md")):
        for block in markdown_commands(page.read_text()):
            exported = False
            for line in block:
                exported = exported or line.strip().startswith(f"export {TOKEN_ON}")
                if re.search(r"\bray start --", line):  # a command, not `ray start` named in a sentence
                    starts += 1
                    assert exported or f"{TOKEN_ON} ray start" in line, f"{page.relative_to(REPO)}: {line}"
    assert starts >= 3  # clusters/local: the head, a worker, a second node on one machine


def test_run_sweep_turns_token_authentication_on_and_never_shows_the_token(tmp_path):
    """The client side: the driver runs with RAY_AUTH_MODE=token and the token where it was, and the script,
    even traced with `bash -x`, never prints it."""
    token = secrets.token_hex(32)
    seen = tmp_path / "seen"
    fake_python = tmp_path / "python"  # stands in for the interpreter run-sweep.sh starts `gid sweep` with
    fake_python.write_text(
        "#!/bin/sh\n"
        f'{{ echo "mode=$RAY_AUTH_MODE"; [ "$RAY_AUTH_TOKEN" = "$EXPECTED" ] && echo "token kept"; echo "args=$*"; }} > {seen}\n'
    )
    fake_python.chmod(0o755)

    def run_sweep(**env: str) -> subprocess.CompletedProcess:
        base = {k: v for k, v in os.environ.items() if k not in AUTH_ENV and not k.startswith("GID_")}
        return subprocess.run(
            ["bash", "-x", str(CLUSTERS / "run-sweep.sh"), "sweep.yaml", "--address", "10.0.0.5:6379"],
            env={**base, "PYTHON": str(fake_python), "GID_WORKDIR": str(tmp_path), "EXPECTED": token, **env},
            capture_output=True, text=True, timeout=60,
        )

    done = run_sweep(RAY_AUTH_TOKEN=token)
    assert done.returncode == 0, done.stderr
    args = "args=-m gid.cli sweep sweep.yaml --address auto --address 10.0.0.5:6379"
    assert seen.read_text().splitlines() == ["mode=token", "token kept", args]
    assert token not in done.stdout + done.stderr  # the trace included
    assert "Ray auth token" in done.stdout
    # A cluster started without token authentication: the user says so, the script leaves it.
    assert run_sweep(RAY_AUTH_MODE="disabled").returncode == 0
    assert seen.read_text().splitlines()[0] == "mode=disabled"


def test_no_token_is_committed():
    # Token files stay out of the repository (and out of what the launcher configs sync, which skips what .gitignore lists).
    ignored = (REPO / ".gitignore").read_text().splitlines()
    assert "auth_token" in ignored and "*.token" in ignored
    texts = {path: path.read_text(errors="replace") for path in sorted(CLUSTERS.rglob("*")) if path.is_file()}
    texts.update({path: path.read_text() for path in (REPO / "README.md", *(REPO / "docs" / n for n in ("ray-workarounds.md", "reliability.md")))})
    for path, text in texts.items():
        name = path.relative_to(REPO)
        assert not re.search(r"\b[0-9a-f]{64}\b", text), f"{name}: a 64-hex-digit string, what Ray's tokens look like"
        assert not re.search(r"RAY_AUTH_TOKEN=(?![\"']?\$)\S", text), f"{name}: RAY_AUTH_TOKEN set to a literal"
        assert not re.search(r"auth_token=(?![\"']?\$|/dev/stdin)\S", text), f"{name}: a token given on a command line"
    # This machine's own token, if it has one, is in no file of the project.
    source = os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token"
    with contextlib.suppress(OSError):
        mine = Path(source).read_text().strip()
        if len(mine) >= 16:
            shipped = [p for folder in ("clusters", "gid", "search", "tests", "docs", "configs") for p in (REPO / folder).rglob("*")]
            leaked = [str(p) for p in shipped if p.is_file() and mine.encode() in p.read_bytes()]
            assert not leaked, f"this machine's Ray token is in {leaked}"


# --- gid's side: a client the cluster refuses ---------------------------------------------------

def token_file(path: Path, token: str | None = None) -> tuple[Path, str]:
    token = token or secrets.token_hex(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(token + "\n")
    return path, token


# A client with a token the cluster refuses, or none: on the real loopback cluster, below
# (test_a_client_without_the_clusters_token_is_refused_in_one_line).
@pytest.mark.parametrize("token_path", ["missing", "unset"])
def test_token_mode_without_a_token_is_one_line_naming_where_ray_looked_before_any_connection(tiny_config, tmp_path, token_path):
    env = {k: v for k, v in os.environ.items() if k not in AUTH_ENV + ("RAY_ADDRESS",)}
    env.update(HOME=str(tmp_path / "home"), RAY_AUTH_MODE="token")
    missing = tmp_path / "nowhere" / "auth_token"
    if token_path == "missing":
        env["RAY_AUTH_TOKEN_PATH"] = str(missing)
    config = tiny_config()
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    # A process of its own, as a user's gid is: in this one a test before may have started Ray already.
    done = subprocess.run(
        [sys.executable, "-m", "gid.cli", "train", str(path), "--address", f"127.0.0.1:{free_port()}"],  # nothing there
        env=env, capture_output=True, text=True, timeout=120,
    )
    where = (f"RAY_AUTH_TOKEN_PATH={missing} is missing or empty" if token_path == "missing"
             else f"no RAY_AUTH_TOKEN, no RAY_AUTH_TOKEN_PATH and no {tmp_path / 'home' / '.ray' / 'auth_token'}")
    assert done.returncode == 2 and "Traceback" not in done.stdout + done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"gid: error: RAY_AUTH_MODE=token but this client has no Ray token ({where})")


def test_gid_hands_rays_workers_no_token(monkeypatch):
    token = secrets.token_hex(32)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/somewhere/auth_token")
    env_vars = driver_env_vars()  # the runtime_env of every job gid starts or joins
    assert not set(env_vars) & set(AUTH_ENV) and token not in json.dumps(env_vars)


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


@dataclass(frozen=True)
class MlflowOnHead:
    uri: str
    home: Path  # its database, artifacts and log


@pytest.fixture(scope="module")
def mlflow_on_head(tmp_path_factory):
    """clusters/mlflow-server.sh as the launcher configs run it on the head: a real server on 127.0.0.1."""
    home = tmp_path_factory.mktemp("mlflow-head")
    env = {**os.environ, "MLFLOW_HOME": str(home), "MLFLOW_PORT": str(free_port()), "MLFLOW_WORKERS": "1",
           "PYTHON": sys.executable}
    script = str(CLUSTERS / "mlflow-server.sh")
    started = subprocess.run(["bash", script, "start"], env=env, capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr
    yield MlflowOnHead(f"http://127.0.0.1:{env['MLFLOW_PORT']}", home)
    subprocess.run(["bash", script, "stop"], env=env, capture_output=True, timeout=60)


@dataclass(frozen=True)
class LoopbackCluster:
    address: str  # the GCS: host:port
    dashboard: str  # host:port of the dashboard, which serves the Jobs API
    node_ids: list[str]  # the head's first
    token_path: Path  # the cluster's token, where a node's ~/.ray/auth_token would be
    token: str
    keeper: subprocess.Popen  # tests/loopback_cluster.py, which takes commands on its stdin
    ready: Path  # where the keeper writes the cluster's state after each command

    def command(self, line: str) -> list[str]:
        """Have the keeper carry out ``line`` (``lose-worker``, ``add-worker``); the node ids after it, the head's first."""
        done = json.loads(self.ready.read_text())["commands"]
        self.keeper.stdin.write(f"{line}\n".encode())
        self.keeper.stdin.flush()
        deadline = time.monotonic() + 120
        while (state := json.loads(self.ready.read_text()))["commands"] == done:
            assert self.keeper.poll() is None and time.monotonic() < deadline, f"the cluster did not {line}"
            time.sleep(0.2)
        return state["node_ids"]


def write_token(path: Path) -> str:
    """A token as `ray get-auth-token --generate` makes one (ray._private.authentication), in a file only its owner reads."""
    token = secrets.token_hex(32)
    path.write_text(token)
    path.chmod(0o600)
    return token


def client_env(**more: str) -> dict[str, str]:
    """This process's environment with nothing of Ray's token authentication or cluster address, plus ``more``:
    a client starts from nothing it did not choose (this session's in-process Ray sets RAY_AUTH_MODE here)."""
    env = {k: v for k, v in os.environ.items() if k not in AUTH_ENV and k != "RAY_ADDRESS"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return {**env, **more}


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """A head and a worker node, one CPU each, on this machine, which demand a token as every recipe's do
    (RAY_AUTH_MODE=token, the token in a file); the test process does not connect.

    tests/loopback_cluster.py keeps the nodes, in a process whose environment holds the token: Ray reads it
    once per process, and this one keeps the session's in-process Ray. The nodes keep their files in a
    temp folder of their own: a plain ray.init() elsewhere on the machine (this session's in-process
    instance, other test runs) must not find and join them.
    """
    token_path = tmp_path_factory.mktemp("cluster-token") / "auth_token"
    token = write_token(token_path)
    port = free_port()
    settings = {"address": f"{get_node_ip_address()}:{port}", "port": port, "dashboard_port": free_port(), "agent_port": free_port()}
    temp_dir = Path(tempfile.mkdtemp(prefix="gid-ray-", dir="/tmp"))  # short: Ray's socket paths must fit
    ready, log_path = temp_dir / "ready.json", temp_dir / "cluster.log"
    env = client_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path), RAY_TMPDIR=str(temp_dir))
    with log_path.open("w") as log:
        keeper = subprocess.Popen(
            [sys.executable, str(Path(__file__).parent / "loopback_cluster.py"), json.dumps(settings), str(ready)],
            stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, env=env,
        )
    try:
        deadline = time.monotonic() + 180
        while not ready.exists():
            if keeper.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the two-node cluster did not start:\n{log_path.read_text()[-6000:]}")
            time.sleep(0.5)
        started = json.loads(ready.read_text())
        yield LoopbackCluster(started["address"], started["dashboard"], started["node_ids"], token_path, token, keeper, ready)
    finally:
        with contextlib.suppress(OSError):
            keeper.stdin.close()  # the keeper shuts the cluster down
        try:
            keeper.wait(timeout=120)
        except subprocess.TimeoutExpired:
            keeper.kill()  # its nodes' reaper ends the Ray processes it started
            keeper.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def assert_token_nowhere(token: str, *places: Path | str) -> None:
    """Neither ``token`` nor any file under the ``places`` (files or folders) holds the token."""
    needle = token.encode()
    for place in places:
        if isinstance(place, str):
            assert token not in place, "the token is in the output"
            continue
        files = [place] if place.is_file() else [p for p in place.rglob("*") if p.is_file()]
        leaked = [str(path) for path in files if needle in path.read_bytes()]
        assert not leaked, f"the token is in {leaked}"


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
        "tracking": {"experiment": "gid-clusters", "system_metrics_interval_s": 1},
    }
    (root / "sweep.yaml").write_text(yaml.safe_dump(sweep, sort_keys=False))
    return root


def test_ray_job_submit_hands_the_sweep_its_environment(two_nodes, tmp_path):
    """The recipe of clusters/local/README.md: `ray job submit --runtime-env-json` reaches run-sweep.sh, from a
    shell with the token; without it the cluster takes no job."""
    runtime_env = {"env_vars": {"GID_STORAGE_PATH": str(tmp_path / "shared"), "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}}
    command = ["ray", "job", "submit", "--address", f"http://{two_nodes.dashboard}", "--runtime-env-json", json.dumps(runtime_env),
               "--", "bash", "-c", 'echo "storage=$GID_STORAGE_PATH mlflow=$MLFLOW_TRACKING_URI"']
    with_token = client_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(two_nodes.token_path))
    submitted = subprocess.run(command, env=with_token, capture_output=True, text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert f"storage={tmp_path / 'shared'} mlflow=http://127.0.0.1:5000" in submitted.stdout
    assert_token_nowhere(two_nodes.token, submitted.stdout + submitted.stderr)

    anyone = subprocess.run(command, env=client_env(), capture_output=True, text=True, timeout=120)
    assert anyone.returncode != 0 and "storage=" not in anyone.stdout  # the Jobs API answered 401


def test_a_sweep_runs_on_a_two_node_cluster_with_trials_spanning_both_nodes(two_nodes, mlflow_on_head, cluster_sweep, tmp_path):
    shared = tmp_path / "shared"  # stands in for the bucket: one path every node reaches
    env = client_env(
        PYTHONPATH=str(REPO),
        PYTHON=sys.executable,
        GID_WORKDIR=str(cluster_sweep),
        GID_STORAGE_PATH=str(shared),
        MLFLOW_TRACKING_URI=mlflow_on_head.uri,
        # Each node has one CPU: a trial's two DDP workers (0.75 CPU each) cannot share a node.
        GID_WORKERS_PER_TRIAL="2",
        GID_CPUS_PER_WORKER="0.75",
        GID_MAX_CONCURRENT_TRIALS="1",
        # The client's token, where the cluster's is; run-sweep.sh turns RAY_AUTH_MODE=token on itself.
        RAY_AUTH_TOKEN_PATH=str(two_nodes.token_path),
    )
    log = tmp_path / "driver.log"
    with log.open("w") as out:
        driver = subprocess.run(
            ["bash", str(CLUSTERS / "run-sweep.sh"), "sweep.yaml", "--address", two_nodes.address],
            env=env, stdout=out, stderr=subprocess.STDOUT, timeout=420,
        )
    assert driver.returncode == 0, log.read_text()[-6000:]

    client = MlflowClient(mlflow_on_head.uri)
    experiment = client.get_experiment_by_name("gid-clusters")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = 'two-nodes'")
    (parent,) = [r for r in runs if r.data.tags[ROLE_TAG] == "sweep"]
    trials = [r for r in runs if r.data.tags[ROLE_TAG] == "trial"]
    assert parent.info.status == "FINISHED" and parent.data.params["storage_path"] == str(shared)
    assert parent.data.params["resources.workers_per_trial"] == "2"
    assert len(trials) == 2
    nodes = set(two_nodes.node_ids)
    assert len(nodes) == 2
    for run in trials:
        assert run.info.status == "FINISHED" and run.data.tags[STATUS_TAG] == "finished"
        assert "eval/ap" in run.data.metrics
        # Placement: the trial's workers ran on both nodes, and its MLflow run says which.
        assert set(run.data.tags["gid.worker_nodes"].split(",")) == nodes
        # each worker sampled its node's system into the trial's run: rank 0 as a one-worker trial, rank 1 by name
        assert {"system/cpu_utilization_percentage", "system/rank1/cpu_utilization_percentage"} <= set(run.data.metrics)

    # Results and checkpoints are in the shared storage path.
    experiment_dir = shared / "two-nodes" / "two-nodes-retinanet"
    assert list(experiment_dir.glob("experiment_state-*.json")) and (experiment_dir / "tuner.pkl").is_file()
    assert sorted(path.parent.name for path in experiment_dir.glob("*/result.json")) == sorted(r.data.tags[TRIAL_TAG] for r in trials)
    for run in trials:
        train_run = shared / "two-nodes" / "trials" / "retinanet" / run.data.tags[TRIAL_TAG]
        checkpoints = [path for path in train_run.glob("checkpoint_*") if path.is_dir()]
        assert checkpoints and all((path / CHECKPOINT_FILE).is_file() for path in checkpoints)
    assert (shared / "two-nodes" / "report" / "summary.md").is_file()

    # The token is in no file gid wrote (its log, results, the report, MLflow's store) and in no output.
    assert_token_nowhere(two_nodes.token, log, shared, cluster_sweep, mlflow_on_head.home)


@pytest.mark.parametrize("client", ["without a token", "with another token"])
def test_a_client_without_the_clusters_token_is_refused_in_one_line(two_nodes, mlflow_on_head, cluster_sweep, tmp_path, client):
    """Anyone who reaches the head's port, with gid but not the token, runs nothing: one line, exit code 2, and
    no trace of the sweep in MLflow; a token from elsewhere fares no better."""
    name = "refused-" + client.replace(" ", "-")
    shared = tmp_path / "shared"
    env = client_env(PYTHONPATH=str(REPO), PYTHON=sys.executable, GID_WORKDIR=str(cluster_sweep), GID_STORAGE_PATH=str(shared),
                     MLFLOW_TRACKING_URI=mlflow_on_head.uri)
    if client == "without a token":  # gid itself, no RAY_AUTH_MODE: nothing sent
        command = [sys.executable, "-m", "gid.cli", "sweep", "sweep.yaml", "--set", f"storage_path={shared}"]
        expected = f"gid: error: the Ray cluster at {two_nodes.address} requires a token and this client sends none"
    else:  # run-sweep.sh, which turns token authentication on, with the token of another cluster
        env["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "other.token")
        write_token(Path(env["RAY_AUTH_TOKEN_PATH"]))
        command = ["bash", str(CLUSTERS / "run-sweep.sh"), "sweep.yaml"]
        expected = f"gid: error: the Ray cluster at {two_nodes.address} refused this client's token (from RAY_AUTH_TOKEN_PATH="
    done = subprocess.run([*command, "--address", two_nodes.address, "--set", f"name={name}"], cwd=cluster_sweep, env=env,
                          capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-6000:]
    assert "Traceback" not in output
    (line,) = done.stderr.strip().splitlines()  # one line; what Ray printed is in gid.log
    assert line.startswith(expected) and 'clusters/README.md, "Who can use the cluster"' in line
    assert (shared / name / logs.LOG_FILE).is_file()
    tracking = MlflowClient(mlflow_on_head.uri)
    experiment = tracking.get_experiment_by_name("gid-clusters")
    assert experiment is None or not tracking.search_runs([experiment.experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{name}'")
    assert_token_nowhere(two_nodes.token, output, shared, mlflow_on_head.home)


# --- a node lost mid-sweep (last in this module: it replaces the cluster's worker node) -------------


def fault_sweep(cluster, mlflow_on_head, cluster_sweep, folder: Path, name: str, epochs: int, *, workers: int,
                cpus: float, concurrent: int, trials: int | None = None) -> dict[str, str]:
    """The cluster sweep in ``folder`` as ``name``, ``epochs`` long, its trials allowed to restart
    (`run.max_failures: 2`); returns run-sweep.sh's environment for it."""
    base = yaml.safe_load((cluster_sweep / "retinanet_gid.yaml").read_text())
    base["train"] = {**base.get("train", {}), "epochs": epochs}
    base["run"] = {**base.get("run", {}), "max_failures": 2}
    (folder / "retinanet_gid.yaml").write_text(yaml.safe_dump(base))
    sweep = yaml.safe_load((cluster_sweep / "sweep.yaml").read_text())
    sweep.update(name=name, **({"trials": trials} if trials else {}))
    sweep["frameworks"]["retinanet"]["baseline"] = str(cluster_sweep / "student.pt")
    (folder / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    return client_env(
        PYTHONPATH=str(REPO), PYTHON=sys.executable, GID_WORKDIR=str(folder), GID_STORAGE_PATH=str(folder / "shared"),
        MLFLOW_TRACKING_URI=mlflow_on_head.uri, RAY_AUTH_TOKEN_PATH=str(cluster.token_path),
        GID_WORKERS_PER_TRIAL=str(workers), GID_CPUS_PER_WORKER=str(cpus), GID_MAX_CONCURRENT_TRIALS=str(concurrent),
    )


def sweep_losing_the_worker(cluster, env: dict[str, str], log: Path, ready: Callable[[], bool]) -> tuple[list[str], list[str]]:
    """run-sweep.sh on ``cluster``; once ``ready()``, its worker node dies and a new one joins. Asserts the sweep
    finishes; returns the node ids left after the loss and those after the new node joined (the head's first)."""
    with log.open("w") as out:
        driver = subprocess.Popen(["bash", str(CLUSTERS / "run-sweep.sh"), "sweep.yaml", "--address", cluster.address],
                                  env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while not ready():
                assert driver.poll() is None and time.monotonic() < deadline, log.read_text()[-6000:]
                time.sleep(0.5)
            left, after = cluster.command("lose-worker"), cluster.command("add-worker")
            assert driver.wait(timeout=420) == 0, log.read_text()[-6000:]
        finally:
            if driver.poll() is None:
                driver.kill()
    return left, after


def sweep_trial_runs(client: MlflowClient, name: str) -> list:
    experiment = client.get_experiment_by_name("gid-clusters")
    query = f"tags.`{SWEEP_TAG}` = '{name}' and tags.`{ROLE_TAG}` = 'trial'"
    return client.search_runs([experiment.experiment_id], filter_string=query) if experiment else []


def test_a_lost_node_costs_its_trials_only_their_last_epoch_and_a_new_node_takes_trials(
    two_nodes, mlflow_on_head, cluster_sweep, tmp_path
):
    """A worker node dies mid-sweep as a preempted machine does (every Ray process of it killed): its trial
    restarts from its last checkpoint (`run.max_failures`), on the node that joined in its place or on the head,
    the sweep finishes, and MLflow holds each trial once, its epochs in order with no gap."""
    epochs, name, shared = 4, "lost-node", tmp_path / "shared"
    # one trial per node: each node has one CPU
    env = fault_sweep(two_nodes, mlflow_on_head, cluster_sweep, tmp_path, name, epochs, workers=1, cpus=1, concurrent=2)
    client = MlflowClient(mlflow_on_head.uri)
    trial_runs = partial(sweep_trial_runs, client, name)

    head, lost = json.loads(two_nodes.ready.read_text())["node_ids"]
    # Once the trial on the worker node has logged an epoch (so it has a checkpoint), the node goes.
    left, after = sweep_losing_the_worker(two_nodes, env, tmp_path / "driver.log", lambda: any(
        r.data.tags.get("gid.worker_nodes") == lost and r.data.metrics.get("epoch", 0) >= 1 for r in trial_runs()
    ))
    assert left == [head]
    (replacement,) = set(after) - {head}

    runs = trial_runs()
    assert len(runs) == 2 and len({r.data.tags[TRIAL_TAG] for r in runs}) == 2  # each trial once
    (restarted,) = [r for r in runs if "gid.restarts" in r.data.tags]
    assert restarted.data.tags["gid.restarts"] == "1"
    assert restarted.data.tags["gid.worker_nodes"] in (head, replacement)  # trained on after the node's loss
    # it went on from its last checkpoint: Tune's results hold each epoch once, the last few since the restore
    reported = [json.loads(line) for line in (shared / name / f"{name}-retinanet" / restarted.data.tags[TRIAL_TAG] / "result.json").read_text().splitlines()]
    assert [r["epoch"] for r in reported] == list(range(1, epochs + 1)) and reported[-1]["iterations_since_restore"] < epochs
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags[STATUS_TAG] == "finished"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "epoch")] == list(range(1, epochs + 1))
        # its final AP is the one its last checkpoint holds
        trial_dir = shared / name / f"{name}-retinanet" / run.data.tags[TRIAL_TAG]
        last = max(trial_dir.glob("checkpoint_*"), key=lambda path: path.name)
        assert torch.load(last / CHECKPOINT_FILE, weights_only=False)["metrics"]["val_ap"] == run.data.metrics["eval/ap"]
    summary = (shared / name / "report" / "summary.md").read_text()
    assert f"- retinanet {restarted.data.tags[TRIAL_TAG]}: 1× (" in summary


def test_a_multi_worker_trial_that_loses_a_node_resumes_its_train_run_from_its_last_checkpoint(
    two_nodes, mlflow_on_head, cluster_sweep, tmp_path
):
    """A trial whose two DDP workers span both nodes loses one of them: Ray Train (or, when the trial's own
    process was on that node, Tune) restarts it from its last checkpoint once a node joins in its place."""
    epochs, name, shared = 3, "lost-node-ddp", tmp_path / "shared"
    env = fault_sweep(two_nodes, mlflow_on_head, cluster_sweep, tmp_path, name, epochs, workers=2, cpus=0.75, concurrent=1, trials=1)
    client = MlflowClient(mlflow_on_head.uri)
    trial_runs = partial(sweep_trial_runs, client, name)

    head = json.loads(two_nodes.ready.read_text())["node_ids"][0]
    left, _ = sweep_losing_the_worker(two_nodes, env, tmp_path / "driver.log", lambda: any(
        r.data.metrics.get("epoch", 0) >= 1 for r in trial_runs()
    ))
    assert left == [head]

    (run,) = trial_runs()
    assert run.info.status == "FINISHED" and run.data.tags[STATUS_TAG] == "finished"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "epoch")] == list(range(1, epochs + 1))
    # the Train run went on from its checkpoint: Tune's results hold each epoch once
    trial_dir = shared / name / f"{name}-retinanet" / run.data.tags[TRIAL_TAG]
    reported = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]
    assert [r["epoch"] for r in reported] == list(range(1, epochs + 1)), reported
    train_run = shared / name / "trials" / "retinanet" / run.data.tags[TRIAL_TAG]
    last = max((path for path in train_run.glob("checkpoint_*") if path.is_dir()), key=lambda path: path.name)
    assert torch.load(last / CHECKPOINT_FILE, weights_only=False)["metrics"]["val_ap"] == run.data.metrics["eval/ap"]
