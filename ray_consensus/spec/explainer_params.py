"""Typed parameters of every explainer, without torch: what `validate` checks and `--schema` prints.

Each explainer's parameters are a small frozen dataclass (timm's config style): every field has
a type, a default, a help text and, where it has them, bounds or choices. `parse_params(name,
data)` builds one from the spec's `explainer.params` mapping, once, on the driver; a wrong
type, an out-of-range value or an unknown key is one `SpecError` line. The explainers
(`ray_consensus.explainers`, which import torch) and the decode stage take the parsed object.

`PARAMS` maps each explainer name to its parameter class: the registry of explainer names. It
imports nothing that imports it back, as timm's `_registry` imports none of its models.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from ray_consensus.dataset.superpixels import METHODS as SEGMENTATIONS
from ray_consensus.errors import SpecError, suggest
from ray_consensus.spec.fields import build, describe, spec_field

OUTPUTS = ("probability", "logit")

PARAMS: dict[str, type["ExplainerParams"]] = {}


def register_params(cls):
    """Class decorator: make an explainer's parameters (and so its name) known to the spec."""
    PARAMS[cls.name] = cls
    return cls


@dataclass(frozen=True)
class ExplainerParams:
    """Base of the parameter classes. `name` is the explainer's registered name."""

    name: ClassVar[str]
    summary: ClassVar[str]
    needs_segments: ClassVar[bool] = False  # the decode stage computes superpixels for it
    checks_models: ClassVar[bool] = False   # the explainer can refuse a member (preflight builds every member)

    def passes_per_image(self) -> tuple[int, int]:
        """(forward, backward) passes per image and model, for the plan's cost estimate."""
        return 1, 1

    def as_dict(self) -> dict:
        """Every parameter (defaults included): what run.json shows and fingerprints hash."""
        return dataclasses.asdict(self)


@register_params
@dataclass(frozen=True)
class SmoothGradParams(ExplainerParams):
    name = "smoothgrad"
    summary = "SmoothGrad: mean gradient over noisy copies; noise std = noise_level x (max - min) of each image"
    n_samples: int = spec_field(50, "noisy copies per image", low=1)
    noise_level: float = spec_field(0.1, "noise std as a fraction of each preprocessed image's (max - min)", low=0)
    output: str = spec_field("probability", "score explained: the class probability or its logit", OUTPUTS)
    samples_per_pass: int = spec_field(10, "noisy copies per forward/backward pass (memory; the maps do not "
                                           "depend on it)", low=1)

    def passes_per_image(self):
        return self.n_samples, self.n_samples


@register_params
@dataclass(frozen=True)
class IntegratedGradientsParams(ExplainerParams):
    name = "integrated_gradients"
    summary = "Integrated Gradients (captum) from a black-image or zero baseline"
    n_steps: int = spec_field(32, "integration steps", low=1)
    output: str = spec_field("probability", "score explained: the class probability or its logit", OUTPUTS)
    baseline: str = spec_field("black", "baseline: a black image (preprocessed) or a zero model input",
                               ("black", "zero"))
    internal_batch_size: int = spec_field(64, "steps per forward/backward pass (memory)", low=1)

    def passes_per_image(self):
        return self.n_steps, self.n_steps


@register_params
@dataclass(frozen=True)
class SaliencyParams(ExplainerParams):
    name = "saliency"
    summary = "Saliency: the plain gradient of the explained score (captum)"
    output: str = spec_field("probability", "score explained: the class probability or its logit", OUTPUTS)


@register_params
@dataclass(frozen=True)
class LimeParams(ExplainerParams):
    name = "lime"
    summary = "LIME on superpixels shared by the committee: mean-colour fill, cosine kernel, weighted ridge"
    needs_segments = True
    n_samples: int = spec_field(1000, "perturbations per image (the first is the unperturbed image)", low=2)
    kernel_width: float = spec_field(0.25, "width of the exponential kernel on the cosine distance", low=0,
                                     open_low=True)
    alpha: float = spec_field(1.0, "ridge penalty (keeps repeated perturbations solvable)", low=0, open_low=True)
    p_keep: float = spec_field(0.5, "probability that a perturbation keeps a superpixel", low=0, high=1,
                               open_low=True, open_high=True)
    forward_batch: int = spec_field("auto", "perturbations per forward pass; auto: 256 on a GPU, 8-128 by input "
                                            "size on a CPU", low=1, also=("auto",))
    output: str = spec_field("probability", "score explained: the class probability or its logit", OUTPUTS)
    seed: int = spec_field(0, "seed of the perturbation masks (with each image's content)")
    segmentation: str = spec_field("slic", "superpixel method (computed once per image in the decode stage)",
                                   SEGMENTATIONS)
    n_segments: int = spec_field(50, "about this many SLIC superpixels", low=1)
    compactness: float = spec_field(10.0, "SLIC compactness (higher: squarer superpixels)", low=0, open_low=True)

    def passes_per_image(self):
        return self.n_samples, 0

    def segment_settings(self) -> dict:
        """`superpixels.segment`'s keyword arguments: how the decode stage segments for LIME."""
        return {"method": self.segmentation, "n_segments": self.n_segments, "compactness": self.compactness,
                "seed": self.seed}


@register_params
@dataclass(frozen=True)
class GradCamParams(ExplainerParams):
    name = "gradcam"
    summary = "Grad-CAM (captum LayerGradCam, ReLU) on the member's last convolutional feature map"
    checks_models = True  # members without a convolutional feature map (transformers) are refused
    output: str = spec_field("logit", "score explained (the Grad-CAM paper uses the logit)", OUTPUTS)
    layer: str | None = spec_field(None, "module name overriding the automatic layer choice, e.g. layer4",
                                   rule="a module name (e.g. 'layer4') or null")

    def __post_init__(self):
        if self.layer is not None and not self.layer:
            raise SpecError("explainer.params.layer must be a module name (e.g. 'layer4') or null, got ''")


def parse_params(name: str, data: dict | None) -> ExplainerParams:
    """The explainer's parameters from the spec's mapping (missing keys take their defaults)."""
    if name not in PARAMS:
        raise SpecError(f"explainer.name: unknown explainer '{name}'{suggest(name, PARAMS)}")
    cls = PARAMS[name]
    if not isinstance(data, dict):
        raise SpecError(f"explainer.params: expected a mapping, got {type(data).__name__}")
    for key in data:
        if key not in {f.name for f in dataclasses.fields(cls)}:
            raise SpecError(f"explainer.params: unknown parameter '{key}' for {name}"
                            f"{suggest(str(key), [f.name for f in dataclasses.fields(cls)])}")
    return build(cls, data, "explainer.params", ruled_choices=True)


def schema_lines() -> list[str]:
    lines = ["explainer.params (per explainer.name):"]
    for name, cls in PARAMS.items():
        lines.append(f"  {name}: {cls.summary}")
        lines += describe(cls, indent="    ")
    return lines
