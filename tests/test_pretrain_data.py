import json
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from stages.pretrain.data import streams
from vlp.data.batching import UnitBatchSampler, pack_by_units
from vlp.data.collate import collate, padded_units, padding_fraction, padding_fraction_of_lengths
from vlp.data.img_db import ImgDb, ImgDbWriter
from vlp.data.pretrain_dataset import ImageTextIndex, PretrainDataError, PretrainDataset
from vlp.data.task_sampler import TaskSampler
from vlp.data.txt_db import TxtDb, TxtDbWriter
from vlp.objectives.itm import corpus_negatives
from vlp.train.prepared import ItmPairs, PreparedBatches

META = {"CLS": 2, "SEP": 3, "MASK": 4, "UNK": 1, "PAD": 0, "v_range": [5, 60]}
DIM, CLASSES = 8, 5


def region_arrays(seed: int, n: int) -> dict:
    rng = np.random.default_rng(seed)
    xy1 = rng.uniform(0, 0.5, size=(n, 2))
    wh = rng.uniform(0.05, 0.5, size=(n, 2))
    soft = rng.dirichlet(np.ones(CLASSES), size=n)
    return {
        "features": rng.normal(size=(n, DIM)).astype(np.float32),
        "norm_bb": np.concatenate([xy1, xy1 + wh, wh], axis=1).astype(np.float32),
        "conf": np.linspace(0.9, 0.5, n).astype(np.float32),  # all above 0.2: every region is kept
        "soft_labels": soft.astype(np.float32),
    }


IMAGES = {"coco:1": 3, "coco:2": 5, "vg:3": 2}
CAPTIONS_A = {"c1": ("coco:1", [10, 11, 12]), "c2": ("coco:2", [13]), "c3": ("coco:9", [14, 15]),
              "c4": ("coco:1", [16, 17])}
CAPTIONS_B = {"s1": ("vg:3", [20, 21, 22, 23, 24]), "s2": ("sbu:7", [25]), "s3": ("sbu:7", [26])}


def write_txt_db(path, captions, meta=META):
    with TxtDbWriter(path, meta) as w:
        for txt_id, (img, ids) in captions.items():
            w.add(txt_id, {"input_ids": ids, "img_fname": img})
    return TxtDb(path)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    with ImgDbWriter(root / "img_db") as w:
        for seed, (key, n) in enumerate(IMAGES.items()):
            w.put(key, **region_arrays(seed, n))
    txt_a, txt_b = write_txt_db(root / "a.db", CAPTIONS_A), write_txt_db(root / "b.db", CAPTIONS_B)
    return txt_a, txt_b, ImgDb(root / "img_db")


class CountingTxtDb(TxtDb):
    reads = 0

    def __getitem__(self, txt_id):
        CountingTxtDb.reads += 1
        return super().__getitem__(txt_id)


# -- dataset -----------------------------------------------------------------------------------------------
def test_dataset_drops_captions_whose_image_is_not_stored_and_counts_them(stores):
    ds = PretrainDataset(stores[:2], stores[2])
    assert ds.txt_ids == ["c1", "c2", "c4", "s1"]
    assert ds.img_keys == ["coco:1", "coco:2", "coco:1", "vg:3"]
    assert ds.dropped == {"image not in the feature store": 3}
    assert ds.missing_images == {"coco:9": 1, "sbu:7": 2}
    assert ds.drop_summary() == ["3 captions dropped (2 images): image not in the feature store"]
    assert PretrainDataset(stores[0], stores[2]).dropped == {"image not in the feature store": 1}


def test_lengths_come_from_sidecars_without_reading_the_lmdb(stores):
    CountingTxtDb.reads = 0
    ds = PretrainDataset([CountingTxtDb(stores[0].path), CountingTxtDb(stores[1].path)], stores[2])
    assert CountingTxtDb.reads == 0
    # text incl. [CLS]/[SEP] + regions
    assert ds.txt_lens.tolist() == [5, 3, 4, 7]
    assert ds.img_lens.tolist() == [3, 5, 3, 2]
    assert ds.lengths.tolist() == [8, 8, 7, 9]


