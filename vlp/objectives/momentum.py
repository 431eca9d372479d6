"""The momentum teacher and the feature queues of ALBEF / CODIS-style alignment.

* ``MomentumTeacher``: EMA copies of student modules (``teacher = α·teacher + (1 − α)·student``, CODIS Eq. 6,
  α = 0.995), updated in place with one ``torch._foreach_lerp_`` over the parameters and the floating-point
  buffers (other buffers, such as counters, are copied). It holds no gradient; as a submodule of the
  pretraining model it is saved in every checkpoint and restored on resume.
* ``FeatureQueue``: a ring buffer of the teacher's features of recent batches (one row per example, both
  modalities side by side, with the example's image id), as registered buffers. ``enqueue`` all-gathers the
  rows of every Ray Train worker (rank order) before writing, so every worker holds the same queue, the queue
  of one process that saw the global batch; in one process the gather is a no-op.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from vlp import distributed


def key_ids(img_keys: Sequence[str]) -> Tensor:
    """A stable int64 id per image key (BLAKE2b, the same in every process): which queued rows show the same
    image as a batch row, without strings in the queue."""
    return torch.tensor([int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little",
                                        signed=True) for key in img_keys], dtype=torch.long)


def _paired(teacher: nn.Module, student: nn.Module, kind: str) -> list[tuple[Tensor, Tensor]]:
    ours = dict(getattr(teacher, f"named_{kind}")())
    theirs = dict(getattr(student, f"named_{kind}")())
    if ours.keys() != theirs.keys():
        raise ValueError(f"momentum teacher and student differ in their {kind}: "
                         f"{sorted(ours.keys() ^ theirs.keys())[:3]}")
    return [(ours[name], theirs[name]) for name in ours]


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher ← momentum·teacher + (1 − momentum)·student`` in place, parameters and floating buffers
    (``lerp`` towards the student by 1 − momentum); integer and bool buffers are copied."""
    floats: list[tuple[Tensor, Tensor]] = []
    for t, s in _paired(teacher, student, "parameters") + _paired(teacher, student, "buffers"):
        if t.is_floating_point():
            floats.append((t, s))
        else:
            t.copy_(s)
    if floats:
        teachers = [t for t, _ in floats]
        torch._foreach_lerp_(teachers, [s.detach().to(t.dtype) for t, s in floats], 1.0 - momentum)


class MomentumTeacher(nn.Module):
    """EMA copies of named student modules (``teacher["encoder"]``); ``update(students)`` after each optimizer
    step. A copy starts equal to its student."""

    def __init__(self, students: Mapping[str, nn.Module], momentum: float):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"teacher momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.copies = nn.ModuleDict({name: copy.deepcopy(module) for name, module in students.items()})
        self.copies.requires_grad_(False)

    def __getitem__(self, name: str) -> nn.Module:
        return self.copies[name]

    @torch.no_grad()
    def update(self, students: Mapping[str, nn.Module]) -> None:
        if students.keys() != self.copies.keys():
            raise ValueError(f"momentum teacher holds {sorted(self.copies)}, got students {sorted(students)}")
        for name, student in students.items():
            ema_update_(self.copies[name], student, self.momentum)


class FeatureQueue(nn.Module):
    """Ring buffer of ``size`` rows: one [size, dim] buffer per feature name, the rows' image ids, the next
    write position and how many rows are filled (rows [0, count) until the first wrap-around, then all)."""

    def __init__(self, size: int, dim: int, names: Sequence[str] = ("text", "image")):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"a feature queue needs size >= 1 and dim >= 1, got {size}, {dim}")
        self.size, self.names = size, tuple(names)
        for name in self.names:
            self.register_buffer(name, torch.zeros(size, dim))
        self.register_buffer("ids", torch.zeros(size, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def features(self, name: str) -> Tensor:
        return getattr(self, name)

    def valid(self) -> Tensor:
        """Bool[size]: the filled rows (no host sync)."""
        return torch.arange(self.size, device=self.ids.device) < self.count

    @torch.no_grad()
    def enqueue(self, ids: Tensor, **features: Tensor) -> None:
        """Write this step's rows of every worker (all-gathered in rank order), oldest rows first out."""
        if sorted(features) != sorted(self.names):
            raise ValueError(f"feature queue holds {list(self.names)}, got {sorted(features)}")
        stacked = torch.cat([features[name].detach().float() for name in self.names], dim=1)
        self.push(distributed.all_gather_tensor(ids), distributed.all_gather_tensor(stacked))

    @torch.no_grad()
    def push(self, ids: Tensor, stacked: Tensor) -> None:
        """Write rows (already gathered) at the write position, wrapping around; of more rows than the queue
        holds only the last ``size`` stay."""
        rows = ids.shape[0]
        keep = min(rows, self.size)
        skip = rows - keep
        index = (self.ptr + skip + torch.arange(keep, device=self.ids.device)) % self.size
        self.ids.index_copy_(0, index, ids[skip:].to(self.ids.device))
        parts = stacked[skip:].to(self.ids.device).split([self.features(n).shape[1] for n in self.names], 1)
        for name, part in zip(self.names, parts, strict=True):
            self.features(name).index_copy_(0, index, part.to(self.features(name).dtype))
        self.ptr.copy_((self.ptr + rows) % self.size)
        self.count.copy_(torch.clamp(self.count + rows, max=self.size))
