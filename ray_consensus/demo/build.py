"""Offline demo: a small masked image set and a committee of timm models trained on it.

Nothing is downloaded. Every class is an object cut out of one of scikit-image's bundled
sample photos (``skimage.data``) and pasted at a random place, size, angle and brightness
onto a random crop of a background texture, so the evidence for the class lies inside the
per-pixel foreground mask and the background carries none. A committee of small timm models
of different families and training lengths is then trained from scratch on a separate
training split, on CPU, so that their accuracies on the explained image set differ.

Layout written by :func:`build_dataset` (all images RGB PNG, ``S × S`` pixels)::

    <root>/dataset.json                          classes (label = list index), counts, fingerprint
    <root>/images/<class>/<image_id>.png         the image set a run explains
    <root>/masks/<class>/<image_id>.png          uint8 {0, 255} single-channel foreground mask
    <root>/train/<class>/<image_id>.png          disjoint training split (no masks)

:func:`ensure_demo` builds both once into a cache folder keyed by every recipe parameter,
so a second call returns at once.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import skimage.data
import timm
import timm.data
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from scipy.ndimage import gaussian_filter

from ray_consensus.models.names import default_cache_dir
from ray_consensus.storage.atomic import atomic_write

# Bump when anything that changes the bytes of the data set or the trained weights changes
# without showing up in the parameters below (cut-out boxes, jitter ranges, optimiser, ...).
RECIPE_VERSION = 1

_SPLIT_CODES = {"images": 0, "train": 1}


# --------------------------------------------------------------------------- data set


@dataclass(frozen=True)
class ObjectSource:
    """One class: a region of a ``skimage.data`` photo and how to cut it out.

    ``box`` is ``(top, bottom, left, right)`` in source pixels (``None``: the whole photo).
    ``cut`` is ``"ellipse"`` (ellipse inscribed in the box, its outline jittered per image)
    or ``"silhouette"`` (the photo is itself a binary mask, False = object; the object is
    filled with a textured colour, so only its shape identifies it).
    """

    name: str
    photo: str
    box: tuple[int, int, int, int] | None = None
    cut: str = "ellipse"


# Only photos shipped inside the scikit-image wheel; the ones that need `pooch` are avoided.
OBJECT_SOURCES: tuple[ObjectSource, ...] = (
    ObjectSource("astronaut", "astronaut", (20, 230, 150, 320)),
    ObjectSource("cat", "chelsea", (0, 300, 60, 400)),
    ObjectSource("coffee", "coffee", (30, 350, 60, 560)),
    ObjectSource("colorwheel", "colorwheel"),
    ObjectSource("coin", "coins", (238, 290, 275, 327)),
    ObjectSource("cameraman", "camera", (40, 420, 100, 350)),
    ObjectSource("horse", "horse", cut="silhouette"),
    ObjectSource("retina", "retina", (30, 1380, 30, 1380)),
    ObjectSource("logo", "logo", (20, 480, 20, 480)),
    ObjectSource("rocket", "rocket", (90, 420, 250, 390)),
    ObjectSource("galaxies", "hubble_deep_field", (300, 600, 300, 600)),
    ObjectSource("tissue", "immunohistochemistry", (0, 300, 250, 512)),
    ObjectSource("phantom", "shepp_logan_phantom"),
    ObjectSource("clock", "clock", (90, 230, 130, 290)),
)

BACKGROUND_TEXTURES: tuple[str, ...] = ("brick", "grass", "gravel", "moon", "noise")


def _as_rgb_float(photo: np.ndarray) -> np.ndarray:
    """Any skimage sample photo -> float32 ``(H, W, 3)`` in [0, 1]."""
    photo = np.asarray(photo)
    if photo.dtype == np.uint8:
        photo = photo.astype(np.float32) / 255.0
    photo = photo.astype(np.float32)
    if photo.ndim == 2:
        photo = np.repeat(photo[:, :, None], 3, axis=2)
    return np.clip(photo[:, :, :3], 0.0, 1.0)


def _resize(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a float32 ``(H, W)`` or ``(H, W, C)`` array with PIL's antialiased bilinear filter."""
    if array.ndim == 2:
        image = Image.fromarray(np.ascontiguousarray(array, dtype=np.float32))
        resized = image.resize((width, height), Image.Resampling.BILINEAR)
        return np.asarray(resized, dtype=np.float32)
    return np.stack([_resize(array[:, :, c], height, width) for c in range(array.shape[2])], axis=2)


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
    return getattr(skimage.data, name)()


