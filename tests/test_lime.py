"""LIME on shared superpixels: the same surrogate as captum's LimeBase, hand-checked math, shared segments."""

import copy
import math

import numpy as np
import pytest
import skimage.data
import timm
import torch
from captum._utils.models.model import Model
from captum.attr import LimeBase
from captum.attr._core.lime import get_exp_kernel_similarity_function
from skimage.transform import resize
from torch import nn

from ray_consensus.dataset import superpixels
from ray_consensus.errors import SpecError
from ray_consensus.explainers.lime import (
    Lime,
    _Perturbations,
    fill_with_mean_colours,
    fit_weighted_ridge,
    kernel_weights,
    perturbation_seed,
    sample_masks,
)
from ray_consensus.models.committee import DataConfig, Preprocess

S = 40
IMAGENET = DataConfig(input_size=(32, 32), interpolation="bilinear", mean=(0.485, 0.456, 0.406),
                      std=(0.229, 0.224, 0.225))


@pytest.fixture(scope="module")
def photos():
    """Three real photos at S x S: uint8 (3, S, S, 3), their SLIC superpixels (3, S, S), float images (3, 3, S, S)."""
    rgb = np.stack([(resize(f(), (S, S), anti_aliasing=True) * 255).round().astype(np.uint8)
                    for f in (skimage.data.astronaut, skimage.data.chelsea, skimage.data.coffee)])
    segs = np.stack([superpixels.segment(x, "slic", n_segments=16) for x in rgb])
    images = torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255
    return rgb, segs, images


def _cnn(arch: str) -> nn.Module:
    """A seeded random-init timm CNN. Its head is scaled up: a random head gives near-uniform
    probabilities, which would make every LIME weight ~1e-4 and the comparisons below vacuous."""
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=10).eval()
    with torch.no_grad():
        model.get_classifier().weight.mul_(20.0)
    return model


# ---- superpixels -------------------------------------------------------------------------------

def test_segment_ids_are_contiguous_int32(photos):
    rgb, segs, _ = photos
    # quickshift keeps LIME's settings, made for large images: it needs more pixels than SLIC.
    cat = (resize(skimage.data.chelsea(), (96, 96), anti_aliasing=True) * 255).astype(np.uint8)
    for seg in (superpixels.segment(rgb[1], "slic", n_segments=16), superpixels.segment(cat, "quickshift")):
        assert seg.dtype == np.int32 and seg.shape[0] == seg.shape[1] in (S, 96)
        assert np.array_equal(np.unique(seg), np.arange(seg.max() + 1)) and seg.max() >= 3
    assert np.array_equal(superpixels.segment(rgb[0], n_segments=16), segs[0])
    with pytest.raises(ValueError, match="method must be one of"):
        superpixels.segment(rgb[0], "watershed")


def test_mean_colours_by_hand():
    image = np.array([[[0, 0, 0], [10, 20, 30]], [[100, 0, 0], [7, 7, 7]]], dtype=np.uint8)
    segments = np.array([[0, 0], [1, 0]])
    np.testing.assert_allclose(superpixels.mean_colours(image, segments),
                               [[17 / 3, 27 / 3, 37 / 3], [100, 0, 0]])


# ---- the pieces of the method, by hand ----------------------------------------------------------

def test_sample_masks_first_row_unperturbed_rest_bernoulli():
    masks = sample_masks(4000, 10, 0.3, torch.Generator().manual_seed(5))
    assert masks.shape == (4000, 10) and masks.dtype == torch.bool
    assert masks[0].all()
    assert abs(masks[1:].float().mean().item() - 0.3) < 0.01
    assert torch.equal(masks, sample_masks(4000, 10, 0.3, torch.Generator().manual_seed(5)))


def test_perturbation_seed_depends_on_seed_and_content_only():
    image, seg = np.zeros((3, 4, 4), np.uint8), np.zeros((4, 4), np.int32)
    other = image.copy()
    other[0, 0, 0] = 1
    assert perturbation_seed(0, image, seg) == perturbation_seed(0, image.copy(), seg.copy())
    assert len({perturbation_seed(0, image, seg), perturbation_seed(1, image, seg), perturbation_seed(0, other, seg),
                perturbation_seed(0, image, seg + np.eye(4, dtype=np.int32))}) == 4


