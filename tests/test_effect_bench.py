"""The effect benchmark's pretrained-MobileNetV2 table (`benchmarks/effect.py --mobile`): its jobs and its rendering,
without training (the benchmark itself runs on Ray, for hours)."""

from __future__ import annotations

import pytest

from benchmarks import effect
from gid.config import validate

FRAMEWORKS = ("fcos", "retinanet", "faster_rcnn")


@pytest.fixture
def mobile_bench(tmp_path, monkeypatch):
    """A Bench of ``--mobile`` whose teachers have finished (no ImageNet file is fetched: its path is only named)."""
    monkeypatch.setattr(effect, "mobilenet_v2_imagenet", lambda: tmp_path / "mobilenet_v2-b0353104.pth")
    args = effect.parse_args(["--mobile", "--out", str(tmp_path), "--lanes", "1"])
    bench = effect.Bench(tmp_path, args.scale, lanes=1)
    for framework in FRAMEWORKS:
        bench.results.runs[f"{framework}/teacher/0"] = {"model": str(tmp_path / f"{framework}_teacher.pt")}
    return bench


def test_the_mobile_table_trains_the_teacher_and_a_pretrained_mobilenet_v2_alone_and_distilled(mobile_bench):
    jobs = {job.key: job for job in mobile_bench.jobs()}
    assert sorted(jobs) == sorted(
        [f"{fw}/teacher/0" for fw in FRAMEWORKS]
        + [f"{fw}/mobilenet_{row}/{seed}" for fw in FRAMEWORKS for row in ("student", "gid_default") for seed in range(3)]
    )
    for framework in FRAMEWORKS:
        teacher = validate(mobile_bench.base(framework, "teacher"))
        assert (teacher.model.backbone, teacher.model.backbone_weights) == ("resnet34", None)  # from random weights
        student = validate(mobile_bench.student_config(framework, 2))
        gid = validate(mobile_bench.gid_config(framework, 2))
        for config in (student, gid):
            assert config.model.backbone == "mobilenet_v2" and config.model.fpn_levels == "resnet"
            assert config.model.backbone_weights == mobile_bench.student_weights and config.train.seed == 2
        assert student.distill is None
        assert str(gid.distill.teacher) == f"{mobile_bench.out}/{framework}_teacher.pt"
        assert gid.distill.model_dump(exclude={"teacher"}) == validate(
            {"distill": {"teacher": "t.pt"}}).distill.model_dump(exclude={"teacher"})  # the product's defaults
        assert jobs[f"{framework}/mobilenet_gid_default/0"].needs == (f"{framework}/teacher/0",)


def test_a_mobile_sweep_adds_the_tuned_rows_and_dev_another_data_set(tmp_path):
    tuned = effect.parse_args(["--mobile", "--sweep-trials", "12", "--out", str(tmp_path)]).scale
    assert tuned.sweep_trials == 12 and tuned.student_rows == "mobilenet_"
    dev = effect.parse_args(["--mobile", "--dev", "--out", str(tmp_path)]).scale
    assert dev.data_seed != effect.MOBILE.data_seed and dev.teacher_epochs == effect.MOBILE.teacher_epochs
    with pytest.raises(SystemExit):
        effect.parse_args(["--mobile", "--value", "--out", str(tmp_path)])


def run(ap: float, seconds: float = 60, **cost) -> dict:
    return {"test": {m: ap for m in effect.METRICS}, "seconds": seconds, "epochs": 3, **cost}


def test_the_table_shows_parameters_latency_and_how_much_faster_than_the_teacher():
    runs = {
        "fcos/teacher/0": run(0.09, epochs=16, params=30_000_000, latency_ms=60.0),
        "fcos/mobilenet_student/0": run(0.04, params=3_000_000, latency_ms=14.0),
        "fcos/mobilenet_student/1": run(0.05, params=3_000_000, latency_ms=16.0),
        "fcos/mobilenet_gid_default/0": run(0.06, params=3_000_000, latency_ms=15.0),
    }
    text = effect.render(runs, effect.MOBILE, ["--mobile"], [{"commit": "abc", "minutes": 1.0, "lanes": 2}])
    assert "| params (M) | CPU ms / image | × faster than teacher |" in text
    assert "| fcos | teacher | 1 | 16 | 9.0 | 9.0 | 9.0 | 9.0 | 30.00 | 60.0 |  | 1.0 | +4.5 |" in text
    assert "| MobileNetV2 from ImageNet, student alone | 2 | 3 | 4.5 ± 0.7 |" in text
    assert "| 3.00 | 15.0 ± 1.4 | 4.0× | 1.0 |  |" in text  # the student alone: no Δ against itself
    assert "| MobileNetV2 from ImageNet, GID, product defaults | 1 | 3 | 6.0 |" in text
    assert "| 3.00 | 15.0 | 4.0× | 1.0 | +1.5 |" in text
    assert "teacher's recipe: resnet34 FPN 128 from random weights, 24 epochs of SGD lr 0.02" in text


