"""One interface over the region detectors the features stage can run.

A backend turns a batch of RGB images into region detections, either by detecting (UNITER's
extraction rule: per-class NMS, confidence threshold, 10 to 100 boxes) or by pooling features at
boxes the caller supplies (bottom-up-attention's ``bbox_feats`` mode, for annotated regions).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from stages.base import StageError
from stages.feature_extraction.detector.config import DetectorConfig


@dataclass
class Detections:
    """The regions of one image.

    ``detect`` returns rows sorted by descending ``conf``; ``pool`` keeps the order of the boxes it was
    given (so they can be matched back to annotations); ``sorted_by_conf`` gives the store's order.
    """

    boxes: np.ndarray  # (N, 4) float32 x1, y1, x2, y2 in pixels of the image given
    features: np.ndarray  # (N, D) float32 pooled region features
    conf: np.ndarray  # (N,) float32 max non-background class probability
    soft_labels: np.ndarray  # (N, C+1) float32 class distribution, column 0 = background
    attr_labels: np.ndarray | None  # (N, A) float32 attribute scores, None if the backend has none

    def __len__(self) -> int:
        return len(self.boxes)

    def sorted_by_conf(self) -> Detections:
        # stable, so equal confidences keep their input order
        order = np.argsort(-self.conf, kind="stable")
        return Detections(
            boxes=self.boxes[order],
            features=self.features[order],
            conf=self.conf[order],
            soft_labels=self.soft_labels[order],
            attr_labels=None if self.attr_labels is None else self.attr_labels[order],
        )


class DetectorBackend(Protocol):
    feature_dim: int
    class_names: list[str]  # C names; soft_labels column i + 1 is class_names[i]
    attr_names: list[str]  # A names (empty when the backend has no attribute head)

    def detect(self, images: list[np.ndarray]) -> list[Detections]:
        """Detect regions in HxWx3 uint8 RGB images: ``min_boxes``..``max_boxes`` rows each, by conf."""
        ...

    def pool(self, images: list[np.ndarray], boxes: list[np.ndarray]) -> list[Detections]:
        """Features, class and attribute scores at the given (N_i, 4) x1y1x2y2 boxes, in their order."""
        ...


def load_backend(cfg: DetectorConfig, weights: Path, device: str = "cpu") -> DetectorBackend:
    """The backend ``cfg.backend`` with ``weights`` loaded, in eval mode on ``device``.

    Raises StageError (one line, naming the file and the mismatching field) when the weight file is
    missing, unreadable or was made for another architecture.
    """
    weights = Path(weights)
    if not weights.is_file():
        raise StageError(f"{weights}: detector weight file not found (features.detector.weights)")
    if cfg.backend == "torchvision":
        from stages.feature_extraction.detector.torchvision_backend import TorchvisionBackend

        return TorchvisionBackend.from_checkpoint(cfg, weights, device)
    from stages.feature_extraction.detector.detectron2_backend import Detectron2Backend

    return Detectron2Backend.from_weights(cfg, weights, device)
