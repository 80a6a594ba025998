"""What an experiment can leave running after ``Tuner.fit`` returns, and how to end it.

Tune ends an experiment (its trials all done, or ``budget_epochs`` spent) by killing the trials still
running. A trial killed while it was starting its Ray Train run can leave that run's controller
actor alive: the controller outlives its trial and keeps retrying to start a worker group, each time
with a new placement group. Granted, such a group holds CPUs or GPUs that no one releases, and the
next experiment's trials wait for them forever. Seen on 2-core sweeps, not reproducible on demand.

``Leftovers`` notes what was live before an experiment; ``end`` then stops this job's Train
controllers and removes its placement groups that appeared since. Once ``Tuner.fit`` has returned,
none of them is in use.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass, field

import ray
from ray.util.placement_group import PlacementGroup, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from ray.util.state import list_actors, list_placement_groups
from ray.util.state.common import ActorState

TRAIN_CONTROLLER = "TrainController"  # Ray Train V2's per-run controller actor class


def _state_api_address() -> str:
    # the cluster this driver is connected to: other Ray instances may run on the same machine
    return ray.get_runtime_context().gcs_address


def live_placement_groups() -> set[str]:
    """Ids of this job's placement groups that are pending or created."""
    groups = list_placement_groups(
        address=_state_api_address(), filters=[("state", "!=", "REMOVED")], detail=True, limit=10_000
    )
    job = ray.get_runtime_context().get_job_id()
    return {group.placement_group_id for group in groups if group.creator_job_id == job}


def live_actors(class_name: str) -> dict[str, ActorState]:
    """This job's live actors of a class, by actor id."""
    actors = list_actors(
        address=_state_api_address(),
        filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")],
        detail=True,
        limit=10_000,
    )
    job = ray.get_runtime_context().get_job_id()
    return {actor.actor_id: actor for actor in actors if actor.job_id == job}


@ray.remote(num_cpus=0)  # must run while the leftovers hold every CPU
def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it ended on its own meanwhile
        os.kill(pid, signal.SIGKILL)


def _kill_on_its_node(actor: ActorState) -> ray.ObjectRef:
    # The state API gives no actor handle to ray.kill with; the process id on its node does.
    return _kill.options(scheduling_strategy=NodeAffinitySchedulingStrategy(actor.node_id, soft=False)).remote(actor.pid)


@dataclass
class Leftovers:
    """This job's Train controllers and placement groups live before an experiment."""

    controllers: set[str] = field(default_factory=lambda: set(live_actors(TRAIN_CONTROLLER)))
    groups: set[str] = field(default_factory=live_placement_groups)

    def end(self, timeout_s: float = 30.0) -> int:
        """End the controllers and placement groups that appeared since; returns how many controllers."""
        orphans = {id_: actor for id_, actor in live_actors(TRAIN_CONTROLLER).items() if id_ not in self.controllers}
        ray.get([_kill_on_its_node(actor) for actor in orphans.values()])
        deadline = time.monotonic() + timeout_s
        while orphans.keys() & live_actors(TRAIN_CONTROLLER).keys() and time.monotonic() < deadline:
            time.sleep(0.5)  # until dead: a live one would make new groups
        for group_id in live_placement_groups() - self.groups:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(group_id)))
        return len(orphans)
