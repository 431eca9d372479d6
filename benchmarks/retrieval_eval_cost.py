"""Retrieval evaluation cost: shortlist + rerank vs full cross-encoder scoring, 1K images x 5K captions.

What it runs, all through the library's real code paths (vlp/tasks/retrieval.py, vlp/eval/retrieval.py):

1. A synthetic set in the real stores (ImgDbWriter / TxtDbWriter): 24 "concepts", each a word piece and
   a 512-d region prototype (the demo detector's feature size). An image shows 4 concepts over 10-36
   regions (noisy prototypes plus clutter, random boxes) in skewed proportions, so a concept may be a
   single region among many; each of its 5 captions names the four among filler words, 10-18 word pieces
   in all. 103 of the 1,000 test images share their four concepts with another (24 choose 4 = 10,626
   sets), which caps R@1 near 95%. Training images are disjoint from the test images.
2. A small UNITER (hidden 64, 2 layers) trained with the finetuning loop (stages/finetune/loop.py) on the
   retrieval hinge (the 4 hardest of 16 sampled negatives per side) plus a contrastive loss on the
   unimodal mean outputs: the shortlist ranks by their cosine, and UNITER's objectives never align them
   (align-before-fuse models such as CODIS pretrain exactly this).
3. In a fresh subprocess per size (so its RSS high-water mark is the evaluation's own): the unimodal
   similarity ranked on its own, shortlist + rerank for each ``--k`` (cross-encoder on each text's top-k
   images and each image's top-k texts), then full scoring of every pair, all chunked as the eval stage
   does; wall time, cross-encoder pairs, R@1/10 both ways, Meta-Sum and the peak RSS after each. The
   large size is the 1K x 5K set, the small one its first 250 images with their 1,250 captions. The
   scorer hands free heap pages back every ``--release-every`` blocks (see PairScorer): with 0, glibc's
   heap fragmentation makes RSS climb with the number of blocks scored.

Usage: ``python benchmarks/retrieval_eval_cost.py [--quick] [--threads 1] [--k 16 32] [--release-every N]
[--workdir DIR]`` (--quick: 100 images x 500 captions vs 25 x 125, short training; a few minutes). A
--workdir keeps the set, the model and results_release<N>.json; one that already holds a model of the
same size is reused (the set and training are skipped).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stages.eval.config import RetrievalEvalConfig  # noqa: E402
from stages.finetune.config import TrainConfig  # noqa: E402
from stages.finetune.loop import fit  # noqa: E402
from vlp.data.img_db import ImgDb, ImgDbWriter  # noqa: E402
from vlp.data.txt_db import TxtDb, TxtDbWriter  # noqa: E402
from vlp.eval.retrieval import recall_at_k, score_all_pairs, shortlist_rerank  # noqa: E402
from vlp.model import UniterConfig, UniterModel  # noqa: E402
from vlp.tasks.retrieval import (  # noqa: E402
    PairScorer,
    Retrieval,
    RetrievalDataset,
    image_only,
    mean_output,
    text_only,
    unimodal_similarity,
)
from vlp.train.precision import mixed_precision  # noqa: E402

# The eval stage's chunk sizes, shortlist size and heap release, so the benchmark scores as it does.
STAGE = RetrievalEvalConfig()
SPECIAL = {"PAD": 0, "UNK": 1, "CLS": 2, "SEP": 3, "MASK": 4}
CONCEPTS, FILLERS, DIM = 24, 40, 512
NBB = (0.2, 100, 10)
CAPTIONS_PER_IMAGE = 5
CONCEPTS_PER_IMAGE = 4
# Per positive and side: sampled negative candidates, and the hardest of them in the hinge (ranked better at
# 1,000 images than all of 8 for the same steps).
NEGATIVES, HARD = 16, 4
# Weight of the unimodal contrastive loss and training steps. With 0.05 and 400 steps shortlist and full
# scoring picked the same top image for 97.9% of the 5,000 captions and IR R@1 differed by 1.7 points;
# on one caption per test image, 0.05 / 800 steps gave 99.1% and 0.3 / 800 steps 99.5% (both signals
# better trained, so the cross-encoder's top picks are images the cosine ranks high too).
ITC_WEIGHT = 0.3
STEPS = 800  # about 5 minutes on one thread


def build_set(root: Path, n_train: int, n_test: int, n_small: int, seed: int = 0) -> None:
    """img_db/ and the text dbs train / val / test / test_small (the first n_small test images)."""
    rng = np.random.default_rng(seed)
    prototypes = rng.normal(size=(CONCEPTS, DIM)).astype(np.float32)
    np.save(root / "prototypes.npy", prototypes)
    vocab = len(SPECIAL) + CONCEPTS + FILLERS
    meta = {**SPECIAL, "v_range": [len(SPECIAL), vocab], "vocab_size": vocab}
    n_val = 50  # validation during training only: small, so that it stays cheap
    splits = {"train": range(n_train), "val": range(n_train, n_train + n_val),
              "test": range(n_train + n_val, n_train + n_val + n_test)}
    captions: dict[str, list[list[int]]] = {}
    with ImgDbWriter(root / "img_db", nbb_configs=[NBB]) as writer:
        for i in range(n_train + n_val + n_test):
            key = f"synth:{i}"
            concepts = rng.choice(CONCEPTS, CONCEPTS_PER_IMAGE, replace=False)
            n = int(rng.integers(10, 37))
            # Every concept gets a region; the rest go to the concepts in skewed shares.
            share = rng.dirichlet(np.full(len(concepts), 0.5))
            owner = np.concatenate([concepts, rng.choice(concepts, n - len(concepts), p=share)])
            feats = rng.normal(size=(n, DIM)).astype(np.float32)  # clutter
            real = rng.random(n) < 0.6
            real[: len(concepts)] = True
            feats[real] = prototypes[owner[real]] + 0.5 * rng.normal(size=(int(real.sum()), DIM))
            xy = rng.uniform(0, 0.6, (n, 2))
            wh = rng.uniform(0.05, 0.4, (n, 2))
            writer.put(key, features=feats, norm_bb=np.concatenate([xy, xy + wh, wh], 1),
                       conf=np.sort(rng.uniform(0.25, 1.0, n))[::-1], soft_labels=np.full((n, 2), 0.5))
            captions[key] = []
            for _ in range(CAPTIONS_PER_IMAGE):
                named = rng.permutation(concepts) + len(SPECIAL)
                length = int(rng.integers(10, 19))
                fill = rng.integers(len(SPECIAL) + CONCEPTS, vocab, length - len(named))
                slots = np.sort(rng.choice(length, len(named), replace=False))
                ids = np.insert(fill, slots - np.arange(len(named)), named)
                captions[key].append([int(t) for t in ids])
    dbs = {**splits, "test_small": range(n_train + n_val, n_train + n_val + n_small)}
    for name, images in dbs.items():
        with TxtDbWriter(root / f"{name}.db", meta) as writer:
            for i in images:
                for v, ids in enumerate(captions[f"synth:{i}"]):
                    writer.add(f"synth:{i}:{v}", {"input_ids": ids, "img_fname": f"synth:{i}"})


class WithUnimodalAlignment(nn.Module):
    """The retrieval head's losses plus InfoNCE between the texts' and the images' unimodal embeddings."""

    def __init__(self, head: Retrieval, weight: float, temperature: float = 0.07):
        super().__init__()
        self.head, self.weight, self.temperature = head, weight, temperature
        self.metric = head.metric

    def loss_weights(self, step: int, total: int) -> dict[str, float]:
        return self.head.loss_weights(step, total) | {"itc_loss": self.weight}

    def forward(self, model: UniterModel, batch: dict) -> dict:
        out = self.head(model, batch)
        texts = mean_output(model, text_only(model, batch))
        images = mean_output(model, image_only(batch))
        logits = texts @ images.T / self.temperature
        same = torch.tensor([[a == b for b in batch["img_keys"]] for a in batch["img_keys"]])
        targets = same.float() / same.sum(1, keepdim=True)
        out["itc_loss"] = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets.T)) / 2
        return out


