"""What a run's checkpoint holds, how a run's state starts, and how it resumes."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gid.config import Config, TrainConfig
from gid.engine.session import Session
from gid.models import read_checkpoint, save_model

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"


def gradient_balance(config: Config, trainable: nn.Module):
    """What sets a Distiller's weights from gradients (``distill.balance.mode`` gradient or dynamic), or None."""
    if config.distill is None:
        return None
    from gid.distill.balance import build_balance

    return build_balance(config.distill.balance, trainable)


def lr_lambda(train: TrainConfig, total_iters: int):
    """Linear warm-up, then step decay at fractions of training or cosine decay to zero."""
    milestones = [int(m * total_iters) for m in train.milestones]

    def factor(it: int) -> float:
        warmup = 1.0
        if it < train.warmup_iters:
            alpha = it / train.warmup_iters
            warmup = train.warmup_factor * (1 - alpha) + alpha
        if train.schedule == "cosine":
            return warmup * 0.5 * (1 + math.cos(math.pi * min(it, total_iters) / total_iters))
        return warmup * train.gamma ** sum(it >= m for m in milestones)

    return factor


@dataclass
class TrainingState:
    """Everything a run's checkpoint restores, written by :meth:`save` and read back by :meth:`load`.

    The file is a model file (the student's weights, the config, the epoch, the metrics) plus the
    optimizer, LR schedule and AMP scaler, and for a distillation the adapter and the gradient balance.
    """

    trainable: nn.Module  # a Distiller or a StudentAlone
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    balance: Any  # gid.distill.balance's GradientBalance or DynamicBalance; None for fixed weights
    epoch: int = 0  # epochs trained
    train_time_s: float = 0.0  # in training steps, over every sitting of the run

    # A checkpoint written without a balance (fixed weights, or a gid before calibration) leaves it as built.
    _OPTIONAL = ("balance",)

    @property
    def params(self) -> list[nn.Parameter]:
        """The parameters trained (the student's and the adapter's)."""
        return self.optimizer.param_groups[0]["params"]

    def _parts(self) -> dict[str, Any]:
        """What is saved beside the model, by its key in the file."""
        parts = {"optimizer": self.optimizer, "scheduler": self.scheduler, "scaler": self.scaler}
        if self.trainable.adapter is not None:
            parts["adapter"] = self.trainable.adapter
        if self.balance is not None:
            parts["balance"] = self.balance
        return parts

    def save(
        self, path: Path, config: Config, num_classes: int, metrics: dict[str, Any], class_names: list[str] | None = None
    ) -> None:
        training_state = {key: part.state_dict() for key, part in self._parts().items()}
        save_model(
            self.trainable.student, config, num_classes, path, epoch=self.epoch,
            metrics={**metrics, "train_time_s": self.train_time_s}, training_state=training_state,
            class_names=class_names,
        )

    def load(self, path: Path) -> None:
        saved = read_checkpoint(path)
        self.trainable.student.load_state_dict(saved["model"])
        for key, part in self._parts().items():
            if key == "optimizer":
                load_optimizer_state(part, saved[key])
            elif key in saved or key not in self._OPTIONAL:
                part.load_state_dict(saved[key])
        self.epoch = saved["epoch"]
        self.train_time_s = saved.get("metrics", {}).get("train_time_s", 0.0)


def build_optimizer(params: list[nn.Parameter], train: TrainConfig, scaled: bool = False) -> torch.optim.SGD:
    """SGD over ``params`` as one fused update: a kernel per step on a GPU, and on a CPU no Python loop over the
    parameter tensors (torch's default there), half the time of the update (benchmarks/optimizer_step.py).

    ``scaled``: AMP's gradient scaler is on (a GPU). Then torch's ``foreach`` update instead: a fused one takes
    AMP's skip of an overflowed step inside its kernel, after the step hook by which the loop holds its LR
    schedule back on skipped steps (:func:`gid.engine.loop.apply_gradients`). A resumed run keeps the
    implementation this sitting's device calls for, whatever its checkpoint was saved with
    (:func:`load_optimizer_state`)."""
    fused = None if scaled else True  # None: torch's choice, foreach on a GPU
    return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay, fused=fused)


_IMPLEMENTATION = ("fused", "foreach")  # how an update runs: a choice of the sitting's device, not of the run's state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a checkpoint's optimizer ``state`` (momentum, hyperparameters) but keep how ``optimizer`` updates:
    torch's ``load_state_dict`` takes the saved groups' ``fused`` and ``foreach`` too, so a run saved fused on a CPU
    would resume fused under a GPU's AMP scaler (:func:`build_optimizer`)."""
    built = [{key: group[key] for key in _IMPLEMENTATION if key in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, implementation in zip(optimizer.param_groups, built, strict=True):
        group.update(implementation)


def start_training_state(
    config: Config, trainable: nn.Module, steps_per_epoch: int, device: torch.device
) -> TrainingState:
    """A run's state before its first step: SGD over what trains, the LR schedule, the AMP scaler, the balance."""
    balance = gradient_balance(config, trainable)
    train = config.train
    scaler = torch.amp.GradScaler("cuda", enabled=train.amp and device.type == "cuda")
    optimizer = build_optimizer([p for p in trainable.parameters() if p.requires_grad], train, scaler.is_enabled())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train, train.epochs * steps_per_epoch))
    return TrainingState(trainable, optimizer, scheduler, scaler, balance)


def resume(state: TrainingState, session: Session) -> None:
    """Load the session's checkpoint into ``state``, if the run has one."""
    checkpoint = session.resume_from()
    if checkpoint is None:
        return
    with checkpoint.as_directory() as directory:
        state.load(Path(directory) / CHECKPOINT_FILE)
    if session.rank == 0:
        logger.info("resumed from epoch %d checkpoint", state.epoch)
