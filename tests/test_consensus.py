"""Specification of the consensus math (ray_consensus.results.consensus, .correlation) by hand-computed cases.

The running example is a committee of 3 models explaining one 2x2 image; maps are
flattened row-major, so pixel order is (top-left, top-right, bottom-left, bottom-right).
"""

import math

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics

from ray_consensus.planning.plan import subcommittees
from ray_consensus.results import consensus
from ray_consensus.results.consensus import alignment, leave_one_out_votes, normalise, similarity, vote
from ray_consensus.results.correlation import (
    CORRELATIONS,
    MemberStatistic,
    block_bootstrap_means,
    correlation,
    correlation_rows,
    correlations,
    fisher_interval,
    member_bootstrap,
    permutation_p_value,
)

# Division by zero or an all-NaN mean anywhere in the math is a bug, not a warning.
pytestmark = pytest.mark.filterwarnings("error")

RAW = np.array(
    [
        [3.0, -4.0, 0.0, 0.0],  # model 1: |m| = (3, 4, 0, 0), ||.||_2 = 5
        [0.0, 2.0, 0.0, 0.0],  # model 2: |m| = (0, 2, 0, 0), ||.||_2 = 2
        [1.0, 1.0, 1.0, -1.0],  # model 3: |m| = (1, 1, 1, 1), ||.||_2 = 2
    ]
)
# abs_l2 of RAW, by hand: |m| / ||m||_2.
NORMALISED = np.array(
    [
        [0.6, 0.8, 0.0, 0.0],
        [0.0, 1.0, 0.0, 0.0],
        [0.5, 0.5, 0.5, 0.5],
    ]
)


# --- normalise --------------------------------------------------------------------------


def test_abs_l2_takes_magnitudes_and_unit_norm():
    np.testing.assert_allclose(normalise(RAW), NORMALISED)
    np.testing.assert_allclose(normalise(RAW, "abs_l2"), NORMALISED)
    assert normalise(RAW.astype(np.float32)).dtype == np.float64


def test_positive_l2_drops_negative_evidence():
    # Positive parts (3,0,0,0), (0,2,0,0), (1,1,1,0); norms 3, 2, sqrt(3).
    s = 1 / math.sqrt(3)
    expected = [[1, 0, 0, 0], [0, 1, 0, 0], [s, s, s, 0]]
    np.testing.assert_allclose(normalise(RAW, "positive_l2"), expected)


def test_max_scales_largest_magnitude_to_one():
    # |m| / max|m|: (3,4,0,0)/4, (0,2,0,0)/2, (1,1,1,1)/1.
    expected = [[0.75, 1, 0, 0], [0, 1, 0, 0], [1, 1, 1, 1]]
    np.testing.assert_allclose(normalise(RAW, "max"), expected)


def test_rank_averages_ties_and_scales_to_unit_interval():
    # Ranks of |m| (1 = smallest, ties share their mean rank), then (rank - 1) / (P - 1):
    # (3,4,0,0) -> ranks (3, 4, 1.5, 1.5) -> (2/3, 1, 1/6, 1/6)
    # (0,2,0,0) -> ranks (2, 4, 2, 2)     -> (1/3, 1, 1/3, 1/3)
    # (1,1,1,1) -> ranks 2.5 each          -> 1/2 each
    expected = [[2 / 3, 1, 1 / 6, 1 / 6], [1 / 3, 1, 1 / 3, 1 / 3], [0.5, 0.5, 0.5, 0.5]]
    np.testing.assert_allclose(normalise(RAW, "rank"), expected)


def test_normalise_works_on_any_leading_shape():
    batch = np.stack([RAW, 2 * RAW])  # (2 images, 3 models, 4 pixels); scale-invariant
    np.testing.assert_allclose(normalise(batch), np.stack([NORMALISED, NORMALISED]))


# --- vote -------------------------------------------------------------------------------


def test_mean_vote_is_pixelwise_mean():
    # ((0.6+0+0.5)/3, (0.8+1+0.5)/3, 0.5/3, 0.5/3)
    expected = np.array([1.1, 2.3, 0.5, 0.5]) / 3
    np.testing.assert_allclose(vote(NORMALISED), expected)
    np.testing.assert_allclose(vote(NORMALISED, "mean"), expected)


