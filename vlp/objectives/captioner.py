"""LAViTeR's image-to-text module (its "ITM", a captioner; not image-text matching) over region outputs.

The paper's captioner is CATR: a 6-layer transformer encoder over the projected Inception grid and a 6-layer
decoder with cross-attention, trained by teacher-forced cross-entropy (Eq. 14). Here the encoder's region
outputs of an image-only pass are the memory (they already carry each region's box), so only the decoder
remains: ``layers`` post-LN transformer decoder layers over token + position embeddings of its own, the
output projection tied to its token embedding. Its vocabulary is the txt_db tokenizer's, so a generated
caption is already in the encoder's input ids (LAViTeR decodes and re-tokenizes; here that is the identity).

Decoding (``greedy_decode``, ``beam_search``) starts from [CLS] and stops at [SEP]; both take a ``step``
function (the prefix [rows, t] -> the next token's log-probabilities [rows, V]) so that they can be tested
on hand-made distributions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp.objectives.common import accuracy_counts, init_head_weights

Step = Callable[[Tensor], Tensor]


def teacher_forcing(input_ids: Tensor, txt_mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(decoder inputs, their mask, targets, target mask) of captions ``[CLS] w1 .. wn [SEP]`` padded at the
    end: the inputs are [CLS] w1 .. wn, the targets w1 .. wn [SEP] (each position predicts the next)."""
    mask = txt_mask.bool()
    return input_ids[:, :-1], mask[:, :-1], input_ids[:, 1:], mask[:, 1:]


def caption_loss(logits: Tensor, targets: Tensor, target_mask: Tensor,
                 name: str = "cap") -> dict[str, Tensor]:
    """Mean cross-entropy over the real target tokens (logits [B, L, V], targets and mask [B, L]) and the
    token accuracy counts."""
    mask = target_mask.bool()
    chosen, wanted = logits[mask].float(), targets[mask]
    loss = F.cross_entropy(chosen, wanted, reduction="sum") / max(wanted.numel(), 1)
    return {f"{name}_loss": loss, **accuracy_counts(name, chosen.argmax(-1), wanted)}


