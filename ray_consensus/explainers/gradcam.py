"""Grad-CAM (Selvaraju et al. 2017) on each member's last convolutional feature map, via captum.

The map is relu(sum_c alpha_c A_c), alpha_c the spatial mean of d score / d A_c, on the layer's
own (B, h', w') grid; the actor resamples it to the run's map grid. The explained score defaults
to the class logit, as in the Grad-CAM paper (the softmax would mix in every other class's
gradient); `output: probability` is available.

The layer is found per architecture (`target_layer`): timm's `feature_info` names each model's
last feature stage; models without it fall back to the last module (in execution order) that
holds a convolution and outputs a 4-D feature map. Transformers (ViT, Mixer, Swin...) have no
such map and are refused.
"""

from __future__ import annotations

import difflib

import torch
from torch import nn

from ray_consensus.errors import SpecError, first_line
from ray_consensus.explainers.base import Explainer, ScoreModel, register
from ray_consensus.models.committee import member_data_config
from ray_consensus.spec.explainer_params import GradCamParams


def _arch(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def _has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def _finished_outputs(model: nn.Module, modules: list[nn.Module]) -> list[tuple[nn.Module, torch.Size | None]]:
    """(module, output shape) in the order the modules finish on one blank image at the model's
    input size (timm's data config); shape None for outputs that are not a single tensor."""
    size = member_data_config(model).input_size
    ref = next(model.parameters(), torch.empty(0))
    finished = []
    hooks = [m.register_forward_hook(lambda mod, _inp, out: finished.append(
        (mod, out.shape if isinstance(out, torch.Tensor) else None))) for m in modules]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, *size, device=ref.device, dtype=ref.dtype))
    except Exception as e:  # a model's own code may raise anything on this input: one line naming it
        raise SpecError(f"gradcam: cannot run model {_arch(model)} on a {size[0]}x{size[1]} image to find its "
                        f"feature layer: {first_line(e)}") from None
    finally:
        for h in hooks:
            h.remove()
    return finished


def target_layer(model: nn.Module, layer: str | None = None) -> nn.Module:
    """The module whose (B, C, h', w') output Grad-CAM weighs: `layer` (a module name) when given,
    else timm's last `feature_info` stage, else the last conv-holding module with a 4-D output.

    Runs the model once on a blank image to check the output shape. Raises SpecError for an
    unknown name, or when the chosen module is not a convolutional feature map.
    """
    arch = _arch(model)
    info = getattr(model, "feature_info", None)
    name = layer if layer is not None else (info[-1]["module"] if isinstance(info, list) and info else None)
    no_conv = SpecError(f"gradcam: model {arch} has no convolutional feature layer; use smoothgrad, "
                        "integrated_gradients, saliency or lime for transformer members")
    if name is None:
        candidates = [m for m in model.modules() if m is not model and _has_conv(m)]
        found = [m for m, shape in _finished_outputs(model, candidates) if shape is not None and len(shape) == 4]
        if not found:
            raise no_conv
        return found[-1]

    names = dict(model.named_modules())
    if name not in names:
        close = difflib.get_close_matches(name, [n for n in names if n], n=3)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise SpecError(f"gradcam: model {arch} has no layer '{name}'{hint}")
    module = names[name]
    if not _has_conv(module):
        if layer is None:
            raise no_conv
        raise SpecError(f"gradcam: layer '{name}' of model {arch} holds no convolution")
    shapes = [shape for _, shape in _finished_outputs(model, [module])]
    if not shapes or shapes[-1] is None or len(shapes[-1]) != 4:
        raise SpecError(f"gradcam: layer '{name}' of model {arch} does not output a 4-D (B, C, h, w) feature map "
                        f"(got shape {tuple(shapes[-1]) if shapes and shapes[-1] is not None else None})")
    return module


@register
class GradCam(Explainer):
    """Grad-CAM (captum `LayerGradCam`, ReLU applied) on the member's last convolutional feature map.

    Params (`GradCamParams`): output (logit|probability, default logit as in the Grad-CAM paper),
    layer (a module name overriding the automatic choice, e.g. "layer4"; null = automatic).
    """

    params_type = GradCamParams

    def __init__(self, params: GradCamParams | None = None, /, **values):
        super().__init__(params, **values)
        self._layer_of: tuple[nn.Module, nn.Module] | None = None  # (model, its layer): found once per model

    def check_model(self, model):
        target_layer(model, self.params.layer)

    def explain(self, model, preprocess, images, target, segments=None, seeds=None):
        """images (B, 3, S, S) in [0, 1], target (B,) -> {"map": float32 (B, h', w') on the layer's grid}."""
        from captum.attr import LayerGradCam

        if self._layer_of is None or self._layer_of[0] is not model:
            self._layer_of = (model, target_layer(model, self.params.layer))
        x = preprocess(images).detach()
        cam = LayerGradCam(ScoreModel(model, self.params.output), self._layer_of[1])
        attr = cam.attribute(x, target=target, relu_attributions=True)
        return {"map": attr[:, 0].detach().float()}
