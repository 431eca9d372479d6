"""IAIS: inter-modal alignment on intra-modal self-attentions (Ren et al., ACL 2021).

For a matched image-text pair, the last layer's text->text self-attention should describe the same
relations as its image->image self-attention once words and regions are put in correspondence. The
regularizer builds, for each anchor modality, a *mirror* of its intra-modal attention out of the
other modality and the inter-modal attention, and pulls the two together with a symmetric matrix KL.

Attention blocks. From the last layer's probabilities ``attn [B, heads, Lt+N, Lt+N]`` (text block
first, each block padded at its end) four blocks are cut, each row renormalized over the real keys of
its block, then averaged over heads: S_LL (text->text), S_LV (text->image), S_VL (image->text) and
S_VV (image->image). Renormalizing a softmax row over a key subset is exactly a softmax over those
keys' logits, which is how the reference implementation computes the blocks.

Mirrors (a = anchor):
* singular: every anchor token is mapped to its most attended token of the other modality
  (argmax of the head-averaged S_LV for words, of S_VL for regions; Algorithm 2), and the mirror is the
  other modality's self-attention read at the mapped positions, ``S_VV[m(i), m(j)]``, made a row
  distribution over j by ``singular_mirror``:

  - ``scores`` (default; the paper, Eq. 10-11: sigma(S^(s)), a softmax over the gathered attention
    *scores*): per head, softmax_j of the scores s[m(i), m(j)], then averaged over heads. Within one row
    a softmax's log-probabilities are the scores minus one constant, so this is the softmax of the
    gathered log-probabilities, i.e. the gathered probabilities of each head renormalized over j.
  - ``probabilities`` (the official code, lancopku/IAIS ``model/model.py`` ``iais_singular``:
    ``Softmax(img_attn[rows, cols])``): a softmax over the gathered head-averaged *probabilities*, used as
    logits. Probabilities lie in [0, 1], so these targets are nearly uniform (METHODS.md, IAIS Table 2).

  The argmax is not differentiable; gradients reach the gathered attention.
* distributed: soft mapping through the inter-modal attention, text mirror ``S_LV @ S_VL`` and
  image mirror ``S_VL @ S_LV`` (the paper's sigma(S_LV) sigma(S_VL), Eq. 12); rows stay distributions.

Distance: ``m-KL(P, Q) = mean over real rows i of KL(P_i || Q_i) + KL(Q_i || P_i)``: the official code's
``KLDivLoss(reduction="batchmean")`` on one pair's [rows, cols] matrices (the paper's Eq. 8 writes a sum
over rows; ISDa, ``vlp.eval.isda``, follows the paper). The per-pair distances are reduced over the
positive pairs by ``positives``:

  - ``mean`` (default): the paper's Eq. 15 adds L_IAIS to the margin loss of Eq. 14 with the same
    reduction over positives, so lambda_t weighs one against the other; here both are means.
  - ``sum``: the official code (``train_itm_hard_negatives.py``) divides the rank loss by the positives
    of a step (``train_batch_size``, 8) but adds every positive's IAIS loss as it is: the effective
    weight is (positives per step) x lambda_t.

Both anchors' distances are added (the reference code alternates the text and image anchor on its two
hard-negative batches of a step, i.e. it also adds both per step). Gradients flow into both sides, so the
two modalities calibrate each other.

The loss is unweighted; the training loop multiplies it by ``weight(step, total)``, the annealing
schedule (the paper uses ``exp``: lambda_t = exp((t/T - 1) * gamma) with gamma = 5).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

Anchor = Literal["text", "image"]


class IAISConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    variant: Literal["singular", "distributed"] = "singular"
    # singular mirror's row distribution: the paper's softmax over gathered scores, or the official code's
    # softmax over gathered head-averaged probabilities (see the module docstring)
    singular_mirror: Literal["scores", "probabilities"] = "scores"
    # reduction over the positive pairs: mean (the paper's weighting against the margin loss) or sum (the
    # official code: weight x positives per step)
    positives: Literal["mean", "sum"] = "mean"
    anchors: tuple[Anchor, ...] = ("text", "image")
    schedule: Literal["exp", "linear", "log", "constant"] = "exp"
    gamma: float = Field(5.0, gt=0)  # steepness of the exp / log schedules
    # The text block starts with [CLS] and ends with [SEP]; they are no words, so the reference
    # leaves them out of the relations (first and last real text token of every row).
    drop_cls_sep: bool = True
    eps: float = Field(1e-8, gt=0)  # floor inside the logs of the KL

    @field_validator("anchors")
    @classmethod
    def _distinct_anchors(cls, anchors: tuple[str, ...]) -> tuple[str, ...]:
        if not anchors or len(set(anchors)) != len(anchors):
            raise ValueError(f"anchors must be a non-empty set of 'text'/'image', got {anchors}")
        return anchors


def schedule_weight(schedule: str, step: int, total: int, gamma: float = 5.0) -> float:
    """Annealed weight lambda_t at ``step`` of ``total`` (progress clamped to [0, 1]).

    exp: exp((t/T - 1) * gamma), from e^-gamma up to 1; linear: t/T; log: 1 - exp(-t/T * gamma),
    fast rise then flat; constant: 1.
    """
    if total <= 0:
        raise ValueError(f"schedule_weight: total steps must be positive, got {total}")
    progress = min(max(step / total, 0.0), 1.0)
    if schedule == "exp":
        return math.exp((progress - 1.0) * gamma)
    if schedule == "linear":
        return progress
    if schedule == "log":
        return 1.0 - math.exp(-progress * gamma)
    if schedule == "constant":
        return 1.0
    raise ValueError(f"schedule_weight: unknown schedule {schedule!r} (exp, linear, log, constant)")


def symmetric_matrix_kl(
    p: Tensor, q: Tensor, row_mask: Tensor, col_mask: Tensor, eps: float = 1e-8
) -> Tensor:
    """Per-sample ``mean_i [KL(p_i || q_i) + KL(q_i || p_i)]`` over real rows i and real columns.

    ``p``, ``q``: [B, R, C] row distributions; ``row_mask`` [B, R], ``col_mask`` [B, C] (bool).
    Returns [B]; a sample without real rows gets 0. Uses sum_j (p - q)(log p - log q), which is the
    two KLs added.
    """
    terms = (p - q) * (p.clamp_min(eps).log() - q.clamp_min(eps).log())
    per_row = (terms * col_mask[:, None, :]).sum(-1)
    n_rows = row_mask.sum(-1)
    return (per_row * row_mask).sum(-1) / n_rows.clamp_min(1)


class IAISLoss(nn.Module):
    """The IAIS regularizer on one layer's attention probabilities (see the module docstring)."""

    def __init__(self, config: IAISConfig | None = None):
        super().__init__()
        self.config = config or IAISConfig()

    def weight(self, step: int, total: int) -> float:
        return schedule_weight(self.config.schedule, step, total, self.config.gamma)

    def forward(
        self, attn: Tensor, txt_mask: Tensor, img_mask: Tensor, positives: Tensor,
        anchors: tuple[Anchor, ...] | None = None,
    ) -> dict[str, Tensor]:
        """``attn`` [B, heads, Lt+N, Lt+N] probabilities; masks Bool [B, Lt] / [B, N] (True = real);
        ``positives`` Bool [B], the matched pairs (only they are regularized); ``anchors``: some of the
        configured anchors only (None: all of them).

        Returns ``iais_loss`` (scalar, differentiable) and the detached per-anchor distance
        ``iais_kl_text`` / ``iais_kl_image`` for logging.
        """
        _check_inputs(attn, txt_mask, img_mask, positives)
        cfg = self.config
        anchors = cfg.anchors if anchors is None else anchors
        if not set(anchors) <= set(cfg.anchors):
            raise ValueError(f"IAISLoss: anchors {anchors} are not among the configured {cfg.anchors}")
        zero = attn.sum() * 0.0  # keeps the graph (and DDP's used-parameter bookkeeping) intact
        lt = txt_mask.shape[1]
        words = _word_mask(txt_mask, cfg.drop_cls_sep)
        regions = img_mask
        keep = positives & words.any(1) & regions.any(1)
        out: dict[str, Tensor] = {}
        if not keep.any():
            out["iais_loss"] = zero
            for anchor in anchors:
                out[f"iais_kl_{anchor}"] = zero.detach()
            return out

        a = attn[keep].to(torch.promote_types(attn.dtype, torch.float32))  # fp16/bf16 -> fp32 for the logs
        words, regions = words[keep], regions[keep]
        s_ll = _block(a[:, :, :lt, :lt], words)
        s_lv = _block(a[:, :, :lt, lt:], regions)
        s_vl = _block(a[:, :, lt:, :lt], words)
        s_vv = _block(a[:, :, lt:, lt:], regions)

        total = zero
        for anchor in anchors:
            if anchor == "text":
                own, own_mask = s_ll, words
                mirror = self._mirror(s_lv, s_vl, s_vv, a[:, :, lt:, lt:], regions, words)
            else:
                own, own_mask = s_vv, regions
                mirror = self._mirror(s_vl, s_lv, s_ll, a[:, :, :lt, :lt], words, regions)
            per_pair = symmetric_matrix_kl(own, mirror, own_mask, own_mask, cfg.eps)
            total = total + (per_pair.sum() if cfg.positives == "sum" else per_pair.mean())
            out[f"iais_kl_{anchor}"] = per_pair.mean().detach()  # logged as a mean whatever the reduction
        out["iais_loss"] = total
        return out

    def _mirror(self, to_other: Tensor, from_other: Tensor, other_self: Tensor, other_heads: Tensor,
                other_mask: Tensor, own_mask: Tensor) -> Tensor:
        """Mirror [B, A, A] of the anchor's self-attention built from the other modality. ``other_self`` is
        the other modality's block (heads averaged, rows renormalized), ``other_heads`` [B, H, O, O] its raw
        per-head probabilities."""
        if self.config.variant == "distributed":
            return to_other @ from_other
        # singular: hard map each anchor token to its most attended real token of the other modality
        target = to_other.masked_fill(~other_mask[:, None, :], float("-inf")).argmax(-1)  # [B, A]
        batch = torch.arange(target.shape[0], device=target.device)[:, None, None]
        rows, cols = target[:, :, None], target[:, None, :]
        padding = ~own_mask[:, None, :]  # the anchor's padded columns take no mass
        if self.config.singular_mirror == "probabilities":
            logits = other_self[batch, rows, cols].masked_fill(padding, float("-inf"))
            return logits.softmax(-1)
        # scores: per head, the gathered scores up to a per-row constant (log-probabilities), softmaxed
        log_probs = other_heads.clamp_min(torch.finfo(other_heads.dtype).tiny).log()
        heads = torch.arange(other_heads.shape[1], device=target.device)[None, :, None, None]
        gathered = log_probs[batch[:, :, :, None], heads, rows[:, None], cols[:, None]]  # [B, H, A, A]
        return gathered.masked_fill(padding[:, None], float("-inf")).softmax(-1).mean(1)


