"""The data contract: how every stored table is encoded and decoded, in one place.

Each table of the run root (README, "What a run writes") has its encoder here and, where the
package reads it back, its decoder, so a column is named, typed and scaled in exactly one
module. A shard's reducer hands its tables over as typed records (`shard_records`); aggregates/ and
tables/images/ have a schema each (`aggregates_schema`, `images_schema`), errors/ and
subcommittees/ theirs. Paths come from `units.UnitPath`. Arrays are numpy; nothing here imports
torch or Ray.

    manifest.parquet                 image_id, uri, label, mask_uri, version, shard
    errors/shard=N/<file>            image_id, uri, stage, reason (strings): part-0 the shard's decode | mask
                                     rejects, attribution.parquet its members' non-finite ones; shard=-0001
                                     holds the rows rejected while listing (stage manifest, no shard)
    inputs/shard=N                   image_id, label, mask (map grid), superpixels (map grid, LIME)
    attributions/model=M/shard=N     image_id, label, pred, correct, height, width, attribution
                                     [, attribution_scale (float16 maps)] [, superpixel_weights];
                                     an image whose logits or map were not finite: attribution all NaN,
                                     and pred null when its logits were not finite
    consensus/shard=N                image_id, label, n_models (members with a finite map), height, width,
                                     voted, consensus (float32; the stored metrics are of these values)
                                     [, mask, ap, roc_auc, pointing_game]
    scores/shard=N                   image_id, model_id, label, pred, correct, voted, consensus_score,
                                     one column per similarity [, one per alignment metric]
    subcommittees/shard=N            k, trial, model_id, score_sum, n_voted (the member's voted images with
                                     a defined score)
    aggregates/shard=N               model_id, block, n_images, n_predicted, n_correct, n_nonfinite, n_voted,
                                     score_sum, score_n
                                     [, <metric>_sum, <metric>_n per alignment metric]
    tables/images/shard=N            image_id, label, voted, members, members_correct, majority_pred,
                                     majority_votes, mean_consensus_score, min_consensus_score
                                     [, consensus_<metric> per alignment metric]
    run.json                         the resolved spec (secrets masked), plan, counts, timings (`record`)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Sequence

import numpy as np
import pyarrow as pa

from ray_consensus.runroot.shard_records import ImageRows, ShardAggregates, ShardMaps, ShardVote
from ray_consensus.runroot.units import ATTRIBUTIONS, DATA_FILE, MEMBER_ERRORS_FILE, UnitPath
from ray_consensus.storage.store import Store

if TYPE_CHECKING:  # the frames come from pyarrow's to_pandas: the slots and decode workers never load pandas
    import pandas as pd

MANIFEST_FILE = "manifest.parquet"
CONSENSUS_ID = "consensus"  # the vote's own row in the aggregates and the models table


class ImageRef(NamedTuple):
    """One image of a shard, as the decode stage reads it (mask_uri None: the data set has no masks)."""

    image_id: str
    uri: str
    label: int
    mask_uri: str | None


def file_of(kind: str, shard: int) -> str:
    """The data file of a per-shard table: a kind of `units.SHARD_KINDS` (inputs | errors | consensus |
    scores | subcommittees | aggregates | tables/images)."""
    return UnitPath(kind, shard).file()


def attributions_file(model_id: str, shard: int) -> str:
    return UnitPath(ATTRIBUTIONS, shard, model_id).file()


# errors/ is one Hive-partitioned data set (key `shard`): the rows rejected while listing have no shard
# and are stored under shard -1; a shard's members' non-finite logits or maps sit beside its decode rejects.
MANIFEST_SHARD = -1
MANIFEST_ERRORS_FILE = file_of("errors", MANIFEST_SHARD)
LEGACY_MANIFEST_ERRORS_FILE = f"errors/manifest/{DATA_FILE}"  # before 0.3.0: a folder outside the partitioning


def member_errors_file(shard: int) -> str:
    """The shard's (member, image) pairs whose logits or map were not finite (written by its reducer)."""
    return UnitPath("errors", shard).file(MEMBER_ERRORS_FILE)


# ---------------------------------------------------------------- columns

def list_column(values: np.ndarray) -> pa.Array:
    """(N, P) -> list<value> column of N rows, without a Python loop."""
    n, p = values.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(0, n * p + 1, p, dtype=np.int32)), pa.array(values.ravel()))