def cut_at(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


@torch.no_grad()
def greedy_decode(step: Step, batch_size: int, bos: int, eos: int, max_len: int,
                  device: torch.device | str = "cpu") -> list[list[int]]:
    """The most probable next token until [SEP] (``eos``, not returned) or ``max_len`` tokens."""
    tokens = torch.full((batch_size, 1), bos, dtype=torch.long, device=device)
    done = torch.zeros(batch_size, dtype=torch.bool, device=device)
    for _ in range(max_len):
        nxt = step(tokens).argmax(-1)
        nxt = nxt.masked_fill(done, eos)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        done |= nxt == eos
        if bool(done.all()):
            break
    return [cut_at(row[1:], eos) for row in tokens.tolist()]


@torch.no_grad()
def beam_search(step: Step, batch_size: int, bos: int, eos: int, max_len: int, beam_size: int = 3,
                length_penalty: float = 0.0, device: torch.device | str = "cpu") -> list[list[int]]:
    """Beam search: ``step`` gets [batch_size * beam_size, t] prefixes (rows b * beam_size + k belong to
    example b) and returns their next-token log-probabilities. Each step keeps the ``beam_size`` best open
    hypotheses; a candidate ending in [SEP] among the step's ``beam_size`` best joins the ended ones (the
    ``beam_size`` best are kept). An example is done when it has ``beam_size`` ended hypotheses and its best
    open one cannot beat the worst of them; at ``max_len`` the open ones end too. The answer is the ended
    hypothesis of the highest sum of log-probabilities / length ** ``length_penalty`` (length: its tokens
    including [SEP]; 0: no normalisation, and then "cannot beat" is exact). [SEP] is not returned."""
    k = beam_size
    if k < 1 or max_len < 1:
        raise ValueError(f"beam_search needs beam_size >= 1 and max_len >= 1, got {beam_size}, {max_len}")
    tokens = torch.full((batch_size * k, 1), bos, dtype=torch.long, device=device)
    scores = torch.full((batch_size, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # one open hypothesis to start with, not k copies of it
    ended: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch_size)]
    done = [False] * batch_size

    def normalised(score: float, length: int) -> float:
        return score / (length**length_penalty) if length_penalty else score

    def end(b: int, score: float, hypothesis: list[int]) -> None:
        ended[b].append((score, hypothesis))
        ended[b].sort(key=lambda h: -h[0])
        del ended[b][k:]

    for t in range(1, max_len + 1):
        logp = step(tokens).float()
        vocab = logp.shape[-1]
        cand = (scores[..., None] + logp.view(batch_size, k, vocab)).view(batch_size, -1)
        top, index = cand.topk(min(2 * k, cand.shape[1]), dim=1)
        new_rows, new_tokens, new_scores = [], [], []
        for b in range(batch_size):
            rows, toks, vals = [], [], []
            for rank, (value, flat) in enumerate(zip(top[b].tolist(), index[b].tolist(), strict=True)):
                if done[b] or value == float("-inf") or len(rows) == k:
                    break
                beam, token = divmod(flat, vocab)
                if token == eos:
                    if rank < k:
                        end(b, normalised(value, t), tokens[b * k + beam, 1:].tolist())
                    continue
                rows.append(b * k + beam)
                toks.append(token)
                vals.append(value)
            if not done[b] and len(ended[b]) == k:
                best_open = max(vals, default=float("-inf"))
                done[b] = best_open == float("-inf") or normalised(best_open, t) <= ended[b][-1][0]
            while len(rows) < k:  # a finished example (or too few candidates) keeps dead rows
                rows.append(b * k)
                toks.append(eos)
                vals.append(float("-inf"))
            new_rows += rows
            new_tokens += toks
            new_scores.append(vals)
        tokens = torch.cat([tokens[new_rows], torch.tensor(new_tokens, device=device)[:, None]], dim=1)
        scores = torch.tensor(new_scores, device=device)
        if all(done):
            break
    for b in range(batch_size):
        if not done[b]:  # max_len reached: the open hypotheses end here
            for beam in range(k):
                if scores[b, beam] > float("-inf"):
                    end(b, normalised(float(scores[b, beam]), tokens.shape[1] - 1),
                        tokens[b * k + beam, 1:].tolist())
    return [cut_at(hyps[0][1], eos) if hyps else [] for hyps in ended]


class Captioner(nn.Module):
    """Transformer decoder over region memory; ``logits`` for teacher forcing, ``generate`` to decode."""

    def __init__(self, hidden_size: int, vocab_size: int, *, bos_id: int, eos_id: int, pad_id: int = 0,
                 layers: int = 2, heads: int = 4, max_len: int = 64, dropout: float = 0.1,
                 initializer_range: float = 0.02) -> None:
        super().__init__()
        if layers < 1 or heads < 1 or hidden_size % heads or max_len < 2:
            raise ValueError(f"Captioner needs layers >= 1, heads dividing hidden_size and max_len >= 2, got "
                             f"layers {layers}, heads {heads}, hidden {hidden_size}, max_len {max_len}")
        self.bos_id, self.eos_id, self.pad_id, self.max_len = bos_id, eos_id, pad_id, max_len
        self.token_embeddings = nn.Embedding(vocab_size, hidden_size)
        self.position_embeddings = nn.Embedding(max_len, hidden_size)
        self.layer_norm = nn.LayerNorm(hidden_size)
        self.dropout = nn.Dropout(dropout)
        layer = nn.TransformerDecoderLayer(hidden_size, heads, 4 * hidden_size, dropout, activation="gelu",
                                           batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, layers)
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        init_head_weights(self, initializer_range)
        nn.init.normal_(self.token_embeddings.weight, std=initializer_range)
        nn.init.normal_(self.position_embeddings.weight, std=initializer_range)

    def logits(self, memory: Tensor, memory_mask: Tensor, tokens: Tensor,
               token_mask: Tensor | None = None) -> Tensor:
        """[B, L, V] next-token logits of every prefix of ``tokens`` [B, L] given ``memory`` [B, N, H] (real
        where ``memory_mask``)."""
        length = tokens.shape[1]
        if length > self.max_len:
            raise ValueError(f"Captioner: {length} tokens, more than its max_len {self.max_len}")
        positions = torch.arange(length, device=tokens.device)
        x = self.dropout(self.layer_norm(self.token_embeddings(tokens) + self.position_embeddings(positions)))
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool, device=tokens.device), diagonal=1)
        pad = None if token_mask is None else ~token_mask.bool()
        h = self.decoder(x, memory, tgt_mask=causal, tgt_key_padding_mask=pad,
                         memory_key_padding_mask=~memory_mask.bool())
        return F.linear(h, self.token_embeddings.weight, self.bias)

    def forward(self, memory: Tensor, memory_mask: Tensor, input_ids: Tensor, txt_mask: Tensor,
                name: str = "cap") -> tuple[dict[str, Tensor], Tensor]:
        """Teacher-forced cross-entropy of the captions (``{name}_loss``, accuracy counts) and the logits."""
        inputs, input_mask, targets, target_mask = teacher_forcing(input_ids, txt_mask)
        logits = self.logits(memory, memory_mask, inputs, input_mask)
        return caption_loss(logits, targets, target_mask, name), logits

    def step_fn(self, memory: Tensor, memory_mask: Tensor) -> Step:
        def step(tokens: Tensor) -> Tensor:
            rows = tokens.shape[0] // memory.shape[0]
            mem = memory.repeat_interleave(rows, dim=0)
            mask = memory_mask.repeat_interleave(rows, dim=0)
            return self.logits(mem, mask, tokens)[:, -1].float().log_softmax(-1)

        return step

    @torch.no_grad()
    def generate(self, memory: Tensor, memory_mask: Tensor, max_len: int | None = None,
                 beam_size: int = 1, length_penalty: float = 0.0) -> list[list[int]]:
        """Token ids of each image's caption (without [CLS] and [SEP]): greedy for ``beam_size`` 1."""
        max_len = min(max_len or self.max_len - 1, self.max_len - 1)
        step = self.step_fn(memory, memory_mask)
        if beam_size == 1:
            return greedy_decode(step, memory.shape[0], self.bos_id, self.eos_id, max_len, memory.device)
        return beam_search(step, memory.shape[0], self.bos_id, self.eos_id, max_len, beam_size,
                           length_penalty, memory.device)


