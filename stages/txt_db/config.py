"""Config of the txtdb stage: which captions become text DBs, and with which tokenizer."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Corpora of the captions table (VG has region descriptions instead, see include_vg_regions).
CaptionCorpus = Literal["coco", "cc", "sbu", "flickr30k"]


class TxtDbConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Local dir of a pretrained BERT WordPiece tokenizer (transformers' save_pretrained layout or a bare
    # vocab.txt); None trains a WordPiece vocab on the texts this stage tokenizes. Never a hub name.
    tokenizer: str | None = None
    # Upper bound of a trained vocab (the demo world's language needs ~360 pieces, so it stays below this).
    vocab_size: int = Field(2000, ge=128)
    # None: lowercase a trained vocab, keep a pretrained dir's own setting (a bare vocab.txt needs it set).
    lowercase: bool | None = None
    # Word pieces kept per text, [CLS]/[SEP] not counted (UNITER's max_txt_len); longer texts are truncated.
    max_txt_len: int = Field(60, ge=1)
    # UNITER pretrains on Visual Genome region descriptions as captions of their image (DB vg_train).
    include_vg_regions: bool = True
    corpora: list[CaptionCorpus] = ["coco", "cc", "sbu", "flickr30k"]

    @model_validator(mode="after")
    def _some_text(self) -> TxtDbConfig:
        if not self.corpora and not self.include_vg_regions:
            raise ValueError("no text source: corpora is empty and include_vg_regions is false")
        if len(set(self.corpora)) != len(self.corpora):
            raise ValueError(f"corpora lists a corpus twice: {self.corpora}")
        return self
