"""Images and masks decode as their makers mean them (float TIFFs, colour and alpha masks); a manifest
row whose URI is blank or a folder is a row of errors/, not the end of the run; decoding an extreme
aspect ratio costs what its crop costs."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import skimage.data
from imagesets import make_image_folder, tiny_spec
from PIL import Image

from ray_consensus.attribution.decode_stage import DecodeShard
from ray_consensus.attribution.records import ShardTask, StageContext
from ray_consensus.dataset.decode import decode_image, decode_mask, image_size_of, square_crop
from ray_consensus.errors import DecodeError
from ray_consensus.runroot.contract import ImageRef
from ray_consensus.runroot.units import Unit
from ray_consensus.spec.config import parse_spec
from ray_consensus.storage.store import open_store


def encoded(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


# ---------------------------------------------------------------- float TIFFs

def test_float_tiff_in_unit_range_decodes_as_its_8_bit_twin():
    ramp = np.tile(np.linspace(0.0, 1.0, 48, dtype=np.float32), (40, 1))  # black to white
    out = decode_image(encoded(Image.fromarray(ramp, mode="F"), "TIFF"), 32)
    twin = decode_image(encoded(Image.fromarray(np.round(ramp * 255).astype(np.uint8))), 32)
    assert np.abs(out.astype(int) - twin).max() <= 1, "a float32 TIFF in [0, 1] must not decode black"
    assert out.max() > 200 and out.min() < 40  # the centre crop of the ramp, not black
    # a float image in [0, 255] is taken as it is
    same = decode_image(encoded(Image.fromarray(ramp * 255, mode="F"), "TIFF"), 32)
    assert np.abs(same.astype(int) - twin).max() <= 1


@pytest.mark.parametrize("values,reason", [
    (np.full((20, 20), np.nan, np.float32), "NaN or infinite"),
    (np.linspace(-1, 1, 400, dtype=np.float32).reshape(20, 20), "neither within [0, 1] nor [0, 255]"),
    (np.linspace(0, 4000, 400, dtype=np.float32).reshape(20, 20), "0..4000"),
])
def test_float_tiff_of_unknown_range_is_an_error(values, reason):
    with pytest.raises(DecodeError) as err:
        decode_image(encoded(Image.fromarray(values, mode="F"), "TIFF"), 16)
    assert reason in str(err.value)


# ---------------------------------------------------------------- colour and alpha masks

def _shape() -> np.ndarray:
    fg = np.zeros((20, 20), bool)
    fg[4:12, 6:16] = True  # 80 pixels
    return fg


def _mask(kind: str) -> bytes:
    fg = _shape()
    if kind == "rgb (1,0,0)":
        arr = np.zeros((20, 20, 3), np.uint8)
        arr[fg] = (1, 0, 0)
        return encoded(Image.fromarray(arr))
    if kind == "rgb (0,0,3)":
        arr = np.zeros((20, 20, 3), np.uint8)
        arr[fg] = (0, 0, 3)
        return encoded(Image.fromarray(arr))
    if kind == "rgba alpha only":
        arr = np.zeros((20, 20, 4), np.uint8)
        arr[fg, 3] = 255
        return encoded(Image.fromarray(arr))
    if kind == "la alpha only":
        arr = np.zeros((20, 20, 2), np.uint8)
        arr[fg, 1] = 255
        return encoded(Image.fromarray(arr, mode="LA"))
    if kind == "rgba black shape on transparent white":
        arr = np.full((20, 20, 4), (255, 255, 255, 0), np.uint8)
        arr[fg] = (0, 0, 0, 255)
        return encoded(Image.fromarray(arr))
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["rgb (1,0,0)", "rgb (0,0,3)", "rgba alpha only", "la alpha only",
                                  "rgba black shape on transparent white"])
def test_colour_and_alpha_masks_give_their_foreground(kind):
    mask = decode_mask(_mask(kind), (20, 20), 20, "nonzero")
    np.testing.assert_array_equal(mask.astype(bool), _shape(), err_msg=kind)


def test_colour_mask_with_a_white_border_under_nonzero_not_255():
    arr = np.zeros((20, 20, 3), np.uint8)
    arr[_shape()] = (0, 0, 3)
    arr[3, :] = 255  # a VOC-style border, in white
    mask = decode_mask(encoded(Image.fromarray(arr)), (20, 20), 20, "nonzero_not_255")
    np.testing.assert_array_equal(mask.astype(bool), _shape())


def test_mask_of_a_big_jpeg_is_compared_with_the_stored_size():
    """A JPEG over 4096 px a side decodes at a reduced scale; its mask (stored at full size) still fits."""
    big = encoded(Image.new("RGB", (4200, 4100), (90, 30, 30)), "JPEG")
    assert image_size_of(big) == (4200, 4100)
    mask = np.zeros((4100, 4200), np.uint8)
    mask[1000:3000, 1000:3000] = 255
    out = decode_mask(encoded(Image.fromarray(mask)), image_size_of(big), 16, "nonzero")
    assert 0 < out.sum() < 16 * 16


# ---------------------------------------------------------------- blank and folder URIs

def test_decode_stage_records_a_folder_or_blank_uri_and_goes_on(tmp_path):
    data = make_image_folder(tmp_path / "ds", n_classes=1, per_class=2, masks=False)
    good = sorted((data / "images" / "c0").glob("*.png"))
    spec = parse_spec(tiny_spec(data, str(tmp_path / "run")))
    ctx = StageContext(spec, 1, open_store(str(tmp_path / "run")), None, None)
    images = [ImageRef("good0", str(good[0]), 0, None), ImageRef("folder", str(data / "images"), 0, None),
              ImageRef("blank", None, 0, None), ImageRef("through-a-file", str(good[1] / "x.png"), 0, None),
              ImageRef("s3-folder", "s3://bucket/images/", 0, None), ImageRef("good1", str(good[1]), 0, None)]
    out = DecodeShard(ctx).decode(ShardTask(0, images, Unit("inputs/shard=00000", "fp"), {}))
    assert [i.image_id for i in out.images] == ["good0", "good1"] and out.pixels.shape[0] == 2
    errors = pd.read_parquet(tmp_path / "run" / "errors")
    assert {r.image_id: (r.stage, r.reason) for r in errors.itertuples()} == {
        "folder": ("decode", "image URI is a folder, not a file"),
        "s3-folder": ("decode", "image URI is a folder, not a file"),  # told without asking S3
        "blank": ("decode", "no image file for this image"),
        "through-a-file": ("decode", "image file not found")}


@pytest.mark.slow
def test_run_with_blank_and_folder_uris_records_them_and_finishes(tmp_path, ray_local):
    from ray_consensus.runner import execute

    data = make_image_folder(tmp_path / "ds", n_classes=2, per_class=2)
    rows = [{"image_id": f"c{c}/img{i:03d}", "uri": f"ds/images/c{c}/img{i:03d}.png", "label": c,
             "mask_uri": f"ds/masks/c{c}/img{i:03d}.png"} for c in range(2) for i in range(2)]
    rgb = np.zeros((40, 48, 3), np.uint8)  # one mask in colour, foreground (1, 0, 0)
    rgb[np.asarray(Image.open(data / "masks" / "c1" / "img001.png")) > 0] = (1, 0, 0)
    Image.fromarray(rgb).save(data / "masks" / "c1" / "img001.png")
    rows.append({"image_id": "blank", "uri": "", "label": 0, "mask_uri": ""})
    rows.append({"image_id": "folder", "uri": "ds/images/c0", "label": 1, "mask_uri": ""})
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    spec = tiny_spec(data, str(tmp_path / "run"))
    spec["dataset"] = {"path": str(tmp_path / "manifest.csv"), "num_classes": 2}
    info = execute(parse_spec(spec), progress=False)

    assert info.status == "complete"
    errors = pq.read_table(str(tmp_path / "run" / "errors")).to_pandas()
    by_id = {r.image_id: (r.stage, r.reason) for r in errors.itertuples()}
    assert set(by_id) == {"blank", "folder"}, by_id
    assert by_id["blank"][0] == "manifest" and "uri" in by_id["blank"][1]
    assert by_id["folder"] == ("decode", "image URI is a folder, not a file")
    consensus = pq.read_table(str(tmp_path / "run" / "consensus")).to_pandas().set_index("image_id")
    assert sorted(consensus.index) == sorted(r["image_id"] for r in rows[:4])
    assert sum(consensus.loc["c1/img001", "mask"]) > 0 and np.isfinite(consensus.loc["c1/img001", "ap"])
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["counts"]["errors"] == 2


# ---------------------------------------------------------------- aspect ratio and memory

PEAK = textwrap.dedent("""
    import resource, sys
    from ray_consensus.dataset.decode import decode_image, decode_mask, image_size_of
    data = open(sys.argv[1], "rb").read()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    image = decode_image(data, 224)
    mask = decode_mask(data, image_size_of(data), 56, "nonzero")
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(grown, int(image.min()), int(image.max()), int(mask.sum()))
""")


def test_extreme_aspect_ratio_decodes_within_a_small_memory_bound(tmp_path):
    """An 8x100000 PNG (a few kB) at image_size 224: its crop is 224 px, so decoding it must not need
    more memory than a few copies of the image (2.4 MB) — not the 224x2.8M resized whole (1.9 GB)."""
    arr = np.full((100_000, 8, 3), 10, np.uint8)
    arr[49_000:51_000] = 200  # the centre band: what the crop must show
    path = tmp_path / "tall.png"
    Image.fromarray(arr).save(path)
    assert path.stat().st_size < 20_000
    # ru_maxrss (the process's peak resident set, KiB) sees PIL's own allocations; tracemalloc does not
    out = subprocess.run([sys.executable, "-c", PEAK, str(path)], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    grown_kib, low, high, fg = map(int, out.stdout.split())
    assert grown_kib < 64 * 1024, f"decoding an 8x100000 PNG grew the peak memory by {grown_kib / 1024:.0f} MiB"
    assert low == high == 200 and fg == 56 * 56  # the centre of the image, as before


@pytest.mark.parametrize("size", [32, 224])
def test_cropping_first_matches_resizing_whole_then_cropping(size):
    """Photos up to 2:1 decode exactly as resizing whole then cropping gave; longer ones (cropped
    first) within a few levels of 255."""
    def whole_then_crop(img, size, resample):
        w, h = img.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        left, top = (nw - size) // 2, (nh - size) // 2
        return img.resize((nw, nh), resample=resample).crop((left, top, left + size, top + size))

    for name in ("astronaut", "coffee", "chelsea"):
        photo = Image.fromarray(getattr(skimage.data, name)())
        w, h = photo.size
        for ratio in (1, 2, 3):  # width : height, then height : width
            wide, tall = min(w // ratio, h), min(h // ratio, w)
            for img in (photo.crop((0, 0, ratio * wide, wide)), photo.crop((0, 0, tall, ratio * tall))):
                exact = ratio <= 2
                for resample in (Image.BICUBIC, Image.BILINEAR):
                    diff = np.abs(np.asarray(square_crop(img, size, resample), int)
                                  - np.asarray(whole_then_crop(img, size, resample), int))
                    bound = (0, 0.0) if exact else (8, 0.25)
                    assert diff.max() <= bound[0] and diff.mean() <= bound[1], (name, img.size, resample,
                                                                                diff.max(), diff.mean())
