"""Pretraining step throughput of our model vs UNITER's original model code, on identical batches.

Compared: ``vlp.train.pretrain_model.build_model`` (UniterModel + our MLM, MRFR, MRC, MRC-kl and ITM
objectives) against ``UniterForPretraining`` (model/pretrain.py) of a checkout of
github.com/ChenRocks/UNITER that the user provides (``UNITER_SRC`` or ``--uniter-src``; never part of this
repo). Both are built at the same size and UNITER's modules get a copy of our weights through an explicit
name map (every UNITER parameter mapped, heads included; our MRC and MRC-kl heads are set equal because
UNITER shares one region classifier). Before timing, each task's loss, gradients and the encoder outputs of
the two are compared in fp32 with dropout off; a large difference stops the run.

Batches: examples (token ids with [CLS]/[SEP], 2048-d region features, 7-d boxes, 1601-class soft labels)
are drawn once, collated by our ``vlp.data.collate.collate`` and masked / paired by our objectives'
``prepare``; the same examples with the same masks and ITM pairs are then laid out as UNITER's collate
functions do (data/mlm.py, data/mrm.py, data/itm.py: text and regions concatenated per example by
``gather_index``, labels padded with -1, masked features zeroed, ``feat_targets`` / ``label_targets``, OT
scatter and pads). Regimes: "padded" (captions of 8-30 tokens, 10-100 regions, drawn per example) and
"full" (every example 22 tokens + 36 regions). Losses are reduced as UNITER's pretrain.py does (mean; ITM
+ 0.1 x OT, OT masking only padding, so our ITM runs with ``wra_cls_sep``; MRC-kl averaged over elements,
our ``kl_norm="element"``). One step = forward + loss + backward + AdamW step (same optimizer settings for
both, no clipping); steps of the two alternate and the median of the timed steps is reported.

Shims (UNITER's files are imported unmodified from the given path, as package ``uniter_model``):
* ``apex.normalization.fused_layer_norm.FusedLayerNorm`` is ``torch.nn.LayerNorm``: apex is a CUDA build
  and FusedLayerNorm computes plain LayerNorm (apex itself falls back to F.layer_norm on CPU tensors).
* ``model/ot.py``'s ``trace`` masks with a uint8 identity, which torch >= 2 rejects in ``masked_select``;
  it is replaced by the same function with a bool identity. The collate side gives the OT pads and
  ``img_mask_tgt`` as bool (UNITER's collate builds them as uint8) for the same reason.

    UNITER_SRC=/path/to/UNITER python benchmarks/uniter_step.py            # tiny and base, fp32 and bf16
    python benchmarks/uniter_step.py --uniter-src /path/to/UNITER --quick  # tiny only, fewer steps
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import os
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from vlp.data.collate import collate
from vlp.train.pretrain_model import (
    ModelConfig,
    ObjectivesConfig,
    PretrainModel,
    build_model,
    encoder_config,
    loss_weights,
    objective_options,
)

IMG_DIM = 2048  # BUTD Faster R-CNN features, as UNITER's
LABEL_DIM = 1601  # Visual Genome's 1600 object classes + background
VOCAB = 30522  # BERT uncased WordPiece
META = {"CLS": 101, "SEP": 102, "MASK": 103, "UNK": 100, "PAD": 0, "v_range": [999, VOCAB]}
OT_LAMBDA = 0.1  # UNITER's itm_ot_lambda in its pretraining configs (our wra_weight)
TASKS = ("mlm", "mrfr", "mrc", "mrc_kl", "itm", "itm+wra")
# (text lengths incl. [CLS]/[SEP], region counts): inclusive ranges drawn uniformly per example.
REGIMES = {"padded": ((8, 30), (10, 100)), "full": ((22, 22), (36, 36))}
UNITER_TASK = {"mlm": "mlm", "mrfr": "mrfr", "mrc": "mrc", "mrc_kl": "mrc-kl", "itm": "itm", "itm+wra": "itm"}


# --------------------------------------------------------------------------------------- UNITER import
def load_uniter(src: Path) -> tuple[type, type]:
    """(UniterConfig, UniterForPretraining) of the checkout `src`, imported as package ``uniter_model``."""
    package = src / "model"
    needed = [package / name for name in ("pretrain.py", "model.py", "layer.py", "ot.py")]
    if not all(path.is_file() for path in needed):
        sys.exit(f"error: {src} is not a UNITER checkout (no model/pretrain.py, model.py, layer.py, ot.py); "
                 "set UNITER_SRC or --uniter-src to a clone of github.com/ChenRocks/UNITER")
    # apex is CUDA-only; its FusedLayerNorm computes torch's LayerNorm.
    fused = types.ModuleType("apex.normalization.fused_layer_norm")
    fused.FusedLayerNorm = nn.LayerNorm
    normalization = types.ModuleType("apex.normalization")
    normalization.fused_layer_norm = fused
    apex = types.ModuleType("apex")
    apex.normalization = normalization
    sys.modules.update({"apex": apex, "apex.normalization": normalization,
                        "apex.normalization.fused_layer_norm": fused})
    # A private package name: UNITER's "model" must not meet any other module called model.
    spec = importlib.machinery.ModuleSpec("uniter_model", None, is_package=True)
    spec.submodule_search_locations = [str(package)]
    sys.modules["uniter_model"] = importlib.util.module_from_spec(spec)
    pretrain = importlib.import_module("uniter_model.pretrain")
    ot = importlib.import_module("uniter_model.ot")

    def trace(x: Tensor) -> Tensor:  # ot.trace with a bool mask (torch >= 2 rejects uint8 masks)
        b, m, n = x.size()
        assert m == n
        mask = torch.eye(n, dtype=torch.bool, device=x.device).unsqueeze(0).expand_as(x)
        return x.masked_select(mask).contiguous().view(b, n).sum(dim=-1, keepdim=False)

    ot.trace = trace
    return importlib.import_module("uniter_model.model").UniterConfig, pretrain.UniterForPretraining


# ------------------------------------------------------------------------------------------ models
def build_ours(size: str) -> tuple[PretrainModel, dict[str, float]]:
    """Our pretraining model with UNITER's five objectives, options as UNITER's code computes them."""
    cfg = ObjectivesConfig(tasks={t: 1.0 for t in ("mlm", "mrfr", "mrc", "mrc_kl", "itm")},
                           itm_negatives="batch", wra_cls_sep=True, mrc_kl_norm="element",
                           wra_weight=OT_LAMBDA)
    # "learned": the official code's mask embedding, so the embedders have the same parameters.
    ucfg = encoder_config(ModelConfig(size=size, masked_region="learned"), VOCAB, IMG_DIM)
    model = build_model(ucfg, objective_options(cfg, META, LABEL_DIM), teacher=False)
    sync_heads(model)
    return model, loss_weights(cfg)


def sync_heads(model: PretrainModel) -> None:
    """Our MRC-kl head := our MRC head (UNITER has one region classifier for both)."""
    with torch.no_grad():
        for mine, theirs in zip(model.objectives["mrc_kl"].parameters(), model.objectives["mrc"].parameters(),
                                strict=True):
            mine.copy_(theirs)


def weight_map(num_layers: int) -> list[tuple[str, list[str]]]:
    """(our parameter, the UNITER parameters it equals: several are stacked along dim 0)."""
    pairs = {
        "encoder.embeddings.word_embeddings.weight": "uniter.embeddings.word_embeddings.weight",
        "encoder.embeddings.position_embeddings.weight": "uniter.embeddings.position_embeddings.weight",
        "encoder.embeddings.token_type_embeddings.weight": "uniter.embeddings.token_type_embeddings.weight",
        "encoder.pooler.weight": "uniter.pooler.dense.weight",
        "encoder.pooler.bias": "uniter.pooler.dense.bias",
        "encoder.img_embeddings.mask_embedding.weight": "uniter.img_embeddings.mask_embedding.weight",
        "objectives.mlm.bias": "cls.predictions.bias",  # decoder weight: tied to word_embeddings in both
        "objectives.mrfr.bias": "feat_regress.bias",  # weight: tied to img_linear in both
        "objectives.itm.head.weight": "itm_output.weight",
        "objectives.itm.head.bias": "itm_output.bias",
    }
    prefixes = {
        "encoder.embeddings.layer_norm.": "uniter.embeddings.LayerNorm.",
        "encoder.img_embeddings.img_linear.": "uniter.img_embeddings.img_linear.",
        "encoder.img_embeddings.img_layer_norm.": "uniter.img_embeddings.img_layer_norm.",
        "encoder.img_embeddings.pos_linear.": "uniter.img_embeddings.pos_linear.",
        "encoder.img_embeddings.pos_layer_norm.": "uniter.img_embeddings.pos_layer_norm.",
        "encoder.img_embeddings.layer_norm.": "uniter.img_embeddings.LayerNorm.",
        "objectives.mlm.transform.0.": "cls.predictions.transform.dense.",
        "objectives.mlm.transform.2.": "cls.predictions.transform.LayerNorm.",
        "objectives.mrfr.transform.0.": "feat_regress.net.0.",
        "objectives.mrfr.transform.2.": "feat_regress.net.2.",
        "objectives.mrc.head.0.0.": "region_classifier.net.0.",
        "objectives.mrc.head.0.2.": "region_classifier.net.2.",
        "objectives.mrc.head.1.": "region_classifier.net.3.",
    }
    for i in range(num_layers):
        ours, theirs = f"encoder.encoder.layers.{i}.", f"uniter.encoder.layer.{i}."
        prefixes |= {
            ours + "attn_out.": theirs + "attention.output.dense.",
            ours + "attn_norm.": theirs + "attention.output.LayerNorm.",
            ours + "ffn_in.": theirs + "intermediate.dense.",
            ours + "ffn_out.": theirs + "output.dense.",
            ours + "ffn_norm.": theirs + "output.LayerNorm.",
        }
    mapping = [(ours, [theirs]) for ours, theirs in pairs.items()]
    mapping += [(ours + kind, [theirs + kind])
                for ours, theirs in prefixes.items() for kind in ("weight", "bias")]
    for i in range(num_layers):  # our fused qkv = UNITER's query, key, value stacked
        self_attn = f"uniter.encoder.layer.{i}.attention.self."
        mapping += [(f"encoder.encoder.layers.{i}.qkv.{kind}", [self_attn + p + "." + kind
                                                                for p in ("query", "key", "value")])
                    for kind in ("weight", "bias")]
    return mapping


def copy_weights(ours: PretrainModel, uniter: nn.Module, mapping: list[tuple[str, list[str]]]) -> None:
    """Copy ours into UNITER by `mapping` (after `sync_heads`); fails unless every UNITER parameter is mapped
    exactly once. Timed steps make the two drift apart (own dropout, own updates): re-copy before a check."""
    sync_heads(ours)
    src, dst = dict(ours.named_parameters()), dict(uniter.named_parameters())
    targets = [name for _, names in mapping for name in names]
    unmapped = sorted(set(dst) - set(targets))
    unknown = sorted((set(targets) - set(dst)) | {o for o, _ in mapping if o not in src})
    if unmapped or unknown or len(targets) != len(set(targets)):
        raise SystemExit(f"error: weight map incomplete: UNITER unmapped {unmapped}, unknown {unknown}")
    with torch.no_grad():
        for mine, names in mapping:
            for part, name in zip(src[mine].split([dst[n].shape[0] for n in names]), names, strict=True):
                dst[name].copy_(part.view_as(dst[name]))


# ----------------------------------------------------------------------------------------- batches
def make_examples(regime: str, batch: int, generator: torch.Generator) -> list[dict[str, Any]]:
    """Examples in our PretrainDataset's format, each with its own image."""
    (t_low, t_high), (n_low, n_high) = REGIMES[regime]
    examples = []
    for i in range(batch):
        t = int(torch.randint(t_low, t_high + 1, (1,), generator=generator))
        n = int(torch.randint(n_low, n_high + 1, (1,), generator=generator))
        words = torch.randint(META["v_range"][0], VOCAB, (t - 2,), generator=generator)
        xy = torch.rand(n, 2, generator=generator) * 0.7
        wh = torch.rand(n, 2, generator=generator) * 0.3 + 0.01
        examples.append({
            "input_ids": torch.cat([torch.tensor([META["CLS"]]), words, torch.tensor([META["SEP"]])]),
            # BUTD features are post-ReLU: non-negative, mostly small
            "img_feat": F.relu(torch.randn(n, IMG_DIM, generator=generator)),
            "img_pos_feat": torch.cat([xy, xy + wh, wh, wh[:, :1] * wh[:, 1:]], dim=1),
            "soft_labels": torch.randn(n, LABEL_DIM, generator=generator).mul(3).softmax(-1),
            "img_key": f"img{i}",
            "txt_id": f"txt{i}",
        })
    return examples


