"""NLVR2 finetuning: is a statement true of a pair of images? The three UNITER variants:

* ``triplet``: one sequence [text ; left regions ; right regions], a linear classifier on the pooled [CLS];
* ``pair``: two sequences [text ; left] and [text ; right], a linear classifier on both pooled [CLS];
* ``pair_biattn``: pair, plus cross-attention between the two sequences' outputs in both directions, then
  attention pooling of each (UNITER's best variant; ``options.pool``: UNITER's ReLU-scored pool with
  dropout on its weights, or a plain linear score).

In every variant the left image's regions have type id 1 and the right image's type id 2, as UNITER does,
so that a statement about "the left image" can be grounded; the encoder's type table is grown to three rows
by ``adapt_encoder`` (row 2 starts as a copy of the pretrained image row 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp.data.collate import collate as collate_pretrain
from vlp.data.img_db import ImgDb
from vlp.model.config import UniterConfig
from vlp.model.uniter import UniterModel
from vlp.objectives.common import encode, init_head_weights
from vlp.tasks.common import (
    TaskDataset,
    TaskHead,
    TaskOptions,
    accuracy_counts,
    finish_records,
    read_task_rows,
    require,
    validate_options,
)

Variant = Literal["triplet", "pair", "pair_biattn"]
NUM_TYPES = 3  # text 0, left image 1, right image 2
_LEFT, _RIGHT = 1, 2


class NLVR2Options(TaskOptions):
    variant: Variant = "pair_biattn"
    # pair_biattn's attention pooling: official = UNITER's AttentionPool (model/nlvr2.py: Linear(H, 1) + ReLU
    # scores, dropout on the softmax weights; the paper does not describe it); linear = Linear(H, 1) scores.
    pool: Literal["official", "linear"] = "official"


def expand_type_embeddings(model: UniterModel, size: int = NUM_TYPES) -> None:
    """Grow the encoder's token-type table to ``size`` rows, new rows copying the image row (type 1).

    A table that already has ``size`` rows (a finetuned NLVR2 encoder) is left as it is.
    """
    old = model.embeddings.token_type_embeddings
    if old.num_embeddings >= size:
        return
    new = nn.Embedding(size, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight[: old.num_embeddings] = old.weight
        new.weight[old.num_embeddings :] = old.weight[1]
    model.embeddings.token_type_embeddings = new
    model.config = UniterConfig.model_validate({**model.config.model_dump(), "type_vocab_size": size})


class NLVR2Dataset(TaskDataset):
    def __init__(self, *args: Any, variant: Variant, **kwargs: Any):
        self.variant = variant
        super().__init__(*args, **kwargs)

    def _units(self, record: dict[str, Any]) -> tuple[int, int]:
        text = len(record["input_ids"])
        left, right = (self.img_db.name2nbb[k] for k in record["img_keys"])
        if self.variant == "triplet":
            return text, left + right
        # Two rows per example, each padded to the batch's longest text and largest image.
        return 2 * text, 2 * max(left, right)

    def __getitem__(self, i: int) -> dict[str, Any]:
        left_key, right_key = self.records[i]["img_keys"]
        return {"left": self.example(i, left_key), "right": self.example(i, right_key)}

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if self.variant == "triplet":
            joined = []
            for ex in examples:
                left, right = ex["left"], ex["right"]
                joined.append({
                    **left,
                    "img_feat": torch.cat([left["img_feat"], right["img_feat"]]),
                    "img_pos_feat": torch.cat([left["img_pos_feat"], right["img_pos_feat"]]),
                    "img_key": f"{left['img_key']}|{right['img_key']}",
                    "img_type_ids": torch.tensor(
                        [_LEFT] * len(left["img_feat"]) + [_RIGHT] * len(right["img_feat"])
                    ),
                })
            rows = joined
        else:
            rows = []
            for ex in examples:
                for part, type_id in (("left", _LEFT), ("right", _RIGHT)):
                    type_ids = torch.full((len(ex[part]["img_feat"]),), type_id)
                    rows.append({**ex[part], "img_type_ids": type_ids})
        batch = collate_pretrain(rows)
        img_type_ids = torch.zeros(batch["img_mask"].shape, dtype=torch.long)
        for b, row in enumerate(rows):
            img_type_ids[b, : len(row["img_type_ids"])] = row["img_type_ids"]
        records = [self.records[ex["left"]["index"]] for ex in examples]
        batch["img_type_ids"] = img_type_ids
        batch["targets"] = torch.tensor([int(r["label"]) for r in records], dtype=torch.long)
        batch["identifiers"] = [r["id"] for r in records]
        batch["variant"] = self.variant
        return batch


class AttentionPool(nn.Module):
    """Softmax-weighted sum of a sequence's real positions, the weights scored by a linear layer; with
    ``relu`` the scores pass a ReLU and ``dropout`` drops softmax weights in training (UNITER's
    ``AttentionPool``, model/nlvr2.py)."""

    def __init__(self, hidden_size: int, relu: bool = False, dropout: float = 0.0):
        super().__init__()
        self.score = nn.Linear(hidden_size, 1)
        self.relu, self.dropout = relu, dropout

    def forward(self, sequence: Tensor, mask: Tensor) -> Tensor:
        scores = self.score(sequence).squeeze(-1).float()
        if self.relu:
            scores = scores.relu()
        weights = scores.masked_fill(~mask, torch.finfo(torch.float32).min).softmax(dim=1)
        weights = F.dropout(weights, self.dropout, self.training)
        return torch.einsum("bt,btd->bd", weights.to(sequence.dtype), sequence)


class BiAttention(nn.Module):
    """UNITER's pair-biattn block: each sequence attends over the other, the result is fused with the
    sequence itself (Linear(2H, H) - ReLU) and attention-pooled; returns [left pooled ; right pooled]."""

    def __init__(self, config: UniterConfig, pool: Literal["official", "linear"] = "official"):
        super().__init__()
        hidden, heads = config.hidden_size, config.num_attention_heads
        dropout = config.attention_probs_dropout_prob
        self.left_to_right = nn.MultiheadAttention(hidden, heads, dropout, batch_first=True)
        self.right_to_left = nn.MultiheadAttention(hidden, heads, dropout, batch_first=True)
        self.fuse = nn.Sequential(
            nn.Linear(2 * hidden, hidden), nn.ReLU(), nn.Dropout(config.hidden_dropout_prob)
        )
        official = pool == "official"
        self.pool = AttentionPool(hidden, relu=official, dropout=dropout if official else 0.0)

    def forward(self, left: Tensor, left_mask: Tensor, right: Tensor, right_mask: Tensor) -> Tensor:
        from_right, _ = self.left_to_right(left, right, right, key_padding_mask=~right_mask,
                                           need_weights=False)
        from_left, _ = self.right_to_left(right, left, left, key_padding_mask=~left_mask, need_weights=False)
        left = self.fuse(torch.cat([from_right, left], dim=-1))
        right = self.fuse(torch.cat([from_left, right], dim=-1))
        return torch.cat([self.pool(left, left_mask), self.pool(right, right_mask)], dim=-1)


class NLVR2(TaskHead):
    name: ClassVar[str] = "nlvr2"
    metric: ClassVar[str] = "nlvr2_acc"
    Options: ClassVar[type[TaskOptions]] = NLVR2Options

    def __init__(self, encoder_config: UniterConfig, **options: Any):
        super().__init__(encoder_config, **options)
        self.variant: Variant = self.options.variant
        hidden = encoder_config.hidden_size
        if self.variant == "pair_biattn":
            self.biattn = BiAttention(encoder_config, self.options.pool)
        self.classifier = nn.Linear(hidden if self.variant == "triplet" else 2 * hidden, 2)
        init_head_weights(self, encoder_config.initializer_range)

    @classmethod
    def build_data(cls, tables_dir: Path, img_db: ImgDb, tokenizer_dir: Path, split: str, *,
                   skip_missing: bool = False, **options: Any) -> NLVR2Dataset:
        opts = validate_options(cls.name, cls.Options, options)
        source, rows = read_task_rows(tables_dir, cls.name, split)
        records = []
        for row in rows:
            where = f"{source}: identifier {row['identifier']!r}"
            records.append({
                "id": require(row["identifier"], where, "identifier"),
                "img_keys": (
                    require(row["left_key"], where, "left_key"), require(row["right_key"], where, "right_key")
                ),
                "text": require(row["sentence"], where, "sentence"),
                "label": require(row["label"], where, "label"),
            })
        where = f"{source} split {split}"
        records, missing, num_images = finish_records(records, img_db, tokenizer_dir, opts, where,
                                                      skip_missing)
        return NLVR2Dataset(split, source, img_db, records, missing, num_images, variant=opts.variant)

    def adapt_encoder(self, model: UniterModel) -> None:
        expand_type_embeddings(model)

    def forward(self, model: UniterModel, batch: dict[str, Any]) -> dict[str, Any]:
        if batch["variant"] != self.variant:
            raise ValueError(f"NLVR2 head is the {self.variant} variant but the batch was collated for "
                             f"{batch['variant']}")
        if model.embeddings.token_type_embeddings.num_embeddings < NUM_TYPES:
            raise ValueError("NLVR2 needs an encoder with 3 token types (right image = 2): call "
                             "adapt_encoder(model) before finetuning")
        sequence = encode(model, batch)
        if self.variant == "triplet":
            features = model.pool(sequence)
        elif self.variant == "pair":
            features = model.pool(sequence).reshape(-1, 2 * sequence.shape[-1])  # rows are left, right, ...
        else:
            mask = torch.cat([batch["txt_mask"], batch["img_mask"]], dim=1)
            features = self.biattn(sequence[0::2], mask[0::2], sequence[1::2], mask[1::2])
        logits = self.classifier(features).float()
        targets = batch["targets"]
        predicted = logits.argmax(dim=1)
        return {
            "nlvr2_loss": F.cross_entropy(logits, targets),
            **accuracy_counts("nlvr2", predicted == targets),
            "predictions": [
                {"identifier": i, "prediction": bool(p), "label": bool(t)}
                for i, p, t in zip(batch["identifiers"], predicted.tolist(), targets.tolist(), strict=True)
            ],
        }

    def state_extra(self) -> dict[str, Any]:
        return {**super().state_extra(), "variant": self.variant}

    def check_state_extra(self, extra: dict[str, Any]) -> None:
        super().check_state_extra(extra)
        if extra.get("variant") != self.variant:
            raise ValueError(f"checkpoint is the NLVR2 {extra.get('variant')!r} variant, the config asks for "
                             f"{self.variant!r}")
