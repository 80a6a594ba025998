"""What GID cost against the student alone: the line `gid distill --baseline` prints and the sweep summary's ratio."""

from gid.distill.cost import duration, gid_cost, time_ratio


def test_the_cost_line_gives_the_gain_and_the_training_time_multiple():
    distilled = {"val_ap": 0.034, "train_time_s": 41.0, "epoch": 3}
    student = {"val_ap": 0.021, "train_time_s": 20.5, "epoch": 3}
    assert gid_cost(distilled, student) == "+1.3 AP (3.4 against 2.1) for 2.0× the training time (41 s against 20 s)"
    assert time_ratio(distilled, student) == 2.0
    # a longer student alone: the epochs are named, since the multiple is then not per epoch
    longer = {**student, "epoch": 6, "train_time_s": 164.0, "val_ap": 0.04}
    assert gid_cost(distilled, longer) == (
        "-0.6 AP (3.4 against 4.0) for 0.2× the training time (41 s against 2.7 min, 3 epochs against 6)"
    )


def test_an_unknown_time_or_ap_is_said_not_guessed():
    distilled = {"val_ap": 0.034, "train_time_s": 41.0, "epoch": 3}
    older = {"val_ap": 0.021, "epoch": 3}  # a model file written before train_time_s was reported
    assert gid_cost(distilled, older).endswith("; the student's training time is not known (its model file predates train_time_s)")
    assert time_ratio(distilled, older) is None
    assert gid_cost(distilled, {"train_time_s": 3.0}) is None


def test_durations_read_as_a_person_would():
    assert [duration(s) for s in (7.4, 119.0, 150.0, 7300.0)] == ["7 s", "119 s", "2.5 min", "2.0 h"]
