"""Real sweeps on the shared local Ray instance, tracked in a real `mlflow server` on loopback."""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
import ray
import ray.train
from ray import tune
from ray.train.torch import TorchTrainer
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from torchvision.models.detection import FCOS
import yaml

from gid.config import load_config
from gid.distill.teacher import cached_val_ap
from gid.engine.evaluation import evaluate_model_file
from gid.engine.state import CHECKPOINT_FILE
from gid.engine.trainer import run_training
from gid.errors import GidError
from gid.models import read_checkpoint
from search.config import load_sweep
from search.export import export_best
from search.leftovers import Leftovers
from search.experiment import TRIAL_DRIVER_RESOURCES, build_scheduler, build_searcher, fit, trial_trainable
from search.outcomes import best_row
from search.registry import CHAMPION, SEEDS_TAG, VALUE_TAG
from search.report import reference_aps, trial_rows, trials_figure
from search.sweep import run_sweep, sweep_base
from search.trial import FINAL
from search.tracking import (
    CANDIDATE_TAG,
    CHECKPOINT_TAG,
    ERROR_TAG,
    FRAMEWORK_TAG,
    INVOCATION_TAG,
    PORTABLE_CONFIG,
    ROLE_TAG,
    SEED_TAG,
    SOURCE_TAG,
    STATUS_TAG,
    SWEEP_ID_TAG,
    SWEEP_TAG,
    TRIAL_TAG,
    tag_filter,
)
from support import free_port, lines_of, synth_batch, write_base_configs, write_sweep

REPO = Path(__file__).resolve().parent.parent
FRAMEWORKS = ("retinanet", "fcos")
EPOCHS = 2


