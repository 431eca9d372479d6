"""Object-word alignment annotations: sentences whose words point at boxes, their soft targets over an image's
detected regions, and the pretraining dataset that serves them (``vlp.objectives.owa``).

Two sources, as in Kervadec et al. (§6.1):

* Visual Genome region descriptions (``vg_region_sentences``): an image's descriptions, shuffled, are joined
  with "and" one to three at a time ("the cat playing near the tree and the yellow bird"); every word of a
  description points at that description's box.
* GQA's pointers (``gqa_sentences``): each pointer of a question or a full answer (a whitespace-token span ->
  a scene-graph object) points at that object's box; a question and its full answer are two sentences.

The builder only sees the rows it is given; the ``alignment`` stage gives it dedup's tables, and keeps only
images dedup kept for pretraining (and GQA's ``train`` split), so no evaluation image is ever annotated.

An example (``encode_annotation`` + ``annotation_targets``) is the sentence's word pieces, the piece span of
each pointer, and each pointer's target row A* over the image's regions as the feature store serves them
(its box-count rule), written to a text db (``vlp.data.txt_db``) with the fields ``align_spans``
[[piece start, piece end, pointer], ...] (pieces counted without [CLS]) and ``align_targets`` [[A* row], ...].
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vlp.data.pretrain_dataset import PretrainDataError, PretrainDataset
from vlp.objectives.owa import Norm, Similarity, alignment_targets, semantic_similarities, words_of

VG_SOURCE = "vg_regions"
_PUNCT = "!\"#$%&'()*+,./:;<=>?@[\\]^_`{|}~"
GQA_SOURCES = {"question": "gqa_question", "fullAnswer": "gqa_full_answer"}


@dataclass(frozen=True)
class Pointer:
    start: int  # whitespace-word span [start, end) of the sentence
    end: int
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels of the image


@dataclass
class Annotation:
    image_key: str
    source: str  # vg_regions | gqa_question | gqa_full_answer
    sentence_id: str
    text: str
    pointers: list[Pointer] = field(default_factory=list)

    def group(self, p: int) -> list[str]:
        """The words of pointer ``p`` (punctuation dropped), the group whose similarity to names counts."""
        pointer = self.pointers[p]
        return words_of(" ".join(self.text.split()[pointer.start:pointer.end]))


def vg_region_sentences(regions: Iterable[Mapping[str, Any]], seed: int, max_descriptions: int = 3,
                        per_image: int | None = None) -> list[Annotation]:
    """Sentences of 1..``max_descriptions`` region descriptions joined with "and" (``tables.REGIONS`` rows);
    every description is used once, in a shuffled order and group sizes drawn from ``seed`` and the image key;
    ``per_image`` caps the sentences of an image (None: all)."""
    by_image: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for row in regions:
        if row["phrase"] and row["phrase"].strip() and row["w"] > 0 and row["h"] > 0:
            by_image[row["image_key"]].append(row)
    out = []
    for key in sorted(by_image):
        rows = sorted(by_image[key], key=lambda r: r["region_id"])
        rng = random.Random(f"{seed}/{key}")
        rng.shuffle(rows)
        n = 0
        while rows and (per_image is None or n < per_image):
            size = rng.randint(1, max_descriptions)
            take, rows = rows[:size], rows[size:]
            words, pointers = [], []
            for k, row in enumerate(take):
                if k:
                    words.append("and")
                phrase = row["phrase"].strip().split()
                pointers.append(Pointer(len(words), len(words) + len(phrase),
                                        (row["x"], row["y"], row["x"] + row["w"], row["y"] + row["h"])))
                words += phrase
            out.append(Annotation(key, VG_SOURCE, f"{key}#r{'-'.join(str(r['region_id']) for r in take)}",
                                  " ".join(words), pointers))
            n += 1
    return out


def gqa_sentences(questions: Iterable[Mapping[str, Any]], objects: Iterable[Mapping[str, Any]]
                  ) -> tuple[list[Annotation], int]:
    """(sentences, pointers dropped): each question and full answer of ``tables.TASK_GQA`` rows with its
    pointers, boxed by the scene graph (``tables.TASK_GQA_OBJECTS`` rows); a pointer to an object the graphs
    lack is dropped and counted, a text left without pointers is left out."""
    boxes = {(o["image_id"], o["object_id"]): (o["x"], o["y"], o["x"] + o["w"], o["y"] + o["h"])
             for o in objects}
    out, dropped = [], 0
    for row in questions:
        for field_name, source in GQA_SOURCES.items():
            text = row["question"] if field_name == "question" else row["full_answer"]
            pointers = []
            for p in row["pointers"] or ():
                if p["field"] != field_name:
                    continue
                box = boxes.get((row["image_id"], p["object_id"]))
                if box is None or text is None or p["end"] > len(text.split()):
                    dropped += 1
                    continue
                pointers.append(Pointer(p["start"], p["end"], box))
            if pointers:
                out.append(Annotation(row["image_key"], source, f"{row['question_id']}#{field_name}", text,
                                      pointers))
    return out, dropped


def _split_punctuation(word: str) -> tuple[str, str, str]:
    """(leading punctuation, the word, trailing punctuation): "pond?" -> ("", "pond", "?")."""
    core = word.strip(_PUNCT)
    if not core:
        return "", word, ""
    lead = word[: word.index(core)]
    return lead, core, word[len(lead) + len(core):]


def encode_annotation(annotation: Annotation, encode_word, max_txt_len: int
                      ) -> tuple[list[int], list[list[int]]]:
    """(word pieces without [CLS]/[SEP], [[piece start, piece end, pointer], ...]): each whitespace word is
    encoded alone, its punctuation apart (``encode_word(text) -> ids``; a BERT tokenizer splits on whitespace
    and punctuation, so the concatenation is the sentence's encoding), and a pointer covers the pieces of its
    words without their punctuation ("pond?" -> "pond"); the pieces are cut to ``max_txt_len`` and a pointer
    cut off entirely is dropped."""
    ids, cores = [], []
    for word in annotation.text.split():
        lead, core, tail = _split_punctuation(word)
        ids += list(encode_word(lead)) if lead else []
        start = len(ids)
        ids += list(encode_word(core))
        cores.append((start, len(ids)))
        ids += list(encode_word(tail)) if tail else []
    ids = ids[:max_txt_len]
    spans = []
    for p, pointer in enumerate(annotation.pointers):
        start, end = cores[pointer.start][0], min(cores[pointer.end - 1][1], len(ids))
        if start < end:
            spans.append([start, end, p])
    return ids, spans


def annotation_targets(annotation: Annotation, norm_bb: np.ndarray, width: float, height: float,
                       classes: Sequence[str | None], attributes: Sequence[str | None], sim: Similarity,
                       norm: Norm = "sum") -> np.ndarray:
    """A* [P, R] of the annotation's pointers over R regions (``norm_bb`` [R, >=4] normalised x1, y1, x2, y2;
    ``classes`` / ``attributes`` the detector's predicted names of each region)."""
    scale = np.array([width, height, width, height], dtype=np.float64)
    annotated = np.array([p.box for p in annotation.pointers], dtype=np.float64).reshape(-1, 4) / scale
    groups = [annotation.group(p) for p in range(len(annotation.pointers))]
    class_sim, attr_sim = semantic_similarities(groups, classes, attributes, sim)
    detected = np.asarray(norm_bb, dtype=np.float64)[:, :4]
    return alignment_targets(annotated, detected, class_sim, attr_sim, norm)


def predicted_names(soft_labels: np.ndarray, attr_labels: np.ndarray | None, class_names: Sequence[str],
                    attr_names: Sequence[str]) -> tuple[list[str | None], list[str | None]]:
    """Each region's predicted class (argmax of soft_labels over the C classes, background column 0 left out)
    and attribute (argmax of attr_labels; None without an attribute head)."""
    soft = np.asarray(soft_labels, dtype=np.float32)
    classes = [class_names[int(i)] if int(i) < len(class_names) else None for i in soft[:, 1:].argmax(axis=1)]
    if attr_labels is None or not len(attr_names) or np.asarray(attr_labels).size == 0:
        return classes, [None] * len(classes)
    attrs = np.asarray(attr_labels, dtype=np.float32).argmax(axis=1)
    return classes, [attr_names[int(i)] if int(i) < len(attr_names) else None for i in attrs]


class AlignmentDataset(PretrainDataset):
    """The alignment stage's text db over the feature store: ``pair(i, its own image)`` adds
    ``align_targets`` [len(input_ids), regions]: each pointer's A* row on its pieces ([CLS] shifts them by
    one), zero rows elsewhere."""

    def extend(self, example: dict[str, Any], record: Mapping[str, Any], i: int, img_key: str
               ) -> dict[str, Any]:
        where = f"text {self.txt_ids[i]!r}"
        if img_key != self.img_keys[i]:
            raise PretrainDataError(f"{where}: alignment targets belong to image {self.img_keys[i]!r}, not "
                                    f"{img_key!r}")
        n_regions = example["img_feat"].shape[0]
        length = example["input_ids"].shape[0]
        targets = torch.zeros(length, n_regions)
        rows = record.get("align_targets") or []
        for start, end, p in record.get("align_spans") or []:
            row = torch.tensor(rows[p], dtype=torch.float32)
            if row.numel() != n_regions:
                raise PretrainDataError(f"{where}: field align_targets has {row.numel()} regions but the "
                                        f"store serves {n_regions} for {img_key} (another box rule?)")
            end = min(end, length - 2)
            if start < end:
                targets[1 + start:1 + end] = row
        return {**example, "align_targets": targets}
