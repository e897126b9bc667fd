"""A member with NaN or inf weights is left out of the vote (its maps recorded in errors/, visible in the
tables and the report), and shards or runs without a usable image complete with empty, well-typed
outputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from imagesets import make_image_folder, tiny_spec

from ray_consensus.runner import execute
from ray_consensus.spec.config import parse_spec

PER_SHARD = ("consensus", "scores", "aggregates", "subcommittees")  # and tables/images
GOOD = {f"c{c}/img{i:03d}" for c in range(2) for i in range(4)}


def read(root, kind: str) -> pd.DataFrame:
    return pq.read_table(str(root / kind)).to_pandas()


@pytest.fixture(scope="module")
def runs(broken_member_runs):
    """conftest's run root: a, b; then a, b and the broken copies n (NaN) and i (inf) of a."""
    r = broken_member_runs
    return r["root"], r["healthy"], r["before"], r["broken"]


@pytest.mark.slow
def test_a_member_with_nan_or_inf_weights_is_left_out_of_the_vote(runs):
    root, healthy, before, info = runs
    assert info.status == "complete"
    assert info.units_computed.attributions == 2 * 2  # the broken members only, both shards
    scores = read(root, "scores").set_index(["model_id", "image_id"]).sort_index()
    old = before["scores"].set_index(["model_id", "image_id"]).sort_index()
    measures = ["consensus_score", "cosine", "pearson", "spearman", "topk_iou", "ap", "roc_auc", "pointing_game"]
    # the healthy members' scores are those of the run without the broken ones
    pd.testing.assert_frame_equal(scores.loc[["a", "b"], measures], old[measures], check_exact=False, rtol=1e-9,
                                  atol=1e-12)
    assert scores.loc[["a", "b"], "consensus_score"].notna().all()
    for broken in ("n", "i"):
        assert scores.loc[broken, measures].isna().all().all(), broken
        maps = read(root, "attributions").query("model == @broken")["attribution"]
        assert len(maps) == 8 and all(np.isnan(np.asarray(m, float)).all() for m in maps)  # stored all NaN
    assert scores.loc["n", "pred"].isna().all()  # no prediction from NaN logits (not argmax = 0)
    consensus = read(root, "consensus").set_index("image_id").sort_index()
    was = before["consensus"].set_index("image_id").sort_index()
    assert (consensus["n_models"] == 2).all() and len(consensus) == 8
    np.testing.assert_allclose(np.stack(consensus["consensus"]), np.stack(was["consensus"]), rtol=1e-9, atol=0)
    np.testing.assert_allclose(consensus["ap"], was["ap"], rtol=1e-9)
    assert consensus["ap"].notna().all()


@pytest.mark.slow
def test_non_finite_maps_are_recorded_and_shown(runs):
    root, healthy, before, info = runs
    errors = read(root, "errors")
    attribution = errors[errors.stage == "attribution"]
    for broken in ("n", "i"):
        rows = attribution[attribution.reason.str.startswith(f"member {broken}:")]
        assert set(rows.image_id) == GOOD and len(rows) == 8, broken
        assert rows.reason.str.contains("non-finite (?:logits|attribution map)").all()
        assert rows.uri.str.endswith(".png").all()
    assert attribution.reason.str.startswith("member n: non-finite logits").sum() == 8
    assert len(attribution) == 16
    assert info.counts.errors == 16 + 1 + 1 == len(errors)  # and the truncated PNG, the label out of range
    models = pd.read_parquet(root / "tables" / "models.parquet").set_index("model_id")
    assert models.loc[["a", "b"], "n_nonfinite"].tolist() == [0, 0]
    assert models.loc[["n", "i"], "n_nonfinite"].tolist() == [8, 8]
    assert models.loc[["n", "i"], ["consensus_score", "ap"]].isna().all().all()
    assert np.isnan(models.loc["n", "accuracy"])  # not 0.5: argmax of NaN logits is no prediction
    assert models.loc[["n", "i"], "n_voted"].tolist() == [0, 0]
    assert models.loc["consensus", "arch"] == "vote of 2 models"
    old = before["models"].set_index("model_id")
    same = (["a", "b", "consensus"], ["accuracy", "consensus_score", "ap"])
    np.testing.assert_allclose(models.loc[same].to_numpy(float), old.loc[same].to_numpy(float), rtol=1e-9)
    images = read(root, "tables/images")
    assert set(images.members[images.image_id.isin(GOOD)]) == {2}
    html = (root / "report" / "index.html").read_text()
    assert 'id="nonfinite-note"' in html
    note = html.split('id="nonfinite-note"')[1].split("</p>")[0]
    assert "n: every map" in note and "i: every map" in note and "a:" not in note and "b:" not in note


def schema_of(root, kind: str, shard: int):
    return pq.read_schema(str(root / kind / f"shard={shard:05d}" / "part-0.parquet")).remove_metadata()


