"""CODIS's parts (issue 15): align-before-fuse attention, the momentum teacher, feature queues (with a
two-process all-gather), ITC with queues and soft targets, contrastive ITM negatives, the codebook, their
config and checkpoints, and the ITC shortlist of zero-shot retrieval. The loop run with every CODIS task is
tests/test_pretrain.py::test_codis_tasks_train_on_two_workers_with_teacher_and_queue."""

import math
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from stages.pretrain import checkpointing
from stages.pretrain.config import PretrainConfig
from vlp import distributed
from vlp.model import UniterConfig, UniterModel
from vlp.objectives import ITC, REGISTRY, Codebook, ITCIntra
from vlp.objectives.codebook import codebook_losses, ot_loss, transport_plan
from vlp.objectives.itc import distilled_contrastive_loss
from vlp.objectives.itm import contrastive_negatives
from vlp.objectives.momentum import FeatureQueue, MomentumTeacher, ema_update_, key_ids
from vlp.train.pretrain_model import build_model, loss_weights, objective_options, target_count

META = {"CLS": 2, "SEP": 3, "MASK": 4, "UNK": 1, "PAD": 0, "v_range": [5, 60], "vocab_size": 60}
IMG_DIM = 12
CODIS = {"mlm": 1.0, "itm": 1.0, "itc": 1.0, "itc_intra": 1.0, "codebook": 1.0}


def encoder_config(**over) -> UniterConfig:
    return UniterConfig(**{**dict(vocab_size=60, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                  intermediate_size=48, max_position_embeddings=40, img_dim=IMG_DIM,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), **over})


def make_batch(text_lens, regions, keys=None, seed=0) -> dict:
    """A collated batch: [CLS] words [SEP] padded with 0, regions padded at the end."""
    gen = torch.Generator().manual_seed(seed)
    b, lt, n = len(text_lens), max(text_lens) + 2, max(regions)
    ids = torch.zeros(b, lt, dtype=torch.long)
    for i, words in enumerate(text_lens):
        ids[i, : words + 2] = torch.cat([torch.tensor([2]), torch.randint(5, 60, (words,), generator=gen),
                                         torch.tensor([3])])
    img_mask = torch.arange(n) < torch.tensor(regions)[:, None]
    return {"input_ids": ids, "position_ids": torch.arange(lt).repeat(b, 1), "txt_mask": ids != 0,
            "img_feat": torch.randn(b, n, IMG_DIM, generator=gen) * img_mask[..., None],
            "img_pos_feat": torch.rand(b, n, 7, generator=gen) * img_mask[..., None], "img_mask": img_mask,
            "img_keys": keys or [f"img{i}" for i in range(b)], "txt_ids": [f"t{i}" for i in range(b)]}


def codis_model(seed=0, fusion_start=0, **over):
    cfg = PretrainConfig(tasks=CODIS, itc_queue=6, itc_distill=0.4, itm_negatives="contrastive",
                         codebook_size=5, itc_dim=8, model={"fusion_start": fusion_start}, **over)
    torch.manual_seed(seed)
    return cfg, build_model(encoder_config(fusion_start=fusion_start), objective_options(cfg, META, 5))


