"""Put the eval stage's summary of a finished run into README.md, between the demo-results markers.

    .venv/bin/python scripts/readme_results.py [--config F] [--workdir D] [--block NAME] [--over-seeds-only]
                                              [key.sub=value ...]

takes the same config, work dir and overrides as the ``pipeline/run.py --stage all`` run it reports (e.g.
``seeds=[0,1,2]``), finds that run's ``eval`` output by its cache key, and replaces the README block with
its ``summary.md`` and the command that produced it: the README's numbers are the pipeline's own, never
copied by hand. ``--block NAME`` fills the ``<!-- NAME:start -->`` ... ``<!-- NAME:end -->`` block instead
(another world's run beside the demo's); ``--over-seeds-only`` keeps the summary over seeds and leaves out
the per-seed tables. Exits non-zero, changing nothing, when that run has not finished.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE.parent))

from pipeline.cache import StageStore  # noqa: E402
from pipeline.config import DEFAULT_CONFIG, REPO_ROOT, load_config  # noqa: E402
from pipeline.dag import plan  # noqa: E402
from stages.outputs.eval import SummaryOutput  # noqa: E402

PER_SEED = "\n##### Seed "


def block(config: Path, overrides: list[str], workdir: Path, start: str, end: str,
          over_seeds_only: bool = False) -> str:
    stages = {p.label: p for p in plan(load_config(config, overrides), "all", StageStore(workdir))}
    evaluation = stages["eval"]
    if not evaluation.cached:
        raise SystemExit(f"error: no finished eval output for this config in {workdir} (key "
                         f"{evaluation.key}): run pipeline/run.py --stage all with the same arguments first")
    summary = SummaryOutput(StageStore(workdir).final_dir("eval", evaluation.key))
    text = summary.summary_markdown.read_text().strip()
    text = text.replace("# Evaluation summary", "#### Evaluation summary", 1).replace("\n## ", "\n##### ")
    if over_seeds_only and PER_SEED in text:
        text = text.split(PER_SEED, 1)[0].rstrip() + "\n\n(Per-seed tables: that run's `summary.md`.)"
    rel = config.resolve().relative_to(REPO_ROOT) if config.resolve().is_relative_to(REPO_ROOT) else config
    command = " ".join(["pipeline/run.py --stage all", f"--config {rel}", *map(shlex.quote, overrides)])
    return (f"{start}\nProduced by `{command}` (eval output `{evaluation.key}`), inserted by "
            f"`scripts/readme_results.py` with the same arguments.\n\n{text}\n{end}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--workdir", type=Path, default=Path("work"))
    p.add_argument("--readme", type=Path, default=REPO_ROOT / "README.md")
    p.add_argument("--block", default="demo-results", help="the README block to fill")
    p.add_argument("--over-seeds-only", action="store_true", help="leave out the per-seed tables")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    start, end = f"<!-- {args.block}:start -->", f"<!-- {args.block}:end -->"
    readme = args.readme.read_text()
    if start not in readme or end not in readme:
        raise SystemExit(f"error: {args.readme}: no {start} ... {end} block to replace")
    head, rest = readme.split(start, 1)
    _, tail = rest.split(end, 1)
    text = block(args.config, args.overrides, args.workdir.resolve(), start, end, args.over_seeds_only)
    args.readme.write_text(head + text + tail)
    print(f"{args.readme}: {args.block} replaced")
    return 0


if __name__ == "__main__":
    sys.exit(main())
