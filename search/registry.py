"""A sweep's winner as an MLflow model: ``gid export --register NAME`` and the sweep file's
``tracking.registered_model``.

A model version is the student a trial trained, read from the trial's last checkpoint (its MLflow run's
``gid.checkpoint``) with gid's own loader: ``mlflow.pytorch.load_model("models:/NAME@champion")`` returns
the torchvision detector gid builds. Its TorchScript file, its torchvision state dict and the exported
config lie beside it (``extra_files/``); the version's tags name the sweep, the trial, the config and the
metrics. The alias ``champion`` moves to a new version only when it beats the current one on the objective
the export ranks by, by the rule every "best" in a sweep follows (:func:`search.outcomes.best`).

The detector is pickled (MLflow's ``serialization_format="pickle"``), not saved as MLflow 3's default
``pt2``, a ``torch.export`` program: that needs tensors in and out, where a detector takes a list of images
and returns a list of dicts, and ``torch.export`` cannot trace torchvision's post-processing (how many
boxes ``batched_nms`` keeps depends on the data). Unpickling runs code: load versions from a registry
you trust.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torchvision
from mlflow.entities import LoggedModel, LoggedModelOutput, LoggedModelStatus
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.models import Model
from mlflow.tracking import MlflowClient
from torch import nn

from gid.engine.state import CHECKPOINT_FILE
from gid.errors import GidError
from gid.models import load_model, read_checkpoint
from gid.models.exchange import export_model
from gid.models.roi_align import with_torchvision_poolers
from search.names import quoted
from search.outcomes import best
from search.tracking import (
    CHECKPOINT_TAG, FRAMEWORK_TAG, ROLE_TAG, SEED_TAG, SOURCE_TAG, SWEEP_ID_TAG, SWEEP_TAG, TRIAL_TAG,
)

CHAMPION = "champion"
LABELS_FILE = "labels.json"  # a version's label -> class name, from the model file (as its data set named them)
# A version's own tags, beside the trial run's that it copies: the exported config's file name, the seeds
# its metrics are the mean of, and the objective the champion rule compares (its metric, mode and value).
CONFIG_TAG, SEEDS_TAG = "gid.config", "gid.seeds"
OBJECTIVE_TAG, MODE_TAG, VALUE_TAG = "gid.objective", "gid.objective_mode", "gid.objective_value"
METRIC_TAG = "gid.metric.{}"  # gid.metric.val_ap, ...: the validation metrics
_COPIED_TAGS = (SWEEP_TAG, SWEEP_ID_TAG, FRAMEWORK_TAG, ROLE_TAG, TRIAL_TAG, SOURCE_TAG, SEED_TAG, CHECKPOINT_TAG)
STUDENT = "student"  # the logged model's name, and its TorchScript (.ts) and state dict (.pth) files'


@dataclass(frozen=True)
class Registered:
    name: str
    version: str
    champion: str  # the version ``champion`` names once this one is registered

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def register_student(
    client: MlflowClient, name: str, run: Any, metrics: dict[str, float], seeds: int, *, metric: str, mode: str,
    config_name: str, config_text: str,
) -> Registered:
    """Register the student ``run`` trained as a version of ``name``, its ``metrics`` (the mean over ``seeds``
    when finalized) ranked by ``metric`` in direction ``mode``; the exported config is ``config_text``, written as
    ``config_name``. ``champion`` moves to it when it beats the current champion (ties keep the current one).
    A student registered before (an export run again, a resumed sweep) keeps its version: no second one."""
    found = client.search_registered_models(filter_string=f"name = {quoted(name)}")
    current = _champion(client, found[0], metric, mode) if found else None
    value = float(metrics[metric])
    before = client.search_model_versions(f"name = {quoted(name)} and run_id = {quoted(run.info.run_id)}") if found else []
    if before:
        version = before[0].version
    else:
        model_file = _model_file(run)
        if not found:
            client.create_registered_model(name)
        tags = {key: run.data.tags[key] for key in _COPIED_TAGS if key in run.data.tags}
        tags |= {CONFIG_TAG: config_name, SEEDS_TAG: str(seeds), OBJECTIVE_TAG: metric, MODE_TAG: mode, VALUE_TAG: str(value)}
        tags |= {METRIC_TAG.format(key): str(v) for key, v in metrics.items() if key.startswith("val_")}
        logged, description = _log_student(client, run, model_file, config_name, config_text)
        # The logged model's artifact location, not its models:/ URI: a SQL registry store resolves that URI
        # through the process's default tracking URI, not its own (docs/ray-workarounds.md, mlflow/mlflow#23367).
        version = client.create_model_version(
            name, logged.artifact_location, run_id=run.info.run_id, tags=tags, description=description,
            model_id=logged.model_id,
        ).version
    version = str(version)  # a SQL store's client gives 1, a server's "1"
    contenders = [(str(current.version), float(current.tags[VALUE_TAG]))] if current is not None else []
    champion, _ = best([*contenders, (version, value)], mode, key=lambda contender: contender[1])
    if champion == version:
        client.set_registered_model_alias(name, CHAMPION, version)
    return Registered(name, version, champion)


def _model_file(run: Any) -> Path:
    """The trial's last checkpoint: a gid model file of the student it trained (and its training state)."""
    folder = run.data.tags.get(CHECKPOINT_TAG)
    if folder is None:
        raise GidError(
            f"MLflow run {run.info.run_id} records no checkpoint ({CHECKPOINT_TAG}): its sweep ran with a gid that "
            "did not record them; export it without --register"
        )
    path = Path(folder) / CHECKPOINT_FILE
    if not path.is_file():
        raise GidError(
            f"{path}: the last checkpoint of MLflow run {run.info.run_id} is not on this machine; register where the "
            "sweep's storage_path is, or is mounted at the same path"
        )
    return path


