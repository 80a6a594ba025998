"""Helpers shared by tests (importable by Ray workers too: the tests folder is on their PYTHONPATH)."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import ray.train
import torch
import yaml
from torch import nn
from torchvision.models.detection import FasterRCNN, RetinaNet, fasterrcnn_mobilenet_v3_large_fpn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from gid.config import DataConfig, DistillConfig, ModelConfig, validate
from gid.data import build_dataset, collate
from gid.distill import Distiller
from gid.models import build_detector, save_model

SIZE = 64  # the synthetic images' side (conftest's synth_root) and the tiny detectors' input size
TINY_MODEL = {"backbone": "resnet18", "fpn_channels": 64}  # the tiny detector (a teacher: resnet34, FPN 128)


def tiny_config_dict(synth_root: Path, framework: str = "retinanet", **sections: dict) -> dict:
    """A config small enough for a few CPU steps: the synthetic data, a tiny ``framework`` detector, one
    short epoch. ``sections`` update it section by section, e.g. ``train={"epochs": 2}``."""
    data = {
        "data": {"root": str(synth_root), "image_size": SIZE, "batch_size": 4},
        "model": {"framework": framework, **TINY_MODEL},
        "train": {"epochs": 1, "lr": 0.01, "warmup_iters": 2, "log_every": 1000},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return data


def tiny_detector(framework: str, num_classes: int = 7, image_size: int = SIZE, seed: int | None = None, **model) -> nn.Module:
    """An untrained tiny detector (``model`` overrides its ModelConfig); ``seed`` seeds its initialisation."""
    if seed is not None:
        torch.manual_seed(seed)
    return build_detector(ModelConfig(**{"framework": framework, **TINY_MODEL, **model}), image_size, num_classes)


def tiny_distiller(framework: str, teacher: str = "resnet34", student: str = "resnet18", **distill) -> Distiller:
    """A Distiller of untrained tiny detectors (seeded), its teacher an FPN of 128 channels."""
    torch.manual_seed(0)
    config = DistillConfig.model_validate({"teacher": "unused.pt", **distill})
    return Distiller(
        tiny_detector(framework, backbone=teacher, fpn_channels=128), tiny_detector(framework, backbone=student), config, SIZE
    )


def synth_batch(synth_root: Path, count: int) -> tuple[list[torch.Tensor], list[dict]]:
    """The first ``count`` training images of the synthetic data, unaugmented, and their targets."""
    dataset = build_dataset(DataConfig(root=synth_root), "train", train=False)
    images, targets = collate([dataset[i] for i in range(count)])
    return list(images), list(targets)


class RunsCode:
    """A pickle that runs a shell command when loaded unsafely (torch.load without weights_only)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class EpochLog(ray.train.UserCallback):
    """Appends each reported epoch to a file (Train callbacks run in Ray's controller, not here)."""

    def __init__(self, path: Path):
        self.path = path

    def after_report(self, run_context, metrics, checkpoint):
        with self.path.open("a") as f:
            f.write(f"{metrics[0]['epoch']}\n")


class EvaluatingRanks(ray.train.UserCallback):
    """Appends, per report, the ranks whose metrics hold COCO results (one line of ranks per epoch)."""

    def __init__(self, path: Path):
        self.path = path

    def after_report(self, run_context, metrics, checkpoint):
        with self.path.open("a") as f:
            f.write(" ".join(str(rank) for rank, m in enumerate(metrics) if "val_ap" in m) + "\n")


class BalanceLog(ray.train.UserCallback):
    """Appends, per report, every rank's ``balance_*`` metrics as one JSON line."""

    def __init__(self, path: Path):
        self.path = path

    def after_report(self, run_context, metrics, checkpoint):
        with self.path.open("a") as f:
            f.write(json.dumps([{k: v for k, v in m.items() if k.startswith("balance_")} for m in metrics]) + "\n")


def lines_of(figure) -> dict[str, tuple[list, list]]:
    """The plotted lines of a one-axes matplotlib figure: label -> (x values, y values)."""
    (axes,) = figure.axes
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in axes.get_lines()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(root: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """A real `mlflow server` on loopback over a store in ``root``; returns the process and its URI."""
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = (root / "server.log").open("a")
    process = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
        ],
        stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # MLflow's job runner: gid starts no jobs
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return process, uri
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                process.kill()  # a server that never answered must not outlive the test run
                process.wait()
                raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)


