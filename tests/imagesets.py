"""Small real image sets for the tests: PNG files on disk, optionally with masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_image_folder(root: Path, n_classes: int = 3, per_class: int = 6, size: tuple[int, int] = (40, 48),
                      masks: bool = True, seed: int = 0, start: int = 0) -> Path:
    """root/images/c<k>/img<i>.png (+ root/masks/...): a bright square on noise, class = its colour.

    `start` numbers the images from there, so a later call appends new images to the same set.
    """
    rng = np.random.default_rng(seed + start)
    h, w = size
    colours = np.array([[220, 40, 40], [40, 220, 40], [40, 40, 220], [220, 220, 40], [40, 220, 220]])
    for c in range(n_classes):
        (root / "images" / f"c{c}").mkdir(parents=True, exist_ok=True)
        if masks:
            (root / "masks" / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(start, start + per_class):
            img = (rng.random((h, w, 3)) * 90).astype(np.uint8)
            top, left = rng.integers(2, h // 2), rng.integers(2, w // 2)
            img[top:top + h // 3, left:left + w // 3] = colours[c % len(colours)]
            Image.fromarray(img).save(root / "images" / f"c{c}" / f"img{i:03d}.png")
            if masks:
                mask = np.zeros((h, w), np.uint8)
                mask[top:top + h // 3, left:left + w // 3] = 255
                Image.fromarray(mask).save(root / "masks" / f"c{c}" / f"img{i:03d}.png")
    return root


def tiny_spec(dataset: Path, output: str, models=("a=resnet10t@random", "b=mobilenetv3_small_050@random"),
              **sections) -> dict:
    """Spec data for a fast run: 32 px crops, 16 px maps, few SmoothGrad samples, members fed 64 px
    inputs (timm's default for these architectures is 176-224 px: 8-12x the compute per image)."""
    from ray_consensus.spec.config import parse_member

    data = {
        "dataset": {"path": str(dataset / "images"),
                    **({"masks": str(dataset / "masks")} if (dataset / "masks").exists() else {})},
        "committee": [{**parse_member(m), "kwargs": {"pretrained_cfg_overlay": {"input_size": [3, 64, 64]}}}
                      for m in models],
        "explainer": {"name": "smoothgrad", "params": {"n_samples": 3, "samples_per_pass": 3}},
        "method": {"bootstrap": 50, "robustness_sizes": [2], "robustness_trials": 2},
        "run": {"output": output, "shard_size": 8, "image_size": 32, "map_size": 16, "gallery": 3},
        "resources": {"batch_size": 8},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return data
