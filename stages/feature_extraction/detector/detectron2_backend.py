"""The detectron2 backend: bottom-up-attention's Visual Genome detector (ResNet-101 C4 + attribute head).

The model is upstream detectron2's C4 Faster R-CNN, changed where the Caffe original differs: Caffe's
max pool in the stem (no padding, rounding up), a 512-channel RPN conv, RoIPool 14x14, res5 run at
stride 1 with dilation 2, and an attribute head that reads the pooled 2048-d feature together with an
embedding of the predicted class. Regions are 2048-d res5 features averaged over the 14x14 grid.

Weight files, as published converted from the Caffe model (both hold detectron2 parameter names):
- airsplay/py-bottom-up-attention's ``faster_rcnn_from_caffe_attr.pkl``: background and "no
  attribute" are the last class / attribute, box deltas for the foreground classes only;
- MILVLG/bottom-up-attention.pytorch's ``bua-caffe-frcn-r101_with_attributes.pth``: background and
  "no attribute" first, box deltas for every class including background, attribute layers named
  ``cls_embed`` / ``attr_linear1`` / ``attr_linear2``.
A ``.pkl`` is unpickled as detectron2 does, so only load files from sources you trust.

detectron2 is imported lazily: the rest of the pipeline runs without it.
"""

from __future__ import annotations

import pickle
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stages.base import StageError
from stages.feature_extraction.detector.backend import Detections
from stages.feature_extraction.detector.config import DetectorConfig
from stages.feature_extraction.detector.selection import select_regions

INSTALL_HINT = (
    "features.detector.backend=detectron2 needs detectron2, which is not installed: install it from its "
    "official source with `pip install 'git+https://github.com/facebookresearch/detectron2.git'` (or "
    "`pip install -e .` in a clone of it), built against the installed torch and, for GPUs, with a CUDA "
    "toolkit matching torch.version.cuda"
)
FEATURE_DIM = 2048
_CAFFE_PIXEL_MEAN_BGR = [102.9801, 115.9465, 122.7717]
# MILVLG's names for the attribute layers -> ours (= airsplay's)
_CAFFE_LAYOUT_NAMES = {
    "cls_embed.": "cls_embedding.",
    "attr_linear1.": "fc_attr.",
    "attr_linear2.": "attr_score.",
}
_PREDICTOR = "roi_heads.box_predictor."


def _require_detectron2() -> None:
    try:
        import detectron2  # noqa: F401
    except ImportError:
        raise StageError(INSTALL_HINT) from None


class AttributePredictor(nn.Module):
    """Class scores, class-specific box deltas and attribute scores from a pooled region feature."""

    def __init__(self, num_classes: int, num_attributes: int, background_first: bool) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.background_first = background_first
        self.cls_score = nn.Linear(FEATURE_DIM, num_classes + 1)
        # the Caffe layout regresses a box for the background class too
        self.bbox_pred = nn.Linear(FEATURE_DIM, 4 * (num_classes + int(background_first)))
        self.cls_embedding = nn.Embedding(num_classes + 1, FEATURE_DIM // 8)
        self.fc_attr = nn.Linear(FEATURE_DIM + FEATURE_DIM // 8, FEATURE_DIM // 4)
        self.attr_score = nn.Linear(FEATURE_DIM // 4, num_attributes + 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(class probabilities with background in column 0, foreground deltas (R, C*4), attribute
        probabilities without the "no attribute" column)."""
        logits = self.cls_score(x)
        # the attribute head was trained on the embedding of the argmax class, background included
        attr = self.attr_score(F.relu(self.fc_attr(torch.cat([x, self.cls_embedding(logits.argmax(1))], 1))))
        probs, attr_probs = F.softmax(logits.float(), -1), F.softmax(attr.float(), -1)
        deltas = self.bbox_pred(x).float()
        if self.background_first:
            return probs, deltas[:, 4:], attr_probs[:, 1:]
        return torch.cat([probs[:, -1:], probs[:, :-1]], 1), deltas, attr_probs[:, :-1]


def _caffe_max_pool_stem(stem: nn.Module) -> None:
    """Make detectron2's stem pool as Caffe did (kernel 3, stride 2, no padding, rounding up)."""

    class CaffeStem(type(stem)):
        def forward(self, x: Tensor) -> Tensor:
            return F.max_pool2d(F.relu_(self.conv1(x)), kernel_size=3, stride=2, padding=0, ceil_mode=True)

    stem.__class__ = CaffeStem


def build_butd_model(cfg: DetectorConfig, background_first: bool, device: str) -> nn.Module:
    """bottom-up-attention's R101-C4 attribute detector on upstream detectron2, randomly initialised."""
    _require_detectron2()
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    d2 = cfg.detectron2
    c = get_cfg()
    c.MODEL.DEVICE = device
    c.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    c.MODEL.MASK_ON = False
    c.MODEL.PIXEL_MEAN, c.MODEL.PIXEL_STD = _CAFFE_PIXEL_MEAN_BGR, [1.0, 1.0, 1.0]
    c.INPUT.FORMAT = "BGR"
    c.MODEL.BACKBONE.NAME = "build_resnet_backbone"
    c.MODEL.RESNETS.DEPTH = 101
    c.MODEL.RESNETS.OUT_FEATURES = ["res4"]
    c.MODEL.RESNETS.NORM = "FrozenBN"
    c.MODEL.RESNETS.STRIDE_IN_1X1 = True
    c.MODEL.PROPOSAL_GENERATOR.NAME = "RPN"
    c.MODEL.RPN.IN_FEATURES = ["res4"]
    c.MODEL.RPN.CONV_DIMS = [512]
    c.MODEL.RPN.PRE_NMS_TOPK_TEST = d2.rpn_pre_nms_top_n
    c.MODEL.RPN.POST_NMS_TOPK_TEST = cfg.rpn_post_nms_top_n
    c.MODEL.RPN.NMS_THRESH = 0.7
    c.MODEL.ANCHOR_GENERATOR.SIZES = [[64, 128, 256, 512]]
    c.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.5, 1.0, 2.0]]
    c.MODEL.ROI_HEADS.NAME = "Res5ROIHeads"
    c.MODEL.ROI_HEADS.IN_FEATURES = ["res4"]
    c.MODEL.ROI_HEADS.NUM_CLASSES = d2.num_classes
    c.MODEL.ROI_BOX_HEAD.POOLER_TYPE = "ROIPool"
    c.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 14
    model = build_model(c)
    _caffe_max_pool_stem(model.backbone.stem)
    res5 = model.roi_heads.res5
    res5[0].conv1.stride = res5[0].shortcut.stride = (1, 1)
    for block in res5:
        block.conv2.padding, block.conv2.dilation = (2, 2), (2, 2)
    model.roi_heads.box_predictor = AttributePredictor(d2.num_classes, d2.num_attributes, background_first)
    return model.to(device).eval()


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    try:
        if path.suffix == ".pkl":
            with open(path, "rb") as f:
                data = pickle.load(f, encoding="latin1")
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle and torch raise many types for foreign files
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise StageError(f"{path}: not a readable detectron2 weight file ({reason})") from None
    state = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not state:
        raise StageError(f"{path}: not a detectron2 weight file (no 'model' state dict inside)")
    return {k: torch.as_tensor(np.asarray(v)) if not isinstance(v, Tensor) else v for k, v in state.items()}


