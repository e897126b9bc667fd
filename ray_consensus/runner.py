"""A run from spec to tables: preflight, plan, attributions, reduce, tables, report, run.json.

Everything before `ray.init` (spec, timm names, checkpoints, data set, run root) is checked
first, so a bad spec fails with one line before any cluster work starts. The plan compares
each unit's fingerprint with the markers already in the run root: complete units are
skipped, so a rerun resumes, a grown committee computes only the new member, and a grown
data set only its new shards.
"""

from __future__ import annotations

import dataclasses
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pyarrow as pa

from ray_consensus.config import RunSpec, SpecError, fingerprint
from ray_consensus.data import Manifest, assign_shards, read_manifest
from ray_consensus.explainers import EXPLAINERS
from ray_consensus.storage import Store, open_store
from ray_consensus.units import DATA_FILE, attributions_dir, completed, shard_dir, units_by_model

MANIFEST_FILE = "manifest.parquet"


def log(msg: str) -> None:
    print(f"[ray-consensus] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- preflight

def preflight(spec: RunSpec, check_weights: bool = True) -> tuple[Store, Manifest]:
    """Everything that can fail without Ray: names, weights, data set, run root. Raises SpecError."""
    from ray_consensus.committee import check_arch, create_member_model

    for member in spec.committee:
        check_arch(member.arch)
    store = open_store(spec.run.output, spec.storage)
    store.check_writable()
    manifest = read_manifest(spec.dataset, spec.storage)
    if check_weights:
        explainer = EXPLAINERS[spec.explainer.name](**spec.explainer.params)
        for member in spec.committee:
            if member.weights == "pretrained":
                continue  # downloading hub weights on the driver would double the traffic; actors load them
            model = create_member_model(member, manifest.num_classes, read_bytes=lambda uri: _read(uri, spec))
            try:
                explainer.check_model(model)
            except SpecError as e:
                raise SpecError(f"model {member.id}: {e}") from None
    return store, manifest


def _read(uri: str, spec: RunSpec) -> bytes:
    from ray_consensus.storage import read_uri_bytes

    return read_uri_bytes(uri, spec.storage)


# ---------------------------------------------------------------- plan

@dataclass
class Plan:
    manifest: pd.DataFrame                    # image_id, uri, label, mask_uri, shard
    shards: list[int]
    inputs_fp: dict[int, str]
    attr_fp: dict[str, dict[int, str]]        # model -> shard -> fingerprint
    reduce_fp: dict[int, str]
    done: dict[str, str]                      # unit folder -> fingerprint already stored
    subsets: list = field(default_factory=list)

    def missing_attributions(self) -> dict[int, dict[str, str]]:
        out: dict[int, dict[str, str]] = {}
        for model, per_shard in self.attr_fp.items():
            for s, fp in per_shard.items():
                if self.done.get(attributions_dir(model, s)) != fp:
                    out.setdefault(s, {})[model] = fp
        return out

    def missing_inputs(self) -> list[int]:
        return [s for s in self.shards if self.done.get(shard_dir("inputs", s)) != self.inputs_fp[s]]

    def missing_reduce(self) -> list[int]:
        return [s for s in self.shards if self.done.get(shard_dir("consensus", s)) != self.reduce_fp[s]]


def make_plan(spec: RunSpec, store: Store, manifest: Manifest, force: bool = False) -> Plan:
    from ray_consensus import consensus as cm
    from ray_consensus.tables import robustness_sizes

    previous = store.read_parquet(MANIFEST_FILE).to_pandas() if store.exists(MANIFEST_FILE) else None
    table = assign_shards(manifest.table, previous, spec.run.shard_size)
    shards = sorted(int(s) for s in table["shard"].unique())
    explainer = EXPLAINERS[spec.explainer.name]
    params = {**explainer.defaults, **spec.explainer.params}
    r = spec.run
    inputs_fp, attr_fp, reduce_fp = {}, {m.id: {} for m in spec.committee}, {}
    subsets = cm.subcommittees(len(spec.committee), robustness_sizes(spec), spec.method.robustness_trials,
                               spec.method.seed)
    method = dataclasses.asdict(spec.method)
    for key in ("bootstrap",):  # table-level options do not change reduced shards
        method.pop(key)
    for s, rows in table.groupby("shard"):
        rows = rows.sort_values("image_id")
        content = rows[["image_id", "uri", "label", "mask_uri"]].astype(str).to_numpy().tolist()
        inputs_fp[s] = fingerprint("inputs", content, r.image_size, r.map_size, spec.dataset.mask_foreground,
                                   params if explainer.needs_segments else None)
        for m in spec.committee:
            attr_fp[m.id][s] = fingerprint("attr", m.id, m.arch, m.weights, m.kwargs, spec.explainer.name, params,
                                           spec.method.target, spec.method.seed, r.map_dtype, inputs_fp[s])
        reduce_fp[s] = fingerprint("reduce", [(m.id, attr_fp[m.id][s]) for m in spec.committee], method,
                                   [(k, t, list(map(int, idx))) for k, t, idx in subsets])
    done = {} if force else completed(store, "")
    return Plan(table, shards, inputs_fp, attr_fp, reduce_fp, done, subsets)


def plan_summary(spec: RunSpec, manifest: Manifest, plan: Plan) -> dict:
    fwd, bwd = EXPLAINERS[spec.explainer.name](**spec.explainer.params).passes_per_image()
    missing = plan.missing_attributions()
    todo_images = sum(int((plan.manifest["shard"] == s).sum()) * len(models) for s, models in missing.items())
    return {
        "images": int(len(plan.manifest)), "shards": len(plan.shards), "models": len(spec.committee),
        "classes": manifest.num_classes, "manifest_errors": int(len(manifest.errors)),
        "attribution_units": len(plan.shards) * len(spec.committee),
        "attribution_units_to_compute": sum(len(m) for m in missing.values()),
        "reduce_units_to_compute": len(plan.missing_reduce()),
        "forward_passes": todo_images * (fwd + 1), "backward_passes": todo_images * bwd,
    }


# ---------------------------------------------------------------- execute

def execute(spec: RunSpec, force: bool = False, progress: bool = True, report: bool = True) -> dict:
    """Run (or resume) the whole job. Returns the run.json dict."""
    from ray_consensus.lease import Lease

    t0 = time.time()
    store, manifest = preflight(spec)
    with Lease(store):
        plan = make_plan(spec, store, manifest, force)
        summary = plan_summary(spec, manifest, plan)
        log(f"plan: {summary['images']} images in {summary['shards']} shards, {summary['models']} models; "
            f"{summary['attribution_units_to_compute']}/{summary['attribution_units']} attribution units "
            f"and {summary['reduce_units_to_compute']} reduce units to compute")
        info = run_info(spec, "running", summary)
        store.write_json("run.json", info)
        store.write_parquet(MANIFEST_FILE, pa.Table.from_pandas(plan.manifest, preserve_index=False))
        store.write_parquet(f"errors/manifest/{DATA_FILE}", pa.Table.from_pandas(manifest.errors,
                                                                                 preserve_index=False))
        attr_units, reduce_units, timings = run_cluster(spec, store, manifest, plan, progress)
        log("tables")
        t_tables = time.time()
        tables = write_tables(spec, store, plan)
        timings["tables_s"] = round(time.time() - t_tables, 3)
        errors = count_errors(store, plan)
        info = run_info(spec, "complete", summary)
        info.update({
            "units_computed": {"attributions": attr_units, "reduce": reduce_units},
            "units_skipped": {"attributions": summary["attribution_units"] - attr_units,
                              "reduce": len(plan.shards) - reduce_units},
            "counts": {"images": summary["images"], "shards": len(plan.shards), "models": len(spec.committee),
                       "errors": errors, "voted": int(tables["consensus_voted"])},
            "timings": {**timings, "total_s": round(time.time() - t0, 3)},
        })
        store.write_json("run.json", info)
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

    missing = plan.missing_attributions()
    missing_inputs = set(plan.missing_inputs())
    timings = {"attributions_s": 0.0, "reduce_s": 0.0, "reduce_tail_s": 0.0}
    todo_reduce = plan.missing_reduce()
    if not missing and not missing_inputs and not todo_reduce:
        return 0, 0, timings
    init_ray(progress)
    ctx = StageContext(spec, manifest.num_classes, store, segmentation_of(spec))
    size_stages(ctx, len({m for models in missing.values() for m in models}), ray.cluster_resources())
    ids = [m.id for m in spec.committee]
    remote = ray.remote(num_cpus=ctx.light_cpus, max_retries=3)(reduce_shard)
    refs, reduce_set = [], set(todo_reduce)

    def start_reduce(s: int) -> None:
        if s in reduce_set:
            refs.append(remote.remote(store, s, ids, spec.method, plan.reduce_fp[s],
                                      plan.done.get(shard_dir("consensus", s)), plan.subsets))

    attribute = sorted(set(missing) | missing_inputs)
    for s in sorted(set(todo_reduce) - set(attribute)):
        start_reduce(s)
    if attribute:
        tasks = []
        for s in attribute:
            rows = plan.manifest[plan.manifest["shard"] == s]
            previous = {f: plan.done[f] for f in
                        [shard_dir("inputs", s)] + [attributions_dir(m, s) for m in missing.get(s, {})]
                        if f in plan.done}
            tasks.append(ShardTask(
                shard=int(s),
                images=[{"image_id": r.image_id, "uri": r.uri, "label": int(r.label),
                         "mask_uri": None if pd.isna(r.mask_uri) else r.mask_uri}
                        for r in rows.itertuples()],
                inputs_fp=plan.inputs_fp[s], write_inputs=s in missing_inputs, models=missing.get(s, {}),
                previous=previous))
        count = [0]

        def shard_done(row):
            count[0] += 1
            if progress:
                log(f"attributions: shard {row['shard']} done ({count[0]}/{len(tasks)}; {row['n_images']} images, "
                    f"{row['n_errors']} errors; models: {row['models'] or '-'})")
            start_reduce(int(row["shard"]))

        timings["attributions_s"] = round(run_attributions(ctx, tasks, shard_done), 3)
    t0 = time.time()
    for i, ref in enumerate(_as_completed(refs)):
        out = ray.get(ref)
        timings["reduce_s"] += out["seconds"]
        if progress:
            log(f"reduce: shard {out['shard']} done ({i + 1}/{len(refs)})")
    timings["reduce_s"] = round(timings["reduce_s"], 3)
    timings["reduce_tail_s"] = round(time.time() - t0, 3)
    return sum(len(m) for m in missing.values()), len(todo_reduce), timings


def _as_completed(refs):
    import ray

    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        yield ready[0]


def init_ray(progress: bool) -> None:
    import ray

    if ray.is_initialized():
        return
    import logging

    ray.init(logging_level=logging.WARNING, log_to_driver=True, configure_logging=True)


def write_tables(spec: RunSpec, store: Store, plan: Plan) -> dict:
    from ray_consensus.tables import correlations_table, models_table, read_shards, robustness_table

    scores = read_shards(store, "scores", plan.shards)
    consensus = read_shards(store, "consensus", plan.shards)
    consensus = consensus.drop(columns=[c for c in ("consensus", "mask") if c in consensus.columns])
    models = models_table(spec, scores, consensus)
    correlations = correlations_table(spec, scores)
    robustness = robustness_table(spec, read_shards(store, "subcommittees", plan.shards), models)
    for name, frame in (("models", models), ("correlations", correlations), ("robustness", robustness)):
        table = pa.Table.from_pandas(frame, preserve_index=False)
        store.write_parquet(f"tables/{name}.parquet", table)
        store.write_csv(f"tables/{name}.csv", table)
    return {"consensus_voted": int(consensus["voted"].sum()) if len(consensus) else 0}


def count_errors(store: Store, plan: Plan) -> int:
    n = store.read_parquet(f"errors/manifest/{DATA_FILE}").num_rows
    for s in plan.shards:
        n += store.read_parquet(f"{shard_dir('errors', s)}/{DATA_FILE}").num_rows
    return n


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


# ---------------------------------------------------------------- status and report

def status(spec_or_root: str, storage=None) -> dict:
    """Done and missing units per model and shard, from the run root alone."""
    store = open_store(spec_or_root, storage)
    if not store.exists("run.json"):
        raise SpecError(f"no run at {spec_or_root} (run.json not found)")
    info = store.read_json("run.json")
    spec_d = info["spec"]
    models = [m["id"] for m in spec_d["committee"]]
    shards = sorted(int(s) for s in store.read_parquet(MANIFEST_FILE, columns=["shard"]).column("shard")
                    .to_numpy()) if store.exists(MANIFEST_FILE) else []
    shards = sorted(set(shards))
    done = completed(store, "")
    by_model = units_by_model(done)
    reduced = {s for s in shards if shard_dir("consensus", s) in done}
    per_model = {m: {"done": sorted(s for s in shards if s in by_model.get(m, {})),
                     "missing": sorted(s for s in shards if s not in by_model.get(m, {}))} for m in models}
    return {"run_root": store.root, "status": info.get("status"), "updated": info.get("updated"),
            "shards": len(shards), "models": per_model,
            "reduced": {"done": sorted(reduced), "missing": sorted(set(shards) - reduced)},
            "units_computed": info.get("units_computed"), "units_skipped": info.get("units_skipped")}


def write_report(store: Store) -> str:
    """Render report/index.html from the run root's tables and a gallery of sample images."""
    from ray_consensus.report import render_report

    info = store.read_json("run.json")
    models = store.read_parquet("tables/models.parquet").to_pandas()
    correlations = store.read_parquet("tables/correlations.parquet").to_pandas()
    robustness = store.read_parquet("tables/robustness.parquet").to_pandas() \
        if store.exists("tables/robustness.parquet") else None
    summary = {**info, "explainer": info["spec"]["explainer"], "created": info.get("updated")}
    html = render_report(models, correlations, robustness, gallery_items(store, info), summary)
    store.write_text("report/index.html", html)
    return store.uri("report/index.html")


def gallery_items(store: Store, info: dict, max_shards: int = 8) -> list:
    """A few voted images with image, mask, consensus and every model's map: from the first
    shards (at most `max_shards` read), one image per class before any class repeats."""
    from ray_consensus import consensus as cm
    from ray_consensus.config import StorageSpec
    from ray_consensus.data import decode_image
    from ray_consensus.report import GalleryItem
    from ray_consensus.storage import read_uri_bytes

    spec_d = info["spec"]
    want = int(spec_d["run"]["gallery"])
    models = [m["id"] for m in spec_d["committee"]]
    manifest = store.read_parquet(MANIFEST_FILE).to_pandas().set_index("image_id")
    storage = StorageSpec(**{k: v for k, v in spec_d["storage"].items() if v != "***"})
    voted = []
    for s in sorted(manifest["shard"].unique())[:max_shards]:
        cons = store.read_parquet(f"{shard_dir('consensus', s)}/{DATA_FILE}").to_pandas()
        voted.append(cons[cons["voted"]].assign(shard=s))
        if sum(len(v) for v in voted) >= want and pd.concat(voted)["label"].nunique() >= want:
            break
    if not voted:
        return []
    voted = pd.concat(voted, ignore_index=True)
    first = ~voted["label"].duplicated()
    chosen = pd.concat([voted[first], voted[~first]]).head(want)
    items = []
    for s, rows in chosen.groupby("shard", sort=True):
        scores = store.read_parquet(f"{shard_dir('scores', s)}/{DATA_FILE}").to_pandas()
        attrs = {m: store.read_parquet(f"{attributions_dir(m, s)}/{DATA_FILE}",
                                       columns=["image_id", "attribution"]).to_pandas().set_index("image_id")
                 for m in models}
        for row in rows.itertuples():
            side = int(row.height)
            try:
                image = decode_image(read_uri_bytes(manifest.loc[row.image_id, "uri"], storage),
                                     int(spec_d["run"]["image_size"]))
            except Exception:  # the image vanished since the run: show the others
                continue
            mask = getattr(row, "mask", None)
            per_image = scores[scores["image_id"] == row.image_id].set_index("model_id")["consensus_score"]
            items.append(GalleryItem(
                image_id=row.image_id, image=image,
                mask=None if mask is None else np.asarray(mask, np.uint8).reshape(side, side),
                consensus=np.asarray(row.consensus, np.float32).reshape(side, side),
                model_maps={m: cm.normalise(np.asarray(attrs[m].loc[row.image_id, "attribution"], np.float64),
                                            spec_d["method"]["normalise"]).reshape(side, side) for m in models},
                label=int(row.label), scores={m: float(per_image.get(m, np.nan)) for m in models}))
    return sorted(items, key=lambda i: (i.label, i.image_id))
