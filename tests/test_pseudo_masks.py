"""Pseudo masks from the consensus: the rules by hand, the crop undone, and export-masks end to end
(the stated mean IoU recomputed from the files it wrote)."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ray_consensus.errors import SpecError
from ray_consensus.report.pseudo_masks import IGNORE, MaskRule, binary_mask, crop_cells, iou, to_original

MAP = np.array([[0.0, 0.2, 0.9],
                [0.1, 0.8, 0.3],
                [0.0, 0.4, 0.6]])


def test_top_fraction_keeps_the_largest_cells_ties_to_the_lower_index():
    assert binary_mask(MAP, MaskRule("top", fraction=0.3)).tolist() == [[False, False, True],
                                                                          [False, True, False],
                                                                          [False, False, True]]  # ceil(2.7) = 3
    tied = np.array([[1.0, 1.0], [1.0, 0.0]])
    assert binary_mask(tied, MaskRule("top", fraction=0.5)).tolist() == [[True, True], [False, False]]


def test_threshold_is_a_share_of_the_maximum_and_otsu_splits_two_levels():
    assert binary_mask(MAP, MaskRule("threshold", threshold=0.5)).sum() == 3  # >= 0.45: 0.9, 0.8, 0.6
    two = np.array([[0.1, 0.1], [0.9, 0.9]])
    assert binary_mask(two, MaskRule("otsu")).tolist() == [[False, False], [True, True]]
    for rule in ("top", "threshold", "otsu"):
        assert not binary_mask(np.zeros((2, 2)), MaskRule(rule)).any()  # no evidence, no foreground
    with pytest.raises(SpecError, match="--rule must be one of top, threshold, otsu"):
        MaskRule("mean")


def test_crop_cells_invert_the_shorter_side_resize_and_centre_crop():
    # 8 x 4 image, 4 px crop: no resize, columns 2..5 are the crop; a 2 x 2 grid halves it.
    cols, rows = crop_cells(width=8, height=4, image_size=4, map_size=2)
    assert cols.tolist() == [-1, -1, 0, 0, 1, 1, -1, -1] and rows.tolist() == [0, 0, 1, 1]
    # 6 x 12 image onto a 3 px crop: resized to 3 x 6, whose rows 1..3 are kept ((6 - 3) // 2 = 1 above):
    # original rows 2..7.
    cols, rows = crop_cells(width=6, height=12, image_size=3, map_size=3)
    assert cols.tolist() == [0, 0, 1, 1, 2, 2]
    assert rows.tolist() == [-1, -1, 0, 0, 1, 1, 2, 2, -1, -1, -1, -1]


def test_to_original_paints_cells_and_ignores_outside_the_crop():
    mask = np.array([[True, False], [False, True]])
    out = to_original(mask, width=8, height=4, image_size=4)
    assert out.shape == (4, 8)
    assert out[:, [0, 1, 6, 7]].tolist() == [[IGNORE] * 4] * 4
    assert out[:, 2:6].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]


def test_iou_counts_only_pixels_not_ignored():
    exported = np.array([[1, 1, IGNORE], [0, 1, IGNORE]], np.uint8)
    truth = np.array([[1, 0, 1], [0, 1, 1]], bool)
    assert iou(exported, truth) == pytest.approx(2 / 3)
    assert math.isnan(iou(np.zeros((2, 2), np.uint8), np.zeros((2, 2), bool)))


def test_export_masks_writes_one_mask_per_voted_image_at_its_size_and_a_reproducible_mean_iou(legacy_root,
                                                                                            tmp_path):
    from ray_consensus.storage.datafiles import read_uri_bytes

    root, spec = legacy_root
    out = tmp_path / "masks"
    proc = subprocess.run([sys.executable, "-m", "ray_consensus", "export-masks", str(root), str(out), "--quiet",
                           "--rule", "top", "--fraction", "0.25"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    table = pd.read_parquet(out / "masks.parquet")
    consensus = pd.read_parquet(root / "consensus")
    assert summary["masks"] == len(table) == int(consensus["voted"].sum()) == 8
    manifest = pd.read_parquet(root / "manifest.parquet").set_index("image_id")
    ious = []
    for row in table.itertuples():
        png = np.asarray(Image.open(out / row.mask_file))
        image = Image.open(io.BytesIO(read_uri_bytes(row.uri)))
        assert png.shape == (image.size[1], image.size[0]) and set(np.unique(png)) <= {0, 1, IGNORE}
        truth = np.asarray(Image.open(io.BytesIO(read_uri_bytes(manifest.loc[row.image_id, "mask_uri"])))) != 0
        keep = png != IGNORE
        ious.append(np.sum((png == 1) & truth & keep) / np.sum(((png == 1) | truth) & keep))
    assert summary["mean_iou"] == pytest.approx(float(np.mean(ious)), abs=1e-12)
    assert f"mean IoU against the ground-truth masks {summary['mean_iou']:.3f} (8 images)" in proc.stdout


def test_export_masks_writes_to_s3(legacy_root, s3_server, s3_bucket):
    from ray_consensus.report.pseudo_masks import export_masks

    root, _ = legacy_root
    summary = export_masks(str(root), f"{s3_bucket}/pseudo", MaskRule("otsu"))
    keys = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=s3_bucket.removeprefix("s3://"))["Contents"]}
    assert {"pseudo/summary.json", "pseudo/masks.parquet"} <= keys
    assert sum(k.endswith(".png") for k in keys) == summary["masks"] == 8
