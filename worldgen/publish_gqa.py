"""GQA 1.2: balanced questions and scene graphs over Visual Genome images, and testdev images of its own.

Published only when ``download.datasets.gqa`` is configured (``configs/gqa.yaml``); nothing else in the world
depends on it, so a world without GQA is byte-identical to one built before GQA existed. Layout, as the real
release ships it:

* ``sceneGraphs.zip``: ``{train,val}_sceneGraphs.json``, one object keyed by image id (a string) ->
  ``{width, height, objects: {object id (string): {name, x, y, w, h, attributes, relations: [{name,
  object}]}}}``. Testdev has no published scene graphs.
* ``questions1.2.zip``: ``{train,val,testdev}_balanced_questions.json``, one object keyed by question id (a
  string with leading zeros, ``"00126851"``) -> ``question``, ``answer``, ``fullAnswer``, ``imageId`` (the VG
  id as a string; ``"n<digits>"`` for testdev), ``isBalanced``, ``types``, ``groups``, ``entailed``,
  ``equivalent``, ``semantic``, ``semanticStr`` and ``annotations`` (question / answer / fullAnswer
  whitespace-token index ``"4"`` or span ``"4:6"`` -> object id).

Train and val images are Visual Genome images (never a planted overlap or a faulty URL), with the scene graph
of the VG objects (same object ids and boxes). Testdev images are new scenes served at
``image_base_url + <imageId>.jpg``, as a user serves an extracted ``images.zip``. Every answer and pointer is
computed from the scene, and ``entailed`` lists the questions of the same image whose answer the question's
answer determines (the consistency metric's entailment).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

from worldgen.errors import WorldError
from worldgen.identities import IdPool
from worldgen.records import World, WorldImage
from worldgen.scenes import COLOURS, SIZES, Scene, plural

SPLITS = ("train", "val", "testdev")
SCENE_GRAPH_SPLITS = ("train", "val")
# Scene relation (worldgen.scenes.Scene.relation: i relative to j) -> GQA relation name.
RELATIONS = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
TESTDEV_MAX_ID = 999_999


@dataclass
class GqaImage:
    image_id: str  # "2354786" (a VG id) or "n161313" (testdev)
    split: str
    scene: Scene
    scale: float
    object_ids: list[str]  # one per scene object, in scene order


@dataclass
class Question:
    question: list[str]  # whitespace tokens, punctuation attached ("pond?")
    answer: str
    full_answer: list[str]
    semantic: list[dict]
    types: dict[str, str]
    groups: dict[str, str | None]
    pointers: dict[str, dict[str, str]]  # field -> "i" or "i:j" -> object id
    reveals: set[tuple] = field(default_factory=set)  # facts the answer determines
    depends: set[tuple] = field(default_factory=set)  # facts the answer depends on

    def record(self, image_id: str, qid: str, entailed: list[str]) -> dict:
        return {
            "semantic": self.semantic,
            "entailed": entailed,
            "equivalent": [qid],
            "question": " ".join(self.question),
            "imageId": image_id,
            "isBalanced": True,
            "groups": self.groups,
            "answer": self.answer,
            "semanticStr": "->".join(
                f"{op['operation']}: {op['argument']}"
                + (f" [{', '.join(map(str, op['dependencies']))}]" if op["dependencies"] else "")
                for op in self.semantic
            ),
            "annotations": self.pointers,
            "types": self.types,
            "fullAnswer": " ".join(self.full_answer),
        }


def build_gqa(world: World, vg: list[WorldImage], image_base_url: str) -> None:
    """Scene graphs and balanced questions of ``sizes.gqa_train`` + ``gqa_val`` VG images and
    ``gqa_testdev`` new images (added to ``world.images["gqa"]``)."""
    sizes = world.cfg.sizes
    rng = world.rng("gqa")
    eligible = sorted((img for img in vg if img.planted is None and img.fault is None), key=lambda i: i.key)
    wanted = sizes.gqa_train + sizes.gqa_val
    if wanted > len(eligible):
        raise WorldError(f"world.sizes.gqa_train + gqa_val ({wanted}) exceed the {len(eligible)} Visual "
                         "Genome images GQA can use (neither planted nor faulty)")
    object_ids = _vg_object_ids(world)
    chosen = rng.sample(eligible, wanted)
    images = [GqaImage(img.key.split(":")[1], "val" if k < sizes.gqa_val else "train", img.scene, img.scale,
                       object_ids[img.key]) for k, img in enumerate(chosen)]
    ids = IdPool(world.rng("gqa/testdev"))
    next_object = rng.randint(3_000_000, 3_100_000)
    for n in sorted(ids.draw(1, TESTDEV_MAX_ID) for _ in range(sizes.gqa_testdev)):
        image_id = f"n{n}"
        scene = world.scene(world.rng(f"gqa/testdev/{image_id}"))
        world.add(WorldImage(dataset="gqa", key=f"gqa:{image_id}", url=f"{image_base_url}{image_id}.jpg",
                             split="testdev", scene=scene, data=world.encode(scene)))
        oids = []
        for _ in scene.objects:
            next_object += rng.randint(1, 5)
            oids.append(str(next_object))
        images.append(GqaImage(image_id, "testdev", scene, 1.0, oids))
    images.sort(key=lambda g: (SPLITS.index(g.split), g.image_id))

    question_id = rng.randint(100_000, 1_500_000)
    by_split: dict[str, dict[str, dict]] = {split: {} for split in SPLITS}
    graphs: dict[str, dict[str, dict]] = {split: {} for split in SCENE_GRAPH_SPLITS}
    for img in images:
        qrng = world.rng(f"gqa/questions/{img.image_id}")
        questions = gqa_questions(img, qrng, world.cfg.gqa_questions_per_image)
        qids = []
        for _ in questions:
            question_id += qrng.randint(1, 9)
            qids.append(f"{question_id:08d}")
        for q, qid in zip(questions, qids, strict=True):
            entailed = [other_id for other, other_id in zip(questions, qids, strict=True)
                        if other_id != qid and q.reveals & other.depends]
            by_split[img.split][qid] = q.record(img.image_id, qid, entailed)
        if img.split in graphs:
            graphs[img.split][img.image_id] = scene_graph(img)
    for split in SPLITS:
        world.metadata[("gqa", f"questions_{split}")] = json.dumps(by_split[split]).encode()
    for split in SCENE_GRAPH_SPLITS:
        world.metadata[("gqa", f"scene_graphs_{split}")] = json.dumps(graphs[split]).encode()


def _vg_object_ids(world: World) -> dict[str, list[str]]:
    """VG image key -> the object ids objects.json gives its scene's objects (in scene order)."""
    return {f"vg:{entry['image_id']}": [str(o["object_id"]) for o in entry["objects"]]
            for entry in json.loads(world.metadata[("vg", "objects")])}


