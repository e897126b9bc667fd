"""Recompute a finished run's consensus, consensus scores and mask alignment from storage alone,
independently of the package's own math, and compare with what the run stored.

    .venv/bin/python scripts/verify_run.py RUN_ROOT

Valid for runs with the DESIGN section 3 defaults (abs + L2 normalisation, mean vote, cosine
score, all images voted) and a gradient explainer (maps voted per pixel). Prints the largest
deviations and the paper's two phenomena (consensus AP vs the median member's, Spearman of
consensus score vs accuracy); exits 1 if a deviation exceeds 1e-4.
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq


def average_precision(score: np.ndarray, positive: np.ndarray) -> float:
    """AP = sum over distinct thresholds of (recall step) x precision, ties as one threshold."""
    order = np.argsort(-score, kind="stable")
    s, y = score[order], positive[order].astype(float)
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    tp = np.cumsum(y)[last_of_tie]
    seen = np.arange(1, len(s) + 1)[last_of_tie]
    recall = tp / y.sum()
    precision = tp / seen
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def main(root: str) -> int:
    attrs = pq.read_table(f"{root}/attributions").to_pandas()
    consensus = pq.read_table(f"{root}/consensus").to_pandas().set_index("image_id")
    scores = pq.read_table(f"{root}/scores").to_pandas()
    models = pd.read_parquet(f"{root}/tables/models.parquet").set_index("model_id")
    model_ids = [m for m in models.index if m != "consensus"]
    worst_c = worst_s = worst_ap = 0.0
    ap_member: dict[str, list[float]] = {m: [] for m in model_ids}
    ap_consensus = []
    stored = scores.set_index(["image_id", "model_id"])
    for image_id, group in attrs.groupby("image_id"):
        group = group.set_index("model").loc[model_ids]
        maps = np.abs(np.stack([np.asarray(a, np.float64) for a in group["attribution"]]))
        norms = np.linalg.norm(maps, axis=1, keepdims=True)
        maps = np.divide(maps, norms, out=np.zeros_like(maps), where=norms > 0)
        c = maps.mean(axis=0)
        worst_c = max(worst_c, float(np.abs(np.asarray(consensus.loc[image_id, "consensus"]) - c).max()))
        cos = maps @ c / np.maximum(np.linalg.norm(maps, axis=1) * np.linalg.norm(c), 1e-300)
        for m, value in zip(model_ids, cos):
            worst_s = max(worst_s, abs(float(stored.loc[(image_id, m), "consensus_score"]) - value))
        mask = consensus.loc[image_id, "mask"] if "mask" in consensus.columns else None
        if mask is not None and 0 < np.sum(mask) < len(mask):
            positive = np.asarray(mask) > 0
            ap_c = average_precision(c, positive)
            ap_consensus.append(ap_c)
            worst_ap = max(worst_ap, abs(ap_c - float(consensus.loc[image_id, "ap"])))
            for m, row in zip(model_ids, maps):
                ap_member[m].append(average_precision(row, positive))
    print(f"max |consensus - recomputed|       = {worst_c:.2e}")
    print(f"max |consensus_score - recomputed| = {worst_s:.2e}")
    ok = worst_c <= 1e-4 and worst_s <= 1e-4
    if ap_consensus:
        mean_c = float(np.mean(ap_consensus))
        member_means = {m: float(np.mean(v)) for m, v in ap_member.items()}
        median_member = float(np.median(list(member_means.values())))
        stored_c = float(models.loc["consensus", "ap"])
        print(f"max |ap - recomputed| (consensus)  = {worst_ap:.2e}")
        print(f"consensus mean AP {mean_c:.4f} (stored {stored_c:.4f}); median member mean AP {median_member:.4f}; "
              f"consensus >= median member: {mean_c >= median_member}")
        ok = ok and worst_ap <= 1e-4 and abs(mean_c - stored_c) <= 1e-4
    corr = pd.read_parquet(f"{root}/tables/correlations.parquet")
    sp = corr[(corr.x == "consensus_score") & (corr.y == "accuracy") & (corr.method == "spearman")]
    first = sp.iloc[0]
    intervals = ", ".join(f"over {r.ci_over} [{r.ci_low:.3f}, {r.ci_high:.3f}]" for r in sp.itertuples())
    print(f"Spearman(consensus score, accuracy) = {first.coefficient:.3f} (p = {first.p_value:.3g}, permutation "
          f"p = {first.p_permutation:.3g}; 95% CI {intervals}; n = {first.n})")
    acc = models.loc[model_ids, "accuracy"]
    print(f"accuracy span: {acc.min():.3f} .. {acc.max():.3f} ({acc.max() - acc.min():.3f}) over {len(acc)} models")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
