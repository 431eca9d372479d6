"""Referring expressions (RefCOCO-style): which region of the image does the expression name?

The input is [CLS] expression [SEP] with every region of the image; a linear layer scores each region's
output and cross-entropy picks the target region. One example per expression (a ref has several).

Two region sets, one dataset each:

* detected (``img_db``, the detector's regions): the target is the region with the highest IoU >= 0.5
  with the referred box. Expressions without such a region are counted (``unmatched``); in the training
  split they are dropped, elsewhere they stay and are misses (no region could be right). A prediction is
  correct when its box has IoU >= 0.5 with the referred box (the RefCOCO protocol). Metric ``refcoco_acc``.
* ground truth (``gt_img_db``: the COCO instance boxes of each image, features pooled at those boxes): the
  target is the referred annotation itself (its box, matched by IoU against the store's rows, whose order
  the store does not keep), and a prediction is correct only when it is that annotation. ``refcoco_gt_acc``.

Boxes: the stores hold normalized x1y1x2y2; a RefCOCO bbox is pixel x, y, w, h, normalized with the image's
width and height (``image_sizes``, from the download's IMAGES shards: ``read_image_sizes``). IoU is
scale-invariant, so it is computed on normalized boxes, with continuous (not +1 pixel) areas.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from vlp.data.img_db import ImgDb
from vlp.model.config import UniterConfig
from vlp.model.uniter import UniterModel
from vlp.objectives.common import encode, init_head_weights
from vlp.tasks.common import (
    TaskDataError,
    TaskDataset,
    TaskHead,
    TaskOptions,
    accuracy_counts,
    finish_records,
    read_task_rows,
    require,
    validate_options,
)

Regions = Literal["detected", "gt"]
NO_TARGET = -100  # cross_entropy's ignore_index
METRIC_PREFIX = {"detected": "refcoco", "gt": "refcoco_gt"}


class RefExpOptions(TaskOptions):
    iou_threshold: float = Field(0.5, gt=0.0, le=1.0)
    train_split: str = "train"  # the split whose expressions without a matching detected region are dropped


def box_iou(box: Tensor, boxes: Tensor) -> Tensor:
    """IoU of x1y1x2y2 ``box`` [..., 4] with ``boxes`` [..., N, 4] -> [..., N] (0 where both are empty)."""
    box = box.unsqueeze(-2)
    low = torch.maximum(box[..., :2], boxes[..., :2])
    high = torch.minimum(box[..., 2:], boxes[..., 2:])
    inter = (high - low).clamp_min(0).prod(dim=-1)

    def area(b: Tensor) -> Tensor:
        return (b[..., 2] - b[..., 0]).clamp_min(0) * (b[..., 3] - b[..., 1]).clamp_min(0)

    union = area(box) + area(boxes) - inter
    safe = union.clamp_min(torch.finfo(union.dtype).tiny)
    return torch.where(union > 0, inter / safe, torch.zeros_like(inter))


def match_region(ref_box: Tensor, region_boxes: Tensor, threshold: float) -> tuple[int, float]:
    """(index of the region with the highest IoU with ``ref_box`` if that IoU >= threshold else NO_TARGET,
    that IoU); ties go to the first region (the store's most confident one)."""
    if len(region_boxes) == 0:
        return NO_TARGET, 0.0
    iou = box_iou(ref_box, region_boxes)
    best = int(iou.argmax())
    return (best if iou[best] >= threshold else NO_TARGET), float(iou[best])


def normalized_xyxy(bbox: Iterable[float], width: int, height: int) -> list[float]:
    """Pixel x, y, w, h -> x1, y1, x2, y2 divided by the image width / height."""
    x, y, w, h = bbox
    return [x / width, y / height, (x + w) / width, (y + h) / height]


def coco_instance_boxes(objects_table: Path, keys: Iterable[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """key -> (object ids Int64[N], pixel x1y1x2y2 Float32[N, 4]) of the COCO instances of each image in an
    OBJECTS table, by object id: the boxes a ground-truth region store pools features at.

    Use the download stage's ``tables/objects.parquet``: dedup's copy drops the instances of the COCO images
    it removes from pretraining, and those include RefCOCO's val / test images.
    """
    path = Path(objects_table)
    wanted = sorted(set(keys))
    try:
        table = pq.read_table(path, columns=["corpus", "image_key", "object_id", "x", "y", "w", "h"])
    except FileNotFoundError:
        raise TaskDataError(f"{path}: objects table not found") from None
    except (OSError, pa.ArrowInvalid) as err:
        raise TaskDataError(f"{path}: cannot read ({' '.join(str(err).split())})") from None
    in_keys = pc.is_in(table["image_key"], pa.array(wanted, pa.string()))
    mask = pc.and_(pc.equal(table["corpus"], "coco"), in_keys)
    rows = table.filter(mask).sort_by("object_id").to_pylist()
    by_image: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_image[row["image_key"]].append(row)
    out = {}
    for key in wanted:
        objects = by_image.get(key, [])
        ids = np.asarray([o["object_id"] for o in objects], dtype=np.int64)
        boxes = np.asarray([[o["x"], o["y"], o["x"] + o["w"], o["y"] + o["h"]] for o in objects],
                           dtype=np.float32).reshape(-1, 4)
        out[key] = (ids, boxes)
    return out


class RefExpDataset(TaskDataset):
    def __init__(self, *args: Any, regions: Regions, unmatched: list[str], dropped_unmatched: bool,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.regions = regions
        self.unmatched = unmatched  # ids of expressions without a region at IoU >= threshold
        self.dropped_unmatched = dropped_unmatched

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.example(i, self.records[i]["img_keys"][0])

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().collate(examples)
        records = [self.records[ex["index"]] for ex in examples]
        batch["targets"] = torch.tensor([r["target"] for r in records], dtype=torch.long)
        batch["ref_boxes"] = torch.tensor([r["ref_box"] for r in records], dtype=torch.float32)
        batch["ref_ids"] = [r["ref_id"] for r in records]
        batch["regions"] = self.regions
        return batch


def refexp_hits(scores: Tensor, region_boxes: Tensor, ref_boxes: Tensor, targets: Tensor, regions: Regions,
                threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """(predicted region Long[B], IoU of its box with the referred box Float[B], correct Bool[B]).

    Detected regions: correct when that IoU >= threshold. Ground truth: correct when the prediction is the
    target (the referred annotation); an example without a target is never correct.
    """
    predicted = scores.argmax(dim=1)
    chosen = region_boxes[torch.arange(len(predicted)), predicted]
    iou = box_iou(ref_boxes, chosen.unsqueeze(1)).squeeze(1)
    correct = iou >= threshold if regions == "detected" else (predicted == targets) & (targets != NO_TARGET)
    return predicted, iou, correct


class RefExp(TaskHead):
    name: ClassVar[str] = "refcoco"
    metric: ClassVar[str] = "refcoco_acc"
    Options: ClassVar[type[TaskOptions]] = RefExpOptions

    def __init__(self, encoder_config: UniterConfig, **options: Any):
        super().__init__(encoder_config, **options)
        self.scorer = nn.Linear(encoder_config.hidden_size, 1)
        init_head_weights(self.scorer, encoder_config.initializer_range)

    @classmethod
    def build_data(cls, tables_dir: Path, img_db: ImgDb, tokenizer_dir: Path, split: str, *,
                   image_sizes: Mapping[str, tuple[int, int]], gt_img_db: ImgDb | None = None,
                   objects_table: Path | None = None, skip_missing: bool = False,
                   **options: Any) -> RefExpDataset:
        """The expressions of ``split`` over the detected regions of ``img_db``, or, given ``gt_img_db``,
        over the ground-truth regions stored there (then ``img_db`` is not read), whose count per image is
        checked against the COCO instances in ``objects_table`` (default ``<tables_dir>/objects.parquet``;
        see ``coco_instance_boxes``). ``image_sizes`` (key -> width, height) must cover the split's images."""
        opts: RefExpOptions = validate_options(cls.name, cls.Options, options)
        source, rows = read_task_rows(tables_dir, cls.name, split)
        regions: Regions = "detected" if gt_img_db is None else "gt"
        store = img_db if gt_img_db is None else gt_img_db
        records = []
        for row in rows:
            where = f"{source}: ref {row['ref_id']}"
            bbox = require(row["bbox"], where, "bbox")
            if bbox[2] <= 0 or bbox[3] <= 0:
                raise TaskDataError(f"{where}: field bbox {list(bbox)} has no area")
            sentences = require(row["sentences"], where, "sentences")
            for k, sentence in enumerate(sentences):
                records.append({
                    "id": f"{row['ref_id']}:{k}", "ref_id": row["ref_id"], "bbox": bbox,
                    "img_keys": (require(row["image_key"], where, "image_key"),),
                    "text": require(sentence, where, f"sentences[{k}]"),
                })
        where = f"{source} split {split}"
        records, missing, num_images = finish_records(records, store, tokenizer_dir, opts, where,
                                                      skip_missing)
        boxes = _region_boxes(store, {r["img_keys"][0] for r in records})
        if regions == "gt":
            objects_table = Path(tables_dir) / "objects.parquet" if objects_table is None else objects_table
            _check_gt_counts(store, boxes, coco_instance_boxes(objects_table, boxes), objects_table)
        unmatched = []
        for record in records:
            key = record["img_keys"][0]
            if key not in image_sizes:
                raise TaskDataError(f"{source}: ref {record['ref_id']}: image {key!r} has no width/height in "
                                    "image_sizes")
            record["ref_box"] = normalized_xyxy(record.pop("bbox"), *image_sizes[key])
            ref_box = torch.tensor(record["ref_box"])
            record["target"], best = match_region(ref_box, boxes[key], opts.iou_threshold)
            if record["target"] == NO_TARGET:
                if regions == "gt":
                    raise TaskDataError(f"{store.path}: image {key!r}: no ground-truth region matches ref "
                                        f"{record['ref_id']}'s box (best IoU {best:.3f})")
                unmatched.append(record["id"])
        drop = split == opts.train_split and bool(unmatched)
        if drop:
            records = [r for r in records if r["target"] != NO_TARGET]
            if not records:
                raise TaskDataError(f"{where}: no expression has a detected region at IoU >= "
                                    f"{opts.iou_threshold}; nothing to train on")
        return RefExpDataset(split, source, store, records, missing, num_images, regions=regions,
                             unmatched=unmatched, dropped_unmatched=drop)

    def forward(self, model: UniterModel, batch: dict[str, Any]) -> dict[str, Any]:
        sequence = encode(model, batch)
        img_mask = batch["img_mask"]
        region_out = sequence[:, batch["input_ids"].shape[1]:]
        scores = self.scorer(region_out).squeeze(-1).float()
        scores = scores.masked_fill(~img_mask, torch.finfo(torch.float32).min)
        targets = batch["targets"]
        # Summed over the examples that have a target, so a batch of unmatched ones gives 0, not NaN.
        loss = F.cross_entropy(scores, targets, ignore_index=NO_TARGET, reduction="sum")
        loss = loss / (targets != NO_TARGET).sum().clamp_min(1)
        region_boxes = batch["img_pos_feat"][..., :4].float()
        predicted, iou, correct = refexp_hits(scores, region_boxes, batch["ref_boxes"], targets,
                                              batch["regions"], self.options.iou_threshold)
        chosen = region_boxes[torch.arange(len(predicted)), predicted]
        return {
            "refcoco_loss": loss,
            **accuracy_counts(METRIC_PREFIX[batch["regions"]], correct),
            "predictions": [
                {"id": i, "ref_id": r, "region": p, "box": b, "iou": u, "correct": c}
                for i, r, p, b, u, c in zip(
                    batch["txt_ids"], batch["ref_ids"], predicted.tolist(), chosen.tolist(), iou.tolist(),
                    correct.tolist(), strict=True,
                )
            ],
        }


def _region_boxes(store: ImgDb, keys: Iterable[str]) -> dict[str, Tensor]:
    """key -> the normalized x1y1x2y2 boxes of the regions the store gives for that image (its box count)."""
    out = {}
    for key in keys:
        norm_bb = store.read_arrays(key)["norm_bb"][: store.name2nbb[key], :4]
        out[key] = torch.from_numpy(np.asarray(norm_bb, dtype=np.float32))
    return out


def _check_gt_counts(store: ImgDb, boxes: Mapping[str, Tensor],
                     instances: Mapping[str, tuple[np.ndarray, np.ndarray]], objects_table: Path) -> None:
    for key, region_boxes in boxes.items():
        expected = len(instances[key][0])
        if len(region_boxes) != expected:
            raise TaskDataError(f"{store.path}: image {key!r} has {len(region_boxes)} ground-truth regions "
                                f"but {objects_table} lists {expected} COCO instances")
