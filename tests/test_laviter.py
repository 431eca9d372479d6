"""LAViTeR in region space: DAMSM matching losses, the captioner, the region generator and its discriminator,
the joint objective and its separate adversarial step (vlp/objectives/{damsm,captioner,tim,laviter}.py,
vlp/train/adversarial.py)."""

import math

import pytest
import torch
import torch.nn.functional as F
from test_objectives import CLS, IMG_DIM, PAD, SEP, _batch, _model

from vlp.objectives import REGISTRY
from vlp.objectives.captioner import (
    Captioner,
    beam_search,
    caption_loss,
    fake_captions,
    greedy_decode,
    teacher_forcing,
)
from vlp.objectives.damsm import VTA, matching_losses, sentence_scores, word_region_scores
from vlp.objectives.itc import positives
from vlp.objectives.laviter import PAPER_LAMBDAS, LAViTeR, check_lambdas
from vlp.objectives.laviter import loss_weights as laviter_weights
from vlp.objectives.tim import (
    RegionGenerator,
    SetDiscriminator,
    boxes_7d,
    discriminator_loss,
    generator_loss,
    kl_loss,
)
from vlp.train.adversarial import adversaries, adversary_parameters, build_adversary_optimizer
from vlp.train.optim import OptimConfig, build_optimizer
from vlp.train.pretrain_model import ObjectivesConfig, PretrainModel, loss_weights, objective_options

G1, G2, G3 = 4.0, 5.0, 10.0
ROOT2 = math.sqrt(2.0)


def _ce(logits: list[float], target: int) -> float:
    top = max(logits)
    return -(logits[target] - top - math.log(sum(math.exp(v - top) for v in logits)))


# ---------------------------------------------------------------- DAMSM on hand-computed cases


def _one_word_case():
    """Caption 0: the word (1, 0), then a padded word; caption 1: the word (0, 1). Image 0: the region (2, 0),
    then a padded region (0, 100) that would dominate if it took part; image 1: the regions (1, 0), (0, 1)."""
    words = torch.tensor([[[1.0, 0.0], [5.0, 5.0]], [[0.0, 1.0], [0.0, 0.0]]])
    word_mask = torch.tensor([[True, False], [True, False]])
    regions = torch.tensor([[[2.0, 0.0], [0.0, 100.0]], [[1.0, 0.0], [0.0, 1.0]]])
    region_mask = torch.tensor([[True, False], [True, True]])
    return words, word_mask, regions, region_mask


def test_damsm_word_scores_and_losses_on_a_one_word_case_with_padding():
    # One word: its softmax over words is 1 at every region, so α is uniform over the real regions and each
    # word's context is the mean real region: (2, 0) for image 0, (0.5, 0.5) for image 1. R = γ2 cos.
    words, word_mask, regions, region_mask = _one_word_case()
    scores = word_region_scores(words, word_mask, regions, region_mask, G1, G2)
    expected = torch.tensor([[G2 * 1.0, G2 / ROOT2], [G2 * 0.0, G2 / ROOT2]])
    torch.testing.assert_close(scores, expected)
    pos = torch.eye(2, dtype=torch.bool)
    image_to_caption, caption_to_image, hits, count = matching_losses(scores, pos, G3)
    logits = (G3 * expected).tolist()  # [caption, image]
    columns = [[logits[0][m], logits[1][m]] for m in range(2)]
    assert image_to_caption.item() == pytest.approx((_ce(columns[0], 0) + _ce(columns[1], 1)) / 2, abs=1e-6)
    assert caption_to_image.item() == pytest.approx((_ce(logits[0], 0) + _ce(logits[1], 1)) / 2, abs=1e-6)
    assert image_to_caption.item() == pytest.approx(math.log(2) / 2, rel=1e-6)  # image 1 ties its captions
    # Top-1: caption 0 -> image 0, caption 1 -> image 1, image 0 -> caption 0; image 1's tie goes to
    # caption 0.
    assert (int(hits), count) == (3, 4)


def _reference_word_scores(words, word_mask, regions, region_mask, g1, g2):
    """AttnGAN's word level, formula by formula, one caption and one image at a time."""
    out = torch.zeros(len(words), len(regions), dtype=torch.float64)
    for c in range(len(words)):
        e = words[c][word_mask[c]].double()
        for m in range(len(regions)):
            v = regions[m][region_mask[m]].double()
            s = e @ v.T  # [T, N]
            s_bar = s.softmax(dim=0)  # over the words
            alpha = (g1 * s_bar).softmax(dim=1)  # over the regions
            context = alpha @ v
            cos = F.cosine_similarity(context, e, dim=1, eps=1e-8)
            out[c, m] = torch.log(torch.exp(g2 * cos).sum())
    return out


