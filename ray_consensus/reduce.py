"""The reducer for one shard: load its stored units, vote, score, align, aggregate, write its reduce unit.

    load_shard (contract decoders) ─► vote_shard, alignment_metrics (consensus.py math)
        ─► shard_aggregates, image_rows ─► write (encoders)

Reads only stored units (the shard's inputs and each member's attributions), so switching a
method option re-runs this step alone. Besides the per-image consensus and scores, it writes the
shard's aggregates: per member and block of images, the sums and counts the run-level tables
are computed from (so the tables never read a row per image), and the shard's rows of
tables/images. The math is in `consensus.py`, the columns in `contract.py`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ray_consensus import consensus as cm
from ray_consensus.config import MethodSpec
from ray_consensus.contract import (CONSENSUS_ID, encode_aggregates, encode_consensus, encode_images, encode_scores,
                                    encode_subcommittees, file_of, images_file, read_attributions, read_inputs)
from ray_consensus.units import Unit
from ray_consensus.storage import Store

@dataclass
class ShardMaps:
    """Everything the vote needs for one shard, aligned on the same images."""

    image_ids: list[str]
    labels: np.ndarray        # (N,) int64
    preds: np.ndarray         # (K, N) int64
    correct: np.ndarray       # (K, N) bool
    maps: np.ndarray          # (K, N, P) float64 attribution maps as computed (P = M*M)
    weights: np.ndarray | None  # (K, N, J) superpixel weights (LIME), 0 beyond an image's superpixels, else None
    superpixels: np.ndarray | None  # (N, P) int superpixel ids on the map grid
    masks: np.ndarray | None  # (N, P) uint8, rows of images without a mask are all 0
    has_mask: np.ndarray      # (N,) bool
    map_size: int

def load_shard(store: Store, shard: int, model_ids: list[str], map_size: int) -> ShardMaps:
    inputs = read_inputs(store, shard)
    members = [read_attributions(store, m, shard, map_size * map_size) for m in model_ids]
    for model_id, a in zip(model_ids, members):
        if a.image_ids != inputs.image_ids:  # same decode, same order: anything else is a bug
            raise RuntimeError(f"shard {shard}: attributions of {model_id} do not cover the shard's inputs")
    weights = None
    if members[0].superpixel_weights is not None:
        width = max(a.superpixel_weights.shape[1] for a in members)
        weights = np.stack([np.pad(a.superpixel_weights, ((0, 0), (0, width - a.superpixel_weights.shape[1])))
                            for a in members])
    return ShardMaps(inputs.image_ids, inputs.labels, np.stack([a.preds for a in members]),
                     np.stack([a.correct for a in members]), np.stack([a.maps for a in members]), weights,
                     inputs.superpixels, inputs.masks, inputs.has_mask, map_size)

def paint(weights: np.ndarray, superpixels: np.ndarray) -> np.ndarray:
    """Superpixel weights (..., N, J) onto the map grid through ids (N, P) -> (..., N, P)."""
    filled = np.nan_to_num(weights)
    idx = np.broadcast_to(superpixels, filled.shape[:-1] + superpixels.shape[-1:])
    return np.take_along_axis(filled, idx, axis=-1)

def voted_images(correct: np.ndarray, method: MethodSpec) -> np.ndarray:
    """(K, N) correctness -> (N,) bool: the images voted on."""
    if method.voted == "all_correct":
        return correct.all(axis=0)
    return np.ones(correct.shape[1], dtype=bool)

@dataclass
class ShardVote:
    consensus_map: np.ndarray       # (N, P) consensus on the map grid
    normalised_maps: np.ndarray     # (K, N, P)
    scores: dict[str, np.ndarray]   # similarity measure -> (K, N)
    voted: np.ndarray               # (N,) bool

def vote_shard(s: ShardMaps, method: MethodSpec, measures: tuple[str, ...] = cm.SIMILARITIES) -> ShardVote:
    """The consensus of one shard. LIME votes on superpixel weights, then paints the result."""
    vectors = s.weights if s.weights is not None else s.maps
    norm = cm.normalise(vectors, method.normalise)
    consensus = cm.vote(norm, method.vote)
    reference = cm.leave_one_out_votes(norm, method.vote) if method.leave_one_out else consensus[None]
    scores = {m: cm.similarity(norm, reference, m) for m in measures}
    if s.weights is not None:
        norm, consensus = paint(norm, s.superpixels), paint(consensus, s.superpixels)
    return ShardVote(consensus, norm, scores, voted_images(s.correct, method))

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
    votes and scores on its rows, as `vote_shard` would on a shard of its members alone.
    """
    norm = cm.normalise(s.weights if s.weights is not None else s.maps, method.normalise)
    rows = []
    for k, trial, members in subsets:
        sub = norm[members]
        reference = cm.leave_one_out_votes(sub, method.vote) if method.leave_one_out else cm.vote(sub, method.vote)[None]
        voted = voted_images(s.correct[members], method)
        score = np.where(voted, cm.similarity(sub, reference, method.similarity), 0.0)
        for j, m in enumerate(members):
            rows.append({"k": k, "trial": trial, "model_id": model_ids[m], "score_sum": float(score[j].sum()),
                         "n_voted": int(voted.sum())})
    return rows


