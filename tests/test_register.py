"""`gid export --register`: a sweep's best student as an MLflow model version, on a real `mlflow server`.

The sweeps here are MLflow runs written by search.tracking's own TrialLogger, as a sweep writes them, over
model files written by gid's own writer (seeded tiny detectors, no Ray): a trial's checkpoint as Tune keeps it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from torchvision.models.detection import RetinaNet

from gid.config import load_config, validate
from gid.engine.evaluation import evaluate_model_file
from gid.engine.state import CHECKPOINT_FILE
from gid.errors import GidError
from gid.models import build_detector, save_model
from search.config import load_sweep
from search.export import export_best
from search.registry import CHAMPION, CONFIG_TAG, METRIC_TAG, MODE_TAG, OBJECTIVE_TAG, SEEDS_TAG, VALUE_TAG
from search.storage import SweepPaths
from search.sweep import register_winners, sweep_base, trials_path
from search.tracking import (
    CHECKPOINT_TAG, ROLE_TAG, SEED_TAG, SOURCE_TAG, SWEEP_ID_TAG, TRIAL_TAG, TrialLogger, connect, find_run, parent_run,
)
from search.trial import FINAL, trial_config, trial_params
from support import synth_batch, tiny_config_dict, write_sweep

EXPERIMENT = "gid-register"
EPOCHS = 2
# A small student (MobileNetV2) whose untrained head still detects: its scores sit near the prior, 0.01.
STUDENT = {"backbone": "mobilenet_v2", "fpn_channels": 64, "detector": {"score_thresh": 0.001}}

CLASSES = ["circle", "square", "triangle", "cross", "ring", "bar"]  # labels 1-6 of the 7 classes


@pytest.fixture(scope="module")
def workspace(synth_root, tmp_path_factory) -> Path:
    """A base distill config of the small student (its teacher is never loaded here)."""
    root = tmp_path_factory.mktemp("register")
    base = tiny_config_dict(synth_root, "retinanet", model=STUDENT, train={"epochs": EPOCHS})
    base["distill"] = {"teacher": str(root / "teacher.pt")}
    (root / "retinanet_gid.yaml").write_text(yaml.safe_dump(base))
    return root


@pytest.fixture
def tracking_uri(mlflow_server, monkeypatch) -> str:
    """The server as the process's MLflow: where `mlflow.pytorch.load_model("models:/...")` looks."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    return mlflow_server


class Sweep:
    """A sweep's MLflow runs as `gid sweep` writes them (its parent run, a TrialLogger per role), and its trials'
    last checkpoints: seeded untrained students written by gid's writer where Tune would keep them."""

    def __init__(self, workspace: Path, tracking_uri: str, name: str, objective: dict[str, str]):
        self.sweep = load_sweep(write_sweep(
            workspace, name, tracking_uri, frameworks=["retinanet"], objective=objective, storage_path=str(workspace / "sweeps"),
            tracking={"tracking_uri": tracking_uri, "experiment": EXPERIMENT},
        ))
        self.client, experiment_id = connect(tracking_uri, EXPERIMENT)
        self.paths = SweepPaths.of(self.sweep)
        written = self.sweep.base_config("retinanet")
        self.base = sweep_base(self.sweep, written)
        settings = self.sweep.model_dump(mode="json", exclude={"space"})
        run = parent_run(self.client, experiment_id, name, self.paths.sweep_id(False), self.paths.root, settings, {})
        self.id = run.id
        self.loggers = {
            role: TrialLogger(
                self.client, experiment_id, run, self.base, written.to_dict(),
                trials_path(self.paths, self.base, f"{name}-retinanet{'-final' if role == FINAL else ''}"), role,
            )
            for role in ("trial", FINAL)
        }

    def trial(self, trial_id: str, metrics: dict[str, float], seed: int, point: dict | None = None, role: str = "trial") -> Path:
        """A finished trial of ``point`` (a Tune trial's config) whose last epoch reported ``metrics``; returns the
        model file of its student, initialised from ``seed``."""
        logger = self.loggers[role]
        point = point or {"distill.gism.top_k": 10}
        config = trial_config(self.base.to_dict(), trial_params(point), trial_id, logger.trials_path)
        checkpoint = Path(logger.trials_path) / trial_id / "checkpoint_000001"
        torch.manual_seed(seed)
        model = build_detector(config.model, config.data.image_size, 7)
        save_model(model, config, 7, checkpoint / CHECKPOINT_FILE, epoch=EPOCHS, metrics=metrics, class_names=CLASSES)
        for epoch in range(1, EPOCHS + 1):
            logger.log_result(trial_id, point, {"epoch": epoch, **metrics})
        logger.finish(trial_id, point, {"epoch": EPOCHS}, str(checkpoint), None)
        return checkpoint / CHECKPOINT_FILE