def test_kernel_is_exponential_on_cosine_distance_to_all_ones():
    masks = torch.tensor([[[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]],
                          [[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]]], dtype=torch.bool)
    w = kernel_weights(masks, torch.tensor([4, 2]), kernel_width=0.25)
    # cos(z, 1) = |z| / sqrt(|z| K): 2 of 4 kept -> 1/sqrt(2); none kept -> 0 (distance 1); the
    # second image has K = 2, so its padded columns do not count.
    d = torch.tensor([[0.0, 1 - 1 / math.sqrt(2), 1.0], [0.0, 1 - 1 / math.sqrt(2), 1 - 1 / math.sqrt(2)]])
    torch.testing.assert_close(w, torch.exp(-d.double()**2 / (2 * 0.25**2)))


def test_weighted_ridge_by_hand_with_unpenalised_intercept_and_padding():
    # One real feature (the second column is padding): z = (0, 1, 1), y = (1, 3, 5), w = (1, 1, 2), alpha = 0.5.
    # Weighted means zbar = 3/4, ybar = 14/4; sum w zc^2 = 9/16 + 1/16 + 2/16 = 3/4;
    # sum w zc yc = (-3/4)(-5/2) + (1/4)(-1/2) + 2 (1/4)(3/2) = 5/2; beta = (5/2) / (3/4 + 1/2) = 2;
    # b = ybar - zbar beta = 7/2 - 3/2 = 2 (not shrunk).
    z = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [1.0, 0.0]]])
    y, w = torch.tensor([[1.0, 3.0, 5.0]]), torch.tensor([[1.0, 1.0, 2.0]])
    beta, b = fit_weighted_ridge(z, y, w, alpha=0.5, n_features=torch.tensor([1]))
    torch.testing.assert_close(beta, torch.tensor([[2.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(b, torch.tensor([2.0], dtype=torch.float64))


def test_check_params_explains_bad_values():
    for bad, message in [({"n_samples": 1}, "n_samples must be an integer >= 2"),
                         ({"alpha": 0}, "alpha must be a number > 0"),
                         ({"p_keep": 1.0}, "p_keep must be a number strictly between 0 and 1"),
                         ({"kernel_width": "wide"}, "kernel_width must be a number > 0"),
                         ({"forward_batch": 2.5}, "forward_batch must be an integer >= 1 or 'auto'"),
                         ({"segmentation": "felzenszwalb"}, "segmentation must be one of slic, quickshift"),
                         ({"output": "softmax"}, "output must be"),
                         ({"n_sample": 10}, "unknown parameter 'n_sample'.*n_samples")]:
        with pytest.raises(SpecError, match=message):
            Lime(**bad)
    assert Lime().params.passes_per_image() == (1000, 0)


# ---- the whole explainer ------------------------------------------------------------------------

class WeightedRidge(Model):
    """captum interpretable model: argmin sum_i w_i (y_i - b - z_i . beta)^2 + alpha |beta|^2, fitted as
    one least-squares problem on [sqrt(w) [1, Z]; [0, sqrt(alpha) I]] (no centring, unlike the code under test)."""

    def __init__(self, alpha: float):
        self.alpha, self.coef = alpha, None

    def fit(self, train_data, **kwargs):
        ((z, y, w),) = list(train_data)
        z, y, sw = z.double().numpy(), y.double().numpy(), np.sqrt(w.double().numpy())
        k = z.shape[1]
        design = np.vstack([sw[:, None] * np.hstack([np.ones((len(z), 1)), z]),
                            np.hstack([np.zeros((k, 1)), math.sqrt(self.alpha) * np.eye(k)])])
        solution = np.linalg.lstsq(design, np.concatenate([sw * y, np.zeros(k)]), rcond=None)[0]
        self.coef = torch.from_numpy(solution[1:])

    def representation(self):
        return self.coef

    def __call__(self, x):
        raise NotImplementedError


def _captum_lime(model, pre, rgb, seg, image, target, n_samples, output):
    """captum's LimeBase on one image, fed the masks our implementation documents it draws."""
    masks = sample_masks(n_samples, int(seg.max()) + 1, 0.5,
                         torch.Generator().manual_seed(perturbation_seed(0, rgb.transpose(2, 0, 1), seg)))
    fill = torch.from_numpy(superpixels.mean_colours(rgb.astype(np.float64) / 255, seg)[seg]).permute(2, 0, 1).float()
    seg_t = torch.from_numpy(seg).long()
    cosine_kernel = get_exp_kernel_similarity_function("cosine", kernel_width=0.25)

    def perturb(_inputs, **kwargs):
        yield from (row[None].long() for row in masks)

    def paint(z, inputs, **kwargs):
        return torch.where(z[0].bool()[seg_t], inputs, fill)

    def forward(x):
        logits = model(pre(x))
        return logits.softmax(dim=1) if output == "probability" else logits

    lime = LimeBase(forward, WeightedRidge(alpha=1.0),
                    similarity_func=lambda _x, _p, z, **kw: cosine_kernel(torch.ones_like(z), z, None),
                    perturb_func=perturb, perturb_interpretable_space=True, from_interp_rep_transform=paint,
                    to_interp_rep_transform=None)
    return lime.attribute(image[None], target=target, n_samples=n_samples, perturbations_per_eval=64)


@pytest.mark.parametrize("output", ["probability", "logit"])
def test_weights_match_captum_limebase_with_the_same_masks_kernel_and_surrogate(photos, output):
    rgb, segs, images = photos
    model, pre, n = _cnn("resnet10t"), Preprocess(IMAGENET), 48
    target = torch.tensor([1, 4, 7])
    out = Lime(n_samples=n, output=output, forward_batch=50).explain(
        model, pre, images, target, torch.from_numpy(segs).long())
    for i in range(3):
        k = int(segs[i].max()) + 1
        expected = _captum_lime(model, pre, rgb[i], segs[i], images[i], int(target[i]), n, output)
        ours = out["superpixel_weights"][i]
        assert torch.isnan(ours[k:]).all()
        # Within 1e-4 of the largest weight: stricter than 1e-4 absolute, as LIME weights are < 1 here.
        assert expected.abs().max() > 1e-3
        torch.testing.assert_close(ours[:k].double(), expected, rtol=0, atol=1e-4 * expected.abs().max().item())
        # The map paints each superpixel's weight on its pixels.
        assert torch.equal(out["map"][i], ours[torch.from_numpy(segs[i]).long()])


def test_recovers_the_true_weights_of_a_model_linear_in_the_superpixels(photos):
    """A linear classifier's logit is exactly linear in the on/off indicators z (a hidden superpixel
    is a fixed mean colour), with weight_k = logit(only k shown) - logit(all hidden); with a tiny
    ridge the surrogate recovers those weights."""
    rgb, segs, images = photos
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * S * S, 4)).eval()
    exact = copy.deepcopy(model).double()
    pre = Preprocess(DataConfig(input_size=(S, S), interpolation="bilinear", mean=(0.5,) * 3, std=(0.25,) * 3))
    out = Lime(n_samples=300, output="logit", alpha=1e-6).explain(
        model, pre, images, torch.tensor([0, 1, 2]), torch.from_numpy(segs).long())

    for i, target in enumerate([0, 1, 2]):
        seg, k = segs[i], int(segs[i].max()) + 1
        fill = superpixels.mean_colours(rgb[i] / 255, seg)[seg]
        shown = [np.where((seg == j)[..., None], rgb[i] / 255, fill) for j in range(k)] + [fill]
        x = torch.from_numpy(np.stack(shown)).permute(0, 3, 1, 2)
        with torch.no_grad():
            logits = exact((x - 0.5) / 0.25)[:, target]
        truth = logits[:k] - logits[k]
        assert truth.abs().max() > 0.05
        torch.testing.assert_close(out["superpixel_weights"][i, :k].double(), truth, rtol=1e-3, atol=1e-4)


def test_committee_shares_superpixels_and_results_do_not_depend_on_the_batch(photos):
    _, segs, images = photos
    seg = torch.from_numpy(segs).long()
    pre, target = Preprocess(IMAGENET), torch.tensor([1, 4, 7])
    lime = Lime(n_samples=24, forward_batch=20)  # chunks straddle images
    maps = {arch: lime.explain(_cnn(arch), pre, images, target, seg)
            for arch in ("resnet10t", "mobilenetv3_small_050")}
    a, b = maps["resnet10t"], maps["mobilenetv3_small_050"]
    assert not torch.allclose(a["superpixel_weights"].nan_to_num(), b["superpixel_weights"].nan_to_num())
    for i in range(3):
        for out in (a, b):  # both maps are constant exactly on the shared superpixels
            for j in range(int(segs[i].max()) + 1):
                values = out["map"][i][seg[i] == j]
                assert torch.all(values == values[0])

    # Same image, same perturbations: another call, batch order and batch size change nothing.
    model = _cnn("resnet10t")
    again = lime.explain(model, pre, images, target, seg)
    torch.testing.assert_close(again["superpixel_weights"], a["superpixel_weights"], equal_nan=True)
    order = torch.tensor([2, 0])
    swapped = Lime(n_samples=24, forward_batch=7).explain(model, pre, images[order], target[order], seg[order])
    for row, i in enumerate(order.tolist()):
        k = int(segs[i].max()) + 1
        torch.testing.assert_close(swapped["superpixel_weights"][row, :k], a["superpixel_weights"][i, :k],
                                   rtol=1e-4, atol=1e-6)
    # A different seed draws different perturbations.
    other = Lime(n_samples=24, seed=1).explain(model, pre, images[:1], target[:1], seg[:1])
    k = int(segs[0].max()) + 1
    assert not torch.allclose(other["superpixel_weights"][0, :k], a["superpixel_weights"][0, :k])


def test_perturbed_inputs_equal_preprocessing_each_perturbed_image(photos):
    """The product of per-superpixel terms (resizing members) and the per-pixel choice (members at
    the grid's size) give what preprocessing every perturbed image would."""
    _, segs, images = photos
    seg = torch.from_numpy(segs).long()
    n_features = seg.flatten(1).max(dim=1).values + 1
    fill = fill_with_mean_colours(images, seg, int(n_features.max()))
    rows = sample_masks(9, int(n_features.max()), 0.5, torch.Generator().manual_seed(1))
    for pre in (Preprocess(IMAGENET), Preprocess(DataConfig(input_size=(S, S), interpolation="bicubic",
                                                            mean=(0.5,) * 3, std=(0.25,) * 3))):
        perturbed = _Perturbations(pre, images, fill, seg, n_features)
        for i in range(len(images)):
            z = rows.clone()
            z[:, int(n_features[i]):] = False
            expected = pre(torch.where(z[:, seg[i]][:, None], images[i], fill[i]))
            torch.testing.assert_close(perturbed(i, z), expected, rtol=0, atol=1e-5)


def test_auto_forward_batch_follows_the_device_and_input_size():
    lime = Lime()
    assert lime.forward_batch(torch.device("cuda"), (224, 224)) == 256
    assert lime.forward_batch(torch.device("cpu"), (224, 224)) == 16
    assert lime.forward_batch(torch.device("cpu"), (96, 96)) == 64
    assert lime.forward_batch(torch.device("cpu"), (64, 64)) == 128
    assert Lime(forward_batch=5).forward_batch(torch.device("cpu"), (64, 64)) == 5


def test_decode_stage_computes_the_explainers_superpixels_without_loading_torch_or_pandas(tmp_path):
    """Decode workers segment with the LIME params the driver resolved (defaults + spec) and never
    import torch or pandas (the manifest's, in `data.py`): their imports would cost every decode
    worker CPU beside the slots while those load their own."""
    import pickle
    import subprocess
    import sys

    from imagesets import make_image_folder, tiny_spec

    from ray_consensus.attribution.decode_stage import segmentation_of
    from ray_consensus.attribution.records import ShardTask, StageContext
    from ray_consensus.dataset.manifest import read_manifest
    from ray_consensus.runroot.contract import ImageRef
    from ray_consensus.runroot.units import Unit
    from ray_consensus.spec.config import parse_spec

    data = make_image_folder(tmp_path / "data", n_classes=1, per_class=2, size=(48, 48), masks=False)
    spec = tiny_spec(data, str(tmp_path / "run"), models=("a=resnet10t@random",), method={"robustness_sizes": []})
    assert segmentation_of(parse_spec(spec)) is None  # SmoothGrad needs no superpixels
    spec["explainer"] = {"name": "lime", "params": {"n_segments": 12, "compactness": 5.0}}
    spec = parse_spec(spec)
    ctx = StageContext(spec, 1, None, None, segmentation_of(spec))
    assert ctx.segmentation == {"method": "slic", "n_segments": 12, "compactness": 5.0, "seed": 0}
    images = [ImageRef(r.image_id, r.uri, 0, None) for r in read_manifest(spec.dataset).table.itertuples()]
    done = Unit("inputs/shard=00000", "fp", "fp")  # already written: the stage only decodes
    (tmp_path / "stage.pkl").write_bytes(pickle.dumps((ctx, ShardTask(0, images, done, {}))))
    code = """
import pickle, sys
from ray_consensus.attribution.decode_stage import DecodeShard
ctx, task = pickle.loads(open(sys.argv[1], "rb").read())  # as a Ray worker receives them
out = DecodeShard(ctx).decode(task)
loaded = [m for m in ("torch", "pandas") if m in sys.modules]
pickle.dump((out.pixels, out.segments, loaded), open(sys.argv[1], "wb"))
"""
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "stage.pkl")], check=True)
    pixels, segments, loaded = pickle.loads((tmp_path / "stage.pkl").read_bytes())
    assert loaded == [], f"the decode stage imported {loaded}"  # torch: 1.6 CPU-s; pandas: 0.4 s per worker
    assert len(pixels) == 2
    expected = [superpixels.segment(p, "slic", n_segments=12, compactness=5.0, seed=0) for p in pixels]
    np.testing.assert_array_equal(segments, np.stack(expected))
