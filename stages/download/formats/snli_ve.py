"""SNLI-VE ``snli_ve_<split>.jsonl``: SNLI records plus the Flickr30k image id of the premise.

The image-id key is spelled ``Flikr30kID`` (with or without ``.jpg``) by the parser's generator and
``Flickr30K_ID`` (no ``.jpg``) by the current one; all three forms are read.

SNLI marks a pair whose five annotators reached no majority with ``gold_label`` ``-``. The SNLI-VE
generator removes them, but SNLI's own files and copies built from them keep them: such a pair has no
label to train or score against, so it is left out and counted (``Parsed.dropped``, reason
``gold_label_no_consensus``; download metric ``records.snli_ve.dropped.gold_label_no_consensus``).
"""

from __future__ import annotations

from pathlib import Path

from stages.download.config import DatasetSource
from stages.download.formats.base import Parsed, check_roles, read_json_lines

LABELS = ("entailment", "neutral", "contradiction")
NO_CONSENSUS = "-"  # SNLI's gold_label when the annotators had no majority
DROPPED_NO_CONSENSUS = "gold_label_no_consensus"  # the reason key (an MLflow metric name part)


def parse_snli_ve(files: dict[str, Path], source: DatasetSource) -> Parsed:
    check_roles("snli_ve", files, ["train", "dev", "test"])
    rows = []
    dropped = 0
    for split, path in files.items():
        for rec in read_json_lines(path):
            pair_id = rec.get_str("pairID")
            rec.label = f"pair {pair_id}"
            name = rec.pick(("Flikr30kID", "Flickr30K_ID"))
            image = rec.get_str(name)
            photo_id = image.removesuffix(".jpg")
            if not photo_id.isdigit():
                raise rec.error(name, f"expected a Flickr photo id ('<id>' or '<id>.jpg'), got {image!r}")
            if rec.data.get("gold_label") == NO_CONSENSUS:
                dropped += 1
                continue
            label = rec.get_choice("gold_label", LABELS)
            rows.append(
                {
                    "pair_id": pair_id,
                    "image_key": f"flickr30k:{photo_id}",
                    "split": split,
                    "hypothesis": rec.get_str("sentence2"),
                    "label": label,
                    "premise": rec.get_str("sentence1"),
                }
            )
    return Parsed(tasks={"snli_ve": rows}, dropped={DROPPED_NO_CONSENSUS: dropped} if dropped else {})
