"""What an experiment can leave running after ``Tuner.fit`` returns, and how to end it.

Tune ends an experiment (its trials all done, or ``budget_epochs`` spent) by killing the trials still
running. A trial's Ray Train controller dies with it, but not at once: one that was waiting for its
worker group asked for a new placement group while it shut down (Ray's logs showed the request 130 ms
after its SIGTERM, 60 ms after Tune's cleanup had returned), and a controller can outlive its trial
altogether. A placement group outlives its creator, so such a group, once granted, holds CPUs or GPUs
that no one releases, and the next experiment's trials wait for them forever.

``Leftovers`` notes what was live before an experiment. Once ``Tuner.fit`` has returned, none of
this job's Train controllers or placement groups made since is in use: ``end`` kills the controllers,
then removes new placement groups until none has appeared for a few seconds.
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

    def end(self, quiet_s: float = 5.0, timeout_s: float = 60.0) -> int:
        """End the controllers and placement groups that appeared since; returns how many controllers."""
        orphans = {id_: actor for id_, actor in live_actors(TRAIN_CONTROLLER).items() if id_ not in self.controllers}
        ray.get([_kill_on_its_node(actor) for actor in orphans.values()])
        deadline = time.monotonic() + timeout_s
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < quiet_s and time.monotonic() < deadline:
            if new_groups := live_placement_groups() - self.groups:  # a dying controller's last request, too
                for group_id in new_groups:
                    remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(group_id)))
                quiet_since = time.monotonic()
            time.sleep(0.5)
        return len(orphans)