@pytest.fixture(scope="module")
def workspace(synth_root, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    write_base_configs(synth_root, root, FRAMEWORKS, EPOCHS)
    return root


# A name with a quote: it goes into MLflow filter strings, which have no escapes.
MAIN = "bob's-run"


def runs_of(client: MlflowClient, sweep: str, role: str) -> list:
    experiment = client.get_experiment_by_name("gid-test")
    if experiment is None:  # no sweep has logged yet
        return []
    return client.search_runs([experiment.experiment_id], filter_string=tag_filter({SWEEP_TAG: sweep, ROLE_TAG: role}))


def child_runs(client: MlflowClient, sweep: str) -> list:
    return runs_of(client, sweep, "trial")


@pytest.fixture(scope="module")
def finished_sweep(ray_local, workspace, mlflow_server):
    # no baselines given: the sweep trains each framework's student alone itself
    overrides = ["trials=2"]  # the file says 3; the sweep's MLflow run records the invocation as given
    sweep = load_sweep(write_sweep(workspace, MAIN, mlflow_server, baselines=False, system_metrics_interval_s=1), overrides)
    return sweep, run_sweep(sweep, overrides=overrides)


def test_sweep_runs_every_trial_and_tracks_them_in_mlflow(finished_sweep, mlflow_server, tmp_path):
    sweep, outcome = finished_sweep
    client = MlflowClient(mlflow_server)
    assert sorted(o.framework for o in outcome.frameworks) == sorted(FRAMEWORKS)
    for framework in outcome.frameworks:
        assert len(framework.results) == 2 and not framework.results.errors
        for result in framework.results:  # Tune's table and best-trial line read the AP in percent, one decimal
            assert result.metrics["val_ap_percent"] == round(100 * result.metrics["val_ap"], 1)

    (parent,) = runs_of(client, MAIN, "sweep")
    assert parent.info.status == "FINISHED" and parent.data.params["trials"] == "2"
    assert parent.data.tags["mlflow.note.content"] == outcome.summary  # the run's description in the UI
    # the printed link opens this experiment's runs table, and the UI shows it as model training
    experiment = client.get_experiment(parent.info.experiment_id)
    assert outcome.runs_link == f"{mlflow_server}/#/experiments/{experiment.experiment_id}/runs"
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/summary.md", "report/trials.csv", "report/retinanet_history.png"} <= report
    # the search space, and how the sweep was started
    assert parent.data.params["space.retinanet.distill.gism.top_k"] == "int 1..100 log"
    assert parent.data.params["space.fcos.distill.gism.score_mode"] == "choice ['paper', 'reference']"
    assert "space.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert parent.data.tags[f"{INVOCATION_TAG}.0"].endswith(" start --set trials=2")

    baselines = runs_of(client, MAIN, "baseline")
    assert sorted(r.data.tags[FRAMEWORK_TAG] for r in baselines) == sorted(FRAMEWORKS)
    for run in baselines:  # trained once, on the trials' schedule, and not a GID trial
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/ap")] == [EPOCHS]
        # sampled while it trained, as a trial is
        assert all(0 <= m.value <= 100 for m in client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage"))
        assert run.data.metrics["system/system_memory_usage_megabytes"] > 0
    for framework in outcome.frameworks:  # the summary's teacher and "student alone" columns
        ap = read_checkpoint(framework.baseline)["metrics"]["val_ap"]
        teacher_ap = cached_val_ap(framework.base)  # its file stores none: the sweep measured it once
        rows = trial_rows(framework, "val_ap")
        defaults = next(r for r in rows if r.params == framework.defaults)  # the first trial: the spec's defaults
        best = best_row(rows, "max")
        cells = [100 * teacher_ap, 100 * ap, 100 * defaults.value, 100 * best.value]
        gain = f"{100 * (best.value - ap):+.1f}"
        cost = f"{best.train_time_s / read_checkpoint(framework.baseline)['metrics']['train_time_s']:.1f}×"
        student = f"{best.param_count / 1e6:.2f} M, {best.latency_ms:.1f} ms"  # objective.latency_runs: 5 by default
        row = f"| {framework.framework} | " + " | ".join(f"{c:.1f}" for c in cells) + f" | {gain} | {cost} | {student} |"
        # the same figures as the sweep run's metrics, for MLflow's runs table to compare sweeps by
        fw = framework.framework
        headline = {f"{fw}/teacher_val_ap": teacher_ap, f"{fw}/student_val_ap": ap, f"{fw}/best_val_ap": best.value}
        assert {key: parent.data.metrics[key] for key in headline} == pytest.approx(headline)
        assert row in outcome.summary if defaults.status == "finished" else f"| {defaults.status} |" in outcome.summary

    runs = child_runs(client, MAIN)
    assert len(runs) == 4
    assert len({r.data.tags[TRIAL_TAG] for r in runs}) == 4  # one run per trial
    for run in runs:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags[FRAMEWORK_TAG] in FRAMEWORKS and run.info.status == "FINISHED"
        assert run.data.params["model.framework"] == run.data.tags[FRAMEWORK_TAG]
        assert "distill.gism.top_k" in run.data.params
        enabled = {term: run.data.params[f"distill.{term}.enabled"] == "True" for term in ("feature", "relation", "response")}
        assert any(enabled.values())
        for term, used in enabled.items():  # only the values that matter: none of a switched-off loss
            assert used == any(k.startswith(f"distill.{term}.") and not k.endswith(".enabled") for k in run.data.params)
        history = client.get_metric_history(run.info.run_id, "eval/ap")
        epochs = EPOCHS if run.data.tags[STATUS_TAG] == "finished" else len(history)
        assert [m.step for m in history] == list(range(1, epochs + 1))
        assert not [key for key in run.data.metrics if key.endswith("_percent")]  # Tune's terminal twins stay there
        # the student's cost, pruned trials' too: measured after the first epoch and again after the last
        assert [m.step for m in client.get_metric_history(run.info.run_id, "model/latency_ms")] == list(range(1, epochs + 1))
        assert run.data.metrics["model/latency_ms"] > 0 and run.data.metrics["model/params"] > 1e6
        # what the trial used of the machine, sampled every second in the process that trained it
        cpu = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
        assert cpu and [m.step for m in cpu] == list(range(len(cpu))) and all(0 <= m.value <= 100 for m in cpu)
        assert run.data.metrics["system/system_memory_usage_megabytes"] > 0
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", PORTABLE_CONFIG} <= artifacts
        logged = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read_text())
        folder = Path(logged["run"]["storage_path"]) / logged["run"]["name"]  # where the trial's files really are
        assert any(path.name.startswith("checkpoint_") for path in folder.iterdir())
        assert run.data.tags[SWEEP_ID_TAG] == parent.data.tags[SWEEP_ID_TAG]
        if run.data.tags[STATUS_TAG] == "finished" and run.data.params["distill.feature.enabled"] == "True":
            assert "gi_pictures" in artifacts


def test_the_report_pictures_show_the_finished_trials_and_the_best_ones_gis(finished_sweep, mlflow_server):
    sweep, outcome = finished_sweep
    client = MlflowClient(mlflow_server)
    (parent,) = runs_of(client, MAIN, "sweep")
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    for framework in outcome.frameworks:
        fw = framework.framework
        for name in ("trials", "best_so_far"):
            with Image.open(outcome.report_dir / f"{fw}_{name}.png") as image:
                assert image.format == "PNG" and image.width > 300
            assert f"report/{fw}_{name}.png" in logged
        # what the trials picture plots: one point per trial MLflow marks finished, at its AP
        finished = [r for r in child_runs(client, MAIN) if r.data.tags[FRAMEWORK_TAG] == fw and r.data.tags[STATUS_TAG] == "finished"]
        rows = trial_rows(framework, sweep.objective.metric)
        teacher_ap, baseline_ap = reference_aps(framework)
        lines = lines_of(trials_figure(rows, "val_ap", teacher_ap, baseline_ap, fw))
        assert sorted(lines["finished"][1]) == pytest.approx(sorted(100 * r.data.metrics["eval/ap"] for r in finished))
        assert teacher_ap == cached_val_ap(framework.base)  # its file stores none: the sweep measured it once
        assert f"teacher: val AP {100 * teacher_ap:.1f}" in lines
        assert f"student alone: val AP {100 * baseline_ap:.1f}" in lines  # the one the sweep trained
        # the best trial's GI pictures, as its MLflow run holds them
        best = best_row(rows, sweep.objective.mode)
        (best_run,) = [r for r in finished if r.data.tags[TRIAL_TAG] == best.trial_id]
        copied = sorted(p.name for p in (outcome.report_dir / f"{fw}_best_gi_pictures").iterdir())
        assert copied and copied == sorted(Path(a.path).name for a in client.list_artifacts(best_run.info.run_id, "gi_pictures"))
        assert f"report/{fw}_best_gi_pictures" in logged


def test_gids_defaults_are_the_first_trial(finished_sweep):
    _, outcome = finished_sweep
    first = outcome.frameworks[0].study.trials[0].params
    ratios = [first[f"distill.balance.ratios.{term}"] for term in ("feature", "relation", "response")]
    assert ratios == [1.0, 1.0, 3.0] and first["distill.gism.top_k"] == 10  # the default balance: dynamic 1/1/3
    assert first["distill.gism.score_mode"] == "paper" and first["distill.losses"] == "feature,relation,response"


def test_export_writes_the_best_finished_configs_that_run(finished_sweep, workspace, mlflow_server, tmp_path):
    exported = export_best(tmp_path / "best", tracking_uri=mlflow_server, experiment="gid-test", sweep=MAIN)
    runs = child_runs(MlflowClient(mlflow_server), MAIN)
    for item in exported:
        finished = [r for r in runs if r.data.tags[FRAMEWORK_TAG] == item.framework and r.data.tags[STATUS_TAG] == "finished"]
        best = max(finished, key=lambda r: r.data.metrics["eval/ap"])
        assert item.metrics["val_ap"] == best.data.metrics["eval/ap"]
        config = load_config(item.path)
        assert config.distill is not None and config.model.framework == item.framework
        # what the user's base config said, not the sweep's paths and trial resources
        written = load_config(workspace / f"{item.framework}_gid.yaml")
        assert config.run.storage_path == written.run.storage_path and config.data.root == written.data.root
        assert config.scaling == written.scaling and config.scaling.use_gpu == "auto"
        for key, value in best.data.params.items():
            if key.startswith("distill.gism."):
                assert str(getattr(config.distill.gism, key.split(".")[-1])) == value
    assert (tmp_path / "best" / "README.md").read_text().count(f"| {MAIN} |") == len(exported) == 2

    config = load_config(exported[0].path, ["train.epochs=1", f"run.storage_path={tmp_path / 'runs'}"])
    assert math.isfinite(run_training(config).metrics["loss"])


def test_export_registers_the_best_students_as_the_detectors_gid_eval_loads(
    finished_sweep, mlflow_server, synth_root, tmp_path, monkeypatch
):
    name = "bobs-detector"
    exported = export_best(tmp_path / "best", tracking_uri=mlflow_server, experiment="gid-test", sweep=MAIN, register=name)
    assert [(e.framework, e.registered.version) for e in exported] == [("fcos", "1"), ("retinanet", "2")]
    # the champion: the better by val_ap (of equals, the first registered, which a tie does not displace)
    expected = max(exported, key=lambda e: e.metrics["val_ap"])
    client = MlflowClient(mlflow_server)
    assert client.get_registered_model(name).aliases == {CHAMPION: expected.registered.version}
    version = client.get_model_version(name, expected.registered.version)
    assert version.run_id == expected.run_id and f"models:/{name}/{version.version}" in expected.path.read_text()
    model_file = Path(version.tags[CHECKPOINT_TAG]) / CHECKPOINT_FILE  # the trial's last checkpoint, as Tune kept it
    assert read_checkpoint(model_file)["metrics"]["val_ap"] == pytest.approx(expected.metrics["val_ap"])

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    champion = mlflow.pytorch.load_model(f"models:/{name}@{CHAMPION}")
    images, _ = synth_batch(synth_root, 2)
    with torch.no_grad():
        ours = evaluate_model_file(model_file, "val").model.eval()(images)  # the model `gid eval` measures
        theirs = champion(images)
    for mine, other in zip(ours, theirs, strict=True):
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(other[key], mine[key], rtol=0, atol=0)


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's Chromium, installed here from Debian's packages when it is missing and apt-get can."""
    if shutil.which("chromium") is None and shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], capture_output=True, env=env, timeout=900)
    if (found := shutil.which("chromium")) is None:
        pytest.skip("Chromium is not installed and apt-get cannot install it here: the MLflow UI was not checked in a browser")
    return found


def test_the_mlflow_ui_shows_the_sweep_as_a_person_sees_it(finished_sweep, mlflow_server, tmp_path, chromium):
    export_best(tmp_path / "best", tracking_uri=mlflow_server, experiment="gid-test", sweep=MAIN, register="gid-test-shots")
    out = tmp_path / "shots"
    command = [sys.executable, str(REPO / "docs" / "screenshots.py"), "--tracking-uri", mlflow_server,
               "--experiment", "gid-test", "--sweep", MAIN, "--out", str(out), "--page-text", "--port", str(free_port())]
    subprocess.run(command, check=True, timeout=600)
    for name in ("mlflow_runs", "mlflow_trial_charts", "mlflow_trial_system", "mlflow_sweep_run", "mlflow_registered_model"):
        with Image.open(out / f"{name}.png") as image:
            assert image.width == 1500 and len(set(image.convert("RGB").getdata())) > 50  # a page, not a blank
    runs = (out / "mlflow_runs.txt").read_text()
    assert "Runs" in runs and MAIN in runs and "GenAI apps" not in runs and "Welcome to MLflow" not in runs
    assert "retinanet/" in runs  # the nested trials, expanded under the sweep's run
    charts = (out / "mlflow_trial_charts.txt").read_text()
    assert "Model metrics" in charts
    # MLflow sorts a run's chart sections by name and opens on the first: the trial's AP, then its losses
    assert re.findall(r"^(\w+)\n\(\d+\)$", charts, re.M)[:2] == ["eval", "loss"]
    assert re.search(r"^fcos/\w+ \(eval/ap\)$", charts, re.M)  # its AP chart, drawn
    system = (out / "mlflow_trial_system.txt").read_text()
    assert re.search(r"^fcos/\w+ \(system/cpu_utilization_percentage\)$", system, re.M)
    assert "GID student" in (out / "mlflow_registered_model.txt").read_text()  # the version registered above
    assert f"Sweep {MAIN}" in (out / "mlflow_sweep_run.txt").read_text()  # the summary, as the run's description


def test_two_sweeps_of_one_name_never_touch_each_others_runs(finished_sweep, workspace, mlflow_server, tmp_path):
    # The same name in another storage path (written after the export test, which names MAIN alone).
    path = write_sweep(workspace, MAIN, mlflow_server, frameworks=["fcos"], trials=1, storage_path=str(tmp_path / "other"))
    run_sweep(load_sweep(path))
    client = MlflowClient(mlflow_server)
    parents = {run.data.tags[SWEEP_ID_TAG]: run for run in runs_of(client, MAIN, "sweep")}
    assert len(parents) == 2 and all(run.info.status == "FINISHED" for run in parents.values())
    trials = {id_: [r for r in child_runs(client, MAIN) if r.data.tags[SWEEP_ID_TAG] == id_] for id_ in parents}
    assert sorted(len(runs) for runs in trials.values()) == [1, 4]  # neither marked the other's trials lost
    for id_, runs in trials.items():
        assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parents[id_].info.run_id}
        assert all(r.data.tags[STATUS_TAG] != "lost" for r in runs)

    with pytest.raises(GidError, match="2 sweeps are named"):
        export_best(tmp_path / "best", tracking_uri=mlflow_server, experiment="gid-test", sweep=MAIN)
    (other,) = [id_ for id_, runs in trials.items() if len(runs) == 1]
    (exported,) = export_best(tmp_path / "best", tracking_uri=mlflow_server, experiment="gid-test", sweep=other)
    assert exported.framework == "fcos" and exported.run_id == trials[other][0].info.run_id
    with pytest.raises(GidError, match="holds both quote characters"):
        export_best(tmp_path / "best", tracking_uri=mlflow_server, experiment="gid-test", sweep="bob's \"run\"")


def test_export_takes_the_best_in_the_direction_the_sweep_optimised(ray_local, workspace, mlflow_server, tmp_path):
    """A sweep that minimises its objective: `gid export` writes the summary's best trial, not its worst."""
    name = "lowest-loss"
    path = write_sweep(
        workspace, name, mlflow_server, frameworks=["fcos"], trials=2, objective={"metric": "loss", "mode": "min"},
        scheduler={"type": "none"}, storage_path=str(tmp_path / "sweeps"),
    )
    (framework,) = run_sweep(load_sweep(path)).frameworks
    rows = trial_rows(framework, "loss")
    assert len({row.value for row in rows}) == 2  # two different losses: the direction decides
    (exported,) = export_best(tmp_path / "best", tracking_uri=mlflow_server, experiment="gid-test", sweep=name, metric="loss")
    assert exported.trial_id == best_row(rows, "min").trial_id


def test_cpu_latency_is_a_second_objective_optuna_gets_from_every_trial(ray_local, workspace, mlflow_server, tmp_path):
    """Tune checks from the first epoch that each result holds every objective: the cost is in each one, and the study
    gets each trial's AP and latency, ASHA's pruned trials too (at their last epoch)."""
    path = write_sweep(
        workspace, "pareto", mlflow_server, frameworks=["fcos"], trials=2, storage_path=str(tmp_path / "sweeps"),
        objective={"metric": "val_ap", "second_metric": "latency_ms", "latency_runs": 2},
    )
    (framework,) = run_sweep(load_sweep(path)).frameworks
    assert not framework.results.errors
    assert framework.study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    told = [t for t in framework.study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    rows = trial_rows(framework, "val_ap")
    assert sorted(t.values[1] for t in told) == sorted(r.latency_ms for r in rows) and len(told) == 2
    assert all(latency > 0 for latency in (r.latency_ms for r in rows))


def test_a_trial_stopped_early_frees_its_train_workers_for_the_next(ray_local, workspace):
    # Each trial's two Train workers ask for 3 of the 4 CPUs: had the first trial's placement group
    # leaked after Tune stopped it mid-training, the second trial could never start. Run by the sweep's
    # own `fit`, with the cleanup after it that such experiments get.
    base = load_config(
        workspace / "retinanet_gid.yaml", ["train.epochs=3", "scaling.num_workers=2", "scaling.cpus_per_worker=1.5"]
    )
    trainable = trial_trainable(base, str(workspace / "stopped"))
    tuner = tune.Tuner(
        trainable,
        param_space={"distill.gism.top_k": tune.grid_search([5, 10])},
        tune_config=tune.TuneConfig(max_concurrent_trials=1, time_budget_s=240),
        run_config=tune.RunConfig(name="stopped", storage_path=str(workspace / "tune"), stop={"epoch": 1}),
    )
    results = fit(tuner, base)
    assert len(results) == 2 and not results.errors
    assert [r.metrics["epoch"] for r in results] == [1, 1]


def record_span(config: dict) -> None:
    started = time.time()
    time.sleep(3)
    Path(config["out"]).write_text(f"{started} {time.time()}")


def test_concurrent_trials_train_side_by_side_when_their_workers_fill_the_cluster(ray_local, tmp_path):
    # Each trial's worker asks for half the cluster's CPUs: had each trial function held a share of a
    # CPU itself, the second trial's worker would have waited for the first's to finish.
    cpus = ray.cluster_resources()["CPU"] / 2

    def drive(config: dict) -> None:
        out = tmp_path / f"{config['trial']}.span"
        TorchTrainer(
            record_span, train_loop_config={"out": str(out)},
            scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": cpus}),
            run_config=ray.train.RunConfig(name=f"side{config['trial']}", storage_path=str(tmp_path / "train")),
        ).fit()

    tune.Tuner(
        tune.with_resources(drive, TRIAL_DRIVER_RESOURCES), param_space={"trial": tune.grid_search([0, 1])},
        tune_config=tune.TuneConfig(max_concurrent_trials=2),
        run_config=tune.RunConfig(name="side", storage_path=str(tmp_path / "tune"), verbose=0),
    ).fit()
    (start0, end0), (start1, end1) = [map(float, (tmp_path / f"{t}.span").read_text().split()) for t in (0, 1)]
    assert start0 < end1 and start1 < end0  # the two trials trained at the same time


@ray.remote(num_cpus=0)
class TrainController:
    """Stands in for a Ray Train controller (the cleanup finds controllers by class name)."""

    def __init__(self):
        self.groups = []

    def ask_for_workers(self, cpus: float = 1000, lifetime: str | None = None) -> str:
        # 1000 CPUs: never granted, like a busy cluster's; a detached group outlives its creator like a leaked one
        self.groups.append(placement_group([{"CPU": cpus}], lifetime=lifetime))
        return self.groups[-1].id.hex()

    def alive(self) -> bool:
        return True


@ray.remote(num_cpus=0)
class ImplicitFunc:
    """Stands in for a Tune trial (Tune's actor class for a function trainable) whose controllers outlive it."""

    def start_controllers(self) -> tuple[ray.actor.ActorHandle, list[str]]:
        self.orphan = TrainController.remote()  # still asking for workers after its trial ended
        groups = [ray.get(self.orphan.ask_for_workers.remote()) for _ in range(2)]
        dead = TrainController.remote()  # died, leaving a granted group behind
        groups.append(ray.get(dead.ask_for_workers.remote(cpus=1, lifetime="detached")))
        ray.kill(dead)
        return self.orphan, groups


def live_group_ids() -> set[str]:
    return {id_ for id_, group in ray.util.placement_group_table().items() if group["state"] != "REMOVED"}


def test_what_an_experiment_left_running_is_ended_and_nothing_else(ray_local):
    kept_controller, kept_group = TrainController.remote(), placement_group([{"CPU": 1}])
    ray.get([kept_group.ready(), kept_controller.alive.remote()])
    leftovers = Leftovers()
    trial = ImplicitFunc.remote()
    orphan, trial_groups = ray.get(trial.start_controllers.remote())
    # Another Train run of the same driver, started during the experiment: not the experiment's to end.
    other_run = TrainController.remote()
    other_group = ray.get(other_run.ask_for_workers.remote(cpus=1))
    ray.get(PlacementGroup(ray.PlacementGroupID.from_hex(other_group)).ready())
    assert set(trial_groups) <= live_group_ids()

    assert leftovers.end(quiet_s=2.0) == 1
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(orphan.alive.remote(), timeout=60)
    live = live_group_ids()  # (Ray may meanwhile clean up earlier tests' groups itself)
    assert not live & set(trial_groups)
    assert {kept_group.id.hex(), other_group} <= live  # what the experiment did not start stays
    assert ray.get([kept_controller.alive.remote(), other_run.alive.remote()]) == [True, True]
    for actor in (kept_controller, other_run, trial):
        ray.kill(actor)
    remove_placement_group(kept_group)


def test_a_nan_trial_fails_with_its_reason_and_the_sweep_goes_on(ray_local, workspace, mlflow_server):
    space = {"distill.feature.weight": {"type": "choice", "values": [0.005, float("inf")]}}
    path = write_sweep(
        workspace, "nan", mlflow_server, frameworks=["retinanet"], space=space, trials=2,
        scheduler={"type": "none"}, sampler={"type": "random", "seed": 3},  # the defaults, then inf
    )
    outcome = run_sweep(load_sweep(path))
    (framework,) = outcome.frameworks
    assert len(framework.results) == 2
    statuses = {r.data.tags[STATUS_TAG] for r in child_runs(MlflowClient(mlflow_server), "nan")}
    assert statuses == {"finished", "failed"}
    for run in child_runs(MlflowClient(mlflow_server), "nan"):
        if run.data.tags[STATUS_TAG] == "failed":
            assert run.info.status == "FAILED" and "training loss became" in run.data.tags[ERROR_TAG]
    assert "Failed trials:" in outcome.summary and "training loss became" in outcome.summary


def test_an_epoch_budget_ends_the_sweep_once_spent(ray_local, workspace, mlflow_server):
    path = write_sweep(
        workspace, "budget", mlflow_server, frameworks=["fcos"], trials=10, budget_epochs=3,
        scheduler={"type": "none"}, resources={"max_concurrent_trials": 1},
    )
    (framework,) = run_sweep(load_sweep(path)).frameworks
    epochs = [int((r.metrics or {}).get("epoch", 0)) for r in framework.results]
    # two-epoch trials: the first finishes, the second is stopped after one epoch, none follows
    assert sum(epochs) == 3 and len(framework.results) < 10
    # a resumed sweep counts what it already spent, and trains no more
    (framework,) = run_sweep(load_sweep(path), resume=True).frameworks
    assert sorted(int((r.metrics or {}).get("epoch", 0)) for r in framework.results) == sorted(epochs)


def test_finalize_retrains_the_best_over_seeds_and_export_takes_its_winner(
    ray_local, workspace, mlflow_server, tmp_path, monkeypatch
):
    path = write_sweep(
        workspace, "final", mlflow_server, frameworks=["fcos"], trials=2, scheduler={"type": "none"},
        finalize={"top": 1, "seeds": 2, "overrides": ["train.epochs=1"]},
        tracking={"tracking_uri": mlflow_server, "experiment": "gid-test", "registered_model": "final-fcos"},
    )
    outcome = run_sweep(load_sweep(path))
    (framework,) = outcome.frameworks
    client = MlflowClient(mlflow_server)
    trials = {r.data.tags[TRIAL_TAG]: r.data.metrics["eval/ap"] for r in child_runs(client, "final")}
    best_trial = framework.final[0].source  # the best trial (of equals, the one Tune listed first)
    assert trials[best_trial] == max(trials.values())
    final = runs_of(client, "final", FINAL)
    # the best trial and the student alone, each on two new seeds, with the stage's overrides (one epoch)
    assert sorted((r.data.tags[CANDIDATE_TAG], r.data.tags[SEED_TAG]) for r in final) == [
        ("1", "1"), ("1", "2"), ("student", "1"), ("student", "2")
    ]
    for run in final:
        assert run.data.tags[STATUS_TAG] == "finished" and run.data.params["train.seed"] == run.data.tags[SEED_TAG]
        assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/ap")] == [1]
        assert run.data.tags[SOURCE_TAG] == (best_trial if run.data.tags[CANDIDATE_TAG] == "1" else "")
    winner_runs = [r for r in final if r.data.tags[CANDIDATE_TAG] == "1"]
    mean = sum(r.data.metrics["eval/ap"] for r in winner_runs) / 2
    (gid, student) = framework.final
    assert gid.source == best_trial and gid.mean == pytest.approx(mean) and student.label == "student"
    # in MLflow a run per configuration holds its mean and spread, its seeds' runs nested in it
    groups = {r.data.tags[CANDIDATE_TAG]: r for r in runs_of(client, "final", "candidate")}
    assert sorted(groups) == ["1", "student"]
    for score in framework.final:
        group = groups[score.label]
        assert group.data.tags["mlflow.parentRunId"] == runs_of(client, "final", "sweep")[0].info.run_id
        assert group.data.metrics["eval/ap_mean"] == pytest.approx(score.mean)
        assert group.data.metrics["eval/ap_std"] == pytest.approx(score.std) and group.data.metrics["seeds"] == 2
    for run in runs_of(client, "final", FINAL):
        assert run.data.tags["mlflow.parentRunId"] == groups[run.data.tags[CANDIDATE_TAG]].info.run_id

    (exported,) = export_best(tmp_path / "best", tracking_uri=mlflow_server, experiment="gid-test", sweep="final")
    assert exported.trial_id == best_trial and exported.seeds == 2
    assert exported.metrics["val_ap"] == pytest.approx(mean)
    assert load_config(exported.path).train.epochs == 1  # the configuration as finalized

    # tracking.registered_model: at the sweep's end, the winner's config exported into the sweep's folder and the
    # student of its first seed registered, ranked by the mean
    (registered,) = outcome.exported
    assert registered.path.parent == (workspace / "sweeps" / "final" / "export").resolve()
    assert registered.trial_id == best_trial and (registered.registered.version, registered.registered.champion) == ("1", "1")
    version = client.get_model_version("final-fcos", "1")
    assert (version.tags[SOURCE_TAG], version.tags[SEED_TAG], version.tags[SEEDS_TAG]) == (best_trial, "1", "2")
    assert float(version.tags[VALUE_TAG]) == pytest.approx(mean)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    assert type(mlflow.pytorch.load_model(f"models:/final-fcos@{CHAMPION}")) is FCOS

    # resuming a finished sweep re-trains nothing, and registers nothing twice
    resumed = run_sweep(load_sweep(path), resume=True)
    (again,) = resumed.frameworks
    assert [(s.label, s.scores) for s in again.final] == [(s.label, s.scores) for s in framework.final]
    assert len(runs_of(client, "final", FINAL)) == 4 and len(runs_of(client, "final", "candidate")) == 2
    assert [e.registered.version for e in resumed.exported] == ["1"]
    assert len(client.search_model_versions("name = 'final-fcos'")) == 1


def checkpoint_files(folder: Path) -> list[tuple[str, int]]:
    """A trial's checkpoints, each with its model file's time: the same if nothing trained again."""
    return sorted((p.name, (p / CHECKPOINT_FILE).stat().st_mtime_ns) for p in folder.glob("checkpoint_*"))


def test_a_killed_sweep_resumes_without_rerunning_finished_trials(ray_local, workspace, mlflow_server, tmp_path):
    path = write_sweep(
        workspace, "resume", mlflow_server, frameworks=["retinanet"], trials=2,
        scheduler={"type": "none"}, resources={"max_concurrent_trials": 1},
    )
    sweep = load_sweep(path)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "PYTHONUNBUFFERED": "1"}
    terminal = tmp_path / "terminal.txt"
    with terminal.open("w") as out:
        driver = subprocess.Popen(
            [sys.executable, "-m", "gid.cli", "sweep", str(path), "--address", ray_local.get_runtime_context().gcs_address],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )
    client = MlflowClient(mlflow_server)
    deadline = time.time() + 300
    while not any(r.data.tags.get(STATUS_TAG) == "finished" for r in child_runs(client, "resume")):
        assert driver.poll() is None and time.time() < deadline, "the sweep ended before a trial finished"
        time.sleep(2)
    time.sleep(8)  # let Tune write its experiment state after the finished trial
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    # what a person saw until then: Tune's trial table and a line per epoch, nothing of Ray's own output
    seen = terminal.read_text()
    assert "| run_trial_" in seen and re.search(r"^retinanet \w+  epoch 2/2  loss \d", seen, re.MULTILINE), seen
    assert "pid=" not in seen and "WARNING" not in seen, seen
    finished_before = {r.data.tags[TRIAL_TAG] for r in child_runs(client, "resume") if r.data.tags.get(STATUS_TAG) == "finished"}
    # One-worker trials keep their checkpoints in their Tune trial's folder; Tune numbers them from 0.
    trial_folder = workspace / "sweeps/resume/resume-retinanet"
    checkpoints = {t: checkpoint_files(trial_folder / t) for t in finished_before}
    assert all(len(files) == EPOCHS for files in checkpoints.values()), checkpoints

    # A trial that started just before the kill, after Tune last saved its state: its run stays open.
    experiment_id = client.get_experiment_by_name("gid-test").experiment_id
    (parent,) = runs_of(client, "resume", "sweep")
    tags = {SWEEP_TAG: "resume", SWEEP_ID_TAG: parent.data.tags[SWEEP_ID_TAG], FRAMEWORK_TAG: "retinanet",
            TRIAL_TAG: "lost0000", ROLE_TAG: "trial"}
    unsaved = client.create_run(experiment_id, tags=tags).info.run_id

    with pytest.raises(GidError, match="already exists"):
        run_sweep(sweep)
    outcome = run_sweep(sweep, resume=True, overrides=["resources.max_concurrent_trials=1"])
    assert len(outcome.frameworks[0].results) == 2
    (parent,) = runs_of(client, "resume", "sweep")
    invocations = [parent.data.tags[f"{INVOCATION_TAG}.{n}"] for n in range(2)]
    assert invocations[0].endswith(" start") and invocations[1].endswith(" resume --set resources.max_concurrent_trials=1")
    all_runs = child_runs(client, "resume")
    lost = [r for r in all_runs if r.data.tags[STATUS_TAG] == "lost"]
    assert unsaved in {r.info.run_id for r in lost} and all(r.info.status == "KILLED" for r in lost)
    runs = [r for r in all_runs if r not in lost]
    assert len(runs) == 2 and len({r.data.tags[TRIAL_TAG] for r in runs}) == 2  # no duplicate runs
    assert all(r.data.tags[STATUS_TAG] == "finished" for r in runs)
    for trial_id in finished_before:  # finished trials were not trained again
        assert checkpoint_files(trial_folder / trial_id) == checkpoints[trial_id]
    for run in runs:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "epoch")]
        assert steps == sorted(set(steps)) == list(range(1, EPOCHS + 1))


