"""`ray-consensus status`: done, missing and damaged units per model and shard, and how the last run
ended, from the run root alone."""

from __future__ import annotations

from ray_consensus.runroot.contract import read_run, read_stored_manifest
from ray_consensus.runroot.units import completed, shard_dir, units_by_model
from ray_consensus.storage.lease import holds
from ray_consensus.storage.store import Store, open_store


def run_status(run_root: str | Store, storage=None) -> dict:
    """Marker-based progress: a unit counts as done when a marker is present and its files have the sizes
    the marker records (the next run decides, by fingerprint, whether it is current); `damaged`: {unit
    folder: what differs} of the others with a marker. `status` is run.json's, but a run that says
    `running` without holding the run root's lease any more (its driver was killed) is `interrupted`."""
    store = open_store(run_root, storage) if isinstance(run_root, str) else run_root
    run = read_run(store)
    manifest = read_stored_manifest(store, columns=["shard"])
    shards = sorted({int(s) for s in manifest["shard"]}) if manifest is not None else []
    listing = completed(store)
    done = {folder: fp for folder, fp in listing.items() if folder not in listing.damaged}
    by_model = units_by_model(done)
    reduced = {s for s in shards if shard_dir("consensus", s) in done}
    per_model = {m.id: {"done": [s for s in shards if s in by_model.get(m.id, {})],
                        "missing": [s for s in shards if s not in by_model.get(m.id, {})]} for m in run.spec.committee}
    info = run.info
    status = info.get("status")
    if status == "running" and not holds(store, (info.get("driver") or {}).get("run_id")):
        status = "interrupted"
    return {"run_root": store.root, "status": status, "updated": info.get("updated"), "error": info.get("error"),
            "shards": len(shards), "models": per_model,
            "reduced": {"done": sorted(reduced), "missing": sorted(set(shards) - reduced)},
            "damaged": dict(sorted(listing.damaged.items())),
            "units_computed": info.get("units_computed"), "units_skipped": info.get("units_skipped")}