def test_median_vote():
    # pixel-wise middle of {0.6,0,0.5}, {0.8,1,0.5}, {0,0,0.5}, {0,0,0.5}
    np.testing.assert_allclose(vote(NORMALISED, "median"), [0.5, 0.8, 0.0, 0.0])


def test_trimmed_mean_cuts_int_trim_times_k_at_each_end():
    # K = 3: trim 0.1 cuts int(0.3) = 0 values (plain mean); trim 0.34 cuts int(1.02) = 1
    # at each end, leaving the median.
    np.testing.assert_allclose(vote(NORMALISED, "trimmed_mean", trim=0.1), vote(NORMALISED))
    np.testing.assert_allclose(
        vote(NORMALISED, "trimmed_mean", trim=0.34), [0.5, 0.8, 0.0, 0.0]
    )


def test_rank_mean_votes_pixel_ranks():
    # Ranks of the normalised maps are those of test_rank_...: pixel means
    # ((2/3+1/3+1/2)/3, (1+1+1/2)/3, (1/6+1/3+1/2)/3, same) = (1/2, 5/6, 1/3, 1/3).
    np.testing.assert_allclose(vote(NORMALISED, "rank_mean"), [0.5, 5 / 6, 1 / 3, 1 / 3])


def test_vote_along_another_committee_axis():
    images = np.stack([NORMALISED, NORMALISED[::-1]], axis=0)  # (2 images, 3 models, 4)
    for rule in consensus.VOTE_RULES:
        np.testing.assert_allclose(
            vote(images, rule, axis=1), vote(images.transpose(1, 0, 2), rule, axis=0)
        )
    with pytest.raises(ValueError, match="pixel"):
        vote(NORMALISED, axis=-1)


# --- leave-one-out ----------------------------------------------------------------------

# The vote of the two others, by hand: mean(m2, m3), mean(m1, m3), mean(m1, m2).
LEAVE_ONE_OUT_MEANS = np.array(
    [
        [0.25, 0.75, 0.25, 0.25],
        [0.55, 0.65, 0.25, 0.25],
        [0.30, 0.90, 0.00, 0.00],
    ]
)


def test_leave_one_out_mean_by_hand():
    np.testing.assert_allclose(leave_one_out_votes(NORMALISED), LEAVE_ONE_OUT_MEANS)
    # The median and the untrimmed mean of two values are their mean.
    np.testing.assert_allclose(leave_one_out_votes(NORMALISED, "median"), LEAVE_ONE_OUT_MEANS)
    np.testing.assert_allclose(
        leave_one_out_votes(NORMALISED, "trimmed_mean", trim=0.34), LEAVE_ONE_OUT_MEANS
    )


@pytest.mark.parametrize("n_models", [2, 6, 7])
@pytest.mark.parametrize(
    "rule, trim",
    [("mean", 0.1), ("median", 0.1), ("trimmed_mean", 0.1), ("trimmed_mean", 0.2),
     ("trimmed_mean", 0.34), ("rank_mean", 0.1)],
)
def test_leave_one_out_equals_vote_without_the_member(n_models, rule, trim):
    rng = np.random.default_rng(n_models)
    # Rounded to one decimal so many values tie, within and across members.
    maps = np.round(rng.random((n_models, 2, 5)), 1)
    expected = np.stack(
        [vote(np.delete(maps, k, axis=0), rule, trim=trim) for k in range(n_models)]
    )
    np.testing.assert_allclose(leave_one_out_votes(maps, rule, trim=trim), expected, atol=1e-12)


def test_leave_one_out_needs_two_models():
    with pytest.raises(ValueError, match="K >= 2"):
        leave_one_out_votes(NORMALISED[:1])


# --- similarity -------------------------------------------------------------------------


def test_cosine_consensus_scores_by_hand():
    # Consensus c = (1.1, 2.3, 0.5, 0.5) / 3; cosine is scale-free and
    # ||(1.1, 2.3, 0.5, 0.5)||^2 = 1.21 + 5.29 + 0.25 + 0.25 = 7, so
    # s1 = (0.6*1.1 + 0.8*2.3)/sqrt(7) = 2.5/sqrt(7), s2 = 2.3/sqrt(7), s3 = 0.5*4.4/sqrt(7).
    expected = np.array([2.5, 2.3, 2.2]) / math.sqrt(7)
    np.testing.assert_allclose(similarity(NORMALISED, vote(NORMALISED)), expected)


