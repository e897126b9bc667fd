"""Run-level tables from the per-shard aggregates: models, correlations, robustness.

    write_tables: aggregates/ and subcommittees/ of every shard (contract) ─► the tables below
                  ─► tables/*.parquet, .csv

Every input is a per-shard aggregate (sums and counts per member and block of images), so the
work and memory here grow with shards and members, never with images, and a rerun re-reads only
small files. The statistics are `consensus.py`'s; the functions take and return DataFrames.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from ray_consensus import consensus as cm
from ray_consensus.config import RunSpec
from ray_consensus.contract import CONSENSUS_ID, read_per_shard
from ray_consensus.storage import Store

CORRELATION_COLUMNS = ["x", "y", "method", "coefficient", "p_value", "p_permutation", "ci_over", "ci_low", "ci_high",
                       "n"]


def write_tables(spec: RunSpec, store: Store, shards: list[int]) -> dict:
    """Compute and write tables/{models,correlations,robustness}.{parquet,csv}; returns the voted count."""
    aggregates = read_per_shard(store, "aggregates", shards)
    models = models_table(spec, aggregates)
    frames = {"models": models, "correlations": correlations_table(spec, aggregates, models),
              "robustness": robustness_table(spec, read_per_shard(store, "subcommittees", shards), models)}
    for name, frame in frames.items():
        table = pa.Table.from_pandas(frame, preserve_index=False)
        store.write_parquet(f"tables/{name}.parquet", table)
        store.write_csv(f"tables/{name}.csv", table)
    voted = aggregates.loc[aggregates["model_id"] == CONSENSUS_ID, "n_voted"].sum() if len(aggregates) else 0
    return {"consensus_voted": int(voted)}


def _metrics(aggregates: pd.DataFrame) -> list[str]:
    """The alignment metrics the aggregates carry (none without masks)."""
    return [m for m in cm.ALIGNMENTS if f"{m}_sum" in aggregates.columns]


def _ratio(sums, counts) -> np.ndarray:
    sums, counts = np.asarray(sums, np.float64), np.asarray(counts, np.float64)
    return np.divide(sums, counts, out=np.full(sums.shape, np.nan), where=counts > 0)


def models_table(spec: RunSpec, aggregates: pd.DataFrame) -> pd.DataFrame:
    """One row per member (and, with masks, a `consensus` row for the alignment of the vote itself):
    accuracy over all images, consensus score and alignment means over the voted images."""
    metrics = _metrics(aggregates)
    totals = aggregates.drop(columns=["block", "shard"], errors="ignore").groupby("model_id").sum()
    ids = [m.id for m in spec.committee]
    members = totals.reindex(ids).fillna(0)
    table = pd.DataFrame({
        "model_id": ids, "arch": [m.arch for m in spec.committee],
        "accuracy": _ratio(members["n_correct"], members["n_images"]),
        "n_images": members["n_images"].astype(np.int64).to_numpy(),
        "n_voted": members["n_voted"].astype(np.int64).to_numpy(),
        "consensus_score": _ratio(members["score_sum"], members["score_n"]),
        **{m: _ratio(members[f"{m}_sum"], members[f"{m}_n"]) for m in metrics}})
    if metrics:
        c = totals.loc[CONSENSUS_ID] if CONSENSUS_ID in totals.index else pd.Series(0.0, index=totals.columns)
        row = {"model_id": CONSENSUS_ID, "arch": f"vote of {len(ids)} models", "accuracy": np.nan,
               "n_images": int(c["n_images"]), "n_voted": int(c["n_voted"]), "consensus_score": np.nan,
               **{m: float(_ratio(c[f"{m}_sum"], c[f"{m}_n"])) for m in metrics}}
        table = pd.concat([table, pd.DataFrame([row])], ignore_index=True)
    return table


def block_matrices(aggregates: pd.DataFrame, model_ids: list[str], stat: str) -> tuple[np.ndarray, np.ndarray]:
    """(n_blocks, K) sums and counts of a statistic per (shard, block) and member: stat is score,
    accuracy or an alignment metric."""
    sum_col, count_col = {"score": ("score_sum", "score_n"), "accuracy": ("n_correct", "n_images")}.get(
        stat, (f"{stat}_sum", f"{stat}_n"))
    rows = aggregates[aggregates["model_id"] != CONSENSUS_ID]
    wide = rows.pivot_table(index=["shard", "block"], columns="model_id", values=[sum_col, count_col],
                            aggfunc="sum", fill_value=0)
    return (wide[sum_col].reindex(columns=model_ids, fill_value=0).to_numpy(np.float64),
            wide[count_col].reindex(columns=model_ids, fill_value=0).to_numpy(np.float64))


def correlations_table(spec: RunSpec, aggregates: pd.DataFrame, models: pd.DataFrame) -> pd.DataFrame:
    """Across the committee: consensus score (and mask alignment) against accuracy, and consensus score
    against alignment; per method the coefficient, scipy's and a permutation p-value, and two intervals
    (`consensus.correlation_rows`): over images (blocks of images of every shard resampled,
    `method.bootstrap` replicates) and over members (the committee resampled)."""
    ids = [m.id for m in spec.committee]
    method = spec.method
    means = models.set_index("model_id").reindex(ids)
    stats = ["score", "accuracy"] + (["ap"] if "ap" in _metrics(aggregates) else [])
    if len(aggregates):
        blocks = [block_matrices(aggregates, ids, stat) for stat in stats]
        reps = cm.block_bootstrap_means(np.hstack([b[0] for b in blocks]), np.hstack([b[1] for b in blocks]),
                                        method.bootstrap, method.seed)
    else:
        reps = np.zeros((0, len(stats) * len(ids)))
    k = len(ids)
    rep = {stat: reps[:, i * k:(i + 1) * k] for i, stat in enumerate(stats)}
    value = {"score": means["consensus_score"].to_numpy(float), "accuracy": means["accuracy"].to_numpy(float)}
    if "ap" in stats:
        value["ap"] = means["ap"].to_numpy(float)
    names = {"score": "consensus_score", "accuracy": "accuracy", "ap": "ap"}
    pairs = [("score", "accuracy")] + ([("ap", "accuracy"), ("score", "ap")] if "ap" in stats else [])
    rows = []
    for x, y in pairs:
        rows += cm.correlation_rows(value[x], value[y], rep[x], rep[y], names[x], names[y], n_boot=method.bootstrap,
                                    n_perm=method.permutations, seed=method.seed)
    return pd.DataFrame(rows, columns=CORRELATION_COLUMNS)


def robustness_table(spec: RunSpec, sums: pd.DataFrame, models: pd.DataFrame) -> pd.DataFrame:
    """Per sub-committee (k, trial): the score-accuracy correlation within it."""
    columns = ["k", "trial", "method", "coefficient", "p_value", "n"]
    if sums.empty:
        return pd.DataFrame(columns=columns)
    accuracy = models.set_index("model_id")["accuracy"]
    totals = sums.groupby(["k", "trial", "model_id"], as_index=False)[["score_sum", "n_voted"]].sum()
    rows = []
    for (k, trial), group in totals.groupby(["k", "trial"]):
        with np.errstate(invalid="ignore", divide="ignore"):
            score = group["score_sum"].to_numpy() / group["n_voted"].to_numpy()
        acc = accuracy.loc[group["model_id"]].to_numpy()
        for method in ("spearman", "pearson"):
            coef, p = cm.correlation(score, acc, method)
            rows.append({"k": int(k), "trial": int(trial), "method": method, "coefficient": coef,
                         "p_value": p, "n": int(len(group))})
    return pd.DataFrame(rows, columns=columns)
