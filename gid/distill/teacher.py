"""What a distillation knows of its teacher before it starts: the teacher's validation AP.

A teacher no better than the student has nothing to teach, and one whose weights were never trained
(or never loaded) teaches noise. The AP comes from the teacher's model file (`gid train` stores it);
a file without one (`gid model import`) is evaluated once on the run's validation split, and the
result is cached beside the file, keyed by the file and the split, so that every later run, sweep
trial and worker reads it instead of evaluating again.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from gid.config import Config
from gid.errors import GidError
from gid.models.checkpoint import atomic_save, stored_val_ap

logger = logging.getLogger(__name__)

CACHE_SUFFIX = ".val_ap.json"


def _cache_key(config: Config) -> str:
    """The teacher file's identity and the split it is measured on."""
    teacher = Path(config.distill.teacher)
    stat = teacher.stat()
    data = config.data
    return f"{teacher.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{Path(data.root).resolve()}|{data.val_split}|{data.image_size}"


def _cache_path(config: Config) -> Path:
    teacher = Path(config.distill.teacher)
    return teacher.with_name(teacher.name + CACHE_SUFFIX)


def _cached(config: Config) -> dict[str, float]:
    path = _cache_path(config)
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}  # unreadable: measure again


def cached_val_ap(config: Config) -> float | None:
    """The teacher's validation AP as measured earlier on this split, if it was."""
    try:
        return _cached(config).get(_cache_key(config))
    except OSError:
        return None


def teacher_val_ap(config: Config) -> float | None:
    """The teacher's validation AP: stored in its model file, else measured earlier for this split; None if neither."""
    stored = stored_val_ap(Path(config.distill.teacher))
    return stored if stored is not None else cached_val_ap(config)


def ensure_teacher_val_ap(config: Config) -> float:
    """The teacher's validation AP, evaluated once (and cached beside its file) when its file stores none."""
    known = teacher_val_ap(config)
    if known is not None:
        return known
    from gid.engine.evaluation import evaluate_model_file

    logger.info("teacher %s stores no validation AP: evaluating it once on %s", config.distill.teacher, config.data.val_split)
    ap = evaluate_model_file(config.distill.teacher, config.data.val_split, config.data).metrics["ap"]
    entries = {**_cached(config), _cache_key(config): ap}
    try:
        atomic_save(entries, _cache_path(config), lambda data, f: f.write(json.dumps(data, indent=1).encode()))
    except (OSError, GidError) as exc:  # a read-only model folder: measured again next time
        logger.info("could not cache the teacher's AP beside its file (%s)", exc)
    return ap


def teacher_check(teacher_ap: float | None, student_ap: float | None, student: str) -> str | None:
    """A warning when the teacher detects nothing, or is no better than a student: GID then has nothing to teach."""
    if teacher_ap is not None and teacher_ap == 0.0:
        return (
            "warning: the teacher has 0.0 AP on the validation split: its weights look untrained or not loaded; "
            "check that distill.teacher is a trained model file for this data"
        )
    if teacher_ap is None or student_ap is None or teacher_ap > student_ap:
        return None
    return (
        f"warning: the teacher ({100 * teacher_ap:.1f} AP) is not better than {student} ({100 * student_ap:.1f} AP): "
        "GID has nothing to teach; train the teacher longer, or check that distill.teacher is the right file"
    )