# --- PostgreSQL as MLflow's backend store (a team's: clusters/mlflow-server.sh) ----------------------

POSTGRES_MISSING = (
    "PostgreSQL's server programs (initdb, pg_ctl) are not installed, so the tests of MLflow on PostgreSQL "
    "cannot run: run .ci/run, which installs Debian's postgresql package (apt-get install -y postgresql)"
)


class PostgresMissing(RuntimeError):
    """PostgreSQL's server programs are not on this machine."""


def postgres_bin() -> Path | None:
    """The folder of PostgreSQL's server programs: Debian's package keeps them off PATH, in
    /usr/lib/postgresql/<version>/bin (the newest version wins); else wherever PATH finds initdb and pg_ctl
    together. .ci/run installs the package when neither is there."""
    found = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "initdb").exists() and (p / "pg_ctl").exists()]
    found.sort(key=lambda folder: [int(part) if part.isdigit() else 0 for part in folder.parent.name.split(".")])
    if found:
        return found[-1]
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl and (folder := Path(pg_ctl).resolve().parent) == Path(initdb).resolve().parent:
        return folder
    return None


@dataclass
class Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1, run by ``as_user`` (a command prefix) from ``root``."""

    bin: Path
    root: Path
    port: int
    as_user: list[str]
    user: str = "gid"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "postgres.log"

    def url(self, database: str) -> str:
        """SQLAlchemy's URL of ``database`` with the psycopg (v3) driver: what `mlflow server` takes."""
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def pg_ctl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.data), *args],
            cwd=self.root, capture_output=True, text=True, timeout=120,
        )

    def create_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=self.user, dbname="postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')

    def stop(self) -> None:
        """Stop the server (`pg_ctl stop -m fast`: it closes clients' connections) and delete the cluster."""
        try:
            if (self.data / "postmaster.pid").exists():
                done = self.pg_ctl("stop", "-m", "fast", "-w", "-t", "60")
                if done.returncode != 0:
                    raise RuntimeError(f"pg_ctl stop failed: {done.stdout}{done.stderr}")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else "(no log)"


