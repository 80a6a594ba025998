"""The sweep's finalize stage: its best configurations re-trained over seeds, against the student alone.

A sweep's best trial is the best of many noisy draws; on small data its lead over the runner-up is
often within one seed's spread. This stage re-trains a framework's ``top`` finished configurations,
and the student alone, on ``seeds`` new training seeds at full fidelity (no pruning). The runs are a
Tune experiment of their own (resumed like the sweep) and MLflow runs with role ``final`` nested in
the sweep's run. The winner is the configuration with the best mean; `gid export` exports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gid.config import Config
from search.outcomes import FINISHED, FinalScore, TrialRow, best, finished, ranked, trial_status
from search.space import STUDENT_ALONE, describe_values
from search.trial import FINAL, STUDENT

if TYPE_CHECKING:
    from ray.tune import ResultGrid


@dataclass(frozen=True)
class Candidate:
    label: str  # "1", "2", ... in the sweep's rank order, or STUDENT
    source: str  # the sweep trial it re-trains ("" for the student alone)
    values: dict[str, Any]  # the trial's sampled values


def candidates(rows: list[TrialRow], top: int, mode: str) -> list[Candidate]:
    """The ``top`` finished trials by objective, then the student alone (none when no trial finished)."""
    top_rows = ranked(finished(rows), mode, key=lambda r: r.value)[:top]
    if not top_rows:
        return []
    chosen = [Candidate(str(rank), row.trial_id, row.params) for rank, row in enumerate(top_rows, start=1)]
    return [*chosen, Candidate(STUDENT, "", STUDENT_ALONE)]


def final_seeds(base: Config, count: int) -> list[int]:
    """New training seeds: every sweep trial trained with the base config's own."""
    return [base.train.seed + offset for offset in range(1, count + 1)]


def final_points(chosen: list[Candidate], seeds: list[int]) -> list[dict[str, Any]]:
    """One point per (candidate, seed): a finalize trial's config holds it under ``FINAL``
    (:func:`search.trial.trial_params` reads it)."""
    return [{"label": c.label, "source": c.source, "values": c.values, "seed": seed} for c in chosen for seed in seeds]


def final_scores(results: ResultGrid, metric: str, epochs: int) -> list[FinalScore]:
    """Each candidate's objective over the seeds whose run trained the whole schedule, in label order."""
    by_label: dict[str, FinalScore] = {}
    for result in results:
        point = (result.config or {}).get(FINAL)
        metrics = result.metrics or {}
        if point is None:
            continue
        score = by_label.setdefault(point["label"], FinalScore(point["label"], point["source"], point["values"], []))
        status = trial_status(result.error is not None, int(metrics.get("epoch", 0)), epochs)
        if status == FINISHED and metric in metrics:
            score.scores.append(float(metrics[metric]))
    return sorted((s for s in by_label.values() if s.scores), key=lambda s: (s.label == STUDENT, s.label))


def winner(scores: list[FinalScore], mode: str) -> FinalScore | None:
    return best((s for s in scores if s.label != STUDENT), mode, key=lambda s: s.mean)


def final_markdown(framework: str, scores: list[FinalScore], mode: str) -> str:
    """The finalize stage of one framework: mean ± std per candidate and its difference to the student alone."""
    student = next((s for s in scores if s.label == STUDENT), None)
    best = winner(scores, mode)
    lines = [
        f"### {framework}: finalized over seeds",
        "",
        "| configuration | sweep trial | AP mean ± std | seeds | vs student alone | values |",
        "|---|---|---|---|---|---|",
    ]
    for score in scores:
        name = "student alone" if score.label == STUDENT else f"#{score.label}" + (" (winner)" if score is best else "")
        gain = f"{100 * (score.mean - student.mean):+.1f}" if student and score is not student else "–"
        lines.append(
            f"| {name} | {score.source or '–'} | {100 * score.mean:.1f} ± {100 * score.std:.1f} | {len(score.scores)} "
            f"| {gain} | {describe_values(score.values) if score.label != STUDENT else '–'} |"
        )
    return "\n".join(lines) + "\n"