def test_damsm_word_scores_match_the_formulas_with_padded_words_and_regions():
    gen = torch.Generator().manual_seed(0)
    words = torch.randn(3, 4, 5, generator=gen)
    regions = torch.randn(3, 6, 5, generator=gen)
    word_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    region_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    scores = word_region_scores(words, word_mask, regions, region_mask, G1, G2)
    expected = _reference_word_scores(words, word_mask, regions, region_mask, G1, G2)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-5)
    # Padded positions take no part whatever they hold.
    noisy_words = words.masked_fill(~word_mask[..., None], 7.0)
    noisy_regions = regions.masked_fill(~region_mask[..., None], -9.0)
    torch.testing.assert_close(word_region_scores(noisy_words, word_mask, noisy_regions, region_mask, G1, G2),
                               scores)


def test_damsm_sentence_losses_on_a_hand_computed_case():
    sentences = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    scores = sentence_scores(sentences, images)
    torch.testing.assert_close(scores, torch.tensor([[1.0, 0.0], [1 / ROOT2, 1 / ROOT2]]))
    image_to_caption, caption_to_image, _, _ = matching_losses(scores, torch.eye(2, dtype=torch.bool), G3)
    # Caption 0 over the images: [10, 0]; caption 1: [7.07, 7.07]. Image 0 over the captions: [10, 7.07];
    # image 1: [0, 7.07].
    assert caption_to_image.item() == pytest.approx((math.log1p(math.exp(-10)) + math.log(2)) / 2, rel=1e-6)
    assert image_to_caption.item() == pytest.approx(
        (math.log1p(math.exp(-(10 - 10 / ROOT2))) + math.log1p(math.exp(-10 / ROOT2))) / 2, rel=1e-6)


def test_damsm_leaves_other_captions_of_the_same_image_out_and_drops_examples_without_words():
    scores = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    pos = positives(["a", "a", "b"])  # examples 0 and 1 show one image
    i2c, c2i, hits, count = matching_losses(scores, pos, 1.0)
    # Rows 0 and 1 keep their own positive and the other image's pair: [1, 0] -> log(1 + e^-1); row 2 keeps
    # all three: [0, 0, 1] -> log(1 + 2 / e). Likewise for the columns.
    expected = (2 * math.log1p(math.exp(-1)) + math.log1p(2 * math.exp(-1))) / 3
    assert i2c.item() == pytest.approx(expected, rel=1e-6)
    assert c2i.item() == pytest.approx(expected, rel=1e-6)
    assert (int(hits), count) == (6, 6)
    # An example without words has no word-level score: it leaves the rows and the columns.
    words, word_mask, regions, region_mask = _one_word_case()
    word_mask = torch.tensor([[True, False], [False, False]])
    scores = word_region_scores(words, word_mask, regions, region_mask, G1, G2)
    assert torch.isinf(scores[1]).all() and torch.isfinite(scores[0]).all()
    valid = word_mask.any(1) & region_mask.any(1)
    i2c, c2i, hits, count = matching_losses(scores, torch.eye(2, dtype=torch.bool), G3, valid)
    assert (i2c.item(), c2i.item(), count) == (0.0, 0.0, 2)


def test_vta_task_is_damsm_on_unimodal_passes_and_ignores_padded_regions():
    model = _model()
    vta = VTA(model, embed_dim=16)
    batch = _batch([3, 5, 2], [2, 3, 1], keys=["a", "b", "c"])
    out = vta(model, batch)
    assert set(out) == {"vta_word_loss", "vta_sentence_loss", "vta_correct", "vta_count"}
    text, image = vta.batch_text(model, batch), vta.batch_image(model, batch)
    word, sentence = vta.scores(text, image)
    w1, w2, _, _ = matching_losses(word, torch.eye(3, dtype=torch.bool), G3)
    torch.testing.assert_close(out["vta_word_loss"], w1 + w2)
    # Extra padded regions (and a longer padded text) holding garbage change nothing.
    padded = dict(batch)
    for key in ("img_feat", "img_pos_feat"):
        extra = torch.full((3, 2, batch[key].shape[-1]), 5.0)
        padded[key] = torch.cat([batch[key], extra], dim=1)
    padded["img_mask"] = torch.cat([batch["img_mask"], torch.zeros(3, 2, dtype=torch.bool)], dim=1)
    again = vta(model, padded)
    for key in ("vta_word_loss", "vta_sentence_loss"):
        torch.testing.assert_close(again[key], out[key], rtol=1e-5, atol=1e-5)
    # The words are the text without [CLS] / [SEP]: the first caption has 3 words.
    assert text.word_mask.sum(1).tolist() == [3, 5, 2]


