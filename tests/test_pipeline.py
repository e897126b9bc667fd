"""The whole local path on a real local Ray: attributions, reduce, tables, resume, growth."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from imagesets import make_image_folder, tiny_spec

from ray_consensus.runner import execute
from ray_consensus.runroot.record import UnitCounts
from ray_consensus.runroot.status import run_status
from ray_consensus.spec.config import parse_spec


def read_dir(path) -> pd.DataFrame:
    return pq.read_table(str(path)).to_pandas()


def recompute(root, model_ids):
    """Independent recomputation of DESIGN section 3 defaults from attributions/ alone."""
    attrs = read_dir(root / "attributions")
    out = {}
    for image_id, group in attrs.groupby("image_id"):
        group = group.set_index("model").loc[model_ids]
        maps = np.stack([np.asarray(a, dtype=np.float64) for a in group["attribution"]])
        maps = np.abs(maps)
        norms = np.linalg.norm(maps, axis=1, keepdims=True)
        maps = np.divide(maps, norms, out=np.zeros_like(maps), where=norms > 0)
        c = maps.mean(axis=0)
        cos = maps @ c / np.maximum(np.linalg.norm(maps, axis=1) * np.linalg.norm(c), 1e-300)
        out[image_id] = (c, dict(zip(model_ids, cos)))
    return out


@pytest.mark.slow
def test_end_to_end_resume_and_growth(tmp_path, ray_local):
    data = make_image_folder(tmp_path / "ds", n_classes=3, per_class=6)
    root = tmp_path / "run"
    spec = parse_spec(tiny_spec(data, str(root)))

    info = execute(spec, progress=False)
    assert info.status == "complete"
    assert info.counts.images == 18 and info.counts.shards == 3
    assert info.units_computed == UnitCounts(attributions=6, reduce=3)

    # Contract layout and the stored consensus/scores follow from the stored attributions.
    attrs = read_dir(root / "attributions")
    assert set(attrs.columns) >= {"image_id", "label", "pred", "correct", "height", "width", "attribution"}
    assert len(attrs) == 36 and not attrs.duplicated(["image_id", "model"]).any()
    assert all(len(a) == 16 * 16 for a in attrs["attribution"])
    consensus = read_dir(root / "consensus").set_index("image_id")
    scores = read_dir(root / "scores")
    expected = recompute(root, ["a", "b"])
    assert set(consensus.index) == set(expected)
    for image_id, (c, cos) in expected.items():
        np.testing.assert_allclose(np.asarray(consensus.loc[image_id, "consensus"]), c, atol=1e-4)
        assert consensus.loc[image_id, "n_models"] == 2
        for model_id, value in cos.items():
            stored = scores[(scores.image_id == image_id) & (scores.model_id == model_id)]["consensus_score"]
            assert abs(float(stored.iloc[0]) - value) < 1e-4

    models = pd.read_parquet(root / "tables" / "models.parquet").set_index("model_id")
    for model_id in ("a", "b"):
        own = attrs[attrs.model == model_id]
        assert models.loc[model_id, "accuracy"] == pytest.approx(own["correct"].mean())
        assert models.loc[model_id, "consensus_score"] == pytest.approx(
            np.mean([cos[model_id] for _, cos in expected.values()]), abs=1e-6)
    corr = pd.read_parquet(root / "tables" / "correlations.parquet")
    assert {"spearman", "pearson"} <= set(corr[(corr.x == "consensus_score") & (corr.y == "accuracy")]["method"])
    assert (root / "report" / "index.html").stat().st_size > 1000
    assert (root / "tables" / "models.csv").exists()

    # Unchanged rerun: nothing recomputed.
    info = execute(spec, progress=False)
    assert info.units_computed == UnitCounts(attributions=0, reduce=0)
    assert info.units_skipped.attributions == 6

    # Switching method options re-runs only the reducer, from the stored attributions.
    switched = parse_spec(tiny_spec(data, str(root), method={"voted": "all_correct", "similarity": "spearman"}))
    info = execute(switched, progress=False)
    assert info.units_computed == UnitCounts(attributions=0, reduce=3)
    assert info.spec.method.voted == "all_correct"
    consensus = read_dir(root / "consensus").set_index("image_id")
    all_correct = attrs.groupby("image_id")["correct"].all()
    assert (consensus["voted"] == all_correct.loc[consensus.index]).all()
    scores = read_dir(root / "scores")
    assert np.allclose(scores["consensus_score"], scores["spearman"], equal_nan=True)
    info = execute(spec, progress=False)  # back to the defaults: the reducer again, nothing else
    assert info.units_computed == UnitCounts(attributions=0, reduce=3)

    # A third member and 2 new images per class: only the new model's units and the new shard's units.
    make_image_folder(data, n_classes=3, per_class=2, start=6)
    grown = parse_spec(tiny_spec(data, str(root), models=("a=resnet10t@random", "b=mobilenetv3_small_050@random",
                                                          "c=resnet10t@random")))
    info = execute(grown, progress=False)
    # old shards 0-2 keep their ids; the 6 new images form shard 3 (size 8 -> one shard).
    assert info.counts.shards == 4
    assert info.units_computed.attributions == 3 + 3  # c on shards 0-2, then a, b, c on shard 3
    assert info.units_computed.reduce == 4
    manifest = pd.read_parquet(root / "manifest.parquet")
    assert sorted(manifest[manifest.image_id.str.endswith(("006", "007"))]["shard"].unique()) == [3]
    attrs = read_dir(root / "attributions")
    assert len(attrs) == 24 * 3 and not attrs.duplicated(["image_id", "model"]).any()

    st = run_status(str(root))
    assert st.models["c"].missing == [] and st.models["c"].done == [0, 1, 2, 3]
    assert st.reduced.missing == []


def test_float16_maps_are_stored_scaled_and_read_back():
    import pyarrow as pa

    from ray_consensus.runroot.contract import decode_maps, list_column

    maps = np.array([[1e-7, -3e-7, 0.0, 2e-7], [0.0, 0.0, 0.0, 0.0]])
    scale = np.array([3e-7, 1.0])  # max |m| per map; an all-zero map keeps scale 1
    table = pa.table({"attribution": list_column((maps / scale[:, None]).astype(np.float16)),
                      "attribution_scale": pa.array(scale.astype(np.float32))})
    back = decode_maps(table, 4)
    np.testing.assert_allclose(back, maps, rtol=1e-3, atol=0)
    assert float(np.float16(1e-7)) != 1e-7 and abs(float(np.float16(1e-7)) - 1e-7) > 1e-9  # why the scale


@pytest.mark.slow
def test_lime_run_votes_on_the_superpixels_every_member_shares(tmp_path, ray_local):
    """LIME through the whole pipeline: the decode stage segments each image once with the spec's
    settings, every member's weights index exactly those superpixels, and the consensus is the mean
    of the members' L2-normalised |weights| painted back onto them."""
    from pathlib import Path

    from ray_consensus.attribution.decode_stage import on_grid
    from ray_consensus.dataset.decode import decode_image
    from ray_consensus.dataset.superpixels import segment
    from ray_consensus.spec.explainer_params import LimeParams

    data = make_image_folder(tmp_path / "ds", n_classes=2, per_class=4, size=(48, 48))
    spec = parse_spec(tiny_spec(data, str(tmp_path / "run"), run={"shard_size": 4},
                                explainer={"name": "lime", "params": {"n_samples": 40, "n_segments": 6}}))
    execute(spec, progress=False)
    root = tmp_path / "run"
    inputs = read_dir(root / "inputs").set_index("image_id")
    manifest = read_dir(root / "manifest.parquet").set_index("image_id")
    attrs = read_dir(root / "attributions")
    consensus = read_dir(root / "consensus").set_index("image_id")
    compactness = LimeParams().compactness
    assert len(inputs) == 8 and len(attrs) == 16
    for image_id, group in attrs.groupby("image_id"):
        rgb = decode_image(Path(manifest.loc[image_id, "uri"]).read_bytes(), spec.run.image_size)
        full = segment(rgb, "slic", n_segments=6, compactness=compactness, seed=0)
        grid = np.asarray(inputs.loc[image_id, "superpixels"])
        np.testing.assert_array_equal(grid, on_grid(full, spec.run.map_size).ravel())
        weights = np.stack([np.asarray(w, dtype=np.float64) for w in group["superpixel_weights"]])
        assert weights.shape == (2, full.max() + 1)  # both members, one weight per superpixel
        norm = np.abs(weights) / np.linalg.norm(weights, axis=1, keepdims=True)
        np.testing.assert_allclose(consensus.loc[image_id, "consensus"], norm.mean(axis=0)[grid], atol=1e-6)


