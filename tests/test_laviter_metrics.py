"""LAViTeR's metrics as pure functions (vlp/eval/laviter.py) and the caption metrics (vlp/eval/captioning.py),
on hand-built embeddings and known values; the zero-shot model's LAViTeR evaluation (vlp/tasks/laviter.py,
stages/eval/laviter.py)."""

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.linalg
import torch
from test_objectives import CLS, IMG_DIM, SEP, _model

from stages.eval.laviter import attributes_of, object_classes
from vlp.eval.captioning import bleu, caption_metrics, cider, tokenize
from vlp.eval.laviter import (
    aimcos,
    cosine_matrix,
    frechet_distance,
    frechet_from_moments,
    pooled,
    r_precision,
)
from vlp.objectives.laviter import LAViTeR
from vlp.tasks.laviter import LaviterEvalOptions, damsm_heads, laviter_evaluation
from vlp.tasks.retrieval import PairScorer, Retrieval

# ---------------------------------------------------------------- R-precision


def test_r_precision_ranks_each_caption_among_the_captions_of_other_images():
    # Four images along the axes, one caption each.
    images = torch.eye(4)
    texts = torch.tensor([[1.0, 0.0, 0.0, 0.0],   # image 0's
                          [1.0, 1.0, 0.0, 0.0],   # image 1's: cos 0.707 with image 1, as caption 2 has
                          [0.0, 1.0, 1.0, 0.0],   # image 2's
                          [0.0, 0.0, 0.0, 1.0]])  # image 3's
    scores = cosine_matrix(images, texts)
    out = r_precision(scores, torch.arange(4), negatives=99, ks=(1, 2))
    # Fewer than 99 captions of other images: all three are each caption's negatives. Caption 1 ties with
    # caption 2 on image 1 (a tie counts against it): second; the others are first.
    assert out["r_precision"] == pytest.approx(0.75)
    assert out["r_precision_top2"] == pytest.approx(1.0)
    assert out["candidates"] == 4.0 and out["r_precision_std"] == 0.0
    # With more captions of other images than negatives, each query draws that many.
    assert r_precision(scores, torch.arange(4), negatives=2)["candidates"] == 3.0