@functools.lru_cache(maxsize=None)
def _object_base(source: ObjectSource, base: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The cut-out region at ``base`` pixels on its longer side.

    Returns ``(rgb, alpha)``: float32 ``(h, w, 3)`` in [0, 1] and, for silhouettes, the fixed
    float32 ``(h, w)`` alpha (``None`` for ellipses, whose outline is drawn per image).
    """
    photo = _photo(source.photo)
    if source.box is not None:
        top, bottom, left, right = source.box
        photo = photo[top:bottom, left:right]
    h, w = photo.shape[:2]
    scale = base / max(h, w)
    h, w = max(1, round(h * scale)), max(1, round(w * scale))
    if source.cut == "silhouette":
        alpha = _resize((~photo.astype(bool)).astype(np.float32), h, w)
        # A shape-only class: a brown coat shaded by the gravel texture.
        shade = _resize(_as_rgb_float(_photo("gravel"))[:, :, 0], h, w)
        rgb = np.array([0.45, 0.30, 0.18], np.float32) * (0.6 + 0.8 * shade[:, :, None])
        return np.clip(rgb, 0.0, 1.0), alpha
    return _resize(_as_rgb_float(photo), h, w), None


def _ellipse_alpha(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Soft ellipse inscribed in ``h × w`` whose radius wobbles with angle (a random blob).

    Returns float32 ``(h, w)`` in [0, 1], about one pixel of soft edge.
    """
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    dy, dx = (y + 0.5) / h * 2 - 1, (x + 0.5) / w * 2 - 1
    radius, theta = np.hypot(dx, dy), np.arctan2(dy, dx)
    outline = np.ones_like(theta)
    for k in (2, 3, 4):
        outline -= rng.uniform(0.0, 0.06) * (1 + np.cos(k * theta + rng.uniform(0, 2 * np.pi)))
    edge = 2.0 / max(h, w)
    return np.clip((outline - radius) / edge + 0.5, 0.0, 1.0).astype(np.float32)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A random crop of a randomly tinted texture, float32 ``(size, size, 3)`` in [0, 1]."""
    texture = BACKGROUND_TEXTURES[rng.integers(len(BACKGROUND_TEXTURES))]
    if texture == "noise":
        field_ = gaussian_filter(rng.standard_normal((size, size)), sigma=rng.uniform(1.0, 4.0))
        gray = (field_ - field_.min()) / (np.ptp(field_) + 1e-8)
    else:
        photo = _as_rgb_float(_photo(texture))[:, :, 0]
        crop = int(rng.integers(size, min(photo.shape) // 2))
        top = int(rng.integers(photo.shape[0] - crop + 1))
        left = int(rng.integers(photo.shape[1] - crop + 1))
        gray = _resize(photo[top : top + crop, left : left + crop], size, size)
        gray = np.rot90(gray, rng.integers(4))
    tint = rng.uniform(0.3, 1.0, size=3).astype(np.float32)
    offset = rng.uniform(0.0, 0.3, size=3).astype(np.float32)
    return np.clip(gray[:, :, None] * tint + offset, 0.0, 1.0).astype(np.float32)


def paste(
    background: np.ndarray, rgba: np.ndarray, top: int, left: int
) -> tuple[np.ndarray, np.ndarray]:
    """Alpha-composite an object onto a background.

    Args:
        background: float32 ``(H, W, 3)`` in [0, 1].
        rgba: float32 ``(h, w, 4)``: colour in [0, 1] and alpha (coverage) in [0, 1].
        top, left: position of the object's top-left corner in the background; parts
            outside the background are clipped.

    Returns:
        ``(image, mask)``: float32 ``(H, W, 3)`` composite and uint8 ``(H, W)`` mask that is
        255 where the object covers at least half of the pixel and 0 elsewhere.
    """
    image = background.copy()
    alpha = np.zeros(background.shape[:2], np.float32)
    h, w = rgba.shape[:2]
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + h, background.shape[0]), min(left + w, background.shape[1])
    if y0 < y1 and x0 < x1:
        piece = rgba[y0 - top : y1 - top, x0 - left : x1 - left]
        a = piece[:, :, 3:]
        image[y0:y1, x0:x1] = a * piece[:, :, :3] + (1 - a) * image[y0:y1, x0:x1]
        alpha[y0:y1, x0:x1] = a[:, :, 0]
    return image, np.where(alpha >= 0.5, 255, 0).astype(np.uint8)


def _rotate(rgba: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate float32 ``(h, w, 4)`` about its centre, growing the canvas to keep the corners.

    Colour is rotated unpremultiplied; that only darkens the one-pixel soft rim.
    """
    channels = [
        Image.fromarray(np.ascontiguousarray(rgba[:, :, c])).rotate(
            degrees, Image.Resampling.BILINEAR, expand=True
        )
        for c in range(4)
    ]
    return np.clip(np.stack([np.asarray(c, dtype=np.float32) for c in channels], axis=2), 0.0, 1.0)


def _render(
    source: ObjectSource, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One labelled sample: uint8 ``(size, size, 3)`` image and uint8 ``(size, size)`` mask."""
    rgb, alpha = _object_base(source, 2 * size)
    if alpha is None:
        alpha = _ellipse_alpha(*rgb.shape[:2], rng)
    gain = rng.uniform(0.7, 1.3) * rng.uniform(0.9, 1.1, size=3).astype(np.float32)
    rgba = np.concatenate([np.clip(rgb * gain, 0, 1), alpha[:, :, None]], axis=2)
    if rng.random() < 0.5:
        rgba = rgba[:, ::-1]
    # Longer side between 40 % and 75 % of the image, aspect ratio jittered by ±15 %.
    extent = rng.uniform(0.40, 0.75) * size / max(rgba.shape[:2])
    aspect = rng.uniform(0.85, 1.15)
    h = max(2, round(rgba.shape[0] * extent * aspect))
    w = max(2, round(rgba.shape[1] * extent / aspect))
    rgba = _rotate(_resize(np.ascontiguousarray(rgba), h, w), rng.uniform(-40, 40))
    if max(rgba.shape[:2]) > size:
        fit = size / max(rgba.shape[:2])
        rgba = _resize(rgba, max(2, int(rgba.shape[0] * fit)), max(2, int(rgba.shape[1] * fit)))
    top = int(rng.integers(size - rgba.shape[0] + 1))
    left = int(rng.integers(size - rgba.shape[1] + 1))
    image, mask = paste(_background(size, rng), rgba, top, left)
    image = image + rng.normal(0.0, rng.uniform(0.01, 0.05), image.shape)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), mask


@dataclass(frozen=True)
class DatasetSpec:
    """The :func:`build_dataset` parameters besides ``root`` and ``seed``."""

    n_classes: int = 10
    per_class: int = 12
    image_size: int = 64
    train_per_class: int = 100


def build_dataset(
    root: Path,
    seed: int = 0,
    n_classes: int = DatasetSpec.n_classes,
    per_class: int = DatasetSpec.per_class,
    image_size: int = DatasetSpec.image_size,
    train_per_class: int = DatasetSpec.train_per_class,
) -> Path:
    """Write the demo image set under ``root`` (see the module docstring for the layout).

    Args:
        root: output folder (created; existing files with the same names are overwritten).
        seed: every image is drawn from ``numpy.random.default_rng((seed, split, class, k))``,
            so the bytes depend only on the arguments, not on the machine or call order.
        n_classes: the first ``n_classes`` of :data:`OBJECT_SOURCES` (at most their number).
        per_class: images (and masks) per class in ``images/``, the set a run explains.
        image_size: side ``S`` of every image in pixels.
        train_per_class: images per class in ``train/``, used only to train the committee.

    Returns:
        ``root``.
    """
    if not 2 <= n_classes <= len(OBJECT_SOURCES):
        raise ValueError(f"n_classes must be in [2, {len(OBJECT_SOURCES)}], got {n_classes}")
    root = Path(root)
    sources = sorted(OBJECT_SOURCES[:n_classes], key=lambda s: s.name)
    counts = {"images": per_class, "train": train_per_class}
    for split, count in counts.items():
        for source in sources:
            source_index = OBJECT_SOURCES.index(source)
            for k in range(count):
                rng = np.random.default_rng((seed, _SPLIT_CODES[split], source_index, k))
                image, mask = _render(source, image_size, rng)
                image_id = f"{source.name}_{k:04d}"
                _save_png(root / split / source.name / f"{image_id}.png", image)
                if split == "images":
                    _save_png(root / "masks" / source.name / f"{image_id}.png", mask)
    description = {
        "recipe_version": RECIPE_VERSION,
        "seed": seed,
        "image_size": image_size,
        "classes": [s.name for s in sources],
        "sources": {s.name: f"skimage.data.{s.photo}" for s in sources},
        "counts": {split: count * len(sources) for split, count in counts.items()},
        "fingerprint": _fingerprint(root, ("images", "masks", "train")),
    }
    (root / "dataset.json").write_text(json.dumps(description, indent=2) + "\n")
    return root


def _save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def _fingerprint(root: Path, folders: Sequence[str]) -> str:
    """sha256 over the relative paths and bytes of every file under ``folders``."""
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted((root / folder).rglob("*")):
            if path.is_file():
                digest.update(path.relative_to(root).as_posix().encode() + b"\0")
                digest.update(path.read_bytes())
    return digest.hexdigest()


def _labelled_files(root: Path, split: str) -> tuple[list[Path], list[int]]:
    """Sorted image paths of ``split`` and their labels (index in dataset.json's classes)."""
    classes = json.loads((root / "dataset.json").read_text())["classes"]
    paths, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / split / name).glob("*.png")):
            paths.append(path)
            labels.append(label)
    return paths, labels


# --------------------------------------------------------------------------- committee


@dataclass(frozen=True)
class MemberRecipe:
    """How one committee member is built and trained.

    ``kwargs`` are extra ``timm.create_model`` arguments (e.g. a ViT's ``img_size``);
    ``input_size`` is the square side the model is trained and evaluated at; ``steps`` are
    optimiser steps of ``batch_size`` images with AdamW at peak rate ``lr`` (one-cycle).
    """

    id: str
    arch: str
    input_size: int
    steps: int
    lr: float = 2e-3
    batch_size: int = 64
    kwargs: dict = field(default_factory=dict)


# Thirteen members of thirteen architecture families (residual, ConvNeXt, RegNet, MobileNetV3,
# LeViT, ViT, LCNet, GhostNet, MnasNet, MobileViT, DLA, PiT, MobileNetV2), chosen among timm's
# small architectures for their training time at 64 px on a CPU (100-250 ms a step of 64 images);
# input sizes and training lengths differ so that accuracies spread (short runs stay weak).
DEMO_COMMITTEE: tuple[MemberRecipe, ...] = (
    MemberRecipe("resnet10t", "resnet10t", 64, steps=150),
    MemberRecipe("convnext_atto", "convnext_atto", 64, steps=120),
    MemberRecipe("regnetx_002", "regnetx_002", 64, steps=150),
    MemberRecipe("mobilenetv3_small_050", "mobilenetv3_small_050", 96, steps=150),
    MemberRecipe("levit_128s", "levit_128s", 64, steps=150, kwargs={"img_size": 64}),
    MemberRecipe(
        "vit_tiny_p8",
        "vit_tiny_patch16_224",
        56,
        steps=120,
        lr=1e-3,
        kwargs={"img_size": 56, "patch_size": 8, "depth": 6},
    ),
    MemberRecipe("lcnet_050_short", "lcnet_050", 64, steps=60),
    MemberRecipe("ghostnet_050", "ghostnet_050", 64, steps=100),
    MemberRecipe("mnasnet_small", "mnasnet_small", 64, steps=100),
    MemberRecipe("mobilevit_xxs", "mobilevit_xxs", 64, steps=100),
    MemberRecipe("dla46_c", "dla46_c", 64, steps=80),
    MemberRecipe("pit_ti", "pit_ti_224", 64, steps=100, lr=1e-3, kwargs={"img_size": 64}),
    MemberRecipe("mobilenetv2_050_short", "mobilenetv2_050", 64, steps=40),
)


def model_kwargs(recipe: MemberRecipe) -> dict:
    """``timm.create_model`` keyword arguments (besides ``num_classes``) for a member.

    The overlay makes ``timm.data.resolve_data_config(model=model)`` report the size the
    member was trained at, with ``crop_pct = 1`` so the eval transform keeps the whole image.
    """
    overlay = {"input_size": [3, recipe.input_size, recipe.input_size], "crop_pct": 1.0}
    return {**recipe.kwargs, "pretrained_cfg_overlay": overlay}


def train_committee(
    dataset_root: Path,
    cache_dir: Path,
    seed: int = 0,
    progress: bool = True,
    recipes: Sequence[MemberRecipe] = DEMO_COMMITTEE,
) -> list[dict]:
    """Train (or load from cache) one timm model per recipe on ``dataset_root/train``.

    Each member is written to ``cache_dir/models/<id>-<key>.safetensors`` with a JSON
    sidecar (arch, kwargs, classes, input size, steps, accuracy on ``images/``). The key
    hashes the recipe, the data set fingerprint, ``seed`` and :data:`RECIPE_VERSION`, so a
    member whose files exist is not trained again.

    Training runs on CPU, one member per core at a time in worker processes of one torch thread
    each (small models use a second thread poorly: one process of two threads kept 1.2 of 2 cores
    busy); one member, one core, or fewer than 200 steps in all train in this process with torch's
    thread setting. About 4 minutes on 2 idle cores for :data:`DEMO_COMMITTEE`.

    Returns:
        One dict per member: ``{"id", "arch", "weights" (absolute path), "kwargs"
        (create_model kwargs), "num_classes"}``.
    """
    dataset_root = Path(dataset_root).resolve()
    description = json.loads((dataset_root / "dataset.json").read_text())
    num_classes = len(description["classes"])
    models_dir = Path(cache_dir).resolve() / "models"
    committee, missing = [], []
    for recipe in recipes:
        key = _cache_key(
            {"recipe": dataclasses.asdict(recipe), "data": description["fingerprint"], "seed": seed}
        )
        weights = models_dir / f"{recipe.id}-{key}.safetensors"
        if not weights.with_suffix(".json").exists():
            missing.append((recipe, weights))
        committee.append(
            {
                "id": recipe.id,
                "arch": recipe.arch,
                "weights": str(weights),
                "kwargs": model_kwargs(recipe),
                "num_classes": num_classes,
            }
        )
    # A worker process costs seconds to start (torch, timm): worth it for a committee's worth of steps.
    workers = min(len(missing), os.cpu_count() or 1) if sum(r.steps for r, _ in missing) >= 200 else 1
    jobs = [(recipe, dataset_root, num_classes, seed, weights, description) for recipe, weights in missing]
    if workers > 1:
        import concurrent.futures
        import multiprocessing

        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                    initializer=torch.set_num_threads, initargs=(1,)) as pool:
            for line in pool.map(_train_and_save, jobs):
                if progress:
                    print(line, flush=True)
    else:
        for job in jobs:
            line = _train_and_save(job)
            if progress:
                print(line, flush=True)
    return committee