def test_example_is_cls_text_sep_with_the_stored_regions(stores):
    ds = PretrainDataset(stores[:2], stores[2])
    ex = ds[3]
    assert ex["input_ids"].tolist() == [2, 20, 21, 22, 23, 24, 3]
    assert ex["input_ids"].dtype == torch.long
    assert (ex["img_key"], ex["txt_id"]) == ("vg:3", "s1")
    stored = region_arrays(2, 2)
    fp16 = stored["features"].astype(np.float16)  # the store keeps fp16 features
    np.testing.assert_array_equal(ex["img_feat"].numpy(), fp16.astype(np.float32))
    bb = stored["norm_bb"].astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(ex["img_pos_feat"].numpy(), np.c_[bb, bb[:, 4] * bb[:, 5]], rtol=1e-6)
    assert ex["img_pos_feat"].shape == (2, 7) and ex["soft_labels"].shape == (2, CLASSES)
    # pair(): the same caption against another image (retrieval, negatives)
    other = ds.pair(3, "coco:2")
    assert other["input_ids"].tolist() == ex["input_ids"].tolist() and other["img_feat"].shape == (5, DIM)


def test_long_captions_are_truncated_not_dropped(stores):
    ds = PretrainDataset(stores[:2], stores[2], max_txt_len=2)
    assert ds.txt_lens.tolist() == [4, 3, 4, 4] and ds.truncated == 2
    assert ds[0]["input_ids"].tolist() == [2, 10, 11, 3]
    assert ds[3]["input_ids"].tolist() == [2, 20, 21, 3]


def test_id2len_disagreeing_with_the_entry_names_db_and_text(tmp_path, stores):
    db = write_txt_db(tmp_path / "bad.db", {"x1": ("coco:1", [10, 11])})
    (tmp_path / "bad.db" / "id2len.json").write_text(json.dumps({"x1": 5}))
    ds = PretrainDataset(TxtDb(db.path), stores[2])
    with pytest.raises(PretrainDataError, match=r"bad\.db: text 'x1': field input_ids has 2 tokens but "
                                                r"id2len\.json says 5"):
        ds[0]


def test_text_dbs_from_different_tokenizers_are_rejected(tmp_path, stores):
    other = write_txt_db(tmp_path / "other.db", {"o1": ("coco:1", [7])}, meta={**META, "MASK": 9})
    with pytest.raises(PretrainDataError, match=r"other\.db: meta\.json tokenizer fields \['MASK'\] differ"):
        PretrainDataset([stores[0], other], stores[2])


def test_split_by_image_is_disjoint_and_independent_of_db_order(stores):
    ds = PretrainDataset(stores[:2], stores[2])
    train, held = ds.split_by_image(1, seed=3)
    assert not set(train.img_keys) & set(held.img_keys)
    assert sorted(train.txt_ids + held.txt_ids) == sorted(ds.txt_ids)
    assert len(set(held.img_keys)) == 1
    swapped = PretrainDataset([stores[1], stores[0]], stores[2]).split_by_image(1, seed=3)[1]
    assert set(swapped.img_keys) == set(held.img_keys)
    # a subset keeps the lengths and reads the right examples
    for j, txt_id in enumerate(held.txt_ids):
        assert held[j]["txt_id"] == txt_id and held.lengths[j] == ds.lengths[ds.txt_ids.index(txt_id)]
    with pytest.raises(PretrainDataError, match="held_out=1.5"):
        ds.split_by_image(1.5)


def test_image_text_index_has_unique_images_and_ground_truth(stores):
    ds = PretrainDataset(stores[:2], stores[2])
    index = ImageTextIndex.from_dataset(ds)
    assert index.img_keys == ("coco:1", "coco:2", "vg:3")
    assert index.txt_ids == ("c1", "c2", "c4", "s1")
    assert index.txt2img.tolist() == [0, 1, 0, 2]
    assert index.img2txts() == [[0, 2], [1], [3]]
    assert index.positives().tolist() == [[True, False, False], [False, True, False], [True, False, False],
                                          [False, False, True]]
    with pytest.raises(PretrainDataError, match="text id 'c1' occurs 2 times"):
        ImageTextIndex.from_dataset(PretrainDataset([stores[0], stores[0]], stores[2]))


