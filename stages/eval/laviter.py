"""LAViTeR's evaluation of the zero-shot (pretrained) model inside ``eval_retrieval`` (``vlp.tasks.laviter``):
sections ``<split>/damsm`` (zero-shot recall by DAMSM cosines), ``<split>/laviter`` (R-precision, AIMCoS with
the world's object classes, the generator's R-precision and Fréchet distances) and ``<split>/captioning``
(BLEU-1..4, CIDEr-D) of ``eval.retrieval.laviter.datasets``' splits, when the pretrained model has a ``vta``
or ``laviter`` head. The object classes of an image are the names of its COCO / VG objects in the download
stage's ``objects`` table (dedup drops the instances of evaluation images)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from torch import nn

from stages.base import StageError
from stages.eval.config import LaviterEvalConfig
from vlp.tasks.laviter import Attributes, LaviterEvalOptions, damsm_heads, laviter_evaluation
from vlp.tasks.retrieval import PairScorer

OBJECTS_TABLE = "objects.parquet"


def object_classes(tables: Path) -> dict[str, set[str]]:
    """Each image's object class names (empty without an objects table)."""
    path = tables / OBJECTS_TABLE
    if not path.is_file():
        return {}
    try:
        table = pq.read_table(path, columns=["image_key", "names"]).to_pydict()
    except Exception as err:  # pyarrow raises many types for one meaning: an unreadable table
        message = " ".join(str(err).split())
        raise StageError(f"{path}: cannot read ({type(err).__name__}: {message})") from None
    out: dict[str, set[str]] = {}
    for key, names in zip(table["image_key"], table["names"], strict=True):
        out.setdefault(key, set()).update(n.strip().lower() for n in names or [] if n and n.strip())
    return out


def attributes_of(img_keys: list[str], objects: Mapping[str, set[str]], tokenizer: Any, cls_id: int,
                  sep_id: int) -> Attributes | None:
    """AIMCoS's attributes: every object class of the world (the objects table), each encoded as a caption."""
    names = sorted({n for classes in objects.values() for n in classes})
    if not names:
        return None
    has = torch.tensor([[n in objects.get(key, ()) for n in names] for key in img_keys], dtype=torch.bool)
    ids = [torch.tensor([cls_id, *tokenizer(n, add_special_tokens=False)["input_ids"], sep_id])
           for n in names]
    return Attributes(names, ids, has)


def laviter_sections(scorer: PairScorer, objectives: nn.Module, txt2img: torch.Tensor, tokenizer: Any,
                     cfg: LaviterEvalConfig, objects: Mapping[str, set[str]], device: torch.device
                     ) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    """The sections and the generated captions; nothing without DAMSM heads."""
    vta, laviter = damsm_heads(objectives)
    if vta is None:
        return {}, []
    objectives.to(device)
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    options = LaviterEvalOptions(negatives=cfg.r_precision_negatives, repeats=cfg.r_precision_repeats,
                                 beam_size=cfg.beam_size, max_len=cfg.max_len,
                                 length_penalty=cfg.length_penalty)

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)

    attributes = attributes_of(scorer.img_keys, objects, tokenizer, cls_id, sep_id)
    return laviter_evaluation(scorer.model, vta, laviter, scorer, txt2img, decode, options, attributes)
