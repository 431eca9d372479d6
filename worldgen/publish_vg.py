"""Visual Genome: image_data / region_descriptions / objects / attributes, parallel lists in image order.

Some VG images are COCO images (same scene, VG's own resolution) and carry ``coco_id`` and ``flickr_id``
as the real file does; the planted ones point at blocked COCO eval images or at Flickr30k photos.
"""

from __future__ import annotations

from worldgen.captions import region_phrase, relation_phrase
from worldgen.identities import IdPool
from worldgen.publish_coco import CocoImage
from worldgen.records import World, WorldImage
from worldgen.scenes import SYNSETS

VG_MAX_ID = 2_417_997
VG_URL = "https://cs.stanford.edu/people/rak248"


def build_vg(world: World, coco: list[CocoImage], flickr30k: list[WorldImage]) -> list[WorldImage]:
    sizes, overlaps = world.cfg.sizes, world.cfg.overlaps
    rng = world.rng("vg")
    blocked = [c for c in coco if c.blocked]
    linkable = [c for c in coco if not c.blocked and c.image.planted is None]
    # what each VG image is a copy of: (planted kind, COCO image, Flickr30k image)
    plan: list[tuple[str | None, CocoImage | None, WorldImage | None]] = (
        [("vg_coco", c, None) for c in rng.sample(blocked, overlaps.vg_coco)]
        + [("vg_flickr", None, f) for f in rng.sample(flickr30k, overlaps.vg_flickr)]
        + [(None, c, None) for c in rng.sample(linkable, sizes.vg_with_coco)]
    )
    plan += [(None, None, None)] * (sizes.vg - len(plan))
    plan = rng.sample(plan, len(plan))
    ids = sorted(IdPool(rng).draw(1, VG_MAX_ID) for _ in plan)

    images = []
    for vg_id, (planted, coco_img, flickr_img) in zip(ids, plan, strict=True):
        irng = world.rng(f"vg/{vg_id}")
        folder = "VG_100K_2" if irng.random() < 0.3 else "VG_100K"
        source = coco_img.image if coco_img else flickr_img
        image = WorldImage(
            dataset="vg",
            key=f"vg:{vg_id}",
            url=f"{VG_URL}/{folder}/{vg_id}.jpg",
            split="train",
            scene=source.scene if source else world.scene(irng),
            data=b"",
            planted=planted,
            eval_key=source.key if planted else None,
        )
        if source is not None:  # the same photo at VG's resolution: same scene, other bytes
            image.scale = round(irng.uniform(1.1, 1.4), 3)
        if coco_img:
            image.coco_id, image.flickr_id = coco_img.id, coco_img.photo_id
        elif flickr_img:
            image.flickr_id = int(flickr_img.key.split(":")[1])
        image.data = world.encode(image.scene, scale=image.scale)
        images.append(world.add(image))
    _publish(world, images)
    return images


def _publish(world: World, images: list[WorldImage]) -> None:
    rng = world.rng("vg/annotations")
    object_id = rng.randint(1_000_000, 1_100_000)
    region_id = rng.randint(1_000, 2_000)
    image_data, regions, objects, attributes = [], [], [], []
    for img in images:
        vg_id = int(img.key.split(":")[1])
        scene, scale = img.scene, img.scale
        image_data.append(
            {
                "width": round(scene.width * scale),
                "url": img.url,
                "height": round(scene.height * scale),
                "image_id": vg_id,
                "coco_id": img.coco_id,
                "flickr_id": img.flickr_id,
            }
        )
        irng = world.rng(f"vg/text/{vg_id}")
        img_regions, img_objects, img_attributes = [], [], []
        for i, obj in enumerate(scene.objects):
            x, y, w, h = obj.box(scale)
            object_id += rng.randint(1, 5)
            names = [obj.shape] + (["shape"] if irng.random() < 0.1 else [])  # an object can have two names
            img_objects.append(
                {
                    "synsets": [SYNSETS[obj.shape]],
                    "h": h,
                    "object_id": object_id,
                    "merged_object_ids": [],
                    "names": names,
                    "w": w,
                    "y": y,
                    "x": x,
                }
            )
            attr = {
                "synsets": [SYNSETS[obj.shape]],
                "h": h,
                "object_id": object_id,
                "names": names,
                "w": w,
                "attributes": [obj.colour, obj.size] + ([obj.texture] if obj.texture != "plain" else []),
                "y": y,
                "x": x,
            }
            if irng.random() < 0.08:  # the real file omits the key on some objects
                del attr["attributes"]
            img_attributes.append(attr)
            region_id += rng.randint(1, 5)
            img_regions.append(
                {
                    "region_id": region_id,
                    "width": w,
                    "height": h,
                    "image_id": vg_id,
                    "phrase": region_phrase(scene, i, irng),
                    "y": y,
                    "x": x,
                }
            )
        for i in range(len(scene.objects) - 1):  # relation regions span both boxes
            (ax, ay, aw, ah), (bx, by, bw, bh) = scene.objects[i].box(scale), scene.objects[i + 1].box(scale)
            x0, y0 = min(ax, bx), min(ay, by)
            region_id += rng.randint(1, 5)
            img_regions.append(
                {
                    "region_id": region_id,
                    "width": max(ax + aw, bx + bw) - x0,
                    "height": max(ay + ah, by + bh) - y0,
                    "image_id": vg_id,
                    "phrase": relation_phrase(scene, i, i + 1),
                    "y": y0,
                    "x": x0,
                }
            )
        regions.append({"regions": img_regions, "id": vg_id})
        objects.append({"image_id": vg_id, "objects": img_objects, "image_url": img.url})
        attributes.append({"image_id": vg_id, "attributes": img_attributes})
    world.put_json("vg", "image_data", image_data)
    world.put_json("vg", "region_descriptions", regions)
    world.put_json("vg", "objects", objects)
    world.put_json("vg", "attributes", attributes)
