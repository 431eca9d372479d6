"""GQA's official metrics, re-implemented from the definitions of its evaluation script (``eval.py``, GQA
1.2), and the validity / plausibility choices derived from the scene graphs.

Over the *balanced* questions (``isBalanced``), with ``correct = prediction == answer`` (exact string match,
no normalisation, as the official script):

* accuracy: the mean of ``correct``; binary / open: the same over the questions whose structural type is /
  is not ``query`` (verify, logical, compare, choose are binary);
* consistency: for every correctly answered question with entailed questions (``entailed`` minus itself), the
  accuracy over those entailed questions; the mean over such questions. An entailed question with no
  prediction is skipped and counted (``consistency_missing``); the official script needs predictions for
  every question of ``<split>_all_questions.json`` and would stop instead;
* validity / plausibility: whether the prediction is in the question's ``valid`` / ``plausible`` answers
  (``"Common"`` questions: any of color, material, shape), over the questions that have choices;
* distribution: the chi-square statistic between the gold and the predicted answer histograms of every
  ``groups.global`` group (null groups left out; ``""`` is a group), weighted by the group's size, / 100
  (lower is better);
* accuracy per structural and semantic type, per words and per reasoning steps (``semantic`` operations other
  than exist, "query: name" and "choose name").

The official choices files (``<split>_choices.json``) are not part of the public release for every split; here
they come from the scene graphs (``derive_choices``), where the question's program says what it asks:

* binary programs (last operation exist, verify *, and, or, same *, different *): {yes, no};
* ``choose <x>`` with argument ``a|b``: both options;
* ``query <attribute type>`` (color, size, material, ...): valid = every value of that type, where a type's
  values are the answers of its ``query`` questions and the arguments of its ``verify`` / ``filter`` /
  ``choose`` operations in the reference questions; plausible = the values of that type that some object with
  the queried object's name has in a scene graph;
* ``query name``: valid = every object name of the scene graphs; plausible = the names of objects that stand
  in the program's relation to an object of the anchor's name somewhere in the scene graphs (every name when
  the program has no relation);
* anything else: no choices (the question counts for neither metric).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

BINARY_OPERATIONS = ("exist", "verify", "and", "or", "same", "different")
_NAME_ARG = re.compile(r"^(.*?)\s*\(([^()]*)\)\s*$")
COMMON_GROUP = ("color", "material", "shape")


@dataclass(frozen=True)
class GqaQuestion:
    """What the metrics read of one question (a ``tables.TASK_GQA`` row)."""

    question_id: str
    question: str
    answer: str | None
    structural: str | None = None
    semantic_type: str | None = None
    detailed: str | None = None
    is_balanced: bool = True
    global_group: str | None = None
    entailed: tuple[str, ...] = ()
    semantic: tuple[dict, ...] = ()

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> GqaQuestion:
        return cls(row["question_id"], row["question"], row["answer"], row.get("structural"),
                   row.get("semantic_type"), row.get("detailed"), bool(row.get("is_balanced", True)),
                   row.get("global_group"), tuple(row.get("entailed") or ()),
                   tuple(json.loads(row["semantic"]) if isinstance(row.get("semantic"), str)
                         else row.get("semantic") or ()))

    @property
    def binary(self) -> bool:
        return self.structural != "query"

    @property
    def words(self) -> int:
        return len(self.question.split())

    @property
    def steps(self) -> int:
        """Reasoning steps: operations other than the final exist / "query: name" / "choose name"."""
        text = (f"{op.get('operation')}: {op.get('argument')}" for op in self.semantic)
        return sum(1 for t in text if not any(o in t for o in ("exist", "query: name", "choose name")))


@dataclass
class Choices:
    valid: set[str] = field(default_factory=set)
    plausible: set[str] = field(default_factory=set)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def belongs(answer: str, group: Iterable[str], question: GqaQuestion) -> bool:
    """The official ``belongs``: a "Common" question's valid / plausible answers: color, material, shape."""
    if question.detailed and "Common" in question.detailed:
        group = COMMON_GROUP
    return answer in set(group)


