"""Training loop of the torchvision detector, and its held-out measurement.

Images are shrunk once to the detector's input size (the model would resize them every step anyway);
each step flips half the images and, with ``scale_jitter``, draws each image's shorter side: the
augmentations that keep every label true (colour jitter would change the colour attributes).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torchvision.ops import box_iou

from stages.feature_extraction.detector.backend import DetectorBackend
from stages.feature_extraction.detector.config import DetectorConfig
from stages.feature_extraction.detector.data import AnnotatedImage, Vocabulary
from stages.feature_extraction.detector.model import RegionDetector
from vlp.train.seeds import seed_of

log = logging.getLogger("vlp.detector")


def _shrunk(img: AnnotatedImage, cfg: DetectorConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The image as a float CHW tensor no larger than the largest training size, and its boxes."""
    height, width = img.image.shape[:2]
    largest = max(cfg.train.scale_jitter or (cfg.image_size,))
    scale = min(1.0, largest / min(height, width), cfg.max_image_size / max(height, width))
    pixels = img.image
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        pixels = np.asarray(Image.fromarray(pixels).resize(size, Image.BILINEAR))
        scale_xy = np.array([size[0] / width, size[1] / height] * 2, np.float32)
    else:
        scale_xy = np.ones(4, np.float32)
    tensor = torch.tensor(pixels).permute(2, 0, 1).float().div_(255)
    return tensor, torch.from_numpy(img.boxes * scale_xy)


def _target(img: AnnotatedImage, boxes: torch.Tensor, vocab: Vocabulary) -> dict[str, torch.Tensor]:
    """Targets in the vocabulary; objects whose name is out of it are left out."""
    class_index = {name: i + 1 for i, name in enumerate(vocab.classes)}
    attr_index = {name: i for i, name in enumerate(vocab.attributes)}
    keep = [i for i, name in enumerate(img.names) if name in class_index]
    attributes = torch.zeros(len(keep), len(vocab.attributes))
    for row, i in enumerate(keep):
        for a in img.attributes[i]:
            if a in attr_index:
                attributes[row, attr_index[a]] = 1.0
    return {
        "boxes": boxes[keep].reshape(-1, 4),
        "labels": torch.tensor([class_index[img.names[i]] for i in keep], dtype=torch.int64),
        "attributes": attributes,
        "attr_mask": torch.tensor([img.attr_known[i] for i in keep], dtype=torch.bool),
    }


def _flip(
    image: torch.Tensor, target: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    width = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    return image.flip(-1), {**target, "boxes": boxes}


def fit(
    cfg: DetectorConfig,
    images: list[AnnotatedImage],
    vocab: Vocabulary,
    seed: int,
    log_epoch: Callable[[int, dict[str, float]], None] = lambda epoch, losses: None,
) -> RegionDetector:
    """Train a detector from scratch on ``images``; ``seed`` (the root seed) seeds the initialisation and the
    batch order and flips; ``log_epoch`` gets each epoch's mean losses."""
    tc = cfg.train
    torch.manual_seed(seed_of(seed, "detector", "init"))
    rng = np.random.default_rng(seed_of(seed, "detector", "batches"))
    model = RegionDetector(cfg, len(vocab.classes), len(vocab.attributes))
    if tc.scale_jitter is not None:
        lo, hi = tc.scale_jitter
        model.transform.min_size = tuple(range(lo, hi + 1, 16))
    data = []
    for img in images:
        tensor, boxes = _shrunk(img, cfg)
        data.append((tensor, _target(img, boxes, vocab)))
    steps_per_epoch = math.ceil(len(data) / tc.batch_size)
    total = steps_per_epoch * tc.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (
            (step + 1) / tc.warmup_steps
            if step < tc.warmup_steps
            else 0.5 * (1 + math.cos(math.pi * (step - tc.warmup_steps) / max(1, total - tc.warmup_steps)))
        ),
    )
    model.train()
    for epoch in range(tc.epochs):
        started = time.perf_counter()
        sums: dict[str, float] = {}
        order = rng.permutation(len(data))
        for start in range(0, len(order), tc.batch_size):
            batch = [data[i] for i in order[start : start + tc.batch_size]]
            batch = [_flip(*b) if rng.random() < 0.5 else b for b in batch]
            losses = model.losses([b[0] for b in batch], [b[1] for b in batch])
            loss = sum(
                v * (tc.attr_loss_weight if k == "loss_attributes" else 1.0) for k, v in losses.items()
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
            schedule.step()
            for name, value in {**losses, "loss": loss}.items():
                sums[name] = sums.get(name, 0.0) + value.item() / steps_per_epoch
        sums["epoch_seconds"] = time.perf_counter() - started
        log.info("detector epoch %d/%d: %s", epoch + 1, tc.epochs, {k: round(v, 4) for k, v in sums.items()})
        log_epoch(epoch, sums)
    model.transform.min_size = (cfg.image_size,)
    return model.eval()


def evaluate(
    backend: DetectorBackend, images: list[AnnotatedImage], batch_size: int = 8, iou: float = 0.5
) -> dict[str, float]:
    """Detect-mode quality on annotated images.

    - recall: annotated boxes covered by a detected box with IoU >= ``iou``;
    - class_accuracy: among covered boxes, the best-overlapping detection's argmax class is the name;
    - attr_accuracy: among covered boxes with annotated attributes, the share of their k attributes
      found in the detection's k highest-scoring attributes;
    - boxes_per_image: mean number of detections.
    """
    covered = total = correct = attr_hits = attr_total = n_boxes = 0
    class_index = {name: i + 1 for i, name in enumerate(backend.class_names)}
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        for img, det in zip(chunk, backend.detect([i.image for i in chunk]), strict=True):
            n_boxes += len(det)
            total += len(img.boxes)
            if len(img.boxes) == 0 or len(det) == 0:
                continue
            overlaps = box_iou(torch.from_numpy(img.boxes), torch.from_numpy(det.boxes))
            best_iou, best = overlaps.max(dim=1)
            for g in torch.nonzero(best_iou >= iou).flatten().tolist():
                covered += 1
                d = int(best[g])
                correct += int(int(det.soft_labels[d].argmax()) == class_index.get(img.names[g], -1))
                wanted = set(img.attributes[g])
                if img.attr_known[g] and wanted and det.attr_labels is not None:
                    top = np.argsort(-det.attr_labels[d])[: len(wanted)]
                    attr_hits += len(wanted & {backend.attr_names[a] for a in top})
                    attr_total += len(wanted)
    return {
        "recall": covered / max(1, total),
        "class_accuracy": correct / max(1, covered),
        "attr_accuracy": attr_hits / max(1, attr_total),
        "boxes_per_image": n_boxes / max(1, len(images)),
        "annotated_boxes": float(total),
    }
