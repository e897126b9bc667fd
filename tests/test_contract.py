"""The reduce unit's tables as the contract encodes them: aggregates/ and tables/images/ have exactly their
schema (`contract.aggregates_schema`, `images_schema`), with masks and without, with images and without."""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow.parquet as pq
import pytest

from ray_consensus.results import consensus as cm
from ray_consensus.results.reduce import ReduceTask, image_rows, reduce_shard, shard_aggregates
from ray_consensus.runroot.contract import (
    ImageRef,
    aggregates_schema,
    attributions_file,
    encode_aggregates,
    encode_attributions,
    encode_images,
    encode_inputs,
    file_of,
    images_schema,
)
from ray_consensus.runroot.units import IMAGES, Unit
from ray_consensus.spec.config import MethodSpec
from ray_consensus.storage.store import LocalStore

SIDE = 4


def test_the_schemas_name_every_column_in_the_stored_order():
    assert aggregates_schema().names == ["model_id", "block", "n_images", "n_predicted", "n_correct", "n_nonfinite",
                                         "n_voted", "score_sum", "score_n"]
    assert aggregates_schema(["ap"]).names[-2:] == ["ap_sum", "ap_n"]
    assert images_schema().names == ["image_id", "label", "voted", "members", "members_correct", "majority_pred",
                                     "majority_votes", "mean_consensus_score", "min_consensus_score"]
    assert images_schema(["ap", "roc_auc"]).names[-2:] == ["consensus_ap", "consensus_roc_auc"]


def test_two_members_two_images_aggregate_by_hand():
    """Member a right on both images, b on the first; b's map of image 1 not finite (out of its vote)."""
    correct = np.array([[True, True], [True, False]])
    finite = np.array([[True, True], [True, False]])
    score = np.array([[0.5, 0.25], [1.0, np.nan]])
    a = shard_aggregates(["a", "b"], correct, np.array([True, True]), score, None, None, finite)
    t = encode_aggregates(a).to_pydict()
    assert t["model_id"] == ["a", "a", "b", "b", "consensus", "consensus"] and t["block"] == [0, 1] * 3
    assert t["n_correct"] == [1, 1, 1, 0, 0, 0] and t["n_nonfinite"] == [0, 0, 0, 1, 0, 0]
    assert t["score_sum"] == [0.5, 0.25, 1.0, 0.0, 0.0, 0.0] and t["score_n"] == [1, 1, 1, 0, 0, 0]
    rows = encode_images(image_rows(["x", "y"], np.array([0, 1]), np.array([[0, 1], [0, 0]]), correct,
                                    np.array([True, True]), score, None, finite)).to_pydict()
    assert rows["members"] == [2, 1] and rows["mean_consensus_score"] == [0.75, 0.25]
    assert rows["majority_pred"] == [0, 1] and rows["majority_votes"] == [2, 1]


def reduce_a_shard(root, n: int, masks: bool) -> None:
    """A shard of 3 images of which n decoded, two members, reduced (masks: the data set has masks, image 0's
    decoded)."""
    store = LocalStore(str(root))
    rng = np.random.default_rng(n)
    images = [ImageRef(f"i{j}", f"/x/i{j}.png", j % 2, "/x/m.png" if masks else None) for j in range(3)]
    decoded = [(rng.random((SIDE, SIDE)) > 0.5).astype(np.uint8) if masks and j == 0 else None for j in range(n)]
    store.write_parquet(file_of("inputs", 0), encode_inputs(images[:n], decoded, None))
    for model_id in ("a", "b"):
        store.write_parquet(attributions_file(model_id, 0), encode_attributions(
            images[:n], rng.integers(0, 2, n), rng.random((n, SIDE, SIDE)).astype(np.float32), {}, "float32"))
    task = ReduceTask(0, Unit("consensus/shard=00000", "fp"), ["a", "b"], MethodSpec(), SIDE, [], images)
    result = reduce_shard(store, pickle.loads(pickle.dumps(task)))  # as Ray hands it over
    assert (result.shard, result.n_images) == (0, n) and result.seconds > 0


@pytest.mark.parametrize("n", [3, 0], ids=["images", "no image decoded"])
@pytest.mark.parametrize("masks", [True, False], ids=["masks", "no masks"])
def test_a_reduced_shards_aggregates_and_images_have_exactly_their_schema(tmp_path, n, masks):
    reduce_a_shard(tmp_path, n, masks)
    metrics = list(cm.ALIGNMENTS) if masks else []
    for rel, schema in ((file_of("aggregates", 0), aggregates_schema(metrics)),
                        (file_of(IMAGES, 0), images_schema(metrics))):
        stored = pq.read_schema(tmp_path / rel).remove_metadata()
        assert stored.equals(schema), f"{rel}: {stored} != {schema}"
        assert pq.read_table(tmp_path / rel).num_rows == (n if rel.startswith(IMAGES) else 3 * min(n, 16))
