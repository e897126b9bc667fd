"""`ray-consensus status`: done, missing and damaged units per model and shard, and how the last run
ended, from the run root alone."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ray_consensus.runroot.contract import read_stored_manifest
from ray_consensus.runroot.record import RunRecord, UnitCounts
from ray_consensus.runroot.units import UnitPath, completed, units_by_model
from ray_consensus.storage.lease import holds
from ray_consensus.storage.store import Store, open_store


@dataclass(frozen=True)
class Progress:
    """Shard ids whose unit is done, and those missing (sorted)."""

    done: list[int]
    missing: list[int]


@dataclass(frozen=True)
class RunStatus:
    """What `status` says of a run root (`status --json` is `to_dict()`)."""

    run_root: str
    status: str | None               # run.json's, `interrupted` for a `running` run whose lease is gone
    updated: str | None
    error: str | None                # the first line of what stopped a failed or interrupted run
    shards: int
    models: dict[str, Progress]      # member id -> its attribution units, in committee order
    reduced: Progress
    damaged: dict[str, str]          # unit folder -> what differs from its marker
    units_computed: UnitCounts | None
    units_skipped: UnitCounts | None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def run_status(run_root: str | Store, storage=None) -> RunStatus:
    """Marker-based progress: a unit counts as done when a marker is present and its files have the sizes
    the marker records (the next run decides, by fingerprint, whether it is current); `damaged`: {unit
    folder: what differs} of the others with a marker. `status` is run.json's, but a run that says
    `running` without holding the run root's lease any more (its driver was killed) is `interrupted`."""
    store = open_store(run_root, storage) if isinstance(run_root, str) else run_root
    run = RunRecord.load(store)
    manifest = read_stored_manifest(store, columns=["shard"])
    shards = sorted({int(s) for s in manifest["shard"]}) if manifest is not None else []
    listing = completed(store)
    done = {folder: fp for folder, fp in listing.items() if folder not in listing.damaged}
    by_model = units_by_model(done)
    reduced = {s for s in shards if UnitPath("consensus", s).folder in done}
    per_model = {m.id: Progress([s for s in shards if s in by_model.get(m.id, {})],
                                [s for s in shards if s not in by_model.get(m.id, {})]) for m in run.spec.committee}
    status = run.status
    if status == "running" and not holds(store, run.run_id):
        status = "interrupted"
    return RunStatus(store.root, status, run.updated, run.error, len(shards), per_model,
                     Progress(sorted(reduced), sorted(set(shards) - reduced)), dict(sorted(listing.damaged.items())),
                     run.units_computed, run.units_skipped)