def gather_index(txt_lens: list[int], num_bbs: list[int], max_tl: int, out_size: int) -> Tensor:
    """UNITER's data/data.py get_gather_index."""
    index = torch.arange(0, out_size, dtype=torch.long).unsqueeze(0).repeat(len(txt_lens), 1)
    for i, (tl, nbb) in enumerate(zip(txt_lens, num_bbs, strict=True)):
        index[i, tl:tl + nbb] = torch.arange(max_tl, max_tl + nbb, dtype=torch.long)
    return index


def to_uniter(ours: dict[str, Any], task: str) -> dict[str, Any]:
    """The examples of our prepared batch (same masks, same ITM pairs) collated as UNITER's collate for
    `task` does (data/mlm.py mlm_collate, data/mrm.py mrfr_collate / mrc_collate, data/itm.py itm_collate /
    itm_ot_collate)."""
    txt_lens = ours["txt_mask"].sum(1).tolist()
    num_bbs = ours["img_mask"].sum(1).tolist()
    rows = range(len(txt_lens))
    input_ids = pad_sequence([ours["input_ids"][i, :txt_lens[i]] for i in rows], batch_first=True)
    max_tl, max_nbb = input_ids.size(1), max(num_bbs)
    img_feat = ours["img_feat"][:, :max_nbb].clone()  # our collate zero-pads like pad_tensors
    attn_masks = pad_sequence([torch.ones(txt_lens[i] + num_bbs[i], dtype=torch.long) for i in rows],
                              batch_first=True)
    out = {"input_ids": input_ids,
           "position_ids": torch.arange(0, max_tl, dtype=torch.long).unsqueeze(0),
           "img_pos_feat": ours["img_pos_feat"][:, :max_nbb].clone(),
           "attn_masks": attn_masks,
           "gather_index": gather_index(txt_lens, num_bbs, max_tl, attn_masks.size(1))}
    if task == "mlm":
        labels = ours["txt_labels"].masked_fill(ours["txt_labels"] == -100, -1)
        out["txt_labels"] = pad_sequence([labels[i, :txt_lens[i]] for i in rows], batch_first=True,
                                         padding_value=-1)
    elif task in ("mrfr", "mrc", "mrc_kl"):
        img_masks = ours["img_masked"][:, :max_nbb].clone()
        if task == "mrfr":
            out["feat_targets"] = img_feat[img_masks]
        else:
            out["label_targets"] = ours["soft_labels"][:, :max_nbb][img_masks]
        img_feat = img_feat.masked_fill(img_masks.unsqueeze(-1), 0)
        out["img_masks"] = img_masks
        zeros = torch.zeros(max_tl, dtype=torch.bool)
        out["img_mask_tgt"] = pad_sequence(
            [torch.cat([zeros[:txt_lens[i]], img_masks[i, :num_bbs[i]]]) for i in rows], batch_first=True)
    else:
        out["targets"] = ours["itm_targets"].clone()
        if task == "itm+wra":
            scatter = torch.arange(0, attn_masks.size(1), dtype=torch.long).unsqueeze(0).repeat(len(rows), 1)
            for i, tl in enumerate(txt_lens):
                scatter[i, tl:] = torch.arange(max_tl, max_tl + attn_masks.size(1) - tl, dtype=torch.long)
            out["ot_inputs"] = {"ot_scatter": scatter, "scatter_max": scatter.max().item(),
                                "txt_pad": torch.arange(max_tl) >= torch.tensor(txt_lens)[:, None],
                                "img_pad": torch.arange(max_nbb) >= torch.tensor(num_bbs)[:, None]}
    out["img_feat"] = img_feat
    return out


