"""The Ray Train loop on a real local Ray instance: DDP on CPU workers, checkpoints, resume; and the loop in this process."""

import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

from support import EpochLog, EvaluatingRanks

from gid.cli import main
from gid.data import build_dataset
from gid.engine import loop
from gid.engine.latency import parameter_count
from gid.config import TrainConfig
from gid.engine.loop import apply_gradients
from gid.engine.state import build_optimizer, load_optimizer_state
from gid.engine.trainer import MODEL_FILE, build_trainer, run_training
from gid.models import load_model, read_checkpoint


def test_two_workers_train_checkpoint_and_resume(ray_local, tiny_config, tmp_path):
    config = tiny_config("retinanet",
        train={"epochs": 2}, scaling={"num_workers": 2, "use_gpu": False},
    )
    log, evaluating = tmp_path / "epochs.txt", tmp_path / "evaluating_ranks.txt"
    started = time.time()
    result = build_trainer(config, callbacks=[EpochLog(log), EvaluatingRanks(evaluating)]).fit()
    assert result.metrics["epoch"] == 2
    assert 0.0 <= result.metrics["val_ap"] <= 1.0
    assert result.metrics["loss"] > 0 and result.metrics["loss_gt_classification"] > 0
    # a worker holds a detector, its data and optimizer: well over 100 MiB resident
    assert 100 < result.metrics["memory_peak_mb"] < 64 * 1024
    assert started < result.metrics["first_step_at"] < time.time()
    assert log.read_text().split() == ["1", "2"]
    assert evaluating.read_text().splitlines() == ["0", "0"]  # only rank 0 runs COCO evaluation
    assert result.checkpoint is not None

    # Same run name and storage: the second run picks up the epoch-2 checkpoint instead of starting over.
    log.unlink()
    resumed = tiny_config("retinanet",
        train={"epochs": 3}, scaling={"num_workers": 2, "use_gpu": False},
    )
    trained_for = result.metrics["train_time_s"]
    result = build_trainer(resumed, callbacks=[EpochLog(log)]).fit()
    assert log.read_text().split() == ["3"]
    assert result.metrics["epoch"] == 3
    # the run's training time goes on from the checkpoint's, not from zero
    assert result.metrics["train_time_s"] == trained_for + result.metrics["epoch_time_s"]


def test_run_training_exports_a_model_file_and_returns_every_epochs_metrics(ray_local, tiny_config, tmp_path):
    config = tiny_config("fcos", run={"name": "export"}, train={"epochs": 2, "eval_every": 2})
    outcome = run_training(config)
    assert outcome.model_path == outcome.run_path / MODEL_FILE
    model, stored, num_classes = load_model(outcome.model_path)
    assert stored.model.framework == "fcos" and num_classes == 7
    # what each label means, as the data set names its categories (label 0 is the background)
    names = build_dataset(config.data, "train", train=False).class_names
    assert read_checkpoint(outcome.model_path)["class_names"] == names and len(names) == num_classes - 1
    assert set(outcome.metrics) >= {"epoch", "loss", "val_ap", "val_ap50", "val_ap75", "val_aps", "val_apm", "val_apl"}
    # what each epoch cost: training, evaluation (only in the epochs that evaluate) and writing the checkpoint
    assert [m["epoch"] for m in outcome.history] == [1, 2]
    assert ["eval_time_s" in m for m in outcome.history] == [False, True]
    assert all(m["epoch_time_s"] > 0 and m["checkpoint_time_s"] > 0 for m in outcome.history)
    assert [m["train_time_s"] for m in outcome.history] == [
        outcome.history[0]["epoch_time_s"], outcome.history[0]["epoch_time_s"] + outcome.history[1]["epoch_time_s"]
    ]


class InThisProcess:
    """The loop's session as a one-worker sweep trial's, keeping each epoch's metrics (search.trial.TuneTrial)."""

    rank, device = 0, torch.device("cpu")

    def __init__(self) -> None:
        self.reports: list[dict] = []

    def resume_from(self) -> None:
        return None

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def prepare_loader(self, loader):
        return loader

    def report(self, metrics: dict, directory: str | None) -> None:
        self.reports.append(dict(metrics))


def test_the_students_cost_is_reported_from_the_first_epoch_and_measured_again_after_the_last(tiny_config, monkeypatch):
    monkeypatch.setattr(loop, "configure_worker_logging", lambda: None)  # leave this process's logging alone
    monkeypatch.setattr(loop.ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "here"))  # no Ray
    timed, cpu_cost = [], loop.cpu_cost
    monkeypatch.setattr(loop, "cpu_cost", lambda model, *args: timed.append((model, *args)) or cpu_cost(model, *args))
    session = InThisProcess()
    loop.train_loop(tiny_config("fcos", train={"epochs": 3, "latency_runs": 2}).to_dict(), session)
    assert [args[1:] for args in timed] == [(64, 2), (64, 2)]  # after epochs 1 and 3: on data.image_size
    student = timed[0][0]
    assert all(m["params"] == parameter_count(student) for m in session.reports)
    latency = [m["latency_ms"] for m in session.reports]
    assert latency[0] == latency[1] > 0 and latency[2] > 0  # every epoch reports it: a sweep may rank by it
    assert student.training  # timed in eval mode, handed back in training mode


