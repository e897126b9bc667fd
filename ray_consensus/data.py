"""The data set: manifest, fixed shards, and decoding images and masks onto the shared grids.

The manifest lists every image (image_id, uri, label, mask_uri). Its shard assignment is
stored in the run root (`manifest.parquet`) and only ever grows: images already assigned
keep their shard, new images form new shards after the last one, so a shard id never
changes meaning between runs of the same run root.
"""

from __future__ import annotations

import io
import posixpath
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from PIL import Image

from ray_consensus.config import DatasetSpec, StorageSpec
from ray_consensus.errors import SpecError
from ray_consensus.storage import list_uri, read_uri_bytes

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
MANIFEST_COLUMNS = ["image_id", "uri", "label", "mask_uri"]
MIN_SIDE = 8                 # smaller images carry no usable spatial explanation
MAX_PIXELS = 64_000_000      # decompression-bomb guard (PIL raises above twice its own limit)


class DecodeError(ValueError):
    """An input that cannot be used; the message is the reason stored in errors/."""


@dataclass
class Manifest:
    table: pd.DataFrame          # image_id, uri, label, mask_uri (sorted by image_id)
    num_classes: int
    class_names: list[str]
    errors: pd.DataFrame         # image_id, uri, stage, reason (rejected at listing time)


def _stem(rel: str) -> str:
    return posixpath.splitext(rel)[0]


def _rel(uri: str, root: str) -> str:
    return uri[len(root.rstrip("/")) + 1:] if uri.startswith(root.rstrip("/") + "/") else uri


def _error_frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["image_id", "uri", "stage", "reason"])


def read_manifest(spec: DatasetSpec, storage: StorageSpec | None = None) -> Manifest:
    """List the data set. Raises SpecError when it cannot be read at all."""
    path = spec.path.rstrip("/")
    is_table = path.endswith((".csv", ".parquet"))
    try:
        if is_table:
            table, class_names = _read_table_manifest(path, storage), []
        else:
            table, class_names = _read_folder_manifest(path, spec.masks, storage)
    except FileNotFoundError:
        raise SpecError(f"data set not found: {spec.path}") from None
    except PermissionError:
        raise SpecError(f"data set not readable: {spec.path}") from None
    if table.empty:
        raise SpecError(f"data set {spec.path} has no images (extensions: {', '.join(IMAGE_EXTENSIONS)})")

    num_classes = spec.num_classes or (len(class_names) if class_names else int(table["label"].max()) + 1)
    errors = []
    bad_label = (table["label"] < 0) | (table["label"] >= num_classes)
    for row in table[bad_label].itertuples():
        errors.append({"image_id": row.image_id, "uri": row.uri, "stage": "manifest",
                       "reason": f"label {row.label} outside the class range 0..{num_classes - 1}"})
    table = table[~bad_label]
    table = sort_rows(table, ["image_id", "uri"])
    dup = table["image_id"].duplicated(keep="first")
    for row in table[dup].itertuples():
        errors.append({"image_id": row.image_id, "uri": row.uri, "stage": "manifest",
                       "reason": "duplicate image_id (the first URI in sorted order is kept)"})
    table = table[~dup].reset_index(drop=True)
    return Manifest(table[MANIFEST_COLUMNS], num_classes, class_names, _error_frame(errors))


def _read_folder_manifest(path: str, masks: str | None, storage) -> tuple[pd.DataFrame, list[str]]:
    files = [u for u in list_uri(path, storage) if u.lower().endswith(IMAGE_EXTENSIONS)]
    rels = [_rel(u, path) for u in files]
    class_names = sorted({r.split("/")[0] for r in rels if "/" in r})
    if not class_names:
        raise SpecError(f"{path}: expected one sub-folder per class holding the images")
    index = {c: i for i, c in enumerate(class_names)}
    mask_of: dict[str, str] = {}
    if masks:
        for u in list_uri(masks, storage):
            if u.lower().endswith(IMAGE_EXTENSIONS):
                mask_of.setdefault(_stem(_rel(u, masks)), u)
    rows = [{"image_id": _stem(r), "uri": u, "label": index[r.split("/")[0]],
             "mask_uri": mask_of.get(_stem(r), "" if masks else None)}
            for u, r in zip(files, rels) if "/" in r]
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS), class_names


def _read_table_manifest(path: str, storage) -> pd.DataFrame:
    data = read_uri_bytes(path, storage)
    frame = pd.read_csv(io.BytesIO(data)) if path.endswith(".csv") else pd.read_parquet(io.BytesIO(data))
    missing = {"uri", "label"} - set(frame.columns)
    if missing:
        raise SpecError(f"manifest {path} lacks column(s) {', '.join(sorted(missing))} (needs uri, label; "
                        f"optional image_id, mask_uri)")
    base = path.rsplit("/", 1)[0]
    frame = frame.copy()
    frame["uri"] = _resolve(frame["uri"], base)
    if "image_id" not in frame.columns:
        frame["image_id"] = [_stem(_rel(u, base)) for u in frame["uri"]]
    frame["image_id"] = frame["image_id"].astype(str)
    frame["mask_uri"] = _resolve(frame["mask_uri"], base) if "mask_uri" in frame.columns else None
    try:
        frame["label"] = frame["label"].astype("int64")
    except (TypeError, ValueError):
        raise SpecError(f"manifest {path}: column 'label' must hold integer class indices") from None
    return frame[MANIFEST_COLUMNS]


