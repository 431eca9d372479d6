"""Retrieval finetuning and evaluation pieces (vlp/tasks/retrieval.py) on hand cases and a tiny real store."""

import numpy as np
import pytest
import torch

from stages.finetune.config import RetrievalConfig
from vlp.data.img_db import ImgDb, ImgDbWriter
from vlp.data.tokenizer import encode, save_tokenizer, tokenizer_meta, train_wordpiece
from vlp.data.txt_db import TxtDb, TxtDbWriter
from vlp.eval.isda import isda
from vlp.eval.retrieval import recall_at_k, score_all_pairs, shortlist_rerank
from vlp.model import UniterConfig, UniterModel
from vlp.objectives.itm import ITM
from vlp.tasks.retrieval import (
    EntityPhrase,
    EntitySentence,
    PairScorer,
    Retrieval,
    RetrievalDataError,
    RetrievalDataset,
    annotated_regions,
    detected_regions_by_iou,
    entity_inputs,
    entity_objects,
    hardest,
    hinge,
    pair_batch,
    sentence_isda,
    unimodal_similarity,
)
from vlp.train.evaluate import batch_sampler

DIM = 16
NBB = (0.2, 100, 2)
WORDS = ["red", "blue", "green", "circle", "square", "star"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matrices: one thread avoids OpenMP hand-offs that cost more than the maths on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """8 images (2-4 regions), 2 captions each, one caption of a ninth image that has no regions."""
    root = tmp_path_factory.mktemp("retrieval")
    rng = np.random.default_rng(0)
    with ImgDbWriter(root / "img_db", nbb_configs=[NBB]) as writer:
        for i in range(8):
            n = 2 + i % 3
            xy = rng.uniform(0, 0.5, (n, 2))
            wh = rng.uniform(0.1, 0.4, (n, 2))
            writer.put(f"img:{i}", features=rng.normal(size=(n, DIM)),
                       norm_bb=np.concatenate([xy, xy + wh, wh], 1), conf=np.linspace(0.9, 0.5, n),
                       soft_labels=np.full((n, 3), 1 / 3))
    captions = {f"img:{i}": [f"a {WORDS[i % 3]} {WORDS[3 + i % 3]}",
                             f"{WORDS[(i + 1) % 3]} and {WORDS[3 + i // 3]}"] for i in range(9)}
    tok = train_wordpiece([c for caps in captions.values() for c in caps], 100)
    save_tokenizer(tok, root / "tokenizer")
    with TxtDbWriter(root / "toy.db", tokenizer_meta(tok, "toy")) as writer:
        for key, caps in captions.items():
            for v, ids in enumerate(encode(tok, caps[: 1 if key == "img:8" else 2])):
                writer.add(f"{key}:{v}", {"input_ids": ids, "img_fname": key})
    img_db = ImgDb(root / "img_db", *NBB)
    yield TxtDb(root / "toy.db"), img_db, tok
    img_db.close()


def tiny_model(vocab_size: int, seed: int = 0) -> UniterModel:
    torch.manual_seed(seed)
    return UniterModel(UniterConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, img_dim=DIM,
                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def test_hardest_and_hinge_on_a_hand_case():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.3, 0.2, 0.8, 0.1]])
    assert hardest(scores, 2).tolist() == [[1, 3], [2, 0]]
    positive = torch.tensor([0.8, 0.6])
    negative = torch.tensor([[0.9, 0.7], [0.8, 0.3]])
    # max(0, 0.2 + n - p): 0.3, 0.1 | 0.4, 0 -> mean 0.2
    assert hinge(positive, negative, 0.2).item() == pytest.approx(0.2)
    with pytest.raises(ValueError, match=r"k=5 must be in \[1, 4\]"):
        hardest(scores, 5)


def test_training_loss_uses_the_hardest_sampled_negatives_of_both_sides(store):
    txt_db, img_db, tok = store
    data = RetrievalDataset([txt_db], img_db, neg_samples=4, seed=1)
    model = tiny_model(len(tok.get_vocab()))
    task = Retrieval(model.config, margin=0.2, hard_negatives=2)
    batch = data.collate([data[i] for i in range(3)])
    out = task(model, batch)

    # Expected: every candidate scored on its own, the 2 hardest per side kept, the sigmoid hinge averaged.
    def score(text_rows, texts, image_rows, images):
        pairs = pair_batch(texts, images, torch.tensor(text_rows), torch.tensor(image_rows))
        with torch.no_grad():
            return task.score(model, pairs)[0]

    negs = {k[4:]: v for k, v in batch.items() if k.startswith("neg_") and k != "neg_samples"}
    positive = score([0, 1, 2], batch, [0, 1, 2], batch).sigmoid()
    img_side = score([b for b in range(3) for _ in range(4)], batch, list(range(12)), negs).view(3, 4)
    txt_side = score(list(range(12)), negs, [b for b in range(3) for _ in range(4)], batch).view(3, 4)
    neg_img = img_side.sigmoid().topk(2, dim=1).values
    neg_txt = txt_side.sigmoid().topk(2, dim=1).values
    expected = (0.2 + neg_img - positive[:, None]).clamp_min(0).mean() + (
        0.2 + neg_txt - positive[:, None]).clamp_min(0).mean()
    assert out["retrieval_loss"].item() == pytest.approx(expected.item(), abs=1e-6)
    assert out["retrieval_count"].item() == 3
    # Candidates never include the positive's own image, nor texts of it.
    for i in range(3):
        example = data[i]
        own = data.pairs.img_keys[i]
        assert own not in example["neg_images"] and len(set(example["neg_images"])) == 4
        assert all(data.pairs.img_keys[j] != own for j in example["neg_texts"])


