"""A run from spec to report: preflight, plan, attributions and reduce on Ray, tables, report, run.json.

    preflight ─► plan ─► schedule ─► attribution (dispatcher events) + reduce tasks ─► tables ─► report ─► run.json

Everything before `ray.init` (spec, timm names, checkpoints, data set, run root) is checked
first (`preflight`), so a bad spec fails with one line before any cluster work starts. The
plan compares each unit's fingerprint with the markers already in the run root: complete
units are skipped, so a rerun resumes, a grown committee computes only the new member, and a
grown data set only its new shards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import platform
import time
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from ray_consensus.console import Progress, on_terminal, say
from ray_consensus.dataset.manifest import Manifest
from ray_consensus.errors import RunFailed, first_line
from ray_consensus.planning.plan import Plan, make_plan
from ray_consensus.planning.preflight import preflight
from ray_consensus.planning.schedule import Schedule, make_schedule
from ray_consensus.runroot.contract import count_errors, write_manifest
from ray_consensus.runroot.record import RunCounts, RunRecord, UnitCounts
from ray_consensus.runroot.units import remove_shards
from ray_consensus.spec.config import RunSpec
from ray_consensus.storage.store import Store


def execute(spec: RunSpec, force: bool = False, progress: bool = True, report: bool = True) -> RunRecord:
    """Run (or resume) the whole job. Returns its run.json as the run leaves it (`ray_consensus.run`).

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
            summary = dataclasses.replace(summary, schedule=schedule.describe())
        say(f"plan: {summary.images} images in {summary.shards} shards, {summary.models} models; "
            f"{summary.attribution_units_to_compute}/{summary.attribution_units} attribution units "
            f"and {summary.reduce_units_to_compute} reduce units to compute")
        if summary.schedule is not None:
            say(f"schedule: {summary.schedule}")
        # class_names: a later run of the same root must find the same class folders (`preflight.check_classes`)
        record = RunRecord(status="running", spec_data=spec.to_public_dict(), plan=summary,
                           class_names=manifest.class_names, versions=versions(), driver=lease.holder)
        record.save(store)
        if plan.others:
            say(summary.others_note())
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
        record = record.updated_to(
            "complete", units_computed=UnitCounts(attr_units, reduce_units),
            units_skipped=UnitCounts(summary.attribution_units - attr_units, len(plan.shards) - reduce_units),
            counts=RunCounts(summary.images, len(plan.shards), len(spec.committee), count_errors(store, plan.shard_ids),
                             int(tables["consensus_voted"])),
            timings={**timings, "total_s": round(time.time() - t0, 3)})
        if report:  # the report reads run.json: the run is complete once the report is written
            dataclasses.replace(record, status="running").save(store)
            try:
                write_report(store)
            except OSError as e:
                raise RunFailed(f"the report could not be written to {store.uri('report/index.html')} "
                                f"({e.strerror or e}); the results and tables are stored: run `ray-consensus report "
                                f"{store.root}` once that is fixed") from e
        record.save(store)
    return record


