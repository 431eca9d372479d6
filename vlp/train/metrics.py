"""Accumulating a model's named outputs over batches (and workers) into metrics.

Objectives and task heads return ``*_loss`` values (means over the targets of their batch: masked tokens,
masked regions, pairs, examples), count sums (``<x>_correct`` / ``<x>_count``, ``<x>_score_sum`` /
``<x>_count``) and tensors or lists the metrics ignore. ``MetricSums`` adds the losses weighted by their
targets and the counts, so the metrics of a window or a whole pass are exact however it was batched and
split across workers.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from vlp import distributed

COUNT_SUFFIXES = ("_correct", "_count", "_score_sum")
TARGETS = "targets"


def metrics_from_sums(sums: Mapping[str, float]) -> dict[str, float]:
    """Metrics from counts summed over batches (and workers): ``<x>_correct / <x>_count`` -> ``<x>_acc``,
    ``vqa_score_sum / vqa_count`` -> ``vqa_score``; a zero count gives no metric."""
    out = {}
    for key, value in sums.items():
        for suffix, metric in (("_correct", "_acc"), ("_score_sum", "_score")):
            if key.endswith(suffix):
                prefix = key[: -len(suffix)]
                count = float(sums.get(f"{prefix}_count", 0))
                if count > 0:
                    out[prefix + metric] = float(value) / count
    return out


class MetricSums:
    """Sums of losses (weighted by targets), counts and throughput counters.

    ``add(out, targets)`` takes one batch's outputs; ``count(examples=, units=, padded=, seconds=, steps=)``
    adds throughput counters. ``metrics()`` gives each loss's mean over the targets, accuracies and scores
    from the counts, and the rates of whichever counters were added (``examples_per_s``, ``units_per_s``,
    ``steps_per_s`` per second of ``seconds``; ``padding``: the share of padded units).
    """

    def __init__(self, sums: Mapping[str, float] | None = None):
        self.sums: defaultdict[str, float] = defaultdict(float, sums or {})

    def add(self, out: Mapping[str, Any], targets: float, *, new_targets: bool = True) -> None:
        """``new_targets=False``: more outputs of targets already added (an adversary's step on a batch)."""
        if new_targets:
            self.sums[TARGETS] += targets
        for key, value in out.items():
            if key.endswith("_loss"):
                self.sums[key] += float(value.detach()) * targets
            elif key.endswith(COUNT_SUFFIXES):
                self.sums[key] += float(value)

    def count(self, **counters: float) -> None:
        for key, value in counters.items():
            self.sums[key] += value

    def merge(self, other: MetricSums) -> None:
        for key, value in other.sums.items():
            self.sums[key] += value

    def losses(self) -> dict[str, float]:
        """The weighted loss sums (what a non-finite check looks at)."""
        return {k: v for k, v in self.sums.items() if k.endswith("_loss")}

    def reduced(self) -> MetricSums:
        """The sums over all workers; workers may hold different keys (one without batches holds none)."""
        total = MetricSums()
        for part in distributed.all_gather_object(dict(self.sums)):
            total.merge(MetricSums(part))
        return total

    def rates(self) -> dict[str, float]:
        s, out = self.sums, {}
        if "seconds" in s:
            wall = max(s["seconds"], 1e-9)
            out |= {f"{name}_per_s": s[name] / wall for name in ("examples", "units", "steps") if name in s}
        if "padded" in s:
            out["padding"] = 1.0 - s.get("units", 0.0) / max(s["padded"], 1.0)
        return out

    def metrics(self) -> dict[str, float]:
        targets = max(self.sums[TARGETS], 1.0) if TARGETS in self.sums else 1.0
        losses = {k: v / targets for k, v in self.losses().items()}
        return losses | metrics_from_sums(self.sums) | self.rates()