def test_leave_one_out_consensus_scores_by_hand():
    # s1 = cos((.6,.8,0,0), (1,3,1,1)) = 3/sqrt(12); s2 = .65/sqrt(.55^2+.65^2+2*.25^2) =
    # .65/sqrt(.85); s3 = cos((1,1,1,1)/2, (.3,.9,0,0)) = .6/sqrt(.9).
    expected = [3 / math.sqrt(12), 0.65 / math.sqrt(0.85), 0.6 / math.sqrt(0.9)]
    scores = similarity(NORMALISED, leave_one_out_votes(NORMALISED))
    np.testing.assert_allclose(scores, expected)


def test_pearson_by_hand():
    # Centred: (.25, .45, -.35, -.35) and (-.25, .75, -.25, -.25);
    # dot = -.0625 + .3375 + .0875 + .0875 = .45; squared norms .51 and .75.
    expected = 0.45 / math.sqrt(0.51 * 0.75)
    np.testing.assert_allclose(similarity(NORMALISED[0], NORMALISED[1], "pearson"), expected)
    np.testing.assert_allclose(
        similarity([1, 0, 0, 0], [0, 1, 0, 0], "pearson"), -1 / 3  # -.25 / .75
    )


def test_spearman_by_hand():
    # Ranks (3, 4, 1.5, 1.5) and (2, 4, 2, 2); centred (.5, 1.5, -1, -1) and
    # (-.5, 1.5, -.5, -.5); dot 3, squared norms 4.5 and 3: rho = 3/sqrt(13.5).
    expected = 3 / math.sqrt(13.5)
    np.testing.assert_allclose(similarity(NORMALISED[0], NORMALISED[1], "spearman"), expected)


def test_topk_iou_by_hand():
    a, b = [4.0, 3.0, 2.0, 1.0], [1.0, 4.0, 3.0, 2.0]
    # k = ceil(0.5 * 4) = 2: tops {0, 1} and {1, 2} -> IoU 1/3.
    np.testing.assert_allclose(similarity(a, b, "topk_iou", top_fraction=0.5), 1 / 3)
    # k = ceil(0.3 * 4) = 2 as well; k = ceil(0.25 * 4) = 1: {0} vs {1} -> 0.
    np.testing.assert_allclose(similarity(a, b, "topk_iou", top_fraction=0.3), 1 / 3)
    np.testing.assert_allclose(similarity(a, b, "topk_iou", top_fraction=0.25), 0.0)
    # Ties at the cut go to the lower index: the top-1 of a constant map is pixel 0.
    np.testing.assert_allclose(similarity([5, 5, 5, 5], [9, 0, 0, 0], "topk_iou", 0.25), 1.0)


def test_topk_count_is_not_fooled_by_float_rounding():
    # 0.07 * 100 = 7.000000000000001 in floating point; k must be 7, not 8.
    a = np.arange(100.0)
    b = a.copy()
    b[[0, 92]] = b[[92, 0]]  # same top 7 (93..99); top 8 would differ (92 vs 0)
    assert similarity(a, b, "topk_iou", top_fraction=0.07) == 1.0
    np.testing.assert_allclose(similarity(a, b, "topk_iou", top_fraction=0.08), 7 / 9)


def test_similarity_broadcasts_members_against_consensus():
    c = vote(NORMALISED)
    for measure in consensus.SIMILARITIES:
        batched = similarity(NORMALISED, c, measure)
        assert batched.shape == (3,)
        one_by_one = [similarity(m, c, measure) for m in NORMALISED]
        np.testing.assert_allclose(batched, one_by_one)


# --- alignment --------------------------------------------------------------------------

# scikit-learn's documented example: AP 0.8333..., ROC-AUC 0.75.
SCORES = np.array([0.1, 0.4, 0.35, 0.8])
MASK = np.array([0, 0, 1, 1], dtype=np.uint8)


def test_average_precision_by_hand():
    # Thresholds best first: .8 (P=1, R=.5), .4 (P=1/2, R=.5), .35 (P=2/3, R=1), .1 (P=1/2, R=1)
    # AP = .5*1 + 0*1/2 + .5*2/3 + 0*1/2 = 5/6.
    np.testing.assert_allclose(alignment(SCORES, MASK, "ap"), 5 / 6)
    np.testing.assert_allclose(alignment(SCORES, MASK), 5 / 6)