def fake_captions(predicted: Tensor, target_mask: Tensor, bos: int, eos: int,
                  pad: int) -> tuple[Tensor, Tensor, Tensor]:
    """LAViTeR's fake caption from teacher-forced predictions [B, L] (the argmax at each target position):
    (input_ids [B, L + 1] = [CLS] + the predictions up to the first [SEP] (or the end of the real caption) +
    [SEP], position_ids, txt_mask). Not differentiable: L_FT trains only the encoders."""
    b, length = predicted.shape
    device = predicted.device
    real = target_mask.bool()
    stop = (predicted == eos) | (predicted == pad) | ~real
    # The first stop position of each row (the length of the fake words).
    index = torch.arange(length, device=device).expand(b, length)
    words = torch.where(stop, index, torch.full_like(index, length)).min(dim=1).values
    ids = torch.full((b, length + 2), pad, dtype=torch.long, device=device)
    ids[:, 0] = bos
    keep = index < words[:, None]
    ids[:, 1:-1] = torch.where(keep, predicted, torch.full_like(predicted, pad))
    ids[torch.arange(b, device=device), words + 1] = eos
    mask = torch.arange(length + 2, device=device)[None, :] <= (words + 1)[:, None]
    positions = torch.arange(length + 2, device=device).expand(b, length + 2).clone()
    width = int(words.max()) + 2
    return ids[:, :width], positions[:, :width], mask[:, :width]
