"""A two-node Ray cluster on this machine, kept by a process of its own: the ``two_nodes`` fixture of test_clusters.py.

    python tests/loopback_cluster.py SETTINGS_JSON READY_FILE

A process of its own because token authentication is set per process, from its environment, when
Ray first reads it: the fixture starts this one with ``RAY_AUTH_MODE=token`` and the cluster's token in
``RAY_AUTH_TOKEN_PATH``, as every node of a real cluster has them, and Ray's processes it starts (the
GCS, raylets, dashboard) inherit both. The test process cannot start the nodes itself: it keeps the
session's in-process Ray (``ray_local``), which has a token of its own.

Once both nodes are up it writes READY_FILE (JSON: address, dashboard, node ids with the head's first, and
how many commands it has carried out), then keeps the cluster until its stdin closes (the fixture closes it, or
dies). A line on stdin is a command, after which READY_FILE is written again:

- ``lose-worker``: the worker node dies at once, all its Ray processes killed, as a preempted machine's do;
- ``add-worker``: a new worker node joins, as the autoscaler's replacement would.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ray.cluster_utils import Cluster


def main(settings: dict, ready: Path) -> None:
    address = settings["address"]
    # Ray processes that look the cluster up themselves (e.g. Train's placement group cleaner) find it.
    node = {"num_cpus": 1, "object_store_memory": 300 * 1024**2, "env_vars": {"RAY_ADDRESS": address}}
    cluster = Cluster(
        initialize_head=True, connect=False,
        head_node_args={**node, "gcs_server_port": settings["port"], "include_dashboard": True,
                        "dashboard_host": "127.0.0.1", "dashboard_port": settings["dashboard_port"],
                        "dashboard_agent_listen_port": settings["agent_port"]},
    )
    def write_ready(commands: int) -> None:
        nodes = [cluster.head_node.node_id, *(n.node_id for n in cluster.worker_nodes)]
        state = {"address": cluster.address, "dashboard": cluster.webui_url, "node_ids": nodes, "commands": commands}
        written = ready.with_suffix(".partial")
        written.write_text(json.dumps(state))
        os.replace(written, ready)

    try:
        cluster.add_node(**node)
        cluster.wait_for_nodes()
        if cluster.address != address:
            raise RuntimeError(f"the head is at {cluster.address}, not {address}")
        write_ready(0)
        for done, command in enumerate(sys.stdin, start=1):  # until the fixture closes it
            if command.strip() == "lose-worker":
                cluster.remove_node(next(iter(cluster.worker_nodes)), allow_graceful=False)
            elif command.strip() == "add-worker":
                cluster.add_node(**node)
                cluster.wait_for_nodes()
            write_ready(done)
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]), Path(sys.argv[2]))
