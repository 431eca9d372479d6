"""Initialise UNITER's text embeddings, layers and pooler from a local Hugging Face BERT checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from vlp.model.uniter import UniterModel

# Config fields that change what a layer computes without changing any weight's shape.
_SHAPELESS_FIELDS = ("num_hidden_layers", "num_attention_heads", "layer_norm_eps")


def _bert_to_uniter(bert: dict[str, Tensor], num_layers: int) -> dict[str, tuple[str, Tensor]]:
    """UNITER parameter name -> (BERT parameter name it comes from, value)."""
    names = {
        "embeddings.word_embeddings.weight": "embeddings.word_embeddings.weight",
        "embeddings.position_embeddings.weight": "embeddings.position_embeddings.weight",
        "embeddings.token_type_embeddings.weight": "embeddings.token_type_embeddings.weight",
        "embeddings.layer_norm.weight": "embeddings.LayerNorm.weight",
        "embeddings.layer_norm.bias": "embeddings.LayerNorm.bias",
        "pooler.weight": "pooler.dense.weight",
        "pooler.bias": "pooler.dense.bias",
    }
    for i in range(num_layers):
        ours, theirs = f"encoder.layers.{i}.", f"encoder.layer.{i}."
        names |= {
            ours + "attn_out.weight": theirs + "attention.output.dense.weight",
            ours + "attn_out.bias": theirs + "attention.output.dense.bias",
            ours + "attn_norm.weight": theirs + "attention.output.LayerNorm.weight",
            ours + "attn_norm.bias": theirs + "attention.output.LayerNorm.bias",
            ours + "ffn_in.weight": theirs + "intermediate.dense.weight",
            ours + "ffn_in.bias": theirs + "intermediate.dense.bias",
            ours + "ffn_out.weight": theirs + "output.dense.weight",
            ours + "ffn_out.bias": theirs + "output.dense.bias",
            ours + "ffn_norm.weight": theirs + "output.LayerNorm.weight",
            ours + "ffn_norm.bias": theirs + "output.LayerNorm.bias",
        }
    mapped = {ours: (theirs, bert[theirs]) for ours, theirs in names.items()}
    for i in range(num_layers):
        # Our fused projection is BERT's query, key and value weights stacked in that order.
        for kind in ("weight", "bias"):
            parts = [f"encoder.layer.{i}.attention.self.{p}.{kind}" for p in ("query", "key", "value")]
            label = f"encoder.layer.{i}.attention.self.{{query,key,value}}.{kind}"
            mapped[f"encoder.layers.{i}.qkv.{kind}"] = (label, torch.cat([bert[p] for p in parts]))
    return mapped


def init_from_bert(model: UniterModel, path: Path | str) -> None:
    """Copy a BERT checkpoint (a local `save_pretrained` directory, never a hub name) into `model`.

    The image embedder keeps its own initialisation. Raises ValueError naming the config field or the
    parameter when the checkpoint does not fit the model's config.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"BERT checkpoint {str(path)!r}: not a local directory with a config.json")
    # transformers takes seconds to import; only this entry point needs it.
    from transformers import BertModel

    try:
        bert, info = BertModel.from_pretrained(path, local_files_only=True, output_loading_info=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"BERT checkpoint {path}: cannot load ({' '.join(str(err).split())})") from None
    lacking = [key for key in info["missing_keys"] if not key.startswith("pooler.")]
    if lacking:
        raise ValueError(f"BERT checkpoint {path}: no weights for {lacking[0]} ({len(lacking)} missing)")
    source = bert.config
    act = getattr(source, "hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"BERT checkpoint {path}: hidden_act is {act!r}, UniterModel uses exact 'gelu'")
    for field in _SHAPELESS_FIELDS:
        theirs, ours = getattr(source, field), getattr(model.config, field)
        if theirs != ours:
            raise ValueError(f"BERT checkpoint {path}: {field} is {theirs}, the UniterConfig has {ours}")

    state = bert.state_dict()
    mapped = _bert_to_uniter(state, model.config.num_hidden_layers)
    # A checkpoint saved without a pooler gets a random one from transformers: keep ours instead.
    if any(key.startswith("pooler.") for key in info["missing_keys"]):
        mapped = {ours: value for ours, value in mapped.items() if not ours.startswith("pooler.")}
    targets = model.state_dict()
    for ours, (theirs, value) in mapped.items():
        if value.shape != targets[ours].shape:
            raise ValueError(
                f"BERT checkpoint {path}: {theirs} has shape {tuple(value.shape)} but {ours} needs "
                f"{tuple(targets[ours].shape)} (vocab_size, max_position_embeddings, type_vocab_size, "
                f"hidden_size and intermediate_size must match)"
            )
    with torch.no_grad():
        for ours, (_, value) in mapped.items():
            targets[ours].copy_(value)