def list_rows(column: pa.ChunkedArray | pa.Array, width: int | None = None) -> np.ndarray:
    """list<number> column of equal-length rows -> (N, width) array."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    n = len(arr)
    return flat.reshape(n, width if width is not None else (len(flat) // n if n else 0))


def _ragged(column: pa.ChunkedArray, fill: float = 0.0) -> np.ndarray:
    """list<float> rows of different lengths -> (N, max length), padded with `fill`."""
    rows = column.to_pylist()
    out = np.full((len(rows), max((len(r) for r in rows), default=0)), fill)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


# ---------------------------------------------------------------- manifest and errors

def read_stored_manifest(store: Store, columns: list[str] | None = None) -> pd.DataFrame | None:
    """The run root's manifest (the shard of every image), or None before the first run."""
    return store.read_parquet(MANIFEST_FILE, columns=columns).to_pandas() if store.exists(MANIFEST_FILE) else None


def write_manifest(store: Store, manifest: pd.DataFrame, errors: pd.DataFrame) -> None:
    """manifest: image_id, uri, label, mask_uri, version, shard; errors: the images rejected while listing."""
    store.write_parquet(MANIFEST_FILE, pa.Table.from_pandas(manifest, preserve_index=False))
    store.write_parquet(MANIFEST_ERRORS_FILE, errors_table(errors.to_dict("records")))
    if store.exists(LEGACY_MANIFEST_ERRORS_FILE):  # migrate: errors/ reads as one data set only without it
        store.delete(LEGACY_MANIFEST_ERRORS_FILE.rpartition("/")[0])


ERRORS_SCHEMA = pa.schema([("image_id", pa.string()), ("uri", pa.string()), ("stage", pa.string()),
                           ("reason", pa.string())])


def errors_table(rows: list[dict]) -> pa.Table:
    """Rows of image_id, uri, stage (manifest | decode | mask | attribution), reason; typed when empty."""
    return pa.Table.from_pylist(rows, schema=ERRORS_SCHEMA) if rows else ERRORS_SCHEMA.empty_table()


def count_errors(store: Store, shards: list[int]) -> int:
    """Rows of errors/: inputs rejected while listing or decoding the shards, and (member, image) pairs
    whose logits or map were not finite (every listed shard reduced)."""
    return store.count_parquet_rows([MANIFEST_ERRORS_FILE] + [f for s in shards
                                                            for f in (file_of("errors", s), member_errors_file(s))])


# ---------------------------------------------------------------- inputs

@dataclass
class Inputs:
    """A shard's decoded inputs on the map grid (P = M * M pixels), images in stored order."""

    image_ids: list[str]
    labels: np.ndarray              # (N,) int64
    masks: np.ndarray | None        # (N, P) uint8; rows of images without a mask are 0; None: no masks
    has_mask: np.ndarray            # (N,) bool
    superpixels: np.ndarray | None  # (N, P) int64 superpixel ids (LIME), else None


def encode_inputs(images: list[ImageRef], masks: list[np.ndarray | None], superpixels: np.ndarray | None) -> pa.Table:
    """masks: one (M, M) uint8 {0, 1} array per image, or None; superpixels: (N, M, M) ids or None."""
    return pa.table({
        "image_id": pa.array([i.image_id for i in images], pa.string()),
        "label": pa.array([int(i.label) for i in images], pa.int64()),
        "mask": pa.array([None if m is None else m.ravel() for m in masks], pa.list_(pa.uint8())),
        "superpixels": pa.array([None] * len(images) if superpixels is None else list(superpixels.reshape(
            len(images), -1).astype(np.int32)), pa.list_(pa.int32())),
    })


