"""BERT's post-LayerNorm transformer layers over the joint [text ; image] sequence, attention by SDPA.

The layers hold only the real (unpadded) positions of a batch, packed as rows [T, H]; padding exists only
inside attention, where keys are masked. Projections, feed-forward and LayerNorms therefore cost nothing
for padded positions (BERT computes them all and throws them away).

With ``config.fusion_start`` > 0 the first layers attend within each modality only (align before fuse): a
text query sees the text keys of its example, a region query its regions, so the outputs of those layers
are those of unimodal passes and do not depend on the other modality.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp.model.config import UniterConfig


def attention_probs(query: Tensor, key: Tensor, key_mask: Tensor, attn_mask: Tensor | None = None) -> Tensor:
    """softmax(q kᵀ / √d) over real keys, in fp32: the matrix SDPA multiplies the values with.

    query, key [B, heads, L, d]; key_mask Bool[B, L] (True = real). Padded keys get probability 0.
    attn_mask Bool[B, 1, L, L] (True = attend), when given, replaces the key mask (block-diagonal layers).
    """
    # Under bf16 autocast the scores would be rounded to 8 mantissa bits before the softmax; SDPA's CPU
    # and GPU kernels accumulate them in fp32, so this explicit path does too.
    mask = key_mask[:, None, None, :] if attn_mask is None else attn_mask
    with torch.autocast(query.device.type, enabled=False):
        scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * query.shape[-1] ** -0.5
        scores = scores.masked_fill(~mask, float("-inf"))
        return scores.softmax(dim=-1)


def within_modality_mask(key_mask: Tensor, text_len: int) -> Tensor:
    """Bool[B, 1, L, L]: query q may attend key k when both are text (positions < text_len) or both are
    regions, and k is real. A padded query whose modality has no real key in its example keeps the plain
    key mask (its output is dropped; a row of -inf only would make NaN)."""
    is_text = torch.arange(key_mask.shape[1], device=key_mask.device) < text_len
    same = is_text[:, None] == is_text[None, :]  # [L, L]
    block = same[None] & key_mask[:, None, :]  # [B, L, L]
    block = torch.where(block.any(-1, keepdim=True), block, key_mask[:, None, :].expand_as(block))
    return block[:, None]


def _unpack(packed: Tensor, real: Tensor, size: int) -> Tensor:
    """Rows [T, C] into the flat padded layout [size, C], zeros at padding (finite keys and values)."""
    flat = packed.new_zeros(size, packed.shape[1])
    return flat.index_copy_(0, real, packed)  # in place: the fresh buffer needs no out-of-place clone


class EncoderLayer(nn.Module):
    def __init__(self, config: UniterConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.attn_dropout = config.attention_probs_dropout_prob
        # Query, key and value projections as one GEMM (BERT's three Linear layers, stacked).
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.attn_out = nn.Linear(config.hidden_size, config.hidden_size)
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.ffn_out = nn.Linear(config.intermediate_size, config.hidden_size)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, packed: Tensor, real: Tensor, key_mask: Tensor, return_attention: bool = False,
        attn_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """packed [T, H]: the batch's real positions; real [T]: their flat indices into key_mask [B, L];
        attn_mask Bool[B, 1, L, L], when given, replaces the key mask (``within_modality_mask``)."""
        batch, length = key_mask.shape
        qkv = _unpack(self.qkv(packed), real, batch * length)
        qkv = qkv.view(batch, length, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, L, d]
        dropout_p = self.attn_dropout if self.training else 0.0
        probs = None
        if return_attention:
            probs = attention_probs(query, key, key_mask, attn_mask)
            context = torch.matmul(F.dropout(probs, dropout_p).to(value.dtype), value)
        else:
            mask = key_mask[:, None, None, :] if attn_mask is None else attn_mask
            context = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout_p)
        context = context.transpose(1, 2).reshape(batch * length, -1).index_select(0, real)
        packed = self.attn_norm(packed + self.dropout(self.attn_out(context)))
        packed = self.ffn_norm(packed + self.dropout(self.ffn_out(F.gelu(self.ffn_in(packed)))))
        return packed, probs


class Encoder(nn.Module):
    def __init__(self, config: UniterConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.fusion_start = config.fusion_start

    def forward(
        self, packed: Tensor, real: Tensor, key_mask: Tensor, attn_layer: int | None = None,
        text_len: int = 0, depth: int | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Encode the real positions `packed` [T, H] (`real` [T]: their flat indices into key_mask [B, L]).

        Returns the output in the padded layout [B, L, H], zeros at padding, and with attn_layer that
        layer's attention probabilities. `text_len`: the text block's length (positions [0, text_len) are
        text), which the within-modality layers (``fusion_start``) need; `depth`: run the first `depth`
        layers only (``fusion_start`` gives the unimodal features of align-before-fuse).
        """
        if attn_layer is not None:
            if not -len(self.layers) <= attn_layer < len(self.layers):
                raise ValueError(f"attn_layer {attn_layer} is out of range for {len(self.layers)} layers")
            attn_layer %= len(self.layers)
        if depth is not None and not 1 <= depth <= len(self.layers):
            raise ValueError(f"depth {depth} is out of range for {len(self.layers)} layers")
        # Only with fusion_start > 0: UNITER's layers get exactly the call they always had.
        block = within_modality_mask(key_mask, text_len) if self.fusion_start else None
        attention = None
        for index, layer in enumerate(self.layers[:depth]):
            packed, probs = layer(packed, real, key_mask, return_attention=index == attn_layer,
                                  attn_mask=block if index < self.fusion_start else None)
            if probs is not None:
                attention = probs
        batch, length = key_mask.shape
        return _unpack(packed, real, batch * length).view(batch, length, -1), attention