def test_separate_sides_anchor_the_image_side_on_its_own_positives_and_count_the_recipe(store):
    # The official recipe's shape at toy size: 6 candidates per positive and side, the 3 hardest kept, an
    # independent positive for the image side, 2 positives per step.
    txt_db, img_db, tok = store
    data = RetrievalDataset([txt_db], img_db, neg_samples=6, seed=4, sides="separate")
    model = tiny_model(len(tok.get_vocab()))
    task = Retrieval(model.config, margin=0.2, hard_negatives=3, sides="separate",
                     iais={"schedule": "constant"})
    examples = [data[i] for i in range(2)]
    batch = data.collate(examples)
    assert [ex["image_side"] for ex in examples] != [0, 1]  # drawn, not the text side's own
    assert batch["neg_input_ids"].shape[0] == batch["neg_img_feat"].shape[0] == 2 * 6
    scored = []
    score = task.score
    task.score = lambda m, pairs, attn_layer=None: (scored.append(len(pairs["input_ids"])),
                                                   score(m, pairs, attn_layer))[1]
    out = task(model, batch)
    # Mining scores every candidate of both sides (2 x 6 each); training scores 2 positives + 2 x 3 hard
    # images, 2 image-side positives + 2 x 3 hard texts.
    assert scored == [12, 12, 2 + 6 + 2 + 6]
    task.score = score

    def scores(text_rows, texts, image_rows, images):
        pairs = pair_batch(texts, images, torch.tensor(text_rows), torch.tensor(image_rows))
        with torch.no_grad():
            return task.score(model, pairs)[0].sigmoid()

    side = {k[5:]: v for k, v in batch.items() if k.startswith("side_")}
    negs = {k[4:]: v for k, v in batch.items() if k.startswith("neg_") and k != "neg_samples"}
    positive, side_positive = scores([0, 1], batch, [0, 1], batch), scores([0, 1], side, [0, 1], side)
    neg_img = scores([b for b in range(2) for _ in range(6)], batch, list(range(12)), negs).view(2, 6)
    neg_txt = scores(list(range(12)), negs, [b for b in range(2) for _ in range(6)], side).view(2, 6)
    expected = (0.2 + neg_img.topk(3, dim=1).values - positive[:, None]).clamp_min(0).mean() + (
        0.2 + neg_txt.topk(3, dim=1).values - side_positive[:, None]).clamp_min(0).mean()
    assert out["retrieval_loss"].item() == pytest.approx(expected.item(), abs=1e-6)
    assert {"iais_kl_text", "iais_kl_image"} <= out.keys() and out["iais_loss"].item() > 0
    # Candidate texts are of other images than the image side's positive.
    for ex in examples:
        own = data.pairs.img_keys[ex["image_side"]]
        assert all(data.pairs.img_keys[j] != own for j in ex["neg_texts"])
    with pytest.raises(ValueError, match="sides='shared' got a batch with separate image-side positives"):
        Retrieval(model.config)(model, batch)


def test_positives_per_step_gives_batches_of_that_many_examples(store):
    txt_db, img_db, _ = store
    data = RetrievalDataset([txt_db], img_db, neg_samples=2)
    sampler = batch_sampler(data, 10_000, train=True, setting="x", examples=3)
    batches = sampler.epoch_batches(0)
    assert sorted(len(b) for b in batches) == [1, 3, 3, 3, 3, 3]  # 16 texts: the epoch's last one is short
    assert sorted(i for b in batches for i in b) == list(range(16))
    official = RetrievalConfig(neg_samples=399, hard_negatives=31, positives_per_step=8, sides="separate")
    assert official.examples_per_batch == 8 and RetrievalConfig().examples_per_batch is None
    with pytest.raises(ValueError, match="hard_negatives \\(31\\) must not exceed neg_samples \\(30\\)"):
        RetrievalConfig(neg_samples=30, hard_negatives=31)


