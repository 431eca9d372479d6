"""Validation of a pretraining run: per-task loss and accuracy on the held-out split, zero-shot image/text
retrieval with the ITM head (every pair, or ALBEF's way for a model with the itc task: the contrastive
similarity shortlists, the ITM head reranks) and, for a model with DAMSM heads (vta / laviter), LAViTeR's
zero-shot evaluation (``DamsmValidation``).

Each worker evaluates its own shard of the held-out batches (the same masks at every validation: the
generators are seeded by batch); the sums of losses and of correct/count are added across workers, so the
numbers are exact whatever the number of workers. Retrieval splits the images of the score matrix across
workers and adds the partial matrices. In one process every collective is a no-op.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from vlp import distributed
from vlp.data.batching import UnitBatchSampler
from vlp.data.collate import collate
from vlp.data.img_db import ImgDb
from vlp.data.pretrain_dataset import ImageTextIndex, PretrainDataset
from vlp.eval.retrieval import recall_at_k, score_all_pairs, shortlist_rerank
from vlp.objectives.common import encode
from vlp.tasks.laviter import LaviterEvalOptions, damsm_heads, laviter_evaluation
from vlp.tasks.retrieval import PairScorer, Retrieval
from vlp.train.device import to_device
from vlp.train.metrics import MetricSums
from vlp.train.precision import Autocast
from vlp.train.prepared import prepared_loader
from vlp.train.pretrain_model import PretrainModel, target_count


@torch.no_grad()
def validate_tasks(model: PretrainModel, tasks: Sequence[str], examples: Dataset,
                   lengths: tuple[np.ndarray, np.ndarray], max_units: int, seed: int, pad_id: int,
                   device: torch.device, autocast: Autocast) -> dict[str, float]:
    """``<loss name>`` (mean over the task's targets) and ``<name>_acc`` of every task, over all workers;
    ``seed`` is the root seed the validation masks derive from."""
    was_training = model.training
    model.eval()
    metrics: dict[str, float] = {}
    for task in sorted(tasks):
        objective = model.objectives[task]
        sampler = UnitBatchSampler(*lengths, max_units, rank=distributed.rank(),
                                   world_size=distributed.world_size(), shuffle=False, even_shards=False,
                                   infinite=False)
        sums = MetricSums()
        for batch in prepared_loader(examples, sampler, objective.prepare, seed, f"val/{task}", pad_id):
            batch = to_device(batch, device)
            with autocast():
                out = model(task, batch)
            sums.add(out, target_count(objective, batch))
        metrics |= sums.reduced().metrics()
    model.train(was_training)
    return dict(sorted(metrics.items()))


def retrieval_index(dataset: PretrainDataset) -> tuple[ImageTextIndex, list[torch.Tensor]]:
    """The image/text index of a retrieval split and each text's input ids ([CLS] ... [SEP])."""
    index = ImageTextIndex.from_dataset(dataset)
    texts = [dataset[j]["input_ids"] for j in range(len(dataset))]
    return index, texts


class RetrievalScorer:
    """ITM score (matched logit minus mismatched) of image x text pairs of one retrieval split."""

    def __init__(self, model: PretrainModel, img_db: ImgDb, index: ImageTextIndex, texts: list[torch.Tensor],
                 pad_id: int, device: torch.device, autocast: Autocast):
        self.model, self.img_db, self.index, self.texts = model, img_db, index, texts
        self.pad_id, self.device, self.autocast = pad_id, device, autocast

    def scores(self, images: Sequence[int], txt_idx: torch.Tensor) -> torch.Tensor:
        """[len(images), len(txt_idx)] scores; ``images`` index ``index.img_keys``."""
        examples = []
        for m in images:
            key = self.index.img_keys[m]
            region = self.img_db.get(key)
            for t in txt_idx.tolist():
                examples.append({"input_ids": self.texts[t], "img_feat": region.features,
                                 "img_pos_feat": region.boxes, "img_key": key,
                                 "txt_id": self.index.txt_ids[t]})
        batch = to_device(collate(examples, pad_id=self.pad_id), self.device)
        encoder, head = self.model.encoder, self.model.objectives["itm"].head
        with self.autocast():
            logits = head(encoder.pool(encode(encoder, batch))).float()
        return (logits[:, 1] - logits[:, 0]).view(len(images), txt_idx.numel())

    def itc_similarity(self, chunk: int = 64) -> torch.Tensor:
        """[n_img, n_txt] cosine similarity of the itc task's unimodal embeddings (every worker computes it
        whole: one pass per image and per text)."""
        encoder, itc = self.model.encoder, self.model.objectives["itc"]
        keys, images, texts = self.index.img_keys, [], []
        for start in range(0, len(keys), chunk):
            regions = [self.img_db.get(key) for key in keys[start:start + chunk]]
            n = max(r.features.shape[0] for r in regions)
            feat = torch.zeros(len(regions), n, regions[0].features.shape[1])
            pos = torch.zeros(len(regions), n, regions[0].boxes.shape[1])
            mask = torch.zeros(len(regions), n, dtype=torch.bool)
            for i, r in enumerate(regions):
                feat[i, : r.features.shape[0]] = torch.as_tensor(r.features)
                pos[i, : r.boxes.shape[0]] = torch.as_tensor(r.boxes)
                mask[i, : r.features.shape[0]] = True
            with self.autocast():
                images.append(itc.embed_images(encoder, feat.to(self.device), pos.to(self.device),
                                               mask.to(self.device)))
        for start in range(0, len(self.texts), chunk):
            rows = self.texts[start:start + chunk]
            ids = torch.full((len(rows), max(len(r) for r in rows)), self.pad_id, dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = torch.as_tensor(r)
            mask = torch.arange(ids.shape[1]) < torch.tensor([len(r) for r in rows])[:, None]
            position = torch.arange(ids.shape[1]).repeat(len(rows), 1)
            with self.autocast():
                texts.append(itc.embed_texts(encoder, ids.to(self.device), position.to(self.device),
                                             mask.to(self.device)))
        return (torch.cat(images) @ torch.cat(texts).T).float().cpu()


@torch.no_grad()
def zero_shot_retrieval(scorer: RetrievalScorer, chunk: tuple[int, int], modes: Sequence[str] = ("full",),
                        shortlist_k: int = 16) -> dict[str, float]:
    """Recall@1/5/10 both ways: ``full`` over the ITM score of every pair (workers score interleaved image
    rows; keys ``ir_r1``...), ``itc_rerank`` over the ITM scores of the itc similarity's shortlists
    (``vlp.eval.retrieval.shortlist_rerank``, workers rerank interleaved texts; ``itc_rerank_ir_r1``...) and
    over the similarity itself (``itc_ir_r1``...)."""
    was_training = scorer.model.training
    scorer.model.eval()
    n_img, n_txt = len(scorer.index.img_keys), len(scorer.index.txt_ids)
    rank, world = distributed.rank(), distributed.world_size()
    out: dict[str, float] = {}
    if "full" in modes:
        mine = list(range(rank, n_img, world))
        matrix = torch.zeros(n_img, n_txt)
        if mine:
            def score_fn(img_idx: torch.Tensor, txt_idx: torch.Tensor) -> torch.Tensor:
                return scorer.scores([mine[i] for i in img_idx.tolist()], txt_idx)

            matrix[mine] = score_all_pairs(score_fn, len(mine), n_txt, *chunk)
        matrix = distributed.all_reduce_sum(matrix)
        out |= recall_at_k(matrix, scorer.index.txt2img)
    if "itc_rerank" in modes:
        sim = scorer.itc_similarity()
        out |= {f"itc_{k}": v for k, v in recall_at_k(sim, scorer.index.txt2img).items()}
        part = shortlist_rerank(sim, lambda i, t: scorer.scores(i.tolist(), t), shortlist_k,
                                chunk[0] * chunk[1], texts=range(rank, n_txt, world))
        scored = torch.isfinite(part)
        total = distributed.all_reduce_sum(torch.where(scored, part, torch.zeros(())))
        scored = distributed.all_reduce_sum(scored.float()) > 0
        reranked = torch.where(scored, total, torch.full((), float("-inf")))
        out |= {f"itc_rerank_{k}": v for k, v in recall_at_k(reranked, scorer.index.txt2img).items()}
    scorer.model.train(was_training)
    return out



class DamsmValidation:
    """LAViTeR's zero-shot evaluation of the retrieval split during pretraining (``vlp.tasks.laviter``):
    ``zs_damsm_*`` (recall by DAMSM cosines), ``r_precision`` / ``r_precision_top3`` (one draw of the 99
    negatives), with a generator ``r_precision_generated`` and the Fréchet distances, with a captioner
    ``bleu1``..``bleu4`` / ``cider`` of greedy captions (``decode``: token ids -> text). Every worker computes
    the same numbers (the split is small); AIMCoS needs the world's objects: the eval stage has it."""

    OPTIONS = LaviterEvalOptions(repeats=1, beam_size=1)

    def __init__(self, model: PretrainModel, dataset: PretrainDataset, pad_id: int, device: torch.device,
                 autocast: Autocast, decode: Callable[[list[int]], str]):
        index, texts = retrieval_index(dataset)
        self.model, self.txt2img, self.decode = model, index.txt2img, decode
        self.scorer = PairScorer(model.encoder, Retrieval(model.encoder.config), dataset.img_db,
                                 index.img_keys, texts, pad_id=pad_id, device=device, autocast=autocast)

    def __call__(self) -> dict[str, float]:
        vta, laviter = damsm_heads(self.model.objectives)
        if vta is None:
            return {}
        sections, _ = laviter_evaluation(self.model.encoder, vta, laviter, self.scorer, self.txt2img,
                                         self.decode, self.OPTIONS)
        out = {f"zs_damsm_{k}": v for k, v in sections["damsm"].items()}
        out |= {k: v for k, v in sections["laviter"].items() if not k.endswith("_std") and k != "candidates"}
        return out | {k: v for k, v in sections.get("captioning", {}).items() if k != "images"}