def test_average_precision_counts_tied_scores_as_one_threshold():
    # Threshold .5 admits a foreground and a background pixel together: P=1/2, R=1/2; then
    # .2 (P=1/3, R=1/2), .1 (P=1/2, R=1): AP = .5*.5 + .5*.5 = 1/2 (not 3/4, which
    # ranking the foreground pixel first among the tie would give).
    np.testing.assert_allclose(alignment([0.5, 0.5, 0.2, 0.1], [1, 0, 0, 1], "ap"), 0.5)


def test_roc_auc_by_hand():
    # Foreground {.35, .8} vs background {.1, .4}: pairs won .35>.1, .8>.1, .8>.4 -> 3/4.
    np.testing.assert_allclose(alignment(SCORES, MASK, "roc_auc"), 0.75)
    # Foreground {.5, .1} vs background {.5, .2}: tie 1/2 + (.5>.2) 1 -> 1.5/4.
    np.testing.assert_allclose(alignment([0.5, 0.5, 0.2, 0.1], [1, 0, 0, 1], "roc_auc"), 0.375)


def test_pointing_game_uses_first_of_tied_maxima():
    scores = [0.1, 0.9, 0.9, 0.2]  # argmax = pixel 1 (pixel 2 ties)
    assert alignment(scores, [0, 1, 0, 0], "pointing_game") == 1.0
    assert alignment(scores, [0, 0, 1, 0], "pointing_game") == 0.0


def brute_force_average_precision(scores, mask):
    """sum_n (R_n - R_{n-1}) P_n straight from the definition, one threshold at a time."""
    ap, previous_recall = 0.0, 0.0
    for threshold in sorted(set(scores), reverse=True):
        predicted = scores >= threshold
        true_positives = np.sum(predicted & mask)
        recall = true_positives / mask.sum()
        ap += (recall - previous_recall) * true_positives / predicted.sum()
        previous_recall = recall
    return ap


def brute_force_roc_auc(scores, mask):
    """Share of (foreground, background) pixel pairs ranked right, ties counting 1/2."""
    wins = [
        1.0 if p > n else 0.5 if p == n else 0.0 for p in scores[mask] for n in scores[~mask]
    ]
    return np.mean(wins)


def random_scored_masks(n_rows=40, n_pixels=30, seed=0):
    rng = np.random.default_rng(seed)
    scores = np.round(rng.random((n_rows, n_pixels)), 1)  # many ties
    mask = rng.random((n_rows, n_pixels)) < rng.uniform(0.1, 0.9, size=(n_rows, 1))
    mask[:, 0], mask[:, 1] = True, False  # every row has both classes
    return scores, mask


def test_alignment_matches_brute_force_references():
    scores, mask = random_scored_masks()
    np.testing.assert_allclose(
        alignment(scores, mask, "ap"),
        [brute_force_average_precision(s, m) for s, m in zip(scores, mask)],
    )
    np.testing.assert_allclose(
        alignment(scores, mask, "roc_auc"),
        [brute_force_roc_auc(s, m) for s, m in zip(scores, mask)],
    )


def test_alignment_matches_scikit_learn():
    scores, mask = random_scored_masks(seed=1)
    np.testing.assert_allclose(
        alignment(scores, mask, "ap"),
        [metrics.average_precision_score(m, s) for s, m in zip(scores, mask)],
    )
    np.testing.assert_allclose(
        alignment(scores, mask, "roc_auc"),
        [metrics.roc_auc_score(m, s) for s, m in zip(scores, mask)],
    )


@pytest.mark.parametrize("block_elements", [consensus._BLOCK_ELEMENTS, 64])
def test_alignment_is_vectorised_over_images_and_models(monkeypatch, block_elements):
    # (4 images, 5 models, 30 pixels) maps against one (4, 1, 30) mask per image; a small
    # block size forces several blocks with a ragged last one.
    monkeypatch.setattr(consensus, "_BLOCK_ELEMENTS", block_elements)
    scores, mask = random_scored_masks(n_rows=20, seed=2)
    maps, masks = scores.reshape(4, 5, 30), mask[::5].reshape(4, 1, 30)
    for metric in consensus.ALIGNMENTS:
        batched = alignment(maps, masks, metric)
        assert batched.shape == (4, 5)
        one_by_one = [[alignment(m, masks[i, 0], metric) for m in maps[i]] for i in range(4)]
        np.testing.assert_allclose(batched, one_by_one)


# --- edge cases: all-zero maps, empty masks ---------------------------------------------