# -- collate -----------------------------------------------------------------------------------------------
def test_collate_pads_each_modality_at_its_end(stores):
    ds = PretrainDataset(stores[:2], stores[2])
    examples = [ds[1], ds[3], ds[0]]  # text 3/7/5, regions 5/2/3
    batch = collate(examples)
    assert batch["input_ids"].tolist() == [[2, 13, 3, 0, 0, 0, 0],
                                           [2, 20, 21, 22, 23, 24, 3],
                                           [2, 10, 11, 12, 3, 0, 0]]
    assert batch["position_ids"].tolist() == [list(range(7))] * 3
    assert batch["txt_mask"].tolist() == [[True] * 3 + [False] * 4, [True] * 7, [True] * 5 + [False] * 2]
    assert batch["img_mask"].tolist() == [[True] * 5, [True] * 2 + [False] * 3, [True] * 3 + [False] * 2]
    assert batch["img_feat"].shape == (3, 5, DIM) and batch["img_pos_feat"].shape == (3, 5, 7)
    assert batch["soft_labels"].shape == (3, 5, CLASSES)
    for b, ex in enumerate(examples):
        n = ex["img_feat"].shape[0]
        assert torch.equal(batch["img_feat"][b, :n], ex["img_feat"])
        assert torch.equal(batch["img_pos_feat"][b, :n], ex["img_pos_feat"])
        assert torch.equal(batch["soft_labels"][b, :n], ex["soft_labels"])
        assert not batch["img_feat"][b, n:].any() and not batch["soft_labels"][b, n:].any()
    assert batch["txt_mask"].dtype == batch["img_mask"].dtype == torch.bool
    assert batch["img_keys"] == ["coco:2", "vg:3", "coco:1"] and batch["txt_ids"] == ["c2", "s1", "c1"]
    # 3 x (7 + 5) = 36 positions, 15 text + 10 regions real
    assert padding_fraction(batch) == pytest.approx(11 / 36)
    assert padded_units([3, 7, 5], [5, 2, 3]) == 36
    no_labels = collate([{**examples[0], "soft_labels": None}, examples[1]])
    assert "soft_labels" not in no_labels


