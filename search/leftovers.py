"""What an experiment's trials can leave running after ``Tuner.fit`` returns, and how to end it.

Tune ends an experiment (its trials all done, or ``budget_epochs`` spent) by killing the trials still
running. A trial's Ray Train controller should die with it, but not always at once: one that was
waiting for its worker group asked for a new placement group while it shut down (Ray's logs showed
the request 130 ms after its SIGTERM, 60 ms after Tune's cleanup had returned), and a controller can
outlive its trial altogether. Such a group, once granted, holds CPUs or GPUs that no one releases,
and the next experiment's trials wait for them forever (Ray 2.60; see docs/ray-workarounds.md).

Only what this experiment's trials started is ended: the Train controllers whose owner is one of the
Tune trial actors created since :class:`Leftovers` was made, and the placement groups those controllers
created. Another Train run of the same driver (its controller is owned by the driver, or by a task) is
left alone. Ray's public state API names neither an actor's owner nor a group's creator, so this reads
the GCS tables through ``ray._private.state`` (a fenced workaround, guarded by a canary test).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass, field

import ray
from ray._private.state import actors as actor_table
from ray._private.state import state as cluster_state
from ray.core.generated.gcs_pb2 import PlacementGroupTableData
from ray.util.placement_group import PlacementGroup, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

TRAIN_CONTROLLER = "TrainController"  # Ray Train V2's per-run controller actor class
TUNE_TRIAL = "ImplicitFunc"  # the actor class Tune runs a function trainable's trial in


def job_actors(class_name: str) -> dict[str, dict]:
    """This job's actors of a class, alive or dead, by actor id (GCS actor-table entries)."""
    job = ray.get_runtime_context().get_job_id()
    return {
        actor_id: info for actor_id, info in actor_table(job_id=ray.JobID.from_hex(job)).items()
        if info["ActorClassName"] == class_name
    }


def _address(address: dict) -> tuple[str, int]:
    return address["IPAddress"], address["Port"]


def live_placement_groups_created_by(actor_ids: set[str]) -> list[PlacementGroup]:
    """Placement groups not yet removed whose creator is one of ``actor_ids``."""
    groups = []
    for serialized in cluster_state._connect_and_get_accessor().get_placement_group_table():
        group = PlacementGroupTableData.FromString(serialized)
        if group.creator_actor_id.hex() in actor_ids and group.state != PlacementGroupTableData.REMOVED:
            groups.append(PlacementGroup(ray.PlacementGroupID(group.placement_group_id)))
    return groups


@ray.remote(num_cpus=0)  # must run while the leftovers hold every CPU
def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it ended on its own meanwhile
        os.kill(pid, signal.SIGKILL)


def _kill_on_its_node(actor: dict) -> ray.ObjectRef:
    # No handle to ray.kill with: the process id on the actor's node does.
    node = NodeAffinitySchedulingStrategy(actor["Address"]["NodeID"], soft=False)
    return _kill.options(scheduling_strategy=node).remote(actor["Pid"])


@dataclass
class Leftovers:
    """The Tune trial actors of this job before an experiment: the ones made since are its trials."""

    trials_before: set[str] = field(default_factory=lambda: set(job_actors(TUNE_TRIAL)))

    def experiment_controllers(self) -> dict[str, dict]:
        """The Train controllers (alive or dead) that the experiment's trials started."""
        trials = {_address(a["Address"]) for id_, a in job_actors(TUNE_TRIAL).items() if id_ not in self.trials_before}
        return {id_: a for id_, a in job_actors(TRAIN_CONTROLLER).items() if _address(a["OwnerAddress"]) in trials}

    def end(self, quiet_s: float = 5.0, timeout_s: float = 60.0) -> int:
        """Kill the experiment's live Train controllers, then remove their placement groups until none has
        appeared for ``quiet_s`` (a dying controller's last request comes late); returns how many were killed."""
        killed: set[str] = set()
        deadline = time.monotonic() + timeout_s
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < quiet_s and time.monotonic() < deadline:
            controllers = self.experiment_controllers()
            alive = {id_: a for id_, a in controllers.items() if a["State"] != "DEAD" and id_ not in killed}
            ray.get([_kill_on_its_node(actor) for actor in alive.values()])
            killed |= set(alive)
            groups = live_placement_groups_created_by(set(controllers))
            for group in groups:
                remove_placement_group(group)
            if alive or groups:
                quiet_since = time.monotonic()
            time.sleep(0.5)
        return len(killed)
