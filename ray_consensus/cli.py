"""`ray-consensus`: run, validate, status, report, export-masks, demo.

A spec file is optional: flags override it, and a run works from flags alone
(`--dataset`, `--model` repeated, `--explainer`, `--output`). Errors a user can fix print
one line and exit 2 before any cluster work starts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
import yaml

from ray_consensus.errors import SpecError
from ray_consensus.spec.config import load_spec_file, parse_member, parse_spec

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Cross-model consensus of explanations for image classifiers, on Ray.")

SPEC_ARG = typer.Argument(None, help="run spec (YAML); optional when the flags say enough")
DATASET = typer.Option(None, "--dataset", help="image folder or manifest (.csv/.parquet), local or s3://")
MODEL = typer.Option(None, "--model", help="committee member ID=ARCH[@WEIGHTS] (repeatable); replaces the "
                                           "spec's committee")
EXPLAINER = typer.Option(None, "--explainer", help="smoothgrad | integrated_gradients | saliency | lime | gradcam")
OUTPUT = typer.Option(None, "--output", "-o", help="run root: local folder or s3://bucket/prefix")
SET = typer.Option(None, "--set", help="override any key, e.g. --set run.shard_size=64 "
                                       "--set explainer.params.n_samples=20 (repeatable)")


def fail(msg: str, code: int = 2):
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def _set_path(data: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise SpecError(f"--set {dotted}: '{k}' is not a section")
    node[keys[-1]] = value


def build_spec(spec_file: Optional[Path], dataset=None, models=None, explainer=None, output=None, sets=None):
    data = load_spec_file(spec_file) if spec_file else {}
    if dataset:
        data.setdefault("dataset", {})["path"] = dataset
    if models:
        data["committee"] = [parse_member(m) for m in models]
    if explainer:
        ex = data.setdefault("explainer", {})
        if ex.get("name") not in (None, explainer):
            ex["params"] = {}  # another method's params do not carry over
        ex["name"] = explainer
    if output:
        data.setdefault("run", {})["output"] = output
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SpecError(f"--set {item!r}: expected KEY=VALUE")
        _set_path(data, key.strip(), yaml.safe_load(value))
    return parse_spec(data)


def _guard(fn, *args, **kwargs):
    from ray_consensus.errors import UserError

    try:
        return fn(*args, **kwargs)
    except UserError as e:
        fail(str(e), code=e.exit_code)


@app.command()
def run(spec_file: Optional[Path] = SPEC_ARG, dataset: Optional[str] = DATASET,
        model: Optional[list[str]] = MODEL, explainer: Optional[str] = EXPLAINER,
        output: Optional[str] = OUTPUT, set_: Optional[list[str]] = SET,
        force: bool = typer.Option(False, "--force", help="recompute every unit, even complete ones"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress lines")):
    """Compute attributions, consensus, scores, tables and the report (resumes where it stopped)."""
    from ray_consensus.runner import execute

    spec = _guard(build_spec, spec_file, dataset, model, explainer, output, set_)
    info = _guard(execute, spec, force=force, progress=not quiet)
    _print_result(spec, info)


def _print_result(spec, info: dict) -> None:
    import pandas as pd

    from ray_consensus.storage.store import open_store

    store = open_store(spec.run.output, spec.storage)
    with pd.option_context("display.width", 160, "display.max_columns", 20, "display.precision", 3):
        typer.echo(store.read_parquet("tables/models.parquet").to_pandas().to_string(index=False))
        typer.echo("")
        typer.echo(store.read_parquet("tables/correlations.parquet").to_pandas().to_string(index=False))
    c = info["units_computed"]
    typer.echo(f"\nrun root: {store.root}\nreport: {store.uri('report/index.html')}\n"
               f"units computed: {c['attributions']} attribution, {c['reduce']} reduce; "
               f"skipped: {info['units_skipped']['attributions']} attribution; errors: {info['counts']['errors']}; "
               f"total {info['timings']['total_s']:.1f}s")


@app.command()
def validate(spec_file: Optional[Path] = SPEC_ARG, dataset: Optional[str] = DATASET,
             model: Optional[list[str]] = MODEL, explainer: Optional[str] = EXPLAINER,
             output: Optional[str] = OUTPUT, set_: Optional[list[str]] = SET,
             schema: bool = typer.Option(False, "--schema", help="print every spec key with its default and help"),
             as_json: bool = typer.Option(False, "--json", help="print the plan as JSON")):
    """Check a spec in seconds, without Ray, and print the plan (images, shards, models, passes) and the
    schedule (slots, rounds, resources)."""
    if schema:
        from ray_consensus.spec.config import schema_text

        typer.echo(schema_text())
        return
    from ray_consensus.planning.plan import make_plan
    from ray_consensus.planning.preflight import preflight

    spec = _guard(build_spec, spec_file, dataset, model, explainer, output, set_)
    store, manifest, listing = _guard(preflight, spec)
    plan = _guard(make_plan, spec, store, manifest, False, listing)
    summary = plan.summary(spec, manifest)
    summary["schedule"] = _guard(planned_schedule, spec, plan)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    typer.echo(f"ok: {summary['images']} images ({summary['classes']} classes, {summary['manifest_errors']} "
               f"rejected), {summary['shards']} shards of up to {spec.run.shard_size}, {summary['models']} models, "
               f"explainer {spec.explainer.name}")
    typer.echo(f"to compute: {summary['attribution_units_to_compute']}/{summary['attribution_units']} attribution "
               f"units, {summary['reduce_units_to_compute']} reduce units; "
               f"{summary['forward_passes']:,} forward and {summary['backward_passes']:,} backward passes")
    if summary["damaged_units"]:
        typer.echo(f"damaged: {summary['damaged_units']} stored units whose files are missing or of another size "
                   f"(recomputed by the run; `status` lists them)")
    if summary["shards_to_remove"]:
        typer.echo(f"to remove: {summary['shards_to_remove']} shards whose every image left the data set")
    if plan.others:
        typer.echo(f"kept: {plan.others_note()}")
    typer.echo(f"schedule: {summary['schedule']}")


def planned_schedule(spec, plan) -> str:
    """The schedule `run` would use, for the capacity validate can know without a cluster."""
    from ray_consensus.planning.schedule import Capacity, make_schedule

    attribute = plan.to_attribute()
    members = {m for p in attribute for m in p.models_to_compute}
    if not members:
        return "nothing to attribute"
    if spec.resources.num_gpus > 0 and spec.resources.max_gpus is None:
        return (f"{len(members)} members on GPU slots of {spec.resources.num_gpus:g} GPU each: how many run at once "
                f"depends on the cluster's GPUs, read when the run starts (set resources.max_gpus to see it here)")
    return make_schedule(spec, len(members), Capacity.of_spec_or_machine(spec), len(attribute)).describe()


@app.command()
def status(run_root: str = typer.Argument(..., help="run root (local folder or s3://bucket/prefix)"),
           as_json: bool = typer.Option(False, "--json", help="machine-readable output")):
    """What is done and missing, per model and shard."""
    from ray_consensus.runroot.status import run_status

    st = _guard(run_status, run_root)
    if as_json:
        typer.echo(json.dumps(st, indent=2))
        return
    typer.echo(f"{st['run_root']}: {st['status']} (updated {st['updated']}), {st['shards']} shards"
               + (f"; {st['error']}" if st["status"] != "complete" and st.get("error") else ""))
    for m, d in st["models"].items():
        typer.echo(f"  {m}: {len(d['done'])} done, {len(d['missing'])} missing"
                   + (f" (shards {_ranges(d['missing'])})" if d["missing"] else ""))
    r = st["reduced"]
    typer.echo(f"  reduced: {len(r['done'])} done, {len(r['missing'])} missing")
    for folder, why in st["damaged"].items():
        typer.echo(f"  damaged: {folder} ({why}): the next run recomputes it")


def _ranges(values: list[int]) -> str:
    out, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return ",".join(out)


@app.command()
def report(run_root: str = typer.Argument(..., help="run root (local folder or s3://bucket/prefix)")):
    """(Re)write report/index.html from a finished run."""
    from ray_consensus.report.collect import write_report
    from ray_consensus.storage.store import open_store

    typer.echo(_guard(lambda: write_report(open_store(run_root))))


@app.command("export-masks")
def export_masks(run_root: str = typer.Argument(..., help="run root (local folder or s3://bucket/prefix)"),
                 out: str = typer.Argument(..., help="where to write masks/, masks.parquet, summary.json (local or "
                                                     "s3://)"),
                 rule: str = typer.Option("top", "--rule", help="top | threshold | otsu"),
                 fraction: float = typer.Option(0.2, "--fraction", help="top: the share of map cells kept"),
                 threshold: float = typer.Option(0.5, "--threshold", help="threshold: the share of the map's maximum"),
                 quiet: bool = typer.Option(False, "--quiet", "-q")):
    """Pseudo segmentation masks from the consensus of every voted image, in each image's own pixel grid
    (0 background, 1 foreground, 255 outside the shared crop), with their IoU against ground-truth masks."""
    from ray_consensus.report.pseudo_masks import MaskRule
    from ray_consensus.report.pseudo_masks import export_masks as export

    summary = _guard(lambda: export(run_root, out, MaskRule(rule, fraction, threshold),
                                    None if quiet else lambda m: typer.echo(m, err=True)))
    line = f"wrote {summary['masks']} masks ({summary['rule']}) to {out}"
    if summary["mean_iou"] is not None:
        line += (f"; mean IoU against the ground-truth masks {summary['mean_iou']:.3f} "
                 f"({summary['with_ground_truth']} images)")
    typer.echo(line)


@app.command()
def demo(output: str = typer.Option(..., "--output", "-o", help="run root for the demo run"),
         explainer: str = typer.Option("smoothgrad", "--explainer", help="explainer for the demo run"),
         set_: Optional[list[str]] = SET,
         cache: Optional[Path] = typer.Option(None, "--cache", help="cache for the demo data and committee "
                                                                    "(default: $RAY_CONSENSUS_CACHE or "
                                                                    "~/.cache/ray-consensus)"),
         force: bool = typer.Option(False, "--force", help="recompute every unit"),
         quiet: bool = typer.Option(False, "--quiet", "-q")):
    """Build (or reuse) the offline demo data set and committee, then run the full job into OUTPUT."""
    from ray_consensus.demo.build import default_cache_dir, ensure_demo
    from ray_consensus.runner import execute

    root, committee = ensure_demo(cache or default_cache_dir(), progress=not quiet)
    data = demo_spec(root, committee, output, explainer)
    for item in set_ or []:
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"--set {item!r}: expected KEY=VALUE")
        _guard(_set_path, data, key.strip(), yaml.safe_load(value))
    spec = _guard(parse_spec, data)
    info = _guard(execute, spec, force=force, progress=not quiet)
    _print_result(spec, info)


# The demo's images are 64 px: a 64 px crop and a 32 px map grid keep every detail, and fewer
# samples than the paper's defaults keep a cold demo within minutes on 2 CPU cores.
DEMO_EXPLAINER_PARAMS = {"smoothgrad": {"n_samples": 16}, "integrated_gradients": {"n_steps": 16},
                         "lime": {"n_samples": 300, "n_segments": 30}}


def demo_spec(root: Path, committee: list[dict], output: str, explainer: str) -> dict:
    """Spec data for the demo run over the demo's data set and trained committee."""
    return {
        "dataset": {"path": str(root / "images"), "masks": str(root / "masks")},
        "committee": [{"id": m["id"], "arch": m["arch"], "weights": m["weights"], "kwargs": m["kwargs"]}
                      for m in committee],
        "explainer": {"name": explainer, "params": DEMO_EXPLAINER_PARAMS.get(explainer, {})},
        "run": {"output": output, "image_size": 64, "map_size": 32, "shard_size": 64},
        "resources": {"batch_size": 32},
    }


def main():
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
