"""Training-step throughput of UniterModel vs the same encoder built from Hugging Face's BertModel.

One step = forward over a [text ; image] batch, a scalar loss on the outputs, backward, AdamW step. Both
models see the same random batch and the same sizes; text and region counts are drawn per example
(padding at the end of each block) in three shapes, see SHAPES. The reference embeds text with BertModel's own
embedder and images with an embedder identical to ours, concatenated and passed as `inputs_embeds` with
the same key-padding mask. Throughput is in input units (real text tokens + real regions) per second.
Steps of the two models are interleaved and the median step time is reported, so load from other
processes hits both alike; by default time is the process's CPU time (see --clock).

    python benchmarks/model_throughput.py            # tiny and base, all shapes, fp32 and bf16 autocast
    python benchmarks/model_throughput.py --quick    # fewer steps, smaller base batches
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import BertConfig, BertModel

from vlp.model import UniterConfig, UniterModel
from vlp.model.embeddings import ImageEmbeddings

IMG_DIM = 2048


# Batch shapes: the shortest text and smallest region count drawn, as fractions of the batch's maxima.
# "random" is fixed-size batching over captions and 10-100 boxes; "narrow" is what length-bucketed dynamic
# batching leaves; "full" has no padding at all, the case where skipping padding gains nothing.
SHAPES = {"random": (0.5, 0.25), "narrow": (0.85, 0.85), "full": (1.0, 1.0)}


@dataclass(frozen=True)
class Workload:
    size: str
    batch: int
    shape: str
    max_text: int = 32
    max_regions: int = 64


def make_batch(work: Workload, vocab_size: int, generator: torch.Generator) -> dict[str, Tensor]:
    b, lt, n = work.batch, work.max_text, work.max_regions
    low_text, low_regions = SHAPES[work.shape]
    text_len = torch.randint(round(low_text * lt), lt + 1, (b,), generator=generator)
    regions = torch.randint(round(low_regions * n), n + 1, (b,), generator=generator)
    txt_mask = torch.arange(lt) < text_len[:, None]
    img_mask = torch.arange(n) < regions[:, None]
    input_ids = torch.randint(1, vocab_size, (b, lt), generator=generator).masked_fill(~txt_mask, 0)
    return {
        "input_ids": input_ids,
        "position_ids": torch.arange(lt).expand(b, lt),
        "txt_mask": txt_mask,
        "img_feat": torch.rand(b, n, IMG_DIM, generator=generator) * img_mask[..., None],
        "img_pos_feat": torch.rand(b, n, 7, generator=generator) * img_mask[..., None],
        "img_mask": img_mask,
    }


class HfReference(nn.Module):
    """BertModel encoder over [BERT text embeddings ; our image embedder], as UNITER would be built on HF."""

    def __init__(self, config: UniterConfig) -> None:
        super().__init__()
        bert_config = BertConfig(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            intermediate_size=config.intermediate_size,
            max_position_embeddings=config.max_position_embeddings,
            type_vocab_size=config.type_vocab_size,
            layer_norm_eps=config.layer_norm_eps,
            attn_implementation="sdpa",
        )
        self.bert = BertModel(bert_config, add_pooling_layer=False)
        self.img = ImageEmbeddings(config)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        text = self.bert.embeddings.word_embeddings(batch["input_ids"])
        # BertModel's embedder then adds position + type (1 for regions) and applies the final LayerNorm.
        image = self.img.img_layer_norm(self.img.img_linear(batch["img_feat"])) + self.img.pos_layer_norm(
            self.img.pos_linear(batch["img_pos_feat"])
        )
        b, n = batch["img_mask"].shape
        out = self.bert(
            inputs_embeds=torch.cat([text, image.to(text.dtype)], dim=1),
            attention_mask=torch.cat([batch["txt_mask"], batch["img_mask"]], dim=1).long(),
            token_type_ids=torch.cat(
                [torch.zeros_like(batch["input_ids"]), torch.ones(b, n, dtype=torch.long)], dim=1
            ),
            position_ids=torch.cat([batch["position_ids"], torch.zeros(b, n, dtype=torch.long)], dim=1),
        )
        return out.last_hidden_state


def ours_forward(model: UniterModel) -> Callable[[dict[str, Tensor]], Tensor]:
    return lambda batch: model(**batch).sequence_output


def make_step(
    module: nn.Module, forward: Callable[[dict[str, Tensor]], Tensor], bf16: bool
) -> Callable[[dict[str, Tensor]], None]:
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, betas=(0.9, 0.98), weight_decay=0.01)

    def step(batch: dict[str, Tensor]) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = forward(batch).float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure(
    work: Workload, bf16: bool, warmup: int, steps: int, clock: Callable[[], float]
) -> tuple[float, float, float]:
    """(ours units/s, HF units/s, padding fraction) for one workload and precision."""
    torch.manual_seed(0)
    config = UniterConfig.preset(work.size, img_dim=IMG_DIM)
    ours = UniterModel(config).train()
    ref = HfReference(config).train()
    batch = make_batch(work, config.vocab_size, torch.Generator().manual_seed(1))
    units = int(batch["txt_mask"].sum() + batch["img_mask"].sum())
    padding = 1 - units / (work.batch * (work.max_text + work.max_regions))
    steps_by_name = {"ours": make_step(ours, ours_forward(ours), bf16), "hf": make_step(ref, ref, bf16)}
    times: dict[str, list[float]] = {name: [] for name in steps_by_name}
    for i in range(warmup + steps):
        for name, step in steps_by_name.items():
            start = clock()
            step(batch)
            if i >= warmup:
                times[name].append(clock() - start)
    return units / statistics.median(times["ours"]), units / statistics.median(times["hf"]), padding


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer steps and smaller base batches")
    parser.add_argument("--sizes", nargs="+", default=["tiny", "base"], choices=["tiny", "base", "large"])
    # One thread by default: one core per Ray worker as in the demo, and on a machine shared with other
    # jobs a descheduled OpenMP thread stalls every parallel op, which swamps the difference measured.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="cpu: the process's CPU time, which other jobs' load does not inflate (with one thread it is "
        "the wall time of an idle machine); wall: elapsed time, for multi-thread runs on an idle machine",
    )
    args = parser.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    batches = {"tiny": 32, "base": 4 if args.quick else 16, "large": 2 if args.quick else 8}
    print(f"threads {args.threads}, {args.clock} clock, median of timed steps, img_dim {IMG_DIM}")
    print("size   batch   shape  padding precision steps   ours u/s     HF u/s  ours/HF")
    for size in args.sizes:
        # Larger models get fewer steps: one base step takes seconds on a CPU core.
        warmup, steps = (1, 10 if size == "tiny" else 2) if args.quick else (2, 20)
        for shape in SHAPES:
            work = Workload(size, batches[size], shape)
            for bf16 in (False, True):
                ours, hf, padding = measure(work, bf16, warmup, steps, clock)
                print(
                    f"{size:<6}{work.batch:>6}{shape:>8}{padding:>9.1%}{'bf16' if bf16 else 'fp32':>10}"
                    f"{steps:>6}{ours:>11.0f}{hf:>11.0f}{ours / hf:>9.2f}",
                    flush=True,
                )

if __name__ == "__main__":
    main()
