"""GID weights set from gradients (``distill.balance.mode: gradient`` or ``dynamic``; beyond the paper, gid-spec §6).

The spec's weights were right for ImageNet-pretrained COCO models; at another scale, data set or
framework the same numbers give GID's terms gradients many times the detector's own (measured here:
2–18×). Calibration measures, over the first ``calibration_steps`` training steps, the gradient norm
over the trainable parameters (student and adapter) of the detector's loss and of each enabled term at
its configured weight, then scales each term so that its gradient is ``ratios.<term>`` times the
detector's. One scale per term: the response's cls/reg (and Faster R-CNN's second-stage) proportions
stay as configured. The calibration steps themselves train with the configured weights.

A term has no gradient on a step without general instances (a high ``gism.min_score`` early in
training, a relation over fewer than two GIs). Its norm is averaged over the steps on which it had
gradient, against the detector's norm on those same steps, and it is measured until it had gradient on
``calibration_steps`` steps or the epoch ends; one that never had any keeps its configured weight.

A one-shot calibration meets the detector's first transient: the detector's gradient then falls 2–28×
over training while GID's falls far less (docs/benchmarks.md), so the terms drift from their ratios.
``mode: dynamic`` (:class:`DynamicBalance`) measures the same norms every ``every_steps`` steps for the
whole run and keeps each term at its ratio of the detector's.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gid.config import BalanceConfig
from gid.distill.distiller import Distiller
from gid.distill.terms import TERMS, enabled_terms

DETECTOR = "detector"  # the detector's own loss: the loss_gt_* terms


def _gradient_norm(loss: Tensor, params: list[nn.Parameter]) -> Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    norms = [g.detach().float().norm() for g in grads if g is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else loss.new_zeros(())


def _norms(
    losses: dict[str, Tensor], params: list[nn.Parameter], terms: list[str], scales: dict[str, float]
) -> tuple[Tensor, dict[str, Tensor], int]:
    """The detector's gradient norm, each term's per unit of its scale (0 where it has no gradient), and
    the backward passes that took."""
    detector = _gradient_norm(sum(v for k, v in losses.items() if k.startswith("loss_gt_")), params)
    norms, passes = {}, 1
    for term in terms:
        parts = [losses[k] for k in TERMS[term].losses if k in losses]
        if parts:
            norms[term] = _gradient_norm(sum(parts), params) / scales[term]  # as if at the configured weight
            passes += 1
        else:
            norms[term] = detector.new_zeros(())
    return detector, norms, passes


def _mean_over_workers(values: Tensor) -> Tensor:
    """``values`` averaged over DDP workers, so that every worker takes the same decision."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


