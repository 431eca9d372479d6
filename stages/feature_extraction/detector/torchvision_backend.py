"""The torchvision backend: ``RegionDetector`` behind the ``DetectorBackend`` interface, and its weight file.

A weight file is a torch checkpoint ``{"format", "arch", "class_names", "attr_names", "state_dict"}``:
the architecture fields of the config it was built with (``ARCH_FIELDS``) and its vocabularies travel
with the weights, so a file can be checked against the config before anything runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from stages.base import StageError
from stages.feature_extraction.detector.backend import Detections
from stages.feature_extraction.detector.config import ARCH_FIELDS, DetectorConfig
from stages.feature_extraction.detector.model import RegionDetector

CHECKPOINT_FORMAT = "vlp-torchvision-detector/1"


def arch_of(cfg: DetectorConfig) -> dict:
    dumped = cfg.model_dump(mode="json")
    return {name: dumped[name] for name in ARCH_FIELDS}


def save_checkpoint(
    path: Path, cfg: DetectorConfig, model: RegionDetector, class_names: list[str], attr_names: list[str]
) -> None:
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "arch": arch_of(cfg),
            "class_names": list(class_names),
            "attr_names": list(attr_names),
            "state_dict": model.state_dict(),
        },
        path,
    )


def read_checkpoint(cfg: DetectorConfig, path: Path) -> dict:
    """The checkpoint at ``path``, after checking that it was made for ``cfg``'s architecture."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt / foreign files
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise StageError(f"{path}: not a readable torch checkpoint ({reason})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise StageError(
            f"{path}: not a torchvision detector weight file (field 'format': expected "
            f"{CHECKPOINT_FORMAT!r}, found {found!r}); a detectron2 file needs features.detector.backend="
            "detectron2"
        )
    stored, wanted = ckpt["arch"], arch_of(cfg)
    for name in ARCH_FIELDS:
        if stored.get(name) != wanted[name]:
            raise StageError(
                f"{path}: weights do not match the config: features.detector.{name} is {wanted[name]!r} "
                f"but the weights were trained with {stored.get(name)!r}"
            )
    return ckpt


def _to_tensor(image: np.ndarray, device: torch.device) -> torch.Tensor:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got shape {image.shape} dtype {image.dtype}")
    # a copy: decoded images are often read-only views, which torch.from_numpy refuses to share
    return torch.tensor(image, device=device).permute(2, 0, 1).float().div_(255)


def _to_detections(out: dict[str, torch.Tensor]) -> Detections:
    soft = out["soft_labels"].cpu().numpy().astype(np.float32)
    return Detections(
        boxes=out["boxes"].cpu().numpy().astype(np.float32),
        features=out["features"].cpu().numpy().astype(np.float32),
        conf=soft[:, 1:].max(axis=1) if soft.shape[0] else np.zeros(0, np.float32),
        soft_labels=soft,
        attr_labels=out["attr_labels"].cpu().numpy().astype(np.float32),
    )


class TorchvisionBackend:
    def __init__(
        self,
        cfg: DetectorConfig,
        model: RegionDetector,
        class_names: list[str],
        attr_names: list[str],
        device: str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.feature_dim = cfg.feature_dim
        self.class_names = list(class_names)
        self.attr_names = list(attr_names)

    @classmethod
    def from_checkpoint(cls, cfg: DetectorConfig, path: Path, device: str = "cpu") -> TorchvisionBackend:
        ckpt = read_checkpoint(cfg, path)
        model = RegionDetector(cfg, len(ckpt["class_names"]), len(ckpt["attr_names"]))
        try:
            model.load_state_dict(ckpt["state_dict"])
        except RuntimeError as err:
            detail = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
            raise StageError(f"{path}: weights do not fit the detector ({detail})") from None
        return cls(cfg, model, ckpt["class_names"], ckpt["attr_names"], device)

    # One image per forward pass: batched images are padded to the largest of them, and the padding
    # reaches every image's feature map (convolution borders, the RPN's anchors), so a batched image's
    # regions would depend on which images Ray Data happened to put beside it.
    def detect(self, images: list[np.ndarray]) -> list[Detections]:
        with torch.inference_mode():
            outs = [self.model.detect([_to_tensor(img, self.device)])[0] for img in images]
        return [_to_detections(o).sorted_by_conf() for o in outs]

    def pool(self, images: list[np.ndarray], boxes: list[np.ndarray]) -> list[Detections]:
        outs = []
        with torch.inference_mode():
            for img, b in zip(images, boxes, strict=True):
                given = torch.as_tensor(np.asarray(b, dtype=np.float32).reshape(-1, 4), device=self.device)
                outs.append(self.model.pool([_to_tensor(img, self.device)], [given])[0])
        return [_to_detections(o) for o in outs]
