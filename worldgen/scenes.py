"""Scenes of the synthetic world: coloured, textured shapes at positions on varied backgrounds.

A scene is sampled once and can be rendered at several scales (a Visual Genome copy of a COCO image is
the same scene at another resolution). Geometry lives here so that boxes, segmentation polygons,
positions and pairwise relations all come from one place.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross", "diamond", "pentagon")
PLURALS = {"cross": "crosses"}
SYNSETS = {
    "circle": "circle.n.01",
    "square": "square.n.01",
    "triangle": "triangle.n.01",
    "star": "star.n.03",
    "hexagon": "hexagon.n.01",
    "cross": "cross.n.01",
    "diamond": "diamond.n.02",
    "pentagon": "pentagon.n.01",
}
COLOURS = {
    "red": (214, 39, 40),
    "orange": (255, 127, 14),
    "yellow": (240, 210, 30),
    "green": (44, 160, 44),
    "blue": (31, 90, 200),
    "purple": (130, 60, 180),
    "pink": (240, 120, 190),
    "brown": (120, 72, 40),
    "black": (20, 20, 20),
    "white": (250, 250, 250),
}
SIZES = ("small", "medium", "large")
# Object side as a fraction of the image's shorter side; the ranges do not overlap so "bigger than"
# between two size classes is always visible.
SIZE_FRACTION = {"small": (0.20, 0.25), "medium": (0.30, 0.35), "large": (0.42, 0.48)}
TEXTURES = ("plain", "striped", "dotted", "checkered")
# Background tones are muted so that every object colour stands out against them.
BACKGROUND_COLOURS = {
    "cream": (238, 230, 205),
    "gray": (150, 150, 150),
    "sky": (170, 200, 230),
    "mint": (180, 225, 195),
    "lavender": (205, 195, 230),
    "sand": (215, 190, 150),
    "slate": (90, 105, 120),
}
BACKGROUND_KINDS = ("solid", "gradient", "noise")


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    texture: str
    x: float  # top-left corner and side, in pixels of the scene's base resolution
    y: float
    side: float

    def box(self, scale: float = 1.0) -> tuple[int, int, int, int]:
        """Tight integer box ``(x, y, w, h)`` of the rendered shape at ``scale``."""
        xs, ys = zip(*self.polygon(scale), strict=True)
        x0, y0 = math.floor(min(xs)), math.floor(min(ys))
        return x0, y0, math.ceil(max(xs)) - x0, math.ceil(max(ys)) - y0

    def polygon(self, scale: float = 1.0) -> list[tuple[float, float]]:
        """Outline in pixels (a 24-gon for the circle): drawn by the renderer, published as segmentation."""
        s = self.side * scale
        ox, oy = self.x * scale, self.y * scale
        return [(ox + u * s, oy + v * s) for u, v in _UNIT_OUTLINES[self.shape]]

    @property
    def centre(self) -> tuple[float, float]:
        return self.x + self.side / 2, self.y + self.side / 2


@dataclass(frozen=True)
class Background:
    kind: str  # solid | gradient | noise
    colour: str
    colour2: str  # gradient end (== colour otherwise)
    vertical: bool  # gradient direction


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: Background
    objects: tuple[SceneObject, ...]

    def position(self, i: int) -> str:
        """Where object ``i`` sits: "left", "top right", "center", ..."""
        cx, cy = self.objects[i].centre
        col = "left" if cx < self.width / 3 else "right" if cx > 2 * self.width / 3 else ""
        row = "top" if cy < self.height / 3 else "bottom" if cy > 2 * self.height / 3 else ""
        return " ".join(p for p in (row, col) if p) or "center"

    def relation(self, i: int, j: int) -> str:
        """A spatial relation that holds between objects i and j: "left of", "right of", "above", "below".

        Boxes never overlap, so one of them always holds; the axis with the larger gap wins.
        """
        a, b = self.objects[i].box(), self.objects[j].box()
        gap_x = max(b[0] - (a[0] + a[2]), a[0] - (b[0] + b[2]))
        gap_y = max(b[1] - (a[1] + a[3]), a[1] - (b[1] + b[3]))
        if gap_x >= gap_y:
            return "left of" if a[0] < b[0] else "right of"
        return "above" if a[1] < b[1] else "below"

    def bigger(self, i: int, j: int) -> bool:
        return SIZES.index(self.objects[i].size) > SIZES.index(self.objects[j].size)

    def count(self, shape: str | None = None, colour: str | None = None) -> int:
        return sum(1 for o in self.objects if shape in (None, o.shape) and colour in (None, o.colour))

    def to_json(self, scale: float = 1.0) -> dict:
        bg = self.background
        return {
            "width": round(self.width * scale),
            "height": round(self.height * scale),
            "background": {"kind": bg.kind, "colour": bg.colour, "colour2": bg.colour2},
            "objects": [
                {
                    "shape": o.shape,
                    "colour": o.colour,
                    "size": o.size,
                    "texture": o.texture,
                    "box": list(o.box(scale)),
                }
                for o in self.objects
            ],
        }


def plural(shape: str) -> str:
    return PLURALS.get(shape, shape + "s")


def sample_scene(rng: random.Random, min_side: int, max_side: int, n_objects: int | None = None) -> Scene:
    width, height = rng.randint(min_side, max_side), rng.randint(min_side, max_side)
    kind = rng.choice(BACKGROUND_KINDS)
    colour = rng.choice(sorted(BACKGROUND_COLOURS))
    colour2 = rng.choice(sorted(set(BACKGROUND_COLOURS) - {colour})) if kind == "gradient" else colour
    background = Background(kind, colour, colour2, rng.random() < 0.5)
    wanted = n_objects or rng.choices((1, 2, 3, 4), weights=(2, 4, 3, 2))[0]
    objects: list[SceneObject] = []
    short = min(width, height)
    for _ in range(wanted):
        obj = _place(rng, width, height, short, objects)
        if obj is not None:
            objects.append(obj)
    if not objects:  # a crowded draw can fail; a small object always fits in an empty image
        objects.append(_place(rng, width, height, short, [], size="small"))
    return Scene(width, height, background, tuple(objects))


def _place(
    rng: random.Random,
    width: int,
    height: int,
    short: int,
    placed: list[SceneObject],
    size: str | None = None,
) -> SceneObject | None:
    size = size or rng.choice(SIZES)
    lo, hi = SIZE_FRACTION[size]
    side = short * rng.uniform(lo, hi)
    shape, colour, texture = rng.choice(SHAPES), rng.choice(sorted(COLOURS)), rng.choice(TEXTURES)
    margin = 2.0
    for _ in range(40):
        x = rng.uniform(margin, width - side - margin)
        y = rng.uniform(margin, height - side - margin)
        candidate = SceneObject(shape, colour, size, texture, round(x, 2), round(y, 2), round(side, 2))
        if all(_apart(candidate, other, gap=3) for other in placed):
            return candidate
    return None


def _apart(a: SceneObject, b: SceneObject, gap: float) -> bool:
    return (
        a.x + a.side + gap <= b.x
        or b.x + b.side + gap <= a.x
        or a.y + a.side + gap <= b.y
        or b.y + b.side + gap <= a.y
    )


def _regular(n: int, start_deg: float, radii: tuple[float, ...] = (0.5,)) -> list[tuple[float, float]]:
    points = []
    for k in range(n * len(radii)):
        r = radii[k % len(radii)]
        a = math.radians(start_deg + 360 * k / (n * len(radii)))
        points.append((0.5 + r * math.cos(a), 0.5 + r * math.sin(a)))
    return points


_UNIT_OUTLINES: dict[str, list[tuple[float, float]]] = {
    "circle": _regular(24, 0),
    "square": [(0.05, 0.05), (0.95, 0.05), (0.95, 0.95), (0.05, 0.95)],
    "triangle": [(0.5, 0.02), (0.98, 0.93), (0.02, 0.93)],
    "star": _regular(5, -90, (0.5, 0.2)),
    "hexagon": _regular(6, 0),
    "cross": [
        (0.35, 0.0),
        (0.65, 0.0),
        (0.65, 0.35),
        (1.0, 0.35),
        (1.0, 0.65),
        (0.65, 0.65),
        (0.65, 1.0),
        (0.35, 1.0),
        (0.35, 0.65),
        (0.0, 0.65),
        (0.0, 0.35),
        (0.35, 0.35),
    ],
    "diamond": [(0.5, 0.0), (0.9, 0.5), (0.5, 1.0), (0.1, 0.5)],
    "pentagon": _regular(5, -90),
}