class GradientBalance:
    """Calibrates a Distiller's term scales from the gradients of the first training steps.

    The loop calls :meth:`measure` with each step's losses while :attr:`measuring`. After
    ``calibration_steps`` calls each term that had gradient on that many steps gets its scale; the
    others are measured on the following steps until they have, or until :meth:`end_epoch`. Every DDP
    worker takes the same decisions with the same scales: they are made on sums all-reduced over workers.
    The scales are kept for the rest of training unless ``recalibrate: epoch``.
    """

    def __init__(self, config: BalanceConfig, distiller: Distiller):
        self.config, self.distiller = config, distiller
        self.scales = dict(distiller.term_scales)  # its own copy: every change is set on the distiller
        self.terms = enabled_terms(distiller.config)
        self.measuring = True
        self.calibrations = 0  # how many times the weights were set (1 unless recalibrate: epoch)
        self.extra_backward_passes, self.seconds = 0, 0.0  # what calibration cost, in all
        self._restart()

    def _restart(self) -> None:
        self._pending = list(self.terms)  # terms still without a calibrated scale
        self._steps = 0
        # per group, summed over this calibration's steps: [detector norm, group norm, steps with gradient];
        # a term's sums count only the steps on which it had gradient, the detector's count every step
        self._sums: dict[str, Tensor] = {}
        self.norms: dict[str, float] = {}  # mean norms over those steps, terms per unit scale

    def start_epoch(self) -> None:
        if self.config.recalibrate == "epoch" and not self.measuring:
            self.measuring = True
            self._restart()

    def end_epoch(self) -> bool:
        """Set the scales of the terms still measured at an epoch's end, on the steps they had.

        An epoch shorter than ``calibration_steps`` calibrates here; a term that had no gradient in the
        whole epoch keeps its weight. Every DDP worker trains the same number of steps per
        epoch, so all of them get here together. Returns whether it calibrated.
        """
        if not (self.measuring and self._steps):
            return False
        self._calibrate(final=True)
        return True

    def observe(self, losses: dict[str, Tensor], params: list[nn.Parameter]) -> bool:
        """The loop's call on every training step; True when it has just set the weights."""
        if not self.measuring:
            return False
        self.measure(losses, params)
        return not self.measuring

    def measure(self, losses: dict[str, Tensor], params: list[nn.Parameter]) -> None:
        """Add one step's gradient norms (one extra backward pass per group measured); calibrate when due."""
        started = time.perf_counter()
        detector, norms, passes = _norms(losses, params, self._pending, self.scales)
        self.extra_backward_passes += passes
        self._add(DETECTOR, detector, detector)
        for term, norm in norms.items():
            self._add(term, detector, norm)
        self._steps += 1
        if self._steps >= self.config.calibration_steps:
            self._calibrate(final=False)
        self.seconds += time.perf_counter() - started

    def _add(self, name: str, detector: Tensor, norm: Tensor) -> None:
        had_gradient = (norm > 0).to(norm.dtype)
        step = torch.stack([detector * had_gradient, norm, had_gradient])
        self._sums[name] = self._sums[name] + step if name in self._sums else step

    def _calibrate(self, final: bool) -> None:
        names = [DETECTOR, *self._pending]
        sums = _mean_over_workers(torch.stack([self._sums[name] for name in names]))
        for name, (detector, norm, steps) in zip(names, sums.tolist()):
            if name == DETECTOR:
                self.norms[DETECTOR] = norm / max(steps, 1)
            elif steps >= self.config.calibration_steps or (final and steps > 0):
                # the term against the detector on the same steps
                self.scales[name] = getattr(self.config.ratios, name) * detector / norm
                self.norms[name] = norm / steps
                self._pending.remove(name)
            elif final:  # no gradient in the whole epoch: its weight stays (the configured one, at first)
                self.norms[name] = 0.0
                self._pending.remove(name)
        self.distiller.set_term_scales(self.scales)
        if not self._pending:
            self.measuring = False
            self.calibrations += 1

    def metrics(self) -> dict[str, float]:
        """What the run reports (and MLflow keeps): the weights trained with, the norms, the cost."""
        if not self.calibrations:
            return {}
        weights = {f"balance_weight_{k}": v for k, v in self.distiller.term_weights().items()}
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
        self.distiller.set_term_scales(self.scales)
        self.norms, self.measuring, self.calibrations = state["norms"], state["measuring"], state["calibrations"]
        self.extra_backward_passes, self.seconds = state["extra_backward_passes"], state["seconds"]