def test_the_other_tables_render_as_before_without_cost_columns():
    runs = {"fcos/teacher/0": run(0.06, epochs=16), "fcos/student/0": run(0.03)}
    text = effect.render(runs, effect.FULL, [], [{"commit": "abc", "minutes": 1.0, "lanes": 2}])
    assert "| framework | row | seeds | epochs | AP | AP50 | AP75 | APs | train min / run | Δ AP vs student |" in text
    assert "| fcos | teacher | 1 | 16 | 6.0 | 6.0 | 6.0 | 6.0 | 1.0 | +3.0 |" in text
    assert "recipe" not in text and "CPU ms" not in text


def test_a_folder_takes_a_sitting_of_another_mode_only_on_its_own_data_and_teachers(tmp_path):
    (tmp_path / "scale.json").write_text(effect.json.dumps(effect.asdict(effect.VALUE)))
    effect.check_folder(tmp_path, effect.MOBILE)  # the value table's data and teachers: its folder lends them
    with pytest.raises(SystemExit, match="data_seed differ"):
        effect.check_folder(tmp_path, effect.MOBILE_DEV)
    with pytest.raises(SystemExit, match="teacher_backbone, teacher_epochs differ"):
        effect.check_folder(tmp_path, effect.FULL)  # the held-out defaults table's own teachers


def test_kept_results_carry_a_table_over_to_a_new_checkout(tmp_path):
    """A session's checkout has no --out folder: --keep starts it from the repository's copy and keeps that copy
    up to date after every finished run."""
    keep, first, second = tmp_path / "kept", tmp_path / "session1", tmp_path / "session2"
    first.mkdir()
    effect.take_kept(keep, first)  # nothing kept yet: nothing to take
    results = effect.Results(first / "results.json", lanes=2, keep=keep)
    results.add("fcos/teacher/0", {"test": {"ap": 0.05}, "seconds": 60, "model": str(first / "teacher.pt")})
    assert effect.json.loads((keep / "results.json").read_text()) == results.runs
    assert (keep / "sittings.json").is_file()

    second.mkdir()
    effect.take_kept(keep, second)
    again = effect.Results(second / "results.json", lanes=2, keep=keep)
    assert again.runs == results.runs and len(again.sittings) == 1  # the next sitting adds its own
    (second / "results.json").write_text("{}")  # a folder with results of its own keeps them
    effect.take_kept(keep, second)
    assert effect.json.loads((second / "results.json").read_text()) == {}


def test_a_run_resumed_in_a_later_sitting_keeps_its_epochs_in_place_and_its_curve_starts_there(tmp_path):
    resumed = [{"epoch": epoch, "val_ap": epoch / 100} for epoch in (3, 4)]  # epochs 1-2 trained in an earlier sitting
    slots = effect.epoch_slots(resumed, 4)
    assert slots == [None, None, *resumed]
    whole = [0.01, 0.02, 0.03, 0.04]
    runs = {
        "fcos/teacher/0": {"val_ap_by_epoch": whole, "test": {"ap": 0.1}},
        "fcos/converged_student/0": {"val_ap_by_epoch": whole, "test": {"ap": 0.05}},
        "fcos/converged_student/1": {"val_ap_by_epoch": [m and m["val_ap"] for m in slots], "test": {"ap": 0.05}},
    }
    assert effect.plot_curves(runs, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_converged_rows_come_after_the_timed_ones_and_another_schedule_trains_them_again(tmp_path):
    args = effect.parse_args(["--value", "--frameworks", "faster_rcnn", "--converge-epochs", "24", "--out", str(tmp_path)])
    bench = effect.Bench(tmp_path, args.scale, lanes=2)
    order = [job.key.split("/")[1] for job in bench.jobs()]
    assert max(i for i, row in enumerate(order) if row == "student_equal_compute") < order.index("converged_student")
    # an earlier sitting trained the converged student on VALUE's 12 epochs; its run folder would be resumed
    folder = tmp_path / "runs" / "faster_rcnn_converged_student_0"
    folder.mkdir(parents=True)
    bench.results.runs["faster_rcnn/converged_student/0"] = {**run(0.12, epochs=12), "model": str(folder / "model.pt")}
    bench.results.runs["faster_rcnn/student/0"] = run(0.02)
    bench.retrain_other_schedules()
    assert "faster_rcnn/converged_student/0" not in bench.results.runs and not folder.exists()
    assert bench.results.replaced["faster_rcnn/converged_student/0"] == {
        "test": run(0.12)["test"], "seconds": 60, "why": "12 epochs before, 24 now"}
    bench.results.add("faster_rcnn/converged_student/0", run(0.27, epochs=24))
    text = effect.render(bench.results.runs, args.scale, [], [{"commit": "abc", "minutes": 1.0, "lanes": 2}])
    assert "- faster_rcnn/converged_student/0 re-trained in a later sitting (12 epochs before, 24 now): test AP 12.00 then, 27.00 now\n" in text
    assert "faster_rcnn/student/0" in bench.results.runs  # the 3-epoch rows stay
    assert effect.parse_args(["--value", "--out", str(tmp_path)]).scale.converge_epochs == effect.VALUE.converge_epochs
