"""NLVR2: JSON Lines files named .json, one line per statement about a (left, right) image pair."""

from __future__ import annotations

import json

from worldgen.identities import web_url
from worldgen.records import World, WorldImage
from worldgen.tasks_text import nlvr2_statement

PAIRS_PER_SET = 4
NLVR2_SPLITS = ("train", "dev", "test1")
EVAL_SPLITS = ("dev", "test1")


def build_nlvr2(world: World) -> list[WorldImage]:
    sizes = world.cfg.sizes
    counts = {"train": sizes.nlvr2_train, "dev": sizes.nlvr2_dev, "test1": sizes.nlvr2_test1}
    images = []
    for split in NLVR2_SPLITS:
        rng = world.rng(f"nlvr2/{split}")
        first_set = rng.randint(0, 999)
        labels = [p % 2 == 0 for p in range(counts[split])]  # balanced True/False, in random order
        rng.shuffle(labels)
        lines = []
        for p, want in enumerate(labels):
            set_id, pair_id = first_set + p // PAIRS_PER_SET, p % PAIRS_PER_SET
            stem = f"{split}-{set_id}-{pair_id}"
            # Resample the pair until the statement has the label we want.
            for _ in range(500):
                left, right = world.scene(rng), world.scene(rng)
                sentence, holds = nlvr2_statement(left, right, rng)
                if holds == want:
                    break
            pair = []
            for side, scene in enumerate((left, right)):
                pair.append(
                    world.add(
                        WorldImage(
                            dataset="nlvr2",
                            key=f"nlvr2:{stem}-img{side}",
                            url=web_url(rng, rng.choice(("jpg", "png"))),
                            split=split,
                            scene=scene,
                            data=world.encode(scene, fmt="PNG"),
                        )
                    )
                )
            images.extend(pair)
            label = str(holds)
            writer = str(rng.randint(1, 200))
            record = {
                "validation": {str(rng.randint(1, 200)): label},
                "sentence": sentence,
                "left_url": pair[0].url,
                "writer": writer,
                "label": label,
                "right_url": pair[1].url,
                "synset": left.objects[0].shape,
                "query": f"{left.objects[0].shape} shapes{set_id % 50}",
                "identifier": f"{stem}-0",
            }
            if split == "train":
                record["extra_validations"] = {}
                record["directory"] = set_id % 100
            else:
                record["extra_validations"] = {str(rng.randint(1, 200)): label for _ in range(4)}
            lines.append(record)
        world.put_text("nlvr2", split, "".join(json.dumps(r) + "\n" for r in lines))
    return images
