import math
from types import SimpleNamespace

import numpy as np
import ot
import pytest
import torch
import torch.nn.functional as F

from vlp.model.config import UniterConfig
from vlp.model.uniter import UniterModel
from vlp.objectives import (
    ITC,
    ITM,
    MLM,
    MRC,
    MRCKL,
    MRFR,
    REGISTRY,
    VTA,
    Codebook,
    ITCIntra,
    LAViTeR,
    ObjectWordAlignment,
)
from vlp.objectives.itc import contrastive_loss, positives
from vlp.objectives.itm import itm_loss, sample_negatives, word_positions, wra_loss
from vlp.objectives.masking import IGNORE_INDEX, TokenMasking, mask_regions, mask_tokens
from vlp.objectives.mlm import mlm_loss
from vlp.objectives.mrc import mrc_kl_loss, mrc_loss
from vlp.objectives.mrfr import mrfr_loss

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIAL = (PAD, UNK, CLS, SEP, MASK)
VOCAB = 60
IMG_DIM = 12
LABEL_DIM = 5
TOKEN_OPTIONS = {"mask_id": MASK, "special_ids": SPECIAL, "vocab_range": (5, VOCAB)}


def _model() -> UniterModel:
    torch.manual_seed(0)
    config = UniterConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=64,
        img_dim=IMG_DIM,
    )
    return UniterModel(config).eval()


def _batch(
    text_lens: list[int], region_counts: list[int], keys: list[str] | None = None, seed: int = 0
) -> dict:
    """A collated batch: [CLS] words [SEP] padded with 0, regions padded with zeros at the end."""
    gen = torch.Generator().manual_seed(seed)
    size, text_len, regions = len(text_lens), max(text_lens) + 2, max(region_counts)
    input_ids = torch.zeros(size, text_len, dtype=torch.long)
    img_mask = torch.zeros(size, regions, dtype=torch.bool)
    for i, (words, boxes) in enumerate(zip(text_lens, region_counts, strict=True)):
        input_ids[i, : words + 2] = torch.cat(
            [torch.tensor([CLS]), torch.randint(5, VOCAB, (words,), generator=gen), torch.tensor([SEP])]
        )
        img_mask[i, :boxes] = True
    real = img_mask.unsqueeze(-1)
    return {
        "input_ids": input_ids,
        "position_ids": torch.arange(text_len).expand(size, text_len).clone(),
        "txt_mask": input_ids != PAD,
        "img_feat": torch.randn(size, regions, IMG_DIM, generator=gen) * real,
        "img_pos_feat": torch.rand(size, regions, 7, generator=gen) * real,
        "img_mask": img_mask,
        "soft_labels": torch.softmax(torch.randn(size, regions, LABEL_DIM, generator=gen) * 2, -1) * real,
        "img_keys": keys or [f"coco:{i}" for i in range(size)],
        "txt_ids": [f"t{i}" for i in range(size)],
    }


def _sequence(model: UniterModel, batch: dict) -> torch.Tensor:
    fields = ("input_ids", "position_ids", "txt_mask", "img_feat", "img_pos_feat", "img_mask", "img_masked")
    return model(**{k: batch[k] for k in fields if k in batch}).sequence_output


# ---------------------------------------------------------------- losses on hand-computed cases


def test_mlm_loss_hand_case():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    out = mlm_loss(logits, torch.tensor([0, 2]))
    # row 0: log(e^2 + 2) - 2 = 0.2395448; row 1: log(e + 2) = 1.5514448
    assert out["mlm_loss"].item() == pytest.approx((0.2395448 + 1.5514448) / 2, abs=1e-6)
    assert (out["mlm_correct"].item(), out["mlm_count"].item()) == (1, 2)


def test_mlm_loss_without_targets_is_zero():
    out = mlm_loss(torch.zeros(0, 7, requires_grad=True), torch.zeros(0, dtype=torch.long))
    assert out["mlm_loss"].item() == 0.0 and out["mlm_count"].item() == 0


