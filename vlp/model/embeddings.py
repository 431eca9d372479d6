"""Input embedders of the single-stream encoder: one for word pieces, one for detector regions."""

from __future__ import annotations

from torch import Tensor, nn

from vlp.model.config import UniterConfig


def _add_type(embeddings: Tensor, table: nn.Embedding, type_ids: Tensor | None, default: int) -> Tensor:
    # Without explicit ids every position of a modality has the same type: adding the one row broadcast
    # is what the lookup would give, minus a gather over B x L indices.
    if type_ids is None:
        return embeddings + table.weight[default]
    return embeddings + table(type_ids)


class TextEmbeddings(nn.Module):
    """word + position + token type, LayerNorm, dropout (BERT's embedder)."""

    def __init__(self, config: UniterConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        # Shared with the image embedder: the type row is the modality embedding (0 text, 1 image).
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: Tensor, position_ids: Tensor, type_ids: Tensor | None = None) -> Tensor:
        embeddings = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        embeddings = _add_type(embeddings, self.token_type_embeddings, type_ids, default=0)
        return self.dropout(self.layer_norm(embeddings))


class ImageEmbeddings(nn.Module):
    """LN(FC(region feature)) + LN(FC(7-d box)) + modality type, LayerNorm, dropout (UNITER's embedder).

    A region masked for MRM gets a zero feature (the paper); with ``config.img_mask_embedding`` a learned
    vector is added to it (the official code: ``nn.Embedding(2, img_dim, padding_idx=0)`` looked up with
    the mask, row 0 zero and never updated).
    """

    def __init__(self, config: UniterConfig) -> None:
        super().__init__()
        self.mask_embedding = (nn.Embedding(2, config.img_dim, padding_idx=0) if config.img_mask_embedding
                               else None)
        self.img_linear = nn.Linear(config.img_dim, config.hidden_size)
        self.img_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pos_linear = nn.Linear(config.pos_dim, config.hidden_size)
        self.pos_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        img_feat: Tensor,
        img_pos_feat: Tensor,
        type_table: nn.Embedding,
        type_ids: Tensor | None = None,
        img_masked: Tensor | None = None,
    ) -> Tensor:
        if img_masked is not None:
            # Masked region modelling: the model must not see a masked region's feature, only its box.
            img_feat = img_feat.masked_fill(img_masked.unsqueeze(-1), 0.0)
            if self.mask_embedding is not None:
                img_feat = img_feat + self.mask_embedding(img_masked.long()).to(img_feat.dtype)
        embeddings = self.img_layer_norm(self.img_linear(img_feat)) + self.pos_layer_norm(
            self.pos_linear(img_pos_feat)
        )
        embeddings = _add_type(embeddings, type_table, type_ids, default=1)
        return self.dropout(self.layer_norm(embeddings))

