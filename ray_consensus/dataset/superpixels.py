"""Superpixels: computed once per image in the CPU decode stage and shared by the whole committee.

LIME explains an image in terms of its superpixels; every committee member must use the same
ones, or their maps could not be voted on. The decode stage calls `segment` on the shared crop
and ships the id map alongside the image to every model actor.
"""

from __future__ import annotations

import numpy as np

METHODS = ("slic", "quickshift")


def segment(image: np.ndarray, method: str = "slic", n_segments: int = 50, compactness: float = 10.0,
            seed: int = 0) -> np.ndarray:
    """Superpixel ids of one image.

    image: uint8 (S, S, 3) RGB. Returns int32 (S, S) ids 0..K-1 with every id present
    (the method's labels relabelled, order kept).

    * "slic": scikit-image SLIC k-means in Lab space with about `n_segments` segments of the
      given `compactness` (higher = squarer); deterministic, `seed` is not used.
    * "quickshift": LIME's own default segmentation (kernel_size 4, max_dist 200, ratio 0.2),
      tuned for images of about 224 px (at 64 px it finds only a few segments); `n_segments` and
      `compactness` do not apply, `seed` seeds its tie-breaking noise.
    """
    from skimage.segmentation import quickshift, slic

    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"segment: expected an (S, S, 3) RGB image, got shape {image.shape}")
    if method == "slic":
        labels = slic(image, n_segments=int(n_segments), compactness=float(compactness), start_label=0)
    elif method == "quickshift":
        labels = quickshift(image, kernel_size=4, max_dist=200, ratio=0.2, rng=int(seed))
    else:
        raise ValueError(f"segment: method must be one of {METHODS}, got {method!r}")
    # SLIC's connectivity pass and quickshift can leave gaps in the ids; LIME needs 0..K-1.
    _, contiguous = np.unique(labels, return_inverse=True)
    return contiguous.reshape(labels.shape).astype(np.int32)


def mean_colours(image: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """Mean colour of each superpixel: image (S, S, C) any numeric dtype, segments (S, S) ids 0..K-1
    -> float64 (K, C), in the image's units. LIME paints hidden superpixels with these."""
    ids = segments.ravel()
    k = int(ids.max()) + 1
    counts = np.bincount(ids, minlength=k).astype(np.float64)
    pixels = image.reshape(-1, image.shape[-1]).astype(np.float64)
    sums = np.stack([np.bincount(ids, weights=pixels[:, c], minlength=k) for c in range(pixels.shape[1])], axis=1)
    return sums / np.maximum(counts, 1.0)[:, None]
