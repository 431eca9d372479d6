"""Configuration of the UNITER encoder: validated once, stored next to every checkpoint's weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# Sizes of the published configurations. "tiny" is the shape of Google's BERT-mini (L4 H256 A4 I1024, a
# released WordPiece checkpoint, so init_from_bert has a real source at that size). With ~3 M encoder
# parameters a training step over a demo batch (~2k input units, 512-d regions) costs about 0.5 s of one
# CPU core under bf16 autocast (0.8 s in fp32), which two 1-core Ray workers on the demo machine can
# afford for hundreds of steps, while four layers of four heads leave room for the cross-modal attention
# that ITM and retrieval need.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}


class UniterConfig(BaseModel):
    # Frozen: a built model keeps its config, and a config edited afterwards would describe other weights.
    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int = Field(30522, gt=0)  # BERT uncased WordPiece; the demo passes its own vocab's size
    hidden_size: int = Field(768, gt=0)
    num_hidden_layers: int = Field(12, gt=0)
    num_attention_heads: int = Field(12, gt=0)
    intermediate_size: int = Field(3072, gt=0)
    hidden_dropout_prob: float = Field(0.1, ge=0.0, lt=1.0)
    attention_probs_dropout_prob: float = Field(0.1, ge=0.0, lt=1.0)
    max_position_embeddings: int = Field(512, gt=0)
    type_vocab_size: int = Field(2, ge=2)  # text is type 0, images type 1 (NLVR2's second image may add 2)
    initializer_range: float = Field(0.02, gt=0.0)
    layer_norm_eps: float = Field(1e-12, gt=0.0)
    img_dim: int = Field(2048, gt=0)  # region feature size: 2048 for BUTD Faster R-CNN, 512 for the demo
    pos_dim: int = Field(7, gt=0)  # [x1, y1, x2, y2, w, h, w*h], normalised by the image size
    # A masked region's feature: zeros (the UNITER paper, Section 3.1) or zeros plus a learned img_dim vector
    # (the official code's mask_embedding, model/model.py UniterImageEmbeddings).
    img_mask_embedding: bool = False
    # Align before fuse (ALBEF, CODIS): the first fusion_start layers attend within each modality only (text
    # to text, regions to regions: block-diagonal attention), the rest across both. 0 is UNITER (every layer
    # fuses). The unimodal stage shares its weights with the fusion stage (ALBEF has separate encoders).
    fusion_start: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> UniterConfig:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.fusion_start >= self.num_hidden_layers:
            raise ValueError(
                f"fusion_start {self.fusion_start} leaves no fusion layer of the {self.num_hidden_layers} "
                f"(it must be below num_hidden_layers)"
            )
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> UniterConfig:
        """A named size ("tiny", "base", "large"); any other field may be overridden, e.g. img_dim=512."""
        if name not in PRESETS:
            raise ValueError(f"unknown UNITER preset {name!r} (choose one of {', '.join(PRESETS)})")
        try:
            return cls.model_validate({**PRESETS[name], **overrides})
        except ValidationError as err:
            raise ValueError(f"UNITER preset {name!r}: {_one_line(err)}") from None

    def to_json_file(self, path: Path) -> None:
        path.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")

    @classmethod
    def from_json_file(cls, path: Path) -> UniterConfig:
        try:
            return cls.model_validate_json(path.read_bytes())
        except OSError as err:
            raise ValueError(f"{path}: cannot read the model config ({err.strerror})") from None
        except ValidationError as err:
            raise ValueError(f"{path}: {_one_line(err)}") from None


def _one_line(err: ValidationError) -> str:
    problems = []
    for item in err.errors():
        field = ".".join(str(p) for p in item["loc"]) or "config"
        if item["type"] == "extra_forbidden":
            problems.append(f"unknown field {field!r}")
        else:
            problems.append(f"{field}: {item['msg']}")
    return "; ".join(problems)
