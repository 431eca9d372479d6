"""Identities of the world's images: ids, Flickr URL spellings and web URLs.

Flickr30k uses real photo ids from the Flickr30k Entities split lists shipped in ``data/``. Every
other Flickr photo (COCO ``flickr_url``, SBU) gets a made-up id outside those lists, so the only
Flickr30k photos elsewhere are the planted ones.
"""

from __future__ import annotations

import random
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ENTITIES_SPLITS = ("train", "val", "test")
# The split lists entities_ids() reads, one per split, relative to this module (package data: a stage's
# cache key hashes them with the code).
PACKAGE_DATA: tuple[str, ...] = (
    "data/flickr30k_entities/train.txt",
    "data/flickr30k_entities/val.txt",
    "data/flickr30k_entities/test.txt",
)

_WEB_HOSTS = (
    "i.pinimg.com",
    "78.media.tumblr.com",
    "lh3.ggpht.com",
    "media.gettyimages.com",
    "www.standard.net",
    "cdn.pixabay.com",
    "i.kinja-img.com",
    "thumbs.dreamstime.com",
    "images.unsplash.com",
    "upload.wikimedia.org",
    "c8.alamy.com",
    "st.depositphotos.com",
    "img.example-shop.com",
    "www.historicbottles.com",
    "cdn.shopify.com",
    "i.ytimg.com",
)
_WEB_DIRS = (
    "originals",
    "736x",
    "photos",
    "image/upload",
    "wp-content/uploads/2016/05",
    "media/catalog",
    "p",
)
_WEB_QUERIES = ("", "", "", "?imgmax=800", "?s=612x612", "?w=500&h=375", "?v=2")
# Flickr sizes sharing the photo's main secret, and those with their own (see FORMATS.md "Flickr URL rules").
_SHARED_SECRET_SIZES = ("", "_s", "_q", "_t", "_m", "_n", "_w", "_z", "_c", "_b")
_OWN_SECRET_SIZES = ("_h", "_k", "_o")


@cache
def entities_ids() -> dict[str, tuple[int, ...]]:
    """The real Flickr30k Entities split lists: split -> photo ids in file order."""
    here = Path(__file__).resolve().parent
    return {
        split: tuple(int(line) for line in (here / rel).read_text().split())
        for split, rel in zip(ENTITIES_SPLITS, PACKAGE_DATA, strict=True)
    }


class IdPool:
    """Draws unique integers from ranges, never repeating one and never hitting ``exclude``."""

    def __init__(self, rng: random.Random, exclude: set[int] | frozenset[int] = frozenset()):
        self.rng = rng
        self.used: set[int] = set(exclude)

    def draw(self, lo: int, hi: int) -> int:
        while True:
            value = self.rng.randint(lo, hi)
            if value not in self.used:
                self.used.add(value)
                return value


def secret(rng: random.Random) -> str:
    return f"{rng.getrandbits(40):010x}"


def coco_flickr_url(photo_id: int, rng: random.Random) -> str:
    """The spelling every real COCO record uses: http://farmN.staticflickr.com/<server>/<id>_<secret>_z.jpg."""
    farm, server = rng.randint(1, 9), rng.randint(1000, 9999)
    return f"http://farm{farm}.staticflickr.com/{server}/{photo_id}_{secret(rng)}_z.jpg"


def sbu_url(photo_id: int, rng: random.Random) -> str:
    """SBU's 500 px form: http://static.flickr.com/<server>/<id>_<secret>.jpg (no size suffix)."""
    return f"http://static.flickr.com/{rng.randint(1000, 9999)}/{photo_id}_{secret(rng)}.jpg"


def other_flickr_spelling(photo_id: int, rng: random.Random) -> str:
    """The same photo under one of Flickr's other host, scheme and size spellings (fresh secret each)."""
    size = rng.choice(_SHARED_SECRET_SIZES + _OWN_SECRET_SIZES)
    ext = "png" if size == "_o" and rng.random() < 0.5 else "jpg"
    tail = f"{rng.randint(1000, 9999)}/{photo_id}_{secret(rng)}{size}.{ext}"
    scheme = rng.choice(("http", "https"))
    return rng.choice(
        (
            f"{scheme}://farm{rng.randint(1, 9)}.staticflickr.com/{tail}",
            f"{scheme}://farm{rng.randint(1, 9)}.static.flickr.com/{tail}",
            f"https://live.staticflickr.com/{tail}",
            f"{scheme}://static.flickr.com/{tail}",
        )
    )


def web_url(rng: random.Random, ext: str = "jpg") -> str:
    """An image URL on an arbitrary web host, the way CC and NLVR2 URLs look (no Flickr id in it)."""
    words = "-".join(
        rng.sample(
            (
                "shape",
                "art",
                "poster",
                "print",
                "sketch",
                "pattern",
                "design",
                "abstract",
                "geometry",
                "colour",
                "kids",
                "craft",
            ),
            2,
        )
    )
    name = f"{rng.getrandbits(64):016x}--{words}.{ext}"
    return f"{rng.choice(('http', 'https'))}://{rng.choice(_WEB_HOSTS)}/{rng.choice(_WEB_DIRS)}/{name}" + (
        rng.choice(_WEB_QUERIES)
    )


def url_variant(url: str, rng: random.Random) -> str:
    """``url`` respelled the ways URL normalization undoes: host case always (so the mirror path and the
    served bytes can differ), plus maybe http<->https, an explicit default port and a fragment."""
    parts = urlsplit(url)
    host = parts.hostname
    letters = [k for k, c in enumerate(host) if c.isalpha()]
    chars = list(host)
    for k in rng.sample(letters, max(1, len(letters) // 3)):
        chars[k] = chars[k].upper()
    scheme = parts.scheme
    if rng.random() < 0.5:
        scheme = "https" if scheme == "http" else "http"
    netloc = "".join(chars) + ({"http": ":80", "https": ":443"}[scheme] if rng.random() < 0.5 else "")
    fragment = rng.choice(("", "", "main", "gallery"))
    return urlunsplit((scheme, netloc, parts.path, parts.query, fragment))
