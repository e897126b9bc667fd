"""The demo's data set: a small masked image set cut from scikit-image's bundled photos.

Nothing is downloaded. Every class is an object cut out of one of scikit-image's bundled
sample photos (``skimage.data``) and pasted at a random place, size, angle and brightness
onto a random crop of a background texture, so the evidence for the class lies inside the
per-pixel foreground mask and the background carries none.

Layout written by :func:`build_dataset` (all images RGB PNG, ``S × S`` pixels)::

    <root>/dataset.json                          classes (label = list index), counts, fingerprint
    <root>/images/<class>/<image_id>.png         the image set a run explains
    <root>/masks/<class>/<image_id>.png          uint8 {0, 255} single-channel foreground mask
    <root>/train/<class>/<image_id>.png          disjoint training split (no masks)

:func:`cache_key` names the demo's cached folders and files (`spec.ensure_demo`, `committee`).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import skimage.data
from PIL import Image
from scipy.ndimage import gaussian_filter

# Bump when anything that changes the bytes of the data set or the trained weights changes
# without showing up in the parameters below (cut-out boxes, jitter ranges, optimiser, ...).
RECIPE_VERSION = 1

_SPLIT_CODES = {"images": 0, "train": 1}


def cache_key(parts: dict) -> str:
    """The key of a cached demo folder or member: `parts` and :data:`RECIPE_VERSION`, hashed."""
    payload = json.dumps({"version": RECIPE_VERSION, **parts}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


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


def labelled_files(root: Path, split: str) -> tuple[list[Path], list[int]]:
    """Sorted image paths of ``split`` and their labels (index in dataset.json's classes)."""
    classes = json.loads((root / "dataset.json").read_text())["classes"]
    paths, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / split / name).glob("*.png")):
            paths.append(path)
            labels.append(label)
    return paths, labels
