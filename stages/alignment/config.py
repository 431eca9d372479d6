"""Config of the ``alignment`` stage (section ``alignment``): the object-word alignment annotations."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# GQA's evaluation splits: never a source of pretraining annotations.
GQA_EVALUATION_SPLITS = ("val", "testdev", "test", "challenge", "submission")


class AlignmentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # vg_regions: Visual Genome region descriptions joined with "and"; gqa: GQA's question / full-answer
    # pointers (used when the download holds GQA: configs/gqa.yaml)
    sources: list[Literal["vg_regions", "gqa"]] = ["vg_regions", "gqa"]
    max_descriptions: int = Field(3, ge=1)  # descriptions per VG sentence: 1..this (the paper: 1-3)
    # VG sentences per image (None: every description once)
    sentences_per_image: int | None = Field(None, ge=1)
    gqa_splits: list[str] = ["train"]  # GQA splits whose pointers become annotations
    # Word vectors for the semantic criterion: a file in GloVe's text format (glove.6B.300d.txt for real
    # runs); None: exact name matching (the demo world's class and attribute names are literal words).
    word_vectors: str | None = None
    norm: Literal["sum", "max"] = "sum"  # norm_j of the soft target (vlp.objectives.owa.normalize_rows)
    seed: int = 0  # the draw of which VG descriptions form a sentence (data, like world.seed)

    @field_validator("gqa_splits")
    @classmethod
    def _training_splits_only(cls, splits: list[str]) -> list[str]:
        evaluation = sorted(set(splits) & set(GQA_EVALUATION_SPLITS))
        if evaluation:
            raise ValueError(f"{evaluation} are GQA evaluation splits: annotations come from pretraining "
                             "images only")
        return splits
