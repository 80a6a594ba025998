"""Search-space dimensions: what each range contains, and the spec's defaults as the first point."""

import pytest
import yaml

from gid.errors import GidError
from search.config import load_sweep
from search.space import LOSS_SETS, LOSSES, Choice, FloatRange, IntRange, as_config_values, default_space, relevant
from search.experiment import default_point


def test_an_int_range_contains_only_integers_within_it():
    top_k = IntRange(low=1, high=100, log=True)
    assert top_k.contains(10) and top_k.contains(100)
    assert not top_k.contains(10.5) and not top_k.contains(True) and not top_k.contains(0)
    assert FloatRange(low=0.1, high=1.0).contains(0.5) and not FloatRange(low=0.1, high=1.0).contains("0.5")


def test_the_first_point_holds_only_defaults_the_space_contains():
    space = {
        "distill.gism.top_k": IntRange(low=1, high=100),  # default 10
        "distill.gism.nms_iou": IntRange(low=0, high=1),  # default 0.3 is no integer
        "distill.gism.score_mode": Choice(values=["reference"]),  # default "paper" is not a choice
    }
    assert default_point(space) == {"distill.gism.top_k": 10}


def test_the_default_space_searches_weights_or_ratios_and_never_switches_every_loss_off():
    fixed, gradient = default_space("fixed"), default_space("gradient")
    assert "distill.feature.weight" in fixed and not any(k.startswith("distill.balance") for k in fixed)
    assert {"distill.balance.ratios.feature", "distill.balance.ratios.relation", "distill.balance.ratios.response"} <= set(gradient)
    assert not any(k.endswith(".weight") for k in gradient) and all(gradient[k]["log"] for k in gradient if "ratios" in k)
    assert default_space("dynamic") == gradient  # the same ratios, held all run instead of calibrated once
    assert len(LOSS_SETS) == 7 and all(LOSS_SETS) and fixed[LOSSES]["values"] == LOSS_SETS == gradient[LOSSES]["values"]
    assert as_config_values({LOSSES: "feature,response", "distill.gism.top_k": 5}) == {
        "distill.gism.top_k": 5, "distill.feature.enabled": True, "distill.relation.enabled": False,
        "distill.response.enabled": True,
    }


def test_a_trials_summary_values_leave_out_the_losses_it_does_not_use():
    params = {LOSSES: "response", "distill.feature.weight": 0.01, "distill.balance.ratios.relation": 0.3,
              "distill.response.cls_weight": 0.2, "distill.gism.top_k": 10}
    assert relevant(params) == {LOSSES: "response", "distill.response.cls_weight": 0.2, "distill.gism.top_k": 10}
    switches = {"distill.feature.enabled": False, "distill.feature.weight": 0.01, "distill.relation.weight": 40.0}
    assert relevant(switches) == {"distill.feature.enabled": False, "distill.relation.weight": 40.0}


def test_a_sweep_without_a_space_takes_each_frameworks_default_for_its_weighting(tmp_path):
    for name, mode in (("fixed", "fixed"), ("gradient", "gradient")):
        base = {"model": {"num_classes": 7}, "distill": {"teacher": "t.pt", "balance": {"mode": mode}}}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(base))
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "name": "modes", "frameworks": {"retinanet": {"config": str(tmp_path / "fixed.yaml")},
                                         "fcos": {"config": str(tmp_path / "gradient.yaml"), "overrides": ["model.framework=fcos"]}},
    }))
    sweep = load_sweep(sweep_file)
    assert "distill.feature.weight" in sweep.space_for(sweep.base_config("retinanet"))
    assert "distill.balance.ratios.feature" in sweep.space_for(sweep.base_config("fcos"))


def test_a_loss_set_naming_no_loss_is_refused_before_compute(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"model": {"num_classes": 7}, "distill": {"teacher": "t.pt"}}))
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "name": "bad", "frameworks": {"retinanet": {"config": str(tmp_path / "base.yaml")}},
        "space": {LOSSES: {"type": "choice", "values": ["feature", "features"]}},
    }))
    with pytest.raises(GidError, match="space distill.losses: distill.losses 'features': features is not one of"):
        load_sweep(sweep_file).base_config("retinanet")
