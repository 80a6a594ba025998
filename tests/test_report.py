"""The sweep report's tables and trial pictures, drawn from rows (test_sweep.py checks them on a real sweep)."""

from __future__ import annotations

import csv
import io
from dataclasses import replace

from PIL import Image

from gid.config import validate
from search.config import SweepConfig
from search.outcomes import FAILED, FINISHED, PRUNED, FrameworkOutcome, TrialRow
from search.report import best_so_far_figure, summary_markdown, trials_csv, trials_figure
from support import lines_of

# In the order Tune started them: trial numbers 1..5.
ROWS = [
    TrialRow("fcos", "a", FINISHED, 2, 0.10, {}),
    TrialRow("fcos", "b", PRUNED, 1, 0.05, {}),
    TrialRow("fcos", "c", FAILED, 0, None, {}, "training loss became nan"),
    TrialRow("fcos", "d", FINISHED, 2, 0.20, {}),
    TrialRow("fcos", "e", FINISHED, 2, 0.15, {}),
]


def test_each_trial_is_a_point_at_its_number_against_the_teacher_and_the_student_alone():
    lines = lines_of(trials_figure(ROWS, "val_ap", teacher_ap=0.3, baseline_ap=0.12, framework="fcos"))
    assert lines["finished"] == ([1, 4, 5], [10.0, 20.0, 15.0])
    assert lines["pruned"] == ([2], [5.0])  # at its last epoch; the failed trial has no point
    assert lines["teacher: val AP 30.0"][1] == [30.0, 30.0]
    assert lines["student alone: val AP 12.0"][1] == [12.0, 12.0]


def test_the_best_so_far_follows_the_finished_trials_in_the_objectives_direction():
    (best,) = lines_of(best_so_far_figure(ROWS, "val_ap", "max", None, None, "fcos")).values()
    assert best == ([1, 4, 5], [10.0, 20.0, 20.0])
    (best,) = lines_of(best_so_far_figure(ROWS, "val_ap", "min", None, None, "fcos")).values()
    assert best == ([1, 4, 5], [10.0, 10.0, 10.0])


def test_a_framework_without_finished_trials_or_references_still_gets_its_pictures(tmp_path):
    failed = [TrialRow("fcos", "a", FAILED, 0, None, {}, "out of memory")]
    for figure in (trials_figure(failed, "val_ap", None, None, "fcos"), best_so_far_figure(failed, "val_ap", "max", None, None, "fcos")):
        assert lines_of(figure) == {}
        figure.savefig(tmp_path / "empty.png")
        with Image.open(tmp_path / "empty.png") as image:
            assert image.format == "PNG" and image.width > 100


def test_tunes_terminal_reads_each_ap_in_percent_with_one_decimal_and_nothing_else_changes():
    from search.trial import shown_in_percent, with_percentages

    reported = {"epoch": 3, "loss": 1.25, "val_ap": 0.12345, "val_ap50": 0.5, "train_time_s": 41.0}
    assert with_percentages(reported) == {**reported, "val_ap_percent": 12.3, "val_ap50_percent": 50.0}
    assert shown_in_percent("val_ap") == "val_ap_percent" and shown_in_percent("train_time_s") == "train_time_s"


# Each trial's student cost as its last epoch reported it (objective.latency_runs); the failed one reported none.
COSTS = {"a": (3_520_000, 12.34), "b": (3_520_000, 11.0), "d": (3_520_000, 12.0), "e": (3_520_000, 13.5)}


def costed(row: TrialRow) -> TrialRow:
    param_count, latency_ms = COSTS.get(row.trial_id, (None, None))
    return replace(row, params={"distill.gism.top_k": 10}, param_count=param_count, latency_ms=latency_ms)


COSTED = [costed(row) for row in ROWS]


def test_the_trials_csv_gives_every_trials_parameters_and_cpu_latency():
    table = list(csv.DictReader(io.StringIO(trials_csv(COSTED))))
    assert [(row["trial_id"], row["params"], row["latency_ms"]) for row in table] == [
        ("a", "3520000", "12.34"), ("b", "3520000", "11.0"), ("c", "", ""), ("d", "3520000", "12.0"), ("e", "3520000", "13.5"),
    ]
    assert table[0]["distill.gism.top_k"] == "10" and table[2]["error"] == "training loss became nan"


def test_the_summary_gives_the_best_trials_student_cost(tmp_path):
    sweep = SweepConfig(name="cost", frameworks={"fcos": {"config": tmp_path / "fcos.yaml"}}, trials=5)
    base = validate({"model": {"framework": "fcos"}, "distill": {"teacher": str(tmp_path / "teacher.pt")}})
    outcome = FrameworkOutcome("fcos", base, results=[], study=None, baseline=None)
    assert "| best trial's student: parameters, CPU latency |" in summary_markdown(sweep, [outcome], COSTED)
    assert "| – | 3.52 M, 12.0 ms | 3 / 1 / 1 | d |" in summary_markdown(sweep, [outcome], COSTED)  # d: the best AP
    assert "| – | – | 3 / 1 / 1 | d |" in summary_markdown(sweep, [outcome], ROWS)  # latency_runs 0: not measured
