"""Batched IPOT (vlp.objectives.ipot, used by WRA) vs POT: accuracy against exact OT and time vs Sinkhorn.

Builds one WRA-shaped batch of cosine costs (default 32 examples x 20 words x 36 regions, 768-d vectors
where each word is correlated with one region, as contextualized outputs of a matched pair are) with
uniform marginals, and reports for every solver the time per batch (best of --repeats, one CPU thread by
default) and the relative error of the OT distance <plan, cost> against ``ot.emd2`` (exact, network
simplex). Solvers: our IPOT (fp32, torch, one batched call) at several iteration counts, ``ot.emd2`` and
``ot.sinkhorn2`` in a per-example loop (numpy fp64), and POT's batched ``ot.batch.solve_batch`` Sinkhorn
(torch fp32, same tensor as IPOT). A second, ragged batch (5-20 words, 10-36 regions, padded) checks IPOT
with padding masks against ``ot.emd2`` on each example's real block.

    python benchmarks/ipot_vs_pot.py [--batch 32] [--words 20] [--regions 36] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable

import numpy as np
import ot
import ot.batch
import torch

from vlp.objectives.ipot import cosine_cost, ot_distance


def cosine_batch(lengths: list[tuple[int, int]], dim: int, seed: int):
    """Padded cosine costs [B, n, m] and masks; word i leans towards region i, padding holds junk."""
    gen = torch.Generator().manual_seed(seed)
    n_max = max(n for n, _ in lengths)
    m_max = max(m for _, m in lengths)
    words = torch.randn(len(lengths), n_max, dim, generator=gen)
    regions = torch.randn(len(lengths), m_max, dim, generator=gen)
    shared = min(n_max, m_max)
    regions[:, :shared] += words[:, :shared]
    x_mask = torch.arange(n_max).unsqueeze(0) < torch.tensor([n for n, _ in lengths]).unsqueeze(1)
    y_mask = torch.arange(m_max).unsqueeze(0) < torch.tensor([m for _, m in lengths]).unsqueeze(1)
    return cosine_cost(words, regions), x_mask, y_mask


def best_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def per_example(solver: Callable[[np.ndarray, np.ndarray, np.ndarray], float], costs: list[np.ndarray]):
    values = []
    for cost in costs:
        n, m = cost.shape
        values.append(float(solver(np.full(n, 1.0 / n), np.full(m, 1.0 / m), cost)))
    return np.array(values)


def report(name: str, seconds: float, values: np.ndarray, exact: np.ndarray, batch: int) -> None:
    relative = np.abs(values - exact) / exact
    print(
        f"{name:<44} {seconds * 1e3:>9.2f} {seconds * 1e3 / batch:>9.3f} "
        f"{relative.max() * 100:>8.3f} {relative.mean() * 100:>8.3f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--words", type=int, default=20)
    ap.add_argument("--regions", type=int, default=36)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per solver; the best is reported")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    lengths = [(args.words, args.regions)] * args.batch
    cost, x_mask, y_mask = cosine_batch(lengths, args.dim, args.seed)
    costs = [cost[i].double().numpy() for i in range(args.batch)]
    emd_time, exact = best_time(lambda: per_example(ot.emd2, costs), args.repeats)
    print(
        f"batch: {args.batch} examples x {args.words} words x {args.regions} regions, {args.dim}-d cosine "
        f"costs in [{cost.min():.3f}, {cost.max():.3f}], mean exact OT distance {exact.mean():.4f}; "
        f"torch threads {args.threads}"
    )
    print(f"{'solver':<44} {'ms/batch':>9} {'ms/ex':>9} {'max err%':>8} {'mean err%':>8}")
    report("POT ot.emd2 loop (exact, fp64)", emd_time, exact, exact, args.batch)
    for iterations in (10, 20, 50, 100):
        seconds, values = best_time(
            lambda it=iterations: ot_distance(cost, x_mask, y_mask, args.beta, it), args.repeats
        )
        label = f"IPOT batched beta={args.beta} iters={iterations}" + (
            " (default)" if iterations == 50 else ""
        )
        report(label, seconds, values.double().numpy(), exact, args.batch)
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # POT warns when Sinkhorn stops at max_iter; the error column shows it
        for reg in (args.beta, 0.05, 0.01):
            seconds, values = best_time(
                lambda r=reg: per_example(lambda a, b, m, r=r: ot.sinkhorn2(a, b, m, r), costs), args.repeats
            )
            report(f"POT ot.sinkhorn2 loop reg={reg} (fp64)", seconds, values, exact, args.batch)
            seconds, result = best_time(
                lambda r=reg: ot.batch.solve_batch(cost, reg=r, method="sinkhorn", grad="detach"),
                args.repeats,
            )
            report(
                f"POT ot.batch.solve_batch sinkhorn reg={reg}",
                seconds,
                result.value_linear.double().numpy(),
                exact,
                args.batch,
            )

    gen = torch.Generator().manual_seed(args.seed + 1)
    ragged = [
        (
            int(torch.randint(5, args.words + 1, (), generator=gen)),
            int(torch.randint(10, args.regions + 1, (), generator=gen)),
        )
        for _ in range(args.batch)
    ]
    cost, x_mask, y_mask = cosine_batch(ragged, args.dim, args.seed + 1)
    exact = per_example(ot.emd2, [cost[i, :n, :m].double().numpy() for i, (n, m) in enumerate(ragged)])
    seconds, values = best_time(lambda: ot_distance(cost, x_mask, y_mask, args.beta), args.repeats)
    padding = 1 - (x_mask.sum(1) * y_mask.sum(1)).sum().item() / cost[0].numel() / args.batch
    print(
        f"\nragged batch (5-{args.words} words, 10-{args.regions} regions, "
        f"{padding:.0%} of cost entries padding)"
    )
    report(
        f"IPOT batched beta={args.beta} iters=50, masked", seconds, values.double().numpy(), exact, args.batch
    )


if __name__ == "__main__":
    main()
