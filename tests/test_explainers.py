"""Explainers against direct captum calls on real (small, seeded) timm models."""

from __future__ import annotations

import pytest
import timm
import torch
from captum.attr import IntegratedGradients, NoiseTunnel, Saliency

from ray_consensus.errors import SpecError
from ray_consensus.explainers import EXPLAINERS, ScoreModel
from ray_consensus.models.committee import DataConfig, Preprocess, member_data_config, resample_maps


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return timm.create_model("resnet10t", num_classes=5).eval()


@pytest.fixture(scope="module")
def preprocess(model):
    return Preprocess(DataConfig((32, 32), "bilinear", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))


def test_smoothgrad_matches_captum_noise_tunnel(model, preprocess):
    torch.manual_seed(1)
    images = torch.rand(3, 3, 32, 32)
    target = torch.tensor([0, 3, 4])
    sg = EXPLAINERS["smoothgrad"](n_samples=6, samples_per_pass=3, noise_level=0.2)
    for i in range(3):  # captum takes one absolute std per call: compare image by image
        x = preprocess(images[i:i + 1])
        sigma = 0.2 * float(x.max() - x.min())
        torch.manual_seed(7)
        ours = sg.explain(model, preprocess, images[i:i + 1], target[i:i + 1])["map"]
        torch.manual_seed(7)
        nt = NoiseTunnel(Saliency(ScoreModel(model, "probability")))
        ref = nt.attribute(x, nt_type="smoothgrad", nt_samples=6, nt_samples_batch_size=3, stdevs=sigma,
                           target=target[i:i + 1], abs=False)
        torch.testing.assert_close(ours, ref.abs().sum(dim=1), rtol=1e-4, atol=1e-7)


def test_smoothgrad_with_seeds_draws_each_images_noise_from_its_own_generator(model, preprocess):
    """With per-image seeds, image i's map is NoiseTunnel's under torch.manual_seed(seeds[i]), whatever
    the batch it is in and however many copies share a pass."""
    torch.manual_seed(3)
    images = torch.rand(3, 3, 32, 32)
    target = torch.tensor([2, 0, 1])
    seeds = torch.tensor([11, 12, 13])
    batched = EXPLAINERS["smoothgrad"](n_samples=6, samples_per_pass=4, noise_level=0.2).explain(
        model, preprocess, images, target, seeds=seeds)["map"]
    for i in range(3):
        alone = EXPLAINERS["smoothgrad"](n_samples=6, samples_per_pass=6, noise_level=0.2).explain(
            model, preprocess, images[i:i + 1], target[i:i + 1], seeds=seeds[i:i + 1])["map"]
        torch.testing.assert_close(batched[i:i + 1], alone, rtol=1e-4, atol=1e-7)
        x = preprocess(images[i:i + 1])
        torch.manual_seed(int(seeds[i]))
        nt = NoiseTunnel(Saliency(ScoreModel(model, "probability")))
        ref = nt.attribute(x, nt_type="smoothgrad", nt_samples=6, nt_samples_batch_size=6,
                           stdevs=0.2 * float(x.max() - x.min()), target=target[i:i + 1], abs=False)
        torch.testing.assert_close(alone, ref.abs().sum(dim=1), rtol=1e-4, atol=1e-7)


def test_smoothgrad_noise_scales_with_each_images_range(model, preprocess):
    # noise_level 0 -> plain gradient, whatever the seed; this pins the per-image std formula's zero point.
    images = torch.rand(2, 3, 32, 32)
    target = torch.tensor([1, 2])
    sg0 = EXPLAINERS["smoothgrad"](n_samples=4, noise_level=0.0)
    sal = EXPLAINERS["saliency"]()
    torch.testing.assert_close(sg0.explain(model, preprocess, images, target)["map"],
                               sal.explain(model, preprocess, images, target)["map"], rtol=1e-5, atol=1e-8)


def test_integrated_gradients_and_saliency_match_captum(model, preprocess):
    torch.manual_seed(2)
    images = torch.rand(2, 3, 32, 32)
    target = torch.tensor([1, 4])
    x = preprocess(images)
    ig = EXPLAINERS["integrated_gradients"](n_steps=8).explain(model, preprocess, images, target)["map"]
    ref = IntegratedGradients(ScoreModel(model, "probability")).attribute(
        x, baselines=preprocess(torch.zeros_like(images)), target=target, n_steps=8)
    torch.testing.assert_close(ig, ref.abs().sum(1), rtol=1e-4, atol=1e-8)
    sal = EXPLAINERS["saliency"](output="logit").explain(model, preprocess, images, target)["map"]
    ref = Saliency(ScoreModel(model, "logit")).attribute(x, target=target, abs=True).sum(1)
    torch.testing.assert_close(sal, ref, rtol=1e-5, atol=1e-8)


def test_preprocess_reads_timm_data_config():
    m = timm.create_model("resnet10t", num_classes=3, pretrained_cfg_overlay={"input_size": (3, 48, 48)})
    cfg = member_data_config(m)
    assert cfg.input_size == (48, 48)
    assert cfg.mean == pytest.approx(m.pretrained_cfg["mean"])
    x = torch.ones(1, 3, 20, 20) * torch.tensor(cfg.mean).view(1, 3, 1, 1)
    out = Preprocess(cfg)(x)
    assert out.shape == (1, 3, 48, 48)
    torch.testing.assert_close(out, torch.zeros_like(out), atol=1e-5, rtol=0)  # the mean colour maps to 0


def test_resample_keeps_constant_maps_and_grid():
    maps = torch.full((2, 40, 40), 3.0)
    out = resample_maps(maps, 16)
    assert out.shape == (2, 16, 16)
    torch.testing.assert_close(out, torch.full((2, 16, 16), 3.0))


def test_unknown_parameter_says_what_was_meant():
    with pytest.raises(SpecError, match="did you mean 'n_samples'"):
        EXPLAINERS["smoothgrad"](n_sample=3)