def prepare_batches(model: PretrainModel, regime: str, batch: int, seed: int
                    ) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """task -> (our batch, UNITER's batch) from the same examples, masks and pairs."""
    examples = make_examples(regime, batch, torch.Generator().manual_seed(seed))
    base = collate(examples, pad_id=META["PAD"])
    batches = {}
    for task in TASKS:
        objective = model.objectives["itm" if task.startswith("itm") else task]
        ours = objective.prepare(base, torch.Generator().manual_seed(seed + 1))
        batches[task] = (ours, to_uniter(ours, task))
    return batches


# ------------------------------------------------------------------------------------ loss and steps
def our_loss(model: PretrainModel, weights: dict[str, float], task: str, batch: dict) -> Tensor:
    model.objectives["itm"].wra = task == "itm+wra"
    out = model("itm" if task.startswith("itm") else task, batch)
    return sum(weights.get(k, 1.0) * v for k, v in out.items() if k.endswith("_loss"))


def uniter_loss(model: nn.Module, task: str, batch: dict) -> Tensor:
    """UNITER's pretrain.py reduction of UniterForPretraining's per-element losses."""
    out = model(batch, task=UNITER_TASK[task], compute_loss=True)
    if not task.startswith("itm"):
        return out.mean()
    itm_loss, ot = out
    loss = itm_loss.mean()
    if ot is not None:
        ot_pos, ot_neg = ot
        loss = loss + OT_LAMBDA * (ot_pos.sum() - ot_neg.sum()) / (ot_pos.size(0) + ot_neg.size(0))
    return loss