def _champion(client: MlflowClient, model: RegisteredModel, metric: str, mode: str) -> ModelVersion | None:
    """The version ``champion`` names, if any, once it is known to be ranked as this export ranks."""
    if CHAMPION not in model.aliases:
        return None
    current = client.get_model_version(model.name, model.aliases[CHAMPION])
    ranked_by = (current.tags.get(OBJECTIVE_TAG), current.tags.get(MODE_TAG))
    if ranked_by != (metric, mode):
        by = "no objective (not registered by gid)" if ranked_by[0] is None else f"{ranked_by[0]} ({ranked_by[1]})"
        raise GidError(
            f"version {current.version} of MLflow model {model.name!r}, its {CHAMPION}, was ranked by {by}, this export "
            f"by {metric} ({mode}); register under another name, or rank as it was with --metric"
        )
    return current


def _log_student(
    client: MlflowClient, run: Any, model_file: Path, config_name: str, config_text: str
) -> tuple[LoggedModel, str]:
    """The student as an MLflow logged model of the trial's run; returns it and a description of its files.

    What ``mlflow.pytorch.log_model`` does, through ``client``: log_model writes to the process's tracking URI,
    which need not be the sweep's."""
    model, config, _ = load_model(model_file)
    logged = client.create_logged_model(run.info.experiment_id, name=STUDENT, source_run_id=run.info.run_id)
    try:
        loading = _save_student(client, run, logged, model, model_file, config_name, config_text)
    except BaseException:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    client.log_outputs(run.info.run_id, [LoggedModelOutput(logged.model_id, step=0)])  # the run's page lists it
    description = (
        f"GID student ({config.model.framework} {config.model.backbone}) of sweep {run.data.tags.get(SWEEP_TAG)}, "
        f"trial {run.data.tags.get(TRIAL_TAG)}. mlflow.pytorch.load_model returns the torchvision detector; "
        f"{loading}; extra_files/{config_name}: the config that trains it again (gid distill)."
    )
    return logged, description


def _save_student(
    client: MlflowClient, run: Any, logged: LoggedModel, model: nn.Module, model_file: Path, config_name: str,
    config_text: str,
) -> str:
    """Write the logged model's files (the pickle, TorchScript, the state dict, the config) and upload them;
    returns how to load the TorchScript and the state dict, as `gid model export` says it."""
    with tempfile.TemporaryDirectory() as directory:
        folder = Path(directory)
        extra = {folder / f"{STUDENT}.ts": "torchscript", folder / f"{STUDENT}.pth": "torchvision"}
        described = [
            f"extra_files/{path.name}" + export_model(model_file, kind, path).removeprefix(f"wrote {path}")
            for path, kind in extra.items()
        ]
        (folder / config_name).write_text(config_text)
        files = [*extra, folder / config_name]
        if class_names := read_checkpoint(model_file).get("class_names"):
            labels = {"0": "__background__", **{str(label): name for label, name in enumerate(class_names, start=1)}}
            (folder / LABELS_FILE).write_text(json.dumps(labels, indent=1))
            files.append(folder / LABELS_FILE)
            described.append(f"extra_files/{LABELS_FILE}: what each label the detector returns means")
        mlflow_pytorch().save_model(
            # torchvision's box pooler again (gid's computes the same values): the pickle names torchvision's classes only
            with_torchvision_poolers(model).eval(), folder / "model", serialization_format="pickle",
            pip_requirements=requirements(), extra_files=[str(path) for path in files],
            mlflow_model=Model(
                artifact_path=logged.artifact_location, run_id=run.info.run_id, model_id=logged.model_id,
                model_uuid=logged.model_id,
            ),
        )
        client.log_model_artifacts(logged.model_id, str(folder / "model"))
    return "; ".join(described)


def requirements() -> list[str]:
    """What loading the pickle needs: torch and cloudpickle (MLflow's pins) and torchvision, whose classes it names."""
    # a local version label (+cu130) names a build, not a release pip can install
    return [*mlflow_pytorch().get_default_pip_requirements(), f"torchvision=={torchvision.__version__.split('+')[0]}"]


def mlflow_pytorch():
    """``mlflow.pytorch``, imported without what its import does to the root logger: ``logging.basicConfig`` in
    ``mlflow/pytorch/_lightning_autolog.py`` (mlflow/mlflow#20922) adds a stderr handler there, and every library's
    records would then reach the terminal that gid keeps quiet (docs/ray-workarounds.md)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    import mlflow.pytorch

    root.handlers[:] = handlers
    root.setLevel(level)
    return mlflow.pytorch
