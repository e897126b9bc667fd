"""The reducer for one shard: normalise, vote, score, align; write consensus/ and scores/.

Reads only stored units (the shard's inputs and each member's attributions), so switching a
method option re-runs this step alone. All the math is in `consensus.py`; this module only
moves arrays between Parquet and those functions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ray_consensus import consensus as cm
from ray_consensus.config import MethodSpec
from ray_consensus.storage import Store
from ray_consensus.units import DATA_FILE, attributions_dir, shard_dir, write_unit

ALIGNMENT_METRICS = cm.ALIGNMENTS


@dataclass
class ShardMaps:
    """Everything the vote needs for one shard, aligned on the same images."""

    image_ids: list[str]
    labels: np.ndarray        # (N,) int64
    preds: np.ndarray         # (K, N) int64
    correct: np.ndarray       # (K, N) bool
    maps: np.ndarray          # (K, N, P) float64 attribution maps as stored (P = M*M)
    weights: np.ndarray | None  # (K, N, J) superpixel weights (LIME), NaN-padded, else None
    superpixels: np.ndarray | None  # (N, P) int superpixel ids on the map grid
    masks: np.ndarray | None  # (N, P) uint8, rows of images without a mask are all 0
    has_mask: np.ndarray      # (N,) bool
    map_size: int


def _list_to_array(column: pa.ChunkedArray, width: int | None = None) -> np.ndarray:
    """list<number> column of equal-length rows -> (N, width) array."""
    arr = column.combine_chunks()
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    n = len(arr)
    return flat.reshape(n, width if width is not None else (len(flat) // n if n else 0))


def stored_maps(table: pa.Table, pixels: int) -> np.ndarray:
    """An attributions table's maps as (N, P) float64 (float16 storage: times attribution_scale)."""
    maps = _list_to_array(table.column("attribution"), pixels).astype(np.float64)
    if "attribution_scale" in table.column_names:
        maps *= table.column("attribution_scale").to_numpy()[:, None]
    return maps


def load_shard(store: Store, shard: int, model_ids: list[str]) -> ShardMaps:
    inputs = store.read_parquet(f"{shard_dir('inputs', shard)}/{DATA_FILE}")
    ids = inputs.column("image_id").to_pylist()
    tables = []
    for model_id in model_ids:
        t = store.read_parquet(f"{attributions_dir(model_id, shard)}/{DATA_FILE}")
        if t.column("image_id").to_pylist() != ids:  # same decode, same order: anything else is a bug
            raise RuntimeError(f"shard {shard}: attributions of {model_id} do not cover the shard's inputs")
        tables.append(t)
    n = len(ids)
    side = int(tables[0].column("height")[0].as_py()) if n else 0
    maps = np.stack([stored_maps(t, side * side) for t in tables])
    weights = None
    if n and "superpixel_weights" in tables[0].column_names:
        rows = [t.column("superpixel_weights").to_pylist() for t in tables]
        width = max(len(r) for per_model in rows for r in per_model)
        weights = np.zeros((len(tables), n, width))  # superpixels an image lacks weigh 0
        for k, per_model in enumerate(rows):
            for i, r in enumerate(per_model):
                weights[k, i, :len(r)] = r
    mask_col = inputs.column("mask").to_pylist()
    has_mask = np.array([m is not None for m in mask_col], dtype=bool)
    masks = None
    if has_mask.any():
        masks = np.zeros((n, side * side), np.uint8)
        for i, m in enumerate(mask_col):
            if m is not None:
                masks[i] = m
    sp = inputs.column("superpixels").to_pylist()
    superpixels = np.array(sp, dtype=np.int64) if n and sp[0] is not None else None
    return ShardMaps(ids, np.array(inputs.column("label").to_pylist(), np.int64),
                     np.stack([t.column("pred").to_numpy() for t in tables]),
                     np.stack([t.column("correct").to_numpy(zero_copy_only=False) for t in tables]).astype(bool),
                     maps, weights, superpixels, masks, has_mask, side)


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
    vectors = np.nan_to_num(s.weights) if s.weights is not None else s.maps
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
    for metric in ALIGNMENT_METRICS:
        values = cm.alignment(maps, np.broadcast_to(masks, maps.shape), metric)
        out[metric] = np.where(has_mask, values, np.nan)
    return out