def test_all_zero_maps_stay_zero_and_score_zero_or_undefined():
    zero = np.zeros(4)
    for method in consensus.NORMALISATIONS:
        np.testing.assert_array_equal(normalise(zero, method), zero)
    np.testing.assert_array_equal(normalise([-1.0, -2.0, 0.0, 0.0], "positive_l2"), zero)
    for rule in consensus.VOTE_RULES:
        np.testing.assert_array_equal(vote(np.zeros((3, 4)), rule), zero)
    # Cosine and top-k IoU give a signal-free map no credit; correlations are undefined.
    assert similarity(zero, NORMALISED[0], "cosine") == 0.0
    assert similarity(zero, zero, "cosine") == 0.0
    assert similarity(zero, NORMALISED[0], "topk_iou") == 0.0
    assert np.isnan(similarity(zero, NORMALISED[0], "pearson"))
    assert np.isnan(similarity(NORMALISED[0], [0.1, 0.1, 0.1, 0.1], "pearson"))
    assert np.isnan(similarity(zero, NORMALISED[0], "spearman"))


def test_masks_without_foreground_or_background_are_undefined():
    scores = np.array([[0.1, 0.4, 0.35, 0.8]] * 3)
    masks = np.array([[0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 1, 1]], dtype=bool)
    for metric in ("ap", "roc_auc"):
        result = alignment(scores, masks, metric)
        assert np.isnan(result[0]) and np.isnan(result[1]) and np.isfinite(result[2])
    np.testing.assert_array_equal(
        alignment(scores, masks, "pointing_game"), [np.nan, 1.0, 1.0]
    )


# --- correlation ------------------------------------------------------------------------

SCIPY = {"pearson": stats.pearsonr, "spearman": stats.spearmanr, "kendall": stats.kendalltau}


@pytest.mark.parametrize("method", CORRELATIONS)
def test_correlation_is_scipy(method):
    rng = np.random.default_rng(3)
    x = rng.random(20)
    y = x + rng.normal(scale=0.3, size=20)
    expected = SCIPY[method](x, y)
    coefficient, p_value = correlation(x, y, method)
    assert coefficient == pytest.approx(expected.statistic)
    assert p_value == pytest.approx(expected.pvalue)
    # Pairs with a non-finite value are dropped first.
    x_gappy = np.append(x, np.nan)
    assert correlation(x_gappy, np.append(y, 1.0), method) == pytest.approx((coefficient, p_value))


@pytest.mark.parametrize("method", CORRELATIONS)
def test_correlation_undefined_cases(method):
    nan_pair = correlation([1.0, 2.0], [1.0, 2.0], method)  # n < 3
    assert all(math.isnan(v) for v in nan_pair)
    nan_pair = correlation([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0], method)  # constant x
    assert all(math.isnan(v) for v in nan_pair)


@pytest.mark.parametrize("method", CORRELATIONS)
def test_many_correlations_at_once_equal_scipy_row_by_row(method):
    rng = np.random.default_rng(11)
    x = rng.random((40, 7))
    y = x + rng.normal(scale=0.4, size=x.shape)
    x[5], y[6] = np.round(x[5], 1), np.round(y[6], 1)  # ties
    x[7] = 2.0  # constant: undefined
    y[8, 3] = np.nan  # a pair dropped: that row alone goes pair by pair
    got = correlations(x, y, method)
    expected = [correlation(a, b, method)[0] for a, b in zip(x, y)]
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert np.isnan(got[7]) and np.isfinite(got[8])


def test_block_bootstrap_means_weigh_each_block_by_how_often_it_is_drawn():
    # 3 blocks; replicate b's means are sum(w_b * sums) / sum(w_b * counts) for the documented draws.
    sums = np.array([[1.0, 10.0], [2.0, 0.0], [6.0, 4.0]])
    counts = np.array([[1.0, 2.0], [1.0, 0.0], [2.0, 2.0]])
    got = block_bootstrap_means(sums, counts, n_boot=5, seed=3)
    rng = np.random.default_rng(3)
    for replicate in got:
        w = np.bincount(rng.integers(0, 3, size=3), minlength=3).astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            np.testing.assert_allclose(replicate, (w @ sums) / (w @ counts), equal_nan=True)
    # one image per block: the ordinary bootstrap of a mean
    values = np.arange(6.0)[:, None]
    assert np.allclose(block_bootstrap_means(values, np.ones_like(values), 200, 0).mean(), 2.5, atol=0.15)


