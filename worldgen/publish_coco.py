"""COCO 2014 and the sets built on its images: captions/instances JSON, Karpathy's dataset_coco.json,
VQA v2 questions/annotations and RefCOCO (UNC) refs + instances."""

from __future__ import annotations

import pickle
import random
from collections import Counter
from dataclasses import dataclass, field

from worldgen.captions import distinct_captions, karpathy_tokens, raw_text
from worldgen.identities import IdPool, coco_flickr_url, entities_ids, other_flickr_spelling
from worldgen.records import World, WorldImage
from worldgen.scenes import SHAPES
from worldgen.tasks_text import as_typed, referring_expressions, ten_answers, vqa_questions

COCO_MAX_ID = 581_929
FLICKR_ID_RANGE = (1_000_000_000, 9_999_999_999)
REFCOCO_EVAL_SPLITS = ("val", "testA", "testB")
LICENSES = [
    {
        "url": "http://creativecommons.org/licenses/by-nc-sa/2.0/",
        "id": 1,
        "name": "Attribution-NonCommercial-ShareAlike License",
    },
    {
        "url": "http://creativecommons.org/licenses/by-nc/2.0/",
        "id": 2,
        "name": "Attribution-NonCommercial License",
    },
    {
        "url": "http://creativecommons.org/licenses/by-nc-nd/2.0/",
        "id": 3,
        "name": "Attribution-NonCommercial-NoDerivs License",
    },
    {"url": "http://creativecommons.org/licenses/by/2.0/", "id": 4, "name": "Attribution License"},
    {
        "url": "http://creativecommons.org/licenses/by-sa/2.0/",
        "id": 5,
        "name": "Attribution-ShareAlike License",
    },
    {
        "url": "http://creativecommons.org/licenses/by-nd/2.0/",
        "id": 6,
        "name": "Attribution-NoDerivs License",
    },
    {"url": "http://flickr.com/commons/usage/", "id": 7, "name": "No known copyright restrictions"},
    {"url": "http://www.usa.gov/copyright.shtml", "id": 8, "name": "United States Government Work"},
]
INFO_2014 = {
    "description": "COCO 2014 Dataset",
    "url": "http://cocodataset.org",
    "version": "1.0",
    "year": 2014,
    "contributor": "COCO Consortium",
    "date_created": "2017/09/01",
}
CATEGORIES = [{"supercategory": "shape", "id": k + 1, "name": shape} for k, shape in enumerate(SHAPES)]
VQA_INFO = {
    "description": "This is v2.0 of the VQA dataset.",
    "url": "http://visualqa.org",
    "version": "2.0",
    "year": 2017,
    "contributor": "VQA Team",
    "date_created": "2017-04-26 17:07:13",
}
VQA_LICENSE = {
    "url": "http://creativecommons.org/licenses/by/4.0/",
    "name": "Creative Commons Attribution 4.0 International License",
}


@dataclass
class CocoImage:
    image: WorldImage
    karpathy_split: str  # train | restval | val | test
    refcoco_split: str | None
    photo_id: int  # the Flickr photo behind flickr_url
    captions: list[str]
    annotations: list[dict] = field(default_factory=list)  # instances, one per scene object

    @property
    def id(self) -> int:
        return self.image.coco_id

    @property
    def blocked(self) -> bool:
        """Evaluation image under the default dedup blocklist (Karpathy val/test, RefCOCO eval)."""
        return self.karpathy_split in ("val", "test") or self.refcoco_split in REFCOCO_EVAL_SPLITS


