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
5. ``correlation`` / ``correlation_rows`` relate members' mean consensus scores to their
   accuracy: coefficients, scipy's and permutation p-values, and two intervals, one resampling
   images (``block_bootstrap_means``) and one resampling members (``member_bootstrap``), both on
   Fisher's z scale (``fisher_interval``).

Maps are float arrays whose last axis is the pixel axis (an H x W map flattened row-major,
so P = H * W); all leading axes are batch axes (images, models, ...). Only numpy and
scipy.stats are used, so the functions run anywhere the reducer or the report runs.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from scipy import stats

NORMALISATIONS = ("abs_l2", "positive_l2", "max", "rank")
VOTE_RULES = ("mean", "median", "trimmed_mean", "rank_mean")
SIMILARITIES = ("cosine", "pearson", "spearman", "topk_iou")
ALIGNMENTS = ("ap", "roc_auc", "pointing_game")
CORRELATIONS = ("pearson", "spearman", "kendall")

_SCIPY_CORRELATIONS = {
    "pearson": stats.pearsonr,
    "spearman": stats.spearmanr,
    "kendall": stats.kendalltau,
}

# Work in blocks of about this many elements so temporaries stay near 32 MiB each, whatever
# the shard size: the bootstrap's (replicates x images) count matrix and the sorted-score
# arrays of ``alignment`` (a shard holds ~256 images x 80 models x 4096 pixels).
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


def _top_k_count(n_pixels: int, top_fraction: float) -> int:
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction!r}")
    # Round first so that e.g. 0.07 * 100 = 7.000000000000001 gives k = 7, not 8.
    return max(1, math.ceil(round(top_fraction * n_pixels, 9)))


def _top_k_mask(x: np.ndarray, k: int) -> np.ndarray:
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
    k = _top_k_count(a.shape[-1], top_fraction)
    overlap = np.sum(_top_k_mask(a, k) & _top_k_mask(b, k), axis=-1)
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


# --- 5. correlations between models' statistics -----------------------------------------


def correlation(x: np.ndarray, y: np.ndarray, method: str) -> tuple[float, float]:
    """Correlation coefficient of paired values and its two-sided p-value.

    Args:
        x, y: (n,) float, one value per model; pairs where either value is not finite are
            dropped first.
        method: ``pearson``, ``spearman`` or ``kendall`` (scipy.stats ``pearsonr``,
            ``spearmanr``, ``kendalltau`` with their defaults).

    Returns:
        (coefficient, p_value); (NaN, NaN) when fewer than 3 pairs remain or either side
        is constant.
    """
    _check_choice(method, CORRELATIONS, "correlation method")
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"x and y must be 1-d of equal length, got {x.shape} and {y.shape}")
    finite = np.isfinite(x) & np.isfinite(y)
    x, y = x[finite], y[finite]
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    result = _SCIPY_CORRELATIONS[method](x, y)
    return float(result.statistic), float(result.pvalue)


def correlations(x: np.ndarray, y: np.ndarray, method: str) -> np.ndarray:
    """Coefficients of many paired samples at once: row r of x and y is one sample.

    Args:
        x, y: (R, n) float, one row per sample (e.g. per bootstrap replicate or permutation).
        method: ``pearson``, ``spearman`` (Pearson of average ranks) or ``kendall`` (tau-b,
            scipy's default), each equal to ``correlation(x[r], y[r], method)[0]``.

    Returns:
        (R,) float64; NaN for a row with fewer than 3 finite pairs or a constant side. Rows
        with a non-finite value are computed pair-dropping, one at a time.
    """
    _check_choice(method, CORRELATIONS, "correlation method")
    x, y = np.atleast_2d(np.asarray(x, np.float64)), np.atleast_2d(np.asarray(y, np.float64))
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {x.shape} and {y.shape}")
    out = np.full(len(x), np.nan)
    whole = np.isfinite(x).all(axis=1) & np.isfinite(y).all(axis=1)
    for r in np.flatnonzero(~whole):
        out[r] = correlation(x[r], y[r], method)[0]
    xs, ys = x[whole], y[whole]
    if not len(xs) or xs.shape[1] < 3:
        return out
    defined = (np.ptp(xs, axis=1) > 0) & (np.ptp(ys, axis=1) > 0)
    if method == "kendall":
        values = _kendall_tau_b(xs, ys)
    else:
        if method == "spearman":
            xs, ys = stats.rankdata(xs, axis=1), stats.rankdata(ys, axis=1)
        values = np.clip(_cosine(xs - xs.mean(axis=1, keepdims=True), ys - ys.mean(axis=1, keepdims=True)), -1, 1)
    out[whole] = np.where(defined, values, np.nan)
    return out