def _canonical(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], bool]:
    """The state dict under our parameter names, and whether it is in the Caffe (MILVLG) layout."""
    caffe = f"{_PREDICTOR}cls_embed.weight" in state
    if not caffe:
        return state, False
    renamed = {}
    for key, value in state.items():
        for old, new in _CAFFE_LAYOUT_NAMES.items():
            key = key.replace(_PREDICTOR + old, _PREDICTOR + new)
        renamed[key] = value
    return renamed, True


def _load_checked(model: nn.Module, state: dict[str, Tensor], path: Path) -> None:
    expected = model.state_dict()
    fields = {"cls_score": "num_classes", "bbox_pred": "num_classes", "cls_embedding": "num_classes",
              "attr_score": "num_attributes"}  # fmt: skip
    for key, tensor in expected.items():
        if key in ("pixel_mean", "pixel_std"):
            continue
        if key not in state:
            raise StageError(
                f"{path}: weights lack parameter {key!r}: not a bottom-up-attention R101-C4 attribute model"
            )
        if tuple(state[key].shape) != tuple(tensor.shape):
            layer = key.removeprefix(_PREDICTOR).split(".")[0]
            hint = f" (check features.detector.detectron2.{fields[layer]})" if layer in fields else ""
            raise StageError(
                f"{path}: weights do not match the model: {key} has shape {tuple(state[key].shape)} in the "
                f"file but {tuple(tensor.shape)} in the model{hint}"
            )
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)


def _vocabulary(path: str | None, size: int, kind: str) -> list[str]:
    """Names from a bottom-up-attention vocabulary file (one entry a line, synonyms after commas)."""
    if path is None:
        return [f"{kind}_{i}" for i in range(size)]
    try:
        names = [
            line.split(",")[0].strip().lower() for line in Path(path).read_text().splitlines() if line.strip()
        ]
    except OSError as err:
        raise StageError(f"{path}: cannot read the {kind} vocabulary ({err.strerror})") from None
    if len(names) != size:
        field = "num_classes" if kind == "class" else "num_attributes"
        raise StageError(
            f"{path}: {len(names)} {kind} names but features.detector.detectron2.{field} is {size}"
        )
    return names


