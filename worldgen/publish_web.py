"""Web-crawled corpora: Conceptual Captions (caption<TAB>url TSVs) and SBU (line-aligned url and caption
files inside SBUCaptionedPhotoDataset.tar.gz). Both are where the content-hash, URL and Flickr-photo
overlaps with evaluation images are planted."""

from __future__ import annotations

from itertools import zip_longest

from worldgen.captions import cc_text, sbu_text
from worldgen.identities import IdPool, entities_ids, sbu_url, url_variant, web_url
from worldgen.publish_coco import FLICKR_ID_RANGE, CocoImage
from worldgen.publish_nlvr2 import EVAL_SPLITS
from worldgen.records import World, WorldImage


def build_cc(
    world: World, flickr30k: list[WorldImage], coco: list[CocoImage], nlvr2: list[WorldImage]
) -> list[WorldImage]:
    sizes, overlaps = world.cfg.sizes, world.cfg.overlaps
    rng = world.rng("cc")
    # Eval images copied byte for byte, drawn in turn from each kind of blocked eval image.
    kinds = [flickr30k, [c.image for c in coco if c.blocked], [i for i in nlvr2 if i.split in EVAL_SPLITS]]
    shuffled = [rng.sample(kind, len(kind)) for kind in kinds]
    interleaved = [img for group in zip_longest(*shuffled) for img in group if img is not None]
    copies = interleaved[: overlaps.cc_content_hash]
    respelled = rng.sample([i for i in nlvr2 if i.split == "dev"], overlaps.cc_url)
    plan = [("cc_content_hash", img) for img in copies] + [("cc_url", img) for img in respelled]
    plan += [(None, None)] * (sizes.cc_train + sizes.cc_val - len(plan))
    plan = rng.sample(plan, len(plan))

    images, rows = [], {"train": [], "val": []}
    for k, (planted, target) in enumerate(plan):
        role, index = ("train", k) if k < sizes.cc_train else ("val", k - sizes.cc_train)
        irng = world.rng(f"cc/{role}/{index}")
        if planted == "cc_content_hash":  # the eval image's exact bytes under an unrelated URL
            url, scene, scale, data = web_url(irng), target.scene, target.scale, target.data
        else:
            # cc_url: the NLVR2 dev URL respelled, serving this row's own bytes
            url = url_variant(target.url, irng) if planted == "cc_url" else web_url(irng)
            scene, scale = world.scene(irng), 1.0
            data = world.encode(scene)
        image = WorldImage(
            dataset="cc",
            key=f"cc:{role}:{index}",
            url=url,
            split=role,
            scene=scene,
            data=data,
            scale=scale,
            planted=planted,
            eval_key=target.key if target else None,
        )
        images.append(world.add(image))
        rows[role].append(f"{cc_text(image.scene, irng)}\t{image.url}\n")
    for role, lines in rows.items():
        world.put_text("cc", role, "".join(lines))
    return images


def build_sbu(world: World, flickr30k: list[WorldImage]) -> list[WorldImage]:
    sizes, overlaps = world.cfg.sizes, world.cfg.overlaps
    rng = world.rng("sbu")
    plan = rng.sample(flickr30k, overlaps.sbu_flickr) + [None] * (sizes.sbu - overlaps.sbu_flickr)
    plan = rng.sample(plan, len(plan))
    photos = IdPool(world.rng("sbu/photos"), exclude={pid for ids in entities_ids().values() for pid in ids})
    images, urls, captions = [], [], []
    for line, target in enumerate(plan):
        irng = world.rng(f"sbu/{line}")
        scene = world.scene(irng)
        photo_id = int(target.key.split(":")[1]) if target else photos.draw(*FLICKR_ID_RANGE)
        image = WorldImage(
            dataset="sbu",
            key=f"sbu:{line}",
            url=sbu_url(photo_id, irng),
            split="train",
            scene=scene,
            data=world.encode(scene),
            planted="sbu_flickr" if target else None,
            eval_key=target.key if target else None,
        )
        images.append(world.add(image))
        urls.append(image.url + "\n")
        captions.append(sbu_text(scene, irng) + "\n")
    world.put_text("sbu", "urls", "".join(urls))
    world.put_text("sbu", "captions", "".join(captions))
    return images
