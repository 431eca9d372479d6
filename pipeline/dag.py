"""Plan the stages a target needs, then run them as a graph of Ray tasks.

Keys are computed on the driver before anything runs (code + config subset + input keys), so the plan
already says which stages are cached. Cached stages are recorded by the driver; every other stage is a
Ray task that takes its upstream tasks' result refs as arguments, so Ray's scheduler runs the graph in
dependency order and independent branches in parallel, and each commits atomically. (The lazy
``DAGNode.bind``/``execute`` API builds the same graph but is deprecated in Ray 2.60.) Every stage, cached
or not, gets an MLflow child run under the invocation's parent run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import ray

from pipeline.cache import StageStore, code_digest, content_digest, stage_key
from pipeline.config import PipelineConfig, with_overrides
from pipeline.stages import ALL, STAGES
from pipeline.tracking import Tracker, mlflow_metric_names
from stages.base import MetricLogger, StageContext, StageError
from stages.outputs import StageOutput
from stages.outputs.world import WorldOutput
from worldgen.mirror import Mirror

log = logging.getLogger("vlp.pipeline")

# What `--stage all` runs to (and the sweep, when a study is configured); every other stage is upstream of
# one of these.
TERMINAL = ("finetune", "eval")


@dataclass
class PlannedStage:
    name: str
    key: str
    # Input name as the stage sees it in ctx.inputs -> that output's key. A per-seed stage sees its own
    # seed's upstream under plain stage names; a stage aggregating seeds sees "<stage>@<seed>".
    inputs: dict[str, str]
    config: dict[str, Any]
    cached: bool
    force: bool = False
    label: str = ""  # unique in the plan: the stage name, "<stage>@<seed>" when the key varies by seed
    seed: int = 0  # the root seed the stage runs with
    needs: list[str] = field(default_factory=list)  # labels of the planned stages it waits for
    # Config overrides it runs with (a study trial's downstream stages: finetune.encoder=sweep:<trial>).
    overrides: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.label = self.label or self.name


@dataclass
class Outcome:
    name: str  # the planned stage's label
    key: str
    output_dir: str
    cached: bool
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)


def _closure(cfg: PipelineConfig, targets: tuple[str, ...]) -> list[str]:
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        for up in STAGES[name].upstream(cfg):
            visit(up)
        order.append(name)

    for t in targets:
        visit(t)
    return order


def stage_dir_name(label: str) -> str:
    """The stage an input label or plan label names ("pretrain@1" -> "pretrain")."""
    return label.partition("@")[0]


def plan(cfg: PipelineConfig, target: str, store: StageStore, force: bool = False) -> list[PlannedStage]:
    """Every stage ``target`` needs, with its key and whether it is cached, once per seed of ``cfg.seeds``
    (or ``cfg.seed``). A stage whose key does not depend on the seed is planned once; a stage marked
    ``across_seeds`` (the aggregates) is planned once with the inputs of every seed."""
    if target != ALL and target not in STAGES:
        raise ValueError(f"unknown stage {target!r}; choose from {', '.join([*STAGES, ALL])}")
    seeds = list(cfg.seeds) or [cfg.seed]
    study = cfg.sweep.study
    targets = ((*TERMINAL, *(("sweep",) if study is not None and study.pretraining else ()),
                *(("sweep_downstream",) if study is not None and study.downstream is not None else ()))
               if target == ALL else (target,))
    digests: dict[str, str] = {}  # per entry module: the per-task stages share theirs

    def key_of(name: str, seed_cfg: PipelineConfig, inputs: dict[str, str]) -> tuple[str, dict[str, Any]]:
        spec = STAGES[name]
        subset = seed_cfg.subset(spec.config)
        files = {f: content_digest(f) for f in spec.files(seed_cfg) if f is not None}
        if spec.module not in digests:
            digests[spec.module] = code_digest(spec.module)
        return stage_key(name, digests[spec.module], subset, inputs, files), subset

    def across(name: str) -> bool:
        return STAGES[name].across_seeds and len(seeds) > 1

    # Pass 1: every per-seed stage's key under each seed.
    keys: dict[int, dict[str, str]] = {}
    subsets: dict[int, dict[str, dict[str, Any]]] = {}
    order: list[str] = []
    for seed in seeds:
        seed_cfg = cfg.model_copy(update={"seed": seed})
        keys[seed], subsets[seed] = {}, {}
        for name in _closure(seed_cfg, targets):
            order += [name] if name not in order else []
            if across(name) or STAGES[name].over_trials:
                continue
            if STAGES[name].first_seed_only and seed != seeds[0]:  # every seed's consumers read the one run
                keys[seed][name], subsets[seed][name] = keys[seeds[0]][name], subsets[seeds[0]][name]
                continue
            inputs = {up: keys[seed][up] for up in STAGES[name].upstream(seed_cfg)}
            keys[seed][name], subsets[seed][name] = key_of(name, seed_cfg, inputs)

    def label(name: str, seed: int) -> str:
        varies = len({keys[s][name] for s in seeds if name in keys[s]}) > 1
        return f"{name}@{seed}" if varies else name

    planned: dict[str, PlannedStage] = {}
    for name in order:
        forced = force and name == target
        if STAGES[name].over_trials:
            continue
        if across(name):
            upstream = STAGES[name].upstream(cfg)
            inputs = {f"{up}@{s}": keys[s][up] for s in seeds for up in upstream}
            key, subset = key_of(name, cfg, inputs)
            needs = list(dict.fromkeys(label(up, s) for s in seeds for up in upstream))
            planned[name] = PlannedStage(name, key, inputs, subset, store.is_done(name, key) and not forced,
                                         forced, name, seeds[0], needs)
            continue
        for seed in seeds:
            if name not in keys[seed]:
                continue
            here = label(name, seed)
            if here in planned:
                continue
            seed_cfg = cfg.model_copy(update={"seed": seed})
            upstream = STAGES[name].upstream(seed_cfg)
            key = keys[seed][name]
            planned[here] = PlannedStage(
                name, key, {up: keys[seed][up] for up in upstream}, subsets[seed][name],
                store.is_done(name, key) and not forced, forced, here, seed,
                [label(up, seed) for up in upstream])
    for name in order:  # after the seeds' stages, whose labels they reuse
        if STAGES[name].over_trials:
            forced = force and name == target
            _plan_trials(name, cfg, seeds[0], keys[seeds[0]], planned, key_of, store, forced)
    return _one_ray_data_stage_at_a_time(_run_exclusive_alone(list(planned.values())))


def _plan_trials(name: str, cfg: PipelineConfig, seed: int, seed_keys: dict[str, str],
                 planned: dict[str, PlannedStage], key_of, store: StageStore, forced: bool) -> None:
    """Plan ``name`` (the study's downstream comparison) over the study's trials: each trial's ``eval_<task>``
    of the study's downstream tasks with everything they need, under the trial's overrides
    (``Study.downstream_overrides``: ``finetune.encoder=sweep:<trial>`` or a finetuning seed, the row's
    finetune settings) and the first seed (a pretraining study pretrained on its regions). A stage whose
    key is the same for every trial (features, karpathy_txtdb, ...) is planned once, or reused when the
    seeds' plan already has it; one that varies is labelled ``<stage>@<trial>``."""
    study = cfg.sweep.study
    if study is None or study.downstream is None:
        raise ValueError(f"{name}: sweep.study names no study with a downstream section "
                         "(sweep.study.downstream: the tasks its trials are finetuned on)")
    evals = tuple(f"eval_{task}" for task in study.downstream.tasks)
    overrides = study.downstream_overrides()
    trials = list(overrides)
    keys: dict[str, dict[str, str]] = {}
    subsets: dict[str, dict[str, dict[str, Any]]] = {}
    cfg_data = cfg.model_dump(mode="json")
    configs = {t: stage_config(cfg_data, seed, overrides[t]) for t in trials}
    order: list[str] = []
    for t in trials:
        keys[t], subsets[t] = {}, {}
        for stage in _closure(configs[t], evals):
            order += [stage] if stage not in order else []
            inputs = {up: keys[t][up] for up in STAGES[stage].upstream(configs[t])}
            keys[t][stage], subsets[t][stage] = key_of(stage, configs[t], inputs)
    by_key = {(ps.name, ps.key): ps.label for ps in planned.values()}

    def label(stage: str, t: str) -> str:
        key = keys[t][stage]
        if (stage, key) in by_key:
            return by_key[(stage, key)]
        plain = len({keys[other][stage] for other in trials}) == 1 and stage not in planned
        return stage if plain else f"{stage}@{t}"

    for stage in order:
        for t in trials:
            here = label(stage, t)
            if here in planned:
                continue
            upstream = STAGES[stage].upstream(configs[t])
            planned[here] = PlannedStage(
                stage, keys[t][stage], {up: keys[t][up] for up in upstream}, subsets[t][stage],
                store.is_done(stage, keys[t][stage]), False, here, seed, [label(up, t) for up in upstream],
                overrides[t])
            by_key[(stage, keys[t][stage])] = here
    inputs = {f"{e}@{t}": keys[t][e] for t in trials for e in evals}
    needs = [label(e, t) for t in trials for e in evals]
    if study.pretraining:
        inputs["sweep"] = seed_keys["sweep"]
        needs.append(by_key[("sweep", seed_keys["sweep"])])
    key, subset = key_of(name, cfg, inputs)
    planned[name] = PlannedStage(name, key, inputs, subset, store.is_done(name, key) and not forced, forced,
                                 name, seed, needs)


def _run_exclusive_alone(stages: list[PlannedStage]) -> list[PlannedStage]:
    """Add the waits that run every ``exclusive`` stage alone (StageSpec.exclusive): after everything
    upstream of any of them, and before everything else; returned in an order where needs come first."""
    by_label = {ps.label: ps for ps in stages}
    exclusive = [ps.label for ps in stages if STAGES[ps.name].exclusive]
    if not exclusive:
        return stages
    before: set[str] = set()
    todo = [need for label in exclusive for need in by_label[label].needs]
    while todo:
        label = todo.pop()
        if label not in before and label not in exclusive:
            before.add(label)
            todo += by_label[label].needs
    first, last = exclusive[0], exclusive[-1]
    by_label[first].needs += sorted(before - set(by_label[first].needs))
    for earlier, later in pairwise(exclusive):  # one seed after another
        by_label[later].needs.append(earlier)
    waits: dict[str, bool] = {}  # whether a stage already waits for the last exclusive run through its needs

    def waits_already(label: str) -> bool:
        if label not in waits:
            waits[label] = any(n == last or waits_already(n) for n in by_label[label].needs)
        return waits[label]

    for ps in stages:
        if ps.label not in before and ps.label not in exclusive and not waits_already(ps.label):
            ps.needs.append(last)
    ordered: list[PlannedStage] = []
    placed: set[str] = set()
    while len(ordered) < len(stages):
        for ps in stages:
            if ps.label not in placed and all(n in placed for n in ps.needs):
                ordered.append(ps)
                placed.add(ps.label)
    return ordered


def _one_ray_data_stage_at_a_time(stages: list[PlannedStage]) -> list[PlannedStage]:
    """Chain the ``ray_data`` stages (StageSpec.ray_data) so that they run one after another; ``stages`` is
    in an order where needs come first, and each waits only for one before it, so the order stays valid."""
    previous = None
    for ps in stages:
        if STAGES[ps.name].ray_data:
            if previous is not None and previous not in ps.needs:
                ps.needs.append(previous)
            previous = ps.label
    return stages


@contextmanager
def world_mirror(stage: str, serves_world: bool, inputs: dict[str, Path]) -> Iterator[str | None]:
    """The base URL of a loopback mirror serving the world output in ``inputs`` (None if not asked for).

    It lives exactly as long as the stage that asked for it, on the node that runs the stage; the
    stage sees only the URL, as it would a mirror of the real web.
    """
    if not serves_world:
        yield None
        return
    if "world" not in inputs:  # a registry bug: serves_world without the world upstream
        raise ValueError(f"stage {stage!r} asks for the world mirror but does not read the world stage")
    world = WorldOutput(inputs["world"])
    with Mirror(world.www, world.faults_file) as mirror:
        log.info("%s: serving %s on %s", stage, world.www, mirror.base_url)
        yield mirror.base_url


def stage_config(cfg_data: dict[str, Any], seed: int, overrides: tuple[str, ...]) -> PipelineConfig:
    """The config a planned stage runs with: the invocation's, with the stage's seed and overrides."""
    cfg = PipelineConfig.model_validate(cfg_data).model_copy(update={"seed": seed})
    return with_overrides(cfg, overrides)


def _compute(ps: PlannedStage, cfg_data: dict[str, Any], store: StageStore, workdir: Path, run_id: str,
             tracking_uri: str, start: float) -> dict[str, Any]:
    """Run the stage into its partial dir and commit it; returns the manifest."""
    cfg = stage_config(cfg_data, ps.seed, ps.overrides)
    inputs = {name: store.final_dir(stage_dir_name(name), key) for name, key in ps.inputs.items()}
    for name, directory in inputs.items():
        stage = stage_dir_name(name)
        _check_complete(STAGES[stage].output(directory),
                        f"input {name!r} is incomplete; recompute it with --stage {stage} --force")
    out = store.begin(ps.name, ps.key, fresh=ps.force)
    spec = STAGES[ps.name]
    with world_mirror(ps.name, spec.serves_world(cfg), inputs) as mirror_url:
        ctx = StageContext(cfg=cfg, workdir=workdir, out_dir=out, inputs=inputs, mlflow_run_id=run_id,
                           mlflow_tracking_uri=tracking_uri, mirror_url=mirror_url)
        log.info("%s: running (key %s)", ps.label, ps.key)
        result = spec.load()(ctx)
    manifest = {
        "stage": ps.name,
        "key": ps.key,
        "inputs": ps.inputs,
        "config": ps.config,
        "metrics": result.metrics,
        "metric_steps": result.metric_steps,
        "tags": result.tags,
        "params": result.params,
        "artifacts": result.artifacts,
        "seconds": round(time.time() - start, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "layout": {"output": spec.output.__name__, "required": list(spec.output.REQUIRED)},
    }
    _check_complete(spec.output(out), f"{ps.name}: the stage's output is incomplete, nothing committed")
    store.commit(ps.name, ps.key, manifest)
    return manifest


def _check_complete(output: StageOutput, what: str) -> None:
    lacking = output.missing()
    if lacking:
        shown = ", ".join(lacking[:3]) + (f" and {len(lacking) - 3} more" if len(lacking) > 3 else "")
        raise StageError(f"{output.root}: {what} (lacks {shown})")


def _record(ps: PlannedStage, manifest: dict[str, Any], store: StageStore, tracker: Tracker, run_id: str,
            start: float) -> Outcome:
    """Log a committed stage's metrics, params, tags and artifacts to its child run and close the run."""
    final = store.final_dir(ps.name, ps.key)
    final_metrics = {**manifest["metrics"], "stage_seconds": manifest["seconds"]}
    final_metrics, steps = mlflow_metric_names(final_metrics, manifest.get("metric_steps"))
    MetricLogger(tracker.uri, run_id).log(final_metrics, steps=steps)
    tracker.log(
        run_id,
        params={"config": ps.config, "inputs": ps.inputs, **manifest["params"]},
        tags={"cached": str(ps.cached).lower(), "output_dir": str(final), **manifest.get("tags", {})},
    )
    tracker.log_artifacts(run_id, [final / a for a in manifest["artifacts"]], final)
    tracker.end(run_id)
    return Outcome(ps.label, ps.key, str(final), ps.cached, time.time() - start, manifest["metrics"])


def _start_child_run(ps: PlannedStage, tracking: dict[str, str], workdir: Path) -> tuple[Tracker, str]:
    tracker = Tracker(tracking["uri"], tracking["experiment"], workdir)
    run_id = tracker.start_run(
        ps.label, tracking["parent_run_id"], tags={"stage": ps.name, "cache_key": ps.key, "seed": ps.seed}
    )
    return tracker, run_id


def record_cached(ps: PlannedStage, workdir: Path, tracking: dict[str, str]) -> Outcome:
    """A stage the plan found committed, recorded by the driver itself: starting a Ray worker (seconds each,
    importing torch and MLflow) only to read a manifest made a fully cached ``--stage all`` take 40 s."""
    store = StageStore(workdir)
    start = time.time()
    manifest = store.manifest(ps.name, ps.key)
    if manifest is None:
        raise StageError(f"{store.final_dir(ps.name, ps.key)}: planned as cached but has no manifest; "
                         f"was it removed during the run? Run again")
    log.info("%s: cached (key %s), skipping", ps.label, ps.key)
    tracker, run_id = _start_child_run(ps, tracking, workdir)
    with _ended_on_error(tracker, run_id):
        return _record(ps, manifest, store, tracker, run_id, start)


@contextmanager
def _ended_on_error(tracker: Tracker, run_id: str) -> Iterator[None]:
    """A stage run whose stage raises ends FAILED; an interrupted one (Ctrl-C, SIGTERM, a cancelled task)
    KILLED."""
    try:
        yield
    except Exception:
        tracker.end(run_id, "FAILED")
        raise
    except BaseException:
        tracker.end(run_id, "KILLED")
        raise


# max_retries=0: a stage whose process died (SIGBUS on a damaged store, OOM) would only die again, and
# stages that can resume (download shards, Ray Train) retry their own units of work.
@ray.remote(num_cpus=0, max_retries=0)
def _run_stage(
    stage: dict[str, Any],
    cfg_data: dict[str, Any],
    workdir: str,
    tracking: dict[str, str],
    *upstream: Outcome,
) -> Outcome:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ps = PlannedStage(**stage)
    store = StageStore(Path(workdir))
    tracker, run_id = _start_child_run(ps, tracking, Path(workdir))
    start = time.time()
    with _ended_on_error(tracker, run_id):
        # Another invocation on this work dir may be computing the same output: wait for it.
        with store.lock(ps.name, ps.key, lambda: log.info(
                "%s: waiting for another run computing key %s in this work dir", ps.label, ps.key)):
            manifest = None if ps.force else store.manifest(ps.name, ps.key)
            if manifest is not None:
                log.info("%s: committed by another run meanwhile (key %s), skipping", ps.label, ps.key)
                ps.cached = True
            else:
                manifest = _compute(ps, cfg_data, store, Path(workdir), run_id, tracking["uri"], start)
        return _record(ps, manifest, store, tracker, run_id, start)


def execute(
    cfg: PipelineConfig, stages: list[PlannedStage], workdir: Path, tracking: dict[str, str],
    runtime_env: dict[str, Any] | None = None,
) -> list[Outcome]:
    """Record the cached stages here, submit every other stage with its upstream results (refs, or the
    cached stages' outcomes) and wait for the whole graph; outcomes in plan order. ``runtime_env``: of
    every stage task and, through Ray's inheritance, of everything it starts (pipeline/cluster.py). Needs
    a Ray connection only when some stage runs."""
    results: dict[str, Outcome | ray.ObjectRef] = {}
    for ps in stages:
        if ps.cached:
            results[ps.label] = record_cached(ps, workdir, tracking)
    pending = [ps for ps in stages if not ps.cached]
    if pending:
        cfg_data = cfg.model_dump(mode="json")
        # A reservation no node can hold would wait forever: cap it at the largest node (threads share it).
        largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
        for ps in pending:
            upstream = [results[label] for label in ps.needs]
            cpus = min(STAGES[ps.name].cpus(cfg), largest)
            task = _run_stage.options(num_cpus=cpus, runtime_env=runtime_env)
            results[ps.label] = task.remote(ps.__dict__, cfg_data, str(workdir), tracking, *upstream)
        labels = [ps.label for ps in pending]
        results.update(zip(labels, ray.get([results[label] for label in labels]), strict=True))
    return [results[ps.label] for ps in stages]
