"""LIME on superpixels shared by the committee, batched over images on the model's device.

The method of the lime package's image explainer (Ribeiro et al. 2016), as the paper uses it:

1. Interpretable features are the image's superpixels (computed once in the decode stage, see
   `superpixels.segment`), K of them. A perturbation is a binary mask z in {0,1}^K; row 0 is
   the unperturbed image (all ones), the other rows keep each superpixel with probability p_keep.
2. The perturbed image shows kept superpixels as they are and paints hidden ones with their
   mean colour.
3. Each perturbation is weighted by an exponential kernel on the cosine distance d between z
   and the all-ones mask: d = 1 - sqrt(|z| / K), w = exp(-d^2 / (2 width^2)), width 0.25.
   This is the lime package's kernel, sqrt(exp(-d^2 / width^2)), and captum's
   `get_exp_kernel_similarity_function`.
4. The surrogate is a weighted ridge regression of the class score y on z with an unpenalised
   intercept b (sklearn's `Ridge(alpha, fit_intercept=True)` with `sample_weight=w`, as the lime
   package fits it):  minimise over (beta, b)  sum_i w_i (y_i - b - z_i . beta)^2 + alpha |beta|^2.
   beta (one weight per superpixel) is the explanation.

Perturbation masks depend only on the seed parameter and the image (its pixels and superpixels),
so every committee member, in every actor and every run, scores the same perturbations.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
from torch import Tensor

from ray_consensus.explainers.base import Explainer, class_score, register
from ray_consensus.spec.explainer_params import LimeParams


def sample_masks(n_samples: int, n_segments: int, p_keep: float, generator: torch.Generator) -> Tensor:
    """Perturbation masks, bool (n_samples, n_segments) on the CPU: True = superpixel kept.

    Row 0 is all True (the unperturbed image, as LIME does); every other entry is kept
    independently with probability p_keep, drawn from `generator`.
    """
    masks = torch.rand(n_samples, n_segments, generator=generator) < p_keep
    masks[0] = True
    return masks


def perturbation_seed(seed: int, image: np.ndarray, segments: np.ndarray) -> int:
    """A 63-bit generator seed from the run's seed and one image: uint8 (3, S, S) pixels and (S, S) ids.

    Hashing the content, not the image's position in a batch, gives every actor the same masks.
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(str(int(seed)).encode())
    h.update(np.ascontiguousarray(image, dtype=np.uint8).tobytes())
    h.update(np.ascontiguousarray(segments, dtype=np.int32).tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


def kernel_weights(masks: Tensor, n_segments: Tensor, kernel_width: float) -> Tensor:
    """LIME's sample weights, float64 (..., n): masks bool (..., n, K_max), n_segments (...,) the
    number K of real superpixels (columns beyond it must be False).

    Cosine distance to the all-ones mask: d = 1 - |z| / (sqrt(|z|) sqrt(K)) = 1 - sqrt(|z| / K)
    (d = 1 for the all-hidden mask); weight exp(-d^2 / (2 width^2)).
    """
    kept = masks.sum(dim=-1, dtype=torch.float64)
    d = 1.0 - torch.sqrt(kept / n_segments.to(torch.float64)[..., None])
    return torch.exp(-d**2 / (2.0 * kernel_width**2))


def fit_weighted_ridge(z: Tensor, y: Tensor, w: Tensor, alpha: float, n_features: Tensor) -> tuple[Tensor, Tensor]:
    """Batched weighted ridge with an unpenalised intercept, in float64.

    z (B, n, K_max), y (B, n), w (B, n) >= 0; n_features (B,) the real feature count of each
    problem (columns beyond it are padding and must be 0). Minimises
    sum_i w_i (y_i - b - z_i . beta)^2 + alpha |beta|^2 by centring on the weighted means
    (which removes b) and solving (Zc^T W Zc + alpha I) beta = Zc^T W yc; then b = y_mean - z_mean . beta.
    Returns beta (B, K_max) with 0 on padding, b (B,).
    """
    z, y, w = z.double(), y.double(), w.double()
    w_sum = w.sum(dim=1, keepdim=True)
    z_mean = (w[..., None] * z).sum(dim=1) / w_sum
    y_mean = (w * y).sum(dim=1) / w_sum[:, 0]
    zc, yc = z - z_mean[:, None], y - y_mean[:, None]
    wz = w[..., None] * zc
    gram = wz.transpose(1, 2) @ zc
    # Padding columns are all zero; a unit diagonal there keeps the system regular and their beta 0.
    valid = torch.arange(z.shape[2], device=z.device)[None] < n_features[:, None]
    ridge = torch.where(valid, torch.full_like(valid, alpha, dtype=z.dtype), torch.ones_like(valid, dtype=z.dtype))
    beta = torch.linalg.solve(gram + torch.diag_embed(ridge), (wz.transpose(1, 2) @ yc[..., None]))[..., 0]
    return beta, y_mean - (z_mean * beta).sum(dim=1)


def fill_with_mean_colours(images: Tensor, segments: Tensor, k_max: int) -> Tensor:
    """images (B, C, S, S) float, segments (B, S, S) int64 ids < k_max -> (B, C, S, S) where every
    pixel has its superpixel's mean colour."""
    b, c = images.shape[:2]
    ids = segments.reshape(b, 1, -1)
    sums = images.new_zeros(b, c, k_max).scatter_add_(2, ids.expand(b, c, -1), images.reshape(b, c, -1))
    counts = images.new_zeros(b, 1, k_max).scatter_add_(2, ids, torch.ones_like(ids, dtype=images.dtype))
    means = sums / counts.clamp(min=1.0)
    return means.gather(2, ids.expand(b, c, -1)).view_as(images)


@register
class Lime(Explainer):
    """LIME with superpixels shared by the committee: mean-colour fill, cosine kernel, weighted ridge.

    Params (`LimeParams`): n_samples perturbations per image (row 0 unperturbed), kernel_width,
    alpha (ridge), p_keep (probability a superpixel is kept), forward_batch (perturbations per
    forward pass; "auto": see `forward_batch`), output (probability|logit), seed; segmentation,
    n_segments, compactness are read by the decode stage for `superpixels.segment`.
    The perturbations are seeded by `seed` and each image's content, so `seeds` is not used.
    """

    params_type = LimeParams

    @torch.no_grad()
    def explain(self, model, preprocess, images, target, segments=None, seeds=None):
        """images (B, 3, S, S) in [0, 1], target (B,), segments (B, S, S) ids 0..K_b-1 ->
        {"map": float32 (B, S, S) superpixel weights painted on their pixels,
         "superpixel_weights": float32 (B, K_max), NaN beyond each image's K_b}."""
        if segments is None:
            raise ValueError("lime: explain() needs the superpixel ids (segments)")
        p = self.params
        n, device = p.n_samples, images.device
        b, _, s, _ = images.shape
        seg = segments.to(device=device, dtype=torch.long)
        n_features = seg.flatten(1).max(dim=1).values + 1
        k_max = int(n_features.max())

        masks = self._masks(images, seg, n_features.tolist(), k_max).to(device)
        fill = fill_with_mean_colours(images, seg, k_max)
        targets = target.to(device).repeat_interleave(n)
        scores = torch.empty(b * n, device=device)
        step = self.forward_batch(device, preprocess.size)
        perturbed = _Perturbations(preprocess, images, fill, seg, n_features)
        for start in range(0, b * n, step):
            stop = min(start + step, b * n)
            pieces = []
            for i in range(start // n, (stop - 1) // n + 1):  # the images this chunk spans
                pieces.append(perturbed(i, masks[i, max(start - i * n, 0):min(stop - i * n, n)]))
            scores[start:stop] = class_score(model, torch.cat(pieces), targets[start:stop], p.output)

        weights = kernel_weights(masks, n_features, p.kernel_width)
        beta, _ = fit_weighted_ridge(masks, scores.view(b, n), weights, p.alpha, n_features)
        beta = beta.float()
        valid = torch.arange(k_max, device=device)[None] < n_features[:, None]
        return {"map": beta.gather(1, seg.flatten(1)).view(b, s, s),
                "superpixel_weights": torch.where(valid, beta, torch.full_like(beta, float("nan")))}

    def forward_batch(self, device: torch.device, input_size: tuple[int, int]) -> int:
        """Perturbations per forward pass: the param, or for "auto" 256 on a GPU and on a CPU the
        power of two that keeps a batch near 2**20 input pixels (8 to 128): on a CPU a forward's
        cost per image stops falling, and at 224 px rises, once the activations outgrow the caches."""
        step = self.params.forward_batch
        if step != "auto":
            return step
        if device.type != "cpu":
            return 256
        per_image = max(1, input_size[0] * input_size[1])
        return int(min(128, max(8, 2 ** math.floor(math.log2(max(1, 2**20 // per_image))))))

    def _masks(self, images: Tensor, seg: Tensor, n_features: list[int], k_max: int) -> Tensor:
        """bool (B, n_samples, K_max) on the CPU, each image's drawn from its own content-seeded generator."""
        p = self.params
        pixels = (images.detach() * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
        seg_np = seg.cpu().numpy()
        masks = torch.zeros(len(n_features), p.n_samples, k_max, dtype=torch.bool)
        for i, k in enumerate(n_features):
            gen = torch.Generator().manual_seed(perturbation_seed(p.seed, pixels[i], seg_np[i]))
            masks[i, :, :k] = sample_masks(p.n_samples, k, p.p_keep, gen)
        return masks


class _Perturbations:
    """Model inputs of perturbed images: preprocess(where(z[seg], image, fill)) for mask rows z,
    without preprocessing every perturbed image.

    Preprocessing is resize-then-normalise, `(R(x) - mean) / std` with R linear, so for
    x = fill + sum_k z_k d_k, where d_k is (image - fill) on superpixel k and 0 elsewhere,
    the input is preprocess(fill) + sum_k z_k R(d_k) / std: one (m, K) x (K, 3hw) product.
    Without a resize preprocessing is per pixel and the input is where(z[seg], pre(image), pre(fill)).
    Per image, the terms are built when first needed (the last image's only are kept).
    """

    def __init__(self, preprocess, images: Tensor, fill: Tensor, seg: Tensor, n_features: Tensor):
        self.pre, self.images, self.fill, self.seg = preprocess, images, fill, seg
        self.n_features = n_features.tolist()
        self.resizes = tuple(images.shape[-2:]) != tuple(preprocess.size)
        self.cached: tuple[int, Tensor, Tensor] | None = None

    def __call__(self, i: int, rows: Tensor) -> Tensor:
        # The composition stays in float32 under autocast: the model's first layer rounds, not this sum.
        with torch.autocast(self.images.device.type, enabled=False):
            base, parts = self.terms(i)
            if not self.resizes:
                return torch.where(rows[:, self.seg[i]][:, None], base[0], parts[0])
            k = parts.shape[0]
            return base + (rows[:, :k].to(parts.dtype) @ parts.flatten(1)).view(len(rows), *base.shape[1:])

    def terms(self, i: int) -> tuple[Tensor, Tensor]:
        if self.cached is None or self.cached[0] != i:
            x, f = self.images[i:i + 1], self.fill[i:i + 1]
            if not self.resizes:
                self.cached = (i, self.pre(x), self.pre(f))
            else:
                k = self.n_features[i]
                onehot = self.seg[i] == torch.arange(k, device=x.device)[:, None, None]  # (K, S, S)
                parts = self.pre.linear(onehot[:, None].to(x.dtype) * (x - f))  # (K, 3, h, w)
                self.cached = (i, self.pre(f), parts)
        return self.cached[1], self.cached[2]
