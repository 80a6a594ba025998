"""Search spaces: YAML ranges and choices over config keys, as Optuna distributions."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from pydantic import Field, model_validator

from gid.config import StrictModel


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


class Choice(StrictModel):
    type: Literal["choice"] = "choice"
    values: list[Any] = Field(min_length=1)

    def distribution(self) -> BaseDistribution:
        return CategoricalDistribution(self.values)

    def contains(self, value: Any) -> bool:
        return value in self.values


Dimension = Annotated[Union[FloatRange, IntRange, Choice], Field(discriminator="type")]

# gid-spec.md §6: every searchable GID value with its suggested range, plus the loss switches.
DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "distill.feature.weight": {"type": "float", "low": 5e-5, "high": 5e-2, "log": True},
    "distill.relation.weight": {"type": "float", "low": 1.0, "high": 200.0, "log": True},
    "distill.response.cls_weight": {"type": "float", "low": 0.01, "high": 1.0, "log": True},
    "distill.response.reg_weight": {"type": "float", "low": 0.1, "high": 5.0, "log": True},
    "distill.gism.nms_iou": {"type": "float", "low": 0.1, "high": 0.7},
    "distill.gism.top_k": {"type": "int", "low": 1, "high": 100, "log": True},
    "distill.gism.pre_nms_top_k": {"type": "choice", "values": [1000, 3000, 6000]},
    "distill.gism.score_mode": {"type": "choice", "values": ["paper", "reference"]},
    "distill.gism.min_score": {"type": "float", "low": 0.0, "high": 0.3},
    "distill.feature.enabled": {"type": "choice", "values": [True, False]},
    "distill.relation.enabled": {"type": "choice", "values": [True, False]},
    "distill.response.enabled": {"type": "choice", "values": [True, False]},
}


def to_optuna(space: dict[str, Dimension]) -> dict[str, BaseDistribution]:
    return {key: dimension.distribution() for key, dimension in space.items()}
