"""The finalize stage's choices, without Ray: which configurations, which seeds, what the table says."""

from __future__ import annotations

from gid.config import validate
from search.finalize import FinalScore, candidates, final_markdown, final_points, final_seeds, winner
from search.outcomes import FINISHED, PRUNED, TrialRow
from search.trial import FINAL, STUDENT, trial_config, trial_params

LOSSES_ON = {"distill.losses": "feature,response", "distill.feature.weight": 0.01, "distill.relation.weight": 9.0}


def row(trial_id: str, value: float | None, status: str = FINISHED) -> TrialRow:
    return TrialRow("fcos", trial_id, status, 2, value, dict(LOSSES_ON, **{"distill.gism.top_k": int(100 * (value or 0))}))


def test_the_top_finished_trials_by_objective_then_the_student_alone():
    rows = [row("a", 0.10), row("b", 0.30), row("c", 0.50, PRUNED), row("d", 0.20), row("e", None)]
    chosen = candidates(rows, top=2, mode="max")
    assert [(c.label, c.source) for c in chosen] == [("1", "b"), ("2", "d"), (STUDENT, "")]
    assert [c.label for c in candidates(rows, top=2, mode="min")][:2] == ["1", "2"]
    assert candidates(rows, top=2, mode="min")[0].source == "a"
    assert candidates([row("c", 0.5, PRUNED)], top=2, mode="max") == []  # nothing finished: nothing to finalize


def test_each_point_runs_its_values_on_a_new_seed_and_the_student_with_every_loss_off():
    base = {"model": {"framework": "fcos"}, "train": {"seed": 7}, "distill": {"teacher": "t.pt"}}
    seeds = final_seeds(validate(base), 2)
    assert seeds == [8, 9]  # the sweep's trials all trained on seed 7
    points = final_points(candidates([row("b", 0.3)], top=1, mode="max"), seeds)
    assert [(p["label"], p["seed"]) for p in points] == [("1", 8), ("1", 9), (STUDENT, 8), (STUDENT, 9)]
    gid = trial_config(base, trial_params({FINAL: points[1]}), "t1", "/tmp/trials")
    assert gid.train.seed == 9 and gid.distill.feature.enabled and not gid.distill.relation.enabled
    assert gid.distill.gism.top_k == 30 and gid.distill.feature.weight == 0.01
    student = trial_config(base, trial_params({FINAL: points[2]}), "t2", "/tmp/trials")
    assert student.train.seed == 8
    assert not any(getattr(student.distill, term).enabled for term in ("feature", "relation", "response"))


def test_the_table_gives_mean_spread_and_gain_over_the_student_and_names_the_winner():
    scores = [
        FinalScore("1", "b", LOSSES_ON, [0.30, 0.34]),
        FinalScore("2", "d", LOSSES_ON, [0.36, 0.36]),
        FinalScore(STUDENT, "", {}, [0.20, 0.22]),
    ]
    assert winner(scores, "max").label == "2" and winner(scores, "min").label == "1"
    table = final_markdown("fcos", scores, "max")
    assert "| #1 | b | 32.0 ± 2.8 | 2 | +11.0 |" in table
    assert "| #2 (winner) | d | 36.0 ± 0.0 | 2 | +15.0 |" in table
    assert "| student alone | – | 21.0 ± 1.4 | 2 | – | – |" in table
    assert "relation.weight" not in table  # a switched-off loss's values are not shown