# ---------------------------------------------------------------- captioner


def test_teacher_forcing_shifts_captions_and_masks_padding():
    ids = torch.tensor([[CLS, 7, 8, SEP, PAD], [CLS, 9, SEP, PAD, PAD]])
    inputs, input_mask, targets, target_mask = teacher_forcing(ids, ids != PAD)
    assert inputs.tolist() == [[CLS, 7, 8, SEP], [CLS, 9, SEP, PAD]]
    assert targets.tolist() == [[7, 8, SEP, PAD], [9, SEP, PAD, PAD]]
    assert target_mask.tolist() == [[True, True, True, False], [True, True, False, False]]
    assert input_mask.tolist() == [[True, True, True, True], [True, True, True, False]]


def test_caption_loss_on_a_tiny_case():
    # Three real targets: uniform logits over 4 tokens (log 4), a 2:1:1 ... split giving the target 1/2
    # (log 2), and one target certain (0); a padded position with a wrong, confident logit is ignored.
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [math.log(3), 0.0, 0.0, 0.0]],
                           [[0.0, 0.0, 50.0, 0.0], [0.0, 90.0, 0.0, 0.0]]])
    targets = torch.tensor([[1, 0], [2, 3]])
    mask = torch.tensor([[True, True], [True, False]])
    out = caption_loss(logits, targets, mask)
    assert out["cap_loss"].item() == pytest.approx((math.log(4) + math.log(2) + 0.0) / 3, abs=1e-6)
    assert (int(out["cap_correct"]), int(out["cap_count"])) == (2, 3)


def test_captioner_forward_is_the_cross_entropy_of_its_shifted_logits():
    torch.manual_seed(0)
    cap = Captioner(16, 12, bos_id=CLS, eos_id=SEP, layers=1, heads=2, max_len=8, dropout=0.0).eval()
    memory, memory_mask = torch.randn(2, 3, 16), torch.tensor([[True, True, False], [True, True, True]])
    ids = torch.tensor([[CLS, 7, 8, SEP, PAD], [CLS, 9, SEP, PAD, PAD]])
    out, logits = cap(memory, memory_mask, ids, ids != PAD)
    manual = [F.cross_entropy(logits[0, :3], torch.tensor([7, 8, SEP]), reduction="sum"),
              F.cross_entropy(logits[1, :2], torch.tensor([9, SEP]), reduction="sum")]
    assert out["cap_loss"].item() == pytest.approx(sum(manual).item() / 5, rel=1e-5)
    # Causal: the logits of a prefix do not depend on what follows it.
    longer, _ = cap(memory, memory_mask, torch.tensor([[CLS, 7, 8, SEP, 10], [CLS, 9, SEP, PAD, PAD]]),
                    torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool))
    assert longer["cap_loss"].item() != out["cap_loss"].item()
    again = cap.logits(memory, memory_mask, torch.tensor([[CLS, 7, 8, SEP]]).expand(2, 4))
    torch.testing.assert_close(again[0, :3], logits[0, :3], rtol=1e-5, atol=1e-5)


def _table_step(table: dict[int, dict[int, float]], vocab: int):
    """A step function whose next-token distribution depends on the last token only."""
    def step(tokens: torch.Tensor) -> torch.Tensor:
        out = torch.full((tokens.shape[0], vocab), -1e9)
        for row, last in enumerate(tokens[:, -1].tolist()):
            for token, prob in table.get(last, {SEP: 1.0}).items():
                out[row, token] = math.log(prob)
        return out
    return step