def make_step(module: nn.Module, loss_fn: Callable[[dict], Tensor], bf16: bool) -> Callable[[dict], None]:
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5, betas=(0.9, 0.98), weight_decay=0.01)

    def step(batch: dict) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


# ------------------------------------------------------------------------------------------ checks
def encoder_diff(ours: PretrainModel, uniter: nn.Module, ob: dict, ub: dict) -> float:
    """Max |ours - UNITER| over the real positions of the encoder output (eval mode, fp32)."""
    with torch.no_grad():
        mine = ours.encoder(input_ids=ob["input_ids"], position_ids=ob["position_ids"],
                            txt_mask=ob["txt_mask"], img_feat=ob["img_feat"],
                            img_pos_feat=ob["img_pos_feat"], img_mask=ob["img_mask"]).sequence_output
        theirs = uniter.uniter(ub["input_ids"], ub["position_ids"], ub["img_feat"], ub["img_pos_feat"],
                               ub["attn_masks"], ub["gather_index"], output_all_encoded_layers=False)
    lt = ob["input_ids"].size(1)
    b, t = ob["txt_mask"].nonzero(as_tuple=True)
    bi, r = ob["img_mask"].nonzero(as_tuple=True)
    txt_lens = ob["txt_mask"].sum(1)
    text = (mine[b, t] - theirs[b, t]).abs().max()
    image = (mine[bi, lt + r] - theirs[bi, txt_lens[bi] + r]).abs().max()
    return float(torch.maximum(text, image))