def detections(model: torch.nn.Module, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    with torch.no_grad():
        return model.eval()(images)


def assert_same_detections(theirs: list[dict], ours: list[dict]) -> None:
    for mine, other in zip(ours, theirs, strict=True):
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(other[key], mine[key], rtol=0, atol=0)


def test_the_registered_champion_loads_as_the_detector_gid_eval_loads(workspace, tracking_uri, synth_root, tmp_path):
    sweep = Sweep(workspace, tracking_uri, "one", {"metric": "val_ap", "mode": "max"})
    model_file = sweep.trial("trial1", {"val_ap": 0.3, "val_ap50": 0.5}, seed=1)
    (exported,) = export_best(tmp_path / "best", tracking_uri=tracking_uri, experiment=EXPERIMENT, sweep="one", register="one")
    assert (exported.registered.name, exported.registered.version, exported.registered.champion) == ("one", "1", "1")

    champion = mlflow.pytorch.load_model(f"models:/one@{CHAMPION}")
    assert type(champion) is RetinaNet and not champion.training  # torchvision's own class, ready to detect
    images, _ = synth_batch(synth_root, 2)
    ours = detections(evaluate_model_file(model_file, "val").model, images)  # the model `gid eval` measures
    assert all(len(d["boxes"]) > 0 for d in ours)
    assert_same_detections(detections(champion, images), ours)

    # the exported config and the version name each other
    client = MlflowClient(tracking_uri)
    version = client.get_model_version_by_alias("one", CHAMPION)
    assert version.run_id == exported.run_id and client.get_run(version.run_id).data.tags[TRIAL_TAG] == "trial1"
    text = exported.path.read_text()
    assert "MLflow model one version 1: models:/one/1" in text.splitlines()[1]
    assert version.tags[CONFIG_TAG] == exported.path.name
    assert version.tags[SWEEP_ID_TAG] == sweep.id and version.tags[TRIAL_TAG] == "trial1"
    assert version.tags[CHECKPOINT_TAG] == str(model_file.parent) and version.tags[ROLE_TAG] == "trial"
    assert (version.tags[OBJECTIVE_TAG], version.tags[MODE_TAG], version.tags[VALUE_TAG]) == ("val_ap", "max", "0.3")
    assert version.tags[METRIC_TAG.format("val_ap50")] == "0.5" and version.tags[SEEDS_TAG] == "1"
    assert "`models:/one/1` (champion)" in (tmp_path / "best" / "README.md").read_text()

    # beside the pickled detector: TorchScript, the torchvision state dict and the exported config
    files = Path(mlflow.artifacts.download_artifacts("models:/one/1", dst_path=str(tmp_path / "model"))) / "extra_files"
    with torch.no_grad():
        _, scripted = torch.jit.load(files / "student.ts")(images)
    assert_same_detections(scripted, ours)
    state = torch.load(files / "student.pth", weights_only=True)
    assert state.keys() == champion.state_dict().keys() and all(torch.equal(state[k], v) for k, v in champion.state_dict().items())
    held = (files / exported.path.name).read_text()
    assert held == "\n".join(line for i, line in enumerate(text.splitlines()) if i != 1) + "\n"
    assert load_config(files / exported.path.name) == load_config(exported.path)
    # and what each label the detector returns means, as the model file holds it
    labels = json.loads((files / "labels.json").read_text())
    assert labels == {"0": "__background__", **{str(i): name for i, name in enumerate(CLASSES, start=1)}}


def test_the_baseline_run_exists_while_it_trains_and_a_failed_one_is_finished_by_the_resume(workspace, tracking_uri):
    # The sweep's student alone: its run is made before it trains, so that its workers sample the system into it.
    logger = Sweep(workspace, tracking_uri, "baseline", {"metric": "val_ap", "mode": "max"}).loggers["trial"]
    client = MlflowClient(tracking_uri)
    with pytest.raises(GidError), logger.baseline_training(interval_s=1) as system_metrics:
        run_id = find_run(client, system_metrics.experiment_id, system_metrics.run_tags("baseline"))
        assert client.get_run(run_id).info.status == "RUNNING" and system_metrics.interval_s == 1
        raise GidError("the training failed")
    assert client.get_run(run_id).info.status == "FAILED"
    with logger.baseline_training(interval_s=0) as system_metrics:  # the resume trains it again, unsampled
        assert system_metrics is None and client.get_run(run_id).info.status == "RUNNING"
    for _ in range(2):  # and logs it once, in the same run
        logger.log_baseline({"val_ap": 0.25, "train_time_s": 9.0}, EPOCHS)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[ROLE_TAG] == "baseline"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "eval/ap")] == [(EPOCHS, 0.25)]


