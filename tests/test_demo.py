"""The offline demo: a deterministic masked image set and a cached, trained timm committee."""

import json

import numpy as np
import pytest
import timm
import timm.data
import torch
from PIL import Image
from safetensors.torch import load_file

from ray_consensus.demo.committee import MemberRecipe
from ray_consensus.demo.images import DatasetSpec, build_dataset, paste
from ray_consensus.demo.spec import ensure_demo
from ray_consensus.models.names import default_cache_dir

TINY_SPEC = DatasetSpec(n_classes=3, per_class=8, image_size=32, train_per_class=24)
TINY_COMMITTEE = (
    MemberRecipe("resnet", "resnet10t", 32, steps=50, batch_size=32),
    MemberRecipe(
        "vit",
        "vit_tiny_patch16_224",
        24,
        steps=5,
        batch_size=32,
        kwargs={"img_size": 24, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 2},
    ),
)


def _ensure_tiny_demo(cache):
    return ensure_demo(cache, seed=0, progress=False, spec=TINY_SPEC, recipes=TINY_COMMITTEE)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    # One thread: the tiny models gain nothing from more, and a busy CI box slows
    # waiting OpenMP threads down many times over.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cache = tmp_path_factory.mktemp("cache")
        root, committee = _ensure_tiny_demo(cache)
    finally:
        torch.set_num_threads(threads)
    return cache, root, committee


def _load(member):
    model = timm.create_model(member["arch"], num_classes=member["num_classes"], **member["kwargs"])
    model.load_state_dict(load_file(member["weights"]), strict=True)
    return model.eval()


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tmp_path):
    spec = dict(n_classes=3, per_class=2, image_size=32, train_per_class=2)
    first = _files(build_dataset(tmp_path / "a", seed=7, **spec))
    second = _files(build_dataset(tmp_path / "b", seed=7, **spec))
    other = _files(build_dataset(tmp_path / "c", seed=8, **spec))
    assert len(first) == 3 * (2 + 2 + 2)  # images, masks, train
    assert first == second
    assert first.keys() == other.keys()
    assert all(first[name] != other[name] for name in first)


@pytest.mark.slow
def test_layout_has_one_folder_per_class_and_labels_in_sorted_order(demo):
    _, root, committee = demo
    description = json.loads((root / "dataset.json").read_text())
    classes = description["classes"]
    assert len(classes) == 3 and classes == sorted(classes)
    for split, per_class in (("images", 8), ("masks", 8), ("train", 24)):
        folders = sorted(p.name for p in (root / split).iterdir())
        assert folders == classes
        assert all(len(list((root / split / c).glob("*.png"))) == per_class for c in classes)
    assert description["counts"] == {"images": 24, "train": 72}
    assert all(member["num_classes"] == 3 for member in committee)


@pytest.mark.slow
def test_masks_are_binary_partial_and_match_their_images(demo):
    _, root, _ = demo
    for mask_path in sorted((root / "masks").rglob("*.png")):
        image = Image.open(root / "images" / mask_path.relative_to(root / "masks"))
        mask = np.asarray(Image.open(mask_path))
        assert image.mode == "RGB" and image.size == (32, 32)
        assert mask.dtype == np.uint8 and mask.shape == (32, 32)
        assert set(np.unique(mask)) == {0, 255}
        assert 0.05 < (mask == 255).mean() < 0.6  # an object of 40-75 % of the side


def test_paste_mask_is_where_the_object_covers_at_least_half_a_pixel():
    background = np.zeros((6, 8, 3), np.float32)
    alpha = np.array([[0.0, 0.25, 0.25], [0.25, 1.0, 0.5], [0.0, 0.25, 0.0]], np.float32)
    rgba = np.concatenate([np.full((3, 3, 3), 0.8, np.float32), alpha[:, :, None]], axis=2)

    image, mask = paste(background, rgba, top=2, left=4)

    expected_mask = np.zeros((6, 8), np.uint8)
    expected_mask[3, 5:7] = 255  # alpha 1.0 and 0.5
    np.testing.assert_array_equal(mask, expected_mask)
    np.testing.assert_allclose(image[2:5, 4:7, 0], 0.8 * alpha)  # 0.8 over a black background
    assert image[:2].max() == 0 and image[:, :4].max() == 0 and image[5:].max() == 0

    # Parts outside the background are clipped, not wrapped.
    image, mask = paste(background, rgba, top=-1, left=6)
    expected_mask = np.zeros((6, 8), np.uint8)
    expected_mask[0, 7] = 255
    np.testing.assert_array_equal(mask, expected_mask)
    np.testing.assert_allclose(image[0:2, 6:8, 0], 0.8 * alpha[1:3, 0:2])


@pytest.mark.slow
def test_weights_load_strictly_and_timm_resolves_the_trained_input_size(demo):
    _, _, committee = demo
    assert [m["id"] for m in committee] == ["resnet", "vit"]
    for member, size in zip(committee, (32, 24)):
        assert member["weights"].endswith(".safetensors")
        model = _load(member)
        config = timm.data.resolve_data_config(model=model)
        assert tuple(config["input_size"]) == (3, size, size)
        assert config["crop_pct"] == 1.0


@pytest.mark.slow
def test_trained_member_beats_chance_and_matches_its_sidecar(demo):
    _, root, committee = demo
    member = committee[0]
    model = _load(member)
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    classes = json.loads((root / "dataset.json").read_text())["classes"]
    paths = sorted((root / "images").rglob("*.png"))
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    labels = torch.tensor([classes.index(p.parent.name) for p in paths])
    with torch.inference_mode():
        accuracy = (model(x).argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.6  # chance is 1/3
    sidecar = json.loads(open(member["weights"].removesuffix(".safetensors") + ".json").read())
    assert sidecar["test_accuracy"] == pytest.approx(accuracy)
    assert sidecar["arch"] == "resnet10t" and sidecar["classes"] == classes


@pytest.mark.slow
def test_second_call_reuses_the_cache_without_rewriting_anything(demo):
    cache, root, committee = demo
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*")}

    root_again, committee_again = _ensure_tiny_demo(cache)

    assert (root_again, committee_again) == (root, committee)
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*")} == before


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_CONSENSUS_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("RAY_CONSENSUS_CACHE")
    assert default_cache_dir().parts[-2:] == (".cache", "ray-consensus")
