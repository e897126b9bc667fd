"""The schedule: which committee members run at once, on which resources, in how many rounds.

The committee may be far larger than the cluster (the paper's has 80+ members; a cluster may
have 8 GPUs). Members do not each get a process: the run starts S *slots*, long-lived Ray
actors that each hold at most one member at a time on their device (`resources.num_gpus` whole
GPUs, or a CPU share), explain a window of decoded shards with it, then load the next member's
weights. S is what the cluster can hold at once, and never more than there is work for:

    S = min(members x resources.actors_per_model, GPUs it can have / resources.num_gpus)   (GPU slots)
    S = min(members x resources.actors_per_model, its CPUs)                                (CPU slots)

so K members finish on G GPUs for every K >= 1 and G >= 1: each slot takes about
ceil(K x actors_per_model / S) members per window ("rounds"). A slot whose resources no node has
(or can have) is refused here, before any work. `Capacity` says what the cluster has or can grow
to: `resources.max_gpus` / `max_cpus` when set, else the cluster itself (`cluster.py` reads its
nodes and its autoscaler's node types), or for `validate` without a cluster this machine.

Pure: no Ray import, so `validate` prints the schedule in seconds.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from ray_consensus.errors import SpecError
from ray_consensus.spec.config import RunSpec

# The object store share one window of decoded shards may take (two windows are alive at most:
# the one being explained and the next, decoded ahead).
WINDOW_STORE_FRACTION = 0.2
# CPUs left to decode and reduce tasks beside the slots when the slots' CPUs are shared out.
SLOT_CPU_FRACTION = 0.9


@dataclass(frozen=True)
class Capacity:
    """What the cluster has, or can grow to."""

    cpus: float
    gpus: float
    node_cpus: float                 # the most CPUs one node has (or one node type brings)
    node_gpus: float
    object_store_bytes: float | None
    source: str                      # where the figures come from, for messages

    @staticmethod
    def of_spec_or_machine(spec: RunSpec) -> "Capacity":
        """For `validate`: the spec's resources.max_gpus / max_cpus, else this machine (its CPUs; GPUs
        only if the spec asks for them, counted by torch)."""
        r = spec.resources
        cpus = r.max_cpus if r.max_cpus is not None else float(os.cpu_count() or 1)
        if r.max_gpus is not None:
            gpus, source = r.max_gpus, "resources.max_gpus"
        else:
            gpus, source = (_local_gpus() if r.num_gpus > 0 else 0.0), "this machine"
        return Capacity(cpus, gpus, cpus, gpus, None, source)


def _local_gpus() -> float:
    try:
        import torch

        return float(torch.cuda.device_count())
    except Exception:  # no usable torch build: no GPUs to count
        return 0.0


@dataclass(frozen=True)
class Schedule:
    members: int           # members with units to compute
    slots: int             # actors started, each holding one member at a time
    slot_cpus: float
    slot_gpus: float
    torch_threads: int     # torch threads of a CPU slot
    light_cpus: float      # CPUs of each decode or reduce task
    decode_tasks: int      # decode tasks at once: one per CPU the slots leave free (at least one)
    items: int             # (member, slot-share) work items per window: members x actors_per_model
    window_shards: int | None  # shards decoded and held at once (each decoded once per run); None: sized on
    #                            the cluster (its object store unknown here)
    capacity: Capacity

    @property
    def rounds(self) -> int:
        """Members each slot takes one after another in a window (the most)."""
        return math.ceil(self.items / self.slots) if self.slots else 0

    def describe(self) -> str:
        device = f"{self.slot_gpus:g} GPU + {self.slot_cpus:g} CPU" if self.slot_gpus else \
            f"{self.slot_cpus:g} CPU, {self.torch_threads} torch thread(s)"
        c = self.capacity
        return (f"{self.members} members on {self.slots} slot(s) of {device} each (cluster: {c.gpus:g} GPUs, "
                f"{c.cpus:g} CPUs from {c.source}): {min(self.slots, self.items)} at once, {self.rounds} round(s) "
                f"per window; a slot loads its next member's weights instead of a new process starting; "
                + (f"windows of up to {self.window_shards} shard(s)" if self.window_shards else
                   "windows of as many shards as fit a fifth of the cluster's object store") + ", each decoded once")


def make_schedule(spec: RunSpec, members: int, capacity: Capacity, n_shards: int) -> Schedule:
    """The schedule for `members` members with work over `n_shards` shards on `capacity`.

    Raises SpecError when one slot's resources exceed every node's (it could never be placed).
    """
    r = spec.resources
    items = max(1, members * r.actors_per_model)
    if r.num_gpus > capacity.node_gpus:
        raise SpecError(f"resources.num_gpus asks for {r.num_gpus:g} GPU(s) per member actor, but no node has "
                        f"more than {capacity.node_gpus:g} ({capacity.source}): no member could be placed; lower "
                        f"resources.num_gpus, or set resources.max_gpus if the cluster can grow GPU nodes")
    if r.num_cpus is not None and r.num_cpus > capacity.node_cpus:
        raise SpecError(f"resources.num_cpus asks for {r.num_cpus:g} CPU(s) per member actor, but no node has more "
                        f"than {capacity.node_cpus:g} ({capacity.source}): no member could be placed; lower "
                        f"resources.num_cpus or leave it unset")
    if r.num_gpus > 0:
        slots = min(items, max(1, int(capacity.gpus / r.num_gpus + 1e-9)))
    else:
        slots = min(items, max(1, int(capacity.cpus)))
    if r.num_cpus is not None:
        slots = min(slots, max(1, int(capacity.cpus / r.num_cpus + 1e-9)))
        slot_cpus = r.num_cpus
    else:
        # Round down so that the slots and the decode/reduce tasks beside them fit together.
        slot_cpus = max(0.01, min(1.0, int(capacity.cpus * SLOT_CPU_FRACTION / (slots + 1) * 100) / 100))
    threads = max(1, int(capacity.cpus // slots))
    # Decode and reduce tasks: one thread each where the slots hold GPUs; on CPU-only clusters half a
    # slot's CPUs (at most 1/2), so that they run beside the slots.
    light = min(1.0, slot_cpus) if r.num_gpus > 0 else max(0.01, min(0.5, slot_cpus / 2))
    # A decode task is one thread; the slots keep their threads (CPU slots) or their CPUs (GPU slots) busy.
    # More decode processes than free cores only slow the slots' start (measured: 2 cores, one decode
    # task: the first member starts 5 s sooner than with four).
    busy = slots * (threads if r.num_gpus == 0 else slot_cpus)
    decode_tasks = max(1, int(capacity.cpus - busy))
    return Schedule(members, slots, slot_cpus, r.num_gpus, threads, light, decode_tasks, items,
                    window_shards(spec, capacity, n_shards), capacity)


def window_shards(spec: RunSpec, capacity: Capacity, n_shards: int) -> int | None:
    """Shards decoded and held in the object store at once: `resources.window_shards`, else as many as
    fit WINDOW_STORE_FRACTION of the object store (all of them for small runs); None when the object
    store is not known (validate without a cluster)."""
    if spec.resources.window_shards is not None:
        return max(1, min(n_shards, spec.resources.window_shards))
    if not capacity.object_store_bytes:
        return None
    s = spec.run.image_size
    per_image = s * s * 3 + (s * s * 4 if spec.explainer.params.needs_segments else 0)  # pixels (+ superpixel ids)
    fit = int(capacity.object_store_bytes * WINDOW_STORE_FRACTION // (per_image * spec.run.shard_size))
    return max(1, min(n_shards, fit))
