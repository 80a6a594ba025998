"""Gradient-calibrated GID weights (``distill.balance.mode: gradient``; beyond the paper, gid-spec §6).

The spec's weights were right for ImageNet-pretrained COCO models; at another scale, data set or
framework the same numbers give GID's terms gradients many times the detector's own (measured here:
2–18×). Calibration measures, over the first ``calibration_steps`` training steps, the gradient norm
over the trainable parameters (student and adapter) of the detector's loss and of each enabled term at
its configured weight, then scales each term so that its gradient is ``ratios.<term>`` times the
detector's. One scale per term: the response's cls/reg (and Faster R-CNN's second-stage) proportions
stay as configured. The calibration steps themselves train with the configured weights.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gid.config import BalanceConfig, DistillConfig

#: The loss keys each calibrated term sums; the Distiller multiplies them all by the term's scale.
TERM_LOSSES = {
    "feature": ("loss_feature",),
    "relation": ("loss_relation",),
    "response": ("loss_response_cls", "loss_response_reg", "loss_response_roi_cls", "loss_response_roi_reg"),
}
DETECTOR = "detector"  # the detector's own loss: the loss_gt_* terms


def enabled_terms(config: DistillConfig) -> list[str]:
    return [term for term in TERM_LOSSES if getattr(config, term).enabled]


def effective_weights(config: DistillConfig, scales: dict[str, float]) -> dict[str, float]:
    """The weight each enabled loss is trained with: the configured one times its term's scale."""
    weights = {}
    if config.feature.enabled:
        weights["feature"] = config.feature.weight * scales["feature"]
    if config.relation.enabled:
        weights["relation"] = config.relation.weight * scales["relation"]
    if config.response.enabled:
        weights["response_cls"] = config.response.cls_weight * scales["response"]
        weights["response_reg"] = config.response.reg_weight * scales["response"]
    return weights


def _gradient_norm(loss: Tensor, params: list[nn.Parameter]) -> Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    norms = [g.detach().float().norm() for g in grads if g is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else loss.new_zeros(())


class GradientBalance:
    """Calibrates a Distiller's ``term_scales`` in place from the gradients of the first training steps.

    The loop calls :meth:`measure` with each step's losses while :attr:`measuring`; after
    ``calibration_steps`` calls the scales are set, the same on every DDP worker (the measured norms are
    averaged over workers), and kept for the rest of training unless ``recalibrate: epoch``.
    """

    def __init__(self, config: BalanceConfig, distill: DistillConfig, scales: dict[str, float]):
        self.config, self.distill, self.scales = config, distill, scales
        self.terms = enabled_terms(distill)
        self.measuring = True
        self.calibrations = 0  # how many times the weights were set (1 unless recalibrate: epoch)
        self.norms: dict[str, float] = {}  # the last calibration's mean norms, terms per unit scale
        self.extra_backward_passes, self.seconds = 0, 0.0  # what calibration cost, in all
        self._sums: dict[str, Tensor] = {}
        self._steps = 0

    def start_epoch(self) -> None:
        if self.config.recalibrate == "epoch" and not self.measuring:
            self.measuring = True

    def end_epoch(self) -> bool:
        """Calibrate on the steps measured so far if an epoch was shorter than ``calibration_steps``.

        Every DDP worker trains the same number of steps per epoch, so all of them calibrate here
        together. Returns whether it calibrated.
        """
        if not (self.measuring and self._steps):
            return False
        self._calibrate()
        return True

    def measure(self, losses: dict[str, Tensor], params: list[nn.Parameter]) -> None:
        """Add one step's gradient norms (one extra backward pass per group); calibrate after the last."""
        started = time.perf_counter()
        groups = {DETECTOR: [v for k, v in losses.items() if k.startswith("loss_gt_")]}
        groups |= {term: [losses[k] for k in TERM_LOSSES[term] if k in losses] for term in self.terms}
        for name, parts in groups.items():
            if not parts:
                continue
            norm = _gradient_norm(sum(parts), params)
            per_unit = norm if name == DETECTOR else norm / self.scales[name]  # as if at the configured weight
            self._sums[name] = self._sums.get(name, 0) + per_unit
            self.extra_backward_passes += 1
        self._steps += 1
        if self._steps == self.config.calibration_steps:
            self._calibrate()
        self.seconds += time.perf_counter() - started

    def _calibrate(self) -> None:
        names = [DETECTOR, *self.terms]
        zero = self._sums[DETECTOR].new_zeros(())
        means = torch.stack([self._sums.get(name, zero) for name in names]) / self._steps
        if dist.is_available() and dist.is_initialized():  # every worker trains with the same weights
            dist.all_reduce(means)
            means /= dist.get_world_size()
        self.norms = dict(zip(names, means.tolist()))
        for term in self.terms:
            if self.norms[term] > 0:  # a term without gradient (no GI in any step) keeps its weight
                self.scales[term] = getattr(self.config.ratios, term) * self.norms[DETECTOR] / self.norms[term]
        self._sums, self._steps = {}, 0
        self.measuring = False
        self.calibrations += 1

    def metrics(self) -> dict[str, float]:
        """What the run reports (and MLflow keeps): the weights trained with, the norms, the cost."""
        if not self.calibrations:
            return {}
        weights = {f"balance_weight_{k}": v for k, v in effective_weights(self.distill, self.scales).items()}
        norms = {f"balance_norm_{k}": v for k, v in self.norms.items()}
        cost = {"balance_calibrations": self.calibrations, "balance_extra_backward_passes": self.extra_backward_passes,
                "balance_seconds": self.seconds}
        return {**weights, **norms, **cost}

    def summary(self) -> str | None:
        return describe(self.metrics())

    def state_dict(self) -> dict[str, Any]:
        return {
            "scales": dict(self.scales), "norms": self.norms, "measuring": self.measuring,
            "calibrations": self.calibrations, "extra_backward_passes": self.extra_backward_passes,
            "seconds": self.seconds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue as the checkpointed run would have: a resumed run does not calibrate again."""
        self.scales.update(state["scales"])
        self.norms, self.measuring, self.calibrations = state["norms"], state["measuring"], state["calibrations"]
        self.extra_backward_passes, self.seconds = state["extra_backward_passes"], state["seconds"]


def describe(metrics: dict[str, Any]) -> str | None:
    """One line on a run's calibrated weights, from its reported metrics; None for fixed weights."""
    if "balance_calibrations" not in metrics:
        return None
    weights = ", ".join(f"{k.removeprefix('balance_weight_')} {v:.3g}" for k, v in metrics.items() if k.startswith("balance_weight_"))
    norms = ", ".join(f"{k.removeprefix('balance_norm_')} {v:.3g}" for k, v in metrics.items() if k.startswith("balance_norm_"))
    return (
        f"calibrated GID weights: {weights} (gradient norms at the configured weights: {norms}; "
        f"cost {int(metrics['balance_extra_backward_passes'])} extra backward passes, {metrics['balance_seconds']:.1f} s)"
    )
