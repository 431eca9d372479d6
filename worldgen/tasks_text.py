"""Text of the downstream task sets, grounded in scenes: VQA, NLVR2, SNLI-VE and referring expressions.

Every answer, label and referent is computed from the scene, so a model that sees the image can get
it right; distractors are plausible values of the same kind.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from worldgen.captions import NUMBER_WORDS, RELATION_WORDS
from worldgen.scenes import COLOURS, SHAPES, SIZES, TEXTURES, Scene, plural


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    answer_type: str  # "yes/no" | "number" | "other"
    question_type: str  # a prefix from VQA's mscoco_question_types.txt
    distractors: tuple[str, ...]


def vqa_questions(scene: Scene, rng: random.Random, n: int) -> list[QA]:
    """``n`` distinct questions (fewer only if the scene cannot yield that many)."""
    makers = (_colour_q, _count_q, _shape_q, _yes_no_q, _yes_no_q)
    out: dict[str, QA] = {}
    for _ in range(20 * n):
        qa = rng.choice(makers)(scene, rng)
        if qa is not None:
            out.setdefault(qa.question, qa)
        if len(out) == n:
            break
    return list(out.values())


def _unique(scene: Scene, attr: str) -> list[int]:
    values = [getattr(o, attr) for o in scene.objects]
    return [i for i, v in enumerate(values) if values.count(v) == 1]


def _colour_q(scene: Scene, rng: random.Random) -> QA | None:
    candidates = _unique(scene, "shape")
    if not candidates:
        return None
    obj = scene.objects[rng.choice(candidates)]
    others = tuple(c for c in COLOURS if c != obj.colour)
    return QA(f"What color is the {obj.shape}?", obj.colour, "other", "what color is the", others)


def _shape_q(scene: Scene, rng: random.Random) -> QA | None:
    candidates = _unique(scene, "colour")
    if not candidates:
        return None
    obj = scene.objects[rng.choice(candidates)]
    others = tuple(s for s in SHAPES if s != obj.shape)
    return QA(f"What shape is the {obj.colour} object?", obj.shape, "other", "what", others)


def _count_q(scene: Scene, rng: random.Random) -> QA:
    kind = rng.random()
    if kind < 0.4:
        shape = rng.choice([o.shape for o in scene.objects]) if rng.random() < 0.8 else rng.choice(SHAPES)
        question, n = f"How many {plural(shape)} are there?", scene.count(shape=shape)
    elif kind < 0.7:
        colour = rng.choice([o.colour for o in scene.objects])
        question, n = f"How many {colour} shapes are in the picture?", scene.count(colour=colour)
    else:
        question, n = "How many shapes are there?", len(scene.objects)
    others = tuple(str(k) for k in (n - 1, n + 1, n + 2) if k >= 0)
    return QA(question, str(n), "number", "how many", others)


def _yes_no_q(scene: Scene, rng: random.Random) -> QA | None:
    want_yes = rng.random() < 0.5
    obj = rng.choice(scene.objects)
    kind = rng.randrange(4)
    if kind == 0:
        colour = obj.colour if want_yes else rng.choice([c for c in COLOURS if c != obj.colour])
        answer = scene.count(obj.shape, colour) > 0
        qa = (f"Is there a {colour} {obj.shape}?", "is there a")
    elif kind == 1:
        shape = obj.shape if want_yes else rng.choice(SHAPES)
        answer = scene.count(shape=shape) > 0
        qa = (f"Are there any {plural(shape)}?", "are there")
    elif kind == 2:
        if scene.count(shape=obj.shape) != 1:
            return None
        texture = obj.texture if want_yes else rng.choice([t for t in TEXTURES if t != obj.texture])
        answer = texture == obj.texture
        qa = (f"Is the {obj.shape} {texture}?", "is the")
    else:
        unique = _unique(scene, "shape")
        if len(unique) < 2:
            return None
        i, j = rng.sample(unique, 2)
        relation = scene.relation(i, j) if want_yes else rng.choice(sorted(RELATION_WORDS))
        answer = relation == scene.relation(i, j)
        a, b = scene.objects[i].shape, scene.objects[j].shape
        qa = (f"Is the {a} {RELATION_WORDS[relation][0]} the {b}?", "is the")
    word = "yes" if answer else "no"
    return QA(qa[0], word, "yes/no", qa[1], ("no" if answer else "yes",))


def ten_answers(qa: QA, rng: random.Random) -> list[dict]:
    """VQA's 10 human answers: mostly the truth, a few disagreeing annotators, with confidences."""
    n_right = rng.choice((10, 10, 10, 9, 9, 8, 7))
    answers = [qa.answer] * n_right + [rng.choice(qa.distractors) for _ in range(10 - n_right)]
    rng.shuffle(answers)
    out = []
    for k, answer in enumerate(answers, start=1):
        if answer == qa.answer:
            confidence = "yes" if rng.random() < 0.85 else "maybe"
        else:
            confidence = rng.choice(("maybe", "no"))
        out.append({"answer": answer, "answer_confidence": confidence, "answer_id": k})
    return out


