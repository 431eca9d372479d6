"""The pretraining loop on real Ray Train workers (DDP over gloo) and the pretrain stage, on a small generated
store: text dbs written with a WordPiece vocab trained on their captions, and a region store whose regions
are noisy prototypes of the (colour, shape) objects the captions name, so every objective can learn."""

import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import ray
import torch
from mlflow.tracking import MlflowClient
from ray import cloudpickle

from pipeline.config import RayConfig
from stages.base import MetricLogger, StageContext, StageError
from stages.outputs.features import FeaturesOutput
from stages.outputs.pretrain import PretrainOutput
from stages.outputs.txt_db import TxtDbOutput
from stages.pretrain import checkpointing
from stages.pretrain.config import PretrainConfig
from stages.pretrain.data import PretrainInputs, build_corpus, stream_examples, streams
from stages.pretrain.stage import RUN_NAME, build_trainer, fit, preflight
from stages.pretrain.stage import run as run_pretrain
from vlp.data.batching import UnitBatchSampler
from vlp.data.img_db import ImgDbWriter
from vlp.data.task_sampler import TaskSampler
from vlp.data.tokenizer import encode, save_tokenizer, tokenizer_meta, train_wordpiece
from vlp.data.txt_db import TxtDbWriter
from vlp.model import UniterModel
from vlp.train.checkpoints import load_pretrained
from vlp.train.prepared import ItmPairs, NumberedBatches, PreparedBatches
from vlp.train.pretrain_model import (
    build_model,
    encoder_config,
    loss_weights,
    objective_options,
    target_count,
)
from vlp.train.runtime import RuntimeConfig
from vlp.train.seeds import seed_of
from vlp.train.validate import DamsmValidation

# Hooks defined here travel to the Ray workers by value (this test module is not importable there).
cloudpickle.register_pickle_by_value(sys.modules[__name__])

SHAPES = ["circle", "square", "star", "heart", "moon", "cross"]
COLOURS = ["red", "blue", "green", "yellow"]
DIM = 32
NBB = (0.2, 100, 2)
SEED = 3  # the root seed of the loop tests
FP32 = RuntimeConfig(precision="fp32")


def build_store(root: Path, n_images: int, soft_labels: bool = True, seed: int = 0) -> PretrainInputs:
    """The txtdb output (tokenizer + toy_train / toy_val / toy_test dbs, 70/15/15% of the images) and the
    features output (the store, read with box rule NBB)."""
    rng = np.random.default_rng(seed)
    prototypes = rng.normal(size=(len(SHAPES), len(COLOURS), DIM)).astype(np.float32)
    scenes = {f"toy:{i}": [(int(rng.integers(len(SHAPES))), int(rng.integers(len(COLOURS))))
                           for _ in range(int(rng.integers(2, 4)))] for i in range(n_images)}
    features = FeaturesOutput(root / "features")
    with ImgDbWriter(features.store_dir, nbb_configs=[NBB]) as writer:
        for key, objects in scenes.items():
            n = len(objects) + int(rng.integers(1, 3))  # plus background clutter
            feats = rng.normal(scale=0.3, size=(n, DIM)).astype(np.float32)
            labels = np.zeros((n, len(SHAPES) + 1), np.float32)
            labels[:, 0] = 1.0
            for j, (shape, colour) in enumerate(objects):
                feats[j] += prototypes[shape, colour]
                labels[j] = 0.04
                labels[j, shape + 1] = 1.0 - 0.04 * len(SHAPES)
            xy = rng.uniform(0, 0.5, (n, 2))
            wh = rng.uniform(0.1, 0.5, (n, 2))
            writer.put(key, features=feats, norm_bb=np.concatenate([xy, xy + wh, wh], 1),
                       conf=np.sort(rng.uniform(0.3, 1.0, n))[::-1],
                       soft_labels=labels if soft_labels else labels[:, :0])
    features.write_stats({}, NBB, compress=False)
    captions = {key: [" and ".join(f"a {COLOURS[objects[o][1]]} {SHAPES[objects[o][0]]}"
                                   for o in rng.permutation(len(objects))) for _ in range(2)]
                for key, objects in scenes.items()}
    tok = train_wordpiece([c for caps in captions.values() for c in caps], 200)
    txtdb = TxtDbOutput(root / "txtdb")
    save_tokenizer(tok, txtdb.tokenizer_dir)
    keys = list(scenes)
    cut = [0, int(0.7 * n_images), int(0.85 * n_images), n_images]
    for name, lo, hi in zip(("train", "val", "test"), cut, cut[1:], strict=False):
        meta = tokenizer_meta(tok, "toy") | {"max_txt_len": 60}  # as the txtdb stage writes it
        with TxtDbWriter(txtdb.db_path(f"toy_{name}"), meta) as writer:
            for key in keys[lo:hi]:
                for v, ids in enumerate(encode(tok, captions[key])):
                    writer.add(f"{key}:{v}", {"input_ids": ids, "img_fname": key})
    return PretrainInputs(txtdb, features)