def start_postgres(database: str = "mlflow") -> Postgres:
    """``initdb`` a throwaway cluster in a new temporary folder, start PostgreSQL on a free port of 127.0.0.1
    (no other address), create ``database``; `Postgres.stop` stops it and deletes the folder.

    PostgreSQL refuses to run as root: as root, the ``postgres`` system user (made by Debian's package) runs
    it, in a folder that user owns (under /tmp, not pytest's root-only folder)."""
    bin = postgres_bin()
    if bin is None:
        raise PostgresMissing(POSTGRES_MISSING)
    root = Path(tempfile.mkdtemp(prefix="gid-postgres-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root)
            raise PostgresMissing(f"{POSTGRES_MISSING} (there is no postgres system user to run it as)") from None
        os.chown(root, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    postgres = Postgres(bin, root, free_port(), as_user)
    # trust: no passwords, which is safe only because the cluster listens on 127.0.0.1 alone and lives for the tests
    made = subprocess.run(
        [*as_user, str(bin / "initdb"), "-D", str(postgres.data), "-U", postgres.user, "--auth=trust",
         "--encoding=UTF8", "--no-locale", "--no-sync"],
        cwd=root, capture_output=True, text=True, timeout=300,
    )
    if made.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"initdb failed: {made.stdout[-2000:]}{made.stderr[-2000:]}")
    # its socket file in its own folder (Debian's /var/run/postgresql may be missing); fsync off: a throwaway cluster
    options = f"-c listen_addresses=127.0.0.1 -c port={postgres.port} -c unix_socket_directories={postgres.data} -c fsync=off"
    started = postgres.pg_ctl("start", "-w", "-t", "120", "-l", str(postgres.log), "-o", options)
    try:
        if started.returncode != 0:
            raise RuntimeError(f"PostgreSQL did not start: {started.stdout}{started.stderr}\n{postgres.log_tail()}")
        postgres.create_database(database)
    except BaseException:
        postgres.stop()
        raise
    return postgres


MLFLOW_SERVER_SCRIPT = Path(__file__).resolve().parents[1] / "clusters" / "mlflow-server.sh"


def mlflow_server_script(command: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """``bash clusters/mlflow-server.sh COMMAND`` with ``env`` (MLFLOW_HOME, MLFLOW_PORT, ...) over this environment."""
    return subprocess.run(
        ["bash", str(MLFLOW_SERVER_SCRIPT), command], env={**os.environ, **env}, capture_output=True, text=True,
        timeout=timeout,
    )


def write_base_configs(synth_root: Path, root: Path, frameworks, epochs: int = 2) -> None:
    """Per framework: untrained teacher and student model files (enough for the mechanics; the student
    stands for the baseline a sweep would otherwise train itself) and a base distill config."""
    for framework in frameworks:
        base = tiny_config_dict(synth_root, framework, data={"batch_size": 8}, train={"epochs": epochs})
        teacher_config = validate(base)
        for role in ("teacher", "student"):
            save_model(build_detector(teacher_config.model, SIZE, 7), teacher_config, 7, root / f"{framework}_{role}.pt")
        # the default balance (dynamic) measures on the first step and every 50th: once or twice at these sizes
        base["distill"] = {"teacher": str(root / f"{framework}_teacher.pt")}
        (root / f"{framework}_gid.yaml").write_text(yaml.safe_dump(base))


def write_sweep(
    root: Path, name: str, tracking_uri: str, frameworks=("retinanet", "fcos"), baselines: bool = True,
    system_metrics_interval_s: float = 0, **extra
) -> Path:
    """A small sweep file; ``baselines``: name the untrained students as the baselines, so the sweep trains none.
    System metrics are off unless asked for: a sample's thread is one more on two busy cores."""
    sweep = {
        "name": name,
        "frameworks": {
            fw: {"config": str(root / f"{fw}_gid.yaml"), **({"baseline": str(root / f"{fw}_student.pt")} if baselines else {})}
            for fw in frameworks
        },
        "trials": 3,
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1, "max_concurrent_trials": 2},
        "scheduler": {"type": "asha", "grace_period": 1},
        "sampler": {"type": "tpe", "seed": 0},
        "tracking": {"tracking_uri": tracking_uri, "experiment": "gid-test", "system_metrics_interval_s": system_metrics_interval_s},
        "storage_path": str(root / "sweeps"),
        **extra,
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


# --- a user's own detector, for model.builder ----------------------------------------------------


def _stage(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU())


def user_retinanet(num_classes: int, width: int = 16) -> RetinaNet:
    """A RetinaNet over a backbone of the user's own (strided conv stages, no torchvision classifier), 64 px."""
    body = nn.Sequential(OrderedDict(
        stem=nn.Sequential(_stage(3, width), _stage(width, width)),
        c3=_stage(width, 2 * width), c4=_stage(2 * width, 4 * width), c5=_stage(4 * width, 8 * width),
    ))
    backbone = BackboneWithFPN(
        body, {"c3": "0", "c4": "1", "c5": "2"}, [2 * width, 4 * width, 8 * width], 64, extra_blocks=LastLevelP6P7(64, 64)
    )
    anchors = AnchorGenerator(tuple((s, s * 2 ** (1 / 3), s * 2 ** (2 / 3)) for s in (16, 32, 64, 128, 256)), ((0.5, 1.0, 2.0),) * 5)
    head = RetinaNetHead(64, 9, num_classes, norm_layer=partial(nn.GroupNorm, 32))
    return RetinaNet(backbone, num_classes, anchor_generator=anchors, head=head, min_size=64, max_size=64)


def user_retinanet_teacher(num_classes: int) -> RetinaNet:
    return user_retinanet(num_classes, width=32)


def user_faster_rcnn(num_classes: int) -> FasterRCNN:
    """torchvision's own MobileNetV3 Faster R-CNN, untrained, with its default box pooler."""
    return fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=num_classes)


def not_a_detector(num_classes: int) -> nn.Module:
    return nn.Linear(3, num_classes)
