"""The sweep report's trial pictures, drawn from rows (test_sweep.py checks them on a real sweep)."""

from __future__ import annotations

from PIL import Image

from search.outcomes import FAILED, FINISHED, PRUNED, TrialRow
from search.report import best_so_far_figure, trials_figure
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