def build_coco(world: World, flickr30k: list[WorldImage]) -> list[CocoImage]:
    cfg, sizes = world.cfg, world.cfg.sizes
    rng = world.rng("coco")
    ids = IdPool(rng)
    train_ids = sorted(ids.draw(1, COCO_MAX_ID) for _ in range(sizes.coco_train2014))
    val_ids = sorted(ids.draw(1, COCO_MAX_ID) for _ in range(sizes.coco_val2014))
    karpathy = dict.fromkeys(train_ids, "train")
    n_val, n_test = sizes.karpathy_coco_val, sizes.karpathy_coco_test
    for k, cid in enumerate(rng.sample(val_ids, len(val_ids))):
        karpathy[cid] = "val" if k < n_val else "test" if k < n_val + n_test else "restval"
    refcoco_plan = (
        ["val"] * sizes.refcoco_val + ["testA"] * sizes.refcoco_testA + ["testB"] * sizes.refcoco_testB
    )
    refcoco_plan += ["train"] * sizes.refcoco_train
    refcoco = dict(zip(rng.sample(train_ids, len(refcoco_plan)), refcoco_plan, strict=True))
    planted = rng.sample([cid for cid in train_ids if cid not in refcoco], cfg.overlaps.coco_flickr)
    targets = dict(zip(planted, rng.sample(flickr30k, len(planted)), strict=True))
    photos = IdPool(
        world.rng("coco/photos"), exclude={pid for ids_ in entities_ids().values() for pid in ids_}
    )

    out = []
    for split, split_ids in (("train2014", train_ids), ("val2014", val_ids)):
        for cid in split_ids:
            irng = world.rng(f"coco/{cid}")
            scene = world.scene(irng)
            file_name = f"COCO_{split}_{cid:012d}.jpg"
            image = WorldImage(
                dataset="coco",
                key=f"coco:{cid}",
                url=f"http://images.cocodataset.org/{split}/{file_name}",
                split=split,
                scene=scene,
                data=world.encode(scene),
                coco_id=cid,
            )
            if cid in targets:  # the same Flickr photo as a Flickr30k image, under another URL spelling
                photo_id = int(targets[cid].key.split(":")[1])
                image.flickr_url = other_flickr_spelling(photo_id, irng)
                image.planted, image.eval_key = "coco_flickr", targets[cid].key
            else:
                photo_id = photos.draw(*FLICKR_ID_RANGE)
                image.flickr_url = coco_flickr_url(photo_id, irng)
            captions = [raw_text(c, irng) for c in distinct_captions(scene, irng, cfg.captions_per_image)]
            out.append(CocoImage(world.add(image), karpathy[cid], refcoco.get(cid), photo_id, captions))
    _publish_coco(world, out)
    _publish_karpathy(world, out)
    _publish_vqa(world, out)
    _publish_refcoco(world, out)
    return out


def _publish_coco(world: World, images: list[CocoImage]) -> None:
    rng = world.rng("coco/annotations")
    caption_id = rng.randint(100_000, 200_000)
    instance_id = rng.randint(1_000_000, 2_000_000)
    for split in ("train2014", "val2014"):
        records, captions, instances = [], [], []
        for img in (i for i in images if i.image.split == split):
            scene = img.image.scene
            records.append(
                {
                    "license": rng.randint(1, 8),
                    "file_name": img.image.url.rsplit("/", 1)[1],
                    "coco_url": img.image.url,
                    "height": scene.height,
                    "width": scene.width,
                    "date_captured": _date_captured(rng),
                    "flickr_url": img.image.flickr_url,
                    "id": img.id,
                }
            )
            for text in img.captions:
                caption_id += rng.randint(1, 9)
                captions.append({"image_id": img.id, "id": caption_id, "caption": text})
            for obj in scene.objects:
                instance_id += rng.randint(1, 9)
                polygon = [round(v, 2) for point in obj.polygon() for v in point]
                img.annotations.append(
                    {
                        "segmentation": [polygon],
                        "area": round(_area(obj.polygon()), 4),
                        "iscrowd": 0,
                        "image_id": img.id,
                        "bbox": [float(v) for v in obj.box()],
                        "category_id": SHAPES.index(obj.shape) + 1,
                        "id": instance_id,
                    }
                )
            instances.extend(img.annotations)
        world.put_json(
            "coco",
            f"captions_{split}",
            {"info": INFO_2014, "images": records, "licenses": LICENSES, "annotations": captions},
        )
        world.put_json(
            "coco",
            f"instances_{split}",
            {
                "info": INFO_2014,
                "images": records,
                "licenses": LICENSES,
                "annotations": instances,
                "categories": CATEGORIES,
            },
        )