def count_words(n: int, noun: str) -> str:
    return f"{NUMBER_WORDS[n]} {noun if n == 1 else plural(noun)}"


Statement = tuple[str, Callable[[Scene, Scene], bool]]


def nlvr2_statement(left: Scene, right: Scene, rng: random.Random) -> tuple[str, bool]:
    """A statement about an image pair and whether it holds. Parameters come from the pair's own objects,
    so both outcomes are common and a caller can sample until it gets the label it wants."""
    obj = rng.choice(left.objects + right.objects)
    n = rng.randint(1, 3)
    size = rng.choice(SIZES)
    options: list[Statement] = [
        (
            f"The left image contains exactly {count_words(n, obj.shape)}.",
            lambda a, b: a.count(shape=obj.shape) == n,
        ),
        (
            f"The right image contains at least one {obj.colour} shape.",
            lambda a, b: b.count(colour=obj.colour) > 0,
        ),
        (
            f"Both images contain a {obj.shape}.",
            lambda a, b: a.count(obj.shape) > 0 and b.count(obj.shape) > 0,
        ),
        (
            f"Exactly one image contains a {obj.colour} {obj.shape}.",
            lambda a, b: (a.count(obj.shape, obj.colour) > 0) != (b.count(obj.shape, obj.colour) > 0),
        ),
        (
            f"There {'is' if n == 1 else 'are'} {count_words(n, obj.colour + ' shape')} in total.",
            lambda a, b: a.count(colour=obj.colour) + b.count(colour=obj.colour) == n,
        ),
        (
            "The left image contains more shapes than the right image.",
            lambda a, b: len(a.objects) > len(b.objects),
        ),
        (
            f"Each image contains a {size} shape.",
            lambda a, b: all(any(o.size == size for o in s.objects) for s in (a, b)),
        ),
        (
            f"One image shows a {obj.texture} {obj.shape}.",
            lambda a, b: any(
                o.shape == obj.shape and o.texture == obj.texture for o in a.objects + b.objects
            ),
        ),
    ]
    sentence, holds = rng.choice(options)
    return sentence, holds(left, right)


def snli_hypotheses(scene: Scene, rng: random.Random) -> dict[str, str]:
    """One hypothesis per label: entailed by, unknowable from, and contradicted by the image."""
    obj_i = rng.randrange(len(scene.objects))
    obj = scene.objects[obj_i]
    n = len(scene.objects)
    entail = [
        f"There is a {obj.colour} {obj.shape} in the picture.",
        f"The picture shows {count_words(n, 'shape')}.",
        f"A {obj.shape} is drawn on a {scene.background.colour} background.",
    ]
    wrong_n = rng.choice([k for k in range(1, 6) if k != n])
    contradict = [
        f"There are no {plural(obj.shape)} in the picture.",
        f"The picture shows {count_words(wrong_n, 'shape')}.",
        "The picture is completely empty.",
    ]
    if scene.count(shape=obj.shape) == 1:
        other = rng.choice([c for c in COLOURS if c != obj.colour])
        contradict.append(f"The {obj.shape} is {other}.")
    if n >= 2:
        j = rng.choice([k for k in range(n) if k != obj_i])
        rel = scene.relation(obj_i, j)
        entail.append(f"A {obj.shape} is {RELATION_WORDS[rel][0]} a {scene.objects[j].shape}.")
    neutral = [
        f"The {obj.shape} was drawn by a child.",
        f"The {obj.colour} {obj.shape} is the artist's favourite.",
        "The picture was made on a computer yesterday.",
        f"Someone is about to erase the {obj.shape}.",
    ]
    return {
        "entailment": rng.choice(entail),
        "neutral": rng.choice(neutral),
        "contradiction": rng.choice(contradict),
    }


