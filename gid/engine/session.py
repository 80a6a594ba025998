"""Where the training loop runs: a Ray Train worker, or another host that keeps the same contract.

The loop asks its session for the few things that differ between hosts: its rank, its device, the
checkpoint to resume from, how to wrap the model and loaders for DDP, and where to report. The other
host is search/'s one-worker Tune trial (``search.trial.TuneTrial``): a Ray Train run starts a
controller and a worker group before the loop's first line, about 10 s per run (docs/benchmarks.md,
"Trial start-up"), and a sweep trial with one worker needs neither.
"""

from __future__ import annotations

from typing import Protocol

import ray
import ray.train
import ray.train.torch
import torch
from torch import nn
from torch.utils.data import DataLoader


class Session(Protocol):
    rank: int
    device: torch.device

    def resume_from(self) -> ray.train.Checkpoint | None:
        """A checkpoint to resume from: anything with ``as_directory()``, like Ray Train's and Tune's."""

    def prepare_model(self, model: nn.Module) -> nn.Module: ...

    def prepare_loader(self, loader: DataLoader) -> DataLoader: ...

    def report(self, metrics: dict, directory: str | None) -> None:
        """Report one epoch's ``metrics``, with the checkpoint in ``directory`` (None on ranks that write none)."""


class TrainWorker:
    """A Ray Train worker: DDP, the distributed sampler and checkpoint persistence by Ray Train."""

    def __init__(self) -> None:
        self.rank = ray.train.get_context().get_world_rank()
        self.device = ray.train.torch.get_device()

    def resume_from(self) -> ray.train.Checkpoint | None:
        return ray.train.get_checkpoint()

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return ray.train.torch.prepare_model(model)

    def prepare_loader(self, loader: DataLoader) -> DataLoader:
        return ray.train.torch.prepare_data_loader(loader, move_to_device=False)  # the loop moves its batches

    def report(self, metrics: dict, directory: str | None) -> None:
        checkpoint = None if directory is None else ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=checkpoint)
