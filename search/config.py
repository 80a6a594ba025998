"""The sweep file: what to search, over which frameworks, with what budget, logged where."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, TypeAdapter, ValidationError, field_validator, model_validator

from gid.config import (
    SHARED_GPU_ERROR,
    Config,
    Framework,
    StrictModel,
    apply_overrides,
    format_validation_error,
    load_config,
    read_yaml,
    validate,
)
from gid.engine.evaluation import COCO_METRICS
from gid.engine.latency import COST_METRICS
from gid.errors import GidError
from search.names import check_model_name, check_sweep_name
from search.space import Choice, Dimension, default_space, with_values


class FrameworkSweep(StrictModel):
    """One framework's base distill config; every trial is this config plus sampled values."""

    config: Path
    overrides: list[str] = []  # dotted overrides applied to the base config, e.g. ["train.epochs=4"]
    # Model file of the same student trained alone (`gid train`): its mAP is shown for reference.
    baseline: Path | None = None


class Resources(StrictModel):
    workers_per_trial: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)  # 0: CPU training; fractions let trials share a GPU
    max_concurrent_trials: int = Field(1, ge=1)  # Tune cannot see Train workers: bound it here

    @model_validator(mode="after")
    def _one_gpu_per_worker_of_a_trial(self) -> Resources:
        if self.workers_per_trial > 1 and 0 < self.gpus_per_worker < 1:
            raise ValueError(SHARED_GPU_ERROR)
        return self


#: What every trial reports at every epoch that a sweep may rank by (the loop's metrics and Tune's time_total_s);
#: besides, each loss term as loss_<term>.
TRIAL_METRICS = (
    *(f"val_{name}" for name in COCO_METRICS), "loss", "train_time_s", "time_total_s", "memory_peak_mb", *COST_METRICS,
)


class Objective(StrictModel):
    metric: str = "val_ap"
    mode: Literal["max", "min"] = "max"
    # Optional second objective for a Pareto front, e.g. "latency_ms" minimised.
    second_metric: str | None = None
    second_mode: Literal["max", "min"] = "min"
    # Each trial's train.latency_runs: its student's params and CPU latency_ms, timed in the trial's process beside
    # whatever else runs on its node: enough to tell architectures apart, not a deployment figure (`gid eval` is).
    latency_runs: int = Field(5, ge=0)

    @model_validator(mode="after")
    def _metrics_trials_report(self) -> Objective:
        for key in ("metric", "second_metric"):
            name = getattr(self, key)
            if name is None:
                continue
            if name not in TRIAL_METRICS and not name.startswith("loss_"):
                raise ValueError(
                    f"{key} {name!r} is not a metric every trial reports; choose one of {', '.join(TRIAL_METRICS)} "
                    "or a loss_<term> of the framework"
                )
            if name in COST_METRICS and self.latency_runs == 0:
                raise ValueError(f"{key} {name} needs latency_runs of 1 or more: with 0 no trial measures its cost")
        return self


class Scheduler(StrictModel):
    type: Literal["asha", "none"] = "asha"
    grace_period: int | Literal["auto"] = "auto"  # epochs before ASHA may stop a trial
    reduction_factor: float = Field(2, gt=1)

    @model_validator(mode="after")
    def _grace_period_is_positive(self) -> Scheduler:
        if self.grace_period != "auto" and self.grace_period < 1:
            raise ValueError(f"grace_period must be 'auto' or at least 1, got {self.grace_period}")
        return self

    def grace_period_for(self, epochs: int) -> int:
        """auto: two thirds of the schedule. Measured (docs/benchmarks.md): AP after the first third of a
        short schedule ranks trials no better than chance, so ASHA may only stop trials in the last third."""
        grace = math.ceil(2 * epochs / 3) if self.grace_period == "auto" else self.grace_period
        return max(1, min(grace, epochs))


