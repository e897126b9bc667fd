"""Run-level tables from the per-shard aggregates: models, correlations, robustness.

    write_tables: aggregates/ and subcommittees/ of every shard, read in order, a few shards ahead
                  (`read_run_aggregates`, `subcommittee_totals`; `Store.read_parquets`)
                  ─► the tables below ─► tables/*.parquet, .csv

Every input is a per-shard aggregate (sums and counts per member and block of images), summed as
it is read, so the work and memory here grow with shards and members, never with images, and a
rerun re-reads only small files. The statistics are `consensus.py`'s and `correlation.py`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from ray_consensus.results import consensus as cm
from ray_consensus.results import correlation as cr
from ray_consensus.runroot.contract import (
    CONSENSUS_ID,
    SUBCOMMITTEE_SCHEMA,
    aggregates_schema,
    file_of,
    sum_columns,
)
from ray_consensus.spec.config import RunSpec
from ray_consensus.storage.store import Store

CORRELATION_COLUMNS = ["x", "y", "method", "coefficient", "p_value", "p_permutation", "ci_over", "ci_low", "ci_high",
                       "n"]
# (sum, count) columns of the aggregates behind each per-member statistic
STATS = {"score": sum_columns("score"), "accuracy": ("n_correct", "n_predicted"),
         **{m: sum_columns(m) for m in cm.ALIGNMENTS}}


@dataclass
class RunAggregates:
    """The run's aggregates: totals per member (rows: committee order, then the vote's own), and per
    statistic the (n_blocks, K) sums and counts of every (shard, block) for the image bootstrap."""

    totals: pd.DataFrame                                 # index model_id (members, then consensus)
    blocks: dict[str, tuple[np.ndarray, np.ndarray]]     # statistic -> (sums, counts), members only
    metrics: list[str]                                   # the alignment metrics present (none without masks)


def read_run_aggregates(store: Store, shards: list[int], model_ids: list[str]) -> RunAggregates:
    """Sum the shards' aggregates as they are read: memory O(shards x blocks x members) for the blocks,
    O(the shards read ahead) for the rest."""
    order = model_ids + [CONSENSUS_ID]
    index = {m: i for i, m in enumerate(order)}
    k = len(model_ids)
    totals = parts = None
    metrics: list[str] = []
    for t in store.read_parquets(file_of("aggregates", s) for s in shards):
        if totals is None:
            metrics = [m for m in cm.ALIGNMENTS if sum_columns(m)[0] in t.column_names]
            value_columns = [c for c in t.column_names if c not in ("model_id", "block")]
            totals = np.zeros((len(order), len(value_columns)))
            parts = {stat: ([], []) for stat in ["score", "accuracy"] + metrics}
        codes = np.array([index[m] for m in t.column("model_id").to_pylist()], dtype=np.int64)
        values = np.column_stack([t.column(c).to_numpy().astype(np.float64) for c in value_columns])
        np.add.at(totals, codes, values)
        member, block = codes < k, t.column("block").to_numpy()
        n_blocks = int(block.max()) + 1 if len(block) else 0
        for stat, (sums, counts) in parts.items():
            for column, out in zip(STATS[stat], (sums, counts)):
                matrix = np.zeros((n_blocks, k))
                matrix[block[member], codes[member]] = t.column(column).to_numpy()[member]
                out.append(matrix)
    if totals is None:
        value_columns = [c for c in aggregates_schema().names if c not in ("model_id", "block")]
        totals, parts = np.zeros((len(order), len(value_columns))), {}
    blocks = {stat: (np.concatenate(sums), np.concatenate(counts)) for stat, (sums, counts) in parts.items()}
    return RunAggregates(pd.DataFrame(totals, index=order, columns=value_columns), blocks, metrics)


def subcommittee_totals(store: Store, shards: list[int]) -> pd.DataFrame:
    """k, trial, model_id, score_sum, n_voted summed over the shards as they are read. Every
    shard lists the same sub-committees in the same order (the plan's); a shard that does not is
    aligned by key."""
    keys, sums = None, None
    for table in store.read_parquets(file_of("subcommittees", s) for s in shards):
        t = table.to_pandas()
        if keys is None:
            keys, sums = t[["k", "trial", "model_id"]], t[["score_sum", "n_voted"]].to_numpy(np.float64)
        elif t[["k", "trial", "model_id"]].equals(keys):
            sums += t[["score_sum", "n_voted"]].to_numpy(np.float64)
        else:
            aligned = t.set_index(["k", "trial", "model_id"])[["score_sum", "n_voted"]]
            sums += aligned.reindex(pd.MultiIndex.from_frame(keys), fill_value=0).to_numpy(np.float64)
    if keys is None:
        return pd.DataFrame(columns=SUBCOMMITTEE_SCHEMA.names)
    return keys.assign(score_sum=sums[:, 0], n_voted=sums[:, 1])


def write_tables(spec: RunSpec, store: Store, shards: list[int]) -> dict:
    """Compute and write tables/{models,correlations,robustness}.{parquet,csv}; returns the voted count."""
    agg = read_run_aggregates(store, shards, [m.id for m in spec.committee])
    models = models_table(spec, agg)
    frames = {"models": models, "correlations": correlations_table(spec, agg, models),
              "robustness": robustness_table(spec, subcommittee_totals(store, shards), models)}
    for name, frame in frames.items():
        table = pa.Table.from_pandas(frame, preserve_index=False)
        store.write_parquet(f"tables/{name}.parquet", table)
        store.write_csv(f"tables/{name}.csv", table)
    return {"consensus_voted": int(agg.totals.loc[CONSENSUS_ID, "n_voted"])}


def _ratio(sums, counts) -> np.ndarray:
    sums, counts = np.asarray(sums, np.float64), np.asarray(counts, np.float64)
    return np.divide(sums, counts, out=np.full(sums.shape, np.nan), where=counts > 0)


def _mean(totals: pd.DataFrame | pd.Series, stat: str) -> np.ndarray:
    """A statistic of `STATS` from summed aggregates: its sum over its count (NaN: nothing counted)."""
    total, count = STATS[stat]
    return _ratio(totals[total], totals[count])


def models_table(spec: RunSpec, agg: RunAggregates) -> pd.DataFrame:
    """One row per member (and, with masks, a `consensus` row for the alignment of the vote itself):
    accuracy over the images with finite logits, n_nonfinite the images whose map was left out of the
    vote (not finite; all of them: the member never took part), consensus score and alignment means
    over the voted images it took part in."""
    ids = [m.id for m in spec.committee]
    members = agg.totals.loc[ids]
    table = pd.DataFrame({
        "model_id": ids, "arch": [m.arch for m in spec.committee],
        "accuracy": _mean(members, "accuracy"),
        "n_images": members["n_images"].astype(np.int64).to_numpy(),
        "n_voted": members["n_voted"].astype(np.int64).to_numpy(),
        "n_nonfinite": members["n_nonfinite"].astype(np.int64).to_numpy(),
        "consensus_score": _mean(members, "score"), **{m: _mean(members, m) for m in agg.metrics}})
    if agg.metrics:
        c = agg.totals.loc[CONSENSUS_ID]
        taking_part = int((members["n_nonfinite"] < members["n_images"]).sum())  # not all its maps non-finite
        row = {"model_id": CONSENSUS_ID, "arch": f"vote of {taking_part} models", "accuracy": np.nan,
               "n_images": int(c["n_images"]), "n_voted": int(c["n_voted"]), "n_nonfinite": int(c["n_nonfinite"]),
               "consensus_score": np.nan,
               **{m: float(_mean(c, m)) for m in agg.metrics}}
        table = pd.concat([table, pd.DataFrame([row])], ignore_index=True)
    return table


def correlations_table(spec: RunSpec, agg: RunAggregates, models: pd.DataFrame) -> pd.DataFrame:
    """Across the committee: consensus score (and mask alignment) against accuracy, and consensus score
    against alignment; per method the coefficient, scipy's and a permutation p-value, and two intervals
    (`correlation.correlation_rows`): over images (blocks of images of every shard resampled,
    `method.bootstrap` replicates) and over members (the committee resampled)."""
    ids = [m.id for m in spec.committee]
    method = spec.method
    means = models.set_index("model_id").reindex(ids)
    stats = ["score", "accuracy"] + (["ap"] if "ap" in agg.metrics else [])
    k = len(ids)
    if agg.blocks:
        reps = cr.block_bootstrap_means(np.hstack([agg.blocks[s][0] for s in stats]),
                                        np.hstack([agg.blocks[s][1] for s in stats]), method.bootstrap, method.seed)
    else:
        reps = np.zeros((0, len(stats) * k))
    rep = {stat: reps[:, i * k:(i + 1) * k] for i, stat in enumerate(stats)}
    column = {"score": "consensus_score", "accuracy": "accuracy", "ap": "ap"}
    statistic = {s: cr.MemberStatistic(column[s], means[column[s]].to_numpy(float), rep[s]) for s in stats}
    pairs = [("score", "accuracy")] + ([("ap", "accuracy"), ("score", "ap")] if "ap" in stats else [])
    rows = []
    for x, y in pairs:
        rows += cr.correlation_rows(statistic[x], statistic[y], n_boot=method.bootstrap,
                                    n_perm=method.permutations, seed=method.seed)
    return pd.DataFrame(rows, columns=CORRELATION_COLUMNS)


def robustness_table(spec: RunSpec, sums: pd.DataFrame, models: pd.DataFrame) -> pd.DataFrame:
    """Per sub-committee (k, trial): the score-accuracy correlation within it."""
    columns = ["k", "trial", "method", "coefficient", "p_value", "n"]
    if sums.empty:  # typed, so the stored table is too
        return pd.DataFrame({"k": pd.Series(dtype=np.int64), "trial": pd.Series(dtype=np.int64),
                             "method": pd.Series(dtype=str), "coefficient": pd.Series(dtype=np.float64),
                             "p_value": pd.Series(dtype=np.float64), "n": pd.Series(dtype=np.int64)})
    accuracy = models.set_index("model_id")["accuracy"]
    rows = []
    for (k, trial), group in sums.groupby(["k", "trial"]):
        with np.errstate(invalid="ignore", divide="ignore"):
            score = group["score_sum"].to_numpy(float) / group["n_voted"].to_numpy(float)
        acc = accuracy.loc[group["model_id"]].to_numpy()
        for method in ("spearman", "pearson"):
            coef, p = cr.correlation(score, acc, method)
            rows.append({"k": int(k), "trial": int(trial), "method": method, "coefficient": coef,
                         "p_value": p, "n": int(len(group))})
    return pd.DataFrame(rows, columns=columns)
