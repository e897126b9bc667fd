"""A run from spec to report: preflight, plan, attributions and reduce on Ray, tables, report, run.json.

    preflight ─► plan ─► schedule ─► pipeline (attributions) + reduce tasks ─► tables ─► report ─► run.json

Everything before `ray.init` (spec, timm names, checkpoints, data set, run root) is checked
first (`preflight`), so a bad spec fails with one line before any cluster work starts. The
plan compares each unit's fingerprint with the markers already in the run root: complete
units are skipped, so a rerun resumes, a grown committee computes only the new member, and a
grown data set only its new shards.
"""

from __future__ import annotations

import contextlib
import platform
import time
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from ray_consensus.console import Progress, on_terminal, say
from ray_consensus.dataset.manifest import Manifest
from ray_consensus.errors import RunFailed, first_line
from ray_consensus.planning.plan import Plan, make_plan
from ray_consensus.planning.preflight import preflight
from ray_consensus.planning.schedule import Schedule, make_schedule
from ray_consensus.runroot.contract import RUN_FILE, count_errors, write_manifest
from ray_consensus.runroot.units import remove_shards
from ray_consensus.spec.config import RunSpec
from ray_consensus.storage.store import Store


def execute(spec: RunSpec, force: bool = False, progress: bool = True, report: bool = True) -> dict:
    """Run (or resume) the whole job. Returns the run.json dict.

    Nothing is written before the run root is leased, and the lease is taken only once the plan's
    schedule fits the cluster: a member that could never be placed fails with one line first.
    """
    from ray_consensus.report.collect import write_report
    from ray_consensus.results.tables import write_tables
    from ray_consensus.storage.lease import Lease

    t0 = time.time()
    store, manifest, listing = preflight(spec, list_units=not force)
    plan = make_plan(spec, store, manifest, force, listing)
    schedule = plan_schedule(spec, plan)
    with Lease(store) as lease, recorded(store, lease.holder):
        summary = plan.summary(spec, manifest)
        if schedule is not None and schedule.members:
            summary["schedule"] = schedule.describe()
        say(f"plan: {summary['images']} images in {summary['shards']} shards, {summary['models']} models; "
            f"{summary['attribution_units_to_compute']}/{summary['attribution_units']} attribution units "
            f"and {summary['reduce_units_to_compute']} reduce units to compute")
        if "schedule" in summary:
            say(f"schedule: {summary['schedule']}")
        store.write_json(RUN_FILE, {**run_info(spec, "running", summary, manifest.class_names), "driver": lease.holder})
        if plan.others:
            say(plan.others_note())
        if plan.gone:
            say(f"removing shards {','.join(map(str, plan.gone))}: every image of theirs left the data set")
            remove_shards(store, plan.gone)  # before the manifest that lists them goes: a crash here is redone
        plan.adopt(store)  # a run root written before versions: its units' markers get the current fingerprints
        write_manifest(store, plan.manifest, manifest.errors)
        attr_units, reduce_units, timings = run_cluster(spec, store, manifest, plan, schedule, progress)
        say("tables")
        t_tables = time.time()
        tables = write_tables(spec, store, plan.shard_ids)
        timings["tables_s"] = round(time.time() - t_tables, 3)
        info = run_info(spec, "complete", summary, manifest.class_names)
        info.update({
            "units_computed": {"attributions": attr_units, "reduce": reduce_units},
            "units_skipped": {"attributions": summary["attribution_units"] - attr_units,
                              "reduce": len(plan.shards) - reduce_units},
            "counts": {"images": summary["images"], "shards": len(plan.shards), "models": len(spec.committee),
                       "errors": count_errors(store, plan.shard_ids), "voted": int(tables["consensus_voted"])},
            "timings": {**timings, "total_s": round(time.time() - t0, 3)},
            "driver": lease.holder,
        })
        if report:  # the report reads run.json: the run is complete once the report is written
            store.write_json(RUN_FILE, {**info, "status": "running"})
            try:
                write_report(store)
            except OSError as e:
                raise RunFailed(f"the report could not be written to {store.uri('report/index.html')} "
                                f"({e.strerror or e}); the results and tables are stored: run `ray-consensus report "
                                f"{store.root}` once that is fixed") from e
        store.write_json(RUN_FILE, info)
    return info


