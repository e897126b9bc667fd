"""`ray-consensus`: run, validate, status, report, export-masks, demo.

A thin layer over the Python API (`api`): it turns flags into a spec and formats what the API
returns. A spec file is optional: flags override it, and a run works from flags alone
(`--dataset`, `--model` repeated, `--explainer`, `--output`). Errors a user can fix print
one line and exit 2 before any cluster work starts.
"""

from __future__ import annotations

import inspect
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
import yaml

from ray_consensus import api
from ray_consensus.errors import SpecError, UserError
from ray_consensus.spec.config import RunSpec, load_spec_file, parse_member

if TYPE_CHECKING:
    from ray_consensus.runroot.record import RunRecord

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Cross-model consensus of explanations for image classifiers, on Ray.")

SET = typer.Option(None, "--set", help="override any key, e.g. --set run.shard_size=64 "
                                       "--set explainer.params.n_samples=20 (repeatable)")
RUN_ROOT = typer.Argument(..., help="run root (local folder or s3://bucket/prefix)")
QUIET = typer.Option(False, "--quiet", "-q", help="no progress lines")


def fail(msg: str, code: int = 2):
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def _guard(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        fail(str(e), code=e.exit_code)


def apply_sets(data: dict, sets: list[str] | None) -> dict:
    """`--set KEY=VALUE` overrides on spec data (dotted keys; each value parsed as YAML), in place."""
    for item in sets or []:
        dotted, sep, value = item.partition("=")
        if not sep:
            raise SpecError(f"--set {item!r}: expected KEY=VALUE")
        *sections, key = dotted.strip().split(".")
        node = data
        for k in sections:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise SpecError(f"--set {dotted.strip()}: '{k}' is not a section")
        node[key] = yaml.safe_load(value)
    return data


# ---------------------------------------------------------------- the spec flags of `run` and `validate`

@dataclass(frozen=True)
class SpecFlags:
    """A spec file (optional) and the flags that override it."""

    spec_file: Optional[Path]
    dataset: Optional[str]
    model: Optional[list[str]]
    explainer: Optional[str]
    output: Optional[str]
    set_: Optional[list[str]]

    def spec(self) -> RunSpec:
        data = load_spec_file(self.spec_file) if self.spec_file else {}
        if self.dataset:
            data.setdefault("dataset", {})["path"] = self.dataset
        if self.model:
            data["committee"] = [parse_member(m) for m in self.model]
        if self.explainer:
            ex = data.setdefault("explainer", {})
            if ex.get("name") not in (None, self.explainer):
                ex["params"] = {}  # another method's params do not carry over
            ex["name"] = self.explainer
        if self.output:
            data.setdefault("run", {})["output"] = self.output
        return api.load_spec(apply_sets(data, self.set_))


_SPEC_FLAGS = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=hint)
               for name, hint, default in (
    ("spec_file", Optional[Path], typer.Argument(None, help="run spec (YAML); optional when the flags say enough")),
    ("dataset", Optional[str], typer.Option(None, "--dataset", help="image folder or manifest (.csv/.parquet), "
                                                                    "local or s3://")),
    ("model", Optional[list[str]], typer.Option(None, "--model", help="committee member ID=ARCH[@WEIGHTS] "
                                                                      "(repeatable); replaces the spec's committee")),
    ("explainer", Optional[str], typer.Option(None, "--explainer", help="smoothgrad | integrated_gradients | "
                                                                        "saliency | lime | gradcam")),
    ("output", Optional[str], typer.Option(None, "--output", "-o", help="run root: local folder or "
                                                                        "s3://bucket/prefix")),
    ("set_", Optional[list[str]], SET),
)]


def takes_spec(command):
    """A command whose first parameter is the `SpecFlags`: its options follow the spec flags, which are the
    same for every such command."""
    own = list(inspect.signature(command, eval_str=True).parameters.values())[1:]

    def with_spec_flags(**options):
        flags = SpecFlags(**{p.name: options.pop(p.name) for p in _SPEC_FLAGS})
        return command(flags, **options)

    with_spec_flags.__name__, with_spec_flags.__doc__ = command.__name__, command.__doc__
    with_spec_flags.__signature__ = inspect.Signature(_SPEC_FLAGS + own)
    return with_spec_flags


# ---------------------------------------------------------------- commands

@app.command()
@takes_spec
def run(flags: SpecFlags, force: bool = typer.Option(False, "--force", help="recompute every unit, even complete ones"),
        quiet: bool = QUIET):
    """Compute attributions, consensus, scores, tables and the report (resumes where it stopped)."""
    spec = _guard(flags.spec)
    _print_result(spec, _guard(api.run, spec, force=force, progress=not quiet))