def loop_config(**over) -> PretrainConfig:
    """Exact arithmetic (fp32 at run time, no dropout), no validation: what the gradient and resume checks
    need. UNITER's mix without the default's itc: ITC's negatives are each worker's own batch, so two
    workers' gradient is not the global batch's (by design, as in ALBEF)."""
    base = dict(tasks={"mlm": 2.0, "mrfr": 1.0, "mrc_kl": 1.0, "itm": 2.0}, train_dbs=["toy_train"],
                batch_units=300, grad_accum=2, steps=8, num_workers=2,
                model={"dropout": 0.0}, optim={"warmup": 0.25, "lr": 1e-3}, checkpoint_every=2,
                keep_checkpoints=10, log_every=2, max_failures=1,
                validation={"every": 100, "dbs": [], "holdout_images": 0, "retrieval_db": None})
    return PretrainConfig(**(base | over))


def train(cfg: PretrainConfig, store: PretrainInputs, storage: Path, hooks=()):
    """The stage's Ray Train run: build_trainer, then fit."""
    return fit(build_trainer(cfg, store, storage, seed=SEED, runtime=FP32, hooks=hooks), storage)


@dataclass
class SaveGradients:
    """Rank 0 saves the model state and gradients at the first step of every task."""

    out: str

    def __call__(self, event) -> None:
        path = Path(self.out) / f"{event.task}.pt"
        if event.rank == 0 and not path.exists():
            grads = {n: p.grad.clone() for n, p in event.model.named_parameters() if p.grad is not None}
            torch.save({"step": event.step, "state": event.model.state_dict(), "grads": grads}, path)


@dataclass
class LogSteps:
    path: str

    def __call__(self, event) -> None:
        if event.rank == 0:
            with open(self.path, "a") as f:
                f.write(f"{event.step}\n")


@dataclass
class KillWorker:
    """Rank 1 exits hard at ``step``, once, after Ray Train registered the checkpoint of ``after``."""

    step: int
    after: int
    snapshot: str
    marker: str

    def __call__(self, event) -> None:
        if event.rank != 1 or event.step != self.step or os.path.exists(self.marker):
            return
        Path(self.marker).touch()
        deadline = time.time() + 60
        while time.time() < deadline:  # the controller registers reports when it polls the workers
            if os.path.exists(self.snapshot):
                latest = json.loads(Path(self.snapshot).read_text()).get("latest_checkpoint_result") or {}
                if latest.get("metrics", {}).get("step", 0) >= self.after:
                    break
            time.sleep(0.1)
        os._exit(1)


@dataclass
class PoisonWeights:
    """Makes the word embeddings NaN after the gradients of ``step``: the next step's loss is NaN."""

    step: int

    def __call__(self, event) -> None:
        if event.step == self.step:
            with torch.no_grad():
                event.model.encoder.embeddings.word_embeddings.weight.fill_(float("nan"))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("store"), n_images=60)


@pytest.fixture(scope="module")
def local_ray():
    # Faster failure detection and report collection than the 2 s default (read by the train controller).
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.5"
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()
    os.environ.pop("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")


def checkpoint_steps(storage: Path) -> list[int]:
    run = storage / RUN_NAME
    return sorted(checkpointing.load_progress(d)["step"] for d in run.glob("checkpoint_*")
                  if (d / checkpointing.PROGRESS_FILE).is_file())


def final_state(result) -> dict:
    with result.checkpoint.as_directory() as d:
        return checkpointing.load_state(Path(d))


@pytest.fixture(scope="module")
def uninterrupted(store, local_ray, tmp_path_factory):
    """Two workers, two micro-batches each, eight steps; gradients saved at the first step of each task."""
    out = tmp_path_factory.mktemp("grads")
    cfg = loop_config()
    result = train(cfg, store, out / "ray_train", hooks=[SaveGradients(str(out))])
    return cfg, out, result


