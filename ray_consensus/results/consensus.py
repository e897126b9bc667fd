"""Consensus math of Li et al. (arXiv 2109.00707), as plain array-in/array-out functions.

The protocol, line by line:

1. ``normalise`` every model's attribution map (default: ``m <- |m|``, ``m <- m / ||m||_2``).
2. ``vote`` the normalised maps of the K committee members into a consensus map
   (default: the pixel-wise mean); ``leave_one_out_votes`` gives, for each member,
   the vote of the other K-1.
3. ``similarity`` of each member's map to the consensus is its consensus score on that
   image (default: cosine); a model's consensus score is the mean over images.
4. ``alignment`` of a map, used as a pixel score, with a ground-truth mask (default:
   average precision).
5. the correlation of members' mean consensus scores with their accuracy, and its uncertainty,
   is ``correlation.py``'s.

Maps are float arrays whose last axis is the pixel axis (an H x W map flattened row-major,
so P = H * W); all leading axes are batch axes (images, models, ...). Only numpy and
scipy.stats are used, so the functions run anywhere the reducer or the report runs.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

NORMALISATIONS = ("abs_l2", "positive_l2", "max", "rank")
VOTE_RULES = ("mean", "median", "trimmed_mean", "rank_mean")
SIMILARITIES = ("cosine", "pearson", "spearman", "topk_iou")
ALIGNMENTS = ("ap", "roc_auc", "pointing_game")

# Work in blocks of about this many elements so temporaries stay near 32 MiB each, whatever
# the shard size: the sorted-score arrays of ``alignment`` (a shard holds ~256 images x 80 models
# x 4096 pixels), and correlation.py's bootstrap (replicates x images) count matrix.
_BLOCK_ELEMENTS = 1 << 22


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; expected one of: {', '.join(choices)}")


def _check_trim(trim: float) -> None:
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim!r}")


def _scaled_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks along the last axis (ties averaged) mapped linearly from 1..P onto [0, 1]."""
    n_pixels = x.shape[-1]
    return (stats.rankdata(x, axis=-1) - 1.0) / max(n_pixels - 1, 1)


def _divide(numerator: np.ndarray, denominator: np.ndarray, fill: float) -> np.ndarray:
    """``numerator / denominator``, with ``fill`` where the denominator is 0 (no warning)."""
    out = np.full(np.broadcast_shapes(numerator.shape, denominator.shape), fill, dtype=np.float64)
    return np.divide(numerator, denominator, out=out, where=denominator != 0)


# --- 1. normalisation -------------------------------------------------------------------


def normalise(maps: np.ndarray, method: str = "abs_l2") -> np.ndarray:
    """Normalise attribution maps pixel-wise so that maps of different models are comparable.

    Args:
        maps: (..., P) float, one raw map per leading index.
        method: ``abs_l2`` (the paper's: ``|m| / || |m| ||_2``), ``positive_l2``
            (``max(m, 0)`` then L2), ``max`` (``|m| / max |m|``) or ``rank`` (ranks of
            ``|m|``, ties averaged, scaled so the smallest is 0 and the largest is 1).

    Returns:
        (..., P) float64, non-negative. A map that is all zero (for ``positive_l2``: has no
        positive pixel) is returned as all zero by every method, never NaN.
    """
    _check_choice(method, NORMALISATIONS, "normalisation")
    maps = np.asarray(maps, dtype=np.float64)
    if method == "positive_l2":
        magnitude = np.maximum(maps, 0.0)
    else:
        magnitude = np.abs(maps)
    if method == "rank":
        has_signal = np.any(magnitude != 0, axis=-1, keepdims=True)
        return _scaled_ranks(magnitude) * has_signal
    if method == "max":
        scale = magnitude.max(axis=-1, keepdims=True)
    else:
        scale = np.sqrt(np.sum(magnitude * magnitude, axis=-1, keepdims=True))
    return _divide(magnitude, scale, fill=0.0)


# --- 2. voting --------------------------------------------------------------------------


def vote(maps: np.ndarray, rule: str = "mean", axis: int = 0, trim: float = 0.1) -> np.ndarray:
    """Vote the normalised maps of K committee members into one consensus map per image.

    Args:
        maps: (K, ..., P) float normalised maps; ``axis`` is the committee axis.
        rule: ``mean`` (the paper's), ``median``, ``trimmed_mean`` (drops ``trim`` of the
            members at each end of every pixel, ``scipy.stats.trim_mean`` semantics:
            ``int(trim * K)`` values each side) or ``rank_mean`` (mean of each member's map
            converted to pixel ranks scaled to [0, 1], see ``normalise(..., "rank")``).
        axis: committee axis; must not be the last (pixel) axis.
        trim: fraction cut at each end for ``trimmed_mean``, in [0, 0.5).

    Returns:
        (..., P) float64 consensus maps (``maps`` without the committee axis).
    """
    _check_choice(rule, VOTE_RULES, "vote rule")
    maps = np.asarray(maps, dtype=np.float64)
    axis = axis % maps.ndim
    if axis == maps.ndim - 1:
        raise ValueError("the committee axis cannot be the last (pixel) axis")
    if rule == "mean":
        return maps.mean(axis=axis)
    if rule == "median":
        return np.median(maps, axis=axis)
    if rule == "trimmed_mean":
        _check_trim(trim)
        return stats.trim_mean(maps, trim, axis=axis)
    return normalise(maps, "rank").mean(axis=axis)


