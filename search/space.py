"""Search spaces: YAML ranges and choices over config keys, as Optuna distributions, and how a
sampled point becomes config values."""

from __future__ import annotations

import copy
import itertools
from typing import Annotated, Any, Literal, Union

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from pydantic import Field, model_validator

from gid.config import StrictModel, set_value
from gid.distill.terms import TERMS


class FloatRange(StrictModel):
    type: Literal["float"] = "float"
    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _check(self) -> FloatRange:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}")
        return self

    def distribution(self) -> BaseDistribution:
        return FloatDistribution(self.low, self.high, log=self.log)

    def contains(self, value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and self.low <= value <= self.high


class IntRange(FloatRange):
    type: Literal["int"] = "int"
    low: int
    high: int

    def distribution(self) -> BaseDistribution:
        return IntDistribution(self.low, self.high, log=self.log)

    def contains(self, value: Any) -> bool:
        return isinstance(value, int) and super().contains(value)


class Choice(StrictModel):
    type: Literal["choice"] = "choice"
    values: list[Any] = Field(min_length=1)

    def distribution(self) -> BaseDistribution:
        return CategoricalDistribution(self.values)

    def contains(self, value: Any) -> bool:
        return value in self.values


Dimension = Annotated[Union[FloatRange, IntRange, Choice], Field(discriminator="type")]

# gid-spec.md §6: the searchable GISM values with their suggested ranges.
GISM_SPACE: dict[str, dict[str, Any]] = {
    "distill.gism.nms_iou": {"type": "float", "low": 0.1, "high": 0.7},
    "distill.gism.top_k": {"type": "int", "low": 1, "high": 100, "log": True},
    "distill.gism.pre_nms_top_k": {"type": "choice", "values": [1000, 3000, 6000]},
    "distill.gism.score_mode": {"type": "choice", "values": ["paper", "reference"]},
    "distill.gism.min_score": {"type": "float", "low": 0.0, "high": 0.3},
}
# distill.balance.mode fixed: the loss weights themselves, over the spec's suggested ranges.
WEIGHT_SPACE: dict[str, dict[str, Any]] = {
    "distill.feature.weight": {"type": "float", "low": 5e-5, "high": 5e-2, "log": True},
    "distill.relation.weight": {"type": "float", "low": 1.0, "high": 200.0, "log": True},
    "distill.response.cls_weight": {"type": "float", "low": 0.01, "high": 1.0, "log": True},
    "distill.response.reg_weight": {"type": "float", "low": 0.1, "high": 5.0, "log": True},
}
# distill.balance.mode gradient or dynamic: each term's gradient as a multiple of the detector's. Up to 10, so the
# space holds the spec's own weights (on FCOS they give relation 6.2x and response 4.5x the detector's,
# docs/benchmarks.md) and the demo sweep's best, at 3.0 the old range's edge, has room beyond it.
RATIO_SPACE: dict[str, dict[str, Any]] = {
    f"distill.balance.ratios.{term}": {"type": "float", "low": 0.03, "high": 10.0, "log": True}
    for term in TERMS
}

#: A search key that is not a config key: which of the three GID losses a trial uses, as a
#: comma-separated set. Every default set is non-empty: with none, a trial is the student alone
#: (the baseline every GID trial is compared with), not a GID trial.
LOSSES = "distill.losses"
STUDENT_ALONE = {f"distill.{term}.enabled": False for term in TERMS}  # every GID loss off: the plain student
LOSS_SETS = [",".join(terms) for size in range(len(TERMS), 0, -1) for terms in itertools.combinations(TERMS, size)]


def default_space(balance_mode: str) -> dict[str, dict[str, Any]]:
    """The search space a sweep uses when its file gives none, for a base config's ``distill.balance.mode``."""
    weights = WEIGHT_SPACE if balance_mode == "fixed" else RATIO_SPACE
    return {**weights, **GISM_SPACE, LOSSES: {"type": "choice", "values": LOSS_SETS}}


def as_config_values(params: dict[str, Any]) -> dict[str, Any]:
    """Sampled values as dotted config keys: ``distill.losses`` becomes the three ``distill.<term>.enabled``."""
    values = {key: value for key, value in params.items() if key != LOSSES}
    if LOSSES in params:
        used = str(params[LOSSES]).split(",")
        if unknown := set(used) - set(TERMS):
            raise ValueError(f"{LOSSES} {params[LOSSES]!r}: {', '.join(sorted(unknown))} is not one of {', '.join(TERMS)}")
        values.update({f"distill.{term}.enabled": term in used for term in TERMS})
    return values


def with_values(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A config tree (``base``, untouched) with a sampled point's values set."""
    data = copy.deepcopy(base)
    for key, value in as_config_values(params).items():
        set_value(data, key, value)
    return data


def relevant(params: dict[str, Any]) -> dict[str, Any]:
    """A trial's sampled values without those of the losses it does not use."""
    enabled = as_config_values(params)
    off = [term for term in TERMS if enabled.get(f"distill.{term}.enabled") is False]
    unused = tuple(f"distill.{term}." for term in off) + tuple(f"distill.balance.ratios.{term}" for term in off)
    return {key: value for key, value in params.items() if not key.startswith(unused) or key.endswith(".enabled")}


def describe_values(params: dict[str, Any]) -> str:
    """A trial's values that matter, short: ``feature.weight=0.005, gism.top_k=10, ...``."""
    def short(value: Any) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    return ", ".join(f"{key.removeprefix('distill.')}={short(value)}" for key, value in relevant(params).items())


def to_optuna(space: dict[str, Dimension]) -> dict[str, BaseDistribution]:
    return {key: dimension.distribution() for key, dimension in space.items()}
