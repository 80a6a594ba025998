"""GID weights set from gradients (distill.balance: gradient and dynamic) on real tiny detectors."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
import yaml

from gid.cli import main
from gid.config import BalanceConfig
from gid.engine.state import gradient_balance
from gid.engine.trainer import build_trainer
from gid.models import build_detector, save_model
from gid.distill.balance import DETECTOR, DynamicBalance, GradientBalance, _gradient_norm, describe
from support import BalanceLog, tiny_distiller

RATIOS = {"feature": 0.5, "relation": 0.2, "response": 2.0}


@pytest.fixture(scope="module")
def shared_retinanet():
    return tiny_distiller("retinanet")


@pytest.fixture
def retinanet(shared_retinanet):
    """A Distiller at its configured weights, for balances fed made-up losses."""
    shared_retinanet.set_term_scales({term: 1.0 for term in RATIOS})
    return shared_retinanet


def trainable_params(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def losses_of(model, batch) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)  # Faster R-CNN samples its proposals and RoIs: the same ones in every call
    return model(*batch)


def term_norms(model, batch) -> dict[str, float]:
    losses = losses_of(model, batch)
    params = trainable_params(model)
    groups = {
        DETECTOR: [v for k, v in losses.items() if k.startswith("loss_gt_")],
        "feature": [losses["loss_feature"]],
        "relation": [losses["loss_relation"]],
        "response": [v for k, v in losses.items() if k.startswith("loss_response_")],
    }
    return {name: float(_gradient_norm(sum(parts), params)) for name, parts in groups.items()}


@pytest.mark.parametrize("framework", ["retinanet", "faster_rcnn"])
def test_calibration_gives_each_term_the_asked_ratio(framework, batch):
    model = tiny_distiller(framework).train()
    config = BalanceConfig(mode="gradient", calibration_steps=2, ratios=RATIOS)
    balance = GradientBalance(config, model)
    for _ in range(2):  # no optimizer step: the same gradients twice, so the ratios must come out exactly
        balance.measure(losses_of(model, batch), trainable_params(model))
    assert not balance.measuring and balance.calibrations == 1
    assert balance.extra_backward_passes == 2 * 4  # the detector and three terms, per step
    norms = term_norms(model, batch)
    for term, ratio in RATIOS.items():
        assert norms[term] / norms[DETECTOR] == pytest.approx(ratio, rel=1e-3), term
    # one scale per term: the response's cls/reg proportion stays as configured
    weights = model.term_weights()
    assert weights["response_cls"] / weights["response_reg"] == pytest.approx(0.1 / 1.0)
    assert describe(balance.metrics()).startswith("calibrated GID weights: feature ")


def test_fixed_mode_trains_at_the_specs_weights_and_never_calibrates(batch, tiny_config):
    model = tiny_distiller("retinanet", balance={"mode": "fixed"})
    spec = {"feature": 5e-3, "relation": 40.0, "response_cls": 0.1, "response_reg": 1.0}  # gid-spec.md's weights
    assert model.term_weights() == spec
    torch.manual_seed(1)
    losses = model.train()(*batch)
    torch.manual_seed(1)
    default = tiny_distiller("retinanet").train()(*batch)  # before its calibration: the same configured weights
    assert all(torch.equal(default[k], losses[k]) for k in default)
    assert gradient_balance(tiny_config(distill={"teacher": "t.pt", "balance": {"mode": "fixed"}}), model) is None
    # the product's default measures all run long
    assert isinstance(gradient_balance(tiny_config(distill={"teacher": "t.pt"}), model), DynamicBalance)


def test_an_epoch_shorter_than_the_calibration_calibrates_on_the_steps_it_had(batch):
    model = tiny_distiller("retinanet").train()
    config = BalanceConfig(mode="gradient", calibration_steps=10, ratios=RATIOS)
    balance = GradientBalance(config, model)
    assert not balance.end_epoch()  # nothing measured yet: nothing to calibrate on
    for _ in range(2):
        balance.measure(losses_of(model, batch), trainable_params(model))
    assert balance.measuring and balance.end_epoch() and not balance.measuring
    assert balance.calibrations == 1 and not balance.end_epoch()
    norms = term_norms(model, batch)
    for term, ratio in RATIOS.items():
        assert norms[term] / norms[DETECTOR] == pytest.approx(ratio, rel=1e-3), term


def test_a_resumed_run_keeps_its_calibrated_weights_and_does_not_calibrate_again(batch):
    model = tiny_distiller("fcos").train()
    config = BalanceConfig(mode="gradient", calibration_steps=1, ratios=RATIOS)
    balance = GradientBalance(config, model)
    balance.measure(model(*batch), trainable_params(model))
    saved = balance.state_dict()

    restarted = tiny_distiller("fcos").train()
    resumed = GradientBalance(config, restarted)
    resumed.load_state_dict(saved)
    resumed.start_epoch()
    assert not resumed.measuring and restarted.term_scales == model.term_scales != {t: 1.0 for t in RATIOS}
    assert resumed.metrics() == balance.metrics()

    every_epoch = GradientBalance(config.model_copy(update={"recalibrate": "epoch"}), restarted)
    every_epoch.load_state_dict(saved)
    every_epoch.start_epoch()
    assert every_epoch.measuring  # recalibrate: epoch measures again at each epoch's start


@pytest.mark.parametrize("mode", ["gradient", "dynamic"])
def test_workers_share_the_weights_and_a_resumed_run_keeps_them(mode, ray_local, tiny_config, tmp_path, capsys):
    teacher_config = tiny_config("retinanet", model={"backbone": "resnet34"})
    save_model(build_detector(teacher_config.model, 64, 7), teacher_config, 7, tmp_path / "teacher.pt")
    balance = {"mode": mode, "calibration_steps": 2, "every_steps": 2, "ratios": RATIOS}
    config = tiny_config(
        "retinanet", scaling={"num_workers": 2, "use_gpu": False},
        distill={"teacher": str(tmp_path / "teacher.pt"), "balance": balance}, run={"name": "balanced"},
    )
    log = tmp_path / "balance.jsonl"
    build_trainer(config, callbacks=[BalanceLog(log)]).fit()
    (first,) = [json.loads(line) for line in log.read_text().splitlines()]
    weights_and_norms = ("balance_weight_", "balance_norm_", "balance_ratio_")
    calibrated = [{k: v for k, v in rank.items() if k.startswith(weights_and_norms)} for rank in first]
    assert calibrated[0] == calibrated[1] and len(calibrated[0]) == 8  # the same weights on both workers
    assert first[0]["balance_weight_relation"] != 40.0  # set from the gradients, not the configured weight
    weights = {k.removeprefix("balance_weight_"): v for k, v in first[0].items() if k.startswith("balance_weight_")}

    # `gid distill` of the same run, one epoch longer: resumed with the balance's state
    path = tmp_path / "balanced.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    capsys.readouterr()
    assert main(["distill", str(path), "--set", "train.epochs=2"]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"{'calibrated' if mode == 'gradient' else 'dynamic'} GID weights: ")]
    if mode == "gradient":  # the weights kept, nothing recalibrated
        assert first[0]["balance_calibrations"] == 1
        assert all(f"{name} {value:.3g}" in printed[-1] for name, value in weights.items())
        assert "cost 8 extra backward passes" in printed[-1]  # 2 steps x 4 gradients, once: no second calibration
    else:  # measured on through the second epoch: the step count went on where the first epoch left it
        measured = int(first[0]["balance_measurements"])
        assert measured >= 1 and f"{2 * measured} measurements" in printed[-1]


def test_a_term_without_gradient_is_measured_until_it_has_some_against_the_detector_on_the_same_steps(retinanet):
    """Known norms: the detector's is 3 per step, then 1; the feature term has none on its first two steps,
    the relation has some only on every other step, the response never has any."""
    weight = torch.nn.Parameter(torch.ones(3))
    detector_norms = [3.0, 3.0, 1.0, 1.0, 1.0, 1.0]

    def losses(step: int) -> dict[str, torch.Tensor]:
        zero = weight.sum() * 0.0  # attached, no gradient: what a term gives on a step without GIs
        return {
            "loss_gt_cls": detector_norms[step] * weight[0],
            "loss_feature": 4.0 * weight[1] if step >= 2 else zero,
            "loss_relation": 2.0 * weight[2] if step % 2 == 0 else zero,
            "loss_response_cls": zero, "loss_response_reg": zero,
        }

    config = BalanceConfig(mode="gradient", calibration_steps=2, ratios=RATIOS)
    balance = GradientBalance(config, retinanet)
    scales = retinanet.term_scales  # what the distiller trains with
    for step in range(5):
        balance.measure(losses(step), [weight])
        assert balance.measuring  # the response never had gradient, so it is still measured
    # relation: gradient on steps 0, 2 (detector 3, 1) and 4; set after its second one, against those steps
    assert scales["relation"] == pytest.approx(RATIOS["relation"] * (3.0 + 1.0) / (2.0 + 2.0))
    # feature: its steps 2 and 3, not the detector's earlier, larger gradient
    assert scales["feature"] == pytest.approx(RATIOS["feature"] * 1.0 / 4.0)
    assert balance.extra_backward_passes == 5 + 3 + 4 + 5  # the detector every step, each term until set
    assert balance.end_epoch() and not balance.measuring and balance.calibrations == 1
    assert scales["response"] == 1.0 and balance.norms["response"] == 0.0  # no gradient all epoch: kept
    assert "weight unchanged: response;" in describe(balance.metrics())


def known_norm_losses(weight: torch.nn.Parameter, scales: dict[str, float], detector: float, step: int) -> dict[str, torch.Tensor]:
    """Losses of known gradient norms: the detector's ``detector``; per unit of their scale the feature's 4 and
    the relation's 2 (none on odd steps: no GIs); the response never has any."""
    zero = weight.sum() * 0.0
    return {
        "loss_gt_cls": detector * weight[0],
        "loss_feature": scales["feature"] * 4.0 * weight[1],
        "loss_relation": scales["relation"] * 2.0 * weight[2] if step % 2 == 0 else zero,
        "loss_response_cls": zero, "loss_response_reg": zero,
    }


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_dynamic_balance_follows_the_detectors_gradient_with_its_moving_average(momentum, retinanet):
    weight = torch.nn.Parameter(torch.ones(3))
    detector_norms = [3.0, 3.0, 1.0, 1.0, 0.5, 0.5, 0.2]
    config = BalanceConfig(mode="dynamic", every_steps=2, momentum=momentum, ratios=RATIOS)
    balance = DynamicBalance(config, retinanet)
    scales = retinanet.term_scales  # what the distiller trains with
    expected = {"feature": [], "relation": []}
    for step, detector in enumerate(detector_norms):
        before = dict(scales)
        balance.observe(known_norm_losses(weight, scales, detector, step), [weight])
        if step % 2:  # not a measured step: nothing moves
            assert scales == before
            continue
        for term, unit_norm in (("feature", 4.0), ("relation", 2.0)):
            expected[term].append(unit_norm / detector)
            # Adam's bias-corrected moving average of the log of the term's gradient per unit scale / the detector's
            weights = [(1 - momentum) * momentum ** age for age in range(len(expected[term]))][::-1]
            log_mean = sum(w * math.log(r) for w, r in zip(weights, expected[term])) / (1 - momentum ** len(expected[term]))
            estimate = math.exp(log_mean)
            assert scales[term] == pytest.approx(RATIOS[term] / estimate), (step, term)
        assert scales["response"] == 1.0  # never had gradient: keeps its weight
    if momentum == 0:  # each term exactly at its ratio of the detector's latest gradient
        assert scales["feature"] == pytest.approx(RATIOS["feature"] * 0.2 / 4.0)
    assert balance.measurements == 4 and balance.extra_backward_passes == 4 * 4  # the detector and three terms
    line = describe(balance.metrics())
    assert line.startswith("dynamic GID weights: feature ") and "4 measurements" in line
    assert "response" not in line.split("this epoch: ")[1].split(";")[0]  # no gradient, no measured ratio