def consistency(questions: Mapping[str, GqaQuestion], predictions: Mapping[str, str]
                ) -> tuple[float | None, int, int]:
    """(consistency, questions it averages over, entailed questions skipped for lack of a prediction).

    For every balanced question answered correctly that has entailed questions (other than itself), the
    accuracy over its entailed questions; the mean of those accuracies (None when there is none)."""
    per_question, missing = [], 0
    for qid, q in questions.items():
        if not q.is_balanced or q.answer is None or predictions.get(qid) != q.answer:
            continue
        scores = []
        for eid in q.entailed:
            if eid == qid:
                continue
            other = questions.get(eid)
            if other is None or eid not in predictions or other.answer is None:
                missing += 1
                continue
            scores.append(float(predictions[eid] == other.answer))
        if scores:
            per_question.append(sum(scores) / len(scores))
    return _mean(per_question), len(per_question), missing


def chi_square(gold: Mapping[str, Mapping[str, int]], predicted: Mapping[str, Mapping[str, int]]
               ) -> float | None:
    """The official distribution score before its / 100: each group's chi-square of the predicted counts of
    the gold answers against the gold counts, averaged over the groups weighted by their sizes."""
    total, weight = 0.0, 0
    for group, answers in gold.items():
        score = sum((predicted.get(group, {}).get(a, 0) - e) ** 2 / e for a, e in answers.items())
        size = sum(answers.values())
        total += score * size
        weight += size
    return total / weight if weight else None


def gqa_metrics(questions: Mapping[str, GqaQuestion], predictions: Mapping[str, str],
                choices: Mapping[str, Choices] | None = None) -> dict[str, float]:
    """The official metrics (fractions in [0, 1]; distribution as the official number) of ``predictions``
    (question id -> answer) on the balanced questions of ``questions`` that have an answer. Every such
    question needs a prediction (ValueError naming the first that has none)."""
    scored = {qid: q for qid, q in questions.items() if q.is_balanced and q.answer is not None}
    lacking = [qid for qid in scored if qid not in predictions]
    if lacking:
        raise ValueError(f"gqa_metrics: no prediction for question {lacking[0]!r} ({len(lacking)} in all)")
    if not scored:
        return {}
    acc, binary, open_ = [], [], []
    per_type: dict[str, list[float]] = defaultdict(list)
    valid, plausible = [], []
    gold: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    predicted: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for qid, q in scored.items():
        answer = predictions[qid]
        score = float(answer == q.answer)
        acc.append(score)
        (binary if q.binary else open_).append(score)
        per_type[f"structural/{q.structural}"].append(score)
        per_type[f"semantic/{q.semantic_type}"].append(score)
        per_type[f"steps/{q.steps}"].append(score)
        per_type[f"words/{q.words}"].append(score)
        c = (choices or {}).get(qid)
        if c is not None:
            valid.append(float(belongs(answer, c.valid, q)))
            plausible.append(float(belongs(answer, c.plausible, q)))
        if q.global_group is not None:
            gold[q.global_group][q.answer] += 1
            predicted[q.global_group][answer] += 1
    cons, cons_n, cons_missing = consistency(scored, predictions)
    out = {"gqa_accuracy": _mean(acc), "gqa_binary": _mean(binary), "gqa_open": _mean(open_),
           "gqa_consistency": cons, "gqa_validity": _mean(valid), "gqa_plausibility": _mean(plausible)}
    distribution = chi_square(gold, predicted)
    out["gqa_distribution"] = None if distribution is None else distribution / 100
    out |= {"gqa_questions": float(len(acc)), "gqa_consistency_questions": float(cons_n),
            "gqa_consistency_missing": float(cons_missing), "gqa_choices_questions": float(len(valid))}
    out |= {f"gqa_accuracy/{name}": _mean(scores) for name, scores in sorted(per_type.items())}
    return {k: float(v) for k, v in out.items() if v is not None}


# ------------------------------------------------------------------------------------------------- choices


def _name_of(argument: str) -> str | None:
    """``"circle (1015731)"`` -> ``"circle"``; None for ``"_"`` or an argument without a name."""
    match = _NAME_ARG.match(argument or "")
    name = (match[1] if match else argument or "").strip()
    return None if name in ("", "_", "?") or "," in name else name