def _date_captured(rng: random.Random) -> str:
    day, hour = rng.randint(14, 25), rng.randint(0, 23)
    return f"2013-11-{day} {hour:02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}"


def _area(points: list[tuple[float, float]]) -> float:
    """Shoelace area of a closed polygon."""
    edges = zip(points, points[1:] + points[:1], strict=True)
    return abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in edges)) / 2


def _publish_karpathy(world: World, images: list[CocoImage]) -> None:
    records, sentid = [], 0
    ordered = [i for i in images if i.image.split == "val2014"] + [
        i for i in images if i.image.split == "train2014"
    ]
    for imgid, img in enumerate(ordered):
        sentids = list(range(sentid, sentid + len(img.captions)))
        sentid += len(img.captions)
        records.append(
            {
                "filepath": img.image.split,
                "sentids": sentids,
                "filename": img.image.url.rsplit("/", 1)[1],
                "imgid": imgid,
                "split": img.karpathy_split,
                "sentences": [
                    {"tokens": karpathy_tokens(text), "raw": text, "imgid": imgid, "sentid": sid}
                    for text, sid in zip(img.captions, sentids, strict=True)
                ],
                "cocoid": img.id,
            }
        )
    world.put_json("coco", "karpathy", {"images": records, "dataset": "coco"})


def _publish_vqa(world: World, images: list[CocoImage]) -> None:
    n = world.cfg.vqa_questions_per_image
    for split in ("train2014", "val2014"):
        questions, annotations = [], []
        for img in (i for i in images if i.image.split == split):
            irng = world.rng(f"vqa/{img.id}")
            for k, qa in enumerate(vqa_questions(img.image.scene, irng, n)):
                qid = img.id * 1000 + k
                answers = ten_answers(qa, irng)
                questions.append({"image_id": img.id, "question": qa.question, "question_id": qid})
                annotations.append(
                    {
                        "question_type": qa.question_type,
                        "multiple_choice_answer": Counter(a["answer"] for a in answers).most_common(1)[0][0],
                        "answers": answers,
                        "image_id": img.id,
                        "answer_type": qa.answer_type,
                        "question_id": qid,
                    }
                )
        world.put_json(
            "vqa",
            f"questions_{split}",
            {
                "info": VQA_INFO,
                "task_type": "Open-Ended",
                "data_type": "mscoco",
                "license": VQA_LICENSE,
                "data_subtype": split,
                "questions": questions,
            },
        )
        world.put_json(
            "vqa",
            f"annotations_{split}",
            {
                "info": VQA_INFO,
                "license": VQA_LICENSE,
                "data_subtype": split,
                "annotations": annotations,
                "data_type": "mscoco",
            },
        )


def _publish_refcoco(world: World, images: list[CocoImage]) -> None:
    refs, ref_images, ref_annotations = [], [], []
    sent_id = 0
    for img in sorted((i for i in images if i.refcoco_split), key=lambda i: i.id):
        scene = img.image.scene
        irng = world.rng(f"refcoco/{img.id}")
        ref_images.append(
            {
                "file_name": img.image.url.rsplit("/", 1)[1],
                "height": scene.height,
                "width": scene.width,
                "id": img.id,
            }
        )
        ref_annotations.extend(img.annotations)
        for i, ann in enumerate(img.annotations):
            expressions = referring_expressions(scene, i, irng)
            sentences = [
                {"tokens": e.split(), "raw": as_typed(e, irng), "sent_id": sent_id + k, "sent": e}
                for k, e in enumerate(expressions)
            ]
            refs.append(
                {
                    "sent_ids": [s["sent_id"] for s in sentences],
                    "file_name": f"COCO_train2014_{img.id:012d}_{ann['id']}.jpg",
                    "ann_id": ann["id"],
                    "ref_id": len(refs),
                    "image_id": img.id,
                    "split": img.refcoco_split,
                    "sentences": sentences,
                    "category_id": ann["category_id"],
                }
            )
            sent_id += len(sentences)
    world.metadata[("refcoco", "refs")] = pickle.dumps(refs, protocol=2)
    world.put_json(
        "refcoco",
        "instances",
        {"images": ref_images, "annotations": ref_annotations, "categories": CATEGORIES},
    )
