"""Gradient explainers: SmoothGrad, Integrated Gradients, Saliency (interface: `explainers.base`)."""

from __future__ import annotations

import torch

from ray_consensus.explainers.base import (
    Explainer,
    ScoreModel,
    class_score,
    explained_scores,
    reduce_channels,
    register,
)
from ray_consensus.spec.explainer_params import IntegratedGradientsParams, SaliencyParams, SmoothGradParams


@register
class SmoothGrad(Explainer):
    """SmoothGrad: mean gradient over noisy copies; noise std = noise_level x (max - min) of each
    preprocessed image.

    Image i's noise is drawn from its own generator seeded with `seeds[i]` (torch's global
    generator when `seeds` is None), n_samples copies in order, `samples_per_pass` at a time:
    with one image this is captum's NoiseTunnel draw for draw, and an image's map does not
    depend on the batch size, `samples_per_pass` or which images share its batch.
    """

    params_type = SmoothGradParams

    def explain(self, model, preprocess, images, target, segments=None, seeds=None):
        p = self.params
        x = preprocess(images).detach()
        b = x.shape[0]
        flat = x.reshape(b, -1)
        sigma = (p.noise_level * (flat.max(1).values - flat.min(1).values)).tolist()  # (B,)
        generators = ([torch.Generator(device=x.device).manual_seed(int(s)) for s in seeds.tolist()]
                      if seeds is not None else [None] * b)
        total = torch.zeros_like(x)
        for done in range(0, p.n_samples, p.samples_per_pass):
            m = min(p.samples_per_pass, p.n_samples - done)
            noise = torch.cat([torch.randn((m, *x.shape[1:]), generator=g, device=x.device, dtype=x.dtype) * s
                               for g, s in zip(generators, sigma)])
            noisy = (x.repeat_interleave(m, dim=0) + noise).requires_grad_(True)
            score = class_score(model, noisy, target.repeat_interleave(m), p.output)
            (grad,) = torch.autograd.grad(score.sum(), noisy)
            total += grad.view(b, m, *x.shape[1:]).sum(dim=1)
        return {"map": reduce_channels(total / p.n_samples)}


@register
class IntegratedGradients(Explainer):
    """Integrated Gradients (captum) from a black-image baseline (or a zero model input)."""

    params_type = IntegratedGradientsParams

    def explain(self, model, preprocess, images, target, segments=None, seeds=None):
        from captum.attr import IntegratedGradients as CaptumIG

        p = self.params
        x = preprocess(images).detach()
        baseline = preprocess(torch.zeros_like(images)) if p.baseline == "black" else torch.zeros_like(x)
        ig = CaptumIG(ScoreModel(model, p.output))
        attr = ig.attribute(x, baselines=baseline.detach(), target=target, n_steps=p.n_steps,
                            internal_batch_size=p.internal_batch_size)
        return {"map": reduce_channels(attr)}


@register
class Saliency(Explainer):
    """Saliency: the plain gradient of the explained score, as captum's `Saliency` computes it.

    One forward pass gives both the gradient and the logits of the unperturbed input, which are
    returned too ("logits", (B, n_classes)): the slot takes the member's prediction from them
    instead of a second forward pass.
    """

    params_type = SaliencyParams
    returns_logits = True

    def explain(self, model, preprocess, images, target, segments=None, seeds=None):
        x = preprocess(images).detach().requires_grad_(True)
        logits = model(x).float()
        scores = explained_scores(logits, self.params.output)
        (grad,) = torch.autograd.grad(scores.gather(1, target[:, None]).sum(), x)
        return {"map": reduce_channels(grad), "logits": logits.detach()}
