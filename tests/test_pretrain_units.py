"""Pieces of the training core (vlp.train) the pretraining loop runs, without Ray: distributed helpers in one
process, the LR schedule, optimizer parameter groups, target counts, batch numbering, seeds, metric sums and
the logged throughput arithmetic."""

import pytest
import torch
from torch import nn

from stages.pretrain.config import PretrainConfig
from stages.pretrain.loop import throughput_metrics
from vlp import distributed
from vlp.data.batching import UnitBatchSampler
from vlp.model import UniterConfig
from vlp.objectives.masking import IGNORE_INDEX
from vlp.train.metrics import MetricSums
from vlp.train.optim import build_optimizer, lr_factor, no_decay_parameter_names, parameter_groups
from vlp.train.prepared import NumberedBatches, PreparedBatches
from vlp.train.pretrain_model import build_model, encoder_config, objective_options, target_count
from vlp.train.seeds import seed_of

META = {"CLS": 2, "SEP": 3, "MASK": 4, "UNK": 1, "PAD": 0, "v_range": [5, 40], "vocab_size": 40}


def tiny_model(tasks=("itm", "mlm", "mrc_kl", "mrfr")):
    cfg = PretrainConfig(tasks={t: 1.0 for t in tasks})
    ucfg = UniterConfig.preset("tiny", vocab_size=40, img_dim=6, hidden_size=16, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=32)
    return cfg, build_model(ucfg, objective_options(cfg, META, label_dim=4))


def test_distributed_helpers_are_no_ops_in_one_process():
    assert not distributed.is_distributed()
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    x = torch.tensor([1.5, -2.0])
    summed = distributed.all_reduce_sum(x)
    assert torch.equal(summed, x) and summed is not x
    assert distributed.all_reduce_dict({"b": 2, "a": torch.tensor(0.5)}) == {"a": 0.5, "b": 2.0}
    assert distributed.all_gather_object({"k": 1}) == [{"k": 1}]
    assert distributed.broadcast_object("x") == "x"
    distributed.barrier()


def test_lr_schedule_warms_up_then_decays_linearly():
    factors = [lr_factor(s, warmup=4, total=10) for s in range(10)]
    assert factors == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])
    assert [lr_factor(s, warmup=0, total=4) for s in range(4)] == pytest.approx([1.0, 0.75, 0.5, 0.25])


def test_scheduler_applies_the_factor_to_each_optimizer_step():
    cfg, model = tiny_model()
    optim = cfg.optim.model_copy(update={"warmup": 0.4, "head_lr_mult": 3.0, "betas": (0.8, 0.9),
                                         "eps": 1e-5})
    optimizer, schedule = build_optimizer(model.encoder, model.objectives, optim, 10)
    seen = []
    for _ in range(10):
        seen.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        schedule.step()
    # Encoder groups at lr, the objective heads' at 3 x lr, all on the same warmup (4 steps) and decay.
    assert [group[0] for group in seen] == pytest.approx([optim.lr * lr_factor(s, 4, 10) for s in range(10)])
    assert [group[-1] for group in seen] == pytest.approx([3 * g[0] for g in seen])
    # Betas and eps come from the config (the finetuning loop once hard-coded them).
    assert (optimizer.defaults["betas"], optimizer.defaults["eps"]) == ((0.8, 0.9), 1e-5)


