"""How members' statistics relate across the committee, and how sure that is, as plain functions.

Step 5 of the protocol of Li et al. (arXiv 2109.00707), after the consensus math of ``consensus.py``:
a member's mean consensus score is correlated with its accuracy (and with its mask alignment).

* ``correlation``: one coefficient and scipy's p-value; ``correlations``: many paired samples at once
  (bootstrap replicates, permutations), each equal to ``correlation``'s coefficient.
* ``permutation_p_value``: the pairing of the members' two statistics shuffled, exact for small K.
* Two intervals, both on Fisher's z scale (``fisher_interval``): one over images (``block_bootstrap_means``
  resamples blocks of images, so every shard's aggregates suffice) and one over members
  (``member_bootstrap`` resamples the committee).
* ``correlation_rows``: all of these for two per-member statistics (``MemberStatistic``), one row per
  method and interval, as the correlations table stores them.

Only numpy and scipy.stats are used; the helpers for choices, safe division, cosine and the block
size are consensus.py's.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from ray_consensus.results.consensus import _BLOCK_ELEMENTS, _check_choice, _cosine, _divide

CORRELATIONS = ("pearson", "spearman", "kendall")

_SCIPY_CORRELATIONS = {
    "pearson": stats.pearsonr,
    "spearman": stats.spearmanr,
    "kendall": stats.kendalltau,
}


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


@dataclass(frozen=True)
class MemberStatistic:
    """One statistic of every committee member, as ``correlation_rows`` relates two of them.

    name: what it is called in the rows (e.g. ``consensus_score``, ``accuracy``).
    values: (K,) float, each member's value; a member non-finite on either side does not count.
    replicates: (B, K) float, the same statistic in B image-bootstrap replicates
        (``block_bootstrap_means``), for the interval over images; B may be 0.
    """

    name: str
    values: np.ndarray
    replicates: np.ndarray


def correlation_rows(x: MemberStatistic, y: MemberStatistic, n_boot: int = 1000, n_perm: int = 10000,
                     seed: int = 0, ci: float = 0.95, methods: tuple[str, ...] = CORRELATIONS) -> list[dict]:
    """Correlate two per-member statistics, with two intervals and a permutation p-value.

    Args:
        x, y: the two statistics, over the same K members in the same order.
        n_boot: member-bootstrap replicates, for the interval over members.
        n_perm, seed, ci: see ``permutation_p_value``, ``member_bootstrap``, ``fisher_interval``.

    Returns:
        Per method two rows with keys ``x, y, method, coefficient, p_value`` (scipy's),
        ``p_permutation``, ``ci_over`` (``images``: how precisely the members' statistics are
        known from this image sample; ``members``: how much the coefficient depends on which
        members the committee has), ``ci_low, ci_high, n`` (members counted).
    """
    xv, yv = np.asarray(x.values, np.float64), np.asarray(y.values, np.float64)
    keep = np.isfinite(xv) & np.isfinite(yv)
    rows = []
    for method in methods:
        coefficient, p_value = correlation(xv, yv, method)
        p_perm = permutation_p_value(xv[keep], yv[keep], method, n_perm, seed) if keep.sum() >= 3 else math.nan
        over = {"images": correlations(np.asarray(x.replicates)[:, keep], np.asarray(y.replicates)[:, keep], method)
                if len(x.replicates) else np.array([]),
                "members": member_bootstrap(xv[keep], yv[keep], method, n_boot, seed) if keep.sum() >= 3 else
                np.array([])}
        for ci_over, replicates in over.items():
            low, high = fisher_interval(coefficient, replicates, ci)
            rows.append({"x": x.name, "y": y.name, "method": method, "coefficient": coefficient, "p_value": p_value,
                         "p_permutation": p_perm, "ci_over": ci_over, "ci_low": low, "ci_high": high,
                         "n": int(keep.sum())})
    return rows