def test_greedy_and_beam_decoding_stop_at_sep():
    # After [CLS]: 5 (0.6) or 7 (0.4); after 5: 6 (0.6) or 8 (0.4), then [SEP]; after 7: [SEP] (1.0); 9 would
    # follow [SEP] if decoding went on. Greedy takes 5 then 6 (0.36); beam search finds 7 [SEP] (0.4).
    table = {CLS: {5: 0.6, 7: 0.4}, 5: {6: 0.6, 8: 0.4}, 6: {SEP: 1.0}, 8: {SEP: 1.0}, 7: {SEP: 1.0},
             SEP: {9: 1.0}}
    step = _table_step(table, 10)
    assert greedy_decode(step, 2, CLS, SEP, max_len=10) == [[5, 6], [5, 6]]
    assert beam_search(step, 2, CLS, SEP, max_len=10, beam_size=2) == [[7], [7]]
    assert beam_search(step, 1, CLS, SEP, max_len=10, beam_size=1) == [[5, 6]]
    # Without a [SEP] in reach, decoding stops at max_len.
    loop = _table_step({CLS: {5: 1.0}, 5: {5: 1.0}}, 10)
    assert greedy_decode(loop, 1, CLS, SEP, max_len=4) == [[5, 5, 5, 5]]
    assert beam_search(loop, 1, CLS, SEP, max_len=4, beam_size=3) == [[5, 5, 5, 5]]


def test_a_captioner_learns_two_captions_and_its_decoding_stops_at_sep():
    torch.manual_seed(0)
    cap = Captioner(32, 12, bos_id=CLS, eos_id=SEP, layers=1, heads=2, max_len=8, dropout=0.0)
    memory = torch.randn(2, 3, 32)
    memory_mask = torch.ones(2, 3, dtype=torch.bool)
    ids = torch.tensor([[CLS, 7, 8, 9, SEP], [CLS, 10, 11, SEP, PAD]])
    optimizer = torch.optim.Adam(cap.parameters(), lr=3e-3)
    for _ in range(150):
        out, _ = cap(memory, memory_mask, ids, ids != PAD)
        optimizer.zero_grad()
        out["cap_loss"].backward()
        optimizer.step()
    cap.eval()
    assert out["cap_loss"].item() < 0.05
    assert cap.generate(memory, memory_mask) == [[7, 8, 9], [10, 11]]
    assert cap.generate(memory, memory_mask, beam_size=3) == [[7, 8, 9], [10, 11]]
    # [SEP] made unreachable: the captions run to max_len.
    with torch.no_grad():
        cap.bias[SEP] = -1e4
    assert [len(c) for c in cap.generate(memory, memory_mask, max_len=5)] == [5, 5]


def test_fake_captions_cut_the_predictions_at_the_first_sep():
    predicted = torch.tensor([[7, 8, SEP, 9], [SEP, 7, 7, 7], [7, 8, 9, 10]])
    target_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    ids, positions, mask = fake_captions(predicted, target_mask, CLS, SEP, PAD)
    assert ids.tolist() == [[CLS, 7, 8, SEP, PAD], [CLS, SEP, PAD, PAD, PAD], [CLS, 7, 8, 9, SEP]]
    assert mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert positions[0].tolist() == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------- generator and discriminator


def test_boxes_and_the_kl_term_and_the_adversarial_losses_on_hand_cases():
    boxes = boxes_7d(torch.tensor([[0.6, 0.1, 0.2, 0.5]]))
    torch.testing.assert_close(boxes, torch.tensor([[0.2, 0.1, 0.6, 0.5, 0.4, 0.4, 0.16]]))
    assert kl_loss(torch.zeros(2, 3), torch.zeros(2, 3)).item() == 0.0
    assert kl_loss(torch.ones(2, 3), torch.zeros(2, 3)).item() == pytest.approx(0.5)
    zero = torch.zeros(4)
    assert generator_loss(zero, zero).item() == pytest.approx(math.log(2))
    assert discriminator_loss(zero, zero, zero, zero).item() == pytest.approx(2 * math.log(2))
    assert discriminator_loss(zero, zero, zero, zero, zero).item() == pytest.approx(2 * math.log(2))
    big = torch.full((4,), 30.0)
    assert discriminator_loss(big, big, -big, -big).item() == pytest.approx(0.0, abs=1e-6)
    assert generator_loss(-big, -big).item() == pytest.approx(30.0, rel=1e-6)