# Images of a shard are dealt into this many blocks (by position), the units the run-level image
# bootstrap resamples: one image per block for shards of up to 16 images (the ordinary bootstrap).
BLOCKS_PER_SHARD = 16


def _block_sums(values: np.ndarray, counted: np.ndarray, blocks: np.ndarray, n_blocks: int) -> tuple:
    """(..., N) values and bool `counted` -> per block (..., n_blocks): sum of counted values, their count."""
    v = np.where(counted, values, 0.0).reshape(-1, values.shape[-1])
    c = np.broadcast_to(counted, values.shape).reshape(-1, values.shape[-1]).astype(np.float64)
    sums = np.stack([np.bincount(blocks, weights=row, minlength=n_blocks) for row in v])
    counts = np.stack([np.bincount(blocks, weights=row, minlength=n_blocks) for row in c])
    return sums.reshape(values.shape[:-1] + (n_blocks,)), counts.reshape(values.shape[:-1] + (n_blocks,))


def shard_aggregates(model_ids: list[str], correct: np.ndarray, voted: np.ndarray, score: np.ndarray,
                     align_m: dict[str, np.ndarray] | None, align_c: dict[str, np.ndarray] | None) -> dict:
    """The shard's aggregates as columns: one row per (member, block), then per block a `consensus` row.

    correct (K, N) bool; voted (N,) bool; score (K, N) the consensus score (NaN: undefined);
    align_m metric -> (K, N) and align_c metric -> (N,) alignment (NaN: no mask or undefined).
    Per row: n_images, n_correct (all images), n_voted, score_sum / score_n (voted images with a
    defined score), and per metric <metric>_sum / <metric>_n (voted images with a defined value).
    """
    k, n = correct.shape
    n_blocks = min(BLOCKS_PER_SHARD, n)
    blocks = np.arange(n) % max(n_blocks, 1)
    ones = np.ones((k + 1, n), bool)
    cols = {"model_id": np.repeat(np.array(model_ids + [CONSENSUS_ID], dtype=object), n_blocks),
            "block": np.tile(np.arange(n_blocks, dtype=np.int64), k + 1)}

    def put(name: str, values: np.ndarray, counted: np.ndarray, with_count: bool) -> None:
        sums, counts = _block_sums(values, counted, blocks, n_blocks)
        cols[f"{name}_sum" if with_count else name] = sums.ravel() if with_count else counts.ravel().astype(np.int64)
        if with_count:
            cols[f"{name}_n"] = counts.ravel().astype(np.int64)

    put("n_images", np.zeros((k + 1, n)), ones, False)
    put("n_correct", np.zeros((k + 1, n)), np.vstack([correct, np.zeros((1, n), bool)]), False)
    put("n_voted", np.zeros((k + 1, n)), ones & voted, False)
    put("score", np.vstack([score, np.full((1, n), np.nan)]),
        np.vstack([np.isfinite(score), np.zeros((1, n), bool)]) & voted, True)
    for metric in (align_m or {}):
        values = np.vstack([align_m[metric], align_c[metric][None]])
        put(metric, values, np.isfinite(values) & voted, True)
    return cols