def test_dynamic_balance_holds_each_terms_ratio_while_a_real_detector_trains(batch):
    """A real tiny RetinaNet trained from scratch: its detector's gradient falls, and each GID term's gradient,
    at the weight it trained with, stays within 2x of its ratio of the detector's (as a geometric mean:
    step to step, the norms of an untrained detector swing by factors)."""
    model = tiny_distiller("retinanet").train()
    params = trainable_params(model)
    optimizer = torch.optim.SGD(params, lr=0.005, momentum=0.9)
    config = BalanceConfig(mode="dynamic", every_steps=1, momentum=0.5, ratios=RATIOS)
    balance = DynamicBalance(config, model)
    detector = []
    for _ in range(12):
        losses = losses_of(model, batch)
        balance.observe(losses, params)
        detector.append(balance.detector_norm)
        optimizer.zero_grad()
        sum(v for k, v in losses.items() if k.startswith("loss_")).backward()
        optimizer.step()
    assert statistics.geometric_mean(detector[:6]) > 1.5 * statistics.geometric_mean(detector[6:])  # it fell
    for term, target in RATIOS.items():
        later = statistics.geometric_mean(balance.epoch_ratios[term][6:])
        assert target / 2 < later < target * 2, (term, later)
    # the first measurement, on the untrained detector, was far off: the weights moved to get there
    assert not all(target / 2 < balance.epoch_ratios[term][0] < target * 2 for term, target in RATIOS.items())