def test_mrfr_loss_hand_case():
    out = mrfr_loss(torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    assert out["mrfr_loss"].item() == pytest.approx((0 + 4 + 1 + 1) / 4)


def test_mrc_loss_excludes_background_from_the_target():
    soft = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])  # targets: class 1 (background 0.7 ignored), 2
    logits = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    out = mrc_loss(logits, soft)
    # row 0: log(2 + e) - 1 = 0.5514448; row 1: log(e + 2) - 0 = 1.5514448
    assert out["mrc_loss"].item() == pytest.approx((0.5514448 + 1.5514448) / 2, abs=1e-6)
    # predictions over classes 1..2: row 0 -> 1 (right), row 1 -> tie, first = 1 (wrong)
    assert (out["mrc_correct"].item(), out["mrc_count"].item()) == (1, 2)


def test_mrc_kl_loss_hand_case():
    soft = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    logits = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, math.log(2.0)]])  # probs 1/3 each; 1/4, 1/4, 1/2
    out = mrc_kl_loss(logits, soft)
    # KL row 0 = 2 * 0.5 * log(0.5 / (1/3)) = log 1.5; row 1 = 1 * log(1 / 0.25) = log 4
    assert out["mrc_kl_loss"].item() == pytest.approx((math.log(1.5) + math.log(4.0)) / 2, abs=1e-6)
    assert (out["mrc_kl_correct"].item(), out["mrc_kl_count"].item()) == (1, 2)
    # The official code's mean over regions x classes: the same / (C+1) = / 3.
    element = mrc_kl_loss(logits, soft, "element")["mrc_kl_loss"].item()
    assert element == pytest.approx((math.log(1.5) + math.log(4.0)) / 2 / 3, abs=1e-6)


def test_itm_and_wra_loss_hand_case():
    logits = torch.tensor([[0.0, 2.0], [1.0, 0.0], [0.0, 0.0]])
    out = itm_loss(logits, torch.tensor([1, 1, 0]))
    # rows: log(1 + e^-2) = 0.1269280, log(1 + e) = 1.3132617, log 2 = 0.6931472
    assert out["itm_loss"].item() == pytest.approx((0.1269280 + 1.3132617 + 0.6931472) / 3, abs=1e-6)
    assert (out["itm_correct"].item(), out["itm_count"].item()) == (2, 3)
    distance = torch.tensor([0.2, 0.5, 0.9, 0.4])
    assert wra_loss(distance, torch.tensor([1, 0, 1, 0])).item() == pytest.approx((0.2 + 0.9 - 0.5 - 0.4) / 4)


def test_word_positions_drop_cls_sep_and_padding():
    txt_mask = torch.tensor([[True, True, True, True, False], [True, True, True, True, True]])
    expected = torch.tensor([[False, True, True, False, False], [False, True, True, True, False]])
    assert torch.equal(word_positions(txt_mask), expected)
    # The official code aligns every real text token, [CLS] and [SEP] included.
    assert torch.equal(word_positions(txt_mask, cls_sep=True), txt_mask)


# ---------------------------------------------------------------- masking


def _long_text_batch(rows: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 40, (rows,), generator=gen).tolist()
    return _batch(lengths, [1] * rows, seed=seed), torch.tensor(lengths)