def _kendall_tau_b(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """tau-b of each row pair: (concordant - discordant) / sqrt((n0 - ties in x)(n0 - ties in y)),
    n0 = n(n-1)/2 pairs, counted over i < j in blocks of rows."""
    n = x.shape[1]
    i, j = np.triu_indices(n, k=1)
    out = np.empty(len(x))
    rows = max(1, _BLOCK_ELEMENTS // max(len(i), 1))
    for start in range(0, len(x), rows):
        dx = np.sign(x[start:start + rows, i] - x[start:start + rows, j])
        dy = np.sign(y[start:start + rows, i] - y[start:start + rows, j])
        n0 = len(i)
        denominator = np.sqrt((n0 - np.sum(dx == 0, axis=1)) * (n0 - np.sum(dy == 0, axis=1)))
        out[start:start + rows] = _divide(np.sum(dx * dy, axis=1), denominator, fill=np.nan)
    return out


def block_bootstrap_means(sums: np.ndarray, counts: np.ndarray, n_boot: int, seed: int = 0) -> np.ndarray:
    """Bootstrap replicates of ratio means over resampled blocks of images.

    Args:
        sums, counts: (n_blocks, C) float: per block of images, the sum of a statistic and how
            many images it counts, for C statistics (e.g. each member's consensus score).
        n_boot: replicates. Replicate b draws n_blocks blocks with replacement
            (``rng.integers(0, n_blocks, n_blocks)``, the b-th such draw of
            ``numpy.random.default_rng(seed)``) and weighs each block by how often it was drawn.
        seed: seed of the generator.

    Returns:
        (n_boot, C) float64: sum over drawn blocks of sums / of counts (NaN where 0 counted).
        With one image per block this is the ordinary bootstrap over images.
    """
    sums, counts = np.asarray(sums, np.float64), np.asarray(counts, np.float64)
    n_blocks = len(sums)
    out = np.full((n_boot, sums.shape[1]), np.nan)
    if not n_blocks:
        return out
    rng = np.random.default_rng(seed)
    chunk = max(1, (_BLOCK_ELEMENTS // 4) // n_blocks)  # replicates at once: temporaries of ~8 MiB
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        drawn = np.stack([rng.integers(0, n_blocks, size=n_blocks) for _ in range(size)])
        weights = np.bincount((drawn + n_blocks * np.arange(size)[:, None]).ravel(),
                              minlength=size * n_blocks).reshape(size, n_blocks).astype(np.float64)
        out[start:start + size] = _divide(weights @ sums, weights @ counts, fill=np.nan)
    return out


def member_bootstrap(x: np.ndarray, y: np.ndarray, method: str, n_boot: int, seed: int = 0) -> np.ndarray:
    """Correlations of the committee resampled: replicate b draws K members with replacement
    (``rng.integers(0, K, K)`` from ``numpy.random.default_rng(seed)``) and correlates their pairs.

    x, y: (K,) one value per member, all finite. Returns (n_boot,) float64, NaN for replicates
    whose draw leaves a side constant (few distinct members: frequent when K is small).
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(x), size=(n_boot, len(x)))
    return correlations(x[draws], y[draws], method)


def permutation_p_value(x: np.ndarray, y: np.ndarray, method: str, n_perm: int = 10000, seed: int = 0) -> float:
    """Two-sided permutation p-value of the correlation of paired values under exchangeable pairing.

    Exact when all K! pairings number at most `n_perm` (the share of pairings whose |coefficient|
    reaches the observed one); else Monte Carlo with `n_perm` seeded random pairings,
    (1 + reaching) / (1 + n_perm). x, y: (K,) finite. NaN when the coefficient is undefined.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    observed = correlation(x, y, method)[0]
    if not np.isfinite(observed):
        return math.nan
    k = len(x)
    exact = math.factorial(k) <= n_perm
    if exact:
        orders = np.array(list(itertools.permutations(range(k))), dtype=np.int64)
    else:
        rng = np.random.default_rng(seed)
        orders = np.argsort(rng.random((n_perm, k)), axis=1)
    values = correlations(np.broadcast_to(x, orders.shape), y[orders], method)
    reaching = int(np.sum(np.abs(values) >= abs(observed) - 1e-12))
    return reaching / len(orders) if exact else (1 + reaching) / (1 + len(orders))


# A correlation of exactly +-1 (frequent when resampling a small committee leaves few distinct members)
# enters Fisher's z as +-0.999 (z = +-3.8): its atanh, infinite, would swamp every other replicate.
FISHER_EDGE = 0.999


def fisher_interval(coefficient: float, replicates: np.ndarray, ci: float = 0.95) -> tuple[float, float]:
    """A bootstrap interval for a correlation that always contains it: normal on Fisher's z scale,
    tanh(atanh(r) -/+ z_ci * sd(atanh(r*))), r* the defined replicates, both clipped to
    +-FISHER_EDGE, and the interval widened to the estimate if clipping moved it past.

    It stays inside [-1, 1] and, centred on the estimate, cannot exclude it (percentile intervals
    can, when the replicates are skewed). (NaN, NaN) with fewer than 2 replicates.
    """
    reps = np.asarray(replicates, np.float64)
    reps = reps[np.isfinite(reps)]
    if not np.isfinite(coefficient) or len(reps) < 2:
        return math.nan, math.nan
    centre = math.atanh(min(max(coefficient, -FISHER_EDGE), FISHER_EDGE))
    half = stats.norm.ppf((1 + ci) / 2) * float(np.std(np.arctanh(np.clip(reps, -FISHER_EDGE, FISHER_EDGE)), ddof=1))
    return min(math.tanh(centre - half), coefficient), max(math.tanh(centre + half), coefficient)


def correlation_rows(x: np.ndarray, y: np.ndarray, x_reps: np.ndarray, y_reps: np.ndarray, x_name: str,
                     y_name: str, n_boot: int = 1000, n_perm: int = 10000, seed: int = 0, ci: float = 0.95,
                     methods: tuple[str, ...] = CORRELATIONS) -> list[dict]:
    """Correlate two per-member statistics, with two intervals and a permutation p-value.

    Args:
        x, y: (K,) each member's statistic (e.g. mean consensus score, accuracy); members with a
            non-finite value on either side do not count.
        x_reps, y_reps: (B, K) the same statistics in B image-bootstrap replicates
            (``block_bootstrap_means``), for the interval over images.
        n_boot: member-bootstrap replicates, for the interval over members.
        n_perm, seed, ci: see ``permutation_p_value``, ``member_bootstrap``, ``fisher_interval``.

    Returns:
        Per method two rows with keys ``x, y, method, coefficient, p_value`` (scipy's),
        ``p_permutation``, ``ci_over`` (``images``: how precisely the members' statistics are
        known from this image sample; ``members``: how much the coefficient depends on which
        members the committee has), ``ci_low, ci_high, n`` (members counted).
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    rows = []
    for method in methods:
        coefficient, p_value = correlation(x, y, method)
        p_perm = permutation_p_value(x[keep], y[keep], method, n_perm, seed) if keep.sum() >= 3 else math.nan
        over = {"images": correlations(np.asarray(x_reps)[:, keep], np.asarray(y_reps)[:, keep], method)
                if len(x_reps) else np.array([]),
                "members": member_bootstrap(x[keep], y[keep], method, n_boot, seed) if keep.sum() >= 3 else
                np.array([])}
        for ci_over, replicates in over.items():
            low, high = fisher_interval(coefficient, replicates, ci)
            rows.append({"x": x_name, "y": y_name, "method": method, "coefficient": coefficient, "p_value": p_value,
                         "p_permutation": p_perm, "ci_over": ci_over, "ci_low": low, "ci_high": high,
                         "n": int(keep.sum())})
    return rows
