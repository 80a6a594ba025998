"""Checks on the driver before Ray starts: bad input fails in seconds with one line, not in a worker.

Workers would find the same problems, but only after Ray, the worker group and the data loaders
have started, and (in a sweep) once per trial. Everything here is what a worker reads first.
"""

from __future__ import annotations

import tempfile

import torch

from gid.config import Config, DataConfig, expanded
from gid.data import build_dataset
from gid.engine.loop import build_trainable
from gid.engine.memory import out_of_memory_as_user_error
from gid.errors import GidError


def check_writable(path: str, key: str) -> None:
    """Fail if a local storage path cannot be created or written (a file in the way, no permission, read-only).

    Creates nothing: it probes the nearest folder that exists, which is where the path would be made.
    """
    if "://" in path:  # a bucket: only Ray's storage layer can tell, when it writes
        return
    target = expanded(path, key).resolve()
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        raise GidError(f"{key} {path} cannot be created: {existing} is a file, not a folder; set {key} to a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise GidError(f"{key} {path} is not writable ({exc.strerror}: {existing}); set {key} to a folder you can write to") from None


def check_data(data: DataConfig) -> int:
    """Both splits load and every image they list is on disk; returns the classes (with background)."""
    train_set = build_dataset(data, data.train_split, train=True)
    val_set = build_dataset(data, data.val_split, train=False)
    for dataset in (train_set, val_set):
        dataset.check_image_files()
    return train_set.num_classes


def check_run_inputs(config: Config) -> None:
    """The data and the model files the config names, and the models the workers will build from them."""
    data_classes = check_data(config.data)
    num_classes = config.model.num_classes or data_classes
    if num_classes < data_classes:
        raise GidError(
            f"model.num_classes is {num_classes} but the data has {data_classes - 1} classes plus background; "
            f"remove model.num_classes or set it to at least {data_classes}"
        )
    # The workers' own construction: model.weights and the teacher load, and teacher and student must agree.
    with out_of_memory_as_user_error():
        build_trainable(config, num_classes, torch.device("cpu"))
