"""The model pretraining optimizes: the UNITER encoder plus one objective module (heads) per task, and the
config of both (the encoder size and the objectives' options are stored with every pretrained model). With
a queue, soft targets or teacher plans configured (``itc_queue``, ``itc_distill``, ``codebook_plans``) the
model also holds a momentum teacher (``vlp.objectives.momentum``): no optimizer sees it, the loop updates it
after every optimizer step (``momentum_update``) and checkpoints save it with the model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from vlp.model import UniterConfig, UniterModel, init_from_bert
from vlp.objectives import REGISTRY
from vlp.objectives import laviter as laviter_lib
from vlp.objectives.codebook import Codebook
from vlp.objectives.damsm import GAMMAS, VTA
from vlp.objectives.itc import ITC, ITCIntra
from vlp.objectives.itm import ITM
from vlp.objectives.laviter import LAViTeR
from vlp.objectives.mlm import MLM
from vlp.objectives.momentum import MomentumTeacher
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
    # Align before fuse: the first fusion_start layers attend within each modality only, the ITC features
    # are taken at that depth ([CLS] / mean of regions); 0 is UNITER. vlp.model.encoder.
    fusion_start: int = Field(0, ge=0)


class DamsmConfig(BaseModel):
    """DAMSM matching (the ``vta`` task, and L_VTA / L_FI / L_FT of ``laviter``): ``vlp.objectives.damsm``."""

    model_config = ConfigDict(extra="forbid")

    dim: int = Field(256, ge=1)  # the projections' size (AttnGAN, LAViTeR: 256)
    gammas: tuple[float, float, float] = Field(GAMMAS)  # γ1 (word attention), γ2 (word sum), γ3 (softmax)
    # The word level's text side: the words (AttnGAN's captions have no [CLS] / [SEP]) or also [CLS] / [SEP].
    cls_sep: bool = False

    @model_validator(mode="after")
    def _positive(self) -> DamsmConfig:
        if min(self.gammas) <= 0:
            raise ValueError(f"gammas must be > 0, got {list(self.gammas)}")
        return self


class LaviterConfig(BaseModel):
    """The ``laviter`` task (``vlp.objectives.laviter``): its loss weights, modules and adversarial step."""

    model_config = ConfigDict(extra="forbid")

    # (λ_TIM, λ_C, λ_FI, λ_FT, λ_VTA) of Eq. 16; the paper's best COCO setting. A part at 0 is not computed:
    # [0, 0, 0, 0, 1] is VTA alone, [0, 0.1, 0, 1, 50] VTA + captioner, [0.01, 0, 1, 0, 50] VTA + generator.
    lambdas: tuple[float, float, float, float, float] = laviter_lib.PAPER_LAMBDAS
    caption_layers: int = Field(2, ge=1)  # captioner decoder layers (the paper's CATR: 6)
    generator_slots: int = Field(10, ge=1)  # regions per generated set (the demo's stores hold 10 per image)
    generator_layers: int = Field(2, ge=1)
    discriminator_layers: int = Field(2, ge=1)
    cond_dim: int = Field(100, ge=1)  # conditioning augmentation's code (AttnGAN: 100)
    noise_dim: int = Field(100, ge=1)  # z (AttnGAN: 100)
    # The discriminator also sees real regions with another example's sentence as fakes (the LAViTeR and
    # AttnGAN code; the paper's Eq. 10 has no such term).
    mismatch: bool = False
    # Weight (x λ_TIM) of feature matching on the discriminator's summary features: a stabiliser beyond the
    # paper, off by default.
    feature_matching: float = Field(0.0, ge=0)
    # The discriminator's own optimizer: Adam (AttnGAN: lr 2e-4, betas (0.5, 0.999)), constant lr, clipped
    # at optim.grad_clip like the rest.
    d_lr: float = Field(2e-4, gt=0)
    d_betas: tuple[float, float] = (0.5, 0.999)

    @model_validator(mode="after")
    def _lambdas(self) -> LaviterConfig:
        laviter_lib.check_lambdas(self.lambdas)
        return self


class ObjectivesConfig(BaseModel):
    """The pretraining tasks, their mix and their options."""

    model_config = ConfigDict(extra="forbid")

    # Task -> mix ratio; one task per optimizer step, drawn by these ratios. UNITER's best mix (mlm 2, mrfr 1,
    # mrc_kl 1, itm 2) plus itc 1: trained from scratch on the demo, ITM alone sat at chance for ~1,000 steps
    # and left it within the 1,500-step budget on some seeds only; the contrastive signal (ALBEF's ITC, which
    # CODIS builds on) aligns the two modalities first. The measurements per seed are in the README.
    tasks: dict[str, float] = {"mlm": 2.0, "mrfr": 1.0, "mrc_kl": 1.0, "itm": 2.0, "itc": 1.0}
    masking: Literal["conditional", "joint"] = "conditional"
    mask_prob: float = Field(0.15, gt=0, le=1)
    itm_neg_prob: float = Field(0.5, ge=0, le=1)
    # Where ITM's negative images come from: corpus = any other image of the caption's text db, redrawn each
    # epoch (UNITER's ItmDataset; the paper: "a randomly-selected one from other samples"); batch = another
    # example's image in the same batch. Validation ITM always uses in-batch donors (vlp.objectives.itm).
    # contrastive = one hard negative image per text and one negative text per image of the batch, drawn by
    # the itc task's similarity (ALBEF, CODIS; needs the itc task). vlp.objectives.itm.
    itm_negatives: Literal["corpus", "batch", "contrastive"] = "corpus"
    wra: bool = True  # word-region alignment (optimal transport) alongside ITM
    wra_weight: float = Field(0.1, ge=0)
    wra_beta: float = Field(0.5, gt=0)
    wra_iters: int = Field(50, ge=1)
    itc_dim: int = Field(256, ge=1)  # ITC's projection size (ALBEF, CODIS: 256)
    itc_temperature: float = Field(0.07, ge=1e-3, le=0.5)  # its initial (learnable) temperature
    # ALBEF / CODIS (vlp.objectives.itc): a queue of the momentum teacher's features of recent batches
    # (gathered from every worker) as extra candidates, 0 = the batch only (CODIS: 65,536; keep it well
    # below the training captions); the weight of the teacher's soft targets against the one-hot positives
    # (ALBEF's alpha_d 0.4; 0 = one-hot only). Either gives the model a momentum teacher.
    itc_queue: int = Field(0, ge=0)
    itc_distill: float = Field(0.0, ge=0, le=1)
    teacher_momentum: float = Field(0.995, ge=0, lt=1)  # the teacher's EMA rate alpha (CODIS Eq. 6)
    # CODIS's codebook (vlp.objectives.codebook): prototypes (the paper: 4,000 on 4M images; keep K well
    # below the training images), the weight of its two losses (Table 4: 0.5x, 2x), the features its
    # transport plans come from, whose plan supervises each modality's prototype prediction (cross: the
    # other modality's, Eq. 2; same: Algorithm 1), and IPOT's beta and iterations (the paper gives none:
    # WRA's).
    codebook_size: int = Field(64, ge=1)
    codebook_weight: float = Field(1.0, ge=0)
    codebook_plans: Literal["teacher", "student"] = "teacher"
    codebook_targets: Literal["cross", "same"] = "cross"
    codebook_beta: float = Field(0.5, gt=0)
    codebook_iters: int = Field(50, ge=1)
    # WRA's text side: the words (the paper) or every text token incl. [CLS] / [SEP] (the official code).
    wra_cls_sep: bool = False
    # MRC-kl: KL per region averaged over regions (the paper) or also / (C+1) (element: the official code).
    mrc_kl_norm: Literal["region", "element"] = "region"
    damsm: DamsmConfig = Field(default_factory=DamsmConfig)
    laviter: LaviterConfig = Field(default_factory=LaviterConfig)
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
        needs_itc = [t for t in ("itc_intra", "codebook") if t in self.tasks]
        if "itm" in self.tasks and self.itm_negatives == "contrastive":
            needs_itc.append("itm with itm_negatives=contrastive")
        if needs_itc and "itc" not in self.tasks:
            raise ValueError(f"{', '.join(needs_itc)} build(s) on the itc task (its projections, temperature "
                             "and queues): add itc to tasks")
        if "itc_intra" in self.tasks and not (self.itc_queue or self.itc_distill):
            raise ValueError("itc_intra contrasts against the momentum teacher's features: set itc_queue > 0 "
                             "or itc_distill > 0")
        return self


class PretrainModel(nn.Module):
    """``forward(task, batch)`` runs one objective; a single module so that DDP sees every parameter.

    ``teacher``: whether to hold the momentum teacher the objectives ask for (``wants_teacher``): an EMA copy
    of the encoder and of the itc task's projections, made at construction (after BERT initialisation),
    without gradient. Objectives marked ``uses_context`` get this model as ``context`` (the teacher, the itc
    task's heads and queues); the others run as they always did."""

    def __init__(self, encoder: UniterModel, objectives: Mapping[str, nn.Module], teacher: bool = True):
        super().__init__()
        self.encoder = encoder
        self.objectives = nn.ModuleDict(dict(objectives))
        wanted = [task for task, o in self.objectives.items() if getattr(o, "wants_teacher", False)]
        self.teacher: MomentumTeacher | None = None
        if wanted and teacher:
            if "itc" not in self.objectives:
                raise ValueError(f"task(s) {wanted} want a momentum teacher, which follows the itc task's "
                                 "projections: add itc")
            self.teacher = MomentumTeacher(self.teacher_students(), self.objectives["itc"].momentum)

    def teacher_students(self) -> dict[str, nn.Module]:
        """The student modules the teacher holds EMA copies of, by the names objectives look them up by."""
        return {"encoder": self.encoder, **self.objectives["itc"].teacher_parts()}

    @torch.no_grad()
    def momentum_update(self) -> None:
        """One EMA step of the teacher toward the current student (a no-op without a teacher)."""
        if self.teacher is not None:
            self.teacher.update(self.teacher_students())

    def forward(self, task: str, batch: dict, adversary: bool = False) -> dict[str, Tensor]:
        """The task's losses; ``adversary``: its discriminator's loss instead (``vlp.train.adversarial``)."""
        objective = self.objectives[task]
        if adversary:
            return objective.discriminator_step(self.encoder, batch)
        if getattr(objective, "uses_context", False):
            return objective(self.encoder, batch, context=self)
        return objective(self.encoder, batch)


def encoder_config(model: ModelConfig, vocab_size: int, img_dim: int) -> UniterConfig:
    over: dict[str, Any] = {"vocab_size": vocab_size, "img_dim": img_dim,
                            "img_mask_embedding": model.masked_region == "learned",
                            "fusion_start": model.fusion_start}
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
                "wra_iters": cfg.wra_iters, "wra_cls_sep": cfg.wra_cls_sep, "negatives": cfg.itm_negatives},
        "itc": {"embed_dim": cfg.itc_dim, "temperature": cfg.itc_temperature, "queue_size": cfg.itc_queue,
                "distill": cfg.itc_distill, "momentum": cfg.teacher_momentum},
        "itc_intra": {},
        "codebook": {"size": cfg.codebook_size, "embed_dim": cfg.itc_dim, "plans": cfg.codebook_plans,
                     "targets": cfg.codebook_targets, "beta": cfg.codebook_beta,
                     "iterations": cfg.codebook_iters},
        "vta": {"embed_dim": cfg.damsm.dim, "gamma1": cfg.damsm.gammas[0], "gamma2": cfg.damsm.gammas[1],
                "gamma3": cfg.damsm.gammas[2], "cls_sep": cfg.damsm.cls_sep},
        "laviter": laviter_options(cfg, meta),
        "owa": {"k": cfg.owa_k, "support": cfg.owa_support},
    }
    return {task: by_task[task] for task in sorted(cfg.tasks)}


