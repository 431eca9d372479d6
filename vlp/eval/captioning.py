"""Caption metrics as the COCO caption evaluation (coco-caption / pycocoevalcap) defines them: corpus
BLEU-1..4 and CIDEr (its CIDEr-D variant), pure Python.

pycocoevalcap's scorers need no Java, but its package (~100 MB: Java tools for tokenization, METEOR and SPICE)
is not worth a dependency; these are the same definitions, checked against its output on fixed examples
(tests/test_laviter_metrics.py):

* tokenization: lower case, punctuation dropped, split on white space (what the PTB tokenizer leaves of
  ordinary captions; COCO's also drops a few punctuation tokens);
* BLEU-n (``BleuScorer.compute_score(option="closest")``): clipped n-gram matches and n-gram counts summed
  over the corpus, the geometric mean of the precisions 1..n ((matches + 1e-15) / (count + 1e-9)), times the
  brevity penalty exp(1 - r / c) when the hypotheses' total length c is below r, the sum over hypotheses of
  the reference length closest to each (the shorter one on a tie);
* CIDEr-D (``CiderScorer``, n = 4, σ = 6): tf-idf vectors of each n-gram order (raw counts x (log(number of
  images) - log(max(1, document frequency))), document frequencies over the references, one document per
  image); per reference, per order the clipped dot product sum_g min(h_g, r_g) r_g over the norms, times
  exp(-(Δ bigram count)² / (2 σ²)); the mean over the orders, averaged over the references, times 10; the
  corpus score is the mean over images.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence

_PUNCTUATION = re.compile(r"[^\w\s]")
TINY, SMALL = 1e-15, 1e-9  # coco-caption's guards against empty counts


def tokenize(text: str) -> list[str]:
    return _PUNCTUATION.sub(" ", text.lower()).split()


def ngrams(words: Sequence[str], n: int) -> Counter:
    """Counts of every k-gram, k = 1..n."""
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def _check(hypotheses: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> list[str]:
    if set(hypotheses) != set(references):
        raise ValueError(f"caption metrics: hypotheses and references cover different images "
                         f"({len(set(hypotheses) ^ set(references))} differ)")
    if not hypotheses:
        raise ValueError("caption metrics: no image")
    empty = [k for k, refs in references.items() if not refs]
    if empty:
        raise ValueError(f"caption metrics: image {empty[0]!r} has no reference")
    return sorted(hypotheses)


def bleu(hypotheses: Mapping[str, str], references: Mapping[str, Sequence[str]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n of one hypothesis per image against its references (strings, tokenized here)."""
    guess, correct = [0] * n, [0] * n
    hyp_len = ref_len = 0
    for key in _check(hypotheses, references):
        hyp = tokenize(hypotheses[key])
        refs = [tokenize(r) for r in references[key]]
        counts = ngrams(hyp, n)
        most = Counter()
        for ref in refs:
            for gram, count in ngrams(ref, n).items():
                most[gram] = max(most[gram], count)
        for gram, count in counts.items():
            correct[len(gram) - 1] += min(count, most[gram])
        for k in range(n):
            guess[k] += max(0, len(hyp) - k)
        hyp_len += len(hyp)
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
    scores, product = [], 1.0
    for k in range(n):
        product *= (correct[k] + TINY) / (guess[k] + SMALL)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (hyp_len + TINY) / (ref_len + SMALL)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def cider(hypotheses: Mapping[str, str], references: Mapping[str, Sequence[str]], n: int = 4,
          sigma: float = 6.0) -> tuple[float, dict[str, float]]:
    """(corpus CIDEr-D, each image's score)."""
    keys = _check(hypotheses, references)
    hyps = {k: ngrams(tokenize(hypotheses[k]), n) for k in keys}
    refs = {k: [ngrams(tokenize(r), n) for r in references[k]] for k in keys}
    document_frequency: Counter = Counter()
    for k in keys:
        document_frequency.update({gram for ref in refs[k] for gram in ref})
    log_images = math.log(len(keys))

    def vector(counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(n)]
        norms = [0.0] * n
        bigrams = 0
        for gram, tf in counts.items():
            order = len(gram) - 1
            value = tf * (log_images - math.log(max(1.0, document_frequency[gram])))
            vec[order][gram] = value
            norms[order] += value * value
            if order == 1:
                bigrams += tf
        return vec, [math.sqrt(x) for x in norms], bigrams

    per_image = {}
    for k in keys:
        vec, norm, length = vector(hyps[k])
        total = [0.0] * n
        for ref in refs[k]:
            rvec, rnorm, rlength = vector(ref)
            penalty = math.exp(-((length - rlength) ** 2) / (2 * sigma**2))
            for order in range(n):
                dot = sum(min(v, rvec[order].get(g, 0.0)) * rvec[order].get(g, 0.0)
                          for g, v in vec[order].items())
                if norm[order] and rnorm[order]:
                    dot /= norm[order] * rnorm[order]
                total[order] += dot * penalty
        per_image[k] = sum(total) / n / len(refs[k]) * 10.0
    return sum(per_image.values()) / len(per_image), per_image


def caption_metrics(hypotheses: Mapping[str, str],
                    references: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """``bleu1`` .. ``bleu4`` and ``cider`` of a corpus (fractions, as coco-caption reports them)."""
    scores = {f"bleu{k + 1}": v for k, v in enumerate(bleu(hypotheses, references))}
    return scores | {"cider": cider(hypotheses, references)[0]}
