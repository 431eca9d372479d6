"""Captions of scenes, in the styles of the real corpora.

A caption is built once as tokens with phrase spans (which object, group, background or non-visual
thing each noun phrase refers to) and then rendered as COCO/Flickr30k raw text, Karpathy tokens,
Flickr30k Entities markup, Conceptual Captions' lowercased tokenized text or SBU's casual text.
Captions name a random subset of each object's attributes, so that retrieval needs the image.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from worldgen.scenes import Scene, SceneObject, plural

PUNCT = {",", ".", "!", "?"}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
SIZE_WORDS = {
    "small": ("small", "little", "tiny"),
    "medium": ("medium", "medium-sized"),
    "large": ("large", "big", "huge"),
}
TEXTURE_WORDS = {
    "plain": ("plain", "solid"),
    "striped": ("striped",),
    "dotted": ("dotted", "polka-dot"),
    "checkered": ("checkered", "checked"),
}
RELATION_WORDS = {
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
BACKGROUND_NOUNS = {
    "solid": ("background", "plain background"),
    "gradient": ("gradient", "gradient background"),
    "noise": ("grainy background", "noisy background"),
}


@dataclass
class Caption:
    tokens: list[str] = field(default_factory=list)
    # (start, end) token spans and what they refer to: "obj:<i>", "group:<shape>", "scene" or "notvisual"
    phrases: list[tuple[int, int, str]] = field(default_factory=list)

    def words(self, text: str) -> Caption:
        self.tokens.extend(text.split())
        return self

    def phrase(self, tokens: list[str], ref: str) -> Caption:
        start = len(self.tokens)
        self.tokens.extend(tokens)
        self.phrases.append((start, len(self.tokens), ref))
        return self


def noun_phrase(obj: SceneObject, rng: random.Random, article: str = "a", detail: float = 0.6) -> list[str]:
    """``a large red striped circle`` with each attribute kept with probability ``detail`` (colour more)."""
    words = []
    if rng.random() < detail * 0.7:
        words.append(rng.choice(SIZE_WORDS[obj.size]))
    if rng.random() < min(1.0, detail + 0.3):
        words.append(obj.colour)
    if obj.texture != "plain" and rng.random() < detail:
        words.append(rng.choice(TEXTURE_WORDS[obj.texture]))
    words.append(obj.shape)
    return with_article(article, words)


def with_article(article: str, words: list[str]) -> list[str]:
    if article == "a" and words[0][0] in "aeiou":
        article = "an"
    return [article, *words] if article else words


def background_phrase(scene: Scene, rng: random.Random) -> list[str]:
    bg = scene.background
    noun = rng.choice(BACKGROUND_NOUNS[bg.kind]).split()
    colours = [bg.colour, "and", bg.colour2] if bg.kind == "gradient" else [bg.colour]
    return with_article("a", colours + noun if rng.random() < 0.7 else noun)


def describe(scene: Scene, rng: random.Random) -> Caption:
    """One caption of ``scene`` from a randomly chosen template."""
    n = len(scene.objects)
    templates = [_single, _there_is, _listing]
    if n >= 2:
        templates += [_relation, _relation, _comparison]
    if any(c >= 2 for c in Counter(o.shape for o in scene.objects).values()):
        templates.append(_group)
    return rng.choice(templates)(scene, rng)


def distinct_captions(scene: Scene, rng: random.Random, n: int) -> list[Caption]:
    """``n`` captions of ``scene`` with different wording, as from ``n`` different annotators."""
    out: dict[str, Caption] = {}
    for _ in range(20 * n):
        cap = describe(scene, rng)
        out.setdefault(" ".join(cap.tokens), cap)
        if len(out) == n:
            return list(out.values())
    return list(out.values()) + [describe(scene, rng) for _ in range(n - len(out))]


def _single(scene: Scene, rng: random.Random) -> Caption:
    i = rng.randrange(len(scene.objects))
    cap = Caption().phrase(noun_phrase(scene.objects[i], rng, detail=0.8), f"obj:{i}")
    position = scene.position(i)
    if position == "center" or rng.random() < 0.4:
        return cap.words("on").phrase(background_phrase(scene, rng), "scene").words(".")
    corner = " corner" if " " in position else ""
    return cap.words(f"in the {position}{corner} of").phrase(["the", "image"], "notvisual").words(".")


def _there_is(scene: Scene, rng: random.Random) -> Caption:
    i = rng.randrange(len(scene.objects))
    cap = Caption().words("there is").phrase(noun_phrase(scene.objects[i], rng), f"obj:{i}")
    if len(scene.objects) >= 2 and rng.random() < 0.6:
        j = rng.choice([k for k in range(len(scene.objects)) if k != i])
        cap.words(rng.choice(RELATION_WORDS[scene.relation(i, j)]))
        return cap.phrase(noun_phrase(scene.objects[j], rng, article="the"), f"obj:{j}").words(".")
    return cap.words("in").phrase(["this", "picture"], "notvisual").words(".")


def _listing(scene: Scene, rng: random.Random) -> Caption:
    order = rng.sample(range(len(scene.objects)), len(scene.objects))
    cap = Caption()
    if len(order) > 1 and rng.random() < 0.5:
        cap.words(f"{NUMBER_WORDS[len(order)]} shapes ,")
    for k, i in enumerate(order):
        if k:
            cap.words("and" if k == len(order) - 1 else ",")
        cap.phrase(noun_phrase(scene.objects[i], rng, detail=0.5), f"obj:{i}")
    return cap.words("on").phrase(background_phrase(scene, rng), "scene").words(".")


def _relation(scene: Scene, rng: random.Random) -> Caption:
    i, j = rng.sample(range(len(scene.objects)), 2)
    cap = Caption().phrase(noun_phrase(scene.objects[i], rng), f"obj:{i}")
    if rng.random() < 0.5:
        cap.words("is")
    cap.words(rng.choice(RELATION_WORDS[scene.relation(i, j)]))
    return cap.phrase(noun_phrase(scene.objects[j], rng), f"obj:{j}").words(".")


def _comparison(scene: Scene, rng: random.Random) -> Caption:
    i, j = rng.sample(range(len(scene.objects)), 2)
    a, b = scene.objects[i], scene.objects[j]
    if a.size == b.size:
        return _relation(scene, rng)
    word = "bigger" if scene.bigger(i, j) else "smaller"
    cap = Caption().phrase(noun_phrase(a, rng, article="the", detail=0.3), f"obj:{i}")
    return (
        cap.words(f"is {word} than")
        .phrase(noun_phrase(b, rng, article="the", detail=0.3), f"obj:{j}")
        .words(".")
    )


def _group(scene: Scene, rng: random.Random) -> Caption:
    shapes = Counter(o.shape for o in scene.objects)
    shape = rng.choice(sorted(s for s, c in shapes.items() if c >= 2))
    cap = Caption().phrase([NUMBER_WORDS[shapes[shape]], plural(shape)], f"group:{shape}")
    return cap.words("on").phrase(background_phrase(scene, rng), "scene").words(".")


def raw_text(cap: Caption, rng: random.Random) -> str:
    """As an annotator typed it: usually capitalized, a final period or not, sometimes a trailing space."""
    text = detokenize(cap.tokens)
    if rng.random() < 0.85:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.3:
        text = text.removesuffix(".")
    return text + " " if rng.random() < 0.15 else text


def detokenize(tokens: list[str]) -> str:
    out = ""
    for tok in tokens:
        out += tok if tok in PUNCT or not out else " " + tok
    return out


def karpathy_tokens(raw: str) -> list[str]:
    """Karpathy's tokens: the lowercased raw caption with punctuation dropped."""
    return [w for w in "".join(c if c.isalnum() or c in "-' " else " " for c in raw.lower()).split() if w]