def model_config() -> UniterConfig:
    # BERT's 0.02 initial weights leave a small random model's [CLS] output almost independent of the pair
    # (it is mostly its own embedding), and a few hundred steps do not get it out of there; 0.1 does.
    # Hidden 64 / 4 heads: at 32 / 2 the cross-encoder reached only 13-30% IR R@1 at 1,000 images within
    # the training budget.
    return UniterConfig(vocab_size=len(SPECIAL) + CONCEPTS + FILLERS, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=128, img_dim=DIM, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, initializer_range=0.1)


def align_concept_words(model: UniterModel, prototypes: np.ndarray) -> None:
    """Give each concept word the embedding the image embedder's projection gives its region prototype, so
    a word and its regions look alike to attention from the start: the brief training then only has to
    learn to read the match (the constructed stand-in for a pretrained model's grounding)."""
    with torch.no_grad():
        projected = model.img_embeddings.img_linear(torch.from_numpy(prototypes))
        model.embeddings.word_embeddings.weight[len(SPECIAL) : len(SPECIAL) + CONCEPTS] = projected


def train(root: Path, steps: int, precision: str) -> dict:
    img_db = ImgDb(root / "img_db", *NBB)
    data = RetrievalDataset([TxtDb(root / "train.db")], img_db, neg_samples=NEGATIVES)
    val = RetrievalDataset([TxtDb(root / "val.db")], img_db)
    torch.manual_seed(0)
    model = UniterModel(model_config())
    align_concept_words(model, np.load(root / "prototypes.npy"))
    head = WithUnimodalAlignment(Retrieval(model.config, hard_negatives=HARD), weight=ITC_WEIGHT)
    device = torch.device("cpu")
    autocast = mixed_precision(precision, device, loss_scaling=False)
    scorer = PairScorer(model, head.head, img_db, val.index.img_keys, [val.text(j) for j in range(len(val))],
                        pad_id=0, autocast=autocast)
    n_img, n_txt = len(val.index.img_keys), len(val)

    def validate() -> dict[str, float]:
        full = recall_at_k(score_all_pairs(scorer, n_img, n_txt, 16, 128), val.index.txt2img)
        sim = recall_at_k(unimodal_similarity(scorer), val.index.txt2img)
        return {"ir_r1": full["ir_r1"], "tr_r1": full["tr_r1"], "similarity_ir_r1": sim["ir_r1"]}

    def log(metrics: dict[str, float], step: int) -> None:
        if any(k.startswith("val/") for k in metrics):
            print(f"  step {step}: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()), flush=True)

    cfg = TrainConfig(epochs=1000, max_steps=steps, lr=3e-3, head_lr_mult=1.0, warmup=0.05, batch_units=1200,
                      val_every=max(steps // 3, 1), train_split="train", val_split="val")
    result = fit(model, head, data, cfg, seed=0, log_every=10**9, device=device, autocast=autocast,
                 validate=validate, log=log, setting="benchmark")
    model.save_pretrained(root / "model")
    torch.save(head.head.state_dict(), root / "model" / "rank_head.pt")
    img_db.close()
    return {"steps": result.steps, "seconds": result.seconds, "val": result.final_val}


def peak_rss_mb() -> float:
    """This process's RSS high-water mark (VmHWM: getrusage's ru_maxrss would include the parent's, which
    Linux carries across fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def evaluate(root: Path, db: str, ks: list[int], precision: str, release_every: int) -> dict:
    """All scoring modes on one text db; runs in its own process so the RSS high-water is its own."""
    img_db = ImgDb(root / "img_db", *NBB)
    data = RetrievalDataset([TxtDb(root / f"{db}.db")], img_db)
    model = UniterModel.from_pretrained(root / "model")
    head = Retrieval(model.config)
    head.load_state_dict(torch.load(root / "model" / "rank_head.pt", weights_only=True))
    texts = [data.text(j) for j in range(len(data))]
    scorer = PairScorer(model, head, img_db, data.index.img_keys, texts, pad_id=0,
                        # A quarter of the 1K images: the image cache, not the set, bounds memory.
                        autocast=mixed_precision(precision, torch.device("cpu"), loss_scaling=False),
                        cache_images=256, release_every=release_every)
    n_img, n_txt, txt2img = len(data.index.img_keys), len(data), data.index.txt2img
    out = {"images": n_img, "captions": n_txt, "rss_setup_mb": peak_rss_mb()}
    start = time.perf_counter()
    sim = unimodal_similarity(scorer, chunk=STAGE.unimodal_chunk)
    sim_seconds = time.perf_counter() - start
    # The shortlist signal ranked on its own: what the cross-encoder has to improve on.
    out["similarity"] = {"seconds": sim_seconds, "pairs": 0, **recall_at_k(sim, txt2img),
                         "rss_peak_mb": peak_rss_mb()}
    tops = {}
    for k in ks:
        scorer.pairs_scored = 0
        start = time.perf_counter()
        shortlist = shortlist_rerank(sim, scorer, k, chunk=STAGE.rerank_chunk)
        # Texts whose image made the shortlist at all: the shortlist can only lose the others.
        shortlisted = torch.isfinite(shortlist[txt2img, torch.arange(n_txt)]).double().mean().item()
        out[f"shortlist k={k}"] = {"seconds": sim_seconds + time.perf_counter() - start,
                                   "pairs": scorer.pairs_scored, **recall_at_k(shortlist, txt2img),
                                   "rss_peak_mb": peak_rss_mb(), "match_shortlisted": shortlisted}
        # Each text's best image and each image's best text, to compare with full scoring's.
        tops[k] = (shortlist.argmax(0), shortlist.argmax(1))
    del sim, shortlist
    scorer.pairs_scored = 0
    start = time.perf_counter()
    full = score_all_pairs(scorer, n_img, n_txt, *STAGE.chunk)
    out["full"] = {"seconds": time.perf_counter() - start, "pairs": scorer.pairs_scored,
                   **recall_at_k(full, txt2img), "rss_peak_mb": peak_rss_mb()}
    for k, (best_image, best_text) in tops.items():
        out[f"shortlist k={k}"]["same_top1"] = {"ir": (best_image == full.argmax(0)).double().mean().item(),
                                                "tr": (best_text == full.argmax(1)).double().mean().item()}
    return out


def run_child(root: Path, db: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--evaluate", db, "--workdir", str(root), "--k", *map(str, args.k),
           "--threads", str(args.threads), "--precision", args.precision, "--release-every",
           str(args.release_every)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(large: dict, small: dict, ks: list[int], release_every: int) -> None:
    modes = ["full", *(f"shortlist k={k}" for k in ks), "similarity"]
    header = ("set", "mode", "pairs", "seconds", "IR R@1", "TR R@1", "IR R@10", "Meta-Sum", "peak RSS")
    widths = (10, 14, 9, 8, 7, 7, 7, 8, 9)
    print("\n" + " ".join(f"{h:>{w}}" for h, w in zip(header, widths, strict=True)))
    for result in (large, small):
        label = f"{result['images']}x{result['captions']}"
        for mode in modes:
            r = result[mode]
            cells = (label, mode, str(r["pairs"]), f"{r['seconds']:.1f}", f"{100 * r['ir_r1']:.2f}",
                     f"{100 * r['tr_r1']:.2f}", f"{100 * r['ir_r10']:.2f}", f"{100 * r['meta_sum']:.1f}",
                     f"{r['rss_peak_mb']:.0f}MB")
            print(" ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)))
    full, size = large["full"], f"{large['images']}x{large['captions']}"
    print()
    for k in ks:
        short = large[f"shortlist k={k}"]
        speedup, fewer = full["seconds"] / short["seconds"], full["pairs"] / short["pairs"]
        ir, tr = (100 * (short[f"{side}_r1"] - full[f"{side}_r1"]) for side in ("ir", "tr"))
        print(f"{size}: shortlist+rerank (k={k}) is {speedup:.1f}x faster than full scoring "
              f"({fewer:.1f}x fewer cross-encoder pairs); R@1 difference (shortlist - full): "
              f"IR {ir:+.2f} points, TR {tr:+.2f} points; {100 * short['match_shortlisted']:.1f}% of the "
              f"texts have their image shortlisted; same top-1 as full scoring for "
              f"{100 * short['same_top1']['ir']:.1f}% of the texts, {100 * short['same_top1']['tr']:.1f}% of "
              "the images")
    trim = f"malloc_trim every {release_every} blocks" if release_every else "no malloc_trim"
    print(f"peak RSS of evaluation (process high-water, all modes, {trim}): {full['rss_peak_mb']:.0f} MB "
          f"at {size} vs {small['full']['rss_peak_mb']:.0f} MB at {small['images']}x{small['captions']} "
          f"(after loading model and data: {large['rss_setup_mb']:.0f} vs {small['rss_setup_mb']:.0f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 x 500 vs 25 x 125, short training")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: robust when shared)")
    parser.add_argument("--k", type=int, nargs="+", default=[STAGE.shortlist_k],
                        help="shortlist sizes per text and per image (default: the eval stage's)")
    # fp32 as the eval stage: under bf16 autocast oneDNN caches a primitive per new block shape, so RSS
    # climbs with the number of blocks (hundreds of MB over a few hundred calls), and bf16 scores tie.
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="fp32")
    parser.add_argument("--release-every", type=int, default=STAGE.release_every,
                        help="blocks between malloc_trim (0: never)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the set and model here")
    parser.add_argument("--evaluate", metavar="DB", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.evaluate:
        print(json.dumps(evaluate(args.workdir, args.evaluate, args.k, args.precision, args.release_every)))
        return
    n_train, n_test, n_small, steps = (500, 100, 25, 150) if args.quick else (2000, 1000, 250, STEPS)
    with tempfile.TemporaryDirectory(prefix="retrieval-bench-") as tmp:
        root = args.workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        trained = None
        if (root / "model" / "rank_head.pt").is_file():
            print(f"reusing the set and model in {root}", flush=True)
        else:
            start = time.perf_counter()
            build_set(root, n_train, n_test, n_small)
            print(f"set: {n_train} training, {n_test} test images x {CAPTIONS_PER_IMAGE} captions "
                  f"({time.perf_counter() - start:.1f}s); training {steps} steps", flush=True)
            trained = train(root, steps, args.precision)
            print(f"trained in {trained['seconds']:.1f}s: {trained['val']}", flush=True)
        large, small = run_child(root, "test", args), run_child(root, "test_small", args)
        report(large, small, args.k, args.release_every)
        if args.workdir:
            out = root / f"results_release{args.release_every}.json"
            settings = {key: str(value) for key, value in vars(args).items()}
            out.write_text(json.dumps({"args": settings, "training": trained, "large": large, "small": small},
                                      indent=1))
            print(f"results: {out}")


if __name__ == "__main__":
    main()
