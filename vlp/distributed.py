"""The few collectives training and evaluation need; every helper is a no-op in a single process.

Works with or without an initialised ``torch.distributed`` process group, so library code (validation,
retrieval scoring, logging) runs unchanged under DDP workers, in one process, and in tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _collective_device(tensor: torch.Tensor) -> torch.device:
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors only.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum over all workers (a new tensor on the input's device; the input is kept)."""
    if not is_distributed():
        return tensor.clone()
    work = tensor.detach().to(_collective_device(tensor), copy=True)
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(tensor.device)


def all_reduce_dict(values: Mapping[str, float | torch.Tensor]) -> dict[str, float]:
    """Sums of scalar values over all workers, in one collective; every worker must pass the same keys."""
    keys = sorted(values)
    vector = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    summed = all_reduce_sum(vector).tolist()
    return dict(zip(keys, summed, strict=True))


def all_gather_object(obj: Any) -> list[Any]:
    """Every worker's ``obj``, in rank order (``[obj]`` in one process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of worker ``src`` on every worker."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Every worker's ``tensor`` concatenated along dim 0 in rank order (the input itself in one process).

    Workers may hold different numbers of rows (batches are built by input units); the other dims and the
    dtype must agree. The result is detached, on the input's device: gathered rows carry no gradient.
    """
    if not is_distributed():
        return tensor.detach()
    device = _collective_device(tensor)
    rows = torch.tensor([tensor.shape[0]], dtype=torch.long, device=device)
    counts = [torch.zeros_like(rows) for _ in range(world_size())]
    dist.all_gather(counts, rows)
    sizes = [int(c) for c in counts]
    padded = tensor.detach().new_zeros((max(sizes), *tensor.shape[1:]), device=device)
    padded[: tensor.shape[0]] = tensor.detach().to(device)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)]).to(tensor.device)