def test_tpe_leaves_random_sampling_after_its_startup_trials(workspace, tmp_path):
    def suggestions(startup_trials: int) -> list[dict]:
        sampler = {"type": "tpe", "seed": 0, "paper_defaults_first": False, "startup_trials": startup_trials}
        sweep = load_sweep(write_sweep(workspace, f"startup{startup_trials}", "sqlite:///unused.db", sampler=sampler))
        space = sweep.space_for(sweep.base_config("retinanet"))
        searcher = build_searcher(sweep, space, "sweep-retinanet", f"sqlite:///{tmp_path / f'optuna{startup_trials}.db'}")
        configs = []
        for i in range(4):
            config = searcher.suggest(f"trial{i}")
            searcher.on_trial_complete(f"trial{i}", {"val_ap": config["distill.gism.top_k"] / 100})
            configs.append(config)
        return configs

    early, default = suggestions(2), suggestions(10)
    assert early[:2] == default[:2]  # both still random, from the same seed
    assert early[2:] != default[2:]  # TPE's model has taken over in the first sweep only


def test_the_sweep_files_tpe_settings_reach_optunas_sampler(workspace, tmp_path):
    # Two trials finished, then two started together: with constant_liar the second counts the first as a bad
    # result and samples elsewhere; without it, TPE's model has nothing new to go on.
    def concurrent_suggestions(name: str, **tpe: bool) -> list[dict]:
        sampler = {"type": "tpe", "seed": 0, "paper_defaults_first": False, "startup_trials": 2, **tpe}
        sweep = load_sweep(write_sweep(workspace, name, "sqlite:///unused.db", sampler=sampler))
        space = sweep.space_for(sweep.base_config("retinanet"))
        searcher = build_searcher(sweep, space, "sweep-retinanet", f"sqlite:///{tmp_path / f'{name}.db'}")
        for i in range(2):
            config = searcher.suggest(f"trial{i}")
            searcher.on_trial_complete(f"trial{i}", {"val_ap": config["distill.gism.top_k"] / 100})
        return [searcher.suggest(f"trial{i}") for i in (2, 3)]

    liar, honest = concurrent_suggestions("liar"), concurrent_suggestions("honest", constant_liar=False)
    assert liar[0] == honest[0] and liar[1] != honest[1]
    assert concurrent_suggestions("independent", multivariate=False)[0] != liar[0]  # a value at a time