def test_parameter_groups_exclude_biases_and_layer_norms_from_weight_decay():
    _, model = tiny_model()
    no_decay = no_decay_parameter_names(model)
    named = dict(model.named_parameters())
    assert "objectives.mlm.bias" in no_decay and "objectives.mrfr.bias" in no_decay
    assert "encoder.pooler.bias" in no_decay and "encoder.pooler.weight" not in no_decay
    layer_norms = {f"{m}.{p}" for m, mod in model.named_modules() if isinstance(mod, nn.LayerNorm)
                   for p, _ in mod.named_parameters(recurse=False)}
    assert layer_norms and layer_norms <= no_decay
    assert no_decay == {n for n in named if n.endswith("bias")} | layer_norms
    decay, plain = parameter_groups([(model, 1e-3)], 0.01)
    assert (decay["weight_decay"], plain["weight_decay"]) == (0.01, 0.0)
    # Every parameter once: the MLM decoder and the MRFR projection reuse encoder weights, not copies.
    ids = [id(p) for p in decay["params"] + plain["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert {id(p) for p in plain["params"]} == {id(named[n]) for n in no_decay}
    # Split into encoder and heads, a tied weight stays with the encoder, listed once.
    groups = parameter_groups([(model.encoder, 1e-3), (model.objectives, 2e-3)], 0.01)
    split = [id(p) for g in groups for p in g["params"]]
    assert sorted(split) == sorted(ids)
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(1e-3, 0.01), (1e-3, 0.0), (2e-3, 0.01),
                                                              (2e-3, 0.0)]
    tied = model.encoder.embeddings.word_embeddings.weight
    assert any(p is tied for p in groups[0]["params"])
    assert not any(p is tied for g in groups[2:] for p in g["params"])


def test_target_count_is_what_each_objective_averages_over():
    _, model = tiny_model()
    labels = torch.full((2, 5), IGNORE_INDEX)
    labels[0, 1] = labels[1, 3] = labels[1, 2] = 7
    masked = torch.zeros(2, 4, dtype=torch.bool)
    masked[0, 0] = True
    batch = {"txt_labels": labels, "img_masked": masked, "img_keys": ["a", "b"]}
    counts = {t: target_count(model.objectives[t], batch) for t in ("mlm", "mrfr", "mrc_kl", "itm")}
    assert counts == {"mlm": 3, "mrfr": 1, "mrc_kl": 1, "itm": 2}


def test_batch_numbering_does_not_depend_on_the_number_of_workers():
    txt, img = [5, 6, 7, 8, 9, 10, 11, 12] * 3, [3] * 24

    def numbered(world):
        out = {}
        for rank in range(world):
            sampler = UnitBatchSampler(txt, img, 30, seed=4, rank=rank, world_size=world, infinite=False)
            out |= {(epoch, index): batch for epoch, index, batch in NumberedBatches(sampler)}
        return out

    one, two = numbered(1), numbered(2)
    assert len(one) >= 4
    assert all(one[key] == batch for key, batch in two.items())
    assert len(one) - len(two) == len(one) % 2  # even shards drop the odd batch out


def test_prepared_batches_are_seeded_by_batch_not_by_order():
    examples = [{"input_ids": torch.tensor([2, 9 + i, 3]), "img_feat": torch.ones(2, 6),
                 "img_pos_feat": torch.zeros(2, 7), "img_key": f"i{i}", "txt_id": f"t{i}"} for i in range(4)]

    def prepare(batch, generator):
        return {**batch, "draw": torch.rand(3, generator=generator)}

    data = PreparedBatches(examples, prepare, seed=1, stream="train/x", pad_id=0)
    first = data[(0, 3, [0, 1])]["draw"]
    data[(0, 4, [0, 1])]
    assert torch.equal(data[(0, 3, [0, 1])]["draw"], first)
    assert not torch.equal(data[(1, 3, [0, 1])]["draw"], first)
    assert seed_of(1, "a", 2) == seed_of(1, "a", 2) != seed_of(1, "a", 3)


def test_seeds_derive_from_the_root_by_purpose():
    assert seed_of(0, "init") != seed_of(1, "init") and seed_of(0, "init") != seed_of(0, "dropout")
    assert 0 <= seed_of(0, "init") < 2**63
    # The derivation pretraining had before the root seed existed (hash of "0\0init"), so default runs
    # (root seed 0, formerly pretrain.seed 0) reproduce.
    assert seed_of(0, "init") == 7398377047407540960


def test_metric_sums_weight_losses_by_targets_and_add_counts():
    sums = MetricSums()
    sums.add({"vqa_loss": torch.tensor(2.0), "vqa_score_sum": torch.tensor(1.5), "vqa_count": torch.tensor(3),
              "predictions": [1, 2, 3]}, targets=3)
    sums.add({"vqa_loss": torch.tensor(1.0), "vqa_score_sum": torch.tensor(0.5), "vqa_count": torch.tensor(1),
              "nlvr2_correct": torch.tensor(0), "nlvr2_count": torch.tensor(0)}, targets=1)
    assert sums.metrics() == pytest.approx({"vqa_loss": 7.0 / 4, "vqa_score": 0.5})  # zero count: no metric
    assert sums.reduced().sums == sums.sums  # one process: the sums as they are

def test_throughput_metrics_from_summed_windows():
    windows = {
        "mlm": MetricSums({"mlm_loss": 12.0, "targets": 6.0, "mlm_correct": 3.0, "mlm_count": 6.0,
                           "examples": 8.0, "units": 150.0, "padded": 200.0, "seconds": 2.0, "steps": 2.0}),
        "itm": MetricSums({"itm_loss": 1.4, "wra_loss": -0.2, "targets": 4.0, "itm_correct": 1.0,
                           "itm_count": 4.0, "examples": 4.0, "units": 90.0, "padded": 100.0, "seconds": 1.0,
                           "steps": 1.0}),
    }
    assert throughput_metrics(windows) == pytest.approx({
        "mlm/mlm_loss": 2.0, "mlm/mlm_acc": 0.5, "mlm/examples_per_s": 4.0, "mlm/units_per_s": 75.0,
        "mlm/steps_per_s": 1.0, "mlm/padding": 0.25, "itm/itm_loss": 0.35, "itm/wra_loss": -0.05,
        "itm/itm_acc": 0.25, "itm/examples_per_s": 4.0, "itm/units_per_s": 90.0, "itm/steps_per_s": 1.0,
        "itm/padding": 0.1, "examples_per_s": 4.0, "units_per_s": 80.0, "steps_per_s": 1.0, "padding": 0.2,
    })


def test_config_rejects_unknown_tasks_and_keys():
    with pytest.raises(ValueError, match="unknown task"):
        PretrainConfig(tasks={"mlm": 1.0, "vqa": 1.0})
    with pytest.raises(ValueError, match="extra"):
        PretrainConfig(batch_size=3)
    with pytest.raises(ValueError, match="optim.warmup"):
        PretrainConfig(steps=10, optim={"warmup": 1.0})
    # Now the root seed, the runtime section and what the inputs declare.
    for removed in ("seed", "nbb", "max_txt_len", "precision", "cpus_per_worker"):
        with pytest.raises(ValueError, match="extra"):
            PretrainConfig(**{removed: 0})


def test_a_pretraining_still_at_chance_is_called_so():
    from stages.pretrain.stage import alignment_verdict

    at_chance = alignment_verdict({"itm_acc": 0.51, "zs_ir_r1": 0.033}, retrieval_images=30)
    assert at_chance["alignment"] == "at_chance"
    assert "ITM accuracy 0.510 (chance 0.500)" in at_chance["detail"]
    assert alignment_verdict({"itm_acc": 0.8, "zs_ir_r1": 0.05}, 30)["alignment"] == "at_chance"  # R@1 < 2x
    assert alignment_verdict({"itm_acc": 0.8, "zs_ir_r1": 0.25}, 30)["alignment"] == "learned"
    assert alignment_verdict({"mlm_acc": 0.6}, 30)["alignment"] == "unknown"


def test_fidelity_options_reach_the_objectives_and_the_encoder():
    # Defaults follow the UNITER paper; each official-code choice is one config value away.
    cfg, model = tiny_model()
    assert (model.objectives["mrc_kl"].kl_norm, model.objectives["itm"].wra_cls_sep) == ("region", False)
    assert encoder_config(cfg.model, 40, 6).img_mask_embedding is False
    official = PretrainConfig(mrc_kl_norm="element", wra_cls_sep=True, model={"masked_region": "learned"})
    options = objective_options(official, META, label_dim=4)
    assert options["mrc_kl"]["kl_norm"] == "element" and options["itm"]["wra_cls_sep"] is True
    assert encoder_config(official.model, 40, 6).img_mask_embedding is True
