"""Run-level tables from the reduced shards: models, correlations, robustness.

    write_tables: read scores/, consensus/, subcommittees/ (contract) ─► the tables below ─► tables/*.parquet, .csv

The table functions take and return pandas DataFrames; the statistics are `consensus.py`'s.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from ray_consensus import consensus as cm
from ray_consensus.config import RunSpec
from ray_consensus.contract import read_per_shard

from ray_consensus.storage import Store

def write_tables(spec: RunSpec, store: Store, shards: list[int]) -> dict:
    """Compute and write tables/{models,correlations,robustness}.{parquet,csv}; returns the voted count."""
    scores = read_per_shard(store, "scores", shards)
    consensus = read_per_shard(store, "consensus", shards)
    consensus = consensus.drop(columns=[c for c in ("consensus", "mask") if c in consensus.columns])
    models = models_table(spec, scores, consensus)
    frames = {"models": models, "correlations": correlations_table(spec, scores),
              "robustness": robustness_table(spec, read_per_shard(store, "subcommittees", shards), models)}
    for name, frame in frames.items():
        table = pa.Table.from_pandas(frame, preserve_index=False)
        store.write_parquet(f"tables/{name}.parquet", table)
        store.write_csv(f"tables/{name}.csv", table)
    return {"consensus_voted": int(consensus["voted"].sum()) if len(consensus) else 0}

def per_image_matrix(scores: pd.DataFrame, column: str, model_ids: list[str], voted_only: bool) -> np.ndarray:
    """scores rows -> (K, N) matrix of `column`, NaN where the image is not counted for the model."""
    values = scores[column].astype(float).where(scores["voted"] | (not voted_only))
    wide = values.set_axis(pd.MultiIndex.from_frame(scores[["model_id", "image_id"]])).unstack("image_id")
    return wide.reindex(model_ids).to_numpy(dtype=float)

def models_table(spec: RunSpec, scores: pd.DataFrame, consensus: pd.DataFrame) -> pd.DataFrame:
    """One row per member (and a `consensus` row for the alignment of the vote itself)."""
    has_masks = "ap" in scores.columns
    rows = []
    for member in spec.committee:
        s = scores[scores["model_id"] == member.id]
        voted = s[s["voted"]]
        row = {"model_id": member.id, "arch": member.arch, "accuracy": float(s["correct"].mean()),
               "n_images": int(len(s)), "n_voted": int(len(voted)),
               "consensus_score": float(voted["consensus_score"].mean()) if len(voted) else float("nan")}
        if has_masks:
            for metric in cm.ALIGNMENTS:
                row[metric] = float(voted[metric].mean())
        rows.append(row)
    table = pd.DataFrame(rows)
    if has_masks:
        voted = consensus[consensus["voted"]]
        row = {"model_id": "consensus", "arch": f"vote of {len(spec.committee)} models", "accuracy": float("nan"),
               "n_images": int(len(consensus)), "n_voted": int(len(voted)), "consensus_score": float("nan")}
        row.update({metric: float(voted[metric].mean()) for metric in cm.ALIGNMENTS})
        table = pd.concat([table, pd.DataFrame([row])], ignore_index=True)
    return table

def correlations_table(spec: RunSpec, scores: pd.DataFrame) -> pd.DataFrame:
    """Consensus score (and mask alignment) against accuracy, with p-values and bootstrap CIs."""
    ids = [m.id for m in spec.committee]
    method = spec.method
    accuracy = per_image_matrix(scores, "correct", ids, voted_only=False)
    pairs = [("consensus_score", per_image_matrix(scores, "consensus_score", ids, True), "accuracy", accuracy)]
    if "ap" in scores.columns:
        ap = per_image_matrix(scores, "ap", ids, True)
        pairs += [("ap", ap, "accuracy", accuracy),
                  ("consensus_score", per_image_matrix(scores, "consensus_score", ids, True), "ap", ap)]
    rows = []
    for x_name, x, y_name, y in pairs:
        rows += cm.correlation_table(x, y, x_name, y_name, n_boot=method.bootstrap, seed=method.seed)
    return pd.DataFrame(rows, columns=["x", "y", "method", "coefficient", "p_value", "ci_low", "ci_high", "n"])

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