def _leave_one_out_order_statistic(ranked: np.ndarray, position: np.ndarray, j: int) -> np.ndarray:
    """For every member k, the j-th smallest (0-based) of the K-1 values without member k.

    ``ranked`` is the (K, ...) stack sorted along axis 0 and ``position`` the sorted
    position of each member; removing member k shifts every order statistic at or
    above its position up by one slot.
    """
    return np.take_along_axis(ranked, j + (j >= position), axis=0)


def leave_one_out_votes(maps: np.ndarray, rule: str = "mean", trim: float = 0.1) -> np.ndarray:
    """The vote of all members but k, for each member k, without K separate votes.

    Args:
        maps: (K, ..., P) float normalised maps, committee on axis 0, K >= 2.
        rule, trim: as in ``vote``; ``trimmed_mean`` trims ``int(trim * (K - 1))`` values
            at each end of the K-1 remaining ones.

    Returns:
        (K, ..., P) float64: entry k equals ``vote(np.delete(maps, k, 0), rule, trim=trim)``.
    """
    _check_choice(rule, VOTE_RULES, "vote rule")
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim < 2 or maps.shape[0] < 2:
        raise ValueError(
            f"leave-one-out votes need maps of shape (K, ..., P) with K >= 2, got {maps.shape}"
        )
    n_members = maps.shape[0]
    if rule == "rank_mean":
        maps, rule = normalise(maps, "rank"), "mean"
    if rule == "mean":
        return (maps.sum(axis=0) - maps) / (n_members - 1)

    # Median and trimmed mean are built from order statistics: sort the K values once.
    order = np.argsort(maps, axis=0)
    ranked = np.take_along_axis(maps, order, axis=0)
    position = np.empty_like(order)
    member = np.arange(n_members).reshape((n_members,) + (1,) * (maps.ndim - 1))
    np.put_along_axis(position, order, np.broadcast_to(member, order.shape), axis=0)
    n_rest = n_members - 1
    if rule == "median":
        low = _leave_one_out_order_statistic(ranked, position, (n_rest - 1) // 2)
        high = _leave_one_out_order_statistic(ranked, position, n_rest // 2)
        return (low + high) / 2.0
    _check_trim(trim)
    cut = int(trim * n_rest)
    # The kept values are sorted slots cut .. n_members-cut-1 minus one slot: member k's own
    # slot when it is inside that range, otherwise the end slot its removal pulls in.
    kept_sum = ranked[cut : n_members - cut].sum(axis=0)
    dropped = np.take_along_axis(ranked, np.clip(position, cut, n_members - 1 - cut), axis=0)
    return (kept_sum - dropped) / (n_rest - 2 * cut)


# --- 3. similarity to the consensus -----------------------------------------------------


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine along the last axis; 0 where either vector is all zero."""
    norms = np.sqrt(np.sum(a * a, axis=-1) * np.sum(b * b, axis=-1))
    return np.clip(_divide(np.sum(a * b, axis=-1), norms, fill=0.0), -1.0, 1.0)


def _pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r along the last axis; NaN where either vector is constant."""
    r = _cosine(a - a.mean(axis=-1, keepdims=True), b - b.mean(axis=-1, keepdims=True))
    # Test constancy exactly: the centred vector of a constant can be ~1e-17, not 0.
    constant = (np.ptp(a, axis=-1) == 0) | (np.ptp(b, axis=-1) == 0)
    return np.where(constant, np.nan, r)


def top_k_count(n_pixels: int, top_fraction: float) -> int:
    """How many of `n_pixels` the top `top_fraction` keeps (at least 1): the one rounding rule of the
    top-k IoU score and of the pseudo masks' `top` rule."""
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction!r}")
    # Round first so that e.g. 0.07 * 100 = 7.000000000000001 gives k = 7, not 8.
    return max(1, math.ceil(round(top_fraction * n_pixels, 9)))


def top_k_mask(x: np.ndarray, k: int) -> np.ndarray:
    """Boolean (..., P) mask of the k largest pixels; among ties the lower index wins."""
    top = np.argsort(-x, axis=-1, kind="stable")[..., :k]
    mask = np.zeros(x.shape, dtype=bool)
    np.put_along_axis(mask, top, True, axis=-1)
    return mask


def similarity(
    a: np.ndarray, b: np.ndarray, measure: str = "cosine", top_fraction: float = 0.1
) -> np.ndarray:
    """Similarity of two maps along the pixel axis, e.g. a member's map and the consensus.

    Args:
        a, b: (..., P) float maps, broadcastable against each other.
        measure: ``cosine`` (the paper's; 0 where either map is all zero), ``pearson`` or
            ``spearman`` (NaN where either map is constant), or ``topk_iou``: intersection
            over union of the ``k = ceil(top_fraction * P)`` largest pixels of each map
            (ties at the cut go to the lower pixel index; 0 where either map is all zero).
        top_fraction: fraction of pixels kept by ``topk_iou``, in (0, 1].

    Returns:
        (...) float64, in [-1, 1] (``topk_iou``: [0, 1]).
    """
    _check_choice(measure, SIMILARITIES, "similarity measure")
    a, b = np.broadcast_arrays(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
    if measure == "cosine":
        return _cosine(a, b)
    if measure == "pearson":
        return _pearson(a, b)
    if measure == "spearman":
        return _pearson(_scaled_ranks(a), _scaled_ranks(b))
    k = top_k_count(a.shape[-1], top_fraction)
    overlap = np.sum(top_k_mask(a, k) & top_k_mask(b, k), axis=-1)
    iou = overlap / (2 * k - overlap)
    has_signal = np.any(a != 0, axis=-1) & np.any(b != 0, axis=-1)
    return np.where(has_signal, iou, 0.0)


# --- 4. alignment with ground-truth masks -----------------------------------------------


def _average_precision(scores: np.ndarray, mask: np.ndarray, n_positive: np.ndarray) -> np.ndarray:
    """AP = sum_n (R_n - R_{n-1}) P_n over the distinct score thresholds, best first."""
    order = np.argsort(-scores, axis=-1)
    ranked_scores = np.take_along_axis(scores, order, axis=-1)
    true_positives = np.cumsum(np.take_along_axis(mask, order, axis=-1), axis=-1)
    # A threshold is the last pixel of a run of equal scores: tied pixels enter together.
    is_threshold = np.ones(scores.shape, dtype=bool)
    is_threshold[..., :-1] = ranked_scores[..., :-1] != ranked_scores[..., 1:]
    precision = true_positives / np.arange(1, scores.shape[-1] + 1)
    # True positives at the previous threshold: cumulative counts never decrease, so a
    # running maximum over the threshold slots carries the last one forward.
    at_threshold = np.maximum.accumulate(np.where(is_threshold, true_positives, 0), axis=-1)
    previous = np.zeros_like(at_threshold)
    previous[..., 1:] = at_threshold[..., :-1]
    new_positives = np.where(is_threshold, true_positives - previous, 0)
    return _divide(np.sum(new_positives * precision, axis=-1), n_positive, fill=np.nan)


def _roc_auc(scores: np.ndarray, mask: np.ndarray, n_positive: np.ndarray) -> np.ndarray:
    """Mann-Whitney U / (n_pos * n_neg) from mid-ranks, so a tied pair counts 1/2."""
    n_negative = scores.shape[-1] - n_positive
    positive_rank_sum = np.sum(stats.rankdata(scores, axis=-1) * mask, axis=-1)
    u = positive_rank_sum - n_positive * (n_positive + 1) / 2.0
    return _divide(u, n_positive * n_negative, fill=np.nan)


def alignment(scores: np.ndarray, mask: np.ndarray, metric: str = "ap") -> np.ndarray:
    """How well a map, read as per-pixel scores, picks out the ground-truth foreground.

    Vectorised over all leading axes (no loop over images).

    Args:
        scores: (..., P) float pixel scores (e.g. a normalised map or the consensus).
        mask: (..., P) bool or uint8 foreground mask (non-zero = foreground), broadcastable
            against ``scores`` (e.g. (N, 1, P) masks against (N, K, P) maps).
        metric: ``ap`` (average precision, scikit-learn's definition: tied scores form one
            threshold), ``roc_auc`` (probability that a foreground pixel outscores a
            background pixel, ties counting 1/2) or ``pointing_game`` (1.0 if the highest
            scoring pixel, the first one among ties, is foreground, else 0.0).

    Returns:
        (...) float64. NaN where the mask has no foreground pixel, and for ``ap`` /
        ``roc_auc`` also where it has no background pixel (the metric is undefined there).
    """
    _check_choice(metric, ALIGNMENTS, "alignment metric")
    scores, mask = np.broadcast_arrays(np.asarray(scores, dtype=np.float64), np.asarray(mask) != 0)
    n_positive = mask.sum(axis=-1)
    if metric == "pointing_game":
        hit = np.take_along_axis(mask, scores.argmax(axis=-1)[..., None], axis=-1)[..., 0]
        return np.where(n_positive > 0, hit.astype(np.float64), np.nan)
    n_pixels = scores.shape[-1]
    metric_fn = _average_precision if metric == "ap" else _roc_auc
    # Sorting-based metrics allocate several (..., P) temporaries: go by blocks of rows.
    scores, mask = scores.reshape(-1, n_pixels), mask.reshape(-1, n_pixels)
    flat_positive = n_positive.reshape(-1)
    values = np.empty(len(scores))
    rows = max(1, _BLOCK_ELEMENTS // max(n_pixels, 1))
    for start in range(0, len(scores), rows):
        block = slice(start, start + rows)
        values[block] = metric_fn(scores[block], mask[block], flat_positive[block])
    informative = (n_positive > 0) & (n_positive < n_pixels)
    return np.where(informative, values.reshape(n_positive.shape), np.nan)
