"""DAMSM matching losses (AttnGAN, Xu et al. 2018) on unimodal passes of the one single-stream encoder:
LAViTeR's visual-textual alignment (VTA, Eq. 8) in region-feature space.

Features (``VTA.text_features`` / ``VTA.image_features``): each caption goes through the encoder alone (no
regions) and each image alone (no text), as ITC does (``vlp.objectives.itc``). Word features e are the text
outputs at the words ([CLS] and [SEP] left out, as AttnGAN's captions have neither; ``cls_sep`` keeps them),
projected to ``embed_dim``; the sentence feature ē is the projected mean of all real text outputs. Region
features v are the region outputs, projected; the image feature v̄ is the projected mean of the real region
outputs (AttnGAN: a 1x1 conv of Inception's mixed_6e grid and a linear map of its last pooling).

Word level (AttnGAN's ``words_loss`` / ``func_attention``), for caption c and image m:

* s = e v^T (words x regions, raw dot products);
* s̄ = softmax of s over the caption's words (for each region), α = softmax of γ1 s̄ over the image's regions;
* context of word t: c_t = sum_n α_tn v_n; R(c_t, e_t) = cos(c_t, e_t);
* R(c, m) = log sum_t exp(γ2 R(c_t, e_t)) (the official code has no 1/γ2 exponent, nor does this).

Sentence level: R(c, m) = cos(v̄_m, ē_c). Either level's in-batch scores, times γ3, give two cross-entropies:
each image picks its caption among the batch's captions and each caption its image (L_w1 + L_w2, L_s1 +
L_s2; means over the batch, as the code's ``nn.CrossEntropyLoss``). Captions of the same image in one batch
are not negatives of each other: like AttnGAN's same-class mask, those entries are left out of the softmax.

Padding: padded words take no part in either softmax nor in the log-sum-exp, padded regions none in α. An
example without words (a generated caption that starts with [SEP]) or without regions has no word-level score
and is left out of the word-level loss (rows and columns). Everything here runs in fp32, even under autocast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp.model.uniter import UniterModel
from vlp.objectives.common import init_head_weights
from vlp.objectives.itc import positives
from vlp.objectives.itm import word_positions

GAMMAS = (4.0, 5.0, 10.0)  # γ1, γ2, γ3 of AttnGAN's and LAViTeR's code (COCO and CUB)
EPS = 1e-8  # AttnGAN's cosine_similarity eps
PAD_COS = -1e4


def _fp32(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


def word_region_scores(words: Tensor, word_mask: Tensor, regions: Tensor, region_mask: Tensor,
                       gamma1: float = GAMMAS[0], gamma2: float = GAMMAS[1]) -> Tensor:
    """R(caption c, image m) of DAMSM's word level for every caption x image: ``[C, M]``.

    words [C, T, d] with word_mask Bool[C, T]; regions [M, N, d] with region_mask Bool[M, N]. A caption
    without words or an image without regions scores -inf (``valid_examples`` leaves them out).
    Memory is O(C M T N^2), never C M T d: the context vectors enter only through their dot products with the
    words (sum_n α s) and their norms (α^T (v v^T) α).
    """
    with _fp32(words.device):
        words, regions = words.float(), regions.float()
        word_mask, region_mask = word_mask.bool(), region_mask.bool()
        raw = torch.einsum("ctd,mnd->cmtn", words, regions)  # s, [C, M, T, N]
        neg = torch.finfo(raw.dtype).min
        words_real = word_mask[:, None, :, None]
        regions_real = region_mask[None, :, None, :]
        s_bar = raw.masked_fill(~words_real, neg).softmax(dim=2).masked_fill(~words_real, 0.0)
        alpha = (gamma1 * s_bar).masked_fill(~regions_real, neg).softmax(dim=3)
        alpha = alpha.masked_fill(~regions_real, 0.0)
        dot = (alpha * raw).sum(-1)  # c_t . e_t, [C, M, T]
        gram = torch.einsum("mnd,mkd->mnk", regions, regions)
        context_sq = (torch.einsum("cmtn,mnk->cmtk", alpha, gram) * alpha).sum(-1)
        context_norm = context_sq.clamp_min(EPS**2).sqrt()
        word_norm = words.norm(dim=-1)[:, None, :]
        cos = dot / (context_norm * word_norm).clamp_min(EPS)
        # Padded words: a finite floor (cos >= -1) that exp() turns into exactly 0 next to any real word; -inf
        # would give NaN gradients through the log-sum-exp of a caption without words.
        cos = cos.masked_fill(~word_mask[:, None, :], PAD_COS)
        scores = torch.logsumexp(gamma2 * cos, dim=2)
        empty = ~word_mask.any(1)[:, None] | ~region_mask.any(1)[None, :]
        return scores.masked_fill(empty, float("-inf"))


def sentence_scores(sentences: Tensor, images: Tensor) -> Tensor:
    """cos(ē_c, v̄_m) for every caption x image: ``[C, M]``."""
    with _fp32(sentences.device):
        s, v = sentences.float(), images.float()
        return (s @ v.T) / (s.norm(dim=-1)[:, None] * v.norm(dim=-1)[None, :]).clamp_min(EPS)


def matching_losses(scores: Tensor, pos: Tensor, gamma3: float = GAMMAS[2],
                    valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, int]:
    """In-batch DAMSM cross-entropies of ``scores`` [B captions, B images] (example i's caption and image
    belong together; ``pos`` [B, B] marks every pair of the same image): (image -> caption loss (L_1: each
    image's softmax over the captions), caption -> image loss (L_2), top-1 hits of both directions, the
    number of rankings the hits count). The other positives of a row are left out of its softmax. ``valid``
    [B] keeps only those examples."""
    if valid is not None and not bool(valid.all()):
        keep = valid.nonzero(as_tuple=True)[0]
        scores, pos = scores[keep][:, keep], pos[keep][:, keep]
    size = scores.shape[0]
    if size == 0:
        zero = scores.nan_to_num(0.0, 0.0, 0.0).sum() * 0.0
        return zero, zero, torch.zeros((), dtype=torch.long, device=scores.device), 0
    eye = torch.eye(size, dtype=torch.bool, device=scores.device)
    logits = (gamma3 * scores.float()).masked_fill(pos.to(scores.device) & ~eye, float("-inf"))
    labels = torch.arange(size, device=scores.device)
    caption_to_image = F.cross_entropy(logits, labels)
    image_to_caption = F.cross_entropy(logits.T, labels)
    hits = (logits.argmax(1) == labels).sum() + (logits.T.argmax(1) == labels).sum()
    return image_to_caption, caption_to_image, hits.detach(), 2 * size


def valid_examples(word_mask: Tensor, region_mask: Tensor) -> Tensor:
    """[B]: the examples that have a word-level score (at least one word and one region)."""
    return word_mask.bool().any(1) & region_mask.bool().any(1)


@dataclass
class TextFeatures:
    words: Tensor  # [B, T, d] projected word outputs (zeros outside word_mask)
    word_mask: Tensor  # Bool[B, T]
    sentence: Tensor  # [B, d]


@dataclass
class ImageFeatures:
    regions: Tensor  # [B, N, d] projected region outputs
    region_mask: Tensor  # Bool[B, N]
    image: Tensor  # [B, d]
    hidden: Tensor  # [B, N, H] the encoder's region outputs (the captioner reads them)


def _masked_mean(seq: Tensor, mask: Tensor) -> Tensor:
    mask = mask.to(seq.dtype)
    return (seq * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)


class VTA(nn.Module):
    """The ``vta`` pretraining task: DAMSM word + sentence losses, both directions (L_VTA, LAViTeR Eq. 8)."""

    requires: tuple[str, ...] = ()

    def __init__(self, model: UniterModel, *, embed_dim: int = 256, gamma1: float = GAMMAS[0],
                 gamma2: float = GAMMAS[1], gamma3: float = GAMMAS[2], cls_sep: bool = False) -> None:
        super().__init__()
        if embed_dim < 1 or min(gamma1, gamma2, gamma3) <= 0:
            raise ValueError(f"VTA needs embed_dim >= 1 and gammas > 0, got {embed_dim}, "
                             f"{(gamma1, gamma2, gamma3)}")
        hidden = model.config.hidden_size
        self.gammas = (gamma1, gamma2, gamma3)
        self.cls_sep = cls_sep
        self.word_proj = nn.Linear(hidden, embed_dim)
        self.sentence_proj = nn.Linear(hidden, embed_dim)
        self.region_proj = nn.Linear(hidden, embed_dim)
        self.image_proj = nn.Linear(hidden, embed_dim)
        init_head_weights(self, model.config.initializer_range)

    def prepare(self, batch: dict, generator: torch.Generator) -> dict:
        return batch

    def text_features(self, model: UniterModel, input_ids: Tensor, position_ids: Tensor,
                      txt_mask: Tensor) -> TextFeatures:
        b, device = input_ids.shape[0], input_ids.device
        seq = model(input_ids=input_ids, position_ids=position_ids, txt_mask=txt_mask,
                    img_feat=torch.zeros(b, 0, model.config.img_dim, device=device),
                    img_pos_feat=torch.zeros(b, 0, model.config.pos_dim, device=device),
                    img_mask=torch.zeros(b, 0, dtype=torch.bool, device=device)).sequence_output
        word_mask = word_positions(txt_mask.bool(), self.cls_sep)
        words = self.word_proj(seq) * word_mask[..., None]
        return TextFeatures(words, word_mask, self.sentence_proj(_masked_mean(seq, txt_mask.bool())))

    def image_features(self, model: UniterModel, img_feat: Tensor, img_pos_feat: Tensor,
                       img_mask: Tensor) -> ImageFeatures:
        b, device = img_feat.shape[0], img_feat.device
        empty = torch.zeros(b, 0, dtype=torch.long, device=device)
        seq = model(input_ids=empty, position_ids=empty, txt_mask=empty.bool(), img_feat=img_feat,
                    img_pos_feat=img_pos_feat, img_mask=img_mask).sequence_output
        mask = img_mask.bool()
        return ImageFeatures(self.region_proj(seq) * mask[..., None], mask,
                             self.image_proj(_masked_mean(seq, mask)), seq)

    def batch_text(self, model: UniterModel, batch: dict) -> TextFeatures:
        return self.text_features(model, batch["input_ids"], batch["position_ids"], batch["txt_mask"])

    def batch_image(self, model: UniterModel, batch: dict) -> ImageFeatures:
        return self.image_features(model, batch["img_feat"], batch["img_pos_feat"], batch["img_mask"])

    def scores(self, text: TextFeatures, image: ImageFeatures) -> tuple[Tensor, Tensor]:
        """(word-level, sentence-level) scores [captions, images]."""
        gamma1, gamma2, _ = self.gammas
        word = word_region_scores(text.words, text.word_mask, image.regions, image.region_mask, gamma1,
                                  gamma2)
        return word, sentence_scores(text.sentence, image.image)

    def losses(self, text: TextFeatures, image: ImageFeatures, pos: Tensor) -> dict[str, Tensor]:
        """``word`` (L_w1 + L_w2), ``sentence`` (L_s1 + L_s2) and ``hits`` (in-batch top-1 of both levels and
        directions) and ``count`` (the rankings they count) of the batch's pairs, example i's text with
        example i's image."""
        word, sentence = self.scores(text, image)
        gamma3 = self.gammas[2]
        valid = valid_examples(text.word_mask, image.region_mask)
        w1, w2, w_hits, w_count = matching_losses(word, pos, gamma3, valid)
        s1, s2, s_hits, s_count = matching_losses(sentence, pos, gamma3)
        return {"word": w1 + w2, "sentence": s1 + s2, "hits": w_hits + s_hits,
                "count": torch.tensor(w_count + s_count, device=pos.device)}

    def forward(self, model: UniterModel, batch: dict) -> dict[str, Tensor]:
        text, image = self.batch_text(model, batch), self.batch_image(model, batch)
        pos = positives(batch["img_keys"]).to(text.words.device)
        out = self.losses(text, image, pos)
        return {"vta_word_loss": out["word"], "vta_sentence_loss": out["sentence"],
                "vta_correct": out["hits"], "vta_count": out["count"]}