def read_inputs(store: Store, shard: int) -> Inputs:
    t = store.read_small_parquet(file_of("inputs", shard))
    n = t.num_rows
    mask_col = t.column("mask")
    has_mask = ~np.asarray(mask_col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    masks = None
    if has_mask.any():
        rows = mask_col.to_pylist()
        width = len(next(r for r in rows if r is not None))
        masks = np.zeros((n, width), np.uint8)
        for i, m in enumerate(rows):
            if m is not None:
                masks[i] = m
    sp = t.column("superpixels")
    superpixels = list_rows(sp).astype(np.int64) if n and sp.null_count == 0 else None
    return Inputs(t.column("image_id").to_pylist(), t.column("label").to_numpy().astype(np.int64), masks, has_mask,
                  superpixels)


# ---------------------------------------------------------------- attributions

@dataclass
class Attributions:
    """One member's stored attributions of one shard, images in stored order."""

    image_ids: list[str]
    preds: np.ndarray                      # (N,) int64, -1 where the logits were not finite (stored null)
    correct: np.ndarray                    # (N,) bool
    maps: np.ndarray                       # (N, P) float64, as computed (float16 storage scaled back); NaN
                                           # rows: the logits or the map were not finite
    superpixel_weights: np.ndarray | None  # (N, J) float64 LIME weights, 0 beyond each image's superpixels


def encode_attributions(images: list[ImageRef], preds: np.ndarray, maps: np.ndarray, extras: dict[str, list],
                        map_dtype: str) -> pa.Table:
    """maps: float32 (N, M, M), all NaN for an image whose logits or map were not finite; preds: (N,)
    int64, -1 (stored null) where the logits were not finite; extras: name -> one 1-D float array per
    image (e.g. superpixel weights).

    With `map_dtype: float16` each map is stored scaled to max |m| = 1 with its scale in
    `attribution_scale`: raw maps sit far below float16's normal range (gradients ~1e-7).
    """
    n, m = len(images), maps.shape[-1] if maps.ndim == 3 else 0
    labels = np.array([int(i.label) for i in images], dtype=np.int64)
    flat = maps.reshape(n, m * m).astype(np.float32)
    preds = preds.astype(np.int64)
    columns = {
        "image_id": pa.array([i.image_id for i in images], pa.string()),
        "label": pa.array(labels),
        "pred": pa.array(preds, mask=preds < 0),
        "correct": pa.array(preds == labels),
        "height": pa.array(np.full(n, m, np.int64)),
        "width": pa.array(np.full(n, m, np.int64)),
    }
    if map_dtype == "float16":
        scale = np.abs(flat).max(axis=1) if n and m else np.zeros(n, np.float32)
        scale[(scale == 0) | ~np.isfinite(scale)] = 1.0  # NaN maps stay NaN
        columns["attribution"] = list_column((flat / scale[:, None]).astype(np.float16))
        columns["attribution_scale"] = pa.array(scale.astype(np.float32))
    else:
        columns["attribution"] = list_column(flat)
    for key, rows in extras.items():
        columns[key] = pa.array([np.asarray(r, np.float32) for r in rows], pa.list_(pa.float32()))
    return pa.table(columns)


def decode_maps(table: pa.Table, pixels: int) -> np.ndarray:
    """An attributions table's maps as (N, P) float64 (float16 storage: times attribution_scale)."""
    maps = list_rows(table.column("attribution"), pixels).astype(np.float64)
    if "attribution_scale" in table.column_names:
        maps *= table.column("attribution_scale").to_numpy()[:, None]
    return maps


def read_attributions(store: Store, model_ids: list[str], shard: int, pixels: int) -> list[Attributions]:
    """The shard's unit of each member, in order, read through `Store.read_parquets`: on S3 one GET each
    and up to `read_threads` at once (the reducer's K files would otherwise cost K x ~4.6 round trips
    one after another)."""
    return [_attributions(t, pixels)
            for t in store.read_parquets([attributions_file(m, shard) for m in model_ids])]


def _attributions(t: pa.Table, pixels: int) -> Attributions:
    weights = _ragged(t.column("superpixel_weights")) if "superpixel_weights" in t.column_names and t.num_rows \
        else None
    preds = t.column("pred").fill_null(-1).to_numpy().astype(np.int64)
    return Attributions(t.column("image_id").to_pylist(), preds,
                        t.column("correct").to_numpy(zero_copy_only=False).astype(bool), decode_maps(t, pixels),
                        weights)


def read_maps(store: Store, model_id: str, shard: int, pixels: int) -> dict[str, np.ndarray]:
    """image_id -> (P,) float64 map of one member's unit (what the report's gallery shows)."""
    t = store.read_parquet(attributions_file(model_id, shard))
    return dict(zip(t.column("image_id").to_pylist(), decode_maps(t, pixels)))


# ---------------------------------------------------------------- consensus, scores, subcommittees

CONSENSUS_DTYPE = np.float32


def as_stored(consensus: np.ndarray) -> np.ndarray:
    """Consensus values as the `consensus` column stores them (float32), in float64: the reducer scores
    and aligns these, so a recomputation from storage gives the stored figures exactly (a float64 vote
    rounded to float32 can turn two distinct values into a tie)."""
    return np.asarray(consensus).astype(CONSENSUS_DTYPE).astype(np.float64)


def encode_consensus(s: ShardMaps, v: ShardVote, alignment: dict[str, np.ndarray] | None) -> pa.Table:
    """n_models: the members with a finite map the consensus is the vote of; alignment: metric -> (N,) of
    the vote (stored with the masks)."""
    n = len(s.image_ids)
    cols = {
        "image_id": pa.array(s.image_ids, pa.string()),
        "label": pa.array(s.labels, pa.int64()),
        "n_models": pa.array(v.finite.sum(axis=0).astype(np.int64)),
        "height": pa.array(np.full(n, s.map_size, np.int64)),
        "width": pa.array(np.full(n, s.map_size, np.int64)),
        "voted": pa.array(v.voted, pa.bool_()),
        "consensus": list_column(v.consensus_map.astype(CONSENSUS_DTYPE)) if n
        else pa.array([], pa.list_(pa.float32())),
    }
    if s.masks is not None:
        cols["mask"] = pa.array([m if h else None for m, h in zip(s.masks, s.has_mask)], pa.list_(pa.uint8()))
        for metric, values in (alignment or {}).items():
            cols[metric] = pa.array(values)
    return pa.table(cols)


def read_consensus(store: Store, shard: int, columns: list[str] | None = None) -> pd.DataFrame:
    return store.read_parquet(file_of("consensus", shard), columns=columns).to_pandas()


def encode_scores(s: ShardMaps, v: ShardVote, model_ids: list[str], measure: str,
                  alignment: dict[str, np.ndarray] | None) -> pa.Table:
    """One row per (member, image), members outer: pred (-1: not finite, stored null), correct, a column
    per similarity of `v.scores` and per metric of `alignment` (metric -> (K, N)) (NaN: the member's map
    is not in the vote); `measure` names the similarity stored as `consensus_score`."""
    k, n = len(model_ids), len(s.image_ids)
    preds = np.asarray(s.preds, np.int64).ravel()
    cols = {
        "image_id": pa.array(np.tile(np.array(s.image_ids, dtype=object), k), pa.string()),
        "model_id": pa.array(np.repeat(np.array(model_ids, dtype=object), n), pa.string()),
        "label": pa.array(np.tile(s.labels, k), pa.int64()),
        "pred": pa.array(preds, mask=preds < 0),
        "correct": pa.array(s.correct.ravel(), pa.bool_()),
        "voted": pa.array(np.tile(v.voted, k), pa.bool_()),
        "consensus_score": pa.array(v.scores[measure].ravel(), pa.float64()),
    }
    for name, values in {**v.scores, **(alignment or {})}.items():
        cols[name] = pa.array(values.ravel(), pa.float64())
    return pa.table(cols)


def read_scores(store: Store, shard: int, columns: list[str] | None = None) -> pd.DataFrame:
    return store.read_parquet(file_of("scores", shard), columns=columns).to_pandas()


SUBCOMMITTEE_SCHEMA = pa.schema([("k", pa.int64()), ("trial", pa.int64()), ("model_id", pa.string()),
                                 ("score_sum", pa.float64()), ("n_voted", pa.int64())])


def encode_subcommittees(rows: list[dict]) -> pa.Table:
    """Rows of k, trial, model_id, score_sum (over the shard's voted images), n_voted."""
    return pa.Table.from_pylist(rows, schema=SUBCOMMITTEE_SCHEMA)


def sum_columns(statistic: str) -> tuple[str, str]:
    """The (sum, count) columns of a statistic summed in aggregates/ (the score, an alignment metric)."""
    return f"{statistic}_sum", f"{statistic}_n"


def aggregates_schema(metrics: Sequence[str] = ()) -> pa.Schema:
    """aggregates/shard=N's columns; per alignment metric (a run with masks) its `sum_columns`."""
    sums = ["score", *metrics]
    return pa.schema([("model_id", pa.string()), ("block", pa.int64())] + [
        (name, pa.int64()) for name in ("n_images", "n_predicted", "n_correct", "n_nonfinite", "n_voted")] + [
        (name, kind) for stat in sums for name, kind in zip(sum_columns(stat), (pa.float64(), pa.int64()))])


def images_schema(metrics: Sequence[str] = ()) -> pa.Schema:
    """tables/images/shard=N's columns; per alignment metric (a run with masks) consensus_<metric>."""
    return pa.schema([("image_id", pa.string()), ("label", pa.int64()), ("voted", pa.bool_())] + [
        (name, pa.int64()) for name in ("members", "members_correct", "majority_pred", "majority_votes")] + [
        (name, pa.float64()) for name in ("mean_consensus_score", "min_consensus_score")] + [
        (f"consensus_{m}", pa.float64()) for m in metrics])


def encode_aggregates(a: ShardAggregates) -> pa.Table:
    schema = aggregates_schema(list(a.metrics))
    fixed = schema.names[:len(schema) - 2 * len(a.metrics)]
    return _table(schema, [getattr(a, name) for name in fixed] + [c for pair in a.metrics.values() for c in pair])


def encode_images(rows: ImageRows) -> pa.Table:
    schema = images_schema(list(rows.alignment))
    fixed = schema.names[:len(schema) - len(rows.alignment)]
    return _table(schema, [getattr(rows, name) for name in fixed] + list(rows.alignment.values()))


def _table(schema: pa.Schema, columns: list) -> pa.Table:
    """Columns in the schema's order -> a table of exactly that schema (typed when it has no rows)."""
    return pa.Table.from_arrays([pa.array(c, f.type) for c, f in zip(columns, schema)], schema=schema)
