"""`ray-consensus status`: done and missing units per model and shard, from the run root alone."""

from __future__ import annotations

from ray_consensus.contract import read_run, read_stored_manifest
from ray_consensus.errors import SpecError
from ray_consensus.storage import Store, open_store
from ray_consensus.units import completed, shard_dir, units_by_model


def run_status(run_root: str | Store, storage=None) -> dict:
    """Marker-based progress: a unit counts as done when any marker is present (the next run
    decides, by fingerprint, whether it is current)."""
    store = open_store(run_root, storage) if isinstance(run_root, str) else run_root
    try:
        run = read_run(store)
    except FileNotFoundError:
        raise SpecError(f"no run at {store.root} (run.json not found)") from None
    manifest = read_stored_manifest(store, columns=["shard"])
    shards = sorted({int(s) for s in manifest["shard"]}) if manifest is not None else []
    done = completed(store)
    by_model = units_by_model(done)
    reduced = {s for s in shards if shard_dir("consensus", s) in done}
    per_model = {m.id: {"done": [s for s in shards if s in by_model.get(m.id, {})],
                        "missing": [s for s in shards if s not in by_model.get(m.id, {})]} for m in run.spec.committee}
    info = run.info
    return {"run_root": store.root, "status": info.get("status"), "updated": info.get("updated"),
            "shards": len(shards), "models": per_model,
            "reduced": {"done": sorted(reduced), "missing": sorted(set(shards) - reduced)},
            "units_computed": info.get("units_computed"), "units_skipped": info.get("units_skipped")}