@contextlib.contextmanager
def recorded(store: Store, driver: dict):
    """run.json says how the run ended: once the run has written its run.json, an error marks it `failed`
    (Ctrl-C: `interrupted`) with the error's first line. A driver killed outright leaves `running`, which
    `status` reads as `interrupted` once the run's lease is gone (`lease.holds`)."""
    try:
        yield
    except BaseException as e:
        try:
            info = store.read_json(RUN_FILE)
            if (info.get("driver") or {}).get("run_id") == driver["run_id"]:
                info.update(status="interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
                            updated=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            error=first_line(e) if isinstance(e, RunFailed) else f"{type(e).__name__}: {first_line(e)}")
                store.write_json(RUN_FILE, info)
        except Exception:  # the store may be what failed (a full disk): `status` still sees the lease gone
            pass
        raise


def plan_schedule(spec: RunSpec, plan: Plan) -> Schedule | None:
    """Join the cluster and fit the plan's work to it (None: nothing for Ray to do). Raises SpecError
    when a slot could never be placed."""
    from ray_consensus.planning.cluster import cluster_capacity, init_ray

    attribute, to_reduce = plan.to_attribute(), plan.to_reduce()
    if not attribute and not to_reduce:
        return None
    init_ray()
    members = {m for p in attribute for m in p.models_to_compute}
    return make_schedule(spec, len(members), cluster_capacity(spec), len(attribute))


def run_cluster(spec: RunSpec, store: Store, manifest: Manifest, plan: Plan, schedule: Schedule | None,
                progress: bool):
    """The Ray part: the attribution slots, and each shard's reduce task as soon as the shard's units are
    all written (shards with nothing to attribute at once), so the reducer runs beside the attributions
    rather than after them."""
    timings = {"attributions_s": 0.0, "reduce_s": 0.0, "reduce_tail_s": 0.0}
    if schedule is None:
        return 0, 0, timings
    import ray

    from ray_consensus.attribution.pipeline import ShardTask, StageContext, run_attributions, segmentation_of
    from ray_consensus.results.reduce import reduce_shard

    attribute, to_reduce = plan.to_attribute(), {p.shard: p for p in plan.to_reduce()}
    ctx = StageContext(spec, manifest.num_classes, store, schedule, segmentation_of(spec))
    ids = [m.id for m in spec.committee]
    remote = ray.remote(num_cpus=schedule.light_cpus, max_retries=3)(reduce_shard)
    refs = []

    def start_reduce(s: int) -> None:
        if s in to_reduce:
            refs.append(remote.remote(store, s, to_reduce[s].reduce, ids, spec.method, spec.run.map_size,
                                      plan.subsets, plan.images(s)))

    for s in sorted(set(to_reduce) - {p.shard for p in attribute}):
        start_reduce(s)
    n_units = sum(len(p.models_to_compute) for p in attribute)
    tasks = [ShardTask(p.shard, plan.images(p.shard), p.inputs,
                       {m: p.attributions[m] for m in p.models_to_compute}) for p in attribute]
    # On a terminal one bar for the run; in a log (job logs, CI) a line per shard.
    bar = Progress(sum(len(t.images) * len(t.attributions) for t in tasks)) if progress and on_terminal() else None
    lines = progress and bar is None
    with bar or contextlib.nullcontext():
        if tasks:
            count = [0]

            def shard_done(done):
                count[0] += 1
                if lines:
                    counts = "" if done.n_images is None else f"; {done.n_images} images, {done.n_errors} errors"
                    say(f"attributions: shard {done.shard} done ({count[0]}/{len(tasks)}{counts}; "
                        f"models: {','.join(done.models) or '-'})")
                start_reduce(done.shard)

            timings.update(run_attributions(ctx, tasks, shard_done, say if lines else None,
                                            bar.add if bar else None))
        t0 = time.time()
        for i, ref in enumerate(_as_completed(refs)):
            out = ray.get(ref)
            timings["reduce_s"] += out["seconds"]
            if lines:
                say(f"reduce: shard {out['shard']} done ({i + 1}/{len(refs)})")
            elif bar:
                bar.note(f"reduce {i + 1}/{len(refs)} shards")
    timings["reduce_s"] = round(timings["reduce_s"], 3)
    timings["reduce_tail_s"] = round(time.time() - t0, 3)
    return n_units, len(to_reduce), timings


def _as_completed(refs):
    import ray

    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        yield ready[0]


def run_info(spec: RunSpec, status: str, plan: dict, class_names: list[str]) -> dict:
    """run.json; `class_names`: the data set's class folders in label order (a table manifest: none), which
    a later run of the same root must have too (`preflight.check_classes`)."""
    import captum
    import ray
    import timm
    import torch

    return {
        "status": status,
        "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "spec": spec.to_public_dict(),
        "plan": plan,
        "class_names": class_names,
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
