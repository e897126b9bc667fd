"""The loops the pipeline is measured against, run in the benchmark's own process.

* `smoothgrad_batches`: the explainer called batch by batch on images already decoded in
  memory: no Ray, no storage, no reducer (figure 1's denominator).
* `committee_lime_images`: single-machine consensus code as it is usually written: for each
  image, decode it, explain it with every model one after another (captum's `Lime` with its
  defaults), then vote (figure 3's denominator).
* `captum_lime`: captum's `Lime`, one call per image, fed the perturbation masks, mean-colour
  fill, kernel and ridge surrogate of `ray_consensus.explainers.lime` (figure 2's denominator).

The two loops are lists of steps (a batch, an image) for `alternate_threads`, which times them
at 1 torch thread and at torch's default, interleaved, and stops at a time cap between steps:
every image costs the same here, so the throughput of the images done is the loop's
throughput, and a slow baseline cannot blow the benchmark's time budget.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from captum._utils.models.model import Model
from captum.attr import Lime
from captum.attr._core.lime import get_exp_kernel_similarity_function
from torch import Tensor, nn

from ray_consensus.dataset.decode import decode_image
from ray_consensus.dataset.superpixels import segment
from ray_consensus.explainers import Explainer, ScoreModel
from ray_consensus.explainers.lime import fill_with_mean_colours, fit_weighted_ridge, perturbation_seed, sample_masks
from ray_consensus.models.committee import Preprocess, resample_maps
from ray_consensus.results import consensus as cm
from ray_consensus.spec.explainer_params import LimeParams


@dataclass
class Throughput:
    images: int
    seconds: float
    threads: int         # torch intra-op threads the loop ran with

    @property
    def per_s(self) -> float:
        return self.images / self.seconds


DEFAULT_THREADS = torch.get_num_threads()  # before anything here changes it


def thread_settings() -> list[int]:
    """The torch thread counts every baseline is tried with: 1 and torch's default."""
    return sorted({1, DEFAULT_THREADS})


def alternate_threads(steps: list[Callable[[], int]], time_cap_s: float,
                      warm_up: bool = True) -> dict[int, Throughput]:
    """Run `steps` in order (each processes some images and returns how many), each at the torch
    thread count of `thread_settings()` that has run for the least time so far; return each
    count's throughput.

    Interleaving exposes every count to the same machine load, and sharing the time equally (not
    the steps) keeps a count that stalls (2 threads at batch 1 while another process holds a
    core) from eating the budget, without judging it on one step. `steps[0]` is run once untimed
    first (warm-up; `warm_up=False` where the steps already ran in this process). Stops at
    `time_cap_s` (between steps). Leaves torch at its default count.
    """
    done, spent = dict.fromkeys(thread_settings(), 0), dict.fromkeys(thread_settings(), 0.0)
    if warm_up:
        steps[0]()
    for step in steps:
        threads = min(spent, key=spent.get)
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        done[threads] += step()
        spent[threads] += time.perf_counter() - t0
        if sum(spent.values()) > time_cap_s:
            break
    torch.set_num_threads(DEFAULT_THREADS)
    return {t: Throughput(done[t], spent[t], t) for t in done if done[t]}


def merged(*runs: dict[int, Throughput]) -> dict[int, Throughput]:
    """`alternate_threads` results of several sittings, summed per thread count."""
    out: dict[int, Throughput] = {}
    for run in runs:
        for t, tp in run.items():
            prev = out.get(t, Throughput(0, 0.0, t))
            out[t] = Throughput(prev.images + tp.images, prev.seconds + tp.seconds, t)
    return out


# ---------------------------------------------------------------- figure 1

def to_batch(pixels: np.ndarray) -> Tensor:
    """uint8 (B, S, S, 3) -> float32 (B, 3, S, S) in [0, 1], as the attribution actor does it."""
    return torch.tensor(pixels).permute(0, 3, 1, 2).float().div_(255)


def smoothgrad_batches(model: nn.Module, preprocess: Preprocess, explainer: Explainer, pixels: np.ndarray,
                       labels: np.ndarray, batch_size: int, device: str = "cpu",
                       autocast: torch.dtype | None = None) -> list[Callable[[], int]]:
    """The bare loop as steps: `explainer.explain` on one batch of pre-decoded uint8 (N, S, S, 3)
    images (moved to `device`, under autocast if given), map copied to numpy; each step returns
    its image count."""
    def step(start: int) -> int:
        x = to_batch(pixels[start:start + batch_size]).to(device)
        target = torch.from_numpy(labels[start:start + batch_size].copy()).to(device)
        with torch.autocast(torch.device(device).type, dtype=autocast, enabled=autocast is not None):
            explainer.explain(model, preprocess, x, target)["map"].float().cpu().numpy()
        return len(x)

    return [functools.partial(step, start) for start in range(0, len(pixels), batch_size)]


