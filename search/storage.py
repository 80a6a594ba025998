"""Where a sweep keeps its files, and the id that names it in MLflow."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

from gid.config import expanded
from search.config import SweepConfig


@dataclass(frozen=True)
class SweepPaths:
    """Where a sweep keeps things: ``root`` may be a bucket URI on clusters, ``local`` is on this machine."""

    root: str  # <storage_path>/<name>: Tune experiments (with the checkpoints of one-worker trials), Train runs
    local: Path  # the report and the default Optuna database

    @classmethod
    def of(cls, sweep: SweepConfig) -> SweepPaths:
        if "://" in sweep.storage_path:  # cloud storage: keep driver-side files next to the driver
            return cls(f"{sweep.storage_path.rstrip('/')}/{sweep.name}", Path(".gid-sweeps").resolve() / sweep.name)
        local = expanded(sweep.storage_path, "storage_path").resolve() / sweep.name
        return cls(str(local), local)

    def join(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def optuna_storage(self, sweep: SweepConfig) -> str:
        return sweep.optuna_storage or f"sqlite:///{self.local / 'optuna.db'}"

    def sweep_id(self, resume: bool) -> str:
        """The id that names this sweep in MLflow: recorded when it starts, read back on ``--resume``."""
        path = self.local / "sweep_id"
        if resume and path.exists():
            return path.read_text().strip()
        self.local.mkdir(parents=True, exist_ok=True)
        path.write_text(sweep_id := uuid.uuid4().hex[:16])
        return sweep_id