def test_a_sqlite_store_registers_into_itself_and_its_champion_loads(workspace, tmp_path, monkeypatch):
    # gid demo's store: a SQLite file, no server. Nothing may land in the working folder's default store.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = tmp_path / "store"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    sweep = Sweep(workspace, uri, "local", {"metric": "val_ap", "mode": "max"})
    model_file = sweep.trial("trial1", {"val_ap": 0.3}, seed=1)
    (exported,) = export_best(tmp_path / "best", tracking_uri=uri, experiment=EXPERIMENT, sweep="local", register="local")
    assert exported.registered.champion == "1"
    assert not (tmp_path / "mlflow.db").exists()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # where a user's MLflow would look
    champion = mlflow.pytorch.load_model(f"models:/local@{CHAMPION}")
    gid_model = evaluate_model_file(model_file, "val").model
    assert type(champion) is RetinaNet
    assert all(torch.equal(v, gid_model.state_dict()[k]) for k, v in champion.state_dict().items())
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("mode", ["max", "min"])
def test_the_champion_moves_only_to_a_better_student(workspace, tracking_uri, tmp_path, mode):
    # max: AP, higher is better; min: the loss, lower is better
    metric = "val_ap" if mode == "max" else "loss"
    name = f"champion-{mode}"
    worse, same, better = (0.2, 0.3, 0.4) if mode == "max" else (2.0, 1.0, 0.5)
    files = {}
    for step, value in enumerate([(0.3 if mode == "max" else 1.0), worse, same, better], start=1):
        sweep_name = f"{name}-{step}"
        sweep = Sweep(workspace, tracking_uri, sweep_name, {"metric": metric, "mode": mode})
        files[str(step)] = sweep.trial("trial1", {"val_ap": 0.1, metric: value}, seed=step)
        (exported,) = export_best(
            tmp_path / sweep_name, tracking_uri=tracking_uri, experiment=EXPERIMENT, sweep=sweep_name, metric=metric,
            register=name,
        )
        assert exported.registered.version == str(step)
        # the first is the champion; the worse and the equal leave it; the better takes it
        assert exported.registered.champion == ("4" if step == 4 else "1")
    client = MlflowClient(tracking_uri)
    assert client.get_registered_model(name).aliases == {CHAMPION: "4"}
    # exported again (or a resumed sweep at its end): the same student, the same version
    (again,) = export_best(
        tmp_path / "again", tracking_uri=tracking_uri, experiment=EXPERIMENT, sweep=f"{name}-4", metric=metric, register=name
    )
    assert (again.registered.version, again.registered.champion) == ("4", "4")
    assert len(client.search_model_versions(f"name = '{name}'")) == 4
    champion = mlflow.pytorch.load_model(f"models:/{name}@{CHAMPION}")
    gid_model = evaluate_model_file(files["4"], "val").model
    assert all(torch.equal(v, gid_model.state_dict()[k]) for k, v in champion.state_dict().items())