def _grad(param: Tensor) -> Tensor:
    return torch.zeros_like(param) if param.grad is None else param.grad


def check_equal(ours: PretrainModel, weights: dict[str, float], uniter: nn.Module,
                mapping: list[tuple[str, list[str]]], batches: dict, label: str) -> None:
    """Loss and gradient agreement per task (eval mode: no dropout; fp32); exits on a large difference."""
    ours.eval()
    uniter.eval()
    enc = encoder_diff(ours, uniter, batches["itm"][0], batches["itm"][1])
    print(f"  check {label}: encoder output max|diff| {enc:.2e}", flush=True)
    worst = enc
    mine_params, their_params = dict(ours.named_parameters()), dict(uniter.named_parameters())
    for task in TASKS:
        ob, ub = batches[task]
        ours.zero_grad(set_to_none=True)
        uniter.zero_grad(set_to_none=True)
        a, b = our_loss(ours, weights, task, ob), uniter_loss(uniter, task, ub)
        a.backward()
        b.backward()
        grad_diff, grad_max = 0.0, 0.0
        for mine, names in mapping:
            # No gradient counts as zeros (ours looks up the mask embedding's zero row in MLM, UNITER not).
            if task == "mrc_kl":  # UNITER's one region classifier is our MRC-kl head in this task
                mine = mine.replace("objectives.mrc.", "objectives.mrc_kl.")
            g = _grad(mine_params[mine]).reshape(-1)
            theirs = torch.cat([_grad(their_params[n]).reshape(-1) for n in names])
            grad_diff = max(grad_diff, float((g - theirs).abs().max()))
            grad_max = max(grad_max, float(theirs.abs().max()))
        a, b = a.item(), b.item()
        loss_diff = abs(a - b)
        print(f"  check {label} {task:<8} loss ours {a:.6f} UNITER {b:.6f} |diff| {loss_diff:.1e}  "
              f"grad max|diff| {grad_diff:.1e} (max|grad| {grad_max:.1e})", flush=True)
        if loss_diff > 1e-4 * max(1.0, abs(b)) or grad_diff > 1e-3 * grad_max:
            raise SystemExit(f"error: {label} {task}: ours and UNITER disagree (see the line above)")
        worst = max(worst, loss_diff)
    if enc > 1e-4:
        raise SystemExit(f"error: {label}: encoder outputs disagree by {enc:.2e}")
    ours.zero_grad(set_to_none=True)
    uniter.zero_grad(set_to_none=True)
    ours.train()
    uniter.train()