def reference_gradients(cfg: PretrainConfig, corpus, saved: dict, task: str) -> dict[str, torch.Tensor]:
    """One process: the gradient of the mean loss over the global batch the two workers split between them
    (each worker's first ``grad_accum`` batches of the task), from the weights the workers had."""
    ucfg = encoder_config(cfg.model, int(corpus.meta["vocab_size"]), corpus.img_dim)
    model = build_model(ucfg, objective_options(cfg, corpus.meta, corpus.label_dim))
    model.load_state_dict(saved["state"])
    objective = model.objectives[task]
    (stream,) = [s for s in streams(cfg.tasks, corpus.weights) if s.name == task]
    examples, bound, epoch_img_lens = stream_examples(stream, corpus, cfg, SEED)  # ITM: corpus negatives
    batches = []
    for rank in range(cfg.num_workers):
        sampler = UnitBatchSampler(examples.txt_lens, bound, cfg.batch_units,
                                   seed=seed_of(SEED, "batches", task), rank=rank, world_size=cfg.num_workers,
                                   epoch_img_lens=epoch_img_lens)
        data = PreparedBatches(examples, objective.prepare, SEED, f"train/{task}", 0)
        items = iter(NumberedBatches(sampler))
        batches += [data[next(items)] for _ in range(cfg.grad_accum)]
    counts = [target_count(objective, b) for b in batches]
    weights = loss_weights(cfg)
    total = sum(
        n * sum(weights.get(k, 1.0) * v for k, v in model(task, b).items() if k.endswith("_loss"))
        for b, n in zip(batches, counts, strict=True)
    ) / sum(counts)
    total.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_two_workers_give_the_gradient_of_the_global_batch(uninterrupted, store):
    cfg, out, _ = uninterrupted
    sampler = TaskSampler(cfg.tasks, seed=SEED)
    first = {}
    for step in range(cfg.steps):
        first.setdefault(sampler.task(step), step + 1)
    assert first == {"mlm": 1, "mrfr": 2, "itm": 3, "mrc_kl": 5}
    corpus = build_corpus(cfg, SEED, store)
    for task, step in first.items():
        saved = torch.load(out / f"{task}.pt", weights_only=True)
        assert saved["step"] == step
        expected = reference_gradients(cfg, corpus, saved, task)
        assert saved["grads"].keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(saved["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=f"{task} {name}")


def test_killed_worker_resumes_from_the_last_checkpoint_with_the_step_count_intact(uninterrupted, store,
                                                                                  tmp_path):
    cfg, _, reference = uninterrupted
    storage = tmp_path / "ray_train"
    steps_log = tmp_path / "steps.txt"
    kill = KillWorker(step=5, after=4, snapshot=str(storage / RUN_NAME / "checkpoint_manager_snapshot.json"),
                      marker=str(tmp_path / "killed"))
    result = train(cfg, store, storage, hooks=[LogSteps(str(steps_log)), kill])
    assert (tmp_path / "killed").exists()
    # Attempt 1 ran steps 1-5 (killed in step 5); attempt 2 resumed from the step-4 checkpoint.
    assert [int(s) for s in steps_log.read_text().split()] == [1, 2, 3, 4, 5, 5, 6, 7, 8]
    assert checkpoint_steps(storage) == [2, 4, 6, 8]
    assert result.metrics["step"] == cfg.steps
    state, expected = final_state(result), final_state(reference)
    assert state["step"] == cfg.steps and state["task_sampler"]["step"] == cfg.steps
    # Sampler positions, masks, task choice and optimizer state resumed: the weights of a run without a kill.
    for name, value in expected["model"].items():
        torch.testing.assert_close(state["model"][name], value, rtol=1e-5, atol=1e-7, msg=name)


def test_nan_loss_names_step_and_task_and_a_rerun_resumes_from_the_last_checkpoint(store, local_ray,
                                                                                   tmp_path):
    cfg = loop_config(steps=6, num_workers=1)  # one worker: the check needs no DDP, and starts faster
    storage = tmp_path / "ray_train"
    steps_log = tmp_path / "steps.txt"
    with pytest.raises(StageError) as err:
        train(cfg, store, storage, hooks=[LogSteps(str(steps_log)), PoisonWeights(step=3)])
    assert str(err.value) == (
        "pretrain: non-finite loss itm_loss=nan, wra_loss=nan at step 4 (task 'itm'); training stopped, "
        "the last good checkpoint (step 2) is kept"
    )
    # The retry Ray Train makes (max_failures=1) fails at once instead of repeating the run.
    assert [int(s) for s in steps_log.read_text().split()] == [1, 2, 3]
    assert checkpoint_steps(storage) == [2]
    # Rerunning the stage on the same storage (same cache key) resumes from that checkpoint.
    result = train(cfg, store, storage, hooks=[LogSteps(str(steps_log))])
    assert [int(s) for s in steps_log.read_text().split()] == [1, 2, 3, 3, 4, 5, 6]
    assert result.metrics["step"] == 6 and checkpoint_steps(storage) == [2, 4, 6]


LAVITER = {"damsm": {"dim": 16},
           "laviter": {"generator_slots": 3, "cond_dim": 8, "noise_dim": 8, "mismatch": True}}


@pytest.mark.slow
def test_laviter_trains_its_discriminator_with_its_own_optimizer_and_resumes_exactly(store, local_ray,
                                                                                     tmp_path):
    # Two workers, LAViTeR (every part) beside MLM; rank 1 is killed in step 3, after the step-2 checkpoint.
    cfg = loop_config(tasks={"laviter": 1.0, "mlm": 1.0}, steps=4, **LAVITER)
    reference = train(cfg, store, tmp_path / "a")
    state = final_state(reference)
    corpus = build_corpus(cfg, SEED, store)
    torch.manual_seed(seed_of(SEED, "init"))
    initial = build_model(encoder_config(cfg.model, int(corpus.meta["vocab_size"]), corpus.img_dim),
                          objective_options(cfg, corpus.meta, corpus.label_dim)).state_dict()
    tasks = [TaskSampler(cfg.tasks, seed=SEED).task(step) for step in range(cfg.steps)]
    assert "laviter" in tasks
    # The discriminator has its own Adam, stepped once per LAViTeR step; the main optimizer has none of it.
    d_state = state["d_optimizer"]["state"]
    assert d_state and all(int(s["step"]) == tasks.count("laviter") for s in d_state.values())
    main = {p for group in state["optimizer"]["param_groups"] for p in group["params"]}
    n_disc = sum(1 for name in initial if name.startswith("objectives.laviter.discriminator."))
    assert len(d_state) == n_disc and len(main) + n_disc == len(
        [n for n in initial if "num_batches_tracked" not in n])
    moved = {n for n, v in state["model"].items() if not torch.equal(v, initial[n])}
    assert any(n.startswith("objectives.laviter.discriminator.") for n in moved)
    assert any(n.startswith("objectives.laviter.generator.") for n in moved)
    totals = checkpointing.load_progress(Path(reference.checkpoint.path))["totals"]["laviter"]
    assert math.isfinite(totals["laviter_disc_loss"]) and totals["laviter_disc_count"] > 0
    # A worker lost mid-run: the resumed run ends with the weights and both optimizers' states of the first.
    storage = tmp_path / "b" / "ray_train"
    kill = KillWorker(step=3, after=2, snapshot=str(storage / RUN_NAME / "checkpoint_manager_snapshot.json"),
                      marker=str(tmp_path / "killed"))
    resumed = final_state(train(cfg, store, storage, hooks=[kill]))
    assert (tmp_path / "killed").exists()
    for name, value in state["model"].items():
        torch.testing.assert_close(resumed["model"][name], value, rtol=1e-5, atol=1e-7, msg=name)
    for key, value in d_state.items():
        torch.testing.assert_close(resumed["d_optimizer"]["state"][key]["exp_avg"], value["exp_avg"],
                                   rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("task", ["laviter", "vta"])
def test_validation_of_damsm_tasks_scores_the_retrieval_split_without_an_itm_head(store, task):
    cfg = loop_config(tasks={task: 1.0}, validation={"dbs": [], "holdout_images": 0,
                                                     "retrieval_db": "toy_test"}, **LAVITER)
    corpus = build_corpus(cfg, SEED, store)
    assert corpus.retrieval is not None  # the split is read for the DAMSM heads alone
    torch.manual_seed(0)
    model = build_model(encoder_config(cfg.model, int(corpus.meta["vocab_size"]), corpus.img_dim),
                        objective_options(cfg, corpus.meta, corpus.label_dim))
    validation = DamsmValidation(model, corpus.retrieval, 0, torch.device("cpu"), nullcontext,
                                 lambda ids: " ".join(map(str, ids)))
    metrics = validation()
    damsm = {"zs_damsm_ir_r1", "zs_damsm_tr_r1", "r_precision", "r_precision_top3"}
    generation = {"r_precision_generated", "frechet_regions", "bleu4", "cider"}  # the generator and captioner
    assert damsm <= set(metrics) and bool(generation & set(metrics)) == (task == "laviter")
    assert generation <= set(metrics) or task == "vta"
    assert all(math.isfinite(v) for v in metrics.values())


def test_a_task_whose_input_the_store_lacks_fails_at_start(tmp_path):
    inputs = build_store(tmp_path, n_images=20, soft_labels=False)
    with pytest.raises(StageError) as err:
        preflight(loop_config(), SEED, inputs)
    assert str(err.value) == (f"pretrain.tasks: task 'mrc_kl' needs soft_labels, which the feature store "
                              f"{inputs.features.store_dir} does not provide")
    preflight(loop_config(tasks={"mlm": 1.0, "itm": 1.0, "mrfr": 1.0}), SEED, inputs)


def test_missing_db_and_too_small_batch_budget_fail_at_start(store):
    with pytest.raises(StageError) as err:
        preflight(loop_config(validation={"dbs": ["toy_dev"]}), SEED, store)
    assert str(err.value) == (f"pretrain.validation.dbs: text db 'toy_dev' not found in {store.txtdb.root} "
                              "(available: toy_test, toy_train, toy_val)")
    with pytest.raises(StageError, match=r"^pretrain\.batch_units: max_units=10 is below the size of"):
        preflight(loop_config(batch_units=10), SEED, store)


def test_the_box_rule_comes_from_the_features_output_and_must_be_in_the_store(store, tmp_path):
    features = FeaturesOutput(tmp_path / "features")
    shutil.copytree(store.features.store_dir, features.store_dir)
    features.write_stats({}, (0.2, 100, 2), compress=False)
    assert features.img_db().min_bb == 2  # pretrain, finetune and eval read the store with this rule
    features.write_stats({}, (0.3, 100, 2), compress=False)
    with pytest.raises(StageError) as err:
        preflight(loop_config(), SEED, PretrainInputs(store.txtdb, features))
    assert str(err.value) == (f"{features.stats_path}: box rule (0.3, 100, 2) has no sidecar "
                              f"nbb_th0.3_max100_min2.json in {features.store_dir}")


def test_text_dbs_of_another_tokenizer_fail_at_start(store, tmp_path):
    mixed = TxtDbOutput(tmp_path / "txtdb")
    shutil.copytree(store.txtdb.root, mixed.root)
    meta_file = mixed.db_path("toy_val") / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps(meta | {"MASK": meta["MASK"] + 1, "vocab_digest": "0" * 16}))
    with pytest.raises(StageError) as err:
        preflight(loop_config(validation={"dbs": ["toy_val"], "holdout_images": 0}), SEED,
                  PretrainInputs(mixed, store.features))
    assert str(err.value) == ("pretrain.validation.dbs: meta.json fields ['MASK', 'vocab_digest'] differ "
                              "from the train dbs' (text dbs built with another tokenizer)")


def test_corpus_keeps_evaluation_images_out_of_training(store):
    cfg = loop_config(train_dbs=["toy_train", "toy_val"],
                      validation={"dbs": ["toy_val"], "holdout_images": 5, "retrieval_db": "toy_test"})
    corpus = build_corpus(cfg, SEED, store)
    # 60 images with 2 captions each: train 42 images, val 9, test 9.
    assert (len(corpus.train), len(corpus.val), len(corpus.retrieval)) == (84 - 10, 10 + 18, 18)
    assert corpus.notes == ["train: 18 captions of validation or retrieval images left out",
                            "validation: 10 captions of 5 training images held out"]
    val_images = {k for part in corpus.val.datasets for k in part.img_keys}
    assert not val_images & set(corpus.train.img_keys)
    assert (corpus.img_dim, corpus.label_dim) == (DIM, len(SHAPES) + 1)


def test_named_datasets_give_one_stream_per_task_and_dataset(store):
    # UNITER's per-dataset mix: two datasets, the second weighted 3x; each is its own part of the corpus.
    cfg = loop_config(train_dbs={"a": {"dbs": ["toy_train"]},
                                 "b": {"dbs": ["toy_val", "toy_test"], "weight": 3}})
    corpus = preflight(cfg, SEED, store)
    assert corpus.weights == {"a": 1.0, "b": 3.0}
    assert set(corpus.parts["a"].img_keys) | set(corpus.parts["b"].img_keys) == set(corpus.train.img_keys)
    assert (len(corpus.parts["a"]), len(corpus.parts["b"])) == (84, 36)  # 42 and 9 + 9 images, 2 captions
    assert {s.name: s.ratio for s in streams(cfg.tasks, corpus.weights)} == {
        "itm/a": 2.0, "itm/b": 6.0, "mlm/a": 2.0, "mlm/b": 6.0, "mrc_kl/a": 1.0, "mrc_kl/b": 3.0,
        "mrfr/a": 1.0, "mrfr/b": 3.0}
    # ITM's batches: corpus negatives (default) pair captions anew each epoch; in-batch donors read the part.
    itm_a = next(s for s in streams(cfg.tasks, corpus.weights) if s.name == "itm/a")
    examples, bound, per_epoch = stream_examples(itm_a, corpus, cfg, SEED)
    assert isinstance(examples, ItmPairs) and examples.dataset is corpus.parts["a"] and per_epoch is not None
    batch_cfg = cfg.model_copy(update={"itm_negatives": "batch"})
    examples, bound, per_epoch = stream_examples(itm_a, corpus, batch_cfg, SEED)
    assert examples is corpus.parts["a"] and bound is examples.img_lens and per_epoch is None
    with pytest.raises(ValueError, match="train_dbs lists a text db twice"):
        loop_config(train_dbs={"a": {"dbs": ["toy_train"]}, "b": {"dbs": ["toy_train"]}})


@pytest.mark.slow
def test_pretrain_stage_end_to_end(store, local_ray, tmp_path):
    cfg = PretrainConfig(
        train_dbs=["toy_train"], batch_units=400, steps=60, num_workers=2, log_every=10,
        checkpoint_every=30, optim={"warmup": 0.1, "lr": 1e-3},
        validation={"every": 30, "dbs": ["toy_val"], "holdout_images": 0, "retrieval_db": "toy_test",
                    "retrieval_every": 0, "retrieval_chunk": (3, 16)},
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("t")).info.run_id
    out = PretrainOutput(tmp_path / "out")
    ctx = StageContext(cfg=SimpleNamespace(pretrain=cfg, seed=0, runtime=RuntimeConfig(), ray=RayConfig()),
                       workdir=tmp_path,
                       out_dir=out.root, inputs={"txtdb": store.txtdb.root, "features": store.features.root},
                       mlflow_run_id=run_id, mlflow_tracking_uri=uri)
    result = run_pretrain(ctx)

    record = json.loads(out.metrics_path.read_text())
    assert record["steps"] == 60 and result.metrics["steps"] == 60
    untrained, final = record["untrained"], record["final"]
    # The final metrics are the curves' last points: the same names, at the last step.
    assert result.metrics["val/mlm_acc"] == final["mlm_acc"] and result.metric_steps["val/mlm_acc"] == 60
    assert result.metrics["train/mlm/units_per_s"] == record["throughput"]["mlm/units_per_s"]
    assert client.get_metric_history(run_id, "val/mlm_acc")[0].value == untrained["mlm_acc"]
    assert final["mlm_acc"] > untrained["mlm_acc"] + 0.3
    assert final["mlm_loss"] < untrained["mlm_loss"] - 1.0
    assert {"itm_acc", "mrc_kl_acc", "zs_ir_r1", "zs_tr_r10", "zs_meta_sum"} <= final.keys()
    assert all(record["throughput"][f"{t}/units_per_s"] > 0 for t in cfg.tasks)
    assert out.missing() == []
    # Where the two workers ran, for the record (one attempt, both on this machine's one node).
    assert result.params["attempts"] == 1 and len(result.params["worker_nodes"].split(",")) == 2

    model = UniterModel.from_pretrained(out.model_dir)
    assert model.config.img_dim == DIM and model.config.vocab_size == int(
        json.loads((store.txtdb.db_path("toy_train") / "meta.json").read_text())["vocab_size"])
    heads = torch.load(out.model_dir / "heads.pt", weights_only=True)
    assert {k.split(".")[0] for k in heads} == set(cfg.tasks)
    vocab = (store.txtdb.tokenizer_dir / "vocab.txt").read_bytes()
    assert (out.tokenizer_dir / "vocab.txt").read_bytes() == vocab
    # The model dir alone rebuilds encoder and heads (their configs are stored with the weights).
    loaded = load_pretrained(out.model_dir)
    assert sorted(loaded.objectives) == sorted(cfg.tasks)
    torch.testing.assert_close(loaded.objectives.state_dict(), heads)

    # Curves from rank 0 in the stage's MLflow run: training every 10 steps, validation at 0, 30, 60.
    loss = client.get_metric_history(run_id, "train/mlm/mlm_loss")
    assert [m.step for m in loss] == [10, 20, 30, 40, 50, 60]
    assert [m.step for m in client.get_metric_history(run_id, "val/mlm_acc")] == [0, 30, 60]
    assert [m.step for m in client.get_metric_history(run_id, "val/zs_ir_r1")] == [0, 60]
    assert client.get_metric_history(run_id, "train/itm/units_per_s")[-1].value > 0
    # What the graph runner logs for the stage: its final metrics, each at the step its curve ends.
    MetricLogger(uri, run_id).log(result.metrics, steps=result.metric_steps)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val/mlm_acc")][-1] == (
        60, final["mlm_acc"])


def test_codis_tasks_train_on_two_workers_with_teacher_and_queue(store, local_ray, tmp_path):
    """CODIS's tasks through the real loop (2 DDP workers, gloo): no NaN, every loss logged per task to
    MLflow, the teacher saved and moved away from the student, the queue filled, ITC-shortlist retrieval."""
    tasks = {"mlm": 1.0, "itm": 1.0, "itc": 1.0, "itc_intra": 1.0, "codebook": 1.0}
    cfg = loop_config(tasks=tasks, steps=6, grad_accum=1, itc_queue=48, itc_distill=0.4,
                      itm_negatives="contrastive", codebook_size=8, checkpoint_every=6, log_every=2,
                      model={"dropout": 0.0, "fusion_start": 1},
                      validation={"every": 100, "dbs": [], "holdout_images": 0, "retrieval_db": "toy_test",
                                  "retrieval_every": 0, "retrieval_modes": ["full", "itc_rerank"],
                                  "retrieval_shortlist_k": 3, "retrieval_chunk": (3, 16)})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("codis")).info.run_id
    trainer = build_trainer(cfg, store, tmp_path / "ray_train", seed=SEED, runtime=FP32,
                            metrics=MetricLogger(uri, run_id))
    state = final_state(fit(trainer, tmp_path / "ray_train"))["model"]
    sampler = TaskSampler(cfg.tasks, seed=SEED)
    drawn = {sampler.task(step) for step in range(cfg.steps)}
    names = {"itc": ["itc_loss"], "itc_intra": ["itc_intra_loss"], "itm": ["itm_loss", "wra_loss"],
             "codebook": ["codebook_ot_loss", "codebook_pred_loss"], "mlm": ["mlm_loss"]}
    for task in drawn:
        for loss in names[task]:
            history = client.get_metric_history(run_id, f"train/{task}/{loss}")
            assert history and all(np.isfinite(m.value) for m in history), (task, loss)
    assert {"itc", "itc_intra", "codebook"} <= drawn  # the seed draws each CODIS task at least once
    # Zero-shot retrieval at steps 0 and 6: every pair by ITM, and the ITC shortlist reranked by ITM.
    for name in ("zs_ir_r1", "zs_itc_ir_r1", "zs_itc_rerank_ir_r1", "zs_itc_rerank_meta_sum"):
        assert [m.step for m in client.get_metric_history(run_id, f"val/{name}")] == [0, 6], name
    # The queue was filled with unit-norm teacher features (tests/test_codis.py checks the gather itself).
    count = int(state["objectives.itc.queue.count"])
    norms = state["objectives.itc.queue.text"][:count].norm(dim=1)
    assert 0 < count <= 48 and (norms - 1).abs().max() < 1e-4
    # The teacher is checkpointed and is the EMA of the student: close to it, not equal after training.
    for name in ("encoder.encoder.layers.0.qkv.weight", "text_proj.weight"):
        student = state[("objectives.itc." if name.startswith("text") else "") + name]
        teacher = state[f"teacher.copies.{name}"]
        assert not torch.equal(teacher, student) and torch.isfinite(teacher).all()