def scene_graph(img: GqaImage) -> dict:
    scene = img.scene
    objects = {}
    for i, obj in enumerate(scene.objects):
        x, y, w, h = obj.box(img.scale)
        relations = [{"name": RELATIONS[scene.relation(i, j)], "object": img.object_ids[j]}
                     for j in range(len(scene.objects)) if j != i]
        objects[img.object_ids[i]] = {"name": obj.shape, "x": x, "y": y, "w": w, "h": h,
                                      "attributes": _attributes(obj), "relations": relations}
    return {"width": round(scene.width * img.scale), "height": round(scene.height * img.scale),
            "objects": objects}


def _attributes(obj) -> list[str]:
    return [obj.colour, obj.size] + ([obj.texture] if obj.texture != "plain" else [])


def gqa_questions(img: GqaImage, rng: random.Random, n: int) -> list[Question]:
    """``n`` distinct questions about ``img`` (fewer only if the scene cannot yield that many)."""
    makers = (_query_attr, _query_attr, _verify_attr, _choose_attr, _exist, _relate_name, _verify_rel)
    out: dict[str, Question] = {}
    for _ in range(30 * n):
        q = rng.choice(makers)(img, rng)
        if q is not None:
            out.setdefault(" ".join(q.question), q)
        if len(out) == n:
            break
    return list(out.values())


def _unique_shapes(scene: Scene) -> list[int]:
    shapes = [o.shape for o in scene.objects]
    return [i for i, s in enumerate(shapes) if shapes.count(s) == 1]


def _select(img: GqaImage, i: int) -> dict:
    return {"operation": "select", "dependencies": [],
            "argument": f"{img.scene.objects[i].shape} ({img.object_ids[i]})"}


def _key(start: int, end: int | None = None) -> str:
    return str(start) if end is None or end == start + 1 else f"{start}:{end}"


def _attr_of(obj, kind: str) -> str:
    return obj.colour if kind == "color" else obj.size


def _values(kind: str) -> tuple[str, ...]:
    return tuple(COLOURS) if kind == "color" else SIZES


