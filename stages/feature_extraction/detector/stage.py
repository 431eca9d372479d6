"""Detector stage: train the torchvision detector on Visual Genome objects + attributes (cached).

Runs only when ``features.detector.weights`` is unset: the features stage then loads the weights
this stage writes; its seeds derive from the root ``seed``. Reads dedup's output (input ``dedup``), holds
out ``train.val_fraction`` of the VG images and writes into ``ctx.out_dir``:

    detector.pt     the weight file (config architecture + vocabularies inside), see torchvision_backend
    classes.json    {"classes": [...], "attributes": [...], "train_images": n, "heldout_keys": [...]}
    metrics.json    held-out detect-mode recall@IoU0.5, class and attribute accuracy, training time

Per-epoch losses are logged to the stage's MLflow run as they happen.
"""

from __future__ import annotations

import json
import time

import torch

from stages.base import StageContext, StageError, StageResult
from stages.feature_extraction.detector.data import build_vocabulary, load_vg, split_images
from stages.feature_extraction.detector.torchvision_backend import TorchvisionBackend, save_checkpoint
from stages.feature_extraction.detector.train import evaluate, fit
from stages.outputs.detector import DetectorOutput
from vlp.train.seeds import seed_of


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg.features.detector
    if cfg.backend != "torchvision":
        raise StageError(
            f"features.detector.backend={cfg.backend} needs features.detector.weights: only the torchvision "
            "detector can be trained here"
        )
    torch.set_num_threads(cfg.train.threads)
    out = DetectorOutput(ctx.out_dir)
    images, skipped = load_vg(ctx.inputs["dedup"])
    train, heldout = split_images(images, cfg.train, seed_of(ctx.cfg.seed, "detector", "heldout"))
    vocab = build_vocabulary(train, cfg.train)
    if not vocab.classes:
        raise StageError(f"{ctx.inputs['dedup']}: the Visual Genome training images have no named objects")
    ctx.log.info(
        "detector: %d training / %d held-out VG images, %d classes, %d attributes",
        len(train),
        len(heldout),
        len(vocab.classes),
        len(vocab.attributes),
    )

    started = time.perf_counter()
    model = fit(cfg, train, vocab, ctx.cfg.seed, lambda epoch, losses: ctx.log_metrics(losses, step=epoch))
    train_seconds = time.perf_counter() - started
    save_checkpoint(out.weights, cfg, model, vocab.classes, vocab.attributes)

    # measured through the weight file, exactly as the features stage will load it
    backend = TorchvisionBackend.from_checkpoint(cfg, out.weights)
    quality = evaluate(backend, heldout, batch_size=cfg.train.batch_size)
    metrics = {
        **{f"heldout_{name}": value for name, value in quality.items()},
        "train_seconds": train_seconds,
        "train_images": float(len(train)),
        "heldout_images": float(len(heldout)),
        "num_classes": float(len(vocab.classes)),
        "num_attributes": float(len(vocab.attributes)),
        **{f"skipped_{reason}": float(n) for reason, n in skipped.items()},
    }
    out.classes_path.write_text(
        json.dumps(
            {
                "classes": vocab.classes,
                "attributes": vocab.attributes,
                "train_images": len(train),
                "heldout_keys": sorted(img.key for img in heldout),
            },
            indent=1,
        )
    )
    out.metrics_path.write_text(json.dumps(metrics, indent=1, sort_keys=True))
    return StageResult(
        metrics=metrics,
        params={"classes": len(vocab.classes), "attributes": len(vocab.attributes)},
        artifacts=[out.classes_path.name, out.metrics_path.name],
    )
