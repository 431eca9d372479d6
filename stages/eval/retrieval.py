"""Retrieval evaluation: recall@K and Meta-Sum of the zero-shot and finetuned models in each scoring mode,
ISDa on Flickr30k Entities, and the data of the figures (recall curves, text-to-image attention maps)."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from stages.base import StageError
from stages.eval.config import RetrievalEvalConfig
from stages.outputs.features import EntityFeaturesOutput
from vlp.data.img_db import ImgDb
from vlp.eval.isda import isda_summary
from vlp.eval.retrieval import recall_at_k, score_all_pairs, shortlist_rerank
from vlp.tasks.common import read_image_sizes
from vlp.tasks.retrieval import (
    EntityPhrase,
    EntitySentence,
    Locate,
    PairScorer,
    annotated_regions,
    detected_regions_by_iou,
    itc_similarity,
    sentence_isda,
    text_to_image_attention,
    unimodal_similarity,
)


@dataclass
class ModeResult:
    metrics: dict[str, float]  # R@1/5/10 both ways, r_mean, meta_sum, seconds, pairs_scored
    curve: dict[str, list[float]]  # ir / tr: recall@K for K = 1..recall_curve_k


def score_modes(scorer: PairScorer, txt2img: torch.Tensor, cfg: RetrievalEvalConfig,
                itc: Any = None) -> dict[str, ModeResult]:
    """Score the split once per configured mode; seconds and pairs scored say what each mode cost.
    ``itc``: the pretrained model's itc objective (its projections) for ``itc_shortlist``; a model without
    one (a finetuned variant) skips that mode."""
    n_img, n_txt = len(scorer.img_keys), len(scorer.texts)
    out = {}
    for mode in cfg.modes:
        if mode == "itc_shortlist" and itc is None:
            continue
        scorer.pairs_scored = 0
        start = time.perf_counter()
        if mode == "full":
            scores = score_all_pairs(scorer, n_img, n_txt, *cfg.chunk)
        else:
            sim = (unimodal_similarity(scorer, cfg.unimodal_chunk) if mode == "shortlist"
                   else itc_similarity(scorer, itc, cfg.unimodal_chunk))
            scores = shortlist_rerank(sim, scorer, cfg.shortlist_k, cfg.rerank_chunk)
        seconds = time.perf_counter() - start
        ks = range(1, cfg.recall_curve_k + 1)
        curve = recall_at_k(scores, txt2img, ks)
        cost = {"seconds": seconds, "pairs_scored": float(scorer.pairs_scored)}
        metrics = recall_at_k(scores, txt2img) | cost
        out[mode] = ModeResult(metrics, {side: [curve[f"{side}_r{k}"] for k in ks] for side in ("ir", "tr")})
    return out


def entity_sentences(dedup: Path, splits: tuple[str, ...], img_db: ImgDb,
                     limit: int | None) -> list[EntitySentence]:
    """Entities sentences of the images of the Entities ``splits`` that the store holds and that have at
    least two chains with boxes (ISDa needs two related objects), in (image, sentence) order."""
    tables = dedup / "tables"
    try:
        split_rows = pq.read_table(tables / "splits.parquet").to_pylist()
        rows = pq.read_table(tables / "entities.parquet").to_pylist()
    except (OSError, ValueError) as err:
        raise StageError(f"{tables}: cannot read the Flickr30k Entities tables ({err})") from None
    keys = {r["image_key"] for r in split_rows
            if r["corpus"] == "flickr30k" and r["scheme"] == "entities" and r["split"] in splits}
    grouped: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["image_key"] in keys and row["image_key"] in img_db and row["boxes"]:
            grouped[(row["image_key"], row["sentence_idx"])].append(row)
    sentences = []
    for (key, _), phrases in sorted(grouped.items()):
        if len({p["phrase_id"] for p in phrases}) < 2:
            continue
        sentence = phrases[0]["sentence"]
        sentences.append(EntitySentence(key, tuple(sentence.split(" ")), tuple(
            EntityPhrase(p["first_word_index"], len(p["phrase"].split()), p["phrase_id"],
                         tuple(tuple(b) for b in p["boxes"]))
            for p in phrases)))
    return sentences[:limit] if limit is not None else sentences


@dataclass
class IsdaInputs:
    """What ISDa reads: the sentences, the store of their images' regions and how an object finds its own."""

    sentences: list[EntitySentence]
    img_db: ImgDb
    locate: Locate


def isda_inputs(cfg: RetrievalEvalConfig, dedup: Path, entity_store: EntityFeaturesOutput,
                detected: ImgDb) -> IsdaInputs:
    """``annotated``: the entity_features store, each region found by its box; ``detected``: the features
    stage's regions with IoU >= 0.5 to an object's box (scaled by the image sizes in dedup's shards)."""
    if cfg.isda_regions == "annotated":
        store = entity_store.img_db()
        sentences = entity_sentences(dedup, cfg.isda_splits, store, cfg.isda_max_sentences)
        return IsdaInputs(sentences, store, annotated_regions(entity_store.boxes()))
    sentences = entity_sentences(dedup, cfg.isda_splits, detected, cfg.isda_max_sentences)
    sizes = flickr_sizes(dedup, sentences) if sentences else {}
    return IsdaInputs(sentences, detected, detected_regions_by_iou(sizes))


def isda_of(scorer: PairScorer, inputs: IsdaInputs, tokenizer: Any, meta: dict[str, Any],
            max_txt_len: int) -> dict[str, float]:
    values = sentence_isda(scorer.model, inputs.img_db, inputs.sentences, tokenizer, inputs.locate,
                           cls_id=int(meta["CLS"]), sep_id=int(meta["SEP"]), max_txt_len=max_txt_len,
                           pad_id=scorer.pad_id, device=scorer.device, autocast=scorer.autocast)
    return isda_summary(values)


def flickr_sizes(dedup: Path, sentences: list[EntitySentence]) -> dict[str, tuple[int, int]]:
    keys = {s.img_key for s in sentences}
    try:
        sizes = read_image_sizes(dedup / "images", keys)
    except ValueError as err:
        raise StageError(str(err)) from None
    lacking = sorted(keys - sizes.keys())
    if lacking:
        raise StageError(f"{dedup / 'images'}: no width/height for {len(lacking)} Entities image(s): "
                         f"{', '.join(lacking[:5])}")
    return sizes


def attention_maps(scorer: PairScorer, txt2img: torch.Tensor, tokenizer: Any, count: int,
                   ) -> list[dict[str, Any]]:
    """Text-to-image attention of the first ``count`` texts with their own images (figure data)."""
    maps = []
    for t in range(min(count, len(scorer.texts))):
        image = int(txt2img[t])
        maps.append({"image": scorer.img_keys[image],
                     "tokens": tokenizer.convert_ids_to_tokens(scorer.texts[t].tolist()),
                     "attention": text_to_image_attention(scorer, image, t)})
    return maps


def log_summary(log: logging.Logger, name: str, results: dict[str, ModeResult]) -> None:
    for mode, result in results.items():
        m = result.metrics
        log.info("eval_retrieval: %s %s: IR R@1 %.3f TR R@1 %.3f Meta-Sum %.3f, %d pairs in %.1fs", name,
                 mode, m["ir_r1"], m["tr_r1"], m["meta_sum"], m["pairs_scored"], m["seconds"])
