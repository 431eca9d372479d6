"""Decode and downscale image bytes on CPU, turning bad images into failure rows instead of exceptions.

Runs as a Ray Data ``map_batches`` task between the Parquet read and the detector actors. Pixels travel
as raw RGB bytes with their size, so the batch stays a flat Arrow table of fixed-type columns.
"""

from __future__ import annotations

import io
from typing import NamedTuple

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps, UnidentifiedImageError

# Failure reasons of the features stage (failures.parquet), besides download's own vocabulary.
ZERO_SIZE = "zero_size"  # null or empty image bytes
UNDECODABLE = "undecodable"  # bytes PIL cannot identify or fully load (corrupt, truncated, not an image)
NO_BOXES = "no_boxes"  # the detector returned no region, so there is nothing to store

# A decoded image: RGB bytes (height x width x 3) of the downscaled copy, and the original size that
# stored boxes are normalized to. Failed rows carry the reason in status, the detail in error.
DECODED = pa.schema(
    [
        ("key", pa.string()),
        ("corpus", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("orig_w", pa.int32()),
        ("orig_h", pa.int32()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("pixels", pa.binary()),
    ]
)


def target_size(width: int, height: int, short_side: int | None, long_side: int | None) -> tuple[int, int]:
    """The size the detector input is downscaled to: shorter side <= short_side, longer <= long_side.

    Never upscales: the detector's own transform does that on the accelerator, where it is cheap.
    """
    scale = 1.0
    if short_side:
        scale = min(scale, short_side / min(width, height))
    if long_side:
        scale = min(scale, long_side / max(width, height))
    if scale >= 1.0:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


class Failure(NamedTuple):
    reason: str
    detail: str


def decode_image(
    data: bytes | None, short_side: int | None, long_side: int | None
) -> tuple[np.ndarray, tuple[int, int]] | Failure:
    """``(RGB HxWx3 uint8 array, original (w, h))``, or the Failure of a bad image."""
    if not data:
        return Failure(ZERO_SIZE, "empty image bytes")
    try:
        with Image.open(io.BytesIO(data)) as img:
            # EXIF orientation applied, so boxes are relative to the image as displayed.
            rgb = ImageOps.exif_transpose(img).convert("RGB")
    except UnidentifiedImageError:  # its message holds the address of our BytesIO: not reproducible
        return Failure(UNDECODABLE, "UnidentifiedImageError: not a recognised image format")
    except Exception as err:  # noqa: BLE001 - any decoder error is the image's fault; recorded, not raised
        return Failure(UNDECODABLE, f"{type(err).__name__}: {err}".splitlines()[0][:200])
    size = rgb.size
    w, h = target_size(*size, short_side, long_side)
    if (w, h) != size:
        rgb = rgb.resize((w, h), Image.Resampling.BILINEAR)
    return np.asarray(rgb), size


def decode_batch(
    batch: pa.Table,
    short_side: int | None,
    long_side: int | None,
    exclude: frozenset[str] = frozenset(),
) -> pa.Table:
    """Ray Data UDF: (key, corpus, image) rows -> DECODED rows, with pixels or a failure status.

    ``exclude`` lists keys not to process (already in the store, or skipped in given-boxes mode);
    they are dropped before decoding.
    """
    rows: dict[str, list] = {name: [] for name in DECODED.names}
    columns = (batch.column(name).to_pylist() for name in ("key", "corpus", "image"))
    for key, corpus, data in zip(*columns, strict=True):
        if key in exclude:
            continue
        decoded = decode_image(data, short_side, long_side)
        rows["key"].append(key)
        rows["corpus"].append(corpus)
        if isinstance(decoded, Failure):
            row = {"status": decoded.reason, "error": decoded.detail, "orig_w": 0, "orig_h": 0,
                   "width": 0, "height": 0, "pixels": b""}
        else:
            rgb, (orig_w, orig_h) = decoded
            row = {"status": "ok", "error": None, "orig_w": orig_w, "orig_h": orig_h,
                   "width": rgb.shape[1], "height": rgb.shape[0], "pixels": rgb.tobytes()}
        for name, value in row.items():
            rows[name].append(value)
    return pa.table(rows, schema=DECODED)