def test_fisher_interval_is_centred_on_the_estimate_in_z_and_always_contains_it():
    reps = np.array([0.1, 0.3, 0.5, 0.7])
    low, high = fisher_interval(0.4, reps, ci=0.9)
    half = stats.norm.ppf(0.95) * np.std(np.arctanh(reps), ddof=1)
    assert (low, high) == pytest.approx((np.tanh(np.arctanh(0.4) - half), np.tanh(np.arctanh(0.4) + half)))
    # exact +-1 replicates count as +-0.999 on the z scale
    low, high = fisher_interval(0.2, np.array([1.0, -1.0, 0.2, 0.3]))
    half = stats.norm.ppf(0.975) * np.std(np.arctanh([0.999, -0.999, 0.2, 0.3]), ddof=1)
    assert (low, high) == pytest.approx((np.tanh(np.arctanh(0.2) - half), np.tanh(np.arctanh(0.2) + half)))
    # replicates all on one side of the estimate (a percentile interval would exclude it)
    low, high = fisher_interval(0.9, np.array([0.1, 0.2, 0.25, 0.3]))
    assert low < 0.9 < high < 1
    assert fisher_interval(1.0, np.ones(10)) == pytest.approx((0.999, 1.0))  # a perfect committee: no spread
    assert all(math.isnan(v) for v in fisher_interval(0.5, np.array([0.5])))


def test_permutation_p_value_exact_and_monte_carlo():
    x, y = np.arange(5.0), np.arange(5.0) ** 3  # perfectly monotone: only the identity and reversal reach |rho| = 1
    assert permutation_p_value(x, y, "spearman") == pytest.approx(2 / 120)  # exact: 5! pairings
    assert permutation_p_value(x, y, "kendall") == pytest.approx(2 / 120)
    big = np.arange(12.0)  # 12! pairings: Monte Carlo, at least 1 / (1 + n)
    assert permutation_p_value(big, big, "spearman", n_perm=999) == pytest.approx(1 / 1000)
    assert permutation_p_value(big, big, "spearman", n_perm=999, seed=1) == pytest.approx(1 / 1000)
    assert math.isnan(permutation_p_value(x, np.ones(5), "pearson"))


def test_permutation_p_values_of_independent_committees_are_calibrated():
    rng = np.random.default_rng(0)
    ps = np.array([permutation_p_value(rng.random(7), rng.random(7), "spearman") for _ in range(300)])
    assert 0.02 <= np.mean(ps < 0.05) <= 0.09  # 5 % under independence
    assert 0.4 <= np.median(ps) <= 0.6


def test_member_bootstrap_resamples_members_and_skips_degenerate_draws():
    x = np.arange(4.0)
    reps = member_bootstrap(x, 2 * x, "pearson", n_boot=200, seed=0)
    defined = reps[np.isfinite(reps)]
    assert len(defined) < 200  # some draws repeat one member only: undefined
    np.testing.assert_allclose(defined, 1.0)  # any resample of a perfectly linear committee
    rng = np.random.default_rng(0)
    draws = rng.integers(0, 4, size=(200, 4))
    np.testing.assert_allclose(reps, correlations(x[draws], 2 * x[draws], "pearson"), equal_nan=True)


def committee(n_members, n_blocks, rng, slope):
    """Per-member means and block sums of a simulated committee: score of member k on an image is
    slope * k / n + noise, correctness Bernoulli(0.3 + 0.5 k / n)."""
    quality = np.arange(n_members) / n_members
    score = slope * quality + rng.normal(scale=0.3, size=(n_blocks, n_members))
    correct = (rng.random((n_blocks, n_members)) < 0.3 + 0.5 * quality).astype(float)
    return score, correct


def test_rows_carry_both_intervals_and_a_monotone_committee_excludes_zero():
    rng = np.random.default_rng(8)
    score, correct = committee(10, 400, rng, slope=1.0)
    ones = np.ones_like(score)
    reps = block_bootstrap_means(np.hstack([score, correct]), np.hstack([ones, ones]), 300, 0)
    rows = correlation_rows(MemberStatistic("x", score.mean(0), reps[:, :10]),
                            MemberStatistic("y", correct.mean(0), reps[:, 10:]), n_boot=300, n_perm=2000)
    assert [(r["method"], r["ci_over"]) for r in rows] == [(m, o) for m in CORRELATIONS
                                                           for o in ("images", "members")]
    for row in rows:
        assert (row["x"], row["y"], row["n"]) == ("x", "y", 10)
        assert row["ci_low"] <= row["coefficient"] <= row["ci_high"]
        assert 0 < row["ci_low"] and row["p_permutation"] < 0.01
        assert row["p_value"] == pytest.approx(correlation(score.mean(0), correct.mean(0), row["method"])[1])


