"""What GID cost: a distilled run against the student trained alone, from the metrics each run reports."""

from __future__ import annotations

from typing import Any


def gid_cost(distilled: dict[str, Any], student: dict[str, Any]) -> str | None:
    """``+1.3 AP (3.4 against 2.1) for 1.9× the training time (41 s against 22 s)``, or None when either val
    AP is unknown. Training time is the time in training steps (``train_time_s``), evaluation and start-up
    left out, so that runs started in different ways compare."""
    gid_ap, student_ap = distilled.get("val_ap"), student.get("val_ap")
    if gid_ap is None or student_ap is None:
        return None
    line = f"{100 * (gid_ap - student_ap):+.1f} AP ({100 * gid_ap:.1f} against {100 * student_ap:.1f})"
    ratio = time_ratio(distilled, student)
    if ratio is None:
        return line + "; the student's training time is not known (its model file predates train_time_s)"
    epochs = ""
    if distilled.get("epoch") != student.get("epoch"):
        epochs = f", {distilled.get('epoch')} epochs against {student.get('epoch')}"
    return (
        f"{line} for {ratio:.1f}× the training time "
        f"({duration(distilled['train_time_s'])} against {duration(student['train_time_s'])}{epochs})"
    )


def time_ratio(distilled: dict[str, Any], student: dict[str, Any]) -> float | None:
    """The distilled run's training time as a multiple of the student alone's; None where either is unknown."""
    gid_time, student_time = distilled.get("train_time_s"), student.get("train_time_s")
    return gid_time / student_time if gid_time and student_time else None


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