# -- dynamic batching --------------------------------------------------------------------------------------
def caption_like_lengths(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Caption tokens as in the demo (mean 10.5, sd 3.2, 3-28) + [CLS]/[SEP]; 10-100 regions."""
    rng = np.random.default_rng(seed)
    txt = np.clip(np.round(rng.normal(10.5, 3.2, n)), 3, 28).astype(int) + 2
    return txt, rng.integers(10, 101, n)


def test_no_batch_exceeds_the_unit_budget_over_random_lengths():
    for seed in range(30):
        rng = np.random.default_rng(seed)
        n = int(rng.integers(1, 400))
        txt, img = rng.integers(0, 60, n), rng.integers(0, 120, n)
        max_units = int((txt + img).max() + rng.integers(0, 2000))
        world, bucket_size = int(rng.integers(1, 4)), int(rng.integers(1, 300))
        for rank in range(world):
            sampler = UnitBatchSampler(txt, img, max_units, seed=seed, bucket_size=bucket_size, rank=rank,
                                       world_size=world, even_shards=False, infinite=False)
            for epoch in range(2):
                for b in sampler.epoch_batches(epoch):
                    assert padded_units(txt[b], img[b]) <= max_units


def test_an_example_over_the_budget_is_an_error_at_construction():
    with pytest.raises(ValueError, match=r"max_units=50 is below the size of 2 example\(s\); the largest, "
                                         r"#1, has 70 units \(20 text \+ 50 regions\)"):
        UnitBatchSampler([5, 20, 30], [10, 50, 30], 50)


def test_one_rank_epoch_covers_every_example_exactly_once():
    txt, img = caption_like_lengths(3000, 0)
    sampler = UnitBatchSampler(txt, img, 2048, seed=1)
    for epoch in range(3):
        flat = [i for b in sampler.epoch_batches(epoch) for i in b]
        assert sorted(flat) == list(range(3000))
    assert sampler.epoch_batches(0) != sampler.epoch_batches(1)  # reshuffled per epoch
    assert sampler.epoch_batches(0) == UnitBatchSampler(txt, img, 2048, seed=1).epoch_batches(0)


def test_rank_shards_are_disjoint_with_equal_batch_counts():
    txt, img = caption_like_lengths(3001, 1)
    for world in (2, 3, 4):
        shards = [UnitBatchSampler(txt, img, 1500, seed=7, rank=r, world_size=world) for r in range(world)]
        single = UnitBatchSampler(txt, img, 1500, seed=7)
        for epoch in range(2):
            everything = single.epoch_batches(epoch)
            per_rank = [s.epoch_batches(epoch) for s in shards]
            kept = len(everything) // world
            assert [len(p) for p in per_rank] == [kept] * world
            flat = [i for p in per_rank for b in p for i in b]
            assert len(flat) == len(set(flat))
            # what is left out is the last len % world batches of the shuffled epoch, nothing else
            assert sorted(flat) == sorted(i for b in everything[: kept * world] for i in b)
    # evaluation mode: every example once, counts may differ by one batch
    eval_shards = [UnitBatchSampler(txt, img, 1500, rank=r, world_size=3, shuffle=False, even_shards=False)
                   for r in range(3)]
    flat = [i for s in eval_shards for b in s.epoch_batches(0) for i in b]
    assert sorted(flat) == list(range(3001))


def test_bucketing_cuts_padding_on_caption_like_lengths():
    txt, img = caption_like_lengths(20000, 2)
    sampler = UnitBatchSampler(txt, img, 4096, seed=0)
    assert sampler.bucket_size == 6100  # 100 batches of 4096 // 67 (mean units)
    bucketed = sampler.epoch_batches(0)
    unbucketed = pack_by_units(np.random.default_rng(0).permutation(20000), txt, img, 4096)
    by_sum = []
    for start in range(0, 20000, 6100):  # same bucket size, sorted by total units instead
        bucket = np.arange(start, min(start + 6100, 20000))
        by_sum += pack_by_units(bucket[np.argsort(-(txt + img)[bucket], kind="stable")], txt, img, 4096)
    fractions = [round(padding_fraction_of_lengths(b, txt, img), 4) for b in (bucketed, by_sum, unbucketed)]
    print(f"padding fraction: bucketed {fractions[0]}, sorted by sum {fractions[1]}, "
          f"unbucketed {fractions[2]}; batches {len(bucketed)} / {len(by_sum)} / {len(unbucketed)}")
    assert fractions == [0.0694, 0.1671, 0.4243]
    assert (len(bucketed), len(by_sum), len(unbucketed)) == (362, 402, 580)


def take(it, n):
    return [next(it) for _ in range(n)]


def test_resume_continues_exactly_where_the_run_stopped():
    txt, img = caption_like_lengths(500, 3)
    make = lambda: UnitBatchSampler(txt, img, 1024, seed=5, rank=1, world_size=2)  # noqa: E731
    per_epoch = len(make().epoch_batches(0))
    total = 3 * per_epoch + 4
    straight = take(iter(make()), total)
    for stop in (0, 1, per_epoch - 1, per_epoch, per_epoch + 3, 2 * per_epoch + 1):
        first = make()
        head = take(iter(first), stop)
        resumed = make()
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert head + take(iter(resumed), total - stop) == straight, stop
    # prefetching: the iterator ran 7 batches ahead of what the loop consumed
    ahead = make()
    it = iter(ahead)
    consumed = take(it, per_epoch - 2)
    take(it, 7)
    resumed = make()
    resumed.load_state_dict(ahead.state_dict(consumed=per_epoch - 2))
    assert consumed + take(iter(resumed), total - per_epoch + 2) == straight


def test_resume_through_a_dataloader_with_a_prefetching_worker():
    txt, img = caption_like_lengths(300, 4)
    data = list(range(300))
    plain = DataLoader(data, batch_sampler=UnitBatchSampler(txt, img, 900))
    straight = [b.tolist() for b in take(iter(plain), 40)]
    sampler = UnitBatchSampler(txt, img, 900)
    loader = DataLoader(data, batch_sampler=sampler, num_workers=1, prefetch_factor=4)
    head = [b.tolist() for b in take(iter(loader), 17)]
    state = sampler.state_dict(consumed=17)
    assert sampler.state_dict() != state  # the worker pulled batches ahead of the loop
    resumed = UnitBatchSampler(txt, img, 900)
    resumed.load_state_dict(state)
    tail = [b.tolist() for b in take(iter(DataLoader(data, batch_sampler=resumed)), 23)]
    assert head + tail == straight


def test_state_of_other_data_or_settings_is_refused():
    txt, img = caption_like_lengths(200, 5)
    state = UnitBatchSampler(txt, img, 1000, seed=1).state_dict()
    with pytest.raises(ValueError, match=r"other data or settings \(seed: saved 1, now 2\)"):
        UnitBatchSampler(txt, img, 1000, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match=r"\(lengths: saved"):
        UnitBatchSampler(txt[:-1], img[:-1], 1000, seed=1).load_state_dict(state)


def test_finite_mode_yields_one_epoch_per_iterator():
    txt, img = caption_like_lengths(200, 6)
    sampler = UnitBatchSampler(txt, img, 1000, infinite=False)
    first, second = list(sampler), list(sampler)
    assert first == sampler.epoch_batches(0) and second == sampler.epoch_batches(1)
    assert sampler.state_dict()["epoch"] == 2 and len(sampler) == len(sampler.epoch_batches(2))


def test_dataset_sampler_and_collate_end_to_end(stores):
    ds = PretrainDataset(stores[:2], stores[2])
    sampler = UnitBatchSampler(ds.txt_lens, ds.img_lens, 20, infinite=False)
    batches = list(DataLoader(ds, batch_sampler=sampler, collate_fn=collate))
    assert sorted(t for b in batches for t in b["txt_ids"]) == sorted(ds.txt_ids)
    for b in batches:
        assert b["txt_mask"].numel() + b["img_mask"].numel() <= 20
    assert [padding_fraction(b) for b in batches] == pytest.approx(
        [padding_fraction_of_lengths([idx], ds.txt_lens, ds.img_lens) for idx in sampler.epoch_batches(0)])


# -- task sampler ------------------------------------------------------------------------------------------
def test_task_mix_follows_the_ratios_and_is_the_same_on_every_rank():
    ratios = {"mlm": 2, "mrfr": 1, "itm": 1, "mrc_kl": 1}
    rank0, rank1 = TaskSampler(ratios, seed=11), TaskSampler(dict(reversed(ratios.items())), seed=11)
    seq0 = [rank0.next() for _ in range(10_000)]
    assert seq0 == [rank1.next() for _ in range(10_000)]
    counts = Counter(seq0)
    for name, r in ratios.items():
        assert abs(counts[name] / 10_000 - r / 5) < 0.02, (name, counts)
    assert seq0 != [TaskSampler(ratios, seed=12).task(s) for s in range(10_000)]
    assert Counter(TaskSampler({"mlm": 1, "itm": 0}).task(s) for s in range(100)) == {"mlm": 100}


def test_task_sampler_resumes_from_its_step():
    ratios = {"mlm": 1, "itm": 1, "mrfr": 1}
    straight = TaskSampler(ratios, seed=3)
    expected = [straight.next() for _ in range(50)]
    first = TaskSampler(ratios, seed=3)
    head = [first.next() for _ in range(20)]
    resumed = TaskSampler(ratios, seed=3)
    resumed.load_state_dict(first.state_dict())
    assert head + [resumed.next() for _ in range(30)] == expected
    with pytest.raises(ValueError, match="seed 3, this run 4"):
        TaskSampler(ratios, seed=4).load_state_dict(first.state_dict())


def test_bad_task_ratios_are_rejected():
    with pytest.raises(ValueError, match=r"bad: \{'itm': -1\}"):
        TaskSampler({"mlm": 1, "itm": -1})
    with pytest.raises(ValueError, match="select no task"):
        TaskSampler({"mlm": 0})


# -- ITM negatives from the corpus, per-dataset streams ----------------------------------------------------
def test_corpus_negatives_come_from_the_examples_pool_and_never_the_own_image():
    own = np.array([0, 0, 1, 2, 3, 3, 4])
    pool = np.array([0, 0, 0, 0, 1, 1, 2])  # pool 0: images 0, 1, 2; pool 1: image 3 only; pool 2: image 4
    partner, targets = corpus_negatives(own, pool, 1.0, np.random.default_rng(0))
    assert targets.tolist() == [0, 0, 0, 0, 1, 1, 1]  # a pool of one image has no negative
    assert all(p in (0, 1, 2) and p != o for p, o in zip(partner[:4], own[:4], strict=True))
    assert partner[4:].tolist() == [3, 3, 4]
    # neg_prob of the examples become negatives, their images uniform over the pool's other images.
    own, pool = np.zeros(30_000, np.int64), np.zeros(30_000, np.int64)
    own[:3] = [1, 2, 3]
    partner, targets = corpus_negatives(own, pool, 0.5, np.random.default_rng(1))
    assert abs(1 - targets.mean() - 0.5) < 0.01
    counts = Counter(partner[3:][targets[3:] == 0].tolist())
    assert set(counts) == {1, 2, 3} and max(counts.values()) / min(counts.values()) < 1.1


def test_itm_pairs_draw_other_images_of_the_text_db_outside_the_batch_anew_each_epoch(stores):
    ds = PretrainDataset(stores[:2], stores[2])  # c1 coco:1, c2 coco:2, c4 coco:1 (db a); s1 vg:3 (db b)
    pairs = ItmPairs(ds, neg_prob=1.0, seed=0)
    assert pairs.img_lens.tolist() == [5, 5, 5, 2]  # the most regions in the caption's text db
    assert pairs.epoch_img_lens(0).tolist() == [5, 3, 5, 2]  # c1 -> coco:2, c2 -> coco:1, c4 -> coco:2
    example = pairs.example(0, 0)
    assert (example["txt_id"], example["img_key"], example["itm_target"]) == ("c1", "coco:2", 0)
    assert example["img_feat"].shape == (5, DIM) and example["soft_labels"].shape == (5, CLASSES)
    assert pairs.example(0, 3)["itm_target"] == 1  # vg:3 is db b's only image
    # A batch of one caption gets a negative (in-batch donors cannot give one); ITM.prepare keeps it.
    prepared = PreparedBatches(pairs, lambda batch, generator: batch, 0, "train/itm", 0)[(0, 0, [0])]
    assert prepared["img_keys"] == ["coco:2"] and prepared["itm_targets"].tolist() == [0]
    # Redrawn every epoch (a pure function of the seed and the epoch).
    half = ItmPairs(ds, neg_prob=0.5, seed=5)
    assert half.draw(0)[1].tolist() != half.draw(1)[1].tolist()
    assert ItmPairs(ds, neg_prob=0.5, seed=5).draw(1)[1].tolist() == half.draw(1)[1].tolist()


def test_batches_are_packed_with_each_epochs_region_counts():
    txt, bound = np.full(40, 4), np.full(40, 10)
    rng = np.random.default_rng(0)
    lens = {e: rng.integers(1, 11, 40) for e in range(3)}
    sampler = UnitBatchSampler(txt, bound, 40, epoch_img_lens=lens.__getitem__, infinite=False)
    for epoch in range(3):
        batches = sampler.epoch_batches(epoch)
        assert sorted(i for b in batches for i in b) == list(range(40))
        assert all(padded_units(txt[b], lens[epoch][b]) <= 40 for b in batches)
    # 40 units would hold at most 2 examples at the bound (4 + 10 regions); the epoch's counts pack more.
    assert max(len(b) for b in sampler.epoch_batches(0)) > 2
    over = UnitBatchSampler(txt, np.full(40, 3), 40, epoch_img_lens=lens.__getitem__)
    with pytest.raises(ValueError, match="epoch 0: epoch_img_lens must be bounded by img_lens"):
        over.epoch_batches(0)


def test_streams_mix_tasks_by_dataset_weights_as_uniters_configs():
    tasks = {"itm": 3, "mlm": 4, "mrfr": 2, "mrc_kl": 2}
    mix = {s.name: s.ratio for s in streams(tasks, {"coco": 2, "vg": 3, "cc": 3, "sbu": 2})}
    # UNITER's pretrain-alldata-base-8gpu.json mix_ratio per dataset, tasks itm, mlm, mrfr, mrckl.
    official = {"coco": (6, 8, 4, 4), "vg": (9, 12, 6, 6), "cc": (9, 12, 6, 6), "sbu": (6, 8, 4, 4)}
    assert mix == {f"{task}/{d}": r for d, rs in official.items() for task, r in zip(tasks, rs, strict=True)}
    in_domain = streams({"itm": 2, "mlm": 2, "mrfr": 1, "mrc_kl": 1}, {"coco": 1, "vg": 1})
    sampler = TaskSampler({s.name: s.ratio for s in in_domain}, seed=0)
    # 12 parts: each dataset 6 (as UNITER's in-domain config: coco and vg drawn equally, whatever their sizes)
    assert sampler.probabilities == pytest.approx({
        "itm/coco": 2 / 12, "itm/vg": 2 / 12, "mlm/coco": 2 / 12, "mlm/vg": 2 / 12, "mrc_kl/coco": 1 / 12,
        "mrc_kl/vg": 1 / 12, "mrfr/coco": 1 / 12, "mrfr/vg": 1 / 12})
    # One corpus: the streams are the tasks themselves (names, ratios and seeds as before).
    assert [(s.name, s.ratio) for s in streams(tasks, {"": 1.0})] == sorted(tasks.items())


def test_the_alignment_task_is_one_stream_of_its_own_data():
    tasks = {"itm": 2, "mlm": 2, "owa": 1}
    mix = {s.name: (s.task, s.ratio) for s in streams(tasks, {"coco": 1, "vg": 3})}
    # owa's batches are the alignment annotations, not the caption datasets: one stream at its own ratio
    assert mix == {"itm/coco": ("itm", 2), "itm/vg": ("itm", 6), "mlm/coco": ("mlm", 2), "mlm/vg": ("mlm", 6),
                   "owa": ("owa", 1)}
    assert [(s.name, s.ratio) for s in streams(tasks, {"": 1.0})] == sorted(tasks.items())