def test_r_precision_draws_the_negatives_at_random_and_counts_ties_against_the_caption():
    # Two images with ten captions each: every caption scores 0.5 with its image; with the other image's
    # captions its image scores 0.9 for half of them and 0.1 for the others. One negative drawn: a caption is
    # first with probability 1/2.
    n = 10
    txt2img = torch.tensor([0] * n + [1] * n)
    scores = torch.full((2, 2 * n), 0.5)
    scores[0, n:] = torch.tensor([0.9, 0.1] * (n // 2))
    scores[1, :n] = torch.tensor([0.9, 0.1] * (n // 2))
    out = r_precision(scores, txt2img, negatives=1, ks=(1,), repeats=200, seed=0)
    assert out["r_precision"] == pytest.approx(0.5, abs=0.03)
    assert out["r_precision_std"] > 0 and out["candidates"] == 2.0
    assert r_precision(scores, txt2img, negatives=1, repeats=3, seed=1) == r_precision(
        scores, txt2img, negatives=1, repeats=3, seed=1)
    tied = r_precision(torch.zeros(2, 2 * n), txt2img, negatives=5)
    assert tied["r_precision"] == 0.0


# ---------------------------------------------------------------- AIMCoS


def test_aimcos_on_hand_built_embeddings():
    images = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    attributes = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    has = torch.tensor([[True, True, False, False], [False, False, True, False]])
    # Image 0: cos with attributes 0 (1) and 1 (1/sqrt 2); image 1: attribute 2 (1). Attribute 3: no image.
    assert aimcos(images, attributes, has) == pytest.approx(((1 + 1 / math.sqrt(2)) / 2 + 1) / 2)
    assert aimcos(images, attributes, has, average="class") == pytest.approx((1 + 1 / math.sqrt(2) + 1) / 3)
    # An image without attributes takes no part.
    more = torch.cat([images, torch.tensor([[5.0, 5.0]])])
    assert aimcos(more, attributes, torch.cat([has, torch.zeros(1, 4, dtype=torch.bool)])) == pytest.approx(
        aimcos(images, attributes, has))
    with pytest.raises(ValueError):
        aimcos(images, attributes, torch.zeros(2, 4, dtype=torch.bool))


# ---------------------------------------------------------------- Fréchet distance


def test_frechet_distance_of_a_set_with_itself_is_zero_and_known_values_for_gaussians():
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(200, 6, generator=gen) @ torch.randn(6, 6, generator=gen)).double()
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    # Diagonal Gaussians: ||μ1 - μ2||² + sum (σ1 - σ2)²: (1 + 4) + (1 - 2)² + (2 - 1)² = 7.
    value = frechet_from_moments([0, 0], np.diag([1.0, 4.0]), [1, 2], np.diag([4.0, 1.0]))
    assert value == pytest.approx(7.0)
    # y = 2x + 1: μ_y = 2 μ_x + 1 and Σ_y = 4 Σ_x, so FD = ||μ_x + 1||² + Tr(Σ_x + 4 Σ_x - 2 * 2 Σ_x).
    xn = x.double().numpy()
    expected = float(((xn.mean(0) + 1) ** 2).sum() + np.trace(np.cov(xn, rowvar=False)))
    assert frechet_distance(x, 2 * x + 1) == pytest.approx(expected, rel=1e-8)
    # Non-commuting covariances: the formula with scipy's matrix square root.
    a, b = np.cov(xn, rowvar=False), np.cov(np.random.default_rng(1).normal(size=(300, 6)), rowvar=False)
    mu = np.arange(6.0)
    reference = float(mu @ mu + np.trace(a + b - 2 * scipy.linalg.sqrtm(a @ b).real))
    assert frechet_from_moments(np.zeros(6), a, mu, b) == pytest.approx(reference, rel=1e-6)


def test_pooled_features_average_the_real_regions():
    features = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert pooled(features, torch.tensor([[True, True, False]])).tolist() == [[2.0, 3.0]]


# ---------------------------------------------------------------- BLEU and CIDEr


REFERENCES = {"1": ["a man is riding a horse on the beach", "A person rides a brown horse near the sea.",
                    "man on a horse"],
              "2": ["two dogs play with a red ball in the grass", "a pair of dogs chasing a ball",
                    "dogs playing in a park"],
              "3": ["a plate of food with broccoli and rice", "some rice and vegetables on a white plate"]}
HYPOTHESES = {"1": "A man riding a horse on a beach.", "2": "two dogs playing with a ball",
              "3": "a plate with rice and broccoli"}


def test_bleu_and_cider_match_the_coco_caption_scorers_on_a_known_example():
    # The values pycocoevalcap 1.2's Bleu(4) and Cider() give on these (PTB-tokenized) captions.
    scores = bleu(HYPOTHESES, REFERENCES)
    expected = [0.8595955470482018, 0.7094213204261571, 0.4021860425480859, 0.2704672670723213]
    assert scores == pytest.approx(expected, rel=1e-12)
    corpus, per_image = cider(HYPOTHESES, REFERENCES)
    assert corpus == pytest.approx(2.111158573023934, rel=1e-12)
    assert per_image == pytest.approx({"1": 2.4528692099964635, "2": 1.7158136391957335,
                                       "3": 2.164792869879605})
    metrics = caption_metrics(HYPOTHESES, REFERENCES)
    assert metrics["bleu4"] == pytest.approx(expected[3]) and metrics["cider"] == pytest.approx(corpus)


def test_bleu_clips_repeated_words_and_penalises_short_hypotheses():
    refs = {"x": ["the cat is on the mat"]}
    # Papineni et al.'s example: "the" x 7 matches at most twice -> unigram precision 2/7, no brevity penalty.
    assert bleu({"x": "the the the the the the the"}, refs)[0] == pytest.approx(2 / 7)
    assert bleu({"x": "the cat is on the mat"}, refs) == pytest.approx([1.0] * 4)
    # Three of six words, all matching: precisions 1 but the brevity penalty exp(1 - 6/3).
    assert bleu({"x": "the cat is"}, refs)[0] == pytest.approx(math.exp(-1))
    assert tokenize("A Man, riding!") == ["a", "man", "riding"]
    with pytest.raises(ValueError):
        bleu({"x": "a"}, {"y": ["a"]})


# ---------------------------------------------------------------- the zero-shot model's LAViTeR evaluation


def test_laviter_evaluation_of_a_pretrained_model_gives_every_section(tmp_path):
    class Region:
        def __init__(self, n, gen):
            self.features, self.boxes = torch.rand(n, IMG_DIM, generator=gen), torch.rand(n, 7, generator=gen)

    class Store:
        def __init__(self):
            gen = torch.Generator().manual_seed(0)
            self.regions = {f"coco:{i}": Region(2 + i % 3, gen) for i in range(6)}

        def get(self, key):
            return self.regions[key]

    encoder = _model()
    lav = LAViTeR(encoder, cls_id=CLS, sep_id=SEP, embed_dim=16, caption_max_len=16, generator_slots=3,
                  cond_dim=8, noise_dim=8)
    vta, laviter = damsm_heads(torch.nn.ModuleDict({"laviter": lav}))
    assert vta is lav.vta and laviter is lav
    keys = list(Store().regions)
    gen = torch.Generator().manual_seed(1)
    texts = [torch.tensor([CLS, *torch.randint(5, 60, (4,), generator=gen).tolist(), SEP]) for _ in range(12)]
    txt2img = torch.arange(12) // 2
    scorer = PairScorer(encoder, Retrieval(encoder.config), Store(), keys, texts)
    pq.write_table(pa.table({"image_key": ["coco:0", "coco:0", "coco:3", "vg:9"],
                             "names": [["circle"], ["Square"], ["circle"], ["star"]]}),
                   tmp_path / "objects.parquet")
    objects = object_classes(tmp_path)
    assert objects == {"coco:0": {"circle", "square"}, "coco:3": {"circle"}, "vg:9": {"star"}}

    class Tokenizer:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [5 + len(text)]}

    attributes = attributes_of(keys, objects, Tokenizer(), CLS, SEP)
    assert attributes.names == ["circle", "square", "star"] and attributes.has.sum().item() == 3
    options = LaviterEvalOptions(negatives=5, repeats=2, beam_size=2, max_len=4)
    training = encoder.training
    sections, captions = laviter_evaluation(encoder, vta, laviter, scorer, txt2img,
                                            lambda ids: " ".join(map(str, ids)), options, attributes)
    assert encoder.training == training
    assert set(sections) == {"damsm", "laviter", "captioning"}
    assert {"ir_r1", "tr_r1", "meta_sum"} <= set(sections["damsm"])
    assert {"r_precision", "r_precision_top3", "r_precision_std", "candidates", "aimcos", "aimcos_class",
            "r_precision_generated", "frechet_regions", "frechet_embeddings"} <= set(sections["laviter"])
    assert sections["laviter"]["candidates"] == 6.0 and -1 <= sections["laviter"]["aimcos"] <= 1
    assert {"bleu4", "cider", "images"} <= set(sections["captioning"])
    assert sections["captioning"]["images"] == 6
    assert len(captions) == 6 and all(len(c["references"]) == 2 for c in captions)
    again, _ = laviter_evaluation(encoder, vta, laviter, scorer, txt2img, lambda ids: " ".join(map(str, ids)),
                                  options, attributes)
    assert again == sections  # seeded: the draws and the generator's noise
