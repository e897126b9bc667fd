"""Decoding one image or mask file onto the shared grids: the image's (S, S, 3) crop, the mask's (M, M).

Every image is resized to `run.image_size` on its shorter side and centre-cropped (`crop_geometry`,
which `pseudo_masks.crop_cells` inverts for exported masks); its mask takes the same crop on the
`run.map_size` grid. A file that cannot be used raises `DecodeError`, whose message is the reason
stored in the run's errors table. Decode workers import this module, not the manifest's
(`data.py`, pandas).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

from ray_consensus.errors import DecodeError, first_line
from ray_consensus.spec.config import StorageSpec
from ray_consensus.storage.datafiles import read_uri_bytes
from ray_consensus.storage.paths import is_s3, split_s3

MIN_SIDE = 8                 # smaller images carry no usable spatial explanation
MAX_PIXELS = 64_000_000      # decompression-bomb guard (PIL raises above twice its own limit)


def read_input(uri: str | None, storage: StorageSpec | None, what: str) -> bytes:
    """The bytes of an image or mask file. Raises DecodeError (the reason for errors/) where there is no
    file to read: no URI, a missing file, a folder, a path through a file, no permission to read."""
    if not uri:
        raise DecodeError(f"no {what} file for this image")
    if is_s3(uri) and (uri.endswith("/") or not split_s3(uri)[1]):
        raise DecodeError(f"{what} URI is a folder, not a file")
    try:
        return read_uri_bytes(uri, storage)
    except (FileNotFoundError, NotADirectoryError):
        raise DecodeError(f"{what} file not found") from None
    except IsADirectoryError:
        raise DecodeError(f"{what} URI is a folder, not a file") from None
    except PermissionError:
        raise DecodeError(f"{what} file not readable (permission denied)") from None


def _open(data: bytes, what: str, load: bool = True) -> Image.Image:
    """The image in `data`, decoded (or, without `load`, only its header read), within the
    decompression-bomb guard. Raises DecodeError."""
    if not data:
        raise DecodeError(f"empty {what} file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise DecodeError(f"{what} too large ({w}x{h} > {MAX_PIXELS} pixels; decompression-bomb guard)")
            if not load:
                return img
            if what == "image" and img.format == "JPEG" and min(w, h) > 4096:
                img.draft("RGB", (w // 4, h // 4))  # big JPEGs at a reduced scale: cheaper, same after resize
            img.load()
            return img
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError(f"{what} too large (decompression-bomb guard: {e})") from None
    except Exception as e:
        raise DecodeError(f"cannot decode {what}: {type(e).__name__}: {first_line(e) if str(e).strip() else ''}"
                          .rstrip(": ")) from None


def _full_scale(img: Image.Image, arr: np.ndarray) -> float:
    """The value that is white in a 16-bit, 32-bit int or float grey image: 65535 for 16-bit (and int
    images above 255); 1 for a float image within [0, 1], 255 for one within [0, 255], any other float
    image (or one with NaN or inf) is an error."""
    if img.mode != "F":
        return 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
    if not np.isfinite(arr).all():
        raise DecodeError("float image has NaN or infinite pixel values")
    low, high = float(arr.min()), float(arr.max())
    if low < 0 or high > 255:
        raise DecodeError(f"float image values {low:g}..{high:g} are neither within [0, 1] nor [0, 255]")
    return 1.0 if high <= 1 else 255.0


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit, int or float grey: scale, don't clip
        arr = np.asarray(img, dtype=np.float64)
        grey = np.clip(arr / _full_scale(img, arr) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # transparent -> white
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.asarray(img.convert("RGB"))


def crop_geometry(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """The shared crop of a width x height image: resized to `size` on its shorter side, to
    (resized_width, resized_height), then its centre `size` x `size` from (left, top)."""
    scale = size / min(width, height)
    nw, nh = max(size, round(width * scale)), max(size, round(height * scale))
    return nw, nh, (nw - size) // 2, (nh - size) // 2


def square_crop(img: Image.Image, size: int, resample) -> Image.Image:
    """The centre `size` x `size` crop of the image resized to `size` on its shorter side (`crop_geometry`).

    An image at most twice as long as it is wide is resized whole, then cropped. Of a longer one only
    the crop is resampled (from the source region it covers: PIL's `box`), so that the cost stays
    bounded by `size` whatever the aspect ratio (an 8x100000 PNG resized whole to 224 px would be
    224x2.8M pixels, 1.9 GB); the two ways differ by a few levels of 255 (PIL rounds between its two
    passes, in an order of its choosing).
    """
    w, h = img.size
    nw, nh, left, top = crop_geometry(w, h, size)
    if max(nw, nh) <= 2 * size:
        return img.resize((nw, nh), resample=resample).crop((left, top, left + size, top + size))
    sx, sy = nw / w, nh / h
    return img.resize((size, size), resample=resample,
                      box=(left / sx, top / sy, (left + size) / sx, (top + size) / sy))


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
    fg = mask_foreground(data, foreground)
    if fg.shape[::-1] != tuple(image_wh):
        raise DecodeError(f"mask size {fg.shape[1]}x{fg.shape[0]} differs from image size "
                          f"{image_wh[0]}x{image_wh[1]}")
    crop = square_crop(Image.fromarray(fg.astype(np.uint8) * 255), map_size, Image.BILINEAR)
    return (np.asarray(crop) >= 128).astype(np.uint8)


def mask_foreground(data: bytes, foreground: str) -> np.ndarray:
    """Mask file bytes -> bool (H, W): the foreground as `dataset.mask_foreground` defines it.

    A grey, palette (its indices), 16-bit, int or float mask: where the value is not 0 (and, with
    nonzero_not_255, not 255, the VOC object border). A colour mask: where any channel is not 0 (so
    (1, 0, 0) is foreground; with nonzero_not_255, not where all are 255). A mask with an alpha channel
    that varies: transparent pixels are background, and where the colour marks nothing that is opaque
    (a shape in alpha only, or drawn in black), the opaque pixels are the foreground. Raises DecodeError.
    """
    img = _open(data, "mask")
    alpha = None
    if img.mode in ("LA", "RGBA"):
        arr = np.asarray(img)
        values, alpha = arr[..., :-1], arr[..., -1]
    else:
        if img.mode not in ("1", "L", "P", "I", "F", "RGB") and not img.mode.startswith("I;16"):
            img = img.convert("RGB")
        values = np.asarray(img)
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            raise DecodeError("float mask has NaN or infinite values")
    values = values.reshape(values.shape[0], values.shape[1], -1)
    fg = (values != 0).any(axis=2)
    if foreground == "nonzero_not_255":
        fg &= ~(values == 255).all(axis=2)
    if alpha is not None and alpha.min() != alpha.max():
        opaque = alpha != 0
        fg = fg & opaque if (fg & opaque).any() else opaque
    return fg


def image_size_of(data: bytes) -> tuple[int, int]:
    """An image's (width, height) as stored, from its header (a big JPEG decodes smaller, see `_open`)."""
    return _open(data, "image", load=False).size