class Sampler(StrictModel):
    type: Literal["tpe", "random"] = "tpe"
    seed: int = 0
    paper_defaults_first: bool = True  # evaluate GID's defaults (the spec's GISM values) as the first trial
    # TPE samples at random until this many trials have finished (Optuna's default: 10); small sweeps
    # need fewer to reach the model-guided phase at all. auto: a quarter of the trials, 2 to 10.
    startup_trials: int | Literal["auto"] = "auto"
    # TPE's model, at Optuna 5's defaults (set here, so that an Optuna upgrade cannot change a sweep): a trial's values
    # sampled jointly (multivariate), and the running trials counted as bad ones (constant_liar) so that concurrent
    # trials spread out. Optuna's `group` has nothing to split here: every trial samples every key of the space.
    multivariate: bool = True
    constant_liar: bool = True

    @model_validator(mode="after")
    def _tpe_settings_are_tpe_only(self) -> Sampler:
        tpe_only = {"startup_trials", "multivariate", "constant_liar"} & self.model_fields_set
        if self.type == "random" and tpe_only:
            raise ValueError(f"{', '.join(sorted(tpe_only))} applies to sampler.type tpe only; remove it or set type: tpe")
        if self.startup_trials != "auto" and self.startup_trials < 1:
            raise ValueError(f"startup_trials must be 'auto' or at least 1, got {self.startup_trials}")
        return self

    def startup_trials_for(self, trials: int) -> int:
        return min(10, max(2, trials // 4)) if self.startup_trials == "auto" else self.startup_trials


class Finalize(StrictModel):
    """The sweep's last stage: its ``top`` finished configurations re-trained over ``seeds`` training
    seeds, with the student alone on the same seeds, at full fidelity (no pruning)."""

    top: int = Field(2, ge=1)
    seeds: int = Field(3, ge=1)
    overrides: list[str] = []  # dotted overrides for these runs only, e.g. ["train.epochs=12"]

    def applied_to(self, base: dict[str, Any], source: str) -> Config:
        """``base`` (a config tree, untouched) with this stage's overrides."""
        return validate(apply_overrides(copy.deepcopy(base), list(self.overrides)), source=f"{source} with finalize.overrides")


class Tracking(StrictModel):
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else MLflow's local default store
    experiment: str = "gid-sweeps"
    artifact_location: str | None = None  # where a new experiment keeps artifacts (default: MLflow's)
    # At the end: export the winners' configs and register their students as this MLflow model (search.registry).
    registered_model: str | None = None
    # MLflow's system metrics on each trial's run, sampled this often in the trial's process (0: off; search.system_metrics).
    system_metrics_interval_s: float = Field(10, ge=0)

    @field_validator("registered_model")
    @classmethod
    def _usable_model_name(cls, name: str | None) -> str | None:
        return name if name is None else check_model_name(name)


class SweepConfig(StrictModel):
    name: str
    frameworks: dict[Framework, FrameworkSweep] = Field(min_length=1)
    # None: each framework's default_space for its base config's distill.balance.mode
    space: dict[str, Dimension] | None = None
    trials: int = Field(20, ge=1)  # per framework
    # Per framework: end the experiment once its trials have trained this many epochs in all
    # (None: run all `trials`). Equal budgets make search strategies comparable.
    budget_epochs: int | None = Field(None, ge=1)
    resources: Resources = Resources()
    objective: Objective = Objective()
    scheduler: Scheduler = Scheduler()
    sampler: Sampler = Sampler()
    finalize: Finalize | None = None  # None: the best single trial is the winner
    tracking: Tracking = Tracking()
    storage_path: str = "runs/sweeps"  # Ray Tune results and checkpoints (a bucket URI on clusters)
    optuna_storage: str | None = None  # default: sqlite file per sweep under storage_path

    @field_validator("name")
    @classmethod
    def _usable_name(cls, name: str) -> str:
        return check_sweep_name(name)

    @model_validator(mode="after")
    def _registered_students_are_readable(self) -> SweepConfig:
        if self.tracking.registered_model and "://" in self.storage_path:
            raise ValueError(
                "tracking.registered_model: registering reads the winners' checkpoints from storage_path, a bucket "
                f"here ({self.storage_path}); it needs a local or mounted folder"
            )
        return self

    @field_validator("space")
    @classmethod
    def _space_not_empty(cls, space: dict[str, Any] | None) -> dict[str, Any] | None:
        if space is not None and not space:
            raise ValueError("the search space is empty; remove `space` to use the default or list ranges")
        return space

    def base_config(self, framework: str) -> Config:
        """The framework's base distill config with the sweep's overrides and every space key valid."""
        entry = self.frameworks[framework]
        config = load_config(entry.config, entry.overrides)
        if config.distill is None:
            raise GidError(f"{entry.config}: a sweep's base config needs a distill section with distill.teacher")
        if config.model.framework != framework:
            raise GidError(
                f"{entry.config}: model.framework is {config.model.framework!r} but the sweep lists it under {framework!r}"
            )
        check_space_keys(config, self.space_for(config))
        if self.finalize:
            self.finalize.applied_to(config.to_dict(), str(entry.config))
        return config

    def space_for(self, base: Config) -> dict[str, Dimension]:
        """What a framework's trials sample: the file's space, or the default for its weighting mode."""
        if self.space is not None:
            return self.space
        return _SPACE.validate_python(default_space(base.distill.balance.mode))


def check_space_keys(config: Config, space: dict[str, Dimension]) -> None:
    """Fail before any compute if a space key or value does not fit the config tree."""
    for key, dimension in space.items():
        values = dimension.values if isinstance(dimension, Choice) else [dimension.low, dimension.high]
        for value in values:
            try:
                Config.model_validate(with_values(config.to_dict(), {key: value}))
            except ValidationError as exc:
                raise GidError(format_validation_error(exc, f"space {key}")) from None
            except ValueError as exc:  # e.g. distill.losses naming a loss that does not exist
                raise GidError(f"space {key}: {exc}") from None


_SPACE = TypeAdapter(dict[str, Dimension])


def load_sweep(path: Path, overrides: list[str] | None = None) -> SweepConfig:
    data = apply_overrides(read_yaml(path, "sweep file"), overrides or [])
    try:
        return SweepConfig.model_validate(data)
    except ValidationError as exc:
        raise GidError(format_validation_error(exc, str(path))) from None
