"""Explainers: one small interface, each method a short class registered by name.

Every explainer maps a batch of images on the run's shared image grid to one
attribution map per image:

    explain(model, preprocess, images, target, segments=None) -> {"map": Tensor (B, h, w), ...}

* `model`: a classifier returning logits (B, n_classes), in eval mode, on the actor's device.
* `preprocess`: the member's own, differentiable preprocessing (resize to its input size,
  normalise with its mean/std; see `committee.Preprocess`), images (B, 3, S, S) -> (B, 3, h, w).
* `images`: float32 (B, 3, S, S) in [0, 1], the shared crop every member sees.
* `target`: int64 (B,), the class explained.
* `segments`: int64 (B, S, S) superpixel ids, for explainers with `needs_segments`.

"map" is float32 (B, h, w) on any grid (the actor resamples it to the run's map grid);
channels are already reduced. Extra keys (e.g. LIME's per-superpixel weights) are stored too.
"""

from __future__ import annotations

from typing import Callable, ClassVar

import torch
from torch import Tensor, nn

from ray_consensus.config import SpecError

EXPLAINERS: dict[str, type["Explainer"]] = {}


def register(cls):
    """Class decorator: make an explainer available under `cls.name`."""
    EXPLAINERS[cls.name] = cls
    return cls


class Explainer:
    name: ClassVar[str]
    defaults: ClassVar[dict] = {}
    needs_segments: ClassVar[bool] = False

    def __init__(self, **params):
        self.check_params(params)
        self.params = {**self.defaults, **params}

    @classmethod
    def check_params(cls, params: dict) -> None:
        from ray_consensus.config import _suggest

        for key in params:
            if key not in cls.defaults:
                raise SpecError(f"explainer.params: unknown parameter '{key}' for {cls.name}"
                                f"{_suggest(key, cls.defaults)}")

    def check_model(self, model: nn.Module) -> None:
        """Raise SpecError when this explainer cannot explain `model` (checked before any Ray work)."""

    def passes_per_image(self) -> tuple[int, int]:
        """(forward, backward) passes per image and model, for the plan's cost estimate."""
        return 1, 1

    def explain(self, model: nn.Module, preprocess: Callable[[Tensor], Tensor], images: Tensor,
                target: Tensor, segments: Tensor | None = None) -> dict[str, Tensor]:
        raise NotImplementedError


def class_score(model: nn.Module, x: Tensor, target: Tensor, output: str) -> Tensor:
    """The scalar explained per image, (B,): the class probability (softmax) or the raw logit."""
    logits = model(x).float()
    scores = logits.softmax(dim=1) if output == "probability" else logits
    return scores.gather(1, target[:, None])[:, 0]


def reduce_channels(attr: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, h, w): sum of absolute values over channels (DESIGN section 3)."""
    return attr.abs().sum(dim=1)


def check_output(params: dict) -> None:
    if params.get("output") not in ("probability", "logit"):
        raise SpecError(f"explainer.params.output must be 'probability' or 'logit', got {params.get('output')!r}")


class ScoreModel(nn.Module):
    """Wraps a classifier so captum sees the explained score per class (probability or logit)."""

    def __init__(self, model: nn.Module, output: str):
        super().__init__()
        self.model, self.output = model, output

    def forward(self, x: Tensor) -> Tensor:
        logits = self.model(x).float()
        return logits.softmax(dim=1) if self.output == "probability" else logits


@register
class SmoothGrad(Explainer):
    """SmoothGrad: mean gradient over noisy copies; noise std = noise_level x (max - min) of each preprocessed image."""

    name = "smoothgrad"
    defaults = {"n_samples": 50, "noise_level": 0.1, "output": "probability", "samples_per_pass": 10}

    @classmethod
    def check_params(cls, params):
        super().check_params(params)
        p = {**cls.defaults, **params}
        check_output(p)
        if int(p["n_samples"]) < 1 or int(p["samples_per_pass"]) < 1 or float(p["noise_level"]) < 0:
            raise SpecError("smoothgrad: n_samples and samples_per_pass must be >= 1 and noise_level >= 0")

    def passes_per_image(self):
        return self.params["n_samples"], self.params["n_samples"]

    def explain(self, model, preprocess, images, target, segments=None):
        x = preprocess(images).detach()
        n, per_pass = int(self.params["n_samples"]), int(self.params["samples_per_pass"])
        b = x.shape[0]
        flat = x.reshape(b, -1)
        sigma = float(self.params["noise_level"]) * (flat.max(1).values - flat.min(1).values)  # (B,)
        total = torch.zeros_like(x)
        done = 0
        while done < n:
            m = min(per_pass, n - done)
            # Same draw order as captum's NoiseTunnel (repeat_interleave, one torch.normal per chunk),
            # with a per-image std instead of one std for the whole batch.
            std = sigma.repeat_interleave(m).view(-1, *([1] * (x.dim() - 1))).expand(b * m, *x.shape[1:])
            noisy = (x.repeat_interleave(m, dim=0) + torch.normal(0.0, std.contiguous())).requires_grad_(True)
            score = class_score(model, noisy, target.repeat_interleave(m), self.params["output"])
            (grad,) = torch.autograd.grad(score.sum(), noisy)
            total += grad.view(b, m, *x.shape[1:]).sum(dim=1)
            done += m
        return {"map": reduce_channels(total / n)}


@register
class IntegratedGradients(Explainer):
    """Integrated Gradients (captum) from a black-image baseline."""

    name = "integrated_gradients"
    defaults = {"n_steps": 32, "output": "probability", "baseline": "black", "internal_batch_size": 64}

    @classmethod
    def check_params(cls, params):
        super().check_params(params)
        p = {**cls.defaults, **params}
        check_output(p)
        if p["baseline"] not in ("black", "zero"):
            raise SpecError("integrated_gradients: baseline must be 'black' (black image) or 'zero' (zero input)")

    def passes_per_image(self):
        return self.params["n_steps"], self.params["n_steps"]

    def explain(self, model, preprocess, images, target, segments=None):
        from captum.attr import IntegratedGradients as CaptumIG

        x = preprocess(images).detach()
        baseline = preprocess(torch.zeros_like(images)) if self.params["baseline"] == "black" else torch.zeros_like(x)
        ig = CaptumIG(ScoreModel(model, self.params["output"]))
        attr = ig.attribute(x, baselines=baseline.detach(), target=target, n_steps=int(self.params["n_steps"]),
                            internal_batch_size=int(self.params["internal_batch_size"]))
        return {"map": reduce_channels(attr)}


@register
class Saliency(Explainer):
    """Saliency: the plain gradient of the explained score (captum)."""

    name = "saliency"
    defaults = {"output": "probability"}

    @classmethod
    def check_params(cls, params):
        super().check_params(params)
        check_output({**cls.defaults, **params})

    def explain(self, model, preprocess, images, target, segments=None):
        from captum.attr import Saliency as CaptumSaliency

        x = preprocess(images).detach()
        attr = CaptumSaliency(ScoreModel(model, self.params["output"])).attribute(x, target=target, abs=False)
        return {"map": reduce_channels(attr)}


# Explainers in modules of their own register themselves on import.
from ray_consensus import gradcam, lime  # noqa: E402,F401