class Detectron2Backend:
    feature_dim = FEATURE_DIM

    def __init__(
        self,
        cfg: DetectorConfig,
        model: nn.Module,
        class_names: list[str],
        attr_names: list[str],
        device: str,
    ) -> None:
        from detectron2.modeling.box_regression import Box2BoxTransform

        self.cfg = cfg
        self.model = model
        self.device = torch.device(device)
        self.class_names = class_names
        self.attr_names = attr_names
        self.box_transform = Box2BoxTransform(weights=(10.0, 10.0, 5.0, 5.0))

    @classmethod
    def from_weights(cls, cfg: DetectorConfig, path: Path, device: str = "cpu") -> Detectron2Backend:
        _require_detectron2()
        d2 = cfg.detectron2
        classes = _vocabulary(d2.classes_file, d2.num_classes, "class")
        attributes = _vocabulary(d2.attributes_file, d2.num_attributes, "attribute")
        state, caffe_layout = _canonical(_read_state_dict(path))
        model = build_butd_model(cfg, background_first=caffe_layout, device=device)
        _load_checked(model, state, path)
        return cls(cfg, model, classes, attributes, device)

    def _autocast(self):
        if self.cfg.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _prepare(self, images: list[np.ndarray]):
        """Resized BGR tensors batched as detectron2 wants them, and each image's scale factor."""
        from detectron2.structures import ImageList

        d2, model = self.cfg.detectron2, self.model
        tensors, scales = [], []
        for img in images:
            h, w = img.shape[:2]
            scale = min(d2.min_size / min(h, w), d2.max_size / max(h, w))
            x = torch.tensor(img[:, :, ::-1].copy(), device=self.device).permute(2, 0, 1).float()
            size = (max(1, round(h * scale)), max(1, round(w * scale)))
            x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
            tensors.append((x - model.pixel_mean) / model.pixel_std)
            scales.append(torch.tensor([size[1] / w, size[0] / h] * 2, device=self.device))
        batch = ImageList.from_tensors(tensors, model.backbone.size_divisibility)
        with self._autocast():
            features = {k: v.float() for k, v in model.backbone(batch.tensor).items()}
        return batch, features, scales

    def _describe(self, features: dict[str, Tensor], boxes: list[Tensor]):
        from detectron2.structures import Boxes

        heads = self.model.roi_heads
        with self._autocast():
            pooled = heads.res5(
                heads.pooler([features[f] for f in heads.in_features], [Boxes(b) for b in boxes])
            )
            pooled = pooled.mean(dim=(2, 3))
            probs, deltas, attrs = heads.box_predictor(pooled)
        return pooled.float(), probs, deltas, attrs

    def _detections(self, boxes: list[Tensor], features, scales) -> list[Detections]:
        counts = [len(b) for b in boxes]
        pooled, probs, _, attrs = self._describe(features, boxes)
        out = []
        for b, f, p, a, s in zip(
            boxes, pooled.split(counts), probs.split(counts), attrs.split(counts), scales, strict=True
        ):
            soft = p.cpu().numpy().astype(np.float32)
            out.append(
                Detections(
                    boxes=(b / s).cpu().numpy().astype(np.float32),
                    features=f.cpu().numpy().astype(np.float32),
                    conf=soft[:, 1:].max(axis=1) if len(soft) else np.zeros(0, np.float32),
                    soft_labels=soft,
                    attr_labels=a.cpu().numpy().astype(np.float32),
                )
            )
        return out

    # One image per forward pass, as in the torchvision backend: padding to a batch's largest image would
    # make an image's regions depend on its batch mates.
    def detect(self, images: list[np.ndarray]) -> list[Detections]:
        return [self._detect_batch([image])[0] for image in images]

    def pool(self, images: list[np.ndarray], boxes: list[np.ndarray]) -> list[Detections]:
        return [self._pool_batch([image], [b])[0] for image, b in zip(images, boxes, strict=True)]

    def _detect_batch(self, images: list[np.ndarray]) -> list[Detections]:
        with torch.inference_mode():
            batch, features, scales = self._prepare(images)
            proposals, _ = self.model.proposal_generator(batch, features, None)
            boxes = [p.proposal_boxes.tensor for p in proposals]
            _, probs, deltas, _ = self._describe(features, boxes)
            final = []
            counts = [len(b) for b in boxes]
            for b, p, d, size in zip(
                boxes, probs.split(counts), deltas.split(counts), batch.image_sizes, strict=True
            ):
                class_boxes = self.box_transform.apply_deltas(d, b).view(len(b), d.shape[1] // 4, 4)
                class_boxes[..., 0::2] = class_boxes[..., 0::2].clamp(0, size[1])
                class_boxes[..., 1::2] = class_boxes[..., 1::2].clamp(0, size[0])
                final.append(select_regions(p[:, 1:], class_boxes, self.cfg))
            return [d.sorted_by_conf() for d in self._detections(final, features, scales)]

    def _pool_batch(self, images: list[np.ndarray], boxes: list[np.ndarray]) -> list[Detections]:
        with torch.inference_mode():
            batch, features, scales = self._prepare(images)
            given = [
                torch.as_tensor(np.asarray(b, np.float32).reshape(-1, 4), device=self.device) for b in boxes
            ]
            out = self._detections([g * s for g, s in zip(given, scales, strict=True)], features, scales)
        for det, b in zip(out, boxes, strict=True):
            det.boxes = np.asarray(b, np.float32).reshape(-1, 4)  # exactly as given
        return out