def test_a_finalized_winner_registers_its_first_seeds_student_ranked_by_its_mean(workspace, tracking_uri, tmp_path):
    sweep = Sweep(workspace, tracking_uri, "finalized", {"metric": "val_ap", "mode": "max"})
    sweep.trial("trial1", {"val_ap": 0.3}, seed=1)
    sweep.trial("trial2", {"val_ap": 0.2}, seed=2)
    values = {"distill.gism.top_k": 10}
    for label, source, aps in (("1", "trial1", (0.25, 0.27)), ("student", "", (0.1, 0.1))):
        for seed, ap in enumerate(aps, start=1):
            point = {FINAL: {"label": label, "source": source, "values": values if source else {}, "seed": seed}}
            sweep.trial(f"final_{label}_{seed}", {"val_ap": ap}, seed=10 * seed, point=point, role=FINAL)
    (exported,) = export_best(tmp_path / "best", tracking_uri=tracking_uri, experiment=EXPERIMENT, sweep="finalized", register="finalized")
    version = MlflowClient(tracking_uri).get_model_version("finalized", exported.registered.version)
    assert (version.tags[SOURCE_TAG], version.tags[SEED_TAG], version.tags[SEEDS_TAG]) == ("trial1", "1", "2")
    assert version.tags[TRIAL_TAG] == "final_1_1" and float(version.tags[VALUE_TAG]) == pytest.approx(0.26)


def test_registering_refuses_a_champion_ranked_otherwise_and_a_checkpoint_not_here(workspace, tracking_uri, tmp_path):
    sweep = Sweep(workspace, tracking_uri, "refused", {"metric": "loss", "mode": "min"})
    model_file = sweep.trial("trial1", {"val_ap": 0.3, "loss": 1.0}, seed=1)
    export_best(tmp_path / "a", tracking_uri=tracking_uri, experiment=EXPERIMENT, sweep="refused", metric="loss", register="refused")
    with pytest.raises(GidError, match=r"its champion, was ranked by loss \(min\), this export by val_ap \(max\)"):
        export_best(tmp_path / "b", tracking_uri=tracking_uri, experiment=EXPERIMENT, sweep="refused", register="refused")
    for path in model_file.parent.iterdir():
        path.unlink()
    with pytest.raises(GidError, match="is not on this machine; register where the sweep's storage_path is"):
        export_best(tmp_path / "c", tracking_uri=tracking_uri, experiment=EXPERIMENT, sweep="refused", metric="loss", register="other")
    client = MlflowClient(tracking_uri)  # nothing half-registered
    assert len(client.search_model_versions("name = 'refused'")) == 1 and not client.search_registered_models("name = 'other'")


def test_a_sweep_that_cannot_register_its_winner_says_how_to_later(workspace, tracking_uri, caplog):
    sweep = Sweep(workspace, tracking_uri, "unregistered", {"metric": "val_ap", "mode": "max"})
    sweep.trial("trial1", {"val_ap": 0.3}, seed=1).unlink()  # a checkpoint gone from storage
    tracking = sweep.sweep.tracking.model_copy(update={"registered_model": "unregistered"})
    with caplog.at_level(logging.WARNING, logger="search"):
        assert register_winners(sweep.sweep.model_copy(update={"tracking": tracking}), sweep.paths, sweep.id) == []
    (line,) = [r.getMessage() for r in caplog.records if "registering the winners failed" in r.getMessage()]
    assert "is not on this machine" in line
    assert f"gid export --sweep {sweep.id} --metric val_ap --register unregistered --mlflow-experiment {EXPERIMENT} --tracking-uri {tracking_uri} --out " in line


def test_torch_export_cannot_trace_a_torchvision_detector(synth_root):
    """Why a version is pickled rather than MLflow 3's default pt2 (a torch.export program): the number of boxes
    torchvision's post-processing keeps depends on the data. Once this fails, pt2 may be worth a look."""
    config = validate(tiny_config_dict(synth_root, "retinanet", model=STUDENT))
    model = build_detector(config.model, config.data.image_size, 7).eval()
    images, _ = synth_batch(synth_root, 1)
    with pytest.raises(Exception, match="batched_nms"):
        torch.export.export(model, (images,))