def referring_expressions(scene: Scene, i: int, rng: random.Random) -> list[str]:
    """1-3 expressions, each picking out object ``i`` alone among the scene's objects."""
    objs = scene.objects
    obj = objs[i]

    def unique(pred) -> bool:
        return [k for k, o in enumerate(objs) if pred(o)] == [i]

    candidates = []
    if unique(lambda o: o.shape == obj.shape):
        candidates += [obj.shape, f"the {obj.shape}"]
    if unique(lambda o: o.shape == obj.shape and o.colour == obj.colour):
        candidates += [f"{obj.colour} {obj.shape}", f"the {obj.colour} {obj.shape}"]
    if unique(lambda o: o.colour == obj.colour):
        candidates.append(f"{obj.colour} one")
    if unique(lambda o: o.shape == obj.shape and o.size == obj.size):
        candidates.append(f"{obj.size} {obj.shape}")
    if obj.texture != "plain" and unique(lambda o: o.shape == obj.shape and o.texture == obj.texture):
        candidates.append(f"{obj.texture} {obj.shape}")
    # Rank among objects of the same shape, left to right: always unique, since boxes never overlap.
    same = sorted((k for k, o in enumerate(objs) if o.shape == obj.shape), key=lambda k: objs[k].centre[0])
    rank = same.index(i)
    if len(same) >= 2 and rank == 0:
        candidates += [f"left {obj.shape}", f"{obj.shape} on the left"]
    elif len(same) >= 2 and rank == len(same) - 1:
        candidates += [f"right {obj.shape}", f"{obj.shape} on the right"]
    elif len(same) >= 3:
        candidates.append(f"{('second', 'third')[rank - 1]} {obj.shape} from the left")
    return rng.sample(candidates, min(len(candidates), rng.randint(1, 3)))


def as_typed(expression: str, rng: random.Random) -> str:
    """RefCOCO's ``raw``: what the player typed (case and shorthand vary); ``sent`` is the clean form."""
    roll = rng.random()
    if roll < 0.15:
        return expression.upper()
    if roll < 0.25:
        return expression.replace(" on the ", " on ") + "!"
    return expression


_POS = {
    **{w: "DT" for w in ("a", "an", "the", "no", "this", "each", "some")},
    **{w: "CD" for w in NUMBER_WORDS},
    **{w: "JJ" for w in (*COLOURS, *SIZES, *TEXTURES, "empty")},
    **{w: "VBZ" for w in ("is", "shows", "contains", "are")},
    "was": "VBD",
    "drawn": "VBN",
    "made": "VBN",
    **{w: "IN" for w in ("in", "on", "of", "by", "than", "to", "about", "above", "below", "under", "over")},
    ".": ".",
    ",": ",",
}
_PLURAL_NOUNS = {plural(s) for s in (*SHAPES, "shape")}


def parses(sentence: str) -> tuple[str, str]:
    """SNLI-style ``(binary_parse, parse)`` of a generated sentence: a right-branching binary tree and a
    flat Penn-style tree with tags from a small lexicon (the generator's vocabulary is closed)."""
    tokens = sentence.replace(".", " .").replace(",", " ,").split()
    words, final = (tokens[:-1], tokens[-1]) if tokens[-1] == "." else (tokens, None)
    tree = words[-1]
    for tok in reversed(words[:-1]):
        tree = f"( {tok} {tree} )"
    binary = f"( {tree} . )" if final else tree

    def tag(tok: str) -> str:
        low = tok.lower()
        return _POS.get(low) or ("NNS" if low in _PLURAL_NOUNS else "NN")

    flat = " ".join(f"({tag(t)} {t})" for t in tokens)
    return binary, f"(ROOT (S {flat}))"