@dataclass
class SceneIndex:
    """What the scene graphs say about names, attributes and relations."""

    names: set[str] = field(default_factory=set)
    attributes_of: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # name -> attrs
    # (relation, anchor name) -> names of subjects (s: X rel anchor) / objects (o: anchor rel X)
    subjects: dict[tuple[str, str], set[str]] = field(default_factory=lambda: defaultdict(set))
    objects: dict[tuple[str, str], set[str]] = field(default_factory=lambda: defaultdict(set))

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, Any]]) -> SceneIndex:
        """From ``tables.TASK_GQA_OBJECTS`` rows (one per object)."""
        index = cls()
        rows = list(rows)
        name_of = {(r["image_id"], r["object_id"]): r["name"] for r in rows}
        for r in rows:
            index.names.add(r["name"])
            index.attributes_of[r["name"]].update(r["attributes"] or ())
            for rel in r["relations"] or ():
                other = name_of.get((r["image_id"], rel["object"]))
                if other is not None:
                    index.subjects[(rel["name"], other)].add(r["name"])
                    index.objects[(rel["name"], r["name"])].add(other)
        return index


def attribute_types(questions: Iterable[GqaQuestion]) -> dict[str, set[str]]:
    """Attribute type -> its values, as the questions use them: answers of ``query <type>`` and arguments of
    ``verify <type>`` / ``filter <type>`` / ``choose <type>`` (``a|b``)."""
    values: dict[str, set[str]] = defaultdict(set)
    for q in questions:
        for position, op in enumerate(q.semantic):
            kind, _, attr_type = str(op.get("operation", "")).partition(" ")
            argument = str(op.get("argument", ""))
            last = position == len(q.semantic) - 1
            if kind == "query" and argument not in ("name", "") and last and q.answer:
                values[argument].add(q.answer)
            elif kind in ("verify", "filter") and attr_type and attr_type not in ("rel", "name"):
                values[attr_type].add(argument.strip())
            elif kind == "choose" and attr_type and attr_type not in ("rel", "name"):
                values[attr_type].update(a.strip() for a in argument.split("|"))
    return values


def _selected_name(q: GqaQuestion, step: int) -> str | None:
    """The name of the object the program's step ``step`` works on (following the first dependency back to a
    select)."""
    seen = set()
    while 0 <= step < len(q.semantic) and step not in seen:
        seen.add(step)
        op = q.semantic[step]
        if op.get("operation") == "select":
            return _name_of(str(op.get("argument")))
        deps = op.get("dependencies") or []
        if not deps:
            return None
        step = deps[0]
    return None


def question_choices(q: GqaQuestion, scenes: SceneIndex, types: Mapping[str, set[str]]) -> Choices | None:
    """The valid and plausible answers of ``q`` (module docstring), or None where its program does not say."""
    if not q.semantic:
        return None
    last = q.semantic[-1]
    kind, _, what = str(last.get("operation", "")).partition(" ")
    argument = str(last.get("argument", ""))
    if kind in BINARY_OPERATIONS:
        return Choices({"yes", "no"}, {"yes", "no"})
    if kind == "choose":
        options = {a.strip() for a in argument.split("|") if a.strip()}
        return Choices(set(options), set(options)) if options else None
    if kind != "query":
        return None
    deps = last.get("dependencies") or []
    anchor = _selected_name(q, deps[0]) if deps else None
    if argument == "name":
        relate = q.semantic[deps[0]] if deps and 0 <= deps[0] < len(q.semantic) else {}
        if relate.get("operation") == "relate":
            fields = str(relate.get("argument")).split("(")[0].strip().split(",")
            rel_deps = relate.get("dependencies") or []
            base = _selected_name(q, rel_deps[0]) if rel_deps else None
            if len(fields) == 3 and base is not None:
                rel, side = fields[1].strip(), fields[2].strip()
                table = scenes.subjects if side == "s" else scenes.objects
                plausible = set(table.get((rel, base), ()))
                return Choices(set(scenes.names), plausible)
        return Choices(set(scenes.names), set(scenes.names))
    values = types.get(argument)
    if not values:
        return None
    plausible = set(scenes.attributes_of.get(anchor, ())) & values if anchor else set(values)
    return Choices(set(values), plausible)


def derive_choices(questions: Mapping[str, GqaQuestion], scenes: SceneIndex,
                   reference: Iterable[GqaQuestion]) -> dict[str, Choices]:
    """Choices of every question whose program defines them; attribute types come from ``reference``."""
    types = attribute_types(reference)
    out = {}
    for qid, q in questions.items():
        c = question_choices(q, scenes, types)
        if c is not None:
            out[qid] = c
    return out