@pytest.mark.parametrize("method", [{}, {"voted": "all_correct", "leave_one_out": True, "vote": "median",
                                         "similarity": "spearman"}])
def test_subcommittee_sums_equal_each_subcommittee_voted_alone(method):
    from dataclasses import replace

    from ray_consensus.planning.plan import subcommittees
    from ray_consensus.results.reduce import ShardMaps, subcommittee_sums, vote_shard
    from ray_consensus.spec.config import MethodSpec

    rng = np.random.default_rng(0)
    k, n, p = 6, 10, 64
    shard = ShardMaps([str(i) for i in range(n)], np.zeros(n, int), np.zeros((k, n), int), rng.random((k, n)) < 0.7,
                      rng.random((k, n, p)) - 0.3, None, None, None, np.zeros(n, bool), 8)
    m = MethodSpec(**method)
    subsets = subcommittees(k, [3, 5], 3, 0)
    rows = subcommittee_sums(shard, m, [str(i) for i in range(k)], subsets)
    expected = []
    for _, _, members in subsets:
        alone = vote_shard(replace(shard, preds=shard.preds[members], correct=shard.correct[members],
                                   maps=shard.maps[members]), m, (m.similarity,))
        expected += list(np.where(alone.voted, alone.scores[m.similarity], 0.0).sum(axis=1))
    np.testing.assert_allclose([r["score_sum"] for r in rows], expected, rtol=1e-12)