def _print_result(spec: RunSpec, record: RunRecord) -> None:
    import pandas as pd

    results = _guard(api.open_run, spec.run.output, spec.storage)
    with pd.option_context("display.width", 160, "display.max_columns", 20, "display.precision", 3):
        typer.echo(results.models.to_string(index=False))
        typer.echo("")
        typer.echo(results.correlations.to_string(index=False))
    computed = record.units_computed
    typer.echo(f"\nrun root: {results.root}\nreport: {results.store.uri('report/index.html')}\n"
               f"units computed: {computed.attributions} attribution, {computed.reduce} reduce; "
               f"skipped: {record.units_skipped.attributions} attribution; errors: {record.counts.errors}; "
               f"total {record.timings['total_s']:.1f}s")


@app.command()
@takes_spec
def validate(flags: SpecFlags,
             schema: bool = typer.Option(False, "--schema", help="print every spec key with its default and help"),
             as_json: bool = typer.Option(False, "--json", help="print the plan as JSON")):
    """Check a spec in seconds, without Ray, and print the plan (images, shards, models, passes) and the
    schedule (slots, rounds, resources)."""
    if schema:
        from ray_consensus.spec.config import schema_text

        typer.echo(schema_text())
        return
    spec = _guard(flags.spec)
    summary = _guard(api.validate, spec)
    if as_json:
        typer.echo(json.dumps(summary.to_dict(), indent=2))
        return
    typer.echo(f"ok: {summary.images} images ({summary.classes} classes, {summary.manifest_errors} rejected), "
               f"{summary.shards} shards of up to {spec.run.shard_size}, {summary.models} models, "
               f"explainer {spec.explainer.name}")
    typer.echo(f"to compute: {summary.attribution_units_to_compute}/{summary.attribution_units} attribution "
               f"units, {summary.reduce_units_to_compute} reduce units; "
               f"{summary.forward_passes:,} forward and {summary.backward_passes:,} backward passes")
    if summary.damaged_units:
        typer.echo(f"damaged: {summary.damaged_units} stored units whose files are missing or of another size "
                   f"(recomputed by the run; `status` lists them)")
    if summary.shards_to_remove:
        typer.echo(f"to remove: {summary.shards_to_remove} shards whose every image left the data set")
    if summary.members_not_in_committee:
        typer.echo(f"kept: {summary.others_note()}")
    typer.echo(f"schedule: {summary.schedule}")


@app.command()
def status(run_root: str = RUN_ROOT, as_json: bool = typer.Option(False, "--json", help="machine-readable output")):
    """What is done and missing, per model and shard."""
    st = _guard(lambda: api.open_run(run_root).status)
    if as_json:
        typer.echo(json.dumps(st.to_dict(), indent=2))
        return
    typer.echo(f"{st.run_root}: {st.status} (updated {st.updated}), {st.shards} shards"
               + (f"; {st.error}" if st.status != "complete" and st.error else ""))
    for m, progress in st.models.items():
        typer.echo(f"  {m}: {len(progress.done)} done, {len(progress.missing)} missing"
                   + (f" (shards {_ranges(progress.missing)})" if progress.missing else ""))
    typer.echo(f"  reduced: {len(st.reduced.done)} done, {len(st.reduced.missing)} missing")
    for folder, why in st.damaged.items():
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
def report(run_root: str = RUN_ROOT):
    """(Re)write report/index.html from a finished run."""
    typer.echo(_guard(lambda: api.open_run(run_root).write_report()))


@app.command("export-masks")
def export_masks(run_root: str = RUN_ROOT,
                 out: str = typer.Argument(..., help="where to write masks/, masks.parquet, summary.json (local or "
                                                     "s3://)"),
                 rule: str = typer.Option("top", "--rule", help="top | threshold | otsu"),
                 fraction: float = typer.Option(0.2, "--fraction", help="top: the share of map cells kept"),
                 threshold: float = typer.Option(0.5, "--threshold", help="threshold: the share of the map's maximum"),
                 quiet: bool = typer.Option(False, "--quiet", "-q")):
    """Pseudo segmentation masks from the consensus of every voted image, in each image's own pixel grid
    (0 background, 1 foreground, 255 outside the shared crop), with their IoU against ground-truth masks."""
    summary = _guard(lambda: api.open_run(run_root).export_masks(
        out, rule, fraction, threshold, None if quiet else lambda m: typer.echo(m, err=True)))
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
    from ray_consensus.demo.spec import demo_spec, ensure_demo
    from ray_consensus.models.names import default_cache_dir

    root, committee = ensure_demo(cache or default_cache_dir(), progress=not quiet)
    spec = _guard(lambda: api.load_spec(apply_sets(demo_spec(root, committee, output, explainer), set_)))
    _print_result(spec, _guard(api.run, spec, force=force, progress=not quiet))


def main():
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
