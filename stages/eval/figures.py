"""PNG figures of the eval stage: recall@K curves and text-to-image attention maps (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first


def recall_curves(curves: dict[str, dict[str, list[float]]], path: Path, title: str) -> Path:
    """One line per model, image retrieval (IR) and text retrieval (TR) side by side, R@K for K = 1..n."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, side, label in zip(axes, ("ir", "tr"), ("image retrieval (text -> image)",
                                                     "text retrieval (image -> text)"), strict=True):
        for name, curve in curves.items():
            ks = range(1, len(curve[side]) + 1)
            ax.plot(ks, [100 * v for v in curve[side]], marker="o", markersize=3, label=name)
        ax.set_xlabel("K")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("recall@K (%)")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def attention_maps(maps: dict[str, list[dict[str, Any]]], path: Path, title: str) -> Path:
    """A grid of heatmaps, one row per model and one column per pair: rows of a heatmap are the word
    pieces, columns the regions, values the last-layer attention (mean over heads)."""
    n_rows, n_cols = len(maps), max(len(m) for m in maps.values())
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3.2 * n_cols, 2.8 * n_rows), squeeze=False)
    for row, (name, items) in zip(axes, maps.items(), strict=True):
        for col, ax in enumerate(row):
            if col >= len(items):
                ax.axis("off")
                continue
            item = items[col]
            image = ax.imshow(item["attention"].numpy(), aspect="auto", cmap="viridis")
            ax.set_yticks(range(len(item["tokens"])), item["tokens"], fontsize=6)
            ax.set_xticks(range(item["attention"].shape[1]))
            ax.tick_params(axis="x", labelsize=6)
            ax.set_title(f"{name}\n{item['image']}", fontsize=7)
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
