"""Grad-CAM: the last convolutional feature map of each architecture, and the map captum computes on it."""

from dataclasses import replace

import pytest
import timm
import torch
from captum.attr import LayerGradCam
from torch import nn

from ray_consensus.errors import SpecError
from ray_consensus.explainers import ScoreModel
from ray_consensus.explainers.gradcam import GradCam, target_layer
from ray_consensus.models.committee import Preprocess, member_data_config


def _member(arch: str, size: int = 96, **kwargs):
    """A seeded random-init timm model and its preprocessing, resized to a small input for speed."""
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=10, **kwargs).eval()
    return model, Preprocess(replace(member_data_config(model), input_size=(size, size)))


def _images(b: int = 3, s: int = 64) -> torch.Tensor:
    return torch.rand(b, 3, s, s, generator=torch.Generator().manual_seed(1))


def _name(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


@pytest.mark.parametrize("arch, expected", [("resnet10t", "layer4"), ("mobilenetv3_small_050", "blocks.5"),
                                            ("convnext_atto", "stages.3")])
def test_auto_layer_is_the_last_feature_stage_with_a_4d_map(arch, expected):
    model, _ = _member(arch)
    layer = target_layer(model)
    assert _name(model, layer) == expected
    seen = []
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
    with torch.no_grad():
        model(torch.zeros(1, 3, 96, 96))
    handle.remove()
    assert len(seen[-1]) == 4 and seen[-1][1] == model.feature_info[-1]["num_chs"]


def test_without_feature_info_falls_back_to_last_conv_module_with_4d_output():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Sequential(nn.Conv2d(4, 5, 3), nn.ReLU()),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 2)).eval()
    # The inner Sequential is the last module holding a conv; the pooling after it holds none.
    assert target_layer(net) is net[2]


@pytest.mark.parametrize("arch, kwargs", [("vit_tiny_patch16_224", {"img_size": 64, "patch_size": 8}),
                                          ("mixer_s16_224", {"img_size": 64})])
def test_transformers_are_refused_with_a_clear_error(arch, kwargs):
    model, _ = _member(arch, **kwargs)
    with pytest.raises(SpecError, match=f"gradcam: model {arch} has no convolutional feature layer; "
                                        "use smoothgrad, integrated_gradients, saliency or lime"):
        target_layer(model)


def test_explicit_layer_overrides_and_bad_names_are_explained():
    model, _ = _member("resnet10t")
    assert target_layer(model, "layer3") is model.layer3
    with pytest.raises(SpecError, match="no layer 'layer5' .*did you mean 'layer4'"):
        target_layer(model, "layer5")
    with pytest.raises(SpecError, match="layer 'fc' .* holds no convolution"):
        target_layer(model, "fc")
    with pytest.raises(SpecError, match="layer must be a module name"):
        GradCam(layer=3)
    with pytest.raises(SpecError, match="output must be"):
        GradCam(output="softmax")


@pytest.mark.parametrize("arch", ["resnet10t", "mobilenetv3_small_050"])
def test_matches_captum_layer_gradcam_on_the_same_layer(arch):
    model, pre = _member(arch)
    images, target = _images(), torch.tensor([0, 3, 7])
    out = GradCam().explain(model, pre, images, target)["map"]

    direct = LayerGradCam(ScoreModel(model, "logit"), target_layer(model)).attribute(
        pre(images), target=target, relu_attributions=True)
    assert out.shape == (3, 3, 3) and out.dtype == torch.float32
    assert (out > 0).any()
    torch.testing.assert_close(out, direct[:, 0].detach(), rtol=1e-5, atol=1e-7)


def test_map_is_relu_of_gradient_weighted_channels():
    """Grad-CAM by hand: alpha_c = mean over (h, w) of d logit / d A_c; map = relu(sum_c alpha_c A_c)."""
    model, pre = _member("resnet10t")
    images, target = _images(2), torch.tensor([2, 5])
    acts = []
    handle = model.layer4.register_forward_hook(lambda _m, _i, out: acts.append(out))
    logits = model(pre(images))
    handle.remove()
    (grads,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), acts[0])
    alpha = grads.mean(dim=(2, 3), keepdim=True)
    expected = torch.relu((alpha * acts[0]).sum(dim=1)).detach()

    out = GradCam(layer="layer4").explain(model, pre, images, target)["map"]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-6)
    # The probability's gradient mixes in the other classes, so its map is a different one.
    prob = GradCam(output="probability").explain(model, pre, images, target)["map"]
    assert not torch.allclose(prob / prob.amax(), out / out.amax(), atol=1e-3)
