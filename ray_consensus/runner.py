"""A run from spec to report: preflight, plan, attributions and reduce on Ray, tables, report, run.json.

    preflight ─► plan ─► pipeline (attributions) + reduce tasks ─► tables ─► report ─► run.json

Everything before `ray.init` (spec, timm names, checkpoints, data set, run root) is checked
first (`preflight`), so a bad spec fails with one line before any cluster work starts. The
plan compares each unit's fingerprint with the markers already in the run root: complete
units are skipped, so a rerun resumes, a grown committee computes only the new member, and a
grown data set only its new shards.
"""

from __future__ import annotations

import platform
import sys
import time
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from ray_consensus.config import RunSpec
from ray_consensus.contract import RUN_FILE, count_errors, write_manifest
from ray_consensus.data import Manifest
from ray_consensus.plan import Plan, make_plan
from ray_consensus.preflight import preflight
from ray_consensus.storage import Store


def log(msg: str) -> None:
    print(f"[ray-consensus] {msg}", file=sys.stderr, flush=True)


def execute(spec: RunSpec, force: bool = False, progress: bool = True, report: bool = True) -> dict:
    """Run (or resume) the whole job. Returns the run.json dict."""
    from ray_consensus.lease import Lease
    from ray_consensus.reporting import write_report
    from ray_consensus.tables import write_tables

    t0 = time.time()
    store, manifest = preflight(spec)
    with Lease(store):
        plan = make_plan(spec, store, manifest, force)
        summary = plan.summary(spec, manifest)
        log(f"plan: {summary['images']} images in {summary['shards']} shards, {summary['models']} models; "
            f"{summary['attribution_units_to_compute']}/{summary['attribution_units']} attribution units "
            f"and {summary['reduce_units_to_compute']} reduce units to compute")
        store.write_json(RUN_FILE, run_info(spec, "running", summary))
        write_manifest(store, plan.manifest, manifest.errors)
        attr_units, reduce_units, timings = run_cluster(spec, store, manifest, plan, progress)
        log("tables")
        t_tables = time.time()
        tables = write_tables(spec, store, plan.shard_ids)
        timings["tables_s"] = round(time.time() - t_tables, 3)
        info = run_info(spec, "complete", summary)
        info.update({
            "units_computed": {"attributions": attr_units, "reduce": reduce_units},
            "units_skipped": {"attributions": summary["attribution_units"] - attr_units,
                              "reduce": len(plan.shards) - reduce_units},
            "counts": {"images": summary["images"], "shards": len(plan.shards), "models": len(spec.committee),
                       "errors": count_errors(store, plan.shard_ids), "voted": int(tables["consensus_voted"])},
            "timings": {**timings, "total_s": round(time.time() - t0, 3)},
        })
        store.write_json(RUN_FILE, info)
        if report:
            write_report(store)
    return info


def run_cluster(spec: RunSpec, store: Store, manifest: Manifest, plan: Plan, progress: bool):
    """The Ray part: the attribution pipeline, and each shard's reduce task as soon as the shard's
    units are all written (shards with nothing to attribute at once), so the reducer runs beside
    the attributions rather than after them."""
    import ray

    from ray_consensus.pipeline import ShardTask, StageContext, run_attributions, segmentation_of, size_stages
    from ray_consensus.reduce import reduce_shard

    timings = {"attributions_s": 0.0, "reduce_s": 0.0, "reduce_tail_s": 0.0}
    attribute, to_reduce = plan.to_attribute(), {p.shard: p for p in plan.to_reduce()}
    if not attribute and not to_reduce:
        return 0, 0, timings
    init_ray()
    ctx = StageContext(spec, manifest.num_classes, store, segmentation_of(spec))
    size_stages(ctx, len({m for p in attribute for m in p.models_to_compute}), ray.cluster_resources())
    ids = [m.id for m in spec.committee]
    remote = ray.remote(num_cpus=ctx.light_cpus, max_retries=3)(reduce_shard)
    refs = []

    def start_reduce(s: int) -> None:
        if s in to_reduce:
            refs.append(remote.remote(store, s, to_reduce[s].reduce, ids, spec.method, spec.run.map_size,
                                      plan.subsets))

    for s in sorted(set(to_reduce) - {p.shard for p in attribute}):
        start_reduce(s)
    n_units = sum(len(p.models_to_compute) for p in attribute)
    if attribute:
        tasks = [ShardTask(p.shard, plan.images(p.shard), p.inputs,
                           {m: p.attributions[m] for m in p.models_to_compute}) for p in attribute]
        count = [0]

        def shard_done(done):
            count[0] += 1
            if progress:
                log(f"attributions: shard {done.shard} done ({count[0]}/{len(tasks)}; {done.n_images} images, "
                    f"{done.n_errors} errors; models: {','.join(done.models) or '-'})")
            start_reduce(done.shard)

        timings["attributions_s"] = round(run_attributions(ctx, tasks, shard_done), 3)
    t0 = time.time()
    for i, ref in enumerate(_as_completed(refs)):
        out = ray.get(ref)
        timings["reduce_s"] += out["seconds"]
        if progress:
            log(f"reduce: shard {out['shard']} done ({i + 1}/{len(refs)})")
    timings["reduce_s"] = round(timings["reduce_s"], 3)
    timings["reduce_tail_s"] = round(time.time() - t0, 3)
    return n_units, len(to_reduce), timings


def _as_completed(refs):
    import ray

    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        yield ready[0]


def init_ray() -> None:
    import ray

    if ray.is_initialized():
        return
    import logging

    ray.init(logging_level=logging.WARNING, log_to_driver=True, configure_logging=True)


def run_info(spec: RunSpec, status: str, plan: dict) -> dict:
    import captum
    import ray
    import timm
    import torch

    return {
        "status": status,
        "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "spec": spec.to_public_dict(),
        "plan": plan,
        "versions": {"ray_consensus": _version(), "python": platform.python_version(), "ray": ray.__version__,
                     "torch": torch.__version__, "timm": timm.__version__, "captum": captum.__version__,
                     "numpy": np.__version__, "pyarrow": pa.__version__},
    }


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ray-consensus")
    except PackageNotFoundError:
        return "unknown"