def test_asha_may_stop_trials_only_in_the_last_third_of_their_schedule_by_default(workspace):
    sweep = load_sweep(write_sweep(workspace, "grace", "sqlite:///unused.db", scheduler={"type": "asha"}))
    assert [sweep.scheduler.grace_period_for(epochs) for epochs in (1, 2, 3, 12)] == [1, 2, 2, 8]
    rungs = build_scheduler(sweep, 3)._brackets[0]._rungs  # (epoch, results) of each point ASHA may stop at
    assert [epoch for epoch, _ in rungs] == [2]


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"space": {}}, "the search space is empty"),
        ({"space": {"distill.gism.top_k": {"type": "int", "low": 50, "high": 5}}}, "must be below high"),
        ({"space": {"distill.gism.nonsense": {"type": "float", "low": 0.1, "high": 0.2}}}, "unknown key"),
        ({"space": {"distill.gism.nms_iou": {"type": "float", "low": 0.5, "high": 2.0}}}, "distill.gism.nms_iou"),
        ({"frameworks": {"yolo": {"config": "x.yaml"}}}, "frameworks.yolo"),
        ({"trials": 0}, "trials: Input should be greater than or equal to 1"),
        ({"sampler": {"type": "random", "startup_trials": 3}}, "startup_trials applies to sampler.type tpe only"),
        ({"sampler": {"type": "random", "constant_liar": False}}, "constant_liar applies to sampler.type tpe only"),
        ({"finalize": {"overrides": ["train.epochs=0"]}}, "with finalize.overrides: train.epochs"),
        ({"finalize": {"seeds": 0}}, "finalize.seeds"),
        ({"scheduler": {"grace_period": 0}}, "grace_period must be 'auto' or at least 1"),
        ({"objective": {"second_metric": "latency"}}, "second_metric 'latency' is not a metric every trial reports"),
        ({"objective": {"second_metric": "latency_ms", "latency_runs": 0}}, "latency_ms needs latency_runs of 1 or more"),
    ],
)
def test_bad_sweep_files_fail_before_any_compute(workspace, tmp_path, change, expected):
    path = write_sweep(workspace, "bad", "sqlite:///unused.db", **change)
    with pytest.raises(GidError, match=expected):
        sweep = load_sweep(path)
        for framework in sweep.frameworks:
            sweep.base_config(framework)


def test_trials_time_their_students_cost_as_the_sweep_file_says(workspace):
    sweep = load_sweep(write_sweep(workspace, "cost", "sqlite:///unused.db", objective={"latency_runs": 3}))
    assert sweep_base(sweep, sweep.base_config("fcos")).train.latency_runs == 3
    default = load_sweep(write_sweep(workspace, "cost", "sqlite:///unused.db"))
    assert sweep_base(default, default.base_config("fcos")).train.latency_runs == 5  # whatever the base config says
