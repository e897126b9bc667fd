"""The explainer interface and its registry (a leaf: it imports no explainer).

Every explainer maps a batch of images on the run's shared image grid to one attribution map
per image:

    explain(model, preprocess, images, target, segments=None, seeds=None) -> {"map": Tensor (B, h, w), ...}

* `model`: a classifier returning logits (B, n_classes), in eval mode, on the actor's device.
* `preprocess`: the member's own, differentiable preprocessing (resize to its input size,
  normalise with its mean/std; see `committee.Preprocess`), images (B, 3, S, S) -> (B, 3, h, w).
* `images`: float32 (B, 3, S, S) in [0, 1], the shared crop every member sees.
* `target`: int64 (B,), the class explained.
* `segments`: int64 (B, S, S) superpixel ids, for explainers whose params `needs_segments`.
* `seeds`: int64 (B,) one seed per image for stochastic explainers (None: torch's global
  generator), so an image's map depends on its own seed, not on the images batched with it.

"map" is float32 (B, h, w) on any grid (the actor resamples it to the run's map grid);
channels are already reduced. "logits" (B, n_classes), where an explainer has them for the
unperturbed input at no cost, spare the slot its own forward pass for the prediction (only
when the explained class is the label). Other keys (e.g. LIME's per-superpixel weights) are
stored with the map.

An explainer is constructed from its typed parameters (`explainer_params`), or, for
convenience, from keyword values parsed into them: `Lime(n_samples=300)`.
"""

from __future__ import annotations

from typing import Callable, ClassVar

from torch import Tensor, nn

from ray_consensus.spec.explainer_params import ExplainerParams, parse_params

EXPLAINERS: dict[str, type["Explainer"]] = {}


def register(cls):
    """Class decorator: make an explainer available under its parameters' name."""
    EXPLAINERS[cls.params_type.name] = cls
    return cls


class Explainer:
    params_type: ClassVar[type[ExplainerParams]]
    returns_logits: ClassVar[bool] = False  # explain() returns "logits" of the unperturbed input

    def __init__(self, params: ExplainerParams | None = None, /, **values):
        self.params = params if params is not None else parse_params(self.params_type.name, values)

    def check_model(self, model: nn.Module) -> None:
        """Raise SpecError when this explainer cannot explain `model` (checked before any Ray work)."""

    def explain(self, model: nn.Module, preprocess: Callable[[Tensor], Tensor], images: Tensor,
                target: Tensor, segments: Tensor | None = None, seeds: Tensor | None = None) -> dict[str, Tensor]:
        raise NotImplementedError


def create_explainer(params: ExplainerParams) -> Explainer:
    """The explainer the parameters belong to (its module must have been imported: see the package)."""
    return EXPLAINERS[params.name](params)


def explained_scores(logits: Tensor, output: str) -> Tensor:
    """(B, n_classes) logits -> float32 (B, n_classes), the score explained per class: the class
    probability (softmax) for `output` "probability", else the raw logit."""
    logits = logits.float()
    return logits.softmax(dim=1) if output == "probability" else logits


def class_score(model: nn.Module, x: Tensor, target: Tensor, output: str) -> Tensor:
    """The scalar explained per image, (B,): the target class's `explained_scores`."""
    return explained_scores(model(x), output).gather(1, target[:, None])[:, 0]


def reduce_channels(attr: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, h, w): sum of absolute values over channels (DESIGN section 3)."""
    return attr.abs().sum(dim=1)


class ScoreModel(nn.Module):
    """Wraps a classifier so captum sees the explained score per class (probability or logit)."""

    def __init__(self, model: nn.Module, output: str):
        super().__init__()
        self.model, self.output = model, output

    def forward(self, x: Tensor) -> Tensor:
        return explained_scores(self.model(x), self.output)
