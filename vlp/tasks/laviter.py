"""LAViTeR's evaluation of a pretrained model with DAMSM heads (the ``vta`` or ``laviter`` task) on one
retrieval split: what ``eval_retrieval`` reports for the zero-shot model (``stages/eval``).

* ``damsm``: zero-shot image/text retrieval recall@1/5/10 by the cosine of the DAMSM sentence and image
  features (the pretrained model alone, no ITM head needed);
* ``laviter``: R-precision on the same cosines (``vlp.eval.laviter.r_precision``: each caption among itself
  and 99 random captions of other images, top 1 and top 3, mean over ``repeats`` draws); AIMCoS with the
  world's object classes as attributes (each class name encoded as a caption, the image-averaged Eq. 17
  and the class-averaged COCO protocol); with a generator: R-precision of the region sets generated from
  each caption (AttnGAN's original use of the metric) and Fréchet distances between the generated and the
  real sets, on the pooled raw region features (``frechet_regions``) and on the encoder's image features
  (``frechet_embeddings``);
* ``captioning``: with a captioner, BLEU-1..4 and CIDEr-D of one caption per image (greedy or beam search)
  against the image's captions in the split (references and hypotheses decoded with the tokenizer).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vlp.eval.captioning import caption_metrics
from vlp.eval.laviter import aimcos, cosine_matrix, frechet_distance, pooled, r_precision
from vlp.eval.retrieval import recall_at_k
from vlp.model.uniter import UniterModel
from vlp.objectives.damsm import VTA
from vlp.objectives.laviter import LAViTeR
from vlp.tasks.retrieval import PairScorer, _to, evaluating


@dataclass(frozen=True)
class LaviterEvalOptions:
    negatives: int = 99  # R-precision: random captions of other images ranked with the true one
    repeats: int = 10  # R-precision draws (AttnGAN: 10)
    beam_size: int = 3  # captioning (1: greedy)
    max_len: int = 20  # generated caption tokens at most
    length_penalty: float = 0.0
    chunk: int = 64  # images / texts per encoder call
    seed: int = 0  # R-precision draws and the generator's noise


@dataclass(frozen=True)
class Attributes:
    """AIMCoS's attributes: their names, input ids ([CLS] name [SEP]) and which images have them."""

    names: list[str]
    input_ids: list[Tensor]
    has: Tensor  # Bool[n_img, len(names)]


def damsm_heads(objectives: Mapping[str, nn.Module]) -> tuple[VTA | None, LAViTeR | None]:
    """The DAMSM head of a pretrained model's objectives (LAViTeR's when it has the task) and LAViTeR."""
    if "laviter" in objectives:
        laviter = objectives["laviter"]
        return laviter.vta, laviter
    # ``in`` and ``[]``: a model's objectives are an nn.ModuleDict, which has no ``get``
    return (objectives["vta"] if "vta" in objectives else None), None


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield range(start, min(start + size, n))