def test_rank_head_from_the_itm_head_gives_the_itm_matched_logit(store):
    txt_db, img_db, tok = store
    data = RetrievalDataset([txt_db], img_db)
    model = tiny_model(len(tok.get_vocab()))
    itm = ITM(model, wra=False)
    torch.nn.init.normal_(itm.head.weight)
    torch.nn.init.normal_(itm.head.bias)
    task = Retrieval(model.config)
    task.init_from_itm({f"itm.{k}": v for k, v in itm.state_dict().items()})
    batch = data.collate([data[i] for i in range(5)])
    inputs = ("input_ids", "position_ids", "txt_mask", "img_feat", "img_pos_feat", "img_mask")
    with torch.no_grad():
        scores, _ = task.score(model, batch)
        logits = itm.head(model.pool(model(**{k: batch[k] for k in inputs}).sequence_output))
    torch.testing.assert_close(scores, logits[:, 1])
    with pytest.raises(ValueError, match=r"heads\.pt: no ITM head"):
        task.init_from_itm({"mlm.bias": torch.zeros(3)})


def _gradients(model, task, batch, step=5, total=10):
    model.zero_grad()
    task.zero_grad()
    out = task(model, batch)
    weights = task.loss_weights(step, total)
    sum(weights[k] * v for k, v in out.items() if k.endswith("_loss")).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, out


def test_iais_changes_the_gradient_only_when_enabled(store):
    txt_db, img_db, tok = store
    data = RetrievalDataset([txt_db], img_db, neg_samples=3, seed=2)
    examples = [data[i] for i in range(4)]
    batch = data.collate(examples)
    model = tiny_model(len(tok.get_vocab()))
    plain_task = Retrieval(model.config)
    torch.nn.init.normal_(plain_task.rank.weight)  # a head with some signal, shared by all three runs

    def with_iais(**options):
        task = Retrieval(model.config, **options)
        task.rank.load_state_dict(plain_task.rank.state_dict())
        return task

    plain, out = _gradients(model, plain_task, batch)
    assert "iais_loss" not in out
    off, out = _gradients(model, with_iais(iais={"variant": "distributed"}, iais_weight=0.0), batch)
    assert out["iais_loss"].item() > 0
    on, out = _gradients(model, with_iais(iais={"schedule": "constant"}), batch)
    for name in plain:
        torch.testing.assert_close(off[name], plain[name], atol=1e-6, rtol=1e-4)
    changed = [n for n in plain if not torch.allclose(on[n], plain[n], atol=1e-6, rtol=1e-4)]
    assert "encoder.layers.1.qkv.weight" in changed
    # The exp schedule anneals the weight from e^-5 to 1.
    task = Retrieval(model.config, iais={"schedule": "exp", "gamma": 5.0}, iais_weight=2.0)
    assert task.loss_weights(0, 10)["iais_loss"] == pytest.approx(2 * np.exp(-5))
    assert task.loss_weights(10, 10)["iais_loss"] == pytest.approx(2.0)


def test_full_and_shortlist_scoring_agree_when_the_shortlist_covers_everything(store):
    txt_db, img_db, tok = store
    data = RetrievalDataset([txt_db], img_db)
    model = tiny_model(len(tok.get_vocab()), seed=3)
    task = Retrieval(model.config)
    model.train()  # the scorer must switch dropout off by itself and restore the mode
    scorer = PairScorer(model, task, img_db, data.index.img_keys, [data.text(j) for j in range(len(data))],
                        cache_images=3)
    n_img, n_txt = len(data.index.img_keys), len(data)
    full = score_all_pairs(scorer, n_img, n_txt, 3, 5)
    assert scorer.pairs_scored == n_img * n_txt == 8 * 16
    sim = unimodal_similarity(scorer, chunk=5)
    assert sim.shape == (8, 16) and sim.abs().max() <= 1 + 1e-5
    short = shortlist_rerank(sim, scorer, k=n_img, chunk=4)
    torch.testing.assert_close(short, full, atol=1e-5, rtol=0)
    assert recall_at_k(short, data.index.txt2img) == recall_at_k(full, data.index.txt2img)
    assert model.training
    small = shortlist_rerank(sim, scorer, k=2)
    scored = ~torch.isinf(small)
    assert 0 < scored.sum() < scored.numel() and (small[scored] - full[scored]).abs().max() < 1e-5