def test_dynamic_balance_measures_as_the_one_shot_calibration_does(batch):
    model = tiny_distiller("faster_rcnn").train()
    params = trainable_params(model)
    once = GradientBalance(BalanceConfig(mode="gradient", calibration_steps=1, ratios=RATIOS), model)
    once.observe(losses_of(model, batch), params)
    calibrated = dict(model.term_scales)
    model.set_term_scales({term: 1.0 for term in RATIOS})
    dynamic = DynamicBalance(BalanceConfig(mode="dynamic", momentum=0.9, ratios=RATIOS), model)
    dynamic.observe(losses_of(model, batch), params)
    assert model.term_scales == pytest.approx(calibrated, rel=1e-6)


def test_a_resumed_dynamic_balance_continues_with_the_same_weights(retinanet):
    weight = torch.nn.Parameter(torch.ones(3))
    config = BalanceConfig(mode="dynamic", every_steps=3, momentum=0.7, ratios=RATIOS)

    def run(balance: DynamicBalance, steps: range) -> None:
        for step in steps:
            balance.observe(known_norm_losses(weight, balance.scales, 3.0 / (1 + step), step), [weight])

    whole = DynamicBalance(config, retinanet)
    run(whole, range(8))
    saved = whole.state_dict()
    run(whole, range(8, 20))

    retinanet.set_term_scales({term: 1.0 for term in RATIOS})  # a fresh run's
    resumed = DynamicBalance(config, retinanet)
    resumed.load_state_dict(saved)
    run(resumed, range(8, 20))
    assert resumed.scales == whole.scales and resumed.log_relative == whole.log_relative
    assert resumed.measurements == whole.measurements == 7  # steps 0, 3, ..., 18
