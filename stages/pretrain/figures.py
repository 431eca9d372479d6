"""The pretraining stage's figure: word -> region alignment maps of held-out annotated sentences (the
object-word alignment paper's Fig. 4): per sentence, the target A*, the alignment decoder's top-k distribution
A and the last layer's text-to-region attention, rows the annotated word pieces, columns the image's
regions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

PANELS = (("target", "target A*"), ("predicted", "predicted A (top-k)"),
          ("attention", "last-layer attention"))


def alignment_figure(items: list[dict[str, Any]], path: Path, title: str) -> Path:
    """``items``: ``{"tokens", "image", "target", "predicted", "attention"}`` ([rows, regions] each)."""
    size = (3.4 * len(PANELS), 0.35 * 12 + 1.2 * len(items))
    fig, axes = plt.subplots(len(items), len(PANELS), figsize=size, squeeze=False)
    for row, item in zip(axes, items, strict=True):
        for ax, (key, label) in zip(row, PANELS, strict=True):
            values = item[key].numpy()
            top = max(float(values.max()), 1e-6)
            image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0.0, vmax=top)
            ax.set_yticks(range(len(item["tokens"])), item["tokens"], fontsize=6)
            ax.set_xticks(range(values.shape[1]))
            ax.tick_params(axis="x", labelsize=6)
            ax.set_title(f"{label}\n{item['image']}", fontsize=7)
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
