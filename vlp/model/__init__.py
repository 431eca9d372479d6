"""UNITER single-stream encoder: config, model, checkpoint I/O and BERT initialisation."""

from vlp.model.bert_init import init_from_bert
from vlp.model.config import UniterConfig
from vlp.model.uniter import UniterModel, UniterOutput

__all__ = ["UniterConfig", "UniterModel", "UniterOutput", "init_from_bert"]
