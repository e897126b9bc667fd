"""errors/ reads as one data set (pandas, pyarrow, DuckDB), and every stored metric is that of the values
as stored (a scikit-learn recomputation from the stored columns agrees)."""

from __future__ import annotations

import shutil
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from ray_consensus.results import consensus as cm
from ray_consensus.results.reduce import ReduceTask, reduce_shard
from ray_consensus.runroot.contract import (
    ImageRef,
    attributions_file,
    encode_attributions,
    encode_inputs,
    file_of,
    read_consensus,
    read_scores,
    write_manifest,
)
from ray_consensus.runroot.units import Unit
from ray_consensus.spec.config import MethodSpec
from ray_consensus.storage.store import LocalStore

LEGACY = Path(__file__).parent / "legacy" / "run"
STRINGS = {"image_id": pa.string(), "uri": pa.string(), "stage": pa.string(), "reason": pa.string()}


def assert_one_errors_data_set(root: Path, expected: set[tuple[str, str]], rows: int | None = None) -> None:
    """errors/ read whole by pandas, pyarrow and DuckDB: the same (image_id, stage) pairs and number of
    rows (`rows`, default one per pair), string columns, a shard column."""
    rows = len(expected) if rows is None else rows
    for f in (root / "errors").rglob("*.parquet"):
        schema = pq.read_schema(f)
        assert {n: schema.field(n).type for n in STRINGS} == STRINGS, f
    frame = pd.read_parquet(root / "errors")
    assert set(zip(frame.image_id, frame.stage)) == expected and len(frame) == rows
    assert "shard" in frame.columns
    table = pads.dataset(str(root / "errors"), partitioning="hive").to_table()
    assert {n: table.schema.field(n).type for n in STRINGS} == STRINGS and table.num_rows == rows
    assert set(zip(table.column("image_id").to_pylist(), table.column("stage").to_pylist())) == expected
    found = duckdb.sql(f"SELECT image_id, stage, shard FROM read_parquet('{root}/errors/**/*.parquet', "
                       f"hive_partitioning = true)").fetchall()
    assert {(i, s) for i, s, _ in found} == expected and len(found) == rows


@pytest.mark.slow
def test_errors_read_as_one_data_set_with_pandas_pyarrow_and_duckdb(broken_member_runs):
    """conftest's run root: a manifest row rejected, a PNG that does not decode, two members' NaN maps."""
    run_root = broken_member_runs["root"]
    good = {f"c{c}/img{i:03d}" for c in range(2) for i in range(4)}
    assert_one_errors_data_set(run_root, {("c1/zz-truncated", "decode"), ("c0/label-9", "manifest")} | {
        (i, "attribution") for i in good}, rows=2 + 2 * len(good))
    for kind in ("scores", "consensus", "attributions"):  # and the other tables, as before
        assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{run_root}/{kind}/**/*.parquet', "
                          f"hive_partitioning = true)").fetchall()[0][0] > 0


def test_a_0_1_0_errors_layout_is_migrated(tmp_path):
    """0.1.0 kept the listing's rejects in errors/manifest/ (every column typed null when empty): the next
    run's manifest step moves them into the partitioning."""
    shutil.copytree(LEGACY / "errors", tmp_path / "errors")
    assert pq.read_schema(tmp_path / "errors" / "manifest" / "part-0.parquet").field("uri").type == pa.null()
    manifest = pd.DataFrame({"image_id": ["x"], "uri": ["s3://b/x.png"], "label": [0], "mask_uri": [None],
                             "shard": [0]})
    rejected = pd.DataFrame([{"image_id": "y", "uri": "s3://b/y.png", "stage": "manifest", "reason": "duplicate"}])
    write_manifest(LocalStore(str(tmp_path)), manifest, rejected)
    decode = pd.concat([pd.read_parquet(LEGACY / "errors" / f"shard={s:05d}") for s in (0, 1)])
    assert_one_errors_data_set(tmp_path, set(zip(decode.image_id, decode.stage)) | {("y", "manifest")})
    assert not (tmp_path / "errors" / "manifest").exists()


def near_tie(side: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Two members' maps (float32, one image) whose float64 mean vote has two pixels distinct in float64
    and equal in float32 (the foreground one above the background one before rounding)."""
    rng = np.random.default_rng(0)
    for _ in range(10_000):
        a, b = rng.random(side * side).astype(np.float32), rng.random(side * side).astype(np.float32)
        a[1], b[1] = a[0], np.nextafter(b[0], np.float32(2))
        vote = cm.vote(cm.normalise(np.stack([a, b])[:, None].astype(np.float64)), "mean")[0]
        if vote[0] != vote[1] and np.float32(vote[0]) == np.float32(vote[1]):
            return a, b
    raise AssertionError("no near tie found")


def test_stored_metrics_are_those_of_the_stored_values_on_a_near_tie(tmp_path):
    side = 4
    a, b = near_tie(side)
    mask = np.zeros((side, side), np.uint8)
    mask.flat[[1, 2, 3, 4, 5]] = 1  # pixel 1 (foreground) ties with pixel 0 (background) once rounded
    store = LocalStore(str(tmp_path))
    images = [ImageRef("x", "/nowhere/x.png", 0, "/nowhere/x-mask.png")]
    store.write_parquet(file_of("inputs", 0), encode_inputs(images, [mask], None))
    for model_id, m in (("a", a), ("b", b)):
        store.write_parquet(attributions_file(model_id, 0),
                            encode_attributions(images, np.zeros(1, np.int64), m.reshape(1, side, side), {},
                                                "float32"))
    reduce_shard(store, ReduceTask(0, Unit("consensus/shard=00000", "fp"), ["a", "b"], MethodSpec(), side, []))
    row = read_consensus(store, 0).iloc[0]
    stored = np.asarray(row["consensus"], np.float64)
    truth = np.asarray(row["mask"], np.uint8)
    assert stored[0] == stored[1] and truth[1] == 1 and truth[0] == 0  # the tie the stored values hold
    assert row["ap"] == pytest.approx(average_precision_score(truth, stored), rel=1e-12, abs=0)
    assert row["roc_auc"] == pytest.approx(roc_auc_score(truth, stored), rel=1e-12, abs=0)
    scores = read_scores(store, 0).set_index("model_id")
    for model_id, m in (("a", a), ("b", b)):
        norm = cm.normalise(m.astype(np.float64))
        assert scores.loc[model_id, "consensus_score"] == pytest.approx(cm.similarity(norm, stored), rel=1e-12)
        assert scores.loc[model_id, "ap"] == pytest.approx(average_precision_score(truth, norm), rel=1e-12)

