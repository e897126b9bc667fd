"""The Python API: `rc.run` returns the run's record, `rc.open_run` reads back exactly what the run root
stores, `rc.validate` plans without Ray, and what a user can get wrong is one SpecError line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from imagesets import make_image_folder, tiny_spec

import ray_consensus as rc
from ray_consensus.errors import SpecError
from ray_consensus.runroot.record import RunRecord, UnitCounts
from ray_consensus.spec.config import RunSpec

LEGACY_RUN = Path(__file__).resolve().parent / "legacy" / "run"


@pytest.fixture(scope="module")
def finished(tmp_path_factory, ray_local):
    """A run of two members over 8 images (one shard) through `rc.run(dict)`: its root and its record."""
    base = tmp_path_factory.mktemp("api")
    data = make_image_folder(base / "data", n_classes=2, per_class=4)
    root = base / "run"
    return root, rc.run(tiny_spec(data, str(root)), progress=False)


def read(path: Path) -> pd.DataFrame:
    return pq.read_table(str(path)).to_pandas()


@pytest.mark.slow
def test_run_returns_the_record_it_stored_in_run_json(finished):
    root, record = finished
    assert isinstance(record, RunRecord)
    assert record.status == "complete" and record.units_computed == UnitCounts(attributions=2, reduce=1)
    assert record.counts.images == 8 and record.plan.images == 8
    assert record.to_dict() == json.loads((root / "run.json").read_text())
    assert rc.open_run(root).record == record


@pytest.mark.slow
def test_open_run_gives_every_table_as_the_parquet_files_hold_it(finished):
    root, _ = finished
    r = rc.open_run(str(root))
    for name in ("models", "correlations", "robustness"):
        pd.testing.assert_frame_equal(getattr(r, name), read(root / "tables" / f"{name}.parquet"))
    pd.testing.assert_frame_equal(r.images, read(root / "tables" / "images"))
    pd.testing.assert_frame_equal(r.scores, read(root / "scores"))
    pd.testing.assert_frame_equal(r.errors, read(root / "errors"))
    assert len(r.images) == 8 and len(r.scores) == 2 * 8
    assert r.status.status == "complete" and r.status.models["a"].done == [0] and r.status.reduced.missing == []


@pytest.mark.slow
def test_an_images_maps_are_its_stored_rows_on_the_map_grid(finished):
    root, _ = finished
    r = rc.open_run(root)
    consensus = read(root / "consensus").set_index("image_id")
    image_id = consensus.index[3]
    np.testing.assert_array_equal(r.consensus(image_id),
                                  np.asarray(consensus.loc[image_id, "consensus"], np.float32).reshape(16, 16))
    maps = r.maps(image_id)
    assert list(maps) == ["a", "b"]
    attributions = read(root / "attributions").set_index(["model", "image_id"])
    for model_id, grid in maps.items():
        assert grid.shape == (16, 16)
        np.testing.assert_array_equal(grid.ravel(), np.asarray(attributions.loc[(model_id, image_id), "attribution"]))
    with pytest.raises(SpecError, match="image 'c9/none' is not in the run's manifest"):
        r.maps("c9/none")


@pytest.mark.slow
def test_a_missing_table_is_one_line(finished, tmp_path):
    root, _ = finished
    copy = tmp_path / "run"
    shutil.copytree(root, copy)
    (copy / "tables" / "robustness.parquet").unlink()
    with pytest.raises(SpecError) as err:
        rc.open_run(copy).robustness
    message = str(err.value)
    assert message.startswith(f"{copy / 'tables' / 'robustness.parquet'} not found") and "\n" not in message


def test_a_missing_root_is_one_spec_error_line(tmp_path):
    with pytest.raises(SpecError) as err:
        rc.open_run(tmp_path / "nowhere")
    assert str(err.value) == f"no run at {tmp_path / 'nowhere'} (run.json not found)"


def test_a_run_root_of_0_1_0_opens_and_its_record_round_trips():
    r = rc.open_run(LEGACY_RUN)
    stored = json.loads((LEGACY_RUN / "run.json").read_text())
    assert r.record.to_dict() == stored
    assert r.record.class_names is None and r.record.plan.damaged_units is None  # written before 0.2.0
    assert r.record.spec.run.map_size == 16 and r.record.units_computed == UnitCounts(attributions=4, reduce=2)
    assert list(r.models["model_id"][:2]) == ["a", "b"]


def test_a_spec_is_a_path_a_dict_or_a_runspec(tmp_path):
    data = tiny_spec(tmp_path / "data", str(tmp_path / "run"))
    (tmp_path / "spec.yaml").write_text(json.dumps(data))  # JSON is YAML
    spec = rc.load_spec(data)
    assert isinstance(spec, RunSpec)
    assert rc.load_spec(tmp_path / "spec.yaml") == spec == rc.load_spec(str(tmp_path / "spec.yaml"))
    assert rc.load_spec(spec) is spec
    with pytest.raises(SpecError, match="a spec is a YAML file's path, a dict or a RunSpec, not list"):
        rc.load_spec([data])


VALIDATE = """
import json, sys
import ray_consensus as rc
heavy = sorted(m for m in ("torch", "timm", "ray") if m in sys.modules)
summary = rc.validate(json.loads(sys.argv[1]))
print(json.dumps({"on_import": heavy, "ray": "ray" in sys.modules, "summary": summary.to_dict()}))
"""


def test_validate_plans_without_importing_ray_and_the_package_imports_no_torch(tmp_path):
    data = make_image_folder(tmp_path / "data", n_classes=2, per_class=3)
    spec = tiny_spec(data, str(tmp_path / "run"))
    proc = subprocess.run([sys.executable, "-c", VALIDATE, json.dumps(spec)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["on_import"] == [] and out["ray"] is False
    summary = out["summary"]
    assert summary["images"] == 6 and summary["shards"] == 1 and summary["attribution_units_to_compute"] == 2
    assert summary["schedule"].startswith("2 members on ")
    assert not (tmp_path / "run").exists()
