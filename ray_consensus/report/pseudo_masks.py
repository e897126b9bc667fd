"""Pseudo segmentation masks from the consensus, in each original image's own pixel grid.

The authors' follow-up (PSSL, arXiv 2207.03335) turns the consensus explanations of a data set
into pseudo masks for semantic segmentation. `export_masks` writes one mask per voted image:

    consensus map (M x M, over the shared S x S crop) ─► binary mask by a rule ─► undo the crop and
    resize: every original pixel takes its grid cell's value; pixels outside the crop are IGNORE

as a PNG (0 background, 1 foreground, 255 ignore: the convention of segmentation label maps)
plus a manifest table (masks.parquet/.csv) and summary.json. Where the data set has ground-truth
masks, each exported mask's IoU against its ground truth is computed over the pixels it does
not ignore, and the mean is reported. The run root is read one shard at a time.

Rules (`rule`, its parameter):
* ``top`` (`fraction`): the `fraction` of the map's cells with the largest consensus;
* ``threshold`` (`threshold`): cells whose consensus is at least `threshold` x the map's maximum;
* ``otsu``: Otsu's threshold of the map's values (scikit-image).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image

from ray_consensus.dataset.decode import crop_geometry, image_size_of, mask_foreground
from ray_consensus.errors import SpecError
from ray_consensus.results import consensus as cm
from ray_consensus.runroot.contract import read_consensus, read_stored_manifest
from ray_consensus.runroot.record import RunRecord
from ray_consensus.storage.datafiles import read_uri_bytes
from ray_consensus.storage.store import Store, open_store

IGNORE = 255
RULES = ("top", "threshold", "otsu")


@dataclass(frozen=True)
class MaskRule:
    rule: str = "top"
    fraction: float = 0.2
    threshold: float = 0.5

    def __post_init__(self):
        if self.rule not in RULES:
            raise SpecError(f"--rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        if not 0 < self.fraction <= 1:
            raise SpecError(f"--fraction must be in (0, 1], got {self.fraction}")
        if not 0 <= self.threshold <= 1:
            raise SpecError(f"--threshold must be in [0, 1], got {self.threshold}")


def binary_mask(consensus: np.ndarray, rule: MaskRule) -> np.ndarray:
    """(M, M) consensus -> (M, M) bool foreground by the rule; an all-zero map has no foreground.

    top: exactly ceil(fraction x M^2) cells, ties at the cut to the lower cell index; threshold:
    consensus >= threshold x max; otsu: consensus > Otsu's threshold (a constant map: none).
    """
    c = np.asarray(consensus, np.float64)
    flat = c.ravel()
    if not np.any(flat > 0):
        return np.zeros(c.shape, bool)
    if rule.rule == "top":
        # topk_iou's cut (consensus.py): one rounding rule and one tie rule for both
        return cm.top_k_mask(flat, cm.top_k_count(flat.size, rule.fraction)).reshape(c.shape)
    if rule.rule == "threshold":
        return c >= rule.threshold * flat.max()
    from skimage.filters import threshold_otsu

    if np.ptp(flat) == 0:
        return np.zeros(c.shape, bool)
    return c > threshold_otsu(flat)


def crop_cells(width: int, height: int, image_size: int, map_size: int) -> tuple[np.ndarray, np.ndarray]:
    """For each original column x and row y, the map-grid cell it falls in, or -1 outside the crop.

    Inverts `decode.square_crop` (its `crop_geometry`: shorter side resized to `image_size`, centre
    crop) followed by the resampling of the crop to the `map_size` grid: an original pixel's centre
    maps to the nearest pixel of the resized image; if that pixel is in the crop, the grid cell
    covering it is the answer. Returns int64 (width,) and (height,) arrays.
    """
    nw, nh, left, top = crop_geometry(width, height, image_size)
    out = []
    for n, r, offset in ((width, nw, left), (height, nh, top)):
        pixel = np.floor((np.arange(n) + 0.5) * r / n).astype(np.int64) - offset  # pixel of the crop
        cell = np.floor((pixel + 0.5) * map_size / image_size).astype(np.int64)
        out.append(np.where((pixel >= 0) & (pixel < image_size), cell, -1))
    return out[0], out[1]


def to_original(mask: np.ndarray, width: int, height: int, image_size: int) -> np.ndarray:
    """(M, M) bool mask on the map grid -> uint8 (height, width): 1 foreground, 0 background, IGNORE
    outside the crop."""
    cols, rows = crop_cells(width, height, image_size, mask.shape[0])
    out = mask.astype(np.uint8)[np.clip(rows, 0, None)[:, None], np.clip(cols, 0, None)[None, :]]
    out[(rows < 0)[:, None] | (cols < 0)[None, :]] = IGNORE
    return out


def iou(exported: np.ndarray, truth: np.ndarray) -> float:
    """IoU of an exported mask (0/1/IGNORE) with a bool ground truth over the pixels it does not ignore;
    NaN when neither has foreground there."""
    keep = exported != IGNORE
    p, g = (exported == 1) & keep, truth & keep
    union = np.sum(p | g)
    return float(np.sum(p & g) / union) if union else math.nan


def _png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def export_masks(run_root: str, out: str, rule: MaskRule = MaskRule(), progress=None) -> dict:
    """Write OUT/masks/<image_id>.png for every voted image of the run, OUT/masks.parquet and .csv (one row
    per mask: image_id, uri, mask_file, width, height, foreground, iou) and OUT/summary.json; returns
    the summary (rule, counts, mean IoU where the data set has masks)."""
    store = open_store(run_root)
    run = RunRecord.load(store)
    spec = run.spec
    target: Store = open_store(out, spec.storage)
    target.check_writable()
    manifest = read_stored_manifest(store, columns=["image_id", "uri", "mask_uri", "shard"])
    rows = []
    for s, images in manifest.groupby("shard", sort=True):
        cons = read_consensus(store, int(s), columns=["image_id", "voted", "consensus", "height"])
        cons = cons[cons["voted"]].merge(images, on="image_id")
        for r in cons.itertuples():
            side = int(r.height)
            data = read_uri_bytes(r.uri, spec.storage)
            width, height = image_size_of(data)
            mask = to_original(binary_mask(np.asarray(r.consensus).reshape(side, side), rule), width, height,
                               spec.run.image_size)
            rel = f"masks/{r.image_id}.png"
            target.write_bytes(rel, _png(mask))
            score = math.nan
            if isinstance(r.mask_uri, str) and r.mask_uri:
                truth = mask_foreground(read_uri_bytes(r.mask_uri, spec.storage), spec.dataset.mask_foreground)
                score = iou(mask, truth)
            rows.append({"image_id": r.image_id, "uri": r.uri, "mask_file": rel, "width": width, "height": height,
                         "foreground": float(np.mean(mask[mask != IGNORE] == 1)) if np.any(mask != IGNORE) else 0.0,
                         "iou": score})
        if progress:
            progress(f"export-masks: shard {int(s)} done ({len(rows)} masks so far)")
    table = pa.Table.from_pandas(pd.DataFrame(rows, columns=["image_id", "uri", "mask_file", "width", "height",
                                                             "foreground", "iou"]), preserve_index=False)
    target.write_parquet("masks.parquet", table)
    target.write_csv("masks.csv", table)
    ious = [r["iou"] for r in rows if not math.isnan(r["iou"])]
    summary = {"run_root": store.root, "rule": rule.rule,
               **({"fraction": rule.fraction} if rule.rule == "top" else {}),
               **({"threshold": rule.threshold} if rule.rule == "threshold" else {}),
               "masks": len(rows), "with_ground_truth": len(ious),
               "mean_iou": float(np.mean(ious)) if ious else None, "ignore_value": IGNORE}
    target.write_text("summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