def test_image_interval_has_its_coverage_on_a_simulated_committee():
    """Coverage on a simulated committee with a known answer. Fixed members (population mean score mu_k,
    accuracy a_k) are scored on a fresh sample of 600 images per trial, in 60 blocks of 10. The interval
    over images carries the image-sampling variability of the coefficient, so its target is the
    coefficient's expected value over image samples (computed here by simulation, on Fisher's z scale);
    the 90% interval must cover it about 90% of the time, and the bootstrap's standard error must match
    the spread of the coefficient over the simulated samples."""
    rng = np.random.default_rng(1)
    k, n, blocks = 8, 600, 60
    mu = np.linspace(0.2, 0.8, k)
    acc = 0.45 + 0.25 * mu + rng.normal(scale=0.05, size=k)

    def sample():
        score = mu + rng.normal(scale=0.5, size=(n, k))
        correct = (rng.random((n, k)) < acc).astype(float)
        return score, correct

    z = [np.arctanh(stats.pearsonr(s.mean(0), c.mean(0)).statistic) for s, c in (sample() for _ in range(2000))]
    truth, spread = np.tanh(np.mean(z)), np.std(z)
    covered, ses = 0, []
    trials = 200
    for t in range(trials):
        score, correct = sample()
        sums = np.hstack([score.reshape(blocks, -1, k).sum(1), correct.reshape(blocks, -1, k).sum(1)])
        reps = block_bootstrap_means(sums, np.full(sums.shape, n / blocks), 300, seed=t)
        r = correlations(reps[:, :k], reps[:, k:], "pearson")
        low, high = fisher_interval(stats.pearsonr(score.mean(0), correct.mean(0)).statistic, r, ci=0.9)
        covered += low <= truth <= high
        ses.append(np.std(np.arctanh(r), ddof=1))
    assert 0.84 <= covered / trials <= 0.96, covered / trials
    assert np.median(ses) == pytest.approx(spread, rel=0.2)


# --- sub-committees ---------------------------------------------------------------------


def test_subcommittees_are_seeded_distinct_sorted_members():
    drawn = subcommittees(5, sizes=[1, 2, 3, 5, 6], trials=4, seed=0)
    assert [(k, trial) for k, trial, _ in drawn] == [(k, t) for k in (2, 3, 5) for t in range(4)]
    for k, _, members in drawn:
        assert len(members) == k == len(set(members.tolist()))
        assert list(members) == sorted(members) and 0 <= members.min() and members.max() < 5
    assert all(list(m) == [0, 1, 2, 3, 4] for k, _, m in drawn if k == 5)
    # Reproducible, and a size's draws do not depend on the other sizes asked for.
    again = subcommittees(5, sizes=[3], trials=4, seed=0)
    assert [m.tolist() for _, _, m in again] == [m.tolist() for k, _, m in drawn if k == 3]
    other_seed = subcommittees(5, sizes=[3], trials=4, seed=1)
    assert [m.tolist() for _, _, m in other_seed] != [m.tolist() for _, _, m in again]


# --- unknown names ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, choices",
    [
        (lambda: normalise(RAW, "l1"), consensus.NORMALISATIONS),
        (lambda: vote(NORMALISED, "mode"), consensus.VOTE_RULES),
        (lambda: leave_one_out_votes(NORMALISED, "mode"), consensus.VOTE_RULES),
        (lambda: similarity(RAW, RAW, "ssim"), consensus.SIMILARITIES),
        (lambda: alignment(SCORES, MASK, "iou"), consensus.ALIGNMENTS),
        (lambda: correlation([1, 2, 3], [1, 2, 3], "distance"), CORRELATIONS),
        (lambda: correlations(np.ones((3, 2)), np.ones((3, 2)), "distance"), CORRELATIONS),
    ],
)
def test_unknown_names_list_the_valid_choices(call, choices):
    with pytest.raises(ValueError, match=", ".join(choices)):
        call()
