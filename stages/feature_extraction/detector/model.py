"""Faster R-CNN with an attribute head, assembled from torchvision's detection parts.

A ResNet-18 trunk with one feature level (the single-level layout of bottom-up-attention's C4 model,
at a size that trains from scratch on 2 CPU cores), torchvision's RPN, RoIAlign and two-layer MLP box
head, and a predictor with class logits, class-specific box regression and attribute logits.

Attributes are multi-label (one sigmoid each): a Visual Genome object carries several attributes at
once (a colour, a size, a texture, ...) and the data does not say which attributes exclude each
other, so no softmax grouping can be derived from it; an object without annotated attributes adds
no attribute loss (unknown, not "none").
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet18
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import clip_boxes_to_image, roi_align

from stages.feature_extraction.detector.config import DetectorConfig
from stages.feature_extraction.detector.selection import select_regions

_IMAGE_MEAN = [0.485, 0.456, 0.406]
_IMAGE_STD = [0.229, 0.224, 0.225]


class _ResNet18Trunk(nn.Sequential):
    """ResNet-18 stem + res2..res3 (stride 8, 128 channels) or + res4 (stride 16, 256 channels)."""

    def __init__(self, last_stage: int) -> None:
        net = resnet18(weights=None)
        stages = [net.layer1, net.layer2, net.layer3][: last_stage - 1]
        super().__init__(net.conv1, net.bn1, net.relu, net.maxpool, *stages)
        self.out_channels = 64 * 2 ** (last_stage - 2)


class _TrunkRoIAlign(nn.Module):
    """RoIAlign on the single trunk map at its known stride.

    torchvision's MultiScaleRoIAlign infers the scale once, from the first batch, by rounding
    feature size / image size to a power of two; a first batch of small images padded to a multiple of 32
    makes that ratio round to the wrong power and every later call would pool the wrong cells.
    """

    def __init__(self, stride: int, output_size: int) -> None:
        super().__init__()
        self.spatial_scale = 1.0 / stride
        self.output_size = output_size

    def forward(self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes) -> Tensor:
        return roi_align(features["0"], boxes, self.output_size, self.spatial_scale, sampling_ratio=0)


class RegionPredictor(nn.Module):
    def __init__(self, feature_dim: int, num_classes: int, num_attributes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(feature_dim, num_classes + 1)
        self.bbox_pred = nn.Linear(feature_dim, 4 * (num_classes + 1))
        self.attr_score = nn.Linear(feature_dim, num_attributes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.cls_score(x), self.bbox_pred(x), self.attr_score(x)


class RegionDetector(nn.Module):
    """Images are float CHW tensors in [0, 1]; boxes are x1y1x2y2 in pixels of those images."""

    def __init__(self, cfg: DetectorConfig, num_classes: int, num_attributes: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.transform = GeneralizedRCNNTransform(cfg.image_size, cfg.max_image_size, _IMAGE_MEAN, _IMAGE_STD)
        last_stage = {"resnet18_c3": 3, "resnet18_c4": 4}[cfg.backbone]
        self.backbone = _ResNet18Trunk(last_stage)
        anchors = AnchorGenerator((tuple(cfg.anchor_sizes),), (tuple(cfg.aspect_ratios),))
        self.rpn = RegionProposalNetwork(
            anchors,
            RPNHead(self.backbone.out_channels, anchors.num_anchors_per_location()[0]),
            fg_iou_thresh=0.7,
            bg_iou_thresh=0.3,
            batch_size_per_image=256,
            positive_fraction=0.5,
            pre_nms_top_n={"training": cfg.rpn_pre_nms_top_n, "testing": cfg.rpn_pre_nms_top_n},
            post_nms_top_n={"training": cfg.rpn_post_nms_top_n, "testing": cfg.rpn_post_nms_top_n},
            nms_thresh=0.7,
        )
        # RoIHeads supplies torchvision's proposal matching, fg/bg sampling and box coding for training;
        # inference is ours (per-class NMS over all classes + the UNITER box rule).
        self.roi_heads = RoIHeads(
            box_roi_pool=_TrunkRoIAlign(stride=2**last_stage, output_size=cfg.pool_size),
            box_head=TwoMLPHead(self.backbone.out_channels * cfg.pool_size**2, cfg.feature_dim),
            box_predictor=RegionPredictor(cfg.feature_dim, num_classes, num_attributes),
            fg_iou_thresh=0.5,
            bg_iou_thresh=0.5,
            batch_size_per_image=cfg.train.rois_per_image,
            positive_fraction=cfg.train.roi_positive_fraction,
            bbox_reg_weights=None,
            score_thresh=0.0,
            nms_thresh=cfg.nms_threshold,
            detections_per_img=cfg.max_boxes,
        )

    def _autocast(self, device: torch.device):
        if self.cfg.precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _features(self, images: ImageList) -> dict[str, Tensor]:
        with self._autocast(images.tensors.device):
            return {"0": self.backbone(images.tensors).float()}

    def _heads(
        self, features: dict[str, Tensor], boxes: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(representation, class logits, box deltas, attribute logits) for every box of every image."""
        heads = self.roi_heads
        pooled = heads.box_roi_pool(features, boxes, image_sizes)
        with self._autocast(pooled.device):
            rep = heads.box_head(pooled)
            outputs = heads.box_predictor(rep)
        return rep.float(), *(o.float() for o in outputs)

    def losses(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Training losses; targets hold boxes (G, 4), labels (G,) in 1..C, attributes (G, A) 0/1 and
        attr_mask (G,) (True where the object's attributes are annotated)."""
        batch, targets = self.transform(images, targets)
        features = self._features(batch)
        proposals, rpn_losses = self.rpn(batch, features, targets)
        proposals, matched, labels, regression_targets = self.roi_heads.select_training_samples(
            proposals, targets
        )
        _, class_logits, box_deltas, attr_logits = self._heads(features, proposals, batch.image_sizes)
        cls_loss, box_loss = fastrcnn_loss(class_logits, box_deltas, labels, regression_targets)
        # matched indices are 0 for background RoIs, also in an image without objects: pad its targets
        padded = [t if len(t["labels"]) else _one_unknown_object(t) for t in targets]
        attr_targets = torch.cat([t["attributes"][m] for t, m in zip(padded, matched, strict=True)])
        attr_known = torch.cat(
            [t["attr_mask"][m] & (lab > 0) for t, m, lab in zip(padded, matched, labels, strict=True)]
        )
        if attr_known.any():
            attr_loss = (
                F.binary_cross_entropy_with_logits(
                    attr_logits[attr_known], attr_targets[attr_known], reduction="sum"
                )
                / attr_known.sum()
            )
        else:
            attr_loss = attr_logits.sum() * 0.0
        return {
            "loss_objectness": rpn_losses["loss_objectness"],
            "loss_rpn_box": rpn_losses["loss_rpn_box_reg"],
            "loss_classifier": cls_loss,
            "loss_box": box_loss,
            "loss_attributes": attr_loss,
        }

    def _describe(
        self,
        features: dict[str, Tensor],
        boxes: list[Tensor],
        batch: ImageList,
        original_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """Representation, class distribution and attribute probabilities at ``boxes`` (resized frame)."""
        counts = [len(b) for b in boxes]
        rep, class_logits, _, attr_logits = self._heads(features, boxes, batch.image_sizes)
        out = []
        for i, (r, c, a) in enumerate(
            zip(rep.split(counts), class_logits.split(counts), attr_logits.split(counts), strict=True)
        ):
            out.append(
                {
                    "boxes": resize_boxes(boxes[i], batch.image_sizes[i], original_sizes[i]),
                    "features": r,
                    "soft_labels": F.softmax(c, dim=-1),
                    "attr_labels": torch.sigmoid(a),
                }
            )
        return out

    def pool(self, images: list[Tensor], boxes: list[Tensor]) -> list[dict[str, Tensor]]:
        """Describe the given boxes (pixels of the given images), in their order."""
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        batch, _ = self.transform(images)
        features = self._features(batch)
        resized = [
            resize_boxes(b.float(), orig, new)
            for b, orig, new in zip(boxes, original_sizes, batch.image_sizes, strict=True)
        ]
        described = self._describe(features, resized, batch, original_sizes)
        for d, b in zip(described, boxes, strict=True):
            d["boxes"] = b.float()  # exactly the boxes given, not a round trip through the resize
        return described

    def detect(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """UNITER's extraction rule, then the regions are described again at their final boxes."""
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        batch, _ = self.transform(images)
        features = self._features(batch)
        proposals, _ = self.rpn(batch, features)
        _, class_logits, box_deltas, _ = self._heads(features, proposals, batch.image_sizes)
        counts = [len(p) for p in proposals]
        # (R, C+1, 4) class boxes; shaped explicitly so that an image without proposals still works
        decoded = self.roi_heads.box_coder.decode_single(box_deltas, torch.cat(proposals))
        decoded = decoded.reshape(len(decoded), class_logits.shape[1], 4)
        final = [
            select_regions(F.softmax(c, dim=-1)[:, 1:], clip_boxes_to_image(d, size)[:, 1:], self.cfg)
            for c, d, size in zip(
                class_logits.split(counts), decoded.split(counts), batch.image_sizes, strict=True
            )
        ]
        return self._describe(features, final, batch, original_sizes)


def _one_unknown_object(target: dict[str, Tensor]) -> dict[str, Tensor]:
    attributes = target["attributes"]
    return {
        "attributes": attributes.new_zeros(1, attributes.shape[1]),
        "attr_mask": target["attr_mask"].new_zeros(1),
    }