def _train_and_save(job: tuple) -> str:
    """Train one member and write its files; returns its progress line."""
    recipe, dataset_root, num_classes, seed, weights, description = job
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        model = _train(recipe, dataset_root, num_classes, seed)
    accuracy = _accuracy(model, dataset_root, "images")
    _save_member(model, weights, recipe, num_classes, description, accuracy)
    return (f"[demo] {recipe.id:<22} {recipe.arch:<22} in={recipe.input_size:<3d} steps={recipe.steps:<4d} "
            f"acc={accuracy:.3f}  {time.perf_counter() - started:5.1f}s")


def _cache_key(parts: dict) -> str:
    payload = json.dumps({"version": RECIPE_VERSION, **parts}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _create_member(recipe: MemberRecipe, num_classes: int) -> torch.nn.Module:
    """A freshly initialised ``torch.nn.Module`` for ``recipe`` (no pretrained weights)."""
    return timm.create_model(
        recipe.arch, pretrained=False, num_classes=num_classes, **model_kwargs(recipe)
    )


def _load_split(
    model: torch.nn.Module, root: Path, split: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of ``split`` through the model's timm eval transform.

    Returns ``(x, y)``: float32 ``(N, 3, S, S)`` normalised as timm resolves for ``model``,
    and int64 ``(N,)`` labels.
    """
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    paths, labels = _labelled_files(root, split)
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    return x, torch.tensor(labels, dtype=torch.int64)


def _augment(x: torch.Tensor) -> torch.Tensor:
    """Random horizontal flips and shifts of up to 1/8 of the side (reflect-padded).

    ``x``: float32 ``(B, 3, S, S)``; returns the same shape.
    """
    size = x.shape[-1]
    pad = max(1, size // 8)
    flip = torch.rand(x.shape[0]) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    offsets = torch.randint(0, 2 * pad + 1, (x.shape[0], 2)).tolist()
    crops = [padded[i, :, dy : dy + size, dx : dx + size] for i, (dy, dx) in enumerate(offsets)]
    return torch.stack(crops)


def _train(recipe: MemberRecipe, root: Path, num_classes: int, seed: int) -> torch.nn.Module:
    """Train a fresh member on ``root/train``; returns the model in eval mode.

    Seeds torch's global RNG (weight init, batch order, augmentation, any dropout), so callers
    run it inside ``torch.random.fork_rng``.
    """
    torch.manual_seed(int(_cache_key({"id": recipe.id, "seed": seed}), 16) % 2**31)
    model = _create_member(recipe, num_classes)
    x, y = _load_split(model, root, "train")
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, recipe.lr, total_steps=recipe.steps, pct_start=0.15
    )
    model.train()
    order = torch.randperm(len(y))
    cursor = 0
    for _ in range(recipe.steps):
        if cursor + recipe.batch_size > len(order):
            order, cursor = torch.randperm(len(y)), 0
        batch = order[cursor : cursor + recipe.batch_size]
        cursor += recipe.batch_size
        logits = model(_augment(x[batch]))
        loss = F.cross_entropy(logits, y[batch], label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def _accuracy(model: torch.nn.Module, root: Path, split: str) -> float:
    """Top-1 accuracy of ``model`` on ``root/<split>``, a float in [0, 1]."""
    with torch.inference_mode():
        x, y = _load_split(model, root, split)
        predictions = torch.cat([model(chunk).argmax(1) for chunk in x.split(256)])
    return float((predictions == y).float().mean())


def _save_member(
    model: torch.nn.Module,
    weights: Path,
    recipe: MemberRecipe,
    num_classes: int,
    description: dict,
    accuracy: float,
) -> None:
    """Write the safetensors file, then the sidecar (its presence marks the member complete)."""
    weights.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write(weights, lambda path: save_file(tensors, str(path)))
    sidecar = {
        "id": recipe.id,
        "arch": recipe.arch,
        "kwargs": model_kwargs(recipe),
        "num_classes": num_classes,
        "classes": description["classes"],
        "input_size": [3, recipe.input_size, recipe.input_size],
        "steps": recipe.steps,
        "batch_size": recipe.batch_size,
        "lr": recipe.lr,
        "dataset_fingerprint": description["fingerprint"],
        "test_accuracy": accuracy,
        "recipe_version": RECIPE_VERSION,
    }
    text = json.dumps(sidecar, indent=2) + "\n"
    atomic_write(weights.with_suffix(".json"), lambda path: Path(path).write_text(text))


# --------------------------------------------------------------------------- entry point


def ensure_demo(
    cache_dir: Path | None = None,
    seed: int = 0,
    progress: bool = True,
    spec: DatasetSpec = DatasetSpec(),
    recipes: Sequence[MemberRecipe] = DEMO_COMMITTEE,
) -> tuple[Path, list[dict]]:
    """Build (or reuse) the demo data set and committee under ``cache_dir``.

    The data set lives in ``cache_dir/data-<key>``, ``key`` hashing ``spec``, ``seed`` and
    :data:`RECIPE_VERSION`; it is built in a temporary sibling and renamed into place, so
    an interrupted build is never reused.

    Returns:
        ``(dataset_root, committee)``: the folder holding ``images/``, ``masks/``, ``train/``
        and ``dataset.json``, and :func:`train_committee`'s member dicts.
    """
    cache_dir = Path(cache_dir or default_cache_dir()).resolve()
    root = cache_dir / f"data-{_cache_key({'spec': dataclasses.asdict(spec), 'seed': seed})}"
    if not (root / "dataset.json").exists():
        started = time.perf_counter()
        partial = root.with_name(root.name + f".partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        build_dataset(partial, seed=seed, **dataclasses.asdict(spec))
        try:
            os.replace(partial, root)
        except OSError:  # another process renamed its identical copy into place first
            shutil.rmtree(partial)
        if progress:
            description = json.loads((root / "dataset.json").read_text())
            print(
                f"[demo] data set: {len(description['classes'])} classes, {description['counts']} "
                f"images at {spec.image_size}px in {time.perf_counter() - started:.1f}s -> {root}",
                flush=True,
            )
    return root, train_committee(root, cache_dir, seed=seed, progress=progress, recipes=recipes)
