"""The model pretraining optimizes: the UNITER encoder plus one objective module (heads) per task, and the
config of both (the encoder size and the objectives' options are stored with every pretrained model)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from vlp.model import UniterConfig, UniterModel, init_from_bert
from vlp.objectives import REGISTRY
from vlp.objectives.itc import ITC
from vlp.objectives.itm import ITM
from vlp.objectives.mlm import MLM
from vlp.objectives.mrm import MaskedRegionObjective
from vlp.objectives.owa import ObjectWordAlignment


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    size: Literal["tiny", "base", "large"] = "tiny"
    # Local Hugging Face BERT dir whose text embeddings, layers and pooler initialise the encoder (its
    # vocab must be the txt_db tokenizer's). None: random initialisation.
    init_from_bert: str | None = None
    # Hidden and attention dropout; None keeps the preset's (0.1).
    dropout: float | None = Field(None, ge=0.0, lt=1.0)
    # A masked region's feature: zeros (the paper) or zeros + a learned vector (the official code);
    # vlp.model.embeddings.ImageEmbeddings.
    masked_region: Literal["zeros", "learned"] = "zeros"


class ObjectivesConfig(BaseModel):
    """The pretraining tasks, their mix and their options."""

    model_config = ConfigDict(extra="forbid")

    # Task -> mix ratio; one task per optimizer step, drawn by these ratios (UNITER's best mix).
    tasks: dict[str, float] = {"mlm": 2.0, "mrfr": 1.0, "mrc_kl": 1.0, "itm": 2.0}
    masking: Literal["conditional", "joint"] = "conditional"
    mask_prob: float = Field(0.15, gt=0, le=1)
    itm_neg_prob: float = Field(0.5, ge=0, le=1)
    # Where ITM's negative images come from: corpus = any other image of the caption's text db, redrawn each
    # epoch (UNITER's ItmDataset; the paper: "a randomly-selected one from other samples"); batch = another
    # example's image in the same batch. Validation ITM always uses in-batch donors (vlp.objectives.itm).
    itm_negatives: Literal["corpus", "batch"] = "corpus"
    wra: bool = True  # word-region alignment (optimal transport) alongside ITM
    wra_weight: float = Field(0.1, ge=0)
    wra_beta: float = Field(0.5, gt=0)
    wra_iters: int = Field(50, ge=1)
    itc_dim: int = Field(256, ge=1)  # ITC's projection size (ALBEF, CODIS: 256)
    itc_temperature: float = Field(0.07, ge=1e-3, le=0.5)  # its initial (learnable) temperature
    # WRA's text side: the words (the paper) or every text token incl. [CLS] / [SEP] (the official code).
    wra_cls_sep: bool = False
    # MRC-kl: KL per region averaged over regions (the paper) or also / (C+1) (element: the official code).
    mrc_kl_norm: Literal["region", "element"] = "region"
    # Object-word alignment (task owa, vlp.objectives.owa; its batches come from the alignment stage): the
    # top-k of each word's region distribution (the paper: 3), the KL's support (full: over all regions, the
    # top-k only for prediction; topk: the target restricted to the top-k) and the loss weight (the paper: 1).
    owa_k: int = Field(3, ge=1)
    owa_support: Literal["full", "topk"] = "full"
    owa_weight: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _known_tasks(self) -> ObjectivesConfig:
        unknown = sorted(set(self.tasks) - set(REGISTRY))
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; choose from {sorted(REGISTRY)}")
        if not self.tasks or any(r <= 0 for r in self.tasks.values()):
            raise ValueError(f"tasks must map at least one task to a ratio > 0, got {self.tasks}")
        return self


class PretrainModel(nn.Module):
    """``forward(task, batch)`` runs one objective; a single module so that DDP sees every parameter."""

    def __init__(self, encoder: UniterModel, objectives: Mapping[str, nn.Module]):
        super().__init__()
        self.encoder = encoder
        self.objectives = nn.ModuleDict(dict(objectives))

    def forward(self, task: str, batch: dict) -> dict[str, Tensor]:
        return self.objectives[task](self.encoder, batch)


def encoder_config(model: ModelConfig, vocab_size: int, img_dim: int) -> UniterConfig:
    over: dict[str, Any] = {"vocab_size": vocab_size, "img_dim": img_dim,
                            "img_mask_embedding": model.masked_region == "learned"}
    if model.dropout is not None:
        over |= {"hidden_dropout_prob": model.dropout, "attention_probs_dropout_prob": model.dropout}
    return UniterConfig.preset(model.size, **over)


def objective_options(cfg: ObjectivesConfig, meta: Mapping[str, Any], label_dim: int) -> dict[str, dict]:
    """Constructor options of each configured task's objective (JSON-able, saved with the heads), from the
    config and the text dbs' meta.json (special token ids, vocabulary range)."""
    tokens = {
        "mask_id": int(meta["MASK"]),
        "special_ids": sorted({int(meta[k]) for k in ("CLS", "SEP", "MASK", "UNK", "PAD") if k in meta}),
        "vocab_range": [int(v) for v in meta["v_range"]],
    }
    masked = {"mask_prob": cfg.mask_prob, "masking": cfg.masking, **tokens}
    by_task = {
        "mlm": masked,
        "mrfr": masked,
        "mrc": {**masked, "label_dim": label_dim},
        "mrc_kl": {**masked, "label_dim": label_dim, "kl_norm": cfg.mrc_kl_norm},
        "itm": {"neg_prob": cfg.itm_neg_prob, "wra": cfg.wra, "wra_beta": cfg.wra_beta,
                "wra_iters": cfg.wra_iters, "wra_cls_sep": cfg.wra_cls_sep},
        "itc": {"embed_dim": cfg.itc_dim, "temperature": cfg.itc_temperature},
        "owa": {"k": cfg.owa_k, "support": cfg.owa_support},
    }
    return {task: by_task[task] for task in sorted(cfg.tasks)}


def build_model(ucfg: UniterConfig, options: Mapping[str, dict],
                init_bert: str | None = None) -> PretrainModel:
    encoder = UniterModel(ucfg)
    if init_bert is not None:
        init_from_bert(encoder, init_bert)
    objectives = {}
    for task, opts in options.items():
        kwargs = dict(opts)
        if "vocab_range" in kwargs:
            kwargs["vocab_range"] = tuple(kwargs["vocab_range"])
        objectives[task] = REGISTRY[task](encoder, **kwargs)
    return PretrainModel(encoder, objectives)


def loss_weights(cfg: ObjectivesConfig) -> dict[str, float]:
    """Weight of each ``*_loss`` an objective returns (1 unless listed)."""
    return {"wra_loss": cfg.wra_weight, "owa_loss": cfg.owa_weight}


def target_count(objective: nn.Module, batch: dict) -> int:
    """How many targets the objective's losses are averaged over in this (prepared) batch.

    The loop rescales each micro-batch's mean loss by its share of the step's targets over all micro-batches
    and workers, so the gradient is that of the mean over the whole global batch, however it is split.
    """
    if isinstance(objective, MLM):
        return int((batch["txt_labels"] != -100).sum())
    if isinstance(objective, MaskedRegionObjective):
        return int(batch["img_masked"].sum())
    if isinstance(objective, ITM | ITC):
        return len(batch["img_keys"])
    if isinstance(objective, ObjectWordAlignment):
        return int((batch["align_targets"].sum(dim=-1) > 0).sum())
    raise TypeError(f"no target count for objective {type(objective).__name__}")