def _resolve(uris: pd.Series, base: str) -> pd.Series:
    """Manifest URIs: absolute paths and s3:// URIs as they are, others relative to the manifest's
    folder `base`; empty, missing or non-string ones None. With pyarrow's string kernels: a million
    in a fraction of a second."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = uris.to_numpy(dtype=object)
    strings = np.array([isinstance(v, str) for v in values], dtype=bool) if uris.dtype == object else None
    arr = pa.array(np.where(strings, values, None) if strings is not None else values, type=pa.string(),
                   from_pandas=True)
    present = pc.and_(pc.is_valid(arr), pc.not_equal(arr, ""))
    absolute = pc.or_(pc.starts_with(arr, "s3://"), pc.starts_with(arr, "/"))
    out = pc.if_else(absolute, arr, pc.binary_join_element_wise(base, arr, "/"))
    out = pc.if_else(present, out, pa.scalar(None, pa.string()))
    return pd.Series(out.to_numpy(zero_copy_only=False), index=uris.index, dtype=object)


def sort_rows(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """`frame` sorted by `keys` (ascending, stable), with pyarrow's sort: a million string keys in about
    a second, where pandas' multi-key sort takes several."""
    import pyarrow as pa
    import pyarrow.compute as pc

    keys_table = pa.Table.from_pandas(frame[keys], preserve_index=False)
    order = pc.sort_indices(keys_table, sort_keys=[(k, "ascending") for k in keys]).to_numpy()
    return frame.iloc[order].reset_index(drop=True)


def assign_shards(manifest: pd.DataFrame, previous: pd.DataFrame | None, shard_size: int) -> pd.DataFrame:
    """Add a `shard` column; the result is sorted by (shard, image_id). Images in `previous` (image_id,
    shard) keep their shard; new ones fill new shards after the last.

    Images gone from the data set drop out of their shard (which is then recomputed).
    `manifest` must be sorted by image_id (as `read_manifest` returns it).
    """
    if previous is None or previous.empty:
        shards = np.arange(len(manifest)) // shard_size
        return manifest.assign(shard=shards.astype("int64")).reset_index(drop=True)
    known = previous.set_index("image_id")["shard"]
    shard = known.reindex(manifest["image_id"]).to_numpy(dtype=np.float64)
    seen = ~np.isnan(shard)
    kept = manifest[seen].assign(shard=shard[seen].astype("int64"))
    first = int(previous["shard"].max()) + 1
    new = manifest[~seen]
    new = new.assign(shard=(first + np.arange(len(new)) // shard_size).astype("int64"))
    return sort_rows(pd.concat([kept, new]), ["shard", "image_id"])


# ---------------------------------------------------------------- decoding

def _open(data: bytes, what: str) -> Image.Image:
    if not data:
        raise DecodeError(f"empty {what} file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise DecodeError(f"{what} too large ({w}x{h} > {MAX_PIXELS} pixels; decompression-bomb guard)")
            if img.format == "JPEG":  # decode big JPEGs at a reduced scale: cheaper, same result after resize
                img.draft("RGB", (max(1, w // 4), max(1, h // 4)) if min(w, h) > 4096 else (w, h))
            img.load()
            return img
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError(f"{what} too large (decompression-bomb guard: {e})") from None
    except Exception as e:
        raise DecodeError(f"cannot decode {what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                          .rstrip(": ")) from None


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit (or 32-bit int) grey: scale, don't clip
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        grey = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # transparent -> white
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.asarray(img.convert("RGB"))


def square_crop(img: Image.Image, size: int, resample) -> Image.Image:
    """Resize the shorter side to `size`, then take the centre `size` x `size` crop."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), resample=resample)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def decode_image(data: bytes, image_size: int) -> np.ndarray:
    """Image file bytes -> (S, S, 3) uint8 on the shared grid. Raises DecodeError."""
    img = _open(data, "image")
    if min(img.size) < MIN_SIDE:
        raise DecodeError(f"image too small ({img.size[0]}x{img.size[1]}; need at least {MIN_SIDE} px a side)")
    rgb = Image.fromarray(_to_rgb_array(img))
    return np.asarray(square_crop(rgb, image_size, Image.BICUBIC), dtype=np.uint8)


def decode_mask(data: bytes, image_wh: tuple[int, int], map_size: int, foreground: str) -> np.ndarray:
    """Mask file bytes -> (M, M) uint8 {0, 1} on the map grid (same crop as the image).

    `image_wh` is the image's original (width, height): a mask of another size is rejected.
    """
    img = _open(data, "mask")
    if img.size != tuple(image_wh):
        raise DecodeError(f"mask size {img.size[0]}x{img.size[1]} differs from image size "
                          f"{image_wh[0]}x{image_wh[1]}")
    arr = np.asarray(img if img.mode in ("L", "P", "I", "I;16", "1") else img.convert("L"))
    if arr.ndim == 3:
        arr = arr[..., 0]
    fg = arr != 0
    if foreground == "nonzero_not_255":
        fg &= arr != 255
    crop = square_crop(Image.fromarray(fg.astype(np.uint8) * 255), map_size, Image.BILINEAR)
    return (np.asarray(crop) >= 128).astype(np.uint8)


def image_size_of(data: bytes) -> tuple[int, int]:
    return _open(data, "image").size