def reduce_shard(store: Store, shard: int, model_ids: list[str], method: MethodSpec, fp: str,
                 previous_fp: str | None, subsets: list[tuple[int, int, np.ndarray]]) -> dict:
    """Reduce one shard and write its consensus/, scores/ and subcommittees/ unit. Returns counts
    and the seconds it took (reading, math, writing)."""
    t0 = time.perf_counter()
    s = load_shard(store, shard, model_ids)
    v = vote_shard(s, method)
    n, k = len(s.image_ids), len(model_ids)
    align_c = align_m = None
    if s.masks is not None:
        align_c = alignment_metrics(v.consensus_map, s.masks, s.has_mask)
        align_m = alignment_metrics(v.normalised_maps, s.masks, s.has_mask)

    consensus_cols = {
        "image_id": pa.array(s.image_ids, pa.string()),
        "label": pa.array(s.labels),
        "n_models": pa.array(np.full(n, k, np.int64)),
        "height": pa.array(np.full(n, s.map_size, np.int64)),
        "width": pa.array(np.full(n, s.map_size, np.int64)),
        "voted": pa.array(v.voted),
        "consensus": pa.array(list(v.consensus_map.astype(np.float32)), pa.list_(pa.float32())),
    }
    if s.masks is not None:
        consensus_cols["mask"] = pa.array([m if h else None for m, h in zip(s.masks, s.has_mask)],
                                          pa.list_(pa.uint8()))
        for metric, values in align_c.items():
            consensus_cols[metric] = pa.array(values)

    score_cols = {
        "image_id": pa.array(np.tile(np.array(s.image_ids, dtype=object), k), pa.string()),
        "model_id": pa.array(np.repeat(np.array(model_ids, dtype=object), n), pa.string()),
        "label": pa.array(np.tile(s.labels, k)),
        "pred": pa.array(s.preds.ravel()),
        "correct": pa.array(s.correct.ravel()),
        "voted": pa.array(np.tile(v.voted, k)),
        "consensus_score": pa.array(v.scores[method.similarity].ravel()),
    }
    for measure, values in v.scores.items():
        score_cols[measure] = pa.array(values.ravel())
    if align_m is not None:
        for metric, values in align_m.items():
            score_cols[metric] = pa.array(values.ravel())

    sub_rows = subcommittee_sums(s, method, model_ids, subsets)
    write_unit(store, shard_dir("consensus", shard), fp, {
        f"{shard_dir('consensus', shard)}/{DATA_FILE}": pa.table(consensus_cols),
        f"{shard_dir('scores', shard)}/{DATA_FILE}": pa.table(score_cols),
        f"{shard_dir('subcommittees', shard)}/{DATA_FILE}": pa.Table.from_pylist(sub_rows, schema=SUB_SCHEMA),
    }, previous_fp)
    return {"shard": shard, "n_images": n, "n_voted": int(v.voted.sum()), "seconds": time.perf_counter() - t0}


SUB_SCHEMA = pa.schema([("k", pa.int64()), ("trial", pa.int64()), ("model_id", pa.string()),
                        ("score_sum", pa.float64()), ("n_voted", pa.int64())])


def subcommittee_sums(s: ShardMaps, method: MethodSpec, model_ids: list[str],
                      subsets: list[tuple[int, int, np.ndarray]]) -> list[dict]:
    """Per random sub-committee: each member's summed consensus score over the shard's voted images."""
    rows = []
    for k, trial, members in subsets:
        sub = ShardMaps(s.image_ids, s.labels, s.preds[members], s.correct[members], s.maps[members],
                        None if s.weights is None else s.weights[members], s.superpixels, None, s.has_mask,
                        s.map_size)
        v = vote_shard(sub, method, (method.similarity,))
        score = np.where(v.voted, v.scores[method.similarity], 0.0)
        for j, m in enumerate(members):
            rows.append({"k": k, "trial": trial, "model_id": model_ids[m], "score_sum": float(score[j].sum()),
                         "n_voted": int(v.voted.sum())})
    return rows