def test_token_masking_statistics():
    batch, words = _long_text_batch(3000, seed=1)
    spec = TokenMasking.build(MASK, SPECIAL, (5, VOCAB))
    ids, txt_mask = batch["input_ids"], batch["txt_mask"]
    corrupted, labels = mask_tokens(ids, txt_mask, spec, torch.Generator().manual_seed(7))
    selected = labels != IGNORE_INDEX
    candidates = txt_mask & (ids != CLS) & (ids != SEP)

    # Specials and padding are never selected nor changed; selected positions keep the original as label.
    assert not (selected & ~candidates).any()
    assert torch.equal(corrupted[~selected], ids[~selected])
    assert torch.equal(labels[selected], ids[selected])
    # Each example with a word has at least one target; Bernoulli(0.15) plus the one forced when none drawn.
    per_row = selected.sum(1)
    assert (per_row[words > 0] >= 1).all() and (per_row[words == 0] == 0).all()
    expected = sum(0.15 * n + 0.85**n for n in words.tolist() if n > 0)
    assert abs(per_row.sum().item() - expected) < 4 * math.sqrt(expected)

    became_mask = (corrupted[selected] == MASK).float().mean().item()
    kept = (corrupted[selected] == ids[selected]).float().mean().item()
    randomised = 1 - became_mask - kept
    assert became_mask == pytest.approx(0.8, abs=0.015)
    # A random replacement equals the original with probability 1/55.
    assert randomised == pytest.approx(0.1 * 54 / 55, abs=0.01)
    assert kept == pytest.approx(0.1 + 0.1 / 55, abs=0.01)
    replaced = corrupted[selected & (corrupted != MASK)]
    assert ((replaced >= 5) & (replaced < VOCAB)).all()


def test_region_masking_statistics():
    gen = torch.Generator().manual_seed(3)
    counts = torch.randint(0, 60, (3000,), generator=gen)
    img_mask = torch.arange(60).unsqueeze(0) < counts.unsqueeze(1)
    masked = mask_regions(img_mask, 0.15, torch.Generator().manual_seed(5))
    assert not (masked & ~img_mask).any()
    per_row = masked.sum(1)
    assert (per_row[counts > 0] >= 1).all() and (per_row[counts == 0] == 0).all()
    expected = sum(0.15 * n + 0.85**n for n in counts.tolist() if n > 0)
    assert abs(per_row.sum().item() - expected) < 4 * math.sqrt(expected)


def test_masking_is_determined_by_the_generator():
    model = _model()
    mlm = MLM(model, **TOKEN_OPTIONS)
    batch = _batch([9, 14, 5], [6, 8, 3])
    first = mlm.prepare(batch, torch.Generator().manual_seed(11))
    again = mlm.prepare(batch, torch.Generator().manual_seed(11))
    other = mlm.prepare(batch, torch.Generator().manual_seed(12))
    assert torch.equal(first["input_ids"], again["input_ids"]) and torch.equal(
        first["txt_labels"], again["txt_labels"]
    )
    assert not torch.equal(first["txt_labels"], other["txt_labels"])
    assert batch["input_ids"] is not first["input_ids"] and "txt_labels" not in batch  # input batch untouched


def test_conditional_masking_leaves_the_other_modality_intact():
    model = _model()
    batch = _batch([9, 14, 5, 2], [6, 8, 3, 10])
    gen = torch.Generator().manual_seed(0)
    mlm = MLM(model, **TOKEN_OPTIONS).prepare(batch, gen)
    assert (mlm["txt_labels"] != IGNORE_INDEX).sum(1).min().item() >= 1
    assert not mlm["img_masked"].any()
    mrm = MRFR(model).prepare(batch, gen)
    assert torch.equal(mrm["input_ids"], batch["input_ids"])
    assert (mrm["txt_labels"] == IGNORE_INDEX).all()
    assert mrm["img_masked"].sum(1).min().item() >= 1


def test_joint_masking_masks_both_modalities_in_the_same_example():
    model = _model()
    batch = _batch([9, 14, 5, 2], [6, 8, 3, 10])
    gen = torch.Generator().manual_seed(0)
    for objective in (
        MLM(model, masking="joint", **TOKEN_OPTIONS),
        MRFR(model, masking="joint", **TOKEN_OPTIONS),
    ):
        out = objective.prepare(batch, gen)
        assert (out["txt_labels"] != IGNORE_INDEX).sum(1).min().item() >= 1
        assert out["img_masked"].sum(1).min().item() >= 1
        assert not torch.equal(out["input_ids"], batch["input_ids"])


# ---------------------------------------------------------------- objectives against the real encoder


