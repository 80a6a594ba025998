"""Where the training loop runs: a Ray Train worker, or the process of a single-worker Tune trial.

The loop asks its session for the few things that differ between the two: its rank, its device,
the checkpoint to resume from, how to wrap the model and loaders for DDP, and where to report.
A Ray Train run starts a controller and a worker group before the loop's first line, about 10 s
per run (docs/benchmarks.md, "Trial start-up"); a sweep trial with one worker needs neither, so it
trains in the process Tune already started and reports to Tune itself.
"""

from __future__ import annotations

from typing import Protocol

import ray
import ray.train
import ray.train.torch
import ray.tune
import torch
from torch import nn
from torch.utils.data import DataLoader


class Session(Protocol):
    rank: int
    device: torch.device

    def resume_from(self) -> ray.train.Checkpoint | ray.tune.Checkpoint | None: ...

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


class TuneTrial:
    """The process of a Tune trial with one worker: Tune persists its checkpoints and restores them."""

    rank = 0

    def __init__(self) -> None:
        # Tune gives the trial the GPUs it asked for through CUDA_VISIBLE_DEVICES: the first is cuda:0.
        self.device = torch.device("cuda", 0) if ray.get_gpu_ids() else torch.device("cpu")

    def resume_from(self) -> ray.tune.Checkpoint | None:
        return ray.tune.get_checkpoint()

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def prepare_loader(self, loader: DataLoader) -> DataLoader:
        return loader

    def report(self, metrics: dict, directory: str | None) -> None:
        checkpoint = None if directory is None else ray.tune.Checkpoint.from_directory(directory)
        ray.tune.report(metrics, checkpoint=checkpoint)