def train_steps(cfg, model, steps, seed=0):
    """A few SGD steps over every task (each its own step, as the loop does) with the teacher update."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for step in range(steps):
        for t, task in enumerate(sorted(cfg.tasks)):
            batch = make_batch([3, 5, 4, 2], [4, 2, 3, 5], keys=["a", "b", "a", "c"], seed=seed + step)
            batch = model.objectives[task].prepare(batch, torch.Generator().manual_seed(100 * step + t))
            out = model(task, batch)
            loss = sum(loss_weights(cfg).get(k, 1.0) * v for k, v in out.items() if k.endswith("_loss"))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            model.momentum_update()
    return model


# ---------------------------------------------------------------- align before fuse


def reference_forward(model: UniterModel, batch: dict) -> torch.Tensor:
    """The encoder as it was before fusion_start: every layer with the plain key mask."""
    txt_rows, img_rows = batch["txt_mask"].nonzero(as_tuple=True), batch["img_mask"].nonzero(as_tuple=True)
    text = model.embeddings(batch["input_ids"][txt_rows], batch["position_ids"][txt_rows])
    image = model.img_embeddings(batch["img_feat"][img_rows], batch["img_pos_feat"][img_rows],
                                 model.embeddings.token_type_embeddings)
    lt, length = batch["txt_mask"].shape[1], batch["txt_mask"].shape[1] + batch["img_mask"].shape[1]
    real = torch.cat([txt_rows[0] * length + txt_rows[1], img_rows[0] * length + lt + img_rows[1]])
    packed, key_mask = torch.cat([text, image]), torch.cat([batch["txt_mask"], batch["img_mask"]], 1)
    for layer in model.encoder.layers:
        packed, _ = layer(packed, real, key_mask)
    flat = packed.new_zeros(key_mask.numel(), packed.shape[1]).index_copy_(0, real, packed)
    return flat.view(*key_mask.shape, -1)


def model_inputs(batch):
    return {k: batch[k] for k in ("input_ids", "position_ids", "txt_mask", "img_feat", "img_pos_feat",
                                  "img_mask")}


def test_fusion_start_zero_is_the_uniter_encoder_exactly():
    assert UniterConfig().fusion_start == 0
    torch.manual_seed(0)
    model = UniterModel(encoder_config()).eval()
    batch = make_batch([3, 7, 1], [5, 2, 4], seed=1)
    assert torch.equal(model(**model_inputs(batch)).sequence_output, reference_forward(model, batch))
    with pytest.raises(ValueError, match="leaves no fusion layer"):
        encoder_config(fusion_start=3)


@pytest.mark.parametrize("fusion_start", [1, 2])
def test_unimodal_layers_do_not_see_the_other_modality(fusion_start):
    torch.manual_seed(0)
    model = UniterModel(encoder_config(fusion_start=fusion_start)).eval()
    batch = make_batch([3, 7, 1], [5, 2, 4], seed=1)
    other = dict(batch, img_feat=batch["img_feat"] * 3 + 1, img_pos_feat=batch["img_pos_feat"].flip(-1))
    other["input_ids"] = batch["input_ids"].clone()
    other["input_ids"][batch["txt_mask"] & (batch["input_ids"] > 4)] = 7  # every word replaced
    lt = batch["input_ids"].shape[1]
    for depth in range(1, fusion_start + 1):
        seq = model(**model_inputs(batch), depth=depth).sequence_output
        regions_changed = model(**model_inputs(dict(batch, img_feat=other["img_feat"],
                                                    img_pos_feat=other["img_pos_feat"])), depth=depth)
        words_changed = model(**model_inputs(dict(batch, input_ids=other["input_ids"])), depth=depth)
        assert torch.equal(seq[:, :lt], regions_changed.sequence_output[:, :lt])  # text: regions unseen
        assert torch.equal(seq[:, lt:], words_changed.sequence_output[:, lt:])  # regions: text unseen
        # ... and equal to a text-only pass through the same layers.
        alone = {**model_inputs(batch), "img_feat": batch["img_feat"][:, :0],
                 "img_pos_feat": batch["img_pos_feat"][:, :0], "img_mask": batch["img_mask"][:, :0]}
        torch.testing.assert_close(model(**alone, depth=depth).sequence_output, seq[:, :lt])
    # The fusion layers after it do see the regions.
    full = model(**model_inputs(batch)).sequence_output
    changed = model(**model_inputs(dict(batch, img_feat=other["img_feat"]))).sequence_output
    assert not torch.allclose(full[:, :lt], changed[:, :lt])
    # The attention path (attn_layer) applies the same block-diagonal mask.
    probs = model(**model_inputs(batch), attn_layer=0).attention
    assert probs[:, :, :lt, lt:].abs().max() == 0 and probs[:, :, lt:, :lt].abs().max() == 0


def test_fusion_start_itc_features_are_cls_and_region_mean_at_that_depth():
    torch.manual_seed(0)
    model = UniterModel(encoder_config(fusion_start=1)).eval()
    itc = ITC(model, embed_dim=8)
    batch = make_batch([3, 7, 1], [5, 2, 4], seed=1)
    text, image = itc.embed(model, batch)
    seq = model(**model_inputs(batch), depth=1).sequence_output
    lt, mask = batch["input_ids"].shape[1], batch["img_mask"].float()
    mean = (seq[:, lt:] * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(text, F.normalize(itc.text_proj(seq[:, 0]), dim=-1))
    torch.testing.assert_close(image, F.normalize(itc.image_proj(mean), dim=-1))
    # Retrieval's separate unimodal passes give the same embeddings.
    torch.testing.assert_close(itc.embed_texts(model, batch["input_ids"], batch["position_ids"],
                                               batch["txt_mask"]), text, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(itc.embed_images(model, batch["img_feat"], batch["img_pos_feat"],
                                                batch["img_mask"]), image, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- momentum teacher


def test_ema_update_is_the_formula_for_parameters_and_buffers():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    teacher = MomentumTeacher({"net": student}, momentum=0.9)
    assert not any(p.requires_grad for p in teacher.parameters())
    before = {k: v.clone() for k, v in teacher["net"].state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    student.train()(torch.randn(8, 3))  # moves the running mean / var and counts a batch
    teacher.update({"net": student})
    for name, value in teacher["net"].state_dict().items():
        s = student.state_dict()[name]
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.9 * before[name] + 0.1 * s, rtol=1e-6, atol=1e-7, msg=name)
            assert not torch.equal(value, before[name]), name
        else:  # num_batches_tracked is copied
            assert torch.equal(value, s), name
    # momentum 0: the teacher is the student.
    ema_update_(teacher["net"], student, 0.0)
    for name, value in teacher["net"].state_dict().items():
        assert torch.equal(value, student.state_dict()[name])
    with pytest.raises(ValueError, match="momentum"):
        MomentumTeacher({"net": student}, momentum=1.0)


def test_the_pretrain_model_holds_a_teacher_only_when_an_objective_wants_one():
    def model(**over):
        cfg = PretrainConfig(**over)
        return build_model(encoder_config(), objective_options(cfg, META, 5))

    assert model().teacher is None
    plain_itc = model(tasks={"itc": 1.0})
    assert plain_itc.teacher is None and plain_itc.objectives["itc"].queue is None
    assert not any(k.startswith("objectives.itc.queue") for k in plain_itc.state_dict())
    assert model(tasks={"itc": 1.0}, itc_distill=0.4).teacher is not None
    assert model(tasks={"itc": 1.0, "codebook": 1.0}).teacher is not None  # teacher plans
    assert model(tasks={"itc": 1.0, "codebook": 1.0}, codebook_plans="student").teacher is None
    _, codis = codis_model()
    teacher = codis.teacher
    assert set(teacher.copies) == {"encoder", "text_proj", "image_proj"}
    for name, value in codis.encoder.state_dict().items():
        assert torch.equal(teacher["encoder"].state_dict()[name], value)
    # The optimizer never sees the teacher.
    from vlp.train.optim import OptimConfig, build_optimizer
    optimizer, _ = build_optimizer(codis.encoder, codis.objectives, OptimConfig(), 10)
    optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}


def test_teacher_and_queue_survive_a_checkpoint_and_resume_exactly(tmp_path):
    cfg, model = codis_model()
    train_steps(cfg, model, 1)  # itc and itc_intra enqueue 4 rows each
    state = model.state_dict()
    queue = model.objectives["itc"].queue
    assert int(queue.count) == 6 and 0 <= int(queue.ptr) < 6  # filled and wrapped
    assert any(not torch.equal(state[f"teacher.copies.encoder.{k}"], v)
               for k, v in model.encoder.state_dict().items())
    checkpointing.save(tmp_path, {"model": state, "step": 1}, {"step": 1})
    _, resumed = codis_model(seed=1)  # other weights, another teacher, an empty queue
    resumed.load_state_dict(checkpointing.load_state(tmp_path)["model"])
    for name, value in state.items():
        assert torch.equal(resumed.state_dict()[name], value), name
    # One more step on each gives the same weights, teacher and queue.
    train_steps(cfg, model, 1, seed=7)
    train_steps(cfg, resumed, 1, seed=7)
    for name, value in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


# ---------------------------------------------------------------- feature queues


def test_queue_ring_buffer_wraps_around_and_keeps_the_newest_rows():
    queue = FeatureQueue(5, 2)
    assert int(queue.count) == 0 and not queue.valid().any()

    def rows(start, n):
        ids = torch.arange(start, start + n)
        return ids, torch.stack([ids.float(), -ids.float(), 10 * ids.float(), ids.float() + 0.5], 1)

    queue.push(*rows(0, 3))
    assert queue.ids.tolist()[:3] == [0, 1, 2] and int(queue.ptr) == 3 and int(queue.count) == 3
    assert queue.valid().tolist() == [True, True, True, False, False]
    queue.push(*rows(3, 4))  # 3, 4 at the end, 5, 6 wrap to the front
    assert queue.ids.tolist() == [5, 6, 2, 3, 4] and int(queue.ptr) == 2 and int(queue.count) == 5
    assert queue.features("text").tolist() == [[5, -5], [6, -6], [2, -2], [3, -3], [4, -4]]
    assert queue.features("image")[:, 0].tolist() == [50, 60, 20, 30, 40]
    queue.push(*rows(10, 7))  # more rows than the queue: the last five stay, the oldest overwritten first
    assert sorted(queue.ids.tolist()) == [12, 13, 14, 15, 16] and int(queue.ptr) == (2 + 7) % 5
    assert queue.ids[(int(queue.ptr) - 1) % 5] == 16  # the newest row just before the write position


def test_single_process_gather_is_the_input_and_enqueue_is_push():
    x = torch.randn(3, 4, requires_grad=True)
    gathered = distributed.all_gather_tensor(x)
    assert torch.equal(gathered, x) and not gathered.requires_grad
    a, b = FeatureQueue(4, 2), FeatureQueue(4, 2)
    ids, text, image = torch.tensor([7, 8, 9]), torch.randn(3, 2), torch.randn(3, 2)
    a.enqueue(ids, text=text, image=image)
    b.push(ids, torch.cat([text, image], 1))
    for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match="feature queue holds"):
        a.enqueue(ids, text=text)


ROUNDS = [([3, 1], 0), ([2, 2], 1), ([0, 3], 2)]  # rows per rank in each enqueue


def _rows(rank: int, n: int, round_: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.arange(n) + 100 * rank + 10 * round_
    return ids, ids[:, None].float().repeat(1, 3), -ids[:, None].float().repeat(1, 3)


def _gather_worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        queue = FeatureQueue(6, 3)
        for counts, round_ in ROUNDS:
            ids, text, image = _rows(rank, counts[rank], round_)
            queue.enqueue(ids, text=text, image=image)
        torch.save(queue.state_dict(), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_worker_queues_equal_one_process_with_the_global_batch(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_gather_worker, args=(port, str(tmp_path)), nprocs=2, start_method="spawn")
    single = FeatureQueue(6, 3)
    for counts, round_ in ROUNDS:
        parts = [_rows(rank, counts[rank], round_) for rank in range(2)]  # rank order
        single.enqueue(torch.cat([p[0] for p in parts]), text=torch.cat([p[1] for p in parts]),
                       image=torch.cat([p[2] for p in parts]))
    assert int(single.count) == 6 and int(single.ptr) == (4 + 4 + 3) % 6
    for rank in range(2):
        state = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name, value in single.state_dict().items():
            assert torch.equal(state[name], value), (rank, name)


# ---------------------------------------------------------------- ITC with queues and soft targets


def _ce(logits, targets):
    top = max(logits)
    log_z = top + math.log(sum(math.exp(x - top) for x in logits))
    return -sum(t * (x - log_z) for x, t in zip(logits, targets, strict=True))


def _softmax(xs):
    top = max(xs)
    e = [math.exp(x - top) for x in xs]
    return [v / sum(e) for v in e]


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b, strict=True))


def test_itc_with_queue_and_soft_targets_on_a_hand_computed_case():
    """Two pairs (images a, b), a queue of 3 rows with 1 filled (an image of a), γ = 0.5, α_d = 0.4."""
    torch.manual_seed(0)
    model = UniterModel(encoder_config()).train()
    itc = ITC(model, embed_dim=2, temperature=0.5, queue_size=3, distill=0.4).train()
    s_text, s_image = [[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [0.8, 0.6]]
    t_text, t_image = [[0.8, 0.6], [0.6, 0.8]], [[1.0, 0.0], [0.0, 1.0]]
    q_text, q_image = [0.0, 1.0], [0.6, -0.8]
    keys = ["a", "b"]
    itc.queue.push(key_ids(["a"]), torch.tensor([q_text + q_image]))

    def embed(encoder, batch, text_proj=None, image_proj=None):
        if encoder == "teacher":
            return torch.tensor(t_text), torch.tensor(t_image)
        return torch.tensor(s_text, requires_grad=True), torch.tensor(s_image, requires_grad=True)

    itc.embed = embed
    context = SimpleNamespace(teacher={"encoder": "teacher", "text_proj": None, "image_proj": None},
                              objectives={"itc": itc})
    batch = {"img_keys": keys}
    out = itc(model, batch, context)

    # By hand: candidates are the batch's teacher features then the queue row; positives share the image.
    img_cands, txt_cands = [*t_image, q_image], [*t_text, q_text]
    pos = [[1, 0, 1], [0, 1, 0]]
    onehot = [[p / sum(row) for p in row] for row in pos]

    def direction(queries, teacher_queries, cands):
        total = 0.0
        for i in range(2):
            logits = [_dot(queries[i], c) / 0.5 for c in cands]
            soft = _softmax([_dot(teacher_queries[i], c) / 0.5 for c in cands])
            y = [0.6 * o + 0.4 * s for o, s in zip(onehot[i], soft, strict=True)]
            total += _ce(logits, y)
        return total / 2

    t2i = direction(s_text, t_text, img_cands)
    i2t = direction(s_image, t_image, txt_cands)
    assert float(out["itc_loss"].detach()) == pytest.approx((t2i + i2t) / 2, rel=1e-5)
    # Row 0's top image (t_image[0] · [1, 0]) is a positive, row 1's ([0, 1] · t_image[1]) too; images: row 0
    # [0.6, 0.8] is closest to t_text[1] (b, wrong), row 1 [0.8, 0.6] to t_text[0] (a, wrong).
    assert int(out["itc_correct"]) == 2 and int(out["itc_count"]) == 4
    # The batch's teacher features were enqueued after the loss: rows 1 and 2, the queue now full.
    assert int(itc.queue.count) == 3 and int(itc.queue.ptr) == 0
    assert torch.equal(itc.queue.features("text")[1:], torch.tensor(t_text))
    assert torch.equal(itc.queue.ids[1:], key_ids(keys))

    # Intra-modal terms on the same candidates (now the queue holds the batch twice: rows 1, 2 = a, b).
    itc.queue.push(key_ids(["a", "a", "b"]), torch.tensor([q_text + q_image, *[t + i for t, i in
                                                                              zip(t_text, t_image,
                                                                                  strict=True)]]))
    itc.eval()  # no enqueue: the hand computation sees this queue
    intra = ITCIntra(model)(model, batch, context)
    img_cands, txt_cands = [*t_image, q_image, *t_image], [*t_text, q_text, *t_text]
    pos = [[1, 0, 1, 1, 0], [0, 1, 0, 0, 1]]
    onehot = [[p / sum(row) for p in row] for row in pos]
    t2t = direction(s_text, t_text, txt_cands)
    i2i = direction(s_image, t_image, img_cands)
    assert float(intra["itc_intra_loss"].detach()) == pytest.approx((t2t + i2i) / 2, rel=1e-5)


def test_distilled_loss_masks_unfilled_queue_rows_and_reduces_to_infonce():
    torch.manual_seed(0)
    query, cands = F.normalize(torch.randn(3, 4), dim=1), F.normalize(torch.randn(5, 4), dim=1)
    pos = torch.eye(3, 5, dtype=torch.bool)
    temperature = torch.tensor(0.1)
    valid = torch.tensor([True, True, True, False, False])
    loss, _ = distilled_contrastive_loss(query, cands, pos, valid, temperature)
    expected = F.cross_entropy(query @ cands[:3].T / temperature, torch.arange(3))
    torch.testing.assert_close(loss, expected)
    # Garbage in unfilled rows changes nothing, and the gradient stays finite.
    garbage = cands.clone()
    garbage[3:] = 1e4
    query.requires_grad_(True)
    masked, _ = distilled_contrastive_loss(query, garbage, pos, valid, temperature, query.detach(), 0.4)
    masked.backward()
    assert torch.isfinite(query.grad).all()


def test_itc_temperature_is_learnable_and_clamped():
    torch.manual_seed(0)
    model = UniterModel(encoder_config())
    itc = ITC(model, embed_dim=8, temperature=0.07)
    assert itc.log_temperature.requires_grad
    with torch.no_grad():
        itc.log_temperature.fill_(math.log(10.0))
    assert float(itc.temperature().detach()) == pytest.approx(0.5)
    with torch.no_grad():
        itc.log_temperature.fill_(math.log(1e-6))
    assert float(itc.temperature().detach()) == pytest.approx(1e-3)


# ---------------------------------------------------------------- contrastive ITM negatives


def test_hard_negatives_never_pick_a_positive_and_follow_the_similarity():
    keys = ["a", "a", "b", "c", "d"]
    from vlp.objectives.itc import positives
    pos = positives(keys)
    torch.manual_seed(0)
    sim = torch.randn(5, 5) * 2
    counts = torch.zeros(10, 5)
    for seed in range(2000):
        img, txt, has_img, has_txt = contrastive_negatives(sim, pos, torch.Generator().manual_seed(seed))
        assert has_img.all() and has_txt.all()
        assert not pos[torch.arange(5), img].any() and not pos.T[torch.arange(5), txt].any()
        counts[torch.arange(5), img] += 1
        counts[torch.arange(5, 10), txt] += 1
    expected = torch.cat([sim, sim.T]).masked_fill(torch.cat([pos, pos.T]), float("-inf")).softmax(1)
    torch.testing.assert_close(counts / 2000, expected, atol=0.04, rtol=0)


def test_hard_negatives_at_batch_size_one_and_with_one_image_give_no_negative():
    for keys in (["a"], ["a", "a", "a"]):
        from vlp.objectives.itc import positives
        pos = positives(keys)
        n = len(keys)
        img, txt, has_img, has_txt = contrastive_negatives(torch.zeros(n, n), pos, torch.Generator())
        assert not has_img.any() and not has_txt.any() and img.shape == (n,)


def test_hard_negatives_take_bf16_and_use_one_batched_multinomial(monkeypatch):
    from vlp.objectives.itc import positives
    calls = []
    real = torch.multinomial

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        assert args[0].dtype == torch.float32
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "multinomial", counting)
    pos = positives(["a", "b", "c", "a"])
    sim = (torch.randn(4, 4) * 30).bfloat16()
    img, txt, has_img, has_txt = contrastive_negatives(sim, pos, torch.Generator().manual_seed(0))
    assert calls == [(8, 4)]
    assert has_img.all() and not pos[torch.arange(4), img].any() and not pos.T[torch.arange(4), txt].any()


def test_itm_with_contrastive_negatives_builds_positive_and_hard_negative_pairs():
    cfg, model = codis_model()
    itm = model.objectives["itm"]
    batch = make_batch([3, 5, 4, 2], [4, 2, 3, 5], keys=["a", "b", "a", "c"])
    prepared = itm.prepare(batch, torch.Generator().manual_seed(0))
    assert "itm_targets" not in prepared and isinstance(prepared["itm_seed"], int)
    pairs = itm.contrastive_pairs(model.encoder, prepared, model)
    b = 4
    assert pairs["itm_targets"].tolist() == [1] * b + [0] * (2 * b)
    assert pairs["input_ids"].shape[0] == 3 * b
    # Each negative pair's image key differs from its text's.
    text_keys = [batch["img_keys"][batch["txt_ids"].index(t)] for t in pairs["txt_ids"]]
    assert all((t == i) == bool(y) for t, i, y in zip(text_keys, pairs["img_keys"],
                                                      pairs["itm_targets"].tolist(), strict=True))
    # Seeded by the batch: the same pairs again.
    again = itm.contrastive_pairs(model.encoder, prepared, model)
    assert again["img_keys"] == pairs["img_keys"] and again["txt_ids"] == pairs["txt_ids"]
    out = model("itm", prepared)
    assert int(out["itm_count"]) == 3 * b and torch.isfinite(out["itm_loss"])
    # Batch size 1: the positive pair only; bf16 autocast runs.
    one = itm.prepare(make_batch([3], [4], keys=["a"]), torch.Generator())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        single = model("itm", one)
    assert int(single["itm_count"]) == 1 and torch.isfinite(single["itm_loss"])
    # Validation keeps random in-batch donors (neg_prob), so its accuracy means the same for every source.
    model.eval()
    val = model("itm", prepared)
    assert int(val["itm_count"]) == b
    assert target_count(itm, prepared) == b


# ---------------------------------------------------------------- codebook


def test_ipot_plans_have_the_prescribed_marginals():
    torch.manual_seed(0)
    feats = F.normalize(torch.randn(6, 8), dim=1)
    protos = F.normalize(torch.randn(10, 8), dim=1)
    plan = transport_plan(feats, protos)
    assert plan.shape == (6, 10) and (plan >= 0).all()
    # IPOT ends on the column scaling: columns exact, rows within a fraction of a percent after 50 steps.
    torch.testing.assert_close(plan.sum(0), torch.full((10,), 1 / 10), atol=1e-6, rtol=0)
    torch.testing.assert_close(plan.sum(1), torch.full((6,), 1 / 6), atol=0, rtol=3e-3)
    assert float(plan.sum()) == pytest.approx(1.0, abs=1e-5)


def test_one_ot_step_moves_the_prototypes_toward_the_features():
    torch.manual_seed(0)
    feats = F.normalize(torch.randn(6, 8), dim=1)
    raw = torch.randn(4, 8, requires_grad=True)
    protos = F.normalize(raw, dim=1)
    plan = transport_plan(feats, protos)
    loss = ot_loss(feats, protos, plan)
    loss.backward()
    assert raw.grad is not None
    with torch.no_grad():
        stepped = F.normalize(raw - 0.5 * raw.grad, dim=1)
        # The plan-weighted mean feature of each prototype: the step turns every prototype toward it.
        target = F.normalize(plan.T @ feats, dim=1)
        before = (F.normalize(raw, dim=1) * target).sum(1)
        after = (stepped * target).sum(1)
    assert (after > before).all()
    assert float(ot_loss(feats, stepped, plan)) < float(loss.detach())
    # Algorithm 1's sign (<T, Z·C>) would move them away: its gradient is the opposite of ours.
    raw.grad = None
    (plan * (feats @ F.normalize(raw, dim=1).T)).sum().backward()
    flipped = F.normalize(raw.detach() - 0.5 * raw.grad, dim=1)
    assert ((flipped * target).sum(1) < before).all()
    # The OT loss does not reach the features: their side is detached.
    feats.requires_grad_(True)
    raw.grad = None
    ot_loss(feats, F.normalize(raw, dim=1), plan).backward()
    assert feats.grad is None and raw.grad is not None


def test_cross_modal_plan_supervision_on_a_hand_built_case():
    """Four prototypes e_0..e_3; image i sits on prototype (i + 1) mod 4, text i on prototype i. With a
    small beta the plans are (nearly) the assignments / 4, so the text of pair i is taught prototype
    (i + 1) mod 4 (its image's) with cross targets and prototype i with same targets."""
    protos = torch.eye(4)
    text = torch.eye(4)
    image = torch.eye(4).roll(1, dims=1)
    temperature = torch.tensor(0.5)
    image_plan = transport_plan(image, protos, beta=0.05, iterations=100)
    torch.testing.assert_close(image_plan * 4, image, atol=1e-3, rtol=0)

    def expected(features, assigned):
        logp = F.log_softmax(features @ protos.T / temperature, dim=1)
        return -logp[torch.arange(4), assigned].mean()

    own, others = torch.arange(4), (torch.arange(4) + 1) % 4
    cross = codebook_losses(text, image, text, image, protos, temperature, beta=0.05, iterations=100)
    torch.testing.assert_close(cross["codebook_pred_loss"], expected(text, others) + expected(image, own),
                               atol=1e-3, rtol=0)
    same = codebook_losses(text, image, text, image, protos, temperature, targets="same", beta=0.05,
                           iterations=100)
    torch.testing.assert_close(same["codebook_pred_loss"], expected(text, own) + expected(image, others),
                               atol=1e-3, rtol=0)
    # The features sit on their prototypes: the OT cost is (nearly) 0 for both modalities.
    assert float(cross["codebook_ot_loss"]) < 1e-3


def test_codebook_plans_come_from_the_teacher_or_the_student():
    for plans in ("teacher", "student"):
        cfg, model = codis_model(codebook_plans=plans)
        codebook = model.objectives["codebook"]
        assert codebook.wants_teacher == (plans == "teacher")
        with torch.no_grad():  # a teacher far from the student: the plans tell which one they came from
            for p in model.teacher["encoder"].parameters():
                p.add_(torch.randn_like(p))
        batch = make_batch([3, 5, 4, 2], [4, 2, 3, 5], keys=["a", "b", "a", "c"])
        out = model("codebook", batch)
        itc = model.objectives["itc"]
        text, image = itc.embed(model.encoder, batch)
        source = itc.teacher_embed(model.encoder, batch, model) if plans == "teacher" else (text, image)
        protos = F.normalize(codebook.prototypes, dim=-1)
        expected = codebook_losses(text, image, *source, protos, itc.temperature())
        for key in ("codebook_ot_loss", "codebook_pred_loss"):
            torch.testing.assert_close(out[key], expected[key])
        sum(out.values()).backward()
        assert codebook.prototypes.grad.abs().sum() > 0 and itc.text_proj.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- config and registry


def test_registry_config_and_options():
    assert {"itc", "itc_intra", "codebook"} <= REGISTRY.keys()
    assert REGISTRY["itc_intra"] is ITCIntra and REGISTRY["codebook"] is Codebook
    with pytest.raises(ValueError, match="add itc to tasks"):
        PretrainConfig(tasks={"mlm": 1.0, "codebook": 1.0})
    with pytest.raises(ValueError, match="add itc to tasks"):
        PretrainConfig(tasks={"itm": 1.0}, itm_negatives="contrastive")
    with pytest.raises(ValueError, match="itc_intra contrasts against the momentum teacher"):
        PretrainConfig(tasks={"itc": 1.0, "itc_intra": 1.0})
    with pytest.raises(ValueError, match="itc_rerank"):
        PretrainConfig(tasks={"itm": 1.0}, validation={"retrieval_modes": ["itc_rerank"]})
    cfg = PretrainConfig(tasks=CODIS, itc_queue=128, itc_distill=0.4, itm_negatives="contrastive",
                         codebook_size=32, codebook_weight=2.0, codebook_plans="student",
                         codebook_targets="same", teacher_momentum=0.99)
    options = objective_options(cfg, META, 5)
    assert options["itc"] == {"embed_dim": 256, "temperature": 0.07, "queue_size": 128, "distill": 0.4,
                              "momentum": 0.99}
    assert options["codebook"] == {"size": 32, "embed_dim": 256, "plans": "student", "targets": "same",
                                   "beta": 0.5, "iterations": 50}
    assert options["itm"]["negatives"] == "contrastive" and options["itc_intra"] == {}
    assert loss_weights(cfg)["codebook_ot_loss"] == 2.0 == loss_weights(cfg)["codebook_pred_loss"]
    model = build_model(encoder_config(), options)
    assert model.teacher.momentum == 0.99 and model.objectives["itc"].queue.size == 128


def test_a_loaded_pretrained_model_has_no_teacher(tmp_path):
    from vlp.train.checkpoints import load_pretrained, save_pretrained
    cfg, model = codis_model()
    train_steps(cfg, model, 1)
    options = objective_options(cfg, META, 5)
    save_pretrained(tmp_path, model, options)
    loaded = load_pretrained(tmp_path)
    assert loaded.teacher is None
    assert torch.equal(loaded.objectives["itc"].queue.text, model.objectives["itc"].queue.text)
    # Its objectives still run (the student's features where the teacher's were).
    batch = make_batch([3, 5], [4, 2], keys=["a", "b"])
    loaded.eval()
    for task in ("itc", "itc_intra", "codebook"):
        out = loaded(task, batch)
        assert all(torch.isfinite(v).all() for k, v in out.items() if k.endswith("_loss")), task


# ---------------------------------------------------------------- zero-shot retrieval: ITC shortlist


def test_zero_shot_retrieval_itc_shortlist_reranked_by_itm():
    from vlp.data.pretrain_dataset import ImageTextIndex
    from vlp.eval.retrieval import recall_at_k, shortlist_rerank
    from vlp.train.validate import zero_shot_retrieval

    torch.manual_seed(0)
    n_img, n_txt = 6, 12
    txt2img = torch.arange(n_txt) % n_img
    itm = torch.randn(n_img, n_txt)
    itm[txt2img, torch.arange(n_txt)] += 2.0  # the ITM head mostly right
    sim = torch.randn(n_img, n_txt)  # a weak shortlist

    class Scorer:
        model = nn.Linear(1, 1)
        index = ImageTextIndex(tuple(f"i{m}" for m in range(n_img)), tuple(f"t{t}" for t in range(n_txt)),
                               txt2img)
        scored = 0

        def scores(self, images, txt_idx):
            self.scored += len(images) * txt_idx.numel()
            return itm[torch.as_tensor(list(images))][:, txt_idx]

        def itc_similarity(self):
            return sim

    scorer = Scorer()
    full = zero_shot_retrieval(scorer, (2, 5))
    assert full == recall_at_k(itm, txt2img) and scorer.scored == n_img * n_txt
    scorer.scored = 0
    both = zero_shot_retrieval(scorer, (2, 5), ("full", "itc_rerank"), shortlist_k=2)
    reranked = shortlist_rerank(sim, lambda i, t: itm[i][:, t], 2)
    assert {k: both[k] for k in full} == full
    assert {k[len("itc_rerank_"):]: v for k, v in both.items() if k.startswith("itc_rerank_")} == recall_at_k(
        reranked, txt2img)
    assert {k[len("itc_"):]: v for k, v in both.items() if k.startswith("itc_") and "rerank" not in k} == \
        recall_at_k(sim, txt2img)
    assert scorer.scored < 2 * n_img * n_txt  # the rerank scored only the shortlists
    assert scorer.model.training  # mode restored


def test_the_codis_config_and_its_rows_load():
    from pipeline.config import load_config

    path = Path(__file__).resolve().parents[1] / "configs" / "codis.yaml"
    cfg = load_config(path)
    pre = cfg.pretrain
    assert {"itc", "itc_intra", "codebook"} <= pre.tasks.keys() and pre.itm_negatives == "contrastive"
    assert 0 < pre.itc_queue < 2911 and pre.itc_distill == 0.4 and pre.codebook_plans == "teacher"
    rows = {
        "a": ["pretrain.tasks={mlm: 2, mrfr: 1, mrc_kl: 1, itm: 2, itc: 2}"],
        "b": ["pretrain.tasks={mlm: 2, mrfr: 1, mrc_kl: 1, itm: 2, itc: 2, itc_intra: 1}"],
        "b + codebook (student)": ["pretrain.codebook_plans=student"],
        "a + codebook": ["pretrain.tasks={mlm: 2, mrfr: 1, mrc_kl: 1, itm: 2, itc: 2, codebook: 1}"],
        "K small, 2x": ["pretrain.codebook_size=16", "pretrain.codebook_weight=2.0"],
    }
    for name, overrides in rows.items():
        row = load_config(path, overrides).pretrain
        options = objective_options(row, META, 5)
        assert set(options) == set(row.tasks), name
        build_model(encoder_config(), options)
