"""`gid demo`, reduced (`--quick`, one framework): the README's main job end to end, on real runs."""

from __future__ import annotations

import re

import mlflow.pytorch
from mlflow.tracking import MlflowClient
from torchvision.models.detection import FCOS

from gid.cli import main
from gid.models import read_checkpoint
from search.tracking import ROLE_TAG, STATUS_TAG, TRIAL_TAG, tag_filter


def test_the_demo_ends_in_teacher_student_and_gid_side_by_side_and_a_link_to_its_runs(ray_local, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the demo writes under --out only: nothing in the working folder
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--frameworks", "fcos", "--out", str(out)]) == 0
    printed = capsys.readouterr().out

    teacher = read_checkpoint(out / "runs" / "fcos_teacher" / "model.pt")["metrics"]["val_ap"]
    student = read_checkpoint(out / "runs" / "fcos_student" / "model.pt")["metrics"]["val_ap"]
    (row,) = [line for line in printed.splitlines() if line.startswith("| fcos |")]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1:3] == [f"{100 * teacher:.1f}", f"{100 * student:.1f}"]  # teacher and student alone, from their files
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("gid-demo")
    trials = client.search_runs([experiment.experiment_id], filter_string=tag_filter({ROLE_TAG: "trial"}))
    finished = [r.data.metrics["eval/ap"] for r in trials if r.data.tags[STATUS_TAG] == "finished"]
    assert cells[4] == f"{100 * max(finished):.1f}" and cells[5] == f"{100 * (max(finished) - student):+.1f}"
    assert re.search(r"^fcos: (the best GID student is|at the demo's scale GID did not beat)", printed, re.M)
    # the best trial's values without those of a loss it switched off
    (best,) = [r for r in trials if r.data.tags[TRIAL_TAG] == cells[9]]  # the summary's best trial
    assert f"{100 * best.data.metrics['eval/ap']:.1f}" == cells[4]
    for term in ("feature", "relation", "response"):
        if best.data.params[f"distill.{term}.enabled"] == "False":
            assert f"{term}." not in cells[10]
    # what the gain cost: the best trial's training time against the student alone's
    student_time = read_checkpoint(out / "runs" / "fcos_student" / "model.pt")["metrics"]["train_time_s"]
    assert cells[6] == f"{best.data.metrics['run/train_time_s'] / student_time:.1f}×"
    # and what its student costs to deploy, as its last epoch measured it
    assert cells[7] == f"{best.data.metrics['model/params'] / 1e6:.2f} M, {best.data.metrics['model/latency_ms']:.1f} ms"
    # the printed link opens this experiment's runs table
    (link,) = re.findall(r"then open (\S+)", printed)
    assert link.endswith(f"/#/experiments/{experiment.experiment_id}/runs")
    assert (out / "best" / "demo_fcos_best1.yaml").is_file()
    # the best student, registered: the champion loads with one MLflow call as the torchvision detector gid trained
    (version,) = MlflowClient(f"sqlite:///{out / 'mlflow.db'}").search_model_versions("name = 'gid-demo'")
    assert f"Model fcos       models:/gid-demo/{version.version}" in printed
    assert 'mlflow.pytorch.load_model("models:/gid-demo@champion")' in printed
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{out / 'mlflow.db'}")  # where a user's MLflow would look
    assert type(mlflow.pytorch.load_model("models:/gid-demo@champion")) is FCOS
    assert sorted(path.name for path in tmp_path.iterdir()) == ["demo"]
