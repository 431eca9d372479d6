"""VQA v2: the official answer normalization, answer vocabulary, soft targets and accuracy.

The rules follow the official evaluation (GT-Vision-Lab/VQA ``vqaEval.py``), re-implemented here:

* punctuation: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted when it touches a
  space anywhere in the answer (or when the answer has a digit-comma-digit like ``1,000``), and is
  replaced by a space otherwise; then every ``.`` not followed by a digit is deleted (``3.5`` stays).
  The apostrophe and ``:`` are kept.
* digits and articles: lowercase, split on whitespace, number words ``none``/``zero``..``ten``
  become ``0``..``10``, the articles ``a an the`` are dropped, and apostrophe-less contractions are
  restored (``dont`` -> ``don't``).

The official accuracy of an answer is the mean over the 10 leave-one-out subsets of 9 human
answers of ``min(1, #matches / 3)``; the prediction gets both normalizations, the human answers
only the punctuation one, and only when they are not all identical (exactly as the official code).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Literal

_PUNCT = ';/[]"{}()=+\\_-><@`,?!'  # one character each, in the official order
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})

# The contracted forms the official table restores. Its keys are each form with exactly one
# apostrophe removed ("couldn't've" <- "couldnt've", "couldn'tve"), which is how it is built here.
# Forms whose keys are capitalized in the official table ("I'm", "I've", "I'd've") are left out: the
# words are lowercased before the lookup, so those entries can never match.
_CONTRACTED = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't
he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've
mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't
shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's
something'd something'd've something'll that's there'd there'd've there're there's they'd they'd've
they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's
where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't would've
wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've
""".split()


def _contraction_table() -> dict[str, str]:
    table = {}
    for form in _CONTRACTED:
        for i, ch in enumerate(form):
            if ch == "'":
                table[form[:i] + form[i + 1 :]] = form
    # The official table maps this one backwards; kept so scores match the official tool.
    table["somebody'd"] = "somebodyd"
    return table


_CONTRACTIONS = _contraction_table()


def process_punctuation(text: str) -> str:
    """The official punctuation step (see the module docstring)."""
    drop = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in _PUNCT:
        out = out.replace(p, "" if drop or (p + " " in text) or (" " + p in text) else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def process_digit_article(text: str) -> str:
    """The official digits/articles/contractions step (see the module docstring)."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(answer: str) -> str:
    """Full normalization, as applied to predictions: whitespace, punctuation, digits, articles."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """Official VQA accuracy of one prediction against the 10 human answers, in [0, 1]."""
    if len(human_answers) == 0:
        raise ValueError("vqa_accuracy: a question needs at least one human answer")
    pred = normalize_answer(prediction)
    gts = list(human_answers)
    if len(set(gts)) > 1:
        gts = [process_punctuation(a) for a in gts]
    matches = sum(a == pred for a in gts)
    # Leaving out one of the matching answers leaves matches - 1 of them; leaving out another, matches.
    total = matches * min(1.0, (matches - 1) / 3) + (len(gts) - matches) * min(1.0, matches / 3)
    return total / len(gts)


def mean_vqa_accuracy(
    predictions: dict[int, str], questions: Iterable[tuple[int, Sequence[str], str]]
) -> dict[str, float]:
    """Overall and per-answer-type accuracy over ``questions`` = (question_id, answers, answer_type).

    Every question must have a prediction; the result has ``overall`` and ``answer_type/<type>``.
    """
    per_type: dict[str, list[float]] = {}
    all_acc: list[float] = []
    for qid, answers, answer_type in questions:
        if qid not in predictions:
            raise ValueError(f"mean_vqa_accuracy: no prediction for question_id {qid}")
        acc = vqa_accuracy(predictions[qid], answers)
        all_acc.append(acc)
        per_type.setdefault(answer_type, []).append(acc)
    if not all_acc:
        raise ValueError("mean_vqa_accuracy: no questions")
    out = {"overall": sum(all_acc) / len(all_acc)}
    for answer_type in sorted(per_type):
        accs = per_type[answer_type]
        out[f"answer_type/{answer_type}"] = sum(accs) / len(accs)
    return out


def build_answer_vocab(answers: Iterable[str], min_count: int = 9) -> dict[str, int]:
    """Answer -> label for every normalized answer seen at least ``min_count`` times.

    ``answers`` is one answer per training question, as in UNITER/BUTD (the ``multiple_choice_answer``
    field, which with ``min_count=9`` on VQA v2 train+val gives their 3,129 classes). Labels are
    assigned by descending count, then alphabetically, so the vocabulary is deterministic.
    """
    if min_count < 1:
        raise ValueError(f"build_answer_vocab: min_count must be >= 1, got {min_count}")
    counts = Counter(normalize_answer(a) for a in answers)
    kept = sorted((a for a, c in counts.items() if c >= min_count and a), key=lambda a: (-counts[a], a))
    return {a: i for i, a in enumerate(kept)}


# Soft target of an answer given by n of the 10 annotators, n = 0, 1, 2, 3, >= 4. UNITER (appendix, VQA)
# "follows [57]" (MCAN) for the 3,129 candidates and their soft scores; these are MCAN's / openvqa's steps
# (also hengyuan-hu/bottom-up-attention-vqa ``compute_softscore.py`` ``get_score``).
MCAN_SCORES = (0.0, 0.3, 0.6, 0.9, 1.0)
SoftScore = Literal["mcan", "linear"]


def answer_score(n_humans: int, rule: SoftScore = "mcan") -> float:
    """Soft target of an answer given by ``n_humans`` of the 10 annotators.

    ``mcan`` (default, UNITER's): 0 / 0.3 / 0.6 / 0.9 / 1.0 for 0 / 1 / 2 / 3 / >= 4 humans. ``linear``:
    min(1, n / 3), the accuracy formula of one leave-none-out subset (VQA's own definition of a correct
    answer, used as targets by Pythia-style code).
    """
    if n_humans < 0:
        raise ValueError(f"answer_score: n_humans must be >= 0, got {n_humans}")
    if rule == "mcan":
        return MCAN_SCORES[min(n_humans, len(MCAN_SCORES) - 1)]
    if rule == "linear":
        return min(1.0, n_humans / 3)
    raise ValueError(f"answer_score: unknown rule {rule!r} (mcan, linear)")


def soft_targets(human_answers: Sequence[str], ans2label: dict[str, int],
                 rule: SoftScore = "mcan") -> tuple[list[int], list[float]]:
    """(labels, scores) of the in-vocabulary answers among the human answers, labels ascending.

    Answers are normalized like the vocabulary; out-of-vocabulary answers get no target.
    """
    counts = Counter(normalize_answer(a) for a in human_answers)
    labelled = sorted((ans2label[a], answer_score(c, rule)) for a, c in counts.items() if a in ans2label)
    return [label for label, _ in labelled], [score for _, score in labelled]
