"""The data set: its manifest and fixed shards (decoding a file onto the grids: `decode.py`).

The manifest lists every image (image_id, uri, label, mask_uri, version: what the image and its
mask are now, from the listing; the plan's fingerprints hash it). Its shard assignment is
stored in the run root (`manifest.parquet`) and only ever grows: images already assigned
keep their shard, new images form new shards after the last one, so a shard id never
changes meaning between runs of the same run root.
"""

from __future__ import annotations

import io
import posixpath
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ray_consensus.errors import SpecError
from ray_consensus.spec.config import DatasetSpec, StorageSpec
from ray_consensus.storage.datafiles import Listed, data_location, is_utf8, list_uri, list_versions, read_uri_bytes

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
MANIFEST_COLUMNS = ["image_id", "uri", "label", "mask_uri", "version"]
MAX_CLASSES = 1_000_000      # a class count derived from the labels beyond this is a bad label, not a data set
TABLE_TEXT_COLUMNS = ("image_id", "uri", "mask_uri", "version")  # read as strings: "007" stays "007"


@dataclass
class Manifest:
    table: pd.DataFrame          # image_id, uri, label, mask_uri, version (sorted by image_id)
    num_classes: int
    class_names: list[str]       # the class folders, empty ones included (table manifests: none)
    errors: pd.DataFrame         # image_id, uri, stage, reason (rejected at listing time)


def _stem(rel: str) -> str:
    return posixpath.splitext(rel)[0]


def _rel(uri: str, root: str) -> str:
    return uri[len(root.rstrip("/")) + 1:] if uri.startswith(root.rstrip("/") + "/") else uri


def _error_frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["image_id", "uri", "stage", "reason"])


def _printable(name: str) -> str:
    """A file name that is not UTF-8, with its bad bytes as \\x.. escapes (for errors/ and run.json)."""
    return name.encode(errors="surrogateescape").decode(errors="backslashreplace")


def _reject(rows: list[dict], image_id: str, uri: str, reason: str) -> None:
    rows.append({"image_id": image_id, "uri": uri, "stage": "manifest", "reason": reason})


def read_manifest(spec: DatasetSpec, storage: StorageSpec | None = None) -> Manifest:
    """List the data set. Raises SpecError when it cannot be read at all; images that cannot be used are
    rows of `errors` (stage manifest)."""
    path = data_location(spec.path).rstrip("/")
    masks = data_location(spec.masks).rstrip("/") if spec.masks else None
    is_table = path.endswith((".csv", ".parquet"))
    try:
        if is_table:
            (table, errors), class_names = _read_table_manifest(path, storage), []
        else:
            table, class_names, errors = _read_folder_manifest(path, masks, storage)
    except FileNotFoundError:
        raise SpecError(f"data set not found: {spec.path}") from None
    except PermissionError:
        raise SpecError(f"data set not readable: {spec.path}") from None
    if table.empty:
        rejected = f"; {len(errors)} rejected, e.g. {errors[0]['uri']}: {errors[0]['reason']}" if errors else ""
        raise SpecError(f"data set {spec.path} has no images (extensions: {', '.join(IMAGE_EXTENSIONS)}){rejected}")

    labels = table["label"].to_numpy(dtype=np.float64)  # integers (table labels checked by the reader)
    if spec.num_classes:
        num_classes = spec.num_classes
    elif class_names:
        num_classes = len(class_names)
    else:
        top = int(labels.argmax())
        if labels[top] >= MAX_CLASSES:
            raise SpecError(f"manifest {spec.path}: image {table['image_id'].iloc[top]} has label "
                            f"{labels[top]:.0f}; labels are class indices below {MAX_CLASSES:,} (fix the label, or "
                            f"set dataset.num_classes to reject it as a row of errors/)")
        num_classes = int(labels[top]) + 1
    bad_label = (labels < 0) | (labels >= num_classes)
    for row, value in zip(table[bad_label].itertuples(), labels[bad_label]):
        _reject(errors, row.image_id, row.uri, f"label {value:.0f} outside the class range 0..{num_classes - 1}")
    table = table[~bad_label].assign(label=labels[~bad_label].astype("int64"))
    table = sort_rows(table, ["image_id", "uri"])
    dup = table["image_id"].duplicated(keep="first")
    for row in table[dup].itertuples():
        _reject(errors, row.image_id, row.uri, "duplicate image_id (the first URI in sorted order is kept)")
    table = table[~dup].reset_index(drop=True)
    return Manifest(table[MANIFEST_COLUMNS], num_classes, [_printable(c) for c in class_names], _error_frame(errors))


def _read_folder_manifest(path: str, masks: str | None, storage) -> tuple[pd.DataFrame, list[str], list[dict]]:
    """One sub-folder per class: every sub-folder is a class, empty ones included, so a class's index
    does not depend on which classes hold images. An image's version is its file's, plus its mask's."""
    listed, class_names = list_uri(path, storage)
    if not class_names:
        raise SpecError(f"{path}: expected one sub-folder per class holding the images")
    index = {c: i for i, c in enumerate(class_names)}
    mask_of: dict[str, Listed] = {}
    if masks:
        for f in list_uri(masks, storage)[0]:
            if f.uri.lower().endswith(IMAGE_EXTENSIONS) and is_utf8(f.uri):
                mask_of.setdefault(_stem(_rel(f.uri, masks)), f)
    rows, errors = [], []
    for f in listed:
        rel = _rel(f.uri, path)
        if "/" not in rel or not f.uri.lower().endswith(IMAGE_EXTENSIONS):
            continue
        if not is_utf8(f.uri):
            _reject(errors, _printable(_stem(rel)), _printable(f.uri), "file name is not valid UTF-8 (rename it)")
            continue
        mask = mask_of.get(_stem(rel))
        rows.append({"image_id": _stem(rel), "uri": f.uri, "label": index[rel.split("/")[0]],
                     "mask_uri": mask.uri if mask else ("" if masks else None),
                     "version": f"{f.version}|mask:{mask.version}" if mask else f.version})
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS), class_names, errors