@contextlib.contextmanager
def recorded(store: Store, driver: dict):
    """run.json says how the run ended: once the run has written its run.json, an error marks it `failed`
    (Ctrl-C: `interrupted`) with the error's first line. A driver killed outright leaves `running`, which
    `status` reads as `interrupted` once the run's lease is gone (`lease.holds`)."""
    try:
        yield
    except BaseException as e:
        try:
            record = RunRecord.load(store)
            if record.run_id == driver["run_id"]:
                record.updated_to("interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
                                  error=first_line(e) if isinstance(e, RunFailed)
                                  else f"{type(e).__name__}: {first_line(e)}").save(store)
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
    rather than after them. One loop reads the dispatcher's events and the reduce tasks' ends."""
    timings = {"attributions_s": 0.0, "reduce_s": 0.0, "reduce_tail_s": 0.0}
    if schedule is None:
        return 0, 0, timings
    from ray_consensus.attribution.decode_stage import segmentation_of
    from ray_consensus.attribution.dispatch import Dispatcher
    from ray_consensus.attribution.records import (
        AttributionsDone,
        ShardDone,
        ShardTask,
        StageContext,
        UnitWritten,
        WindowDone,
    )
    from ray_consensus.results.reduce import ReduceResult

    attribute = plan.to_attribute()
    reduces = _ReduceTasks(spec, store, plan, schedule)
    for s in sorted(set(reduces.plans) - {p.shard for p in attribute}):
        reduces.start(s)
    n_units = sum(len(p.models_to_compute) for p in attribute)
    tasks = [ShardTask(p.shard, plan.images(p.shard), p.inputs,
                       {m: p.attributions[m] for m in p.models_to_compute}) for p in attribute]
    # On a terminal one bar for the run; in a log (job logs, CI) a line per shard.
    bar = Progress(sum(len(t.images) * len(t.attributions) for t in tasks)) if progress and on_terminal() else None
    lines = progress and bar is None
    ctx = StageContext(spec, manifest.num_classes, store, schedule, segmentation_of(spec))
    attributions = Dispatcher(ctx, tasks).run()  # starts nothing until the loop reads its first event
    shards_done, tail_from = 0, time.time()
    with bar or contextlib.nullcontext(), contextlib.closing(attributions):
        for event in reduces.beside(attributions):
            match event:
                case UnitWritten():
                    if bar:
                        bar.add(event.n_images + event.n_errors)  # the unit's images, failed ones included
                case WindowDone():
                    if lines:
                        say(f"member {event.model_id}: window {event.window}/{event.n_windows} done in "
                            f"{event.seconds:.1f} s")
                case ShardDone():
                    shards_done += 1
                    if lines:
                        counts = "" if event.n_images is None else f"; {event.n_images} images, {event.n_errors} errors"
                        say(f"attributions: shard {event.shard} done ({shards_done}/{len(tasks)}{counts}; "
                            f"models: {','.join(event.models) or '-'})")
                    reduces.start(event.shard)
                case AttributionsDone():
                    loads = [seconds for _, seconds in event.loads]
                    timings.update(attributions_s=round(event.seconds, 3), member_loads=len(loads),
                                   member_load_s=round(sum(loads), 3))
                    tail_from = time.time()
                case ReduceResult():
                    timings["reduce_s"] += event.seconds
                    if lines:
                        say(f"reduce: shard {event.shard} done ({reduces.done}/{len(reduces.plans)})")
                    elif bar:
                        bar.note(f"reduce {reduces.done}/{len(reduces.plans)} shards")
    timings["reduce_s"] = round(timings["reduce_s"], 3)
    timings["reduce_tail_s"] = round(time.time() - tail_from, 3)
    return n_units, len(reduces.plans), timings


class _ReduceTasks:
    """The shards' reduce tasks on Ray: each started once its shard's units are all written (`start`),
    and collected as they end (`beside`)."""

    def __init__(self, spec: RunSpec, store: Store, plan: Plan, schedule: Schedule):
        import ray

        from ray_consensus.results.reduce import reduce_shard

        self.spec, self.store, self.plan = spec, store, plan
        self.plans = {p.shard: p for p in plan.to_reduce()}  # shard -> its plan, for each reduce to compute
        self.remote = ray.remote(num_cpus=schedule.light_cpus, max_retries=3)(reduce_shard)
        self.running: list = []
        self.done = 0

    def start(self, shard: int) -> None:
        """Start the shard's reduce task, if its reduce unit is to compute."""
        from ray_consensus.results.reduce import ReduceTask

        if shard in self.plans:
            spec, ids = self.spec, [m.id for m in self.spec.committee]
            self.running.append(self.remote.remote(self.store, ReduceTask(
                shard, self.plans[shard].reduce, ids, spec.method, spec.run.map_size, self.plan.subsets,
                self.plan.images(shard))))

    def ended(self, timeout: float | None) -> Iterator:
        """The `ReduceResult`s of the tasks that have ended (timeout 0: without waiting), or of the next one
        to end (None)."""
        import ray

        if not self.running:
            return
        ready, self.running = ray.wait(self.running, num_returns=1 if timeout is None else len(self.running),
                                       timeout=timeout)
        for ref in ready:
            self.done += 1
            yield ray.get(ref)

    def beside(self, events: Iterator) -> Iterator:
        """`events`, with the reduce tasks that ended between two of them (never keeping the next event
        waiting), then each task still running as it ends."""
        for event in events:
            yield event
            yield from self.ended(timeout=0)
        while self.running:
            yield from self.ended(timeout=None)


def versions() -> dict[str, str]:
    """The driver's versions of what computes the results, for run.json."""
    import captum
    import ray
    import timm
    import torch

    return {"ray_consensus": _version(), "python": platform.python_version(), "ray": ray.__version__,
            "torch": torch.__version__, "timm": timm.__version__, "captum": captum.__version__,
            "numpy": np.__version__, "pyarrow": pa.__version__}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ray-consensus")
    except PackageNotFoundError:
        return "unknown"