# ---------------------------------------------------------------- figure 3

def committee_lime_images(files: list[str], labels: list[int], models: list[tuple[nn.Module, Preprocess]],
                          params: LimeParams, image_size: int, map_size: int, device: str = "cpu"
                          ) -> list[Callable[[], int]]:
    """The sequential loop as steps, one per image: read and decode the file, compute its
    superpixels, explain it with every model one after another through captum's `Lime` (one call
    per image, captum's default perturbations_per_eval=1, the masks our LIME would draw), paint the
    weights, normalise, vote, score."""
    def step(path: str, label: int) -> int:
        with open(path, "rb") as f:
            rgb = decode_image(f.read(), image_size)
        seg = torch.from_numpy(segment(rgb, **params.segment_settings())).long()[None].to(device)
        image = to_batch(rgb[None]).to(device)
        masks = lime_masks(image, seg, params.n_samples, params.p_keep, params.seed)
        fill = fill_with_mean_colours(image, seg, int(seg.max()) + 1)
        target = torch.tensor([label], device=device)
        maps = [resample_maps(captum_lime(model, pre, image, seg, target, masks, fill, params, 1)[0]
                              .float()[seg], map_size) for model, pre in models]
        flat = torch.cat(maps).reshape(len(models), -1).double().cpu().numpy()
        norm = cm.normalise(flat, "abs_l2")
        cm.similarity(norm, cm.vote(norm, "mean")[None], "cosine")
        return 1

    return [functools.partial(step, path, label) for path, label in zip(files, labels)]


# ---------------------------------------------------------------- figure 2

def lime_masks(images: Tensor, segments: Tensor, n_samples: int, p_keep: float, seed: int) -> list[Tensor]:
    """The perturbation masks `ray_consensus.explainers.lime.Lime` draws for each image: bool (n_samples, K_i).

    images float (B, 3, S, S) in [0, 1], segments int64 (B, S, S) ids 0..K_i-1.
    """
    pixels = (images * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    out = []
    for i in range(len(images)):
        seg = segments[i].cpu().numpy()
        gen = torch.Generator().manual_seed(perturbation_seed(seed, pixels[i], seg))
        out.append(sample_masks(n_samples, int(seg.max()) + 1, p_keep, gen))
    return out


class RidgeSurrogate(Model):
    """captum interpretable model: `ray_consensus.explainers.lime.fit_weighted_ridge` on one image's samples."""

    def __init__(self, alpha: float):
        self.alpha, self.beta = alpha, None

    def fit(self, train_data, **kwargs):
        ((z, y, w),) = list(train_data)  # captum passes all samples as one batch
        beta, _ = fit_weighted_ridge(z[None], y[None], w[None], self.alpha, torch.tensor([z.shape[1]], device=z.device))
        self.beta = beta[0]

    def representation(self) -> Tensor:
        return self.beta

    def __call__(self, x):
        raise NotImplementedError


def captum_lime(model: nn.Module, preprocess: Preprocess, images: Tensor, segments: Tensor, target: Tensor,
                masks: list[Tensor], fill: Tensor, params: LimeParams, perturbations_per_eval: int) -> list[Tensor]:
    """captum `Lime.attribute` once per image -> per-superpixel weights, float64 (K_i,) each.

    images float (B, 3, S, S), segments int64 (B, S, S), target (B,), masks from `lime_masks`,
    fill float (B, 3, S, S) the mean-colour image (captum's baseline: hidden superpixels show it).
    """
    score_model = ScoreModel(model, params.output)
    cosine = get_exp_kernel_similarity_function("cosine", kernel_width=params.kernel_width)
    out = []
    for i in range(len(images)):
        def perturb(_inputs, _rows=masks[i].to(images.device), **kwargs):
            yield from (row[None].long() for row in _rows)

        lime = Lime(lambda x: score_model(preprocess(x)), interpretable_model=RidgeSurrogate(params.alpha),
                    # LIME's kernel: cosine distance of the binary mask to the all-ones mask.
                    similarity_func=lambda _x, _p, z, **kw: cosine(torch.ones_like(z), z, None),
                    perturb_func=perturb)
        out.append(lime.attribute(images[i:i + 1], baselines=fill[i:i + 1], target=int(target[i]),
                                  feature_mask=segments[i][None, None], n_samples=len(masks[i]),
                                  perturbations_per_eval=perturbations_per_eval,
                                  return_input_shape=False).reshape(-1).double())
    return out