# ----------------------------------------------------------------------------------------- measure
def padding(ob: dict, ub: dict) -> tuple[float, float]:
    """Padding fraction of our [B, Lt + N] layout and of UNITER's [B, max(t_i + n_i)] one."""
    real = int(ob["txt_mask"].sum() + ob["img_mask"].sum())
    return 1 - real / (ob["txt_mask"].numel() + ob["img_mask"].numel()), 1 - real / ub["attn_masks"].numel()


def measure(ours: PretrainModel, weights: dict[str, float], uniter: nn.Module, task: str, ob: dict, ub: dict,
            bf16: bool, warmup: int, steps: int, clock: Callable[[], float]) -> tuple[float, float]:
    """(ours steps/s, UNITER steps/s): median of `steps` timed steps after `warmup`, interleaved."""
    step_ours = make_step(ours, lambda batch: our_loss(ours, weights, task, batch), bf16)
    step_uniter = make_step(uniter, lambda batch: uniter_loss(uniter, task, batch), bf16)
    times: dict[str, list[float]] = {"ours": [], "uniter": []}
    for i in range(warmup + steps):
        for name, step, batch in (("ours", step_ours, ob), ("uniter", step_uniter, ub)):
            start = clock()
            step(batch)
            if i >= warmup:
                times[name].append(clock() - start)
    return 1 / statistics.median(times["ours"]), 1 / statistics.median(times["uniter"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--uniter-src", type=Path, default=os.environ.get("UNITER_SRC"),
                        help="checkout of github.com/ChenRocks/UNITER (default: $UNITER_SRC)")
    parser.add_argument("--quick", action="store_true", help="fewer steps, tiny only unless --sizes is given")
    parser.add_argument("--sizes", nargs="+", choices=["tiny", "base", "large"])
    parser.add_argument("--steps", type=int, help="timed steps per row (default 10 tiny, 4 base; quick 5, 2)")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--regimes", nargs="+", choices=list(REGIMES), default=list(REGIMES))
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    # One thread by default, as benchmarks/model_throughput.py: on a shared machine a descheduled OpenMP
    # thread stalls every parallel op.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                        help="cpu: the process's CPU time, which other jobs' load does not inflate (with one "
                        "thread it is the wall time of an idle machine); wall: elapsed time")
    args = parser.parse_args()
    if args.uniter_src is None:
        sys.exit("error: UNITER_SRC is not set: point it (or --uniter-src) at a clone of "
                 "github.com/ChenRocks/UNITER")
    uniter_config, uniter_pretraining = load_uniter(Path(args.uniter_src).expanduser())
    sizes = args.sizes or (["tiny"] if args.quick else ["tiny", "base"])
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    batches_by_size = {"tiny": 32, "base": 4 if args.quick else 8, "large": 2 if args.quick else 4}
    print(f"threads {args.threads}, {args.clock} clock, median of timed steps; vocab {VOCAB}, "
          f"img_dim {IMG_DIM}, {LABEL_DIM} labels; padded: text {REGIMES['padded'][0]}, "
          f"regions {REGIMES['padded'][1]}; full: text {REGIMES['full'][0][0]}, "
          f"regions {REGIMES['full'][1][0]}")
    rows = []
    for size in sizes:
        warmup, steps = (1, 5 if size == "tiny" else 2) if args.quick else (2, 10 if size == "tiny" else 4)
        steps = args.steps or steps
        torch.manual_seed(0)
        ours, weights = build_ours(size)
        c = ours.encoder.config
        uniter = uniter_pretraining(
            uniter_config(c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
                          num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
                          hidden_dropout_prob=c.hidden_dropout_prob,
                          attention_probs_dropout_prob=c.attention_probs_dropout_prob,
                          max_position_embeddings=c.max_position_embeddings,
                          type_vocab_size=c.type_vocab_size, initializer_range=c.initializer_range),
            IMG_DIM, LABEL_DIM)
        mapping = weight_map(c.num_hidden_layers)
        copy_weights(ours, uniter, mapping)
        for regime in args.regimes:
            batch_size = batches_by_size[size]
            batches = prepare_batches(ours, regime, batch_size, seed=1)
            copy_weights(ours, uniter, mapping)  # the previous regime's timed steps changed both
            check_equal(ours, weights, uniter, mapping, batches, f"{size}/{regime}")
            pad_ours, pad_uniter = padding(*batches["mlm"])
            print("size   batch  regime  pad ours/UNITER  task      precision steps  ours st/s  UNITER st/s"
                  "  ours/UNITER", flush=True)
            for task in args.tasks:
                for precision in args.precisions:
                    fast, slow = measure(ours, weights, uniter, task, *batches[task], precision == "bf16",
                                         warmup, steps, clock)
                    rows.append((size, regime, precision, fast / slow))
                    print(f"{size:<6}{batch_size:>6}  {regime:<7}{pad_ours:>8.0%} /{pad_uniter:>4.0%}     "
                          f"{task:<10}{precision:<10}{steps:>5}{fast:>11.2f}{slow:>13.2f}"
                          f"{fast / slow:>13.2f}", flush=True)
    print("geometric mean (min) of ours/UNITER over tasks:")
    for key in dict.fromkeys(r[:3] for r in rows):
        ratios = [r[3] for r in rows if r[:3] == key]
        mean = math.exp(sum(map(math.log, ratios)) / len(ratios))
        print(f"  {' '.join(key):<22} {mean:.2f} ({min(ratios):.2f})")


if __name__ == "__main__":
    main()
