"""The reducer for one shard: load its stored units, vote, score, align, aggregate, write its reduce unit.

    ReduceTask ─► load_shard (contract decoders) ─► ShardMaps ─► vote_shard, alignment_metrics
        (consensus.py math) ─► ShardVote ─► shard_aggregates, image_rows ─► ShardAggregates, ImageRows
        ─► write (the contract's encoders) ─► ReduceResult

Reads only stored units (the shard's inputs and each member's attributions), so switching a
method option re-runs this step alone. A member's map of an image that is not finite (stored all NaN
by the slot: its logits or its map held NaN or inf) is left out of that image's vote and recorded in
the shard's errors; each image is voted on by its members with a finite map. Every stored metric is
computed from the values as stored (the consensus rounded to its stored float32). Besides the
per-image consensus and scores, it writes the shard's aggregates: per member and block of images,
the sums and counts the run-level tables are computed from (so the tables never read a row per
image), and the shard's rows of tables/images. The math is in `consensus.py`, the records in
`shard_records.py`, the columns in `contract.py`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ray_consensus.results import consensus as cm
from ray_consensus.runroot.contract import (
    CONSENSUS_ID,
    ImageRef,
    as_stored,
    encode_aggregates,
    encode_consensus,
    encode_images,
    encode_scores,
    encode_subcommittees,
    errors_table,
    file_of,
    member_errors_file,
    read_attributions,
    read_inputs,
)
from ray_consensus.runroot.shard_records import ImageRows, ShardAggregates, ShardMaps, ShardVote
from ray_consensus.runroot.units import IMAGES, Unit
from ray_consensus.spec.config import MethodSpec
from ray_consensus.storage.store import Store


def load_shard(store: Store, shard: int, model_ids: list[str], map_size: int, with_masks: bool = False) -> ShardMaps:
    """`with_masks`: the data set has masks, so the shard gets mask columns even when none of its masks
    decoded (an empty shard's tables have the columns of every other shard)."""
    inputs = read_inputs(store, shard)
    members = read_attributions(store, model_ids, shard, map_size * map_size)
    for model_id, a in zip(model_ids, members):
        if a.image_ids != inputs.image_ids:  # same decode, same order: anything else is a bug
            raise RuntimeError(f"shard {shard}: attributions of {model_id} do not cover the shard's inputs")
    weights = None
    if members[0].superpixel_weights is not None:
        width = max(a.superpixel_weights.shape[1] for a in members)
        weights = np.stack([np.pad(a.superpixel_weights, ((0, 0), (0, width - a.superpixel_weights.shape[1])))
                            for a in members])
    masks = inputs.masks
    if masks is None and with_masks:
        masks = np.zeros((len(inputs.image_ids), map_size * map_size), np.uint8)
    return ShardMaps(inputs.image_ids, inputs.labels, np.stack([a.preds for a in members]),
                     np.stack([a.correct for a in members]), np.stack([a.maps for a in members]), weights,
                     inputs.superpixels, masks, inputs.has_mask, map_size)

def paint(weights: np.ndarray, superpixels: np.ndarray) -> np.ndarray:
    """Superpixel weights (..., N, J) onto the map grid through ids (N, P) -> (..., N, P)."""
    filled = np.nan_to_num(weights)
    idx = np.broadcast_to(superpixels, filled.shape[:-1] + superpixels.shape[-1:])
    return np.take_along_axis(filled, idx, axis=-1)

def voted_images(correct: np.ndarray, finite: np.ndarray, method: MethodSpec) -> np.ndarray:
    """(K, N) correctness and finite maps -> (N,) bool: the images voted on (by their members with a
    finite map; an image without one is not voted on)."""
    voted = finite.any(axis=0)
    if method.voted == "all_correct":
        return voted & (correct | ~finite).all(axis=0)
    return voted

def committee_groups(finite: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(K, N) finite maps -> (members, images) index arrays, one per distinct set of members with a finite
    map: the images of a group are voted on by those members alone (one group when every map is finite)."""
    if not finite.size:
        return []
    if finite.all():
        return [(np.arange(finite.shape[0]), np.arange(finite.shape[1]))]
    keys, inverse = np.unique(finite.T, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    return [(np.flatnonzero(key), np.flatnonzero(inverse == j)) for j, key in enumerate(keys) if key.any()]

def committee_vote(norm: np.ndarray, finite: np.ndarray, method: MethodSpec,
                   measures: tuple[str, ...]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """norm (K, N, V) normalised vectors, finite (K, N) -> the consensus (N, V) as stored (NaN: no member
    with a finite map) and measure -> (K, N) similarity to it (NaN: not in the image's vote; with
    leave_one_out also where the image has a single member)."""
    k, n, width = norm.shape
    consensus = np.full((n, width), np.nan)
    scores = {m: np.full((k, n), np.nan) for m in measures}
    for members, images in committee_groups(finite):
        whole = len(members) == k and len(images) == n
        sub = norm if whole else norm[np.ix_(members, images)]
        voted = as_stored(cm.vote(sub, method.vote))
        consensus[images] = voted
        if method.leave_one_out and len(members) < 2:
            continue
        reference = cm.leave_one_out_votes(sub, method.vote) if method.leave_one_out else voted[None]
        for m in measures:
            scores[m][np.ix_(members, images)] = cm.similarity(sub, reference, m)
    return consensus, scores

def normalised_vectors(s: ShardMaps, method: MethodSpec) -> np.ndarray:
    """The vectors the vote is on (LIME: superpixel weights), normalised; 0 where the map is not finite."""
    vectors, finite = (s.weights if s.weights is not None else s.maps), s.finite
    if not finite.all():
        vectors = np.where(finite[..., None], vectors, 0.0)
    return cm.normalise(vectors, method.normalise)

def vote_shard(s: ShardMaps, method: MethodSpec, measures: tuple[str, ...] = cm.SIMILARITIES) -> ShardVote:
    """The consensus of one shard. LIME votes on superpixel weights, then paints the result."""
    finite = s.finite
    norm = normalised_vectors(s, method)
    consensus, scores = committee_vote(norm, finite, method, measures)
    if s.weights is not None:
        norm, consensus = paint(norm, s.superpixels), paint(consensus, s.superpixels)
        consensus[~finite.any(axis=0)] = np.nan
    return ShardVote(consensus, norm, scores, voted_images(s.correct, finite, method), finite)

def alignment_metrics(maps: np.ndarray, masks: np.ndarray, has_mask: np.ndarray) -> dict[str, np.ndarray]:
    """maps (..., N, P) against masks (N, P) -> metric -> (..., N), NaN for images without a mask."""
    out = {}
    for metric in cm.ALIGNMENTS:
        values = cm.alignment(maps, np.broadcast_to(masks, maps.shape), metric)
        out[metric] = np.where(has_mask, values, np.nan)
    return out

def subcommittee_sums(s: ShardMaps, method: MethodSpec, model_ids: list[str],
                      subsets: list[tuple[int, int, np.ndarray]]) -> list[dict]:
    """Per random sub-committee: each member's summed consensus score over the shard's voted images.

    The members' vectors are normalised once (normalisation is per member); each sub-committee then
    votes and scores on its rows, as `vote_shard` would on a shard of its members alone. n_voted: the
    member's voted images with a defined score (those its score_sum is over).
    """
    norm, finite = normalised_vectors(s, method), s.finite
    rows = []
    for k, trial, members in subsets:
        _, scores = committee_vote(norm[members], finite[members], method, (method.similarity,))
        score = scores[method.similarity]
        counted = voted_images(s.correct[members], finite[members], method) & np.isfinite(score)
        score = np.where(counted, score, 0.0)
        for j, m in enumerate(members):
            rows.append({"k": k, "trial": trial, "model_id": model_ids[m], "score_sum": float(score[j].sum()),
                         "n_voted": int(counted[j].sum())})
    return rows


# Images of a shard are dealt into this many blocks (by position), the units the run-level image
# bootstrap resamples: one image per block for shards of up to 16 images (the ordinary bootstrap).
BLOCKS_PER_SHARD = 16


def _block_sums(values: np.ndarray, counted: np.ndarray, blocks: np.ndarray, n_blocks: int) -> tuple:
    """(..., N) values and bool `counted` -> per block (..., n_blocks): sum of counted values, their count."""
    rows = int(np.prod(values.shape[:-1]))  # not -1: a shard without images has N = 0
    v = np.where(counted, values, 0.0).reshape(rows, values.shape[-1])
    c = np.broadcast_to(counted, values.shape).reshape(rows, values.shape[-1]).astype(np.float64)
    # float even for N = 0 (bincount of no weights is int)
    sums = np.stack([np.bincount(blocks, weights=row, minlength=n_blocks) for row in v]).astype(np.float64)
    counts = np.stack([np.bincount(blocks, weights=row, minlength=n_blocks) for row in c]).astype(np.float64)
    return sums.reshape(values.shape[:-1] + (n_blocks,)), counts.reshape(values.shape[:-1] + (n_blocks,))


def shard_aggregates(model_ids: list[str], correct: np.ndarray, voted: np.ndarray, score: np.ndarray,
                     align_m: dict[str, np.ndarray] | None, align_c: dict[str, np.ndarray] | None,
                     finite: np.ndarray | None = None, predicted: np.ndarray | None = None) -> ShardAggregates:
    """The shard's aggregates: one row per (member, block), then per block a `consensus` row.

    correct (K, N) bool; voted (N,) bool; score (K, N) the consensus score (NaN: undefined);
    align_m metric -> (K, N) and align_c metric -> (N,) alignment (NaN: no mask or undefined);
    finite (K, N): the member's map is finite, predicted (K, N): its logits were (default: all).
    Per row: n_images, n_predicted (finite logits: accuracy is n_correct / n_predicted), n_correct,
    n_nonfinite (maps left out of the vote; the consensus row: images no member had a finite map of),
    n_voted (voted images the member's map is in), score_sum / score_n (voted images with a defined
    score), and per metric <metric>_sum / <metric>_n (voted images with a defined value).
    """
    k, n = correct.shape
    finite = np.ones((k, n), bool) if finite is None else finite
    predicted = np.ones((k, n), bool) if predicted is None else predicted
    n_blocks = min(BLOCKS_PER_SHARD, n)
    blocks = np.arange(n) % max(n_blocks, 1)
    none = np.zeros((1, n), bool)

    def count(counted: np.ndarray) -> np.ndarray:
        return _block_sums(np.zeros((k + 1, n)), counted, blocks, n_blocks)[1].ravel().astype(np.int64)

    def sum_and_count(values: np.ndarray, counted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sums, counts = _block_sums(values, counted, blocks, n_blocks)
        return sums.ravel(), counts.ravel().astype(np.int64)

    score_sum, score_n = sum_and_count(np.vstack([score, np.full((1, n), np.nan)]),
                                       np.vstack([np.isfinite(score), none]) & voted)
    metrics = {}
    for metric in (align_m or {}):
        values = np.vstack([align_m[metric], align_c[metric][None]])
        metrics[metric] = sum_and_count(values, np.isfinite(values) & voted)
    return ShardAggregates(
        model_id=np.repeat(np.array(model_ids + [CONSENSUS_ID], dtype=object), n_blocks),
        block=np.tile(np.arange(n_blocks, dtype=np.int64), k + 1),
        n_images=count(np.ones((k + 1, n), bool)), n_predicted=count(np.vstack([predicted, none])),
        n_correct=count(np.vstack([correct, none])), n_nonfinite=count(np.vstack([~finite, ~finite.any(axis=0)[None]])),
        n_voted=count(np.vstack([finite, np.ones((1, n), bool)]) & voted),
        score_sum=score_sum, score_n=score_n, metrics=metrics)


def image_rows(image_ids: list[str], labels: np.ndarray, preds: np.ndarray, correct: np.ndarray, voted: np.ndarray,
               score: np.ndarray, align_c: dict[str, np.ndarray] | None, finite: np.ndarray | None = None) -> ImageRows:
    """The shard's rows of tables/images: per image how far the committee agrees with itself.

    preds, correct, score, finite: (K, N); the image's committee is its members with a finite map
    (`members`). mean/min_consensus_score over members with a defined score (low: the members' maps
    disagree); majority_pred and its votes over their predictions (a majority that is not the label
    points at label noise; -1 with 0 votes: no prediction); the consensus map's alignment with the mask.
    """
    k, n = preds.shape
    finite = np.ones((k, n), bool) if finite is None else finite
    counted = finite & (preds >= 0)
    if n:
        width = max(int(preds.max()) + 1, 1)
        counts = np.stack([np.bincount(col[ok], minlength=width) for col, ok in zip(preds.T, counted.T)])
        votes = counts.max(axis=1)
        majority = np.where(votes > 0, counts.argmax(axis=1), -1)
    else:
        majority = votes = np.zeros(0, np.int64)
    with np.errstate(invalid="ignore"):
        defined = np.isfinite(score)
        mean = np.where(defined.any(axis=0), np.nansum(score, axis=0) / np.maximum(defined.sum(axis=0), 1), np.nan)
        low = np.where(defined.any(axis=0), np.where(defined, score, np.inf).min(axis=0), np.nan)
    return ImageRows(list(image_ids), labels, voted, members=finite.sum(axis=0).astype(np.int64),
                     members_correct=(correct & finite).sum(axis=0).astype(np.int64),
                     majority_pred=majority.astype(np.int64), majority_votes=votes.astype(np.int64),
                     mean_consensus_score=mean, min_consensus_score=low, alignment=dict(align_c or {}))


def nonfinite_errors(s: ShardMaps, model_ids: list[str], uris: dict[str, str]) -> list[dict]:
    """Rows of errors/ for the (member, image) pairs left out of the vote: their logits or map not finite."""
    rows = []
    for k, i in zip(*np.nonzero(~s.finite)):
        what = "logits (its map is not used)" if s.preds[k, i] < 0 else "attribution map"
        rows.append({"image_id": s.image_ids[i], "uri": uris.get(s.image_ids[i], ""), "stage": "attribution",
                     "reason": f"member {model_ids[k]}: non-finite {what} (NaN or inf); left out of the vote"})
    return rows


@dataclass
class ReduceTask:
    """One shard's reduction, as the runner hands it to a Ray task (pickled whole)."""

    shard: int
    unit: Unit                             # the reduce unit to write (its fingerprint, the marker it had)
    model_ids: list[str]                   # the committee, in order
    method: MethodSpec
    map_size: int
    subsets: list[tuple[int, int, np.ndarray]]  # the robustness sub-committees (k, trial, member indices)
    images: list[ImageRef] | None = None   # the shard's manifest rows: the URIs in errors/, and mask columns
                                           # even where none of its masks decoded (None: URIs left empty,
                                           # mask columns as decoded)


@dataclass
class ReduceResult:
    """What a shard's reduction reports back to the runner."""

    shard: int
    n_images: int
    n_voted: int
    seconds: float  # reading, math and writing


def reduce_shard(store: Store, task: ReduceTask) -> ReduceResult:
    """Reduce one shard and write its reduce unit (consensus/, scores/, subcommittees/, aggregates/,
    tables/images/, and in errors/ its members' non-finite maps)."""
    t0 = time.perf_counter()
    shard, model_ids, method, images = task.shard, task.model_ids, task.method, task.images or []
    s = load_shard(store, shard, model_ids, task.map_size, with_masks=any(i.mask_uri is not None for i in images))
    v = vote_shard(s, method)
    align_c = align_m = None
    if s.masks is not None:
        # of the values as stored: the consensus column (float32) and the members' stored maps, normalised
        align_c = alignment_metrics(np.nan_to_num(v.consensus_map), s.masks, s.has_mask & v.finite.any(axis=0))
        align_m = {m: np.where(v.finite, values, np.nan)
                   for m, values in alignment_metrics(v.normalised_maps, s.masks, s.has_mask).items()}
    score = v.scores[method.similarity]
    uris = {i.image_id: i.uri for i in images}
    task.unit.write(store, {
        file_of("consensus", shard): encode_consensus(s, v, align_c),
        file_of("scores", shard): encode_scores(s, v, model_ids, method.similarity, align_m),
        file_of("subcommittees", shard): encode_subcommittees(subcommittee_sums(s, method, model_ids, task.subsets)),
        file_of("aggregates", shard): encode_aggregates(shard_aggregates(model_ids, s.correct, v.voted, score,
                                                                         align_m, align_c, v.finite, s.preds >= 0)),
        file_of(IMAGES, shard): encode_images(image_rows(s.image_ids, s.labels, s.preds, s.correct, v.voted, score,
                                                         align_c, v.finite)),
        member_errors_file(shard): errors_table(nonfinite_errors(s, model_ids, uris)),
    })
    return ReduceResult(shard, len(s.image_ids), int(v.voted.sum()), time.perf_counter() - t0)
