"""Which detections become regions: the box rule of bottom-up-attention's extractor, as UNITER used it."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from stages.feature_extraction.detector.config import DetectorConfig

# Per-class NMS only considers (box, class) pairs above this probability; a pair below it can neither
# pass the confidence threshold nor outrank a box that did.
_NMS_SCORE_FLOOR = 1e-3


def select_regions(scores: Tensor, class_boxes: Tensor, cfg: DetectorConfig) -> Tensor:
    """Boxes kept for one image, most confident first.

    ``scores`` (R, C) are the foreground class probabilities of R proposals and ``class_boxes``
    (R, C, 4) their class-specific boxes. Per-class NMS; a proposal's confidence is its best class
    score that survived NMS; proposals at or above ``conf_threshold`` are kept, topped up to
    ``min_boxes`` with the next best (proposals suppressed in every class last, by their raw score)
    and cut at ``max_boxes``. Each kept proposal is returned as its box for its best class.
    """
    rows, cols = torch.nonzero(scores >= _NMS_SCORE_FLOOR, as_tuple=True)
    kept = batched_nms(class_boxes[rows, cols], scores[rows, cols], cols, cfg.nms_threshold)
    survived = torch.zeros_like(scores)
    survived[rows[kept], cols[kept]] = scores[rows[kept], cols[kept]]
    conf, best = survived.max(dim=1)
    raw_conf, raw_best = scores.max(dim=1)
    best = torch.where(conf > 0, best, raw_best)
    order = torch.argsort(raw_conf, descending=True, stable=True)
    order = order[torch.argsort(conf[order], descending=True, stable=True)]
    n_pass = int((conf >= cfg.conf_threshold).sum())
    keep = order[: min(max(n_pass, cfg.min_boxes), cfg.max_boxes)]
    return class_boxes[keep, best[keep]]
