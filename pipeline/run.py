"""Command line entry: ``python pipeline/run.py --stage {world,download,dedup,all} [key.sub=value ...]``.

Runs on the Ray cluster named by RAY_ADDRESS (as under ``ray job submit``), otherwise on a local Ray
started for this invocation; every stage task gets the cluster's address as RAY_ADDRESS. Outputs are cached
under the work dir, which every node of the cluster must see; see README.md and cluster/README.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from contextlib import ExitStack
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0]).resolve() == _HERE:  # run as a script: import the repo's packages
    sys.path[0] = str(_HERE.parent)

import ray  # noqa: E402
import yaml  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from pipeline.cache import StageStore, file_lock  # noqa: E402
from pipeline.cluster import (  # noqa: E402
    alive_nodes,
    check_shared_workdir,
    connect,
    runtime_env,
    tracking_server,
)
from pipeline.config import DEFAULT_CONFIG, load_config  # noqa: E402
from pipeline.dag import execute, plan  # noqa: E402
from pipeline.stages import ALL, STAGES  # noqa: E402
from pipeline.tracking import Tracker, flatten, tracking_uri  # noqa: E402
from stages.base import StageError  # noqa: E402

log = logging.getLogger("vlp.pipeline")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Vision-language pretraining pipeline (Ray + MLflow).")
    p.add_argument(
        "--stage", required=True, choices=[*STAGES, ALL], help="stage to produce (with its upstream)"
    )
    p.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help="YAML config (default: configs/demo.yaml)"
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path(os.environ.get("VLP_WORKDIR", "work")),
        help="where stage outputs and the MLflow store live (default: ./work or $VLP_WORKDIR)",
    )
    p.add_argument("--force", action="store_true", help="recompute the named stage even if cached (only it)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return p.parse_args(argv)


def _root_cause(err: BaseException) -> BaseException:
    while isinstance(err, ray.exceptions.RayTaskError) and err.cause is not None:
        err = err.cause
    return err


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except StageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    store = StageStore(workdir)
    stages = plan(cfg, args.stage, store, force=args.force)
    for ps in stages:
        log.info("plan: %-10s key %s  %s", ps.label, ps.key, "cached" if ps.cached else "run")

    # A run whose every stage is cached reads manifests and logs to MLflow: it needs no cluster.
    needs_ray = any(not ps.cached for ps in stages)
    gcs, own_ray = connect(cfg.ray.num_cpus) if needs_ray else (None, False)
    try:
        with ExitStack() as stack:
            store_uri = uri = tracking_uri(cfg.tracking.uri, workdir)
            if needs_ray:
                nodes = alive_nodes()
                log.info("Ray cluster %s: %d node(s)", gcs, len(nodes))
                check_shared_workdir(workdir, nodes)
                if len(nodes) > 1 and uri.startswith("sqlite:"):
                    # Several nodes writing one sqlite file (on shared storage) is what MLflow warns against.
                    uri = stack.enter_context(tracking_server(workdir, cfg.tracking.server_host))
            else:
                log.info("every stage is cached: Ray not started")
            code, outcomes, parent = _run_graph(cfg, args, stages, workdir, uri, gcs, own_ray)
    except StageError as err:
        if own_ray:
            ray.shutdown()
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        if own_ray:
            ray.shutdown()
    if code:
        return code
    for o in outcomes:
        state = "cached, skipped" if o.cached else f"ran in {o.seconds:.1f}s"
        print(f"{o.name:10s} {state:18s} {o.output_dir}")
    # A server started for this run is gone by now: browse the store it wrote. MLflow 3's UI opens an
    # experiment on its GenAI view unless the URL asks for the model-training one.
    print(f"MLflow: mlflow ui --backend-store-uri {store_uri}  (parent run {parent}); then open "
          f"http://127.0.0.1:5000/#/experiments/{MlflowClient(store_uri).get_run(parent).info.experiment_id}"
          "/runs?workflowType=machine_learning")
    return 0


def _run_graph(cfg, args, stages, workdir: Path, uri: str, gcs: str | None, own_ray: bool):
    """Tracking runs and the stage graph; returns (exit code, outcomes, parent run id)."""
    # Creating the sqlite store and the experiment is not safe against a second run doing the same.
    with file_lock(workdir / ".mlflow.lock"):
        tracker = Tracker(uri, cfg.tracking.experiment, workdir)
    parent = tracker.start_run(
        f"{cfg.name}:{args.stage}", tags={"target": args.stage, "workdir": str(workdir)}
    )
    resolved = cfg.model_dump(mode="json")
    tracker.log(parent, params=flatten(resolved))
    tracker.log_text(parent, yaml.safe_dump(resolved, sort_keys=False), "config.yaml")
    try:
        outcomes = execute(
            cfg,
            stages,
            workdir,
            {"uri": uri, "experiment": cfg.tracking.experiment, "parent_run_id": parent},
            runtime_env=runtime_env(gcs) if gcs else None,
        )
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM (`ray job stop`; ray.init makes it exit)
        tracker.end_interrupted(parent)
        raise
    except Exception as err:  # noqa: BLE001 - turned into one line for the user, traceback for the rest
        cause = _root_cause(err)
        tracker.end(parent, "FAILED")
        # Shut Ray down first: its workers' log lines still in flight would otherwise follow the error.
        if own_ray:
            ray.shutdown()
        if isinstance(cause, StageError):
            print(f"error: {cause}", file=sys.stderr)
            return 1, [], parent
        raise
    tracker.end(parent)
    return 0, outcomes, parent


if __name__ == "__main__":
    sys.exit(main())
