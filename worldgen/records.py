"""What the world publishes, in memory: images with their identities, and metadata files by role."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

from worldgen.config import WorldConfig
from worldgen.render import encode, render
from worldgen.scenes import Scene, sample_scene


@dataclass
class WorldImage:
    dataset: str
    key: str  # canonical image key ("coco:57870", "cc:train:3", ...)
    url: str  # as published in the metadata
    split: str
    scene: Scene
    data: bytes
    scale: float = 1.0  # the scene was rendered at this scale
    coco_id: int | None = None  # COCO's own id, or VG's coco_id
    flickr_id: int | None = None  # VG's flickr_id field
    flickr_url: str | None = None  # COCO's flickr_url
    planted: str | None = None  # the overlap planted on purpose (WorldOverlaps field name)
    eval_key: str | None = None  # the eval image a planted overlap collides with
    fault: str | None = None  # mirror fault injected on this image's URL

    def scene_record(self) -> dict:
        return {
            "dataset": self.dataset,
            "key": self.key,
            "url": self.url,
            "split": self.split,
            **self.scene.to_json(self.scale),
        }


@dataclass
class World:
    cfg: WorldConfig
    images: dict[str, list[WorldImage]] = field(default_factory=dict)
    # (dataset, role) -> file bytes, or member path -> bytes for a role that is a whole archive
    metadata: dict[tuple[str, str], bytes | dict[str, bytes]] = field(default_factory=dict)

    def rng(self, name: str) -> random.Random:
        """An independent stream per purpose, so one dataset's size never reshuffles another's."""
        return random.Random(f"{self.cfg.seed}/{name}")

    def scene(self, rng: random.Random) -> Scene:
        return sample_scene(rng, self.cfg.image_min_side, self.cfg.image_max_side)

    def encode(self, scene: Scene, fmt: str = "JPEG", scale: float = 1.0) -> bytes:
        return encode(render(scene, scale), fmt, self.cfg.jpeg_quality)

    def add(self, image: WorldImage) -> WorldImage:
        self.images.setdefault(image.dataset, []).append(image)
        return image

    def put_json(self, dataset: str, role: str, obj) -> None:
        self.metadata[(dataset, role)] = json.dumps(obj).encode()

    def put_text(self, dataset: str, role: str, text: str) -> None:
        self.metadata[(dataset, role)] = text.encode()
