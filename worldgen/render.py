"""Rasterizes scenes with PIL: background, then each shape filled with its texture through a mask."""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image, ImageDraw

from worldgen.scenes import BACKGROUND_COLOURS, COLOURS, Scene, SceneObject


def render(scene: Scene, scale: float = 1.0) -> Image.Image:
    width, height = round(scene.width * scale), round(scene.height * scale)
    canvas = _background(scene, width, height)
    for obj in scene.objects:
        _draw_object(canvas, obj, scale)
    return canvas


def encode(image: Image.Image, fmt: str, jpeg_quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        image.save(buf, "JPEG", quality=jpeg_quality)
    else:
        image.save(buf, "PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _background(scene: Scene, width: int, height: int) -> Image.Image:
    bg = scene.background
    base = np.array(BACKGROUND_COLOURS[bg.colour], dtype=np.float32)
    if bg.kind == "solid":
        return Image.new("RGB", (width, height), tuple(int(c) for c in base))
    if bg.kind == "gradient":
        end = np.array(BACKGROUND_COLOURS[bg.colour2], dtype=np.float32)
        steps = height if bg.vertical else width
        t = np.linspace(0.0, 1.0, steps, dtype=np.float32)[:, None]
        ramp = (base * (1 - t) + end * t).astype(np.uint8)  # steps x 3
        pixels = np.broadcast_to(ramp[:, None, :] if bg.vertical else ramp[None, :, :], (height, width, 3))
        return Image.fromarray(np.ascontiguousarray(pixels))
    # Noise: seeded from the scene itself so that the same scene always renders the same bytes.
    seed = int.from_bytes(hashlib.sha256(repr(scene).encode()).digest()[:8], "little")
    noise = np.random.default_rng(seed).normal(0.0, 18.0, (height, width, 1)).astype(np.float32)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _draw_object(canvas: Image.Image, obj: SceneObject, scale: float) -> None:
    x0, y0, w, h = obj.box(scale)
    w, h = max(w, 1), max(h, 1)
    local = [(px - x0, py - y0) for px, py in obj.polygon(scale)]
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).polygon(local, fill=255)
    canvas.paste(_texture(obj, w, h, scale), (x0, y0), mask)


def _texture(obj: SceneObject, w: int, h: int, scale: float) -> Image.Image:
    fill = COLOURS[obj.colour]
    tile = Image.new("RGB", (w, h), fill)
    if obj.texture == "plain":
        return tile
    # The pattern colour is a strong shade of the fill, so the object's colour name stays right.
    ink = tuple(int(c * 0.45) for c in fill) if sum(fill) > 200 else tuple(min(255, c + 110) for c in fill)
    draw = ImageDraw.Draw(tile)
    step = max(4, round(obj.side * scale / 5))
    if obj.texture == "striped":
        for k in range(-h, w, step):
            draw.line([(k, 0), (k + h, h)], fill=ink, width=max(1, step // 3))
    elif obj.texture == "dotted":
        r = max(1, step // 4)
        for cy in range(step // 2, h, step):
            for cx in range(step // 2, w, step):
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=ink)
    else:  # checkered
        half = max(2, step // 2)
        for cy in range(0, h, half):
            for cx in range((cy // half) % 2 * half, w, 2 * half):
                draw.rectangle([cx, cy, cx + half - 1, cy + half - 1], fill=ink)
    return tile