def _attribute_subject(img: GqaImage, rng: random.Random, kinds: tuple[str, ...]) -> tuple | None:
    """(index, object, object id, attribute kind) of a uniquely-shaped object to ask about, or None."""
    unique = _unique_shapes(img.scene)
    if not unique:
        return None
    i = rng.choice(unique)
    return i, img.scene.objects[i], img.object_ids[i], rng.choice(kinds)


def _query_attr(img: GqaImage, rng: random.Random) -> Question | None:
    subject = _attribute_subject(img, rng, ("color", "color", "size"))
    if subject is None:
        return None
    i, obj, oid, kind = subject
    value = _attr_of(obj, kind)
    # What color is the circle?  /  The circle is red.
    return Question(
        question=["What", kind, "is", "the", f"{obj.shape}?"], answer=value,
        full_answer=["The", obj.shape, "is", f"{value}."],
        semantic=[_select(img, i), {"operation": "query", "dependencies": [0], "argument": kind}],
        types={"structural": "query", "semantic": "attr", "detailed": "queryAttr"},
        groups={"global": kind, "local": f"10q-{obj.shape}_{kind}"},
        pointers={"question": {"4": oid}, "answer": {}, "fullAnswer": {"1": oid}},
        reveals={("attr", i, kind)}, depends={("attr", i, kind)})


def _verify_attr(img: GqaImage, rng: random.Random) -> Question | None:
    subject = _attribute_subject(img, rng, ("color", "size"))
    if subject is None:
        return None
    i, obj, oid, kind = subject
    truth = _attr_of(obj, kind)
    asked = truth if rng.random() < 0.5 else rng.choice([v for v in _values(kind) if v != truth])
    yes = asked == truth
    # Is the circle red?  /  Yes, the circle is red.  |  No, the circle is blue.
    return Question(
        question=["Is", "the", obj.shape, f"{asked}?"], answer="yes" if yes else "no",
        full_answer=["Yes," if yes else "No,", "the", obj.shape, "is", f"{truth}."],
        semantic=[_select(img, i), {"operation": f"verify {kind}", "dependencies": [0], "argument": asked}],
        types={"structural": "verify", "semantic": "attr", "detailed": "verifyAttr"},
        groups={"global": None, "local": f"06-{obj.shape}_{asked}"},
        pointers={"question": {"2": oid}, "answer": {}, "fullAnswer": {"2": oid}},
        reveals={("attr", i, kind)} if yes else set(), depends={("attr", i, kind)})


def _choose_attr(img: GqaImage, rng: random.Random) -> Question | None:
    subject = _attribute_subject(img, rng, ("color", "size"))
    if subject is None:
        return None
    i, obj, oid, kind = subject
    truth = _attr_of(obj, kind)
    options = [truth, rng.choice([v for v in _values(kind) if v != truth])]
    rng.shuffle(options)
    # Is the circle red or blue?  /  The circle is red.
    return Question(
        question=["Is", "the", obj.shape, options[0], "or", f"{options[1]}?"], answer=truth,
        full_answer=["The", obj.shape, "is", f"{truth}."],
        semantic=[_select(img, i), {"operation": f"choose {kind}", "dependencies": [0],
                                    "argument": "|".join(options)}],
        types={"structural": "choose", "semantic": "attr", "detailed": "chooseAttr"},
        groups={"global": None, "local": f"09c-{obj.shape}_{kind}"},
        pointers={"question": {"2": oid}, "answer": {}, "fullAnswer": {"1": oid}},
        reveals={("attr", i, kind)}, depends={("attr", i, kind)})


