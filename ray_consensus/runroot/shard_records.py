"""The records a shard's reducer hands over: the shard as stored, its vote, its aggregates, its image rows.

    ShardMaps (contract decoders, `reduce.load_shard`) ─► ShardVote (`reduce.vote_shard`)
        ─► ShardAggregates, ImageRows (`reduce.shard_aggregates`, `reduce.image_rows`)
        ─► the contract's encoders (`contract.encode_consensus`, `encode_scores`, `encode_aggregates`,
           `encode_images`)

Plain dataclasses of numpy arrays, shapes stated per field: K members, N images, P = M * M map pixels,
R aggregate rows. What each value means is said where it is computed; how it is stored, in `contract`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np


@dataclass
class ShardMaps:
    """A shard's stored units as the reducer votes on them: its inputs and each member's attributions,
    aligned on the same images (`reduce.load_shard`)."""

    image_ids: list[str]
    labels: np.ndarray        # (N,) int64
    preds: np.ndarray         # (K, N) int64, -1: the member's logits were not finite
    correct: np.ndarray       # (K, N) bool
    maps: np.ndarray          # (K, N, P) float64 attribution maps as stored (P = M*M); NaN rows: not finite
    weights: np.ndarray | None  # (K, N, J) superpixel weights (LIME), 0 beyond an image's superpixels, else None
    superpixels: np.ndarray | None  # (N, P) int superpixel ids on the map grid
    masks: np.ndarray | None  # (N, P) uint8, rows of images without a mask are all 0; None: no masks
    has_mask: np.ndarray      # (N,) bool
    map_size: int

    @cached_property
    def finite(self) -> np.ndarray:
        """(K, N) bool: the member's map of the image is finite (it takes part in the image's vote)."""
        return np.isfinite(self.maps).all(axis=-1)


@dataclass
class ShardVote:
    """The vote of a shard (`reduce.vote_shard`), what its consensus/ and scores/ rows are encoded from."""

    consensus_map: np.ndarray       # (N, P) consensus on the map grid, as stored (NaN: no finite member map)
    normalised_maps: np.ndarray     # (K, N, P), 0 where the member's map is not finite
    scores: dict[str, np.ndarray]   # similarity measure -> (K, N), NaN where the member is not in the vote
    voted: np.ndarray               # (N,) bool
    finite: np.ndarray              # (K, N) bool: the member's map is in the image's vote


@dataclass
class ShardAggregates:
    """A shard's aggregates, R rows: one per (member, block of images), then per block the vote's own
    (model_id `consensus`); the sums and counts the run-level tables are computed from
    (`reduce.shard_aggregates` says what each counts). Every field is (R,)."""

    model_id: np.ndarray     # str
    block: np.ndarray        # int64
    n_images: np.ndarray     # int64, as the counts below
    n_predicted: np.ndarray
    n_correct: np.ndarray
    n_nonfinite: np.ndarray
    n_voted: np.ndarray
    score_sum: np.ndarray    # float64
    score_n: np.ndarray
    metrics: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # metric -> (sum, n)


@dataclass
class ImageRows:
    """A shard's rows of tables/images (`reduce.image_rows` says what each holds). Every field is (N,)."""

    image_id: list[str]
    label: np.ndarray                 # int64, as the counts and the prediction below
    voted: np.ndarray                 # bool
    members: np.ndarray
    members_correct: np.ndarray
    majority_pred: np.ndarray
    majority_votes: np.ndarray
    mean_consensus_score: np.ndarray  # float64, as the two below
    min_consensus_score: np.ndarray
    alignment: dict[str, np.ndarray] = field(default_factory=dict)  # metric -> the consensus map's
