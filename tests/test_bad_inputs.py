"""Bad images, masks and manifest rows land in errors/ with a reason; every good image is processed."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from imagesets import make_image_folder, tiny_spec
from PIL import Image

from ray_consensus.dataset.decode import decode_image, decode_mask
from ray_consensus.errors import DecodeError
from ray_consensus.runner import execute
from ray_consensus.spec.config import parse_spec


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def test_decode_accepts_every_image_kind_onto_the_grid():
    rng = np.random.default_rng(0)
    grey = (rng.random((20, 30)) * 255).astype(np.uint8)
    kinds = {
        "grayscale": png(grey),
        "rgba": png((rng.random((20, 30, 4)) * 255).astype(np.uint8)),
        "16-bit": png((rng.random((20, 30)) * 65535).astype(np.uint16)),
        "palette": (lambda b: (Image.fromarray(grey).convert("P").save(b, format="PNG"), b.getvalue())[1])(
            io.BytesIO()),
    }
    for name, data in kinds.items():
        out = decode_image(data, 16)
        assert out.shape == (16, 16, 3) and out.dtype == np.uint8, name
        assert out.std() > 0, name  # real content survived the conversion
    # 16-bit values are scaled, not clipped: a 16-bit image at half range decodes to mid-grey.
    half = np.full((20, 30), 32768, np.uint16)
    assert abs(int(decode_image(png(half), 16).mean()) - 128) <= 1


@pytest.mark.parametrize("data,reason", [
    (b"", "empty image file"),
    (b"this is not an image at all", "cannot decode image"),
    (png(np.zeros((1, 1, 3), np.uint8)), "image too small (1x1"),
    (png(np.zeros((40, 40, 3), np.uint8))[:60], "cannot decode image"),
])
def test_decode_rejects_with_a_reason(data, reason):
    with pytest.raises(DecodeError, match=None) as err:
        decode_image(data, 16)
    assert reason in str(err.value)


def test_decompression_bomb_is_rejected_without_decoding():
    bomb = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(bomb, format="PNG")  # 100 MP in a few kB
    assert len(bomb.getvalue()) < 100_000
    with pytest.raises(DecodeError, match="too large"):
        decode_image(bomb.getvalue(), 16)


def test_mask_of_another_size_is_rejected():
    with pytest.raises(DecodeError, match="differs from image size"):
        decode_mask(png(np.zeros((10, 10), np.uint8)), (30, 20), 8, "nonzero")
    voc = np.zeros((20, 20), np.uint8)
    voc[5:15, 5:15] = 7
    voc[4, 4:16] = 255  # object border in VOC masks is not foreground
    m = decode_mask(png(voc), (20, 20), 20, "nonzero_not_255")
    assert m.sum() == 100 and m[4].sum() == 0


@pytest.mark.slow
def test_run_records_bad_inputs_and_processes_all_good_images(tmp_path, ray_local):
    data = make_image_folder(tmp_path / "ds", n_classes=2, per_class=4)
    images, masks = data / "images", data / "masks"
    (images / "c0" / "truncated.png").write_bytes((images / "c0" / "img000.png").read_bytes()[:200])
    (images / "c0" / "notanimage.jpg").write_text("hello, I am a text file")
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(images / "c1" / "tiny.png")
    Image.new("1", (10_000, 10_000)).save(images / "c1" / "bomb.png")
    Image.fromarray(np.full((40, 48), 128, np.uint8)).save(images / "c1" / "grey.png")  # good, no mask
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(masks / "c0" / "img001.png")  # wrong-size mask
    rows = [{"image_id": p.parent.name + "/" + p.stem, "uri": str(p), "label": int(p.parent.name[1]),
             "mask_uri": str(masks / p.parent.name / (p.stem + ".png"))} for p in sorted(images.rglob("*.*"))]
    rows.append({**rows[0], "label": 7, "image_id": "c0/out-of-range"})
    rows.append({**rows[1], "uri": str(images / "c0" / "img003.png")})  # duplicate id of rows[1]
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)

    spec = tiny_spec(data, str(tmp_path / "run"))
    spec["dataset"] = {"path": str(manifest), "num_classes": 2}
    info = execute(parse_spec(spec), progress=False)

    errors = pq.read_table(str(tmp_path / "run" / "errors")).to_pandas()
    by_id = {(r.image_id, r.stage): r.reason for r in errors.itertuples()}
    expected = {("c0/truncated", "decode"), ("c0/notanimage", "decode"), ("c1/tiny", "decode"),
                ("c1/bomb", "decode"), ("c1/grey", "mask"), ("c0/img001", "mask"),
                ("c0/out-of-range", "manifest"), (rows[1]["image_id"], "manifest")}
    assert set(by_id) == expected, by_id
    assert "too large" in by_id[("c1/bomb", "decode")]
    assert "too small" in by_id[("c1/tiny", "decode")]
    assert "differs from image size" in by_id[("c0/img001", "mask")]
    assert "mask file not found" in by_id[("c1/grey", "mask")]
    assert "outside the class range" in by_id[("c0/out-of-range", "manifest")]
    assert "duplicate image_id" in by_id[(rows[1]["image_id"], "manifest")]
    assert set(errors.columns) >= {"image_id", "uri", "stage", "reason"}
    assert info.counts.errors == len(expected)

    attrs = pq.read_table(str(tmp_path / "run" / "attributions")).to_pandas()
    good = {f"c{c}/img{i:03d}" for c in range(2) for i in range(4)} | {"c1/grey"}
    for model in ("a", "b"):
        assert set(attrs[attrs.model == model]["image_id"]) == good
    consensus = pq.read_table(str(tmp_path / "run" / "consensus")).to_pandas().set_index("image_id")
    assert consensus.loc["c1/grey", "mask"] is None and consensus.loc["c0/img001", "mask"] is None
    assert np.isnan(consensus.loc["c0/img001", "ap"]) and np.isfinite(consensus.loc["c0/img000", "ap"])
