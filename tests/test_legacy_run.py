"""A run root written by ray-consensus 0.1.0 (tests/legacy/run, made by tests/legacy/make_fixture.py)
is read and resumed by this code without recomputing its inputs or attributions. Its reduce units
are redone (from the stored attributions): in 0.2.0 a reduce unit also writes the shard's
aggregates and tables/images rows, and its contract version is in its fingerprint."""

from __future__ import annotations

import pandas as pd
import pytest

from ray_consensus.dataset.manifest import read_manifest
from ray_consensus.planning.plan import make_plan
from ray_consensus.runner import execute
from ray_consensus.runroot.record import UnitCounts
from ray_consensus.storage.store import LocalStore


def test_a_0_1_0_run_root_needs_no_attribution_or_input_recomputed(legacy_root):
    root, spec = legacy_root
    plan = make_plan(spec, LocalStore(str(root)), read_manifest(spec.dataset, spec.storage))
    assert len(plan.shards) == 2
    assert all(p.inputs.done and not p.models_to_compute for p in plan.shards.values())
    assert not any(p.reduce.done for p in plan.shards.values())  # the reduce contract moved (see above)


@pytest.mark.slow
def test_a_0_1_0_run_root_resumes_and_gives_the_same_tables(legacy_root):
    """Only the reducer runs; the models table and the correlation coefficients and p-values are 0.1.0's
    (to 1e-9); the intervals are the new ones (README: "Uncertainty")."""
    root, spec = legacy_root
    models = pd.read_parquet(root / "tables" / "models.parquet")
    old = pd.read_parquet(root / "tables" / "correlations.parquet")
    info = execute(spec, progress=False)
    assert info.status == "complete"
    assert info.units_computed == UnitCounts(attributions=0, reduce=2)
    now = pd.read_parquet(root / "tables" / "models.parquet")
    assert (now.pop("n_nonfinite") == 0).all()  # 0.3.0's column: no member's map was NaN or inf
    pd.testing.assert_frame_equal(now, models, check_exact=False, rtol=1e-9, atol=1e-12)
    new = pd.read_parquet(root / "tables" / "correlations.parquet")
    new = new[new.ci_over == "images"].reset_index(drop=True)
    pd.testing.assert_frame_equal(new[["x", "y", "method", "coefficient", "p_value", "n"]],
                                  old[["x", "y", "method", "coefficient", "p_value", "n"]], check_exact=False,
                                  rtol=1e-9, atol=1e-12)
    assert (root / "report" / "index.html").exists()
