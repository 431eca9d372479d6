"""The detector as a Ray Data actor: decoded images in, per-image region arrays out.

Each actor loads the backend once and keeps it on its device (its GPU, or CPU with as many torch
threads as CPUs it holds). Arrays leave the actor already in their stored precision (fp16 features and
soft labels) to halve what travels back to the writer; boxes leave normalized to the original image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import torch

from stages.feature_extraction.decode import NO_BOXES
from stages.feature_extraction.detector.backend import Detections, load_backend
from stages.feature_extraction.detector.config import DetectorConfig

# One image's regions; the arrays are raw little-endian bytes of known dtype, shapes from the counts.
REGIONS = pa.schema(
    [
        ("key", pa.string()),
        ("corpus", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("num_boxes", pa.int32()),
        ("feature_dim", pa.int32()),
        ("num_labels", pa.int32()),  # C + 1 (background first)
        ("num_attrs", pa.int32()),  # 0 when the backend has no attribute head
        ("given", pa.bool_()),  # pooled at annotated boxes rather than detected
        ("features", pa.binary()),  # float16 N x feature_dim
        ("norm_bb", pa.binary()),  # float32 N x 6: x1, y1, x2, y2, w, h in [0, 1] of the original image
        ("conf", pa.binary()),  # float32 N
        ("soft_labels", pa.binary()),  # float16 N x num_labels
        ("attr_labels", pa.binary()),  # float16 N x num_attrs
    ]
)


def region_arrays(row: dict) -> dict[str, np.ndarray]:
    """The arrays of one ok REGIONS row, as ImgDbWriter.put takes them."""
    n = row["num_boxes"]
    arrays = {
        "features": np.frombuffer(row["features"], np.float16).reshape(n, row["feature_dim"]),
        "norm_bb": np.frombuffer(row["norm_bb"], np.float32).reshape(n, 6),
        "conf": np.frombuffer(row["conf"], np.float32),
        "soft_labels": np.frombuffer(row["soft_labels"], np.float16).reshape(n, row["num_labels"]),
        "attr_labels": None,
    }
    if row["num_attrs"]:
        arrays["attr_labels"] = np.frombuffer(row["attr_labels"], np.float16).reshape(n, row["num_attrs"])
    return arrays


def normalized_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """(N, 4) x1y1x2y2 pixels of a width x height image -> (N, 6) x1, y1, x2, y2, w, h in [0, 1].

    A resized copy covers the same extent as the original, so this is also normalized to the original.
    """
    xyxy = np.clip(boxes.astype(np.float64) / [width, height, width, height], 0.0, 1.0)
    wh = xyxy[:, 2:] - xyxy[:, :2]
    return np.concatenate([xyxy, wh], axis=1).astype(np.float32)


def scaled_given_boxes(boxes: np.ndarray, orig: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """Annotated x1y1x2y2 boxes of the original image in pixels of the (resized) detector input,
    clipped to it; boxes left with no area are dropped."""
    sx, sy = size[0] / orig[0], size[1] / orig[1]
    scaled = np.clip(boxes * np.array([sx, sy, sx, sy], np.float32), 0, [size[0], size[1], size[0], size[1]])
    keep = (scaled[:, 2] > scaled[:, 0]) & (scaled[:, 3] > scaled[:, 1])
    return scaled[keep].astype(np.float32)


class DetectorActor:
    """Ray Data callable class: DECODED batches -> REGIONS batches (failure rows passed through)."""

    def __init__(self, detector: dict, weights: str, threads: int, mode: str, unannotated: str,
                 given_ref: list | None = None):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            torch.set_num_threads(threads)
        self.backend = load_backend(DetectorConfig.model_validate(detector), Path(weights), device)
        self.mode = mode
        self.unannotated = unannotated
        # key -> (N, 4) float32 annotated boxes in original pixels; shared through the object store.
        self.given: dict[str, np.ndarray] = ray.get(given_ref[0]) if given_ref else {}

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        out: list[dict] = []
        to_detect: list[tuple[dict, np.ndarray]] = []
        to_pool: list[tuple[dict, np.ndarray, np.ndarray]] = []
        for row in rows:
            if row["status"] != "ok":
                out.append(_failure_row(row, row["status"], row["error"]))
                continue
            # bytearray: a writable buffer, as torch wants to own-or-write what it wraps
            image = np.frombuffer(bytearray(row["pixels"]), np.uint8).reshape(row["height"], row["width"], 3)
            boxes = self._given_boxes(row)
            if boxes is not None and len(boxes):
                to_pool.append((row, image, boxes))
            elif boxes is None or self.unannotated == "detect":
                to_detect.append((row, image))
            else:
                out.append(_failure_row(row, NO_BOXES, "no annotated box inside the image"))
        if to_detect:
            dets = self.backend.detect([image for _, image in to_detect])
            out.extend(self._regions_row(row, det, given=False)
                       for (row, _), det in zip(to_detect, dets, strict=True))
        if to_pool:
            dets = self.backend.pool([image for _, image, _ in to_pool], [b for _, _, b in to_pool])
            out.extend(self._regions_row(row, det.sorted_by_conf(), given=True)
                       for (row, _, _), det in zip(to_pool, dets, strict=True))
        return pa.Table.from_pylist(out, schema=REGIONS)

    def _given_boxes(self, row: dict) -> np.ndarray | None:
        """Annotated boxes to pool at (possibly none inside the image), or None to detect."""
        if self.mode != "given_boxes" or row["key"] not in self.given:
            return None
        orig, size = (row["orig_w"], row["orig_h"]), (row["width"], row["height"])
        return scaled_given_boxes(self.given[row["key"]], orig, size)

    def _regions_row(self, row: dict, det: Detections, given: bool) -> dict:
        if len(det) == 0:
            return _failure_row(row, NO_BOXES, "the detector returned no region")
        attrs = det.attr_labels
        return {
            "key": row["key"],
            "corpus": row["corpus"],
            "status": "ok",
            "error": None,
            "num_boxes": len(det),
            "feature_dim": det.features.shape[1],
            "num_labels": det.soft_labels.shape[1],
            "num_attrs": 0 if attrs is None else attrs.shape[1],
            "given": given,
            "features": det.features.astype(np.float16).tobytes(),
            "norm_bb": normalized_boxes(det.boxes, row["width"], row["height"]).tobytes(),
            "conf": det.conf.astype(np.float32).tobytes(),
            "soft_labels": det.soft_labels.astype(np.float16).tobytes(),
            "attr_labels": b"" if attrs is None else attrs.astype(np.float16).tobytes(),
        }


def _failure_row(row: dict, reason: str, detail: str | None) -> dict:
    return {"key": row["key"], "corpus": row["corpus"], "status": reason, "error": detail, "num_boxes": 0,
            "feature_dim": 0, "num_labels": 0, "num_attrs": 0, "given": False, "features": b"",
            "norm_bb": b"", "conf": b"", "soft_labels": b"", "attr_labels": b""}