def entities_line(cap: Caption, chain_ids: dict[str, int], types: dict[str, str], first_upper: bool) -> str:
    """``[/EN#<chain>/<type> words] ...`` as in Flickr30k Entities' Sentences/<id>.txt."""
    starts = {s: (e, ref) for s, e, ref in cap.phrases}
    tokens = list(cap.tokens)
    if first_upper:
        tokens[0] = tokens[0][0].upper() + tokens[0][1:]
    out, k = [], 0
    while k < len(tokens):
        if k in starts:
            end, ref = starts[k]
            out.append(f"[/EN#{chain_ids[ref]}/{types[ref]} {' '.join(tokens[k:end])}]")
            k = end
        else:
            out.append(tokens[k])
            k += 1
    return " ".join(out)


def cc_text(scene: Scene, rng: random.Random) -> str:
    """Conceptual Captions style: lowercased, tokenized, hypernym-ish, often without a final period."""
    cap = describe(scene, rng)
    tokens = [t.lower() for t in cap.tokens]
    if tokens[0] in ("a", "an") and rng.random() < 0.3:
        tokens = ["illustration", "of", *tokens]
    if tokens[-1] == "." and rng.random() < 0.6:
        tokens = tokens[:-1]
    return " ".join(tokens)


def sbu_text(scene: Scene, rng: random.Random) -> str:
    """SBU style: a photographer's casual description, mixed case, no final period."""
    i = rng.randrange(len(scene.objects))
    obj = scene.objects[i]
    np_words = noun_phrase(obj, rng, article=rng.choice(("my", "the", "a")), detail=0.7)
    np_text = " ".join(np_words)
    tail = rng.choice(("", " I drew today", " on the wall", " in my sketchbook", ", finally finished"))
    if len(scene.objects) >= 2 and rng.random() < 0.5:
        j = rng.choice([k for k in range(len(scene.objects)) if k != i])
        other = " ".join(noun_phrase(scene.objects[j], rng, article="a", detail=0.5))
        np_text = f"{np_text} {rng.choice(RELATION_WORDS[scene.relation(i, j)])} {other}"
    text = np_text + tail
    return text[0].upper() + text[1:] if rng.random() < 0.5 else text


def region_phrase(scene: Scene, i: int, rng: random.Random) -> str:
    """A Visual Genome region description of object ``i`` (sometimes with VG's trailing space)."""
    obj = scene.objects[i]
    texture = "" if obj.texture == "plain" else obj.texture + " "
    position = scene.position(i)
    where = "in the center" if position == "center" else f"on the {position}"
    text = rng.choice(
        (
            f"{obj.colour} {obj.shape}",
            f"the {obj.shape} is {obj.colour}",
            f"{obj.size} {texture}{obj.shape}",
            f"{obj.colour} {texture}{obj.shape} {where}",
            f"a {obj.size} {obj.colour} {obj.shape}",
        )
    )
    return text + " " if rng.random() < 0.1 else text


def relation_phrase(scene: Scene, i: int, j: int) -> str:
    a, b = scene.objects[i], scene.objects[j]
    return f"{a.colour} {a.shape} {RELATION_WORDS[scene.relation(i, j)][0]} {b.colour} {b.shape}"