@torch.no_grad()
def laviter_evaluation(encoder: UniterModel, vta: VTA, laviter: LAViTeR | None, scorer: PairScorer,
                       txt2img: Tensor, decode: Callable[[list[int]], str], options: LaviterEvalOptions,
                       attributes: Attributes | None = None
                       ) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    """(sections ``damsm``, ``laviter`` and, with a captioner, ``captioning``; each image's generated
    caption). ``scorer`` batches the split's images and texts (its own head is not used); ``decode`` turns
    token ids into a string."""
    device = scorer.device
    captioner = laviter.captioner if laviter is not None else None
    generator = laviter.generator if laviter is not None else None
    modules = [m for m in (encoder, vta, laviter) if m is not None]
    images, real_pooled, sentences, generated, generated_pooled = [], [], [], [], []
    captions: list[list[int]] = []
    with scorer.autocast(), ExitStack() as stack:
        for module in modules:
            stack.enter_context(evaluating(module))
        stack.enter_context(torch.random.fork_rng(devices=[device] if device.type == "cuda" else []))
        torch.manual_seed(options.seed)  # the generator's noise, without touching the caller's generator
        for idx in _chunks(len(scorer.img_keys), options.chunk):
            batch = _to(scorer.regions(list(idx)), device)
            feats = vta.image_features(encoder, batch["img_feat"], batch["img_pos_feat"],
                                       batch["img_mask"])
            images.append(feats.image.float().cpu())
            real_pooled.append(pooled(batch["img_feat"].float(), batch["img_mask"]).cpu())
            if captioner is not None:
                captions += captioner.generate(feats.hidden, feats.region_mask, options.max_len,
                                               options.beam_size, options.length_penalty)
        for idx in _chunks(len(scorer.texts), options.chunk):
            batch = _to(scorer.text_batch(list(idx)), device)
            text = vta.text_features(encoder, batch["input_ids"], batch["position_ids"],
                                     batch["txt_mask"])
            sentences.append(text.sentence.float().cpu())
            if generator is not None:
                fake = generator(text.sentence, text.words, text.word_mask)
                fake_image = vta.image_features(encoder, fake.features, fake.boxes, fake.mask)
                generated.append(fake_image.image.float().cpu())
                generated_pooled.append(pooled(fake.features.float(), fake.mask).cpu())
        attr = None
        if attributes is not None and attributes.names:
            attr_scorer = PairScorer(encoder, scorer.task, scorer.img_db, [], attributes.input_ids,
                                     pad_id=scorer.pad_id, device=device, autocast=scorer.autocast)
            attr = []
            for idx in _chunks(len(attributes.names), options.chunk):
                batch = _to(attr_scorer.text_batch(list(idx)), device)
                attr.append(vta.text_features(encoder, batch["input_ids"], batch["position_ids"],
                                              batch["txt_mask"]).sentence.float().cpu())
            attr = torch.cat(attr)
    images, sentences = torch.cat(images), torch.cat(sentences)
    txt2img = torch.as_tensor(txt2img).long().cpu()
    sims = cosine_matrix(images, sentences)
    sections: dict[str, dict[str, float]] = {"damsm": recall_at_k(sims, txt2img)}
    matching = r_precision(sims, txt2img, options.negatives, (1, 3), options.repeats, options.seed)
    if attr is not None:
        has = attributes.has.bool()
        if bool(has.any()):
            matching["aimcos"] = aimcos(images, attr, has)
            matching["aimcos_class"] = aimcos(images, attr, has, average="class")
    if generated:
        fake_images = torch.cat(generated)
        gen = r_precision(cosine_matrix(fake_images, sentences), txt2img, options.negatives, (1, 3),
                          options.repeats, options.seed, rows=torch.arange(len(txt2img)))
        matching |= {f"{k.replace('r_precision', 'r_precision_generated')}": v for k, v in gen.items()
                     if k != "candidates"}
        if len(images) >= 2:
            matching["frechet_regions"] = frechet_distance(torch.cat(real_pooled),
                                                           torch.cat(generated_pooled))
            matching["frechet_embeddings"] = frechet_distance(images, fake_images)
    sections["laviter"] = matching
    predictions: list[dict[str, Any]] = []
    if captioner is not None:
        hypotheses = {key: decode(ids) for key, ids in zip(scorer.img_keys, captions, strict=True)}
        references: dict[str, list[str]] = {key: [] for key in scorer.img_keys}
        for t, m in enumerate(txt2img.tolist()):
            ids = scorer.texts[t].tolist()[1:-1]  # without [CLS] and [SEP]
            references[scorer.img_keys[m]].append(decode(ids))
        references = {k: v for k, v in references.items() if v}
        hypotheses = {k: v for k, v in hypotheses.items() if k in references}
        sections["captioning"] = caption_metrics(hypotheses, references) | {"images": float(len(hypotheses))}
        predictions = [{"image": k, "caption": hypotheses[k], "references": references[k]}
                       for k in hypotheses]
    return sections, predictions