class DynamicBalance:
    """Keeps each enabled term's gradient at ``ratios.<term>`` times the detector's all run (``mode: dynamic``).

    On the first training step and every ``every_steps`` steps after it, it measures the gradient
    norms of the detector's loss and of each term, as :class:`GradientBalance` does (one extra backward
    pass each, with the step's graph), and smooths each term's norm per unit of its scale relative to
    the detector's: an exponential moving average (``momentum``) of its logarithm, bias-corrected as in
    Adam so that the first measurement counts alone. The term's scale becomes its ratio over that
    estimate, from the next step on. A term without gradient on a measured step (no GIs) keeps its
    estimate and its weight. Workers average the norms before deciding, so every DDP worker trains with the same weights.
    """

    def __init__(self, config: BalanceConfig, distiller: Distiller):
        self.config, self.distiller = config, distiller
        self.scales = dict(distiller.term_scales)  # its own copy: every change is set on the distiller
        self.terms = enabled_terms(distiller.config)
        self.steps = 0  # training steps seen, over the whole run
        self.measurements, self.extra_backward_passes, self.seconds = 0, 0, 0.0
        self.log_relative: dict[str, float] = {}  # per term: the moving average, before bias correction
        self.updates: dict[str, int] = {}  # per term: the measurements it had gradient on
        self.detector_norm = 0.0  # at the last measurement
        self.epoch_ratios: dict[str, list[float]] = {}  # per term: this epoch's measured gradient / detector's

    def start_epoch(self) -> None:
        self.epoch_ratios = {}

    def end_epoch(self) -> bool:
        """Whether this epoch measured, so its weights and ratios are worth a line."""
        return bool(self.epoch_ratios)

    def observe(self, losses: dict[str, Tensor], params: list[nn.Parameter]) -> bool:
        """The loop's call on every training step: measures and updates the weights when due."""
        due = self.steps % self.config.every_steps == 0
        self.steps += 1
        if due:
            self.measure(losses, params)
        return False  # the weights are reported per epoch, not per update

    def measure(self, losses: dict[str, Tensor], params: list[nn.Parameter]) -> None:
        started = time.perf_counter()
        detector, norms, passes = _norms(losses, params, self.terms, self.scales)
        self.extra_backward_passes += passes
        # per term: [the detector's norm where the term had gradient, the term's norm, whether it had gradient]
        rows = [torch.stack([detector * (norm > 0), norm, (norm > 0).to(norm.dtype)]) for norm in norms.values()]
        values = _mean_over_workers(torch.cat([detector.reshape(1), *rows])).tolist()
        self.detector_norm, momentum = values[0], self.config.momentum
        for index, term in enumerate(self.terms):
            detector_sum, norm_sum, had_gradient = values[1 + 3 * index: 4 + 3 * index]
            if not had_gradient or not detector_sum:
                continue
            relative = norm_sum / detector_sum  # per unit scale, against the detector on the same workers
            self.epoch_ratios.setdefault(term, []).append(relative * self.scales[term])  # at the weight trained with
            # averaged as logarithms: step-to-step noise in a norm ratio is a factor, not an offset
            self.log_relative[term] = momentum * self.log_relative.get(term, 0.0) + (1 - momentum) * math.log(relative)
            self.updates[term] = self.updates.get(term, 0) + 1
            estimate = math.exp(self.log_relative[term] / (1 - momentum ** self.updates[term]))
            self.scales[term] = getattr(self.config.ratios, term) / estimate
        self.distiller.set_term_scales(self.scales)
        self.measurements += 1
        self.seconds += time.perf_counter() - started

    def metrics(self) -> dict[str, float]:
        """The weights after this epoch, the gradient ratios it measured (geometric mean, at the weights trained
        with), the cost."""
        if not self.measurements:
            return {}
        weights = {f"balance_weight_{k}": v for k, v in self.distiller.term_weights().items()}
        ratios = {f"balance_ratio_{k}": statistics.geometric_mean(v) for k, v in self.epoch_ratios.items()}
        cost = {
            "balance_norm_detector": self.detector_norm, "balance_measurements": self.measurements,
            "balance_extra_backward_passes": self.extra_backward_passes, "balance_seconds": self.seconds,
        }
        return {**weights, **ratios, **cost}

    def summary(self) -> str | None:
        return describe(self.metrics())

    def state_dict(self) -> dict[str, Any]:
        return {
            "scales": dict(self.scales), "log_relative": dict(self.log_relative), "updates": dict(self.updates),
            "steps": self.steps, "measurements": self.measurements, "detector_norm": self.detector_norm,
            "extra_backward_passes": self.extra_backward_passes, "seconds": self.seconds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue with the checkpointed run's weights, averages and step count."""
        self.scales.update(state["scales"])
        self.distiller.set_term_scales(self.scales)
        self.log_relative, self.updates = dict(state["log_relative"]), dict(state["updates"])
        self.steps = state["steps"]
        self.measurements, self.detector_norm = state["measurements"], state["detector_norm"]
        self.extra_backward_passes, self.seconds = state["extra_backward_passes"], state["seconds"]


def build_balance(config: BalanceConfig, distiller: Distiller) -> GradientBalance | DynamicBalance | None:
    """What sets ``distiller``'s term scales during training for ``config.mode``; None for fixed weights."""
    kind = {"gradient": GradientBalance, "dynamic": DynamicBalance}.get(config.mode)
    return kind(config, distiller) if kind is not None else None


def describe(metrics: dict[str, Any]) -> str | None:
    """One line on a run's gradient-set weights, from its reported metrics; None for fixed weights."""
    def listed(prefix: str) -> str:
        return ", ".join(f"{k.removeprefix(prefix)} {v:.3g}" for k, v in metrics.items() if k.startswith(prefix))

    cost = (
        f"cost {int(metrics.get('balance_extra_backward_passes', 0))} extra backward passes, "
        f"{metrics.get('balance_seconds', 0.0):.1f} s"
    )
    if "balance_measurements" in metrics:
        return (
            f"dynamic GID weights: {listed('balance_weight_')} (gradient / detector's this epoch: "
            f"{listed('balance_ratio_') or 'no term had gradient'}; {int(metrics['balance_measurements'])} "
            f"measurements, {cost})"
        )
    if "balance_calibrations" not in metrics:
        return None
    norms = listed("balance_norm_")
    kept = [k.removeprefix("balance_norm_") for k, v in metrics.items() if k.startswith("balance_norm_") and v == 0]
    return (
        f"calibrated GID weights: {listed('balance_weight_')} (gradient norms at the configured weights: {norms}; "
        + (f"no gradient while measured, so weight unchanged: {', '.join(kept)}; " if kept else "")
        + f"{cost})"
    )