def laviter_options(cfg: ObjectivesConfig, meta: Mapping[str, Any]) -> dict[str, Any]:
    lav = cfg.laviter
    # The captioner reads [CLS] + the text (txt_db's max_txt_len word pieces, [CLS] / [SEP] not counted).
    max_len = int(meta.get("max_txt_len", 60)) + 2
    return {"cls_id": int(meta["CLS"]), "sep_id": int(meta["SEP"]), "pad_id": int(meta.get("PAD", 0)),
            "lambdas": list(lav.lambdas), "embed_dim": cfg.damsm.dim, "gammas": list(cfg.damsm.gammas),
            "cls_sep": cfg.damsm.cls_sep, "caption_layers": lav.caption_layers, "caption_max_len": max_len,
            "generator_slots": lav.generator_slots, "generator_layers": lav.generator_layers,
            "cond_dim": lav.cond_dim, "noise_dim": lav.noise_dim,
            "discriminator_layers": lav.discriminator_layers, "mismatch": lav.mismatch,
            "feature_matching": lav.feature_matching}


def build_model(ucfg: UniterConfig, options: Mapping[str, dict],
                init_bert: str | None = None, teacher: bool = True) -> PretrainModel:
    """The encoder and the objectives of ``options``; ``teacher=False`` leaves out the momentum teacher (a
    model loaded for evaluation: its objectives then use the student's features where the teacher's were)."""
    encoder = UniterModel(ucfg)
    if init_bert is not None:
        init_from_bert(encoder, init_bert)
    objectives = {}
    for task, opts in options.items():
        kwargs = dict(opts)
        if "vocab_range" in kwargs:
            kwargs["vocab_range"] = tuple(kwargs["vocab_range"])
        objectives[task] = REGISTRY[task](encoder, **kwargs)
    return PretrainModel(encoder, objectives, teacher=teacher)