def _read_table_manifest(path: str, storage) -> tuple[pd.DataFrame, list[dict]]:
    """A .csv or .parquet table: uri, label, optional image_id, mask_uri, version. Ids are strings as
    written; a row without an integer label, an id or a URI is a row of errors. Without a `version`
    column each image's (and mask's) version comes from listing the folders the URIs name, once each."""
    frame = _read_table(path, storage)
    missing = {"uri", "label"} - set(frame.columns)
    if missing:
        raise SpecError(f"manifest {path} lacks column(s) {', '.join(sorted(missing))} (needs uri, label; "
                        f"optional image_id, mask_uri, version)")
    base = path.rsplit("/", 1)[0]
    frame = frame.copy()
    frame["uri"] = _resolve(frame["uri"], base)
    if "image_id" in frame.columns:
        given = frame["image_id"].notna() & (frame["image_id"].astype(str) != "")
        frame["image_id"] = frame["image_id"].astype(str).where(given, None)
    else:
        frame["image_id"] = [None if u is None else _stem(_rel(u, base)) for u in frame["uri"]]
    frame["mask_uri"] = _resolve(frame["mask_uri"], base) if "mask_uri" in frame.columns else None
    values, ok = _integer_labels(frame["label"])
    if len(frame) and not ok.any():
        raise SpecError(f"manifest {path}: column 'label' must hold integer class indices (no row does, e.g. "
                        f"{str(frame['label'].iloc[0])!r})")
    errors: list[dict] = []
    usable = ok & frame["uri"].notna().to_numpy() & frame["image_id"].notna().to_numpy()
    for row in frame[~usable].itertuples():
        image_id, uri = ("" if pd.isna(v) else v for v in (row.image_id, row.uri))
        what = ("no uri" if not uri else "no image_id" if not image_id
                else "no label" if pd.isna(row.label) or row.label == "" else
                f"label {row.label!r} is not an integer class index")
        _reject(errors, image_id, uri, what)
    frame = frame[usable].assign(label=values[usable])
    if "version" in frame.columns:
        frame["version"] = frame["version"].fillna("").astype(str)
    else:
        uris = frame["uri"].tolist() + [m for m in frame["mask_uri"].dropna().tolist() if m]
        found = list_versions(uris, storage)
        image = frame["uri"].map(found).fillna("")
        mask = frame["mask_uri"].map(found).fillna("")
        frame["version"] = image.where(frame["mask_uri"].isna() | (frame["mask_uri"] == ""),
                                       image + "|mask:" + mask)
    return frame[MANIFEST_COLUMNS], errors


def _read_table(path: str, storage) -> pd.DataFrame:
    """The manifest file as a frame (the text columns as strings); SpecError with one line when it is no
    readable table."""
    data = read_uri_bytes(path, storage)
    try:
        if path.endswith(".csv"):
            return pd.read_csv(io.BytesIO(data), dtype={c: str for c in TABLE_TEXT_COLUMNS}, keep_default_na=False)
        return pd.read_parquet(io.BytesIO(data))
    except pd.errors.EmptyDataError:
        raise SpecError(f"manifest {path} is empty (expected a header line: uri,label[,image_id,mask_uri])") from None
    except UnicodeDecodeError:
        raise SpecError(f"manifest {path} is not UTF-8 text") from None
    except Exception as e:
        kind = "CSV" if path.endswith(".csv") else "Parquet"
        detail = " ".join(str(e).split())[:200] or type(e).__name__
        raise SpecError(f"manifest {path}: not a readable {kind} file ({detail})") from None


def _integer_labels(labels: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(values as float64, ok): ok where the label is a whole number (1, 1.0, "3"); not where it is
    missing, fractional (1.7), not finite, a boolean or other text."""
    if pd.api.types.is_bool_dtype(labels):
        return np.full(len(labels), np.nan), np.zeros(len(labels), bool)
    if pd.api.types.is_numeric_dtype(labels):
        values = labels.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        objects = labels.to_numpy(dtype=object)
        values = np.array(pd.to_numeric(pd.Series(objects, dtype=object), errors="coerce"), dtype=np.float64)
        values[[isinstance(v, (bool, np.bool_)) for v in objects]] = np.nan
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(values) & (values == np.floor(values))
    return values, ok


def _resolve(uris: pd.Series, base: str) -> pd.Series:
    """Manifest URIs: absolute paths and s3:// URIs as they are, file:///path URIs as paths, others
    relative to the manifest's folder `base`; empty, missing or non-string ones None. With pyarrow's
    string kernels: a million in a fraction of a second."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = uris.to_numpy(dtype=object)
    strings = np.array([isinstance(v, str) for v in values], dtype=bool) if uris.dtype == object else None
    arr = pa.array(np.where(strings, values, None) if strings is not None else values, type=pa.string(),
                   from_pandas=True)
    present = pc.and_(pc.is_valid(arr), pc.not_equal(arr, ""))
    arr = pc.replace_substring_regex(arr, pattern="^file://(localhost)?/", replacement="/")
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

