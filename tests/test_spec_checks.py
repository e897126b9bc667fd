"""Spec values a run cannot use are one line and exit 2 from `validate` and `run` before any work, and
`report` on a root that holds no run, or no tables yet, is one line too (as `status` is)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from imagesets import make_image_folder

# Runs each argument list through the CLI in one process (one interpreter start for them all) and
# prints, per invocation, its exit code (or the exception a traceback would show) and its stderr;
# at the end, asserts Ray was never imported (no cluster work started).
RUNNER = """
import contextlib, io, json, sys
from ray_consensus.cli import app
out = []
for args in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            app(args)
            code = 0
        except SystemExit as e:
            code = e.code
        except Exception as e:
            code = type(e).__name__
    out.append({"args": args, "code": code, "stderr": err.getvalue()})
out.append({"ray_imported": "ray" in sys.modules})
print("cli-results:", json.dumps(out))
"""


def cli_each(*arg_lists: list[str]) -> list[dict]:
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(arg_lists)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("cli-results: "))
    *results, last = json.loads(line.removeprefix("cli-results: "))
    assert not last["ray_imported"], "ray was imported"
    return results


def assert_one_line(result: dict, *phrases: str) -> None:
    lines = result["stderr"].strip().splitlines()
    assert result["code"] == 2, result
    assert len(lines) == 1 and lines[0].startswith("error: "), result
    for phrase in phrases:
        assert phrase in lines[0], (phrase, result)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("ds"), n_classes=2, per_class=3)


# (flags, the key the line must name, what it must say). Each once got past the checks: method.seed=-1
# passed `validate` and failed at the tables step (numpy seeds are >= 0); others ran with a value
# truncated (2.5 -> 2), a size the robustness table skipped, NaN (it passes every bound), inf, or 10^20
# (no int64 holds it).
BAD_VALUES = [
    (["--explainer", "integrated_gradients", "--set", "explainer.params.n_steps=0"],
     "explainer.params.n_steps", "an integer >= 1"),
    (["--set", "method.bootstrap=-1"], "method.bootstrap", "an integer >= 0"),
    (["--set", "explainer.params.n_samples=2.7"], "explainer.params.n_samples", "got 2.7"),
    (["--set", "method.seed=-1"], "method.seed", "an integer >= 0"),
    (["--set", "method.robustness_sizes=[2.5]"], "method.robustness_sizes[0]", "expected an integer, got 2.5"),
    (["--set", "method.robustness_sizes=[3]"], "method.robustness_sizes",
     "each size must be from 2 to 2 (the committee's size), got 3"),
    (["--set", "explainer.params.noise_level=.nan"], "explainer.params.noise_level", "got nan"),
    (["--set", "resources.slot_wait_s=.inf"], "resources.slot_wait_s", "got inf"),
    (["--set", "explainer.params.n_samples=1.0e+20"], "explainer.params.n_samples", "got 1e+20"),
]


def test_bad_values_are_one_line_from_validate_and_run_before_any_work(dataset, tmp_path):
    base = ["--dataset", str(dataset / "images"), "--model", "a=resnet10t@random",
            "--model", "b=mobilenetv3_small_050@random", "--output", str(tmp_path / "run")]
    spec = tmp_path / "spec.yaml"  # a member's own batch size, which only a spec file can give
    spec.write_text("committee:\n  - {id: a, arch: resnet10t, weights: random, batch_size: -1}\n")
    member = [str(spec), "--dataset", str(dataset / "images"), "--output", str(tmp_path / "run")]
    # `validate` first: were a value let through, `run` would start computing with it.
    for command in ("validate", "run"):
        results = cli_each(*[[command, *base, *flags] for flags, _, _ in BAD_VALUES], [command, *member])
        for (_, key, says), result in zip(BAD_VALUES, results):
            assert_one_line(result, key, says)
        assert_one_line(results[-1], "committee[0].batch_size must be an integer >= 1, got -1")
    assert not (tmp_path / "run").exists()  # nothing written


def test_report_on_a_root_without_a_run_or_without_tables_is_one_line_as_status_is(dataset, tmp_path):
    from ray_consensus.runroot.record import PlanSummary, RunRecord
    from ray_consensus.spec.config import parse_member, parse_spec
    from ray_consensus.storage.store import LocalStore

    missing, empty, unfinished, garbled = (tmp_path / n for n in ("missing", "empty", "unfinished", "garbled"))
    empty.mkdir()
    garbled.mkdir()
    (garbled / "run.json").write_text("{not json")
    unfinished.mkdir()
    # What a run writes first (runner.execute) and leaves behind when it is stopped before its tables.
    spec = parse_spec({"dataset": {"path": str(dataset / "images")}, "committee": [parse_member("a=resnet10t@random")],
                       "run": {"output": str(unfinished)}})
    plan = PlanSummary(images=6, shards=1, models=1, classes=2, manifest_errors=0, attribution_units=1,
                       attribution_units_to_compute=1, reduce_units_to_compute=1, forward_passes=6, backward_passes=0)
    RunRecord(status="running", spec_data=spec.to_public_dict(), plan=plan).save(LocalStore(str(unfinished)))
    report_missing, report_empty, report_unfinished, report_garbled, status_missing, status_unfinished = cli_each(
        ["report", str(missing)], ["report", str(empty)], ["report", str(unfinished)], ["report", str(garbled)],
        ["status", str(missing)], ["status", str(unfinished)])
    assert_one_line(report_missing, f"no run at {missing} (run.json not found)")
    assert_one_line(report_empty, f"no run at {empty} (run.json not found)")
    assert_one_line(status_missing, f"no run at {missing} (run.json not found)")
    assert_one_line(report_unfinished, f"no tables at {unfinished}", "'running'", "ray-consensus status")
    assert_one_line(report_garbled, "run.json is not a run's run.json")
    assert status_unfinished["code"] == 0, status_unfinished
    assert not (unfinished / "report").exists() and not missing.exists()