def test_generator_emits_fixed_slots_of_features_and_boxes_and_the_discriminator_masks_padding():
    torch.manual_seed(0)
    gen = RegionGenerator(8, IMG_DIM, slots=4, hidden=16, cond_dim=6, noise_dim=5, heads=2)
    words, word_mask = torch.randn(3, 5, 8), torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]],
                                                          dtype=torch.bool)
    fake = gen(torch.randn(3, 8), words, word_mask)
    assert fake.features.shape == (3, 4, IMG_DIM) and fake.boxes.shape == (3, 4, 7) and fake.mask.all()
    assert (fake.features >= 0).all()  # post-ReLU, as the detector's
    b = fake.boxes
    assert ((b >= 0) & (b <= 1)).all() and (b[..., 2] >= b[..., 0]).all()
    torch.testing.assert_close(b[..., 6], b[..., 4] * b[..., 5])
    disc = SetDiscriminator(IMG_DIM, 8, hidden=16, heads=2).eval()
    feats, pos = torch.randn(2, 3, IMG_DIM), torch.rand(2, 3, 7)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    sentence = torch.randn(2, 8)
    u, c, _ = disc(feats, pos, mask, sentence)
    u2, c2, _ = disc(feats.masked_fill(~mask[..., None], 50.0), pos.masked_fill(~mask[..., None], 1.0), mask,
                     sentence)
    torch.testing.assert_close((u, c), (u2, c2), rtol=1e-5, atol=1e-5)


LAV = dict(embed_dim=16, caption_max_len=16, generator_slots=3, cond_dim=8, noise_dim=8)


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if not torch.equal(before[n], p)}


def test_a_generator_step_leaves_the_discriminator_and_a_discriminator_step_only_changes_it():
    encoder = _model().train()
    lav = LAViTeR(encoder, cls_id=CLS, sep_id=SEP, **LAV)
    model = PretrainModel(encoder, {"laviter": lav})
    adversarial = adversaries(model.objectives)
    assert set(adversarial) == {"laviter"} and adversarial["laviter"] is lav.discriminator
    d_params = adversary_parameters(adversarial)
    optimizer, _ = build_optimizer(model.encoder, model.objectives, OptimConfig(warmup=0.0, lr=1e-3), 10,
                                   exclude=d_params)
    in_main = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not in_main & {id(p) for p in d_params}
    assert len(in_main) + len(d_params) == len(list(model.parameters()))
    d_optimizer = build_adversary_optimizer(adversarial, 2e-4, (0.5, 0.999))
    batch = _batch([3, 5, 2, 4], [2, 3, 1, 3], keys=["a", "b", "a", "c"])

    # The generator's own step: its adversarial loss (with the KL term) moves the generator, never the
    # discriminator, which it sees frozen.
    gen_only = torch.optim.SGD(lav.generator.parameters(), lr=0.1)
    before_d, before_g = _snapshot(lav.discriminator), _snapshot(lav.generator)
    before_rest = _snapshot(encoder) | {f"vta.{k}": v for k, v in _snapshot(lav.vta).items()}
    out = model("laviter", batch)
    (out["laviter_gen_loss"] + out["laviter_kl_loss"]).backward()
    assert all(p.grad is None for p in lav.discriminator.parameters())
    gen_only.step()
    assert _changed(before_g, lav.generator) == set(before_g)
    assert not _changed(before_d, lav.discriminator)
    model.zero_grad(set_to_none=True)

    # The joint step of every loss (the main optimizer): the discriminator stays as it was.
    before_d = _snapshot(lav.discriminator)
    out = model("laviter", batch)
    weights = laviter_weights(PAPER_LAMBDAS)
    sum(weights[k] * v for k, v in out.items() if k.endswith("_loss")).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    assert not _changed(before_d, lav.discriminator)
    assert _changed(before_rest, encoder) and _changed(before_g, lav.generator)

    # The discriminator's step changes the discriminator and nothing else.
    everything_else = {n: p.detach().clone() for n, p in model.named_parameters()
                       if not n.startswith("objectives.laviter.discriminator.")}
    before_d = _snapshot(lav.discriminator)
    out = model("laviter", batch, adversary=True)
    assert set(out) == {"laviter_disc_loss", "laviter_disc_correct", "laviter_disc_count"}
    out["laviter_disc_loss"].backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n in everything_else)
    d_optimizer.step()
    assert _changed(before_d, lav.discriminator) == set(before_d)
    assert all(torch.equal(p, everything_else[n]) for n, p in model.named_parameters()
               if n in everything_else)