def test_mlm_forward_matches_a_plain_computation_with_the_tied_decoder():
    model = _model()
    mlm = MLM(model, **TOKEN_OPTIONS)
    # The decoder weight is the encoder's word embedding: the head owns only its transform and bias.
    assert sorted(mlm.state_dict()) == [
        "bias",
        "transform.0.bias",
        "transform.0.weight",
        "transform.2.bias",
        "transform.2.weight",
    ]
    with torch.no_grad():
        mlm.bias.uniform_(-1, 1)
    batch = mlm.prepare(_batch([9, 14, 5], [6, 8, 3]), torch.Generator().manual_seed(1))
    out = mlm(model, batch)

    labels = batch["txt_labels"]
    hidden = _sequence(model, batch)[:, : labels.size(1)][labels != IGNORE_INDEX]
    logits = mlm.transform(hidden) @ model.embeddings.word_embeddings.weight.T + mlm.bias
    targets = labels[labels != IGNORE_INDEX]
    expected = -torch.log_softmax(logits, -1)[torch.arange(len(targets)), targets].mean()
    assert out["mlm_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["mlm_count"].item() == len(targets)
    assert out["mlm_correct"].item() == (logits.argmax(-1) == targets).sum().item()


def test_mrfr_regresses_the_unmasked_input_feature_through_the_tied_projection():
    model = _model()
    mrfr = MRFR(model, mask_prob=1.0)  # every region masked: the embedder sees no feature at all
    batch = mrfr.prepare(_batch([4, 6], [5, 3]), torch.Generator().manual_seed(2))
    assert torch.equal(batch["img_masked"], batch["img_mask"])
    out = mrfr(model, batch)

    hidden = mrfr.transform(_sequence(model, batch)[:, batch["input_ids"].size(1) :][batch["img_masked"]])
    predicted = hidden @ model.img_embeddings.img_linear.weight + mrfr.bias
    target = batch["img_feat"][batch["img_masked"]]
    assert out["mrfr_loss"].item() == pytest.approx(((predicted - target) ** 2).mean().item(), rel=1e-5)
    # With all features zeroed, img_linear.weight gets gradient only through the tied output projection.
    out["mrfr_loss"].backward()
    assert model.img_embeddings.img_linear.weight.grad.abs().sum().item() > 0


@pytest.mark.parametrize("cls", [MRC, MRCKL])
def test_region_classifiers_match_a_plain_computation(cls):
    model = _model()
    objective = cls(model, label_dim=LABEL_DIM)
    batch = objective.prepare(_batch([4, 6, 3], [9, 3, 12]), torch.Generator().manual_seed(3))
    out = objective(model, batch)

    masked = batch["img_masked"]
    logits = objective.head(_sequence(model, batch)[:, batch["input_ids"].size(1) :][masked])
    soft = batch["soft_labels"][masked]
    log_probs = torch.log_softmax(logits, -1)
    if cls is MRC:
        targets = soft[:, 1:].argmax(-1) + 1
        expected = -log_probs[torch.arange(len(targets)), targets].mean()
        name = "mrc"
    else:
        expected = (soft * (soft.log() - log_probs)).sum(-1).mean()
        name = "mrc_kl"
        element = cls(model, label_dim=LABEL_DIM, kl_norm="element")
        element.head.load_state_dict(objective.head.state_dict())
        by_element = element(model, batch)["mrc_kl_loss"].item()
        assert by_element == pytest.approx(expected.item() / LABEL_DIM, rel=1e-5)
    assert out[f"{name}_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out[f"{name}_count"].item() == masked.sum().item()


def test_itm_and_wra_match_a_plain_computation_with_exact_ot():
    model = _model()
    itm = ITM(model)
    keys = [f"coco:{i % 4}" for i in range(8)]
    batch = itm.prepare(
        _batch([5, 9, 3, 7, 6, 4, 8, 2], [6, 10, 4, 8, 7, 5, 9, 3], keys), torch.Generator().manual_seed(4)
    )
    assert 0 < batch["itm_targets"].sum().item() < 8
    out = itm(model, batch)

    sequence = _sequence(model, batch)
    logits = itm.head(torch.tanh(model.pooler(sequence[:, 0])))
    assert out["itm_loss"].item() == pytest.approx(
        F.cross_entropy(logits, batch["itm_targets"]).item(), rel=1e-5
    )

    text_len = batch["input_ids"].size(1)
    distances = []
    for i in range(8):
        words = sequence[i, 1 : batch["txt_mask"][i].sum() - 1]
        regions = sequence[i, text_len:][batch["img_mask"][i]]
        cost = 1 - F.normalize(words, dim=-1) @ F.normalize(regions, dim=-1).T
        n, m = cost.shape
        distances.append(ot.emd2(np.full(n, 1 / n), np.full(m, 1 / m), cost.detach().double().numpy()))
    signs = batch["itm_targets"].double() * 2 - 1
    expected = (signs * torch.tensor(distances)).sum().item() / 8
    assert out["wra_loss"].item() == pytest.approx(expected, abs=0.01 * sum(distances) / 8)


def test_itm_without_wra_returns_only_itm():
    model = _model()
    itm = ITM(model, wra=False)
    out = itm(model, itm.prepare(_batch([5, 9], [6, 4]), torch.Generator().manual_seed(0)))
    assert set(out) == {"itm_loss", "itm_correct", "itm_count"}


def test_itm_negatives_never_share_the_image_key_and_are_about_half():
    keys = [f"coco:{i // 3}" for i in range(60)]  # three captions per image
    gen = torch.Generator().manual_seed(0)
    key_ids = torch.tensor([i // 3 for i in range(60)])
    negatives = 0
    for _ in range(300):
        source, targets = sample_negatives(keys, 0.5, gen)
        negative = targets == 0
        assert torch.equal(source[~negative], torch.arange(60)[~negative])
        assert (key_ids[source[negative]] != key_ids[negative]).all()
        negatives += negative.sum().item()
    assert negatives / (300 * 60) == pytest.approx(0.5, abs=0.01)


def test_itm_prepare_moves_every_image_field_together():
    model = _model()
    batch = _batch([5, 9, 3, 7], [6, 10, 4, 8], keys=["vg:1", "vg:2", "vg:1", "cc:train:0"])
    out = ITM(model, neg_prob=1.0).prepare(batch, torch.Generator().manual_seed(5))
    assert (out["itm_targets"] == 0).all()
    for i, key in enumerate(out["img_keys"]):
        j = next(j for j in range(4) if torch.equal(batch["img_feat"][j], out["img_feat"][i]))
        assert key == batch["img_keys"][j] != batch["img_keys"][i]
        for field in ("img_pos_feat", "img_mask", "soft_labels"):
            assert torch.equal(out[field][i], batch[field][j])
    assert torch.equal(out["input_ids"], batch["input_ids"])


def test_itm_batch_of_one_image_has_no_negatives():
    source, targets = sample_negatives(["coco:1"] * 5, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(source, torch.arange(5)) and (targets == 1).all()


# ---------------------------------------------------------------- registry, options, mixed precision


def test_registry_and_requirements():
    assert REGISTRY == {"mlm": MLM, "mrfr": MRFR, "mrc": MRC, "mrc_kl": MRCKL, "itm": ITM, "itc": ITC,
                        "itc_intra": ITCIntra, "codebook": Codebook, "vta": VTA, "laviter": LAViTeR,
                        "owa": ObjectWordAlignment}
    assert {name: cls.requires for name, cls in REGISTRY.items()} == {
        "mlm": (),
        "mrfr": (),
        "mrc": ("soft_labels",),
        "mrc_kl": ("soft_labels",),
        "itm": (),
        "itc": (),
        "itc_intra": (),
        "codebook": (),
        "vta": (),
        "laviter": (),
        "owa": (),
    }


def test_bad_options_fail_at_construction():
    model = _model()
    with pytest.raises(ValueError, match="joint masking corrupts text too and needs mask_id"):
        MRFR(model, masking="joint")
    with pytest.raises(ValueError, match="masking must be one of"):
        MLM(model, masking="both", **TOKEN_OPTIONS)
    with pytest.raises(ValueError, match="no non-special token"):
        MLM(model, mask_id=MASK, special_ids=SPECIAL, vocab_range=(0, 5))
    with pytest.raises(ValueError, match="wra_beta"):
        ITM(model, wra_beta=0.0)
    mrc = MRC(model, label_dim=LABEL_DIM + 1)
    batch = mrc.prepare(_batch([3], [4]), torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="built for 6 label classes but the batch's soft_labels have 5"):
        mrc(model, batch)


def test_every_objective_trains_under_bf16_autocast():
    model = _model().train()
    options = {"mlm": TOKEN_OPTIONS, "mrc": {"label_dim": LABEL_DIM}, "mrc_kl": {"label_dim": LABEL_DIM},
               "laviter": {"cls_id": CLS, "sep_id": SEP, "caption_max_len": 16}}
    batch = _batch([5, 9, 3, 7], [6, 10, 4, 8], keys=["a", "b", "c", "d"])
    # itc_intra and codebook build on an itc task with a queue (vlp.objectives.itc.core); no teacher here.
    context = SimpleNamespace(objectives={"itc": ITC(model, queue_size=4, distill=0.4)}, teacher=None)
    for name, cls in REGISTRY.items():
        objective = cls(model, **options.get(name, {}))
        prepared = objective.prepare(batch, torch.Generator().manual_seed(0))
        if name == "owa":  # alignment batches carry each annotated token's target over the regions
            targets = torch.rand(*prepared["input_ids"].shape, prepared["img_mask"].size(1))
            first_tokens = (torch.arange(targets.size(1)) < 3)[None, :, None]
            targets = targets * prepared["img_mask"][:, None, :] * first_tokens
            prepared = {**prepared, "align_targets": targets / targets.sum(-1, keepdim=True).clamp_min(1e-9)}
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if getattr(objective, "uses_context", False):
                out = objective(model, prepared, context=context)
            else:
                out = objective(model, prepared)
        loss = sum(value for key, value in out.items() if key.endswith("_loss"))
        assert torch.isfinite(loss), name
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), name


def test_itc_loss_hand_case_with_two_captions_of_one_image():
    # Rows are captions, columns their images; captions 0 and 1 describe the same image.
    pos = positives(["coco:1", "coco:1", "coco:2"])
    assert pos.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 3.0]])

    def ce(row, targets):
        total = sum(math.exp(x) for x in row)
        return -sum(t * math.log(math.exp(row[j]) / total) for j, t in enumerate(targets))

    t2i = (ce([2, 1, 0], [.5, .5, 0]) + ce([0, 0, 0], [.5, .5, 0]) + ce([1, 0, 3], [0, 0, 1])) / 3
    i2t = (ce([2, 0, 1], [.5, .5, 0]) + ce([1, 0, 0], [.5, .5, 0]) + ce([0, 0, 3], [0, 0, 1])) / 3
    loss, hits = contrastive_loss(logits, pos)
    assert float(loss) == pytest.approx((t2i + i2t) / 2, rel=1e-6)
    assert int(hits) == 6  # every row's and every column's top entry is a positive


def test_itc_pulls_captions_toward_their_images():
    model = _model().train()
    itc = ITC(model, embed_dim=8, temperature=0.1)
    batch = itc.prepare(_batch([3, 5, 4, 2], [2, 3, 1, 4], seed=5), torch.Generator())
    optimizer = torch.optim.Adam([*model.parameters(), *itc.parameters()], lr=1e-2)
    losses = []
    for _ in range(60):
        out = itc(model, batch)
        assert out["itc_count"] == 8
        optimizer.zero_grad()
        out["itc_loss"].backward()
        optimizer.step()
        losses.append(float(out["itc_loss"]))
    assert losses[-1] < 0.25 * losses[0] and int(itc(model, batch)["itc_correct"]) == 8
    with pytest.raises(ValueError, match="temperature"):
        ITC(model, temperature=2.0)
