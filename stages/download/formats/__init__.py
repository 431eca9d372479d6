"""One parser per published metadata format, keyed by dataset name (the keys of ``download.datasets``).

``parse_dataset(name, files, source)`` turns a dataset's downloaded metadata files (role -> local
path, roles as in ``configs/demo.yaml``) into the images to fetch and the table rows of
``vlp.data.tables``; bad input raises ``FormatError`` with a one-line message.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from stages.download.config import DatasetSource
from stages.download.formats.base import FormatError, ImageRef, Parsed, dataset_label
from stages.download.formats.coco import parse_coco
from stages.download.formats.conceptual_captions import parse_cc
from stages.download.formats.flickr30k import parse_flickr30k
from stages.download.formats.gqa import parse_gqa
from stages.download.formats.nlvr2 import parse_nlvr2
from stages.download.formats.refcoco import parse_refcoco
from stages.download.formats.sbu import parse_sbu
from stages.download.formats.snli_ve import parse_snli_ve
from stages.download.formats.visual_genome import parse_vg
from stages.download.formats.vqa import parse_vqa

__all__ = ["PARSERS", "FormatError", "ImageRef", "Parsed", "parse_dataset"]

PARSERS: dict[str, Callable[[dict[str, Path], DatasetSource], Parsed]] = {
    "coco": parse_coco,
    "vg": parse_vg,
    "cc": parse_cc,
    "sbu": parse_sbu,
    "flickr30k": parse_flickr30k,
    "nlvr2": parse_nlvr2,
    "vqa": parse_vqa,
    "snli_ve": parse_snli_ve,
    "refcoco": parse_refcoco,
    "gqa": parse_gqa,
}


def parse_dataset(name: str, files: dict[str, Path], source: DatasetSource) -> Parsed:
    if name not in PARSERS:
        raise FormatError(dataset_label(name), f"no parser for this dataset (known: {', '.join(PARSERS)})")
    return PARSERS[name]({role: Path(path) for role, path in files.items()}, source)