def loss_weights(cfg: ObjectivesConfig) -> dict[str, float]:
    """Weight of each ``*_loss`` an objective returns (1 unless listed)."""
    weights = {"wra_loss": cfg.wra_weight, "codebook_ot_loss": cfg.codebook_weight,
               "codebook_pred_loss": cfg.codebook_weight, "owa_loss": cfg.owa_weight}
    if "laviter" in cfg.tasks:
        weights |= laviter_lib.loss_weights(cfg.laviter.lambdas, cfg.laviter.feature_matching)
    return weights


def target_count(objective: nn.Module, batch: dict) -> int:
    """How many targets the objective's losses are averaged over in this (prepared) batch.

    The loop rescales each micro-batch's mean loss by its share of the step's targets over all micro-batches
    and workers, so the gradient is that of the mean over the whole global batch, however it is split.
    """
    if isinstance(objective, MLM):
        return int((batch["txt_labels"] != -100).sum())
    if isinstance(objective, MaskedRegionObjective):
        return int(batch["img_masked"].sum())
    if isinstance(objective, ITM | ITC | ITCIntra | Codebook | VTA | LAViTeR):
        return len(batch["img_keys"])
    if isinstance(objective, ObjectWordAlignment):
        return int((batch["align_targets"].sum(dim=-1) > 0).sum())
    raise TypeError(f"no target count for objective {type(objective).__name__}")