def test_the_loops_sgd_is_one_fused_update_that_follows_torchs_reference_sgd():
    train = TrainConfig(lr=0.1)
    torch.manual_seed(0)
    start = torch.randn(1000)
    weights = [torch.nn.Parameter(start.clone()) for _ in range(2)]
    fused = build_optimizer([weights[0]], train)
    reference = torch.optim.SGD(  # torch's default on a CPU: a Python loop over the tensors
        [weights[1]], lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay, foreach=False
    )
    assert fused.defaults["fused"]
    for step in range(5):
        for weight, optimizer in zip(weights, (fused, reference), strict=True):
            optimizer.zero_grad()
            ((weight**2).sum() * (step + 1)).backward()
            optimizer.step()
    assert not torch.equal(weights[0].detach(), start)
    torch.testing.assert_close(weights[0], weights[1])  # the same steps, to float rounding


def test_a_resumed_run_updates_as_its_sittings_device_calls_for_not_as_it_was_saved():
    # saved fused on a CPU, resumed under a GPU's AMP scaler: momentum and LR come back, the fused kernel does not
    weight = torch.nn.Parameter(torch.ones(3))
    saved = build_optimizer([weight], TrainConfig(lr=0.1))
    weight.grad = torch.ones(3)
    saved.step()
    resumed = build_optimizer([weight], TrainConfig(lr=0.5), scaled=True)
    load_optimizer_state(resumed, saved.state_dict())
    momentum = saved.state[weight]["momentum_buffer"]
    assert resumed.param_groups[0]["lr"] == 0.1 and torch.equal(resumed.state[weight]["momentum_buffer"], momentum)
    assert resumed.param_groups[0]["fused"] is None  # torch's load_state_dict alone would make it True


def test_the_lr_schedule_waits_while_amp_skips_overflowed_steps():
    weight = torch.nn.Parameter(torch.ones(2))
    # the loop's SGD with AMP's scaler: not fused, whose kernel would skip the step after the loop saw it taken
    optimizer = build_optimizer([weight], TrainConfig(lr=1.0, momentum=0.0, weight_decay=0.0), scaled=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 0.5**it)
    scaler = torch.amp.GradScaler("cpu")  # the CUDA scaler's logic, runnable without a GPU
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        apply_gradients((weight * float("inf")).sum(), optimizer, scaler, scheduler, [weight], None)
        assert torch.equal(weight.detach(), torch.ones(2))  # AMP skipped the overflowed step...
        assert scheduler.last_epoch == 0  # ...and the schedule waited with it
        apply_gradients(weight.sum(), optimizer, scaler, scheduler, [weight], clip_grad_norm=10.0)
    assert torch.equal(weight.detach(), torch.zeros(2))  # a full step at the first LR (1.0)
    assert scheduler.last_epoch == 1 and scheduler.get_last_lr() == [0.5]


def test_a_users_own_detectors_train_and_distil_through_gid(ray_local, tiny_config, tmp_path, capsys):
    def write(config) -> Path:
        path = tmp_path / f"{config.run.name}.yaml"
        path.write_text(yaml.safe_dump(config.to_dict()))
        return path

    def run(command: str, config) -> Path:
        assert main([command, str(write(config))]) == 0
        return Path(config.run.storage_path) / config.run.name / MODEL_FILE

    teacher = run("train", tiny_config("retinanet", model={"builder": "support:user_retinanet_teacher"}, run={"name": "own_teacher"}))
    student_config = tiny_config(
        "retinanet", model={"builder": "support:user_retinanet"}, run={"name": "own_student"},
        distill={"teacher": str(teacher)},
    )
    alone = run("train", tiny_config("retinanet", model={"builder": "support:user_retinanet"}, run={"name": "own_alone"}))
    capsys.readouterr()
    assert main(["distill", str(write(student_config)), "--baseline", str(alone)]) == 0
    student = Path(student_config.run.storage_path) / student_config.run.name / MODEL_FILE
    printed = capsys.readouterr().out.splitlines()
    teacher_ap = read_checkpoint(teacher)["metrics"]["val_ap"]
    assert f"teacher: AP {100 * teacher_ap:.1f}" in printed
    # what GID cost against the student trained alone, from the two model files
    gid, plain = read_checkpoint(student)["metrics"], read_checkpoint(alone)["metrics"]
    (cost,) = [line for line in printed if line.startswith(f"against the student alone ({alone}): ")]
    assert f"{100 * (gid['val_ap'] - plain['val_ap']):+.1f} AP" in cost
    assert f"for {gid['train_time_s'] / plain['train_time_s']:.1f}× the training time" in cost
    assert read_checkpoint(student)["metrics"]["teacher_val_ap"] == teacher_ap  # in every report, so in MLflow
    model, stored, _ = load_model(student)
    assert stored.model.builder == "support:user_retinanet" and set(model.backbone.body) == {"stem", "c3", "c4", "c5"}
    assert read_checkpoint(student)["metrics"]["loss_feature"] > 0  # GID ran on the user's detectors


def test_loader_workers_auto_loads_beside_the_step_on_a_gpu_only(tiny_config):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    for cpus, expected in ((1, 0), (2, 1), (5, 4), (16, 4)):  # the worker's CPUs but the one that trains, at most 4
        config = tiny_config(scaling={"cpus_per_worker": cpus})
        assert config.data.loader_workers == "auto"
        assert loop.loader_workers(config, gpu) == expected
        assert loop.loader_workers(config, cpu) == 0  # on a CPU the step needs every core
    assert loop.loader_workers(tiny_config(data={"loader_workers": 2}), cpu) == 2  # a number is kept as given