def test_itc_shortlist_mode_uses_the_pretrained_itc_embeddings(store):
    from stages.eval.config import RetrievalEvalConfig
    from stages.eval.retrieval import score_modes
    from vlp.objectives.itc import ITC
    from vlp.tasks.retrieval import itc_similarity

    txt_db, img_db, tok = store
    data = RetrievalDataset([txt_db], img_db)
    model = tiny_model(len(tok.get_vocab()), seed=3)
    itc = ITC(model, embed_dim=8)
    scorer = PairScorer(model, Retrieval(model.config), img_db, data.index.img_keys,
                        [data.text(j) for j in range(len(data))])
    sim = itc_similarity(scorer, itc, chunk=5)
    images = scorer.regions(range(8))
    texts = scorer.text_batch(range(16))
    expected = (itc.embed_images(model.eval(), *(images[k] for k in ("img_feat", "img_pos_feat", "img_mask")))
                @ itc.embed_texts(model, *(texts[k] for k in ("input_ids", "position_ids", "txt_mask"))).T)
    torch.testing.assert_close(sim, expected, atol=1e-5, rtol=0)
    cfg = RetrievalEvalConfig(modes=("full", "itc_shortlist"), shortlist_k=2)
    with_itc = score_modes(scorer, data.index.txt2img, cfg, itc)
    assert sorted(with_itc) == ["full", "itc_shortlist"]
    assert 0 < with_itc["itc_shortlist"].metrics["pairs_scored"] < with_itc["full"].metrics["pairs_scored"]
    assert sorted(score_modes(scorer, data.index.txt2img, cfg)) == ["full"]  # no itc head: mode skipped


def test_texts_of_images_missing_from_the_store_are_listed_and_left_out(store):
    txt_db, img_db, _ = store
    data = RetrievalDataset([txt_db], img_db)
    assert data.missing == ["img:8"] and len(data) == 16
    with pytest.raises(RetrievalDataError, match="neg_samples=8: the split has only 8 images"):
        RetrievalDataset([txt_db], img_db, neg_samples=8)


def test_entity_phrases_map_to_word_piece_positions_and_isda_objects(store):
    _, img_db, tok = store
    words = ("a", "green", "star", "and", "red", "circle", "near", "it")
    sentence = EntitySentence("img:2", words, (
        EntityPhrase(0, 3, "7", ((0.0, 0.0, 10.0, 10.0),)),
        EntityPhrase(4, 2, "9", ((20.0, 20.0, 40.0, 40.0),)),
        EntityPhrase(7, 1, "7", ((0.0, 0.0, 10.0, 10.0),))))  # "it": chain 7 again (coreference)
    ids, positions = entity_inputs(tok, sentence, cls_id=2, sep_id=3, max_txt_len=60)
    pieces = tok.convert_ids_to_tokens(ids.tolist())
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]"
    assert "".join(pieces[p].lstrip("#") for p in positions[0]) == "agreenstar"
    assert "".join(pieces[p].lstrip("#") for p in positions[1]) == "redcircle"
    _, cut = entity_inputs(tok, sentence, cls_id=2, sep_id=3, max_txt_len=2)
    assert cut[1] == [] and len(cut[0]) == 2
    # Region boxes of img:2 in a 100 x 100 image; an annotated store holds one region per box, in this order.
    region = img_db.get("img:2")
    region_boxes = region.boxes[:, :4]
    pixels = (region_boxes.double() * 100).tolist()
    annotated = annotated_regions({"img:2": pixels})
    phrases = [EntityPhrase(p.first_word, p.n_words, p.chain, (tuple(pixels[r]),))
               for p, r in zip(sentence.phrases, (1, 0, 1), strict=True)]
    boxed = EntitySentence("img:2", words, tuple(phrases))
    # One object per chain: chain 7 = "a green star" + "it" with region 1, chain 9 = "red circle", region 0.
    objects = entity_objects(boxed, positions, region_boxes, annotated)
    assert objects == [(positions[0] + positions[2], [1]), (positions[1], [0])]
    unboxed = entity_objects(sentence, positions, region_boxes, annotated)
    assert unboxed == [(positions[0] + positions[2], []), (positions[1], [])]
    # Detected regions: a box equal to a region's matches it (IoU 1); a box far from all matches none.
    detected = detected_regions_by_iou({"img:2": (100, 100)})
    assert 1 in detected("img:2", [pixels[1]], region_boxes)
    assert detected("img:2", [[90, 90, 99, 99]], region_boxes) == []
    model = tiny_model(len(tok.get_vocab())).eval()
    values = sentence_isda(model, img_db, [sentence, boxed], tok, annotated, cls_id=2, sep_id=3)
    assert values[0] is None  # no object has a region
    n = len(pixels)
    attention = model(input_ids=ids[None], position_ids=torch.arange(len(ids))[None],
                      txt_mask=torch.ones(1, len(ids), dtype=torch.bool), img_feat=region.features[None],
                      img_pos_feat=region.boxes[None], img_mask=torch.ones(1, n, dtype=torch.bool),
                      attn_layer=-1).attention[0]
    assert values[1] == pytest.approx(isda(attention, len(ids), n, objects), abs=1e-6)
