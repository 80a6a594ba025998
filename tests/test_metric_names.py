"""MLflow's metric keys in sections (search/metric_names.py), and sweeps logged before them still read back."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from search.export import best_runs
from search.metric_names import gid_metrics, gid_name, mlflow_key
from search.outcomes import FINISHED
from search.tracking import FRAMEWORK_TAG, ROLE_TAG, STATUS_TAG, SWEEP_ID_TAG

# What a GID trial reports (gid's training loop, the balance, GISM, the cost), and its key in MLflow.
KEYS = {
    "val_ap": "eval/ap", "val_ap50": "eval/ap50", "val_apl": "eval/apl", "teacher_val_ap": "eval/teacher_ap",
    "loss": "loss/total", "loss_feature": "loss/feature", "loss_response_cls": "loss/response_cls",
    "loss_gt_classification": "loss/gt_classification",
    "gism_gis_per_image": "selection/gis_per_image",
    "balance_weight_response": "weighting/weight_response", "balance_norm_detector": "weighting/norm_detector",
    "balance_seconds": "weighting/seconds",
    "epoch_time_s": "run/epoch_time_s", "setup_model_s": "run/setup_model_s", "first_step_at": "run/first_step_at",
    "memory_peak_mb": "run/memory_peak_mb", "params": "model/params", "latency_ms": "model/latency_ms",
    "epoch": "epoch",
    "val_ap_mean": "eval/ap_mean", "seeds": "seeds",  # a finalized configuration's
}


def test_the_sections_sort_with_ap_and_the_losses_first():
    # MLflow's UI sorts a run's chart sections by name and opens on the first
    sections = sorted({mlflow_key(name).split("/")[0] for name in KEYS if "/" in mlflow_key(name)})
    assert sections[:2] == ["eval", "loss"]


@pytest.mark.parametrize(("name", "key"), KEYS.items())
def test_each_metric_has_its_section_and_reads_back_as_gids_name(name, key):
    assert mlflow_key(name) == key
    assert gid_name(key) == name


@given(st.from_regex(r"[a-z][a-z0-9_]{0,30}", fullmatch=True))
def test_every_name_reads_back_as_itself(name):
    # "loss_total" and "val_teacher_ap" would share the keys of "loss" and "teacher_val_ap"; gid reports neither.
    assume(name not in ("loss_total", "val_teacher_ap"))
    assert gid_name(mlflow_key(name)) == name


@pytest.mark.parametrize("key", ["val_ap", "loss_feature", "epoch_time_s", "system/cpu_utilization_percentage", "fcos/best_val_ap"])
def test_flat_keys_of_older_sweeps_and_keys_gid_does_not_section_are_left_as_they_are(key):
    assert gid_name(key) == key


def test_export_ranks_the_runs_of_a_sweep_logged_before_sections_beside_a_sectioned_one(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.create_experiment("names", artifact_location=str(tmp_path / "artifacts"))
    tags = {SWEEP_ID_TAG: "s1", FRAMEWORK_TAG: "fcos", ROLE_TAG: "trial", STATUS_TAG: FINISHED}
    for ap, key in ((0.30, "val_ap"), (0.40, "eval/ap"), (0.35, "val_ap")):  # two older runs, one of today's
        run_id = client.create_run(experiment_id, tags=tags).info.run_id
        client.log_batch(run_id, metrics=[Metric(key, ap, 0, 1), Metric(key.replace("ap", "ap50"), 2 * ap, 0, 1)])
    found, mode = best_runs(client, experiment_id, "val_ap", None, top=3)
    assert mode == "max"
    assert [b.metrics["val_ap"] for b in found["fcos"]] == [0.40, 0.35, 0.30]
    assert [b.metrics["val_ap50"] for b in found["fcos"]] == [0.80, 0.70, 0.60]
    assert all(b.metrics == gid_metrics(b.run.data.metrics) for b in found["fcos"])