def _exist(img: GqaImage, rng: random.Random) -> Question | None:
    scene = img.scene
    obj = rng.choice(scene.objects)
    colour = obj.colour if rng.random() < 0.5 else rng.choice([c for c in COLOURS if c != obj.colour])
    found = [k for k, o in enumerate(scene.objects) if o.shape == obj.shape and o.colour == colour]
    pointed = found[0] if len(found) == 1 else None
    article = "an" if colour[0] in "aeiou" else "a"
    # Is there a red circle?  /  Yes, there is a red circle.  |  No, there are no red circles.
    if found:
        full = ["Yes,", "there", "is", article, colour, f"{obj.shape}."]
        full_pointer = {"4:6": img.object_ids[pointed]} if pointed is not None else {}
    else:
        full, full_pointer = ["No,", "there", "are", "no", colour, f"{plural(obj.shape)}."], {}
    select = {"operation": "select", "dependencies": [],
              "argument": f"{obj.shape} ({img.object_ids[pointed]})" if pointed is not None else
              f"{obj.shape} (-)"}
    return Question(
        question=["Is", "there", article, colour, f"{obj.shape}?"], answer="yes" if found else "no",
        full_answer=full,
        semantic=[select, {"operation": "filter color", "dependencies": [0], "argument": colour},
                  {"operation": "exist", "dependencies": [1], "argument": "?"}],
        types={"structural": "verify", "semantic": "obj", "detailed": "existAttr"},
        groups={"global": None, "local": f"03-{obj.shape}_{colour}"},
        pointers={"question": {"3:5": img.object_ids[pointed]} if pointed is not None else {}, "answer": {},
                  "fullAnswer": full_pointer})


def _relation_pairs(scene: Scene) -> list[tuple[int, int, str]]:
    """(k, j, relation) where k is the only object in that relation to the uniquely-shaped object j."""
    unique = _unique_shapes(scene)
    out = []
    for j in unique:
        for rel in RELATIONS:
            related = [k for k in range(len(scene.objects)) if k != j and scene.relation(k, j) == rel]
            if len(related) == 1:
                out.append((related[0], j, rel))
    return out


def _rel_fact(i: int, j: int) -> tuple:
    """The relation between two objects, either way round (one determines the other)."""
    return ("rel", min(i, j), max(i, j))


def _relate_name(img: GqaImage, rng: random.Random) -> Question | None:
    pairs = _relation_pairs(img.scene)
    if not pairs:
        return None
    k, j, rel = rng.choice(pairs)
    a, b = img.scene.objects[k], img.scene.objects[j]
    words = RELATIONS[rel].split()
    # What is to the left of the circle?  /  The square is to the left of the circle.
    question = ["What", "is", *words, "the", f"{b.shape}?"]
    full = ["The", a.shape, "is", *words, "the", f"{b.shape}."]
    return Question(
        question=question, answer=a.shape, full_answer=full,
        semantic=[_select(img, j), {"operation": "relate", "dependencies": [0],
                                    "argument": f"_,{RELATIONS[rel]},s ({img.object_ids[k]})"},
                  {"operation": "query", "dependencies": [1], "argument": "name"}],
        types={"structural": "query", "semantic": "rel", "detailed": "relS"},
        groups={"global": "", "local": f"14-{b.shape}_{RELATIONS[rel]},s"},
        pointers={"question": {str(len(question) - 1): img.object_ids[j]}, "answer": {"0": img.object_ids[k]},
                  "fullAnswer": {"1": img.object_ids[k], str(len(full) - 1): img.object_ids[j]}},
        reveals={_rel_fact(k, j)}, depends={_rel_fact(k, j)})


def _verify_rel(img: GqaImage, rng: random.Random) -> Question | None:
    unique = _unique_shapes(img.scene)
    if len(unique) < 2:
        return None
    i, j = rng.sample(unique, 2)
    truth = img.scene.relation(i, j)
    asked = truth if rng.random() < 0.5 else rng.choice([r for r in RELATIONS if r != truth])
    yes = asked == truth
    a, b = img.scene.objects[i], img.scene.objects[j]
    words, true_words = RELATIONS[asked].split(), RELATIONS[truth].split()
    # Is the square to the left of the circle?  /  Yes, the square is to the left of the circle.
    question = ["Is", "the", a.shape, *words, "the", f"{b.shape}?"]
    full = ["Yes," if yes else "No,", "the", a.shape, "is", *(words if yes else true_words), "the",
            f"{b.shape}."]
    return Question(
        question=question, answer="yes" if yes else "no", full_answer=full,
        semantic=[_select(img, j), {"operation": "verify rel", "dependencies": [0],
                                    "argument": f"{a.shape},{RELATIONS[asked]},s ({img.object_ids[i]})"}],
        types={"structural": "verify", "semantic": "rel", "detailed": "relVerify"},
        groups={"global": None, "local": f"13-{b.shape}_{a.shape}"},
        pointers={"question": {"2": img.object_ids[i], str(len(question) - 1): img.object_ids[j]},
                  "answer": {},
                  "fullAnswer": {"2": img.object_ids[i], str(len(full) - 1): img.object_ids[j]}},
        reveals={_rel_fact(i, j)} if yes else set(), depends={_rel_fact(i, j)})