@pytest.mark.slow
def test_a_shard_whose_images_all_fail_to_decode_reduces_to_empty_tables(runs):
    root, healthy, before, info = runs
    assert healthy.status == "complete" and healthy.counts.shards == 2
    assert healthy.units_computed.reduce == 2 and info.units_computed.reduce == 2  # and again
    for kind in PER_SHARD + ("tables/images",):
        table = pq.read_table(str(root / kind / "shard=00001" / "part-0.parquet"))
        if kind == "subcommittees":  # a row per (sub-committee, member), over no image
            assert table.num_rows > 0 and set(table.column("n_voted").to_pylist()) == {0}
        else:
            assert table.num_rows == 0, kind
        assert schema_of(root, kind, 1) == schema_of(root, kind, 0), kind
    errors = read(root, "errors")
    assert errors[errors.stage == "decode"].image_id.tolist() == ["c1/zz-truncated"]


@pytest.mark.slow
def test_a_run_whose_every_manifest_row_is_rejected_completes_empty(tmp_path):
    data = make_image_folder(tmp_path / "ds", n_classes=2, per_class=2, masks=False)
    rows = [{"uri": str(p), "label": 5} for p in sorted((data / "images").rglob("*.png"))]
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    spec = tiny_spec(data, str(tmp_path / "run"))
    spec["dataset"] = {"path": str(tmp_path / "manifest.csv"), "num_classes": 2}
    for _ in range(2):  # and its rerun
        info = execute(parse_spec(spec), progress=False)
        assert info.status == "complete"
        assert info.counts.images == 0 and info.counts.errors == 4
    models = pd.read_parquet(tmp_path / "run" / "tables" / "models.parquet")
    assert models["model_id"].tolist() == ["a", "b"] and models["n_images"].tolist() == [0, 0]
    assert models["accuracy"].isna().all() and models["n_images"].dtype == np.int64
    correlations = pd.read_parquet(tmp_path / "run" / "tables" / "correlations.parquet")
    assert correlations["coefficient"].isna().all() and (correlations["n"] == 0).all()
    robustness = pq.read_table(tmp_path / "run" / "tables" / "robustness.parquet")
    assert robustness.num_rows == 0 and [robustness.schema.field(c).type for c in ("k", "coefficient", "n")] == [
        pa.int64(), pa.float64(), pa.int64()]
    errors = pd.read_parquet(tmp_path / "run" / "errors")
    assert len(errors) == 4 and set(errors.stage) == {"manifest"}
    assert (tmp_path / "run" / "report" / "index.html").exists()


def test_each_image_is_voted_on_by_its_members_with_a_finite_map():
    """A member whose map of one image is not finite: that image is the vote of the others (as if the member
    were not in the committee), its other images keep the whole committee."""
    from ray_consensus.results.reduce import ShardMaps, image_rows, vote_shard
    from ray_consensus.spec.config import MethodSpec

    rng = np.random.default_rng(0)
    k, n, p = 3, 4, 16
    maps = rng.random((k, n, p)) - 0.3
    maps[2, 0] = np.nan
    preds = np.zeros((k, n), np.int64)
    preds[2, 0] = -1
    shard = ShardMaps([str(i) for i in range(n)], np.zeros(n, np.int64), preds, preds == 0, maps, None, None, None,
                      np.zeros(n, bool), 4)
    for method in (MethodSpec(), MethodSpec(leave_one_out=True, vote="median", voted="all_correct")):
        v = vote_shard(shard, method)
        alone = vote_shard(ShardMaps(["0"], np.zeros(1, np.int64), preds[:2, :1], preds[:2, :1] == 0, maps[:2, :1],
                                     None, None, None, np.zeros(1, bool), 4), method)
        whole = vote_shard(ShardMaps(shard.image_ids[1:], shard.labels[1:], preds[:, 1:], preds[:, 1:] == 0,
                                     maps[:, 1:], None, None, None, np.zeros(n - 1, bool), 4), method)
        np.testing.assert_array_equal(v.consensus_map[0], alone.consensus_map[0])
        np.testing.assert_array_equal(v.consensus_map[1:], whole.consensus_map)
        for measure, score in v.scores.items():
            assert np.isnan(score[2, 0]), measure
            np.testing.assert_array_equal(score[:2, 0], alone.scores[measure][:, 0])
            np.testing.assert_array_equal(score[:, 1:], whole.scores[measure])
        assert v.voted.all()
    rows = image_rows(shard.image_ids, shard.labels, preds, preds == 0, v.voted, v.scores["cosine"], None, v.finite)
    assert rows.members.tolist() == [2, 3, 3, 3] and rows.members_correct.tolist() == [2, 3, 3, 3]
    assert rows.majority_votes.tolist() == [2, 3, 3, 3]
