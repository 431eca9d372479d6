"""Flickr30k: images under real photo ids, Karpathy's dataset_flickr30k.json, Flickr30k Entities
(annotations.zip with Sentences/ and Annotations/, and the split id lists) and SNLI-VE on top of them."""

from __future__ import annotations

import json
import random
from collections import Counter
from xml.sax.saxutils import escape

from worldgen.captions import (
    Caption,
    distinct_captions,
    entities_line,
    karpathy_tokens,
    raw_text,
)
from worldgen.identities import ENTITIES_SPLITS, entities_ids
from worldgen.records import World, WorldImage
from worldgen.scenes import Scene
from worldgen.tasks_text import parses, snli_hypotheses

SNLI_PREMISES_PER_IMAGE = 2


def build_flickr30k(world: World, image_base_url: str) -> list[WorldImage]:
    sizes = world.cfg.sizes
    rng = world.rng("flickr30k")
    wanted = {"train": sizes.flickr30k_train, "val": sizes.flickr30k_val, "test": sizes.flickr30k_test}
    picked = {split: sorted(rng.sample(entities_ids()[split], n)) for split, n in wanted.items()}
    entities_split = {pid: split for split, ids in picked.items() for pid in ids}
    photo_ids = sorted(entities_split, key=str)  # Karpathy's file lists images by file name
    order = rng.sample(photo_ids, len(photo_ids))
    n_test, n_val = sizes.karpathy_flickr30k_test, sizes.karpathy_flickr30k_val
    karpathy_split = {
        pid: "test" if k < n_test else "val" if k < n_test + n_val else "train" for k, pid in enumerate(order)
    }

    images, karpathy_records, members = [], [], {}
    for imgid, pid in enumerate(photo_ids):
        irng = world.rng(f"flickr30k/{pid}")
        scene = world.scene(irng)
        captions = distinct_captions(scene, irng, world.cfg.captions_per_image)
        raws = [raw_text(cap, irng) for cap in captions]
        filename = f"{pid}.jpg"
        images.append(
            world.add(
                WorldImage(
                    dataset="flickr30k",
                    key=f"flickr30k:{pid}",
                    url=image_base_url + filename,
                    split=entities_split[pid],
                    scene=scene,
                    data=world.encode(scene),
                )
            )
        )
        sentids = [imgid * len(raws) + k for k in range(len(raws))]
        karpathy_records.append(
            {
                "sentids": sentids,
                "imgid": imgid,
                "sentences": [
                    {"tokens": karpathy_tokens(raw), "raw": raw, "imgid": imgid, "sentid": sid}
                    for raw, sid in zip(raws, sentids, strict=True)
                ],
                "split": karpathy_split[pid],
                "filename": filename,
            }
        )
        sentences, xml = _entities_files(scene, captions, raws, filename, irng)
        members[f"Sentences/{pid}.txt"] = sentences.encode()
        members[f"Annotations/{pid}.xml"] = xml.encode()

    world.put_json("flickr30k", "karpathy", {"images": karpathy_records, "dataset": "flickr30k"})
    world.metadata[("flickr30k", "entities")] = members
    for split in ENTITIES_SPLITS:
        in_split = set(picked[split])
        listed = [pid for pid in entities_ids()[split] if pid in in_split]  # the real lists' order
        world.put_text("flickr30k", f"entities_{split}", "".join(f"{pid}\n" for pid in listed))
    _snli_ve(world, images, karpathy_records)
    return images


