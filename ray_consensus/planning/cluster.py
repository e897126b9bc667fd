"""The Ray cluster a run executes on: connecting to it, and what it has or can grow to.

`cluster_capacity` reads the live nodes and, where the cluster has an autoscaler (`ray up`,
KubeRay), the node types it may add, which the autoscaler publishes in the cluster's own
state (`compat.autoscaler_node_types`); `resources.max_gpus` / `max_cpus` in the spec override
the totals.
"""

from __future__ import annotations

import logging

from ray_consensus import compat
from ray_consensus.console import RayLogs
from ray_consensus.planning.schedule import Capacity
from ray_consensus.spec.config import RunSpec


def init_ray() -> None:
    """Join the cluster of RAY_ADDRESS (a job's), else start Ray in this process."""
    import ray

    if not ray.is_initialized():
        # Ray's own loggers at ERROR: its warnings (token auth, progress bars off) are not for our users;
        # its errors, and what the workers print, still reach the console.
        ray.init(logging_level=logging.ERROR, log_to_driver=True, configure_logging=True)
        compat.route_forwarded_logs(RayLogs)  # its raylet's errors as our lines; workers' output above the bar


def cluster_capacity(spec: RunSpec) -> Capacity:
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    now = ray.cluster_resources()
    types = compat.autoscaler_node_types()
    grown = {key: sum(res.get(key, 0) * (count if count >= 0 else 10**6) for res, count in types)
             for key in ("CPU", "GPU")}
    cpus, gpus = max(now.get("CPU", 0.0), grown["CPU"]), max(now.get("GPU", 0.0), grown["GPU"])
    node_cpus = max([n.get("CPU", 0.0) for n in nodes] + [res.get("CPU", 0.0) for res, _ in types] + [0.0])
    node_gpus = max([n.get("GPU", 0.0) for n in nodes] + [res.get("GPU", 0.0) for res, _ in types] + [0.0])
    source = "the cluster's nodes and its autoscaler's node types" if types else "the cluster's nodes"
    r = spec.resources
    if r.max_gpus is not None:  # the user knows what the cluster can grow to; with no GPU node known, trust it
        gpus, node_gpus, source = r.max_gpus, node_gpus or r.max_gpus, "resources.max_gpus"
    if r.max_cpus is not None:
        cpus, node_cpus = r.max_cpus, node_cpus or r.max_cpus
    return Capacity(cpus, gpus, node_cpus, node_gpus, now.get("object_store_memory"), source)
