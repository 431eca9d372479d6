"""Are the stored region features informative? Checked against the synthetic world's scene truth.

On held-out images (corpora the detector never trained on) every annotated object is matched to the
stored region with the highest IoU, as a UNITER reader sees the store (``ImgDb.get``: the first nbb
boxes, fp16 features read back as float32):

* recall: the fraction of objects covered by some region at IoU >= ``iou``;
* linear probes: multinomial logistic regressions from a matched region's feature to the object's shape
  and to its colour, trained on one half of the images and scored on the other (halves by a hash of
  the image key, so an image's objects never straddle train and test).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from stages.base import StageError
from stages.feature_extraction.config import ProbeConfig
from vlp.data.img_db import ImgDb

LABELS = ("shape", "colour")


def load_scenes(path: Path, corpora: tuple[str, ...]) -> dict[str, dict]:
    """image key -> scene record (width, height, objects with box [x, y, w, h] in pixels) of ``corpora``."""
    scenes: dict[str, dict] = {}
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            try:
                record = json.loads(line)
                if record["dataset"] in corpora:
                    scenes[record["key"]] = record
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise StageError(f"{path}: line {line_no}: bad scene record "
                                 f"({type(err).__name__}: {err})") from None
    return scenes


def normalized_truth(record: dict) -> np.ndarray:
    """(G, 4) x1y1x2y2 boxes of a scene record's objects, normalized to its image size."""
    w, h = record["width"], record["height"]
    xywh = np.array([o["box"] for o in record["objects"]], np.float64).reshape(-1, 4)
    return np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1) / [w, h, w, h]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) IoU of x1y1x2y2 boxes."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def in_train_half(key: str) -> bool:
    return hashlib.sha256(key.encode("utf-8")).digest()[0] % 2 == 0


def linear_probe_accuracy(x_train: np.ndarray, y_train: list[str], x_test: np.ndarray, y_test: list[str],
                          l2: float, steps: int) -> float:
    """Test accuracy of an L2-regularized multinomial logistic regression (L-BFGS, standardized inputs).

    A test label never seen in training counts as wrong.
    """
    classes = sorted(set(y_train))
    index = {c: i for i, c in enumerate(classes)}
    xtr = torch.from_numpy(x_train).double()
    mean, std = xtr.mean(0), xtr.std(0, unbiased=False).clamp_min(1e-6)
    xtr = (xtr - mean) / std
    xte = (torch.from_numpy(x_test).double() - mean) / std
    ytr = torch.tensor([index[c] for c in y_train])
    linear = torch.nn.Linear(xtr.shape[1], len(classes)).double()
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    opt = torch.optim.LBFGS(linear.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(xtr), ytr) + l2 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        predicted = linear(xte).argmax(1).tolist()
    return float(np.mean([classes[p] == y for p, y in zip(predicted, y_test, strict=True)]))


def probe_store(store: ImgDb, scenes: dict[str, dict], cfg: ProbeConfig) -> dict[str, float]:
    """Recall and probe accuracies of ``store`` on the held-out images in ``scenes``."""
    tag = f"iou{round(cfg.iou * 100)}"
    samples: dict[bool, tuple[list, dict[str, list]]] = {True: ([], {n: [] for n in LABELS}),
                                                        False: ([], {n: [] for n in LABELS})}
    images = objects = covered = 0
    for key in sorted(set(scenes) & set(store.keys())):
        record = scenes[key]
        truth = normalized_truth(record)
        if not len(truth):
            continue
        regions = store.get(key)
        iou = box_iou(truth, regions.boxes[:, :4].numpy().astype(np.float64))
        best = iou.argmax(axis=1)
        hit = iou[np.arange(len(truth)), best] >= cfg.iou
        images += 1
        objects += len(truth)
        covered += int(hit.sum())
        feats, labels = samples[in_train_half(key)]
        for obj, region, ok in zip(record["objects"], best, hit, strict=True):
            if ok:
                feats.append(regions.features[region].numpy())
                for name in LABELS:
                    labels[name].append(obj[name])
    (train_x, train_y), (test_x, test_y) = samples[True], samples[False]
    metrics = {"probe/images": float(images), "probe/objects": float(objects),
               "probe/train_objects": float(len(train_x)), "probe/test_objects": float(len(test_x))}
    # A metric that cannot be computed (no objects, too few matches to fit or score) is left out.
    if objects:
        metrics[f"probe/recall_{tag}"] = covered / objects
    for name in LABELS:
        if len(set(train_y[name])) < 2 or not test_x:
            continue
        metrics[f"probe/{name}_acc"] = linear_probe_accuracy(
            np.stack(train_x), train_y[name], np.stack(test_x), test_y[name], cfg.l2, cfg.steps
        )
    return metrics
