"""Every seed of a run derives from the one root seed: ``seed_of(root, "<purpose>", ...)``."""

from __future__ import annotations

import hashlib
from typing import Any


def seed_of(root: int, *parts: Any) -> int:
    """A 63-bit seed for one purpose (``parts``: its name, then any indices: task, step, rank), derived from
    the root seed by a keyed hash: independent across purposes, stable across processes and versions."""
    digest = hashlib.blake2b("\0".join(map(str, (root, *parts))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
