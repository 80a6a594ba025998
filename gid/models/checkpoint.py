"""Model files: weights plus the config that produced them, loaded with ``weights_only=True``.

A model file is a plain dict of tensors and YAML-safe values, so loading never unpickles code.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gid.config import Config, validate
from gid.errors import GidError
from gid.models.detectors import build_detector

FORMAT = "gid-model/1"


def atomic_save(obj: Any, path: Path) -> None:
    """Write then rename, so a crash or a full disk never leaves a truncated file behind.

    A write the disk refuses (full, over quota, no permission) is a one-line GidError; the file
    that was at ``path`` before, e.g. the previous checkpoint, is left as it was.
    """
    path = Path(path)
    try:
        _write_then_rename(obj, path)
    except (OSError, RuntimeError) as exc:
        reason = _write_failure(exc)
        if reason is None:
            raise
        raise GidError(
            f"could not write {path} ({reason}); free disk space or fix the folder's permissions and run again "
            f"(the previous {path.name}, if any, is intact)"
        ) from None


def _write_then_rename(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_failure(exc: BaseException) -> str | None:
    """Why the disk refused a write, or None for other errors (e.g. an object that cannot be saved)."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    # torch's zip writer reports a short write (what a disk filling up mid-file gives) as a position mismatch.
    if "unexpected pos" in str(exc):
        return "the write stopped short: the disk is full or a file size limit was reached"
    return None


def save_model(model: nn.Module, config: Config, num_classes: int, path: Path, **extra: Any) -> None:
    state = {"format": FORMAT, "config": config.to_dict(), "num_classes": num_classes}
    atomic_save({**state, **extra, "model": model.state_dict()}, path)


def read_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise GidError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise GidError(
            f"{path}: refusing to load a checkpoint with non-tensor objects ({_blocked_object(exc)}); "
            "pass a model file written by `gid train` or `gid distill`"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        first_sentence = str(exc).strip().split(". ")[0]
        raise GidError(f"{path}: not a readable checkpoint (truncated or not a torch file): {first_sentence}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise GidError(f"{path}: not a gid model file; pass a model.pt written by `gid train` or `gid distill`")
    return state


def _blocked_object(exc: pickle.UnpicklingError) -> str:
    """The line of torch's refusal that names what the file tried to load (e.g. ``posix.system``)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return next((line.rstrip(".") for line in lines if "GLOBAL" in line), lines[0] if lines else "unpickling refused")


def load_model(path: Path) -> tuple[nn.Module, Config, int]:
    """Rebuild the detector a model file was trained as, with its weights."""
    state = read_checkpoint(path)
    config = validate(state["config"], source=f"{path} (stored config)")
    model = build_detector(config.model, config.data.image_size, state["num_classes"])
    model.load_state_dict(state["model"])
    return model, config, state["num_classes"]


def load_weights(model: nn.Module, path: Path) -> None:
    """Initialise ``model`` from a model file, e.g. ``model.weights`` in the config."""
    state = read_checkpoint(path)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        first = first if len(first) <= 200 else first[:200] + "..."  # torch lists every key
        held = state["config"]["model"]
        raise GidError(
            f"{path}: weights do not fit this model (the file holds a {held['framework']} {held['backbone']}: {first}); "
            "check model.framework and model.backbone"
        ) from None