def image_rows(image_ids: list[str], labels: np.ndarray, preds: np.ndarray, correct: np.ndarray, voted: np.ndarray,
               score: np.ndarray, align_c: dict[str, np.ndarray] | None) -> dict:
    """The shard's rows of tables/images: per image how far the committee agrees with itself.

    preds, correct, score: (K, N). mean/min_consensus_score over members with a defined score
    (low: the members' maps disagree); majority_pred and its votes (a majority that is not the
    label points at label noise); the consensus map's alignment with the mask.
    """
    k, n = preds.shape
    if n:
        counts = np.stack([np.bincount(col, minlength=int(preds.max()) + 1) for col in preds.T])
        majority = counts.argmax(axis=1)
        votes = counts.max(axis=1)
    else:
        majority = votes = np.zeros(0, np.int64)
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(score)
        mean = np.where(finite.any(axis=0), np.nansum(score, axis=0) / np.maximum(finite.sum(axis=0), 1), np.nan)
        low = np.where(finite.any(axis=0), np.where(finite, score, np.inf).min(axis=0), np.nan)
    cols = {"image_id": np.array(image_ids, dtype=object), "label": labels, "voted": voted,
            "members": np.full(n, k, np.int64), "members_correct": correct.sum(axis=0).astype(np.int64),
            "majority_pred": majority.astype(np.int64), "majority_votes": votes.astype(np.int64),
            "mean_consensus_score": mean, "min_consensus_score": low}
    for metric, values in (align_c or {}).items():
        cols[f"consensus_{metric}"] = values
    return cols


def reduce_shard(store: Store, shard: int, unit: Unit, model_ids: list[str], method: MethodSpec, map_size: int,
                 subsets: list[tuple[int, int, np.ndarray]]) -> dict:
    """Reduce one shard and write its reduce unit (consensus/, scores/, subcommittees/, aggregates/,
    tables/images/). Returns counts and the seconds it took (reading, math, writing)."""
    t0 = time.perf_counter()
    s = load_shard(store, shard, model_ids, map_size)
    v = vote_shard(s, method)
    align_c = align_m = None
    if s.masks is not None:
        align_c = alignment_metrics(v.consensus_map, s.masks, s.has_mask)
        align_m = alignment_metrics(v.normalised_maps, s.masks, s.has_mask)
    score = v.scores[method.similarity]
    unit.write(store, {
        file_of("consensus", shard): encode_consensus(s.image_ids, s.labels, len(model_ids), s.map_size, v.voted,
                                                      v.consensus_map, s.masks, s.has_mask, align_c),
        file_of("scores", shard): encode_scores(s.image_ids, model_ids, s.labels, s.preds, s.correct, v.voted,
                                                method.similarity, v.scores, align_m),
        file_of("subcommittees", shard): encode_subcommittees(subcommittee_sums(s, method, model_ids, subsets)),
        file_of("aggregates", shard): encode_aggregates(shard_aggregates(model_ids, s.correct, v.voted, score,
                                                                         align_m, align_c)),
        images_file(shard): encode_images(image_rows(s.image_ids, s.labels, s.preds, s.correct, v.voted, score,
                                                     align_c)),
    })
    return {"shard": shard, "n_images": len(s.image_ids), "n_voted": int(v.voted.sum()),
            "seconds": time.perf_counter() - t0}