def _entities_files(
    scene: Scene, captions: list[Caption], raws: list[str], filename: str, rng: random.Random
) -> tuple[str, str]:
    """Sentences/<id>.txt (phrase markup) and Annotations/<id>.xml (1-based boxes) of one image."""
    base = 100 * rng.randint(0, 9)
    chain_ids = {f"obj:{i}": base + 1 + i for i in range(len(scene.objects))}
    chain_ids["scene"] = base + len(scene.objects) + 1
    chain_ids["notvisual"] = 0  # Entities' "notvisual" chain: every such phrase is its own singleton
    types = {ref: "other" for ref in chain_ids} | {"scene": "scene", "notvisual": "notvisual"}
    mentioned = Counter(ref for cap in captions for _, _, ref in cap.phrases)
    for ref in sorted(r for r in mentioned if r.startswith("group:")):
        chain_ids[ref] = base + 10 + len(chain_ids)
        types[ref] = "other"

    lines = []
    for cap, raw in zip(captions, raws, strict=True):
        tokens = cap.tokens if raw.rstrip().endswith(".") else cap.tokens[:-1]
        lines.append(entities_line(Caption(tokens, cap.phrases), chain_ids, types, raw[:1].isupper()) + "\n")

    objects = []
    for i, obj in enumerate(scene.objects):
        names = [chain_ids[f"obj:{i}"]]
        if f"group:{obj.shape}" in mentioned:  # a box shared by a group phrase names both chains
            names.append(chain_ids[f"group:{obj.shape}"])
        x, y, w, h = obj.box()
        name_xml = "".join(f"\t\t<name>{n}</name>\n" for n in names)
        objects.append(
            f"\t<object>\n{name_xml}\t\t<bndbox>\n\t\t\t<xmin>{x + 1}</xmin>\n\t\t\t<ymin>{y + 1}</ymin>\n"
            f"\t\t\t<xmax>{x + w}</xmax>\n\t\t\t<ymax>{y + h}</ymax>\n\t\t</bndbox>\n\t</object>\n"
        )
    if "scene" in mentioned:
        objects.append(
            f"\t<object>\n\t\t<name>{chain_ids['scene']}</name>\n\t\t<scene>1</scene>\n"
            "\t\t<nobndbox>0</nobndbox>\n\t</object>\n"
        )
    xml = (
        f"<annotation>\n\t<filename>{escape(filename)}</filename>\n\t<size>\n\t\t<width>{scene.width}</width>\n"
        f"\t\t<height>{scene.height}</height>\n\t\t<depth>3</depth>\n\t</size>\n{''.join(objects)}</annotation>\n"
    )
    return "".join(lines), xml


def _snli_ve(world: World, images: list[WorldImage], karpathy_records: list[dict]) -> None:
    """SNLI-VE: premises are the images' captions; test is Entities test, dev a fixed subset of the rest."""
    rng = world.rng("snli_ve")
    non_test = [img.key for img in images if img.split != "test"]
    dev = set(rng.sample(non_test, world.cfg.sizes.snli_ve_dev))
    by_split: dict[str, list[dict]] = {"train": [], "dev": [], "test": []}
    for img, record in zip(images, karpathy_records, strict=True):
        split = "test" if img.split == "test" else "dev" if img.key in dev else "train"
        irng = world.rng(f"snli_ve/{img.key}")
        filename = record["filename"]
        for k in sorted(irng.sample(range(len(record["sentences"])), SNLI_PREMISES_PER_IMAGE)):
            premise = record["sentences"][k]["raw"].strip()
            p_binary, p_parse = parses(premise)
            for label, hypothesis in snli_hypotheses(img.scene, irng).items():
                h_binary, h_parse = parses(hypothesis)
                by_split[split].append(
                    {
                        "Flikr30kID": filename,
                        "annotator_labels": _annotator_labels(label, split, irng),
                        "captionID": f"{filename}#{k}",
                        "gold_label": label,
                        "pairID": f"{filename}#{k}r1{label[0]}",
                        "sentence1": premise,
                        "sentence1_binary_parse": p_binary,
                        "sentence1_parse": p_parse,
                        "sentence2": hypothesis,
                        "sentence2_binary_parse": h_binary,
                        "sentence2_parse": h_parse,
                    }
                )
    for split, records in by_split.items():
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)  # SNLI's keys are sorted
        world.put_text("snli_ve", split, text)


def _annotator_labels(gold: str, split: str, rng: random.Random) -> list[str]:
    """One label on most train pairs; five on validated (dev/test) pairs, the gold one in the majority."""
    if split == "train":
        return [gold]
    labels = [gold] * rng.randint(3, 5)
    labels += [rng.choice(("entailment", "neutral", "contradiction")) for _ in range(5 - len(labels))]
    return labels