def test_laviter_returns_the_parts_its_lambdas_switch_on():
    encoder = _model().train()
    batch = _batch([3, 5, 2], [2, 3, 1], keys=["a", "b", "c"])
    full = LAViTeR(encoder, cls_id=CLS, sep_id=SEP, mismatch=True, feature_matching=1.0, **LAV)
    out = full(encoder, batch)
    losses = {k for k in out if k.endswith("_loss")}
    assert losses == {"laviter_vta_word_loss", "laviter_vta_sentence_loss", "laviter_cap_loss",
                      "laviter_ft_loss", "laviter_gen_loss", "laviter_kl_loss", "laviter_fm_loss",
                      "laviter_fi_loss"}
    assert all(torch.isfinite(out[k]) for k in losses)
    assert set(full.discriminator_step(encoder, batch)) == {"laviter_disc_loss", "laviter_disc_correct",
                                                            "laviter_disc_count"}
    rows = {(0, 0, 0, 0, 1): ({"laviter_vta_word_loss", "laviter_vta_sentence_loss"}, False, False),
            (0, 0.1, 0, 1, 50): ({"laviter_vta_word_loss", "laviter_vta_sentence_loss", "laviter_cap_loss",
                                  "laviter_ft_loss"}, True, False),
            (0.01, 0, 1, 0, 50): ({"laviter_vta_word_loss", "laviter_vta_sentence_loss", "laviter_gen_loss",
                                   "laviter_kl_loss", "laviter_fi_loss"}, False, True)}
    for lambdas, (expected, captioner, generator) in rows.items():
        lav = LAViTeR(encoder, cls_id=CLS, sep_id=SEP, lambdas=lambdas, **LAV)
        assert {k for k in lav(encoder, batch) if k.endswith("_loss")} == expected, lambdas
        assert (lav.captioner is not None, lav.generator is not None, lav.adversary is not None) == (
            captioner, generator, generator)
    for bad in [(0, 0, 0, 1, 1), (0, 1, 1, 0, 1), (0, 0, 0, 0, 0), (1, 1, 1, 1), (-1, 0, 0, 0, 1)]:
        with pytest.raises(ValueError):
            check_lambdas(bad)


def test_laviter_under_bf16_autocast_and_its_captions():
    encoder = _model().train()
    lav = LAViTeR(encoder, cls_id=CLS, sep_id=SEP, **LAV)
    batch = _batch([3, 5, 2], [2, 3, 1], keys=["a", "b", "c"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lav(encoder, batch)
        disc = lav.discriminator_step(encoder, batch)
    for value in [*out.values(), *disc.values()]:
        assert torch.isfinite(value).all()
    sum(v for k, v in out.items() if k.endswith("_loss")).backward()
    encoder.eval()
    lav.eval()
    captions = lav.caption(encoder, batch, max_len=4, beam_size=2)
    assert len(captions) == 3 and all(len(c) <= 4 and SEP not in c for c in captions)


def test_the_pretraining_config_builds_vta_and_laviter_with_the_paper_weights():
    cfg = ObjectivesConfig(tasks={"laviter": 1.0, "vta": 1.0, "mlm": 1.0})
    assert cfg.laviter.lambdas == PAPER_LAMBDAS == (0.01, 0.1, 1.0, 1.0, 50.0)
    assert cfg.damsm.gammas == (4.0, 5.0, 10.0)
    meta = {"CLS": CLS, "SEP": SEP, "MASK": 4, "UNK": 1, "PAD": PAD, "v_range": [5, 60], "max_txt_len": 12}
    options = objective_options(cfg, meta, 5)
    assert options["laviter"]["caption_max_len"] == 14
    assert options["laviter"]["lambdas"] == list(PAPER_LAMBDAS)
    weights = loss_weights(cfg)
    assert (weights["laviter_gen_loss"], weights["laviter_kl_loss"], weights["laviter_cap_loss"],
            weights["laviter_fi_loss"], weights["laviter_ft_loss"], weights["laviter_vta_word_loss"],
            weights["laviter_vta_sentence_loss"], weights["laviter_fm_loss"]) == (
        0.01, 0.01, 0.1, 1, 1, 50, 50, 0)
    assert "vta_word_loss" not in weights  # the vta task's losses weigh 1
    # The default path is untouched: only WRA's weight and those of the other opt-in tasks' losses (1).
    assert loss_weights(ObjectivesConfig()) == {"wra_loss": 0.1, "codebook_ot_loss": 1.0,
                                                "codebook_pred_loss": 1.0, "owa_loss": 1.0}
    assert REGISTRY["vta"] is VTA and REGISTRY["laviter"] is LAViTeR
    with pytest.raises(ValueError, match="λ_FT > 0 needs λ_C > 0"):
        ObjectivesConfig(tasks={"laviter": 1.0}, laviter={"lambdas": [0, 0, 0, 1, 1]})