def _block(attn: Tensor, key_mask: Tensor) -> Tensor:
    """[B, H, Q, K] probabilities -> [B, Q, K]: rows renormalized over real keys, heads averaged."""
    kept = attn * key_mask[:, None, None, :]
    kept = kept / kept.sum(-1, keepdim=True).clamp_min(torch.finfo(kept.dtype).tiny)
    return kept.mean(1)


def _word_mask(txt_mask: Tensor, drop_cls_sep: bool) -> Tensor:
    if not drop_cls_sep:
        return txt_mask
    lengths = txt_mask.sum(1)
    pos = torch.arange(txt_mask.shape[1], device=txt_mask.device)[None, :]
    return txt_mask & (pos > 0) & (pos < (lengths - 1)[:, None])


def _check_inputs(attn: Tensor, txt_mask: Tensor, img_mask: Tensor, positives: Tensor) -> None:
    if attn.dim() != 4:
        raise ValueError(f"IAISLoss: attn must be [B, heads, Lt+N, Lt+N], got shape {tuple(attn.shape)}")
    b, _, q, k = attn.shape
    if txt_mask.dim() != 2 or img_mask.dim() != 2 or txt_mask.shape[0] != b or img_mask.shape[0] != b:
        raise ValueError(
            f"IAISLoss: txt_mask {tuple(txt_mask.shape)}, img_mask {tuple(img_mask.shape)} must be [B={b}, *]"
        )
    if q != k or q != txt_mask.shape[1] + img_mask.shape[1]:
        raise ValueError(
            f"IAISLoss: attn is {q}x{k}, but txt_mask + img_mask give {txt_mask.shape[1]}+{img_mask.shape[1]}"
        )
    if positives.shape != (b,):
        raise ValueError(f"IAISLoss: positives must be [B={b}], got shape {tuple(positives.shape)}")
    for name, mask in (("txt_mask", txt_mask), ("img_mask", img_mask), ("positives", positives)):
        if mask.dtype != torch.bool:
            raise ValueError(f"IAISLoss: {name} must be bool, got {mask.dtype}")
    for name, mask in (("txt_mask", txt_mask), ("img_mask", img_mask)):
        # Padding sits at the end of each block: a True after a False means a malformed batch.
        if (mask[:, 1:] & ~mask[:, :-1]).any():
            row = (mask[:, 1:] & ~mask[:, :-1]).any(1).nonzero()[0].item()
            raise ValueError(f"IAISLoss: {name} row {row} has a real position after padding")
