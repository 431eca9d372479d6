"""A probe of the README's bad-input promise through the real CLI: every case must end with a non-zero exit,
one ``error: ...`` line naming what is wrong (file, record or field), and no committed output of the stage
that failed. ``python tests/bad_inputs.py`` runs it alone; ``tests/test_bad_inputs.py`` runs it in CI.

Data cases edit a copy of one tiny world (configs/tiny.yaml) as a broken mirror would serve it, then run
``--stage download`` (or ``dedup``) on it; config cases fail before anything starts.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import ray  # noqa: E402

from pipeline.run import main  # noqa: E402

TINY = REPO / "configs" / "tiny.yaml"
NLVR2_DEV = "raw.githubusercontent.com/lil-lab/nlvr/master/nlvr2/data/dev.json"
SNLI_DEV = "raw.githubusercontent.com/necla-ml/SNLI-VE/master/data/snli_ve_dev.jsonl"
CC_TRAIN = "storage.googleapis.com/gcc-data/Train/Train_GCC-training.tsv"
ENTITIES_TEST = "raw.githubusercontent.com/BryanPlummer/flickr30k_entities/master/test.txt"
REFCOCO = "bvisionweb1.cs.unc.edu/licheng/referit/data/refcoco.zip"
SBU = "www.cs.virginia.edu/~vicente/sbucaptions/SBUCaptionedPhotoDataset.tar.gz"
COCO_ANN = "images.cocodataset.org/annotations/annotations_trainval2014.zip"
VQA_Q_TRAIN = "s3.amazonaws.com/cvmlp/vqa/mscoco/vqa/v2_Questions_Train_mscoco.zip"


@dataclass
class Case:
    name: str
    expect: str  # a substring of the one error line
    args: list[str] = field(default_factory=list)  # overrides and flags after --stage
    mutate: Callable[[Path], None] | None = None  # edits the work dir (its world output is under world/)
    stage: str = "download"
    code: int = 1  # 2: refused before anything ran (config)
    files: dict[str, str] = field(default_factory=dict)  # extra files written into the work dir first
    # Whether the same command succeeds once the input is repaired (the world restored from the base):
    # nothing of the failed run may stick, such as a metadata file that failed to parse.
    recovers: bool = False


def _www(workdir: Path) -> Path:
    (world,) = [p for p in (workdir / "world").iterdir() if not p.name.startswith(".")]
    return world / "www"


def _replace(path: Path, data: bytes) -> None:
    """Write a new file in place of ``path`` (the work dir's files are hard links to a shared copy)."""
    path.unlink()
    path.write_bytes(data)


def _edit(rel: str, change: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def mutate(workdir: Path) -> None:
        path = _www(workdir) / rel
        _replace(path, change(path.read_bytes()))

    return mutate


def _edit_member(rel: str, member: str, change: Callable[[bytes], bytes] | None) -> Callable[[Path], None]:
    """Rewrite a zip archive with ``member`` changed (or left out when ``change`` is None)."""

    def mutate(workdir: Path) -> None:
        path = _www(workdir) / rel
        buf = io.BytesIO()
        with zipfile.ZipFile(path) as old, zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as new:
            for info in old.infolist():
                if info.filename != member:
                    new.writestr(info.filename, old.read(info))
                elif change is not None:
                    new.writestr(info.filename, change(old.read(info)))
        _replace(path, buf.getvalue())

    return mutate


def _delete(rel: str) -> Callable[[Path], None]:
    return lambda workdir: (_www(workdir) / rel).unlink()


def _drop_committed_shard(workdir: Path) -> None:
    (download,) = [p for p in (workdir / "download").iterdir() if not p.name.startswith(".")]
    sorted((download / "images" / "cc").glob("shard-*.parquet"))[0].unlink()


def _first_line(change: Callable[[str], str]) -> Callable[[bytes], bytes]:
    def edit(data: bytes) -> bytes:
        first, _, rest = data.decode().partition("\n")
        return (change(first) + "\n" + rest).encode()

    return edit


CASES = [
    # Config: refused before any stage runs.
    Case("unknown key", "unknown key 'download.timeouts'", ["download.timeouts=3"], code=2),
    Case("wrong type", "download.timeout_s", ["download.timeout_s=oops"], code=2),
    Case("out of range", "download.timeout_s: Input should be greater than 0", ["download.timeout_s=-1"],
         code=2),
    Case("override without a value", "expected key.sub=value", ["download.timeout_s"], code=2),
    Case("config file missing", "cannot read config", ["--config", "/nonexistent/vlp.yaml"], code=2),
    Case("config not YAML", "invalid YAML", ["--config", "{dir}/bad.yaml"], code=2,
         files={"bad.yaml": "download: [unclosed\n"}),
    Case("config base loops", "base chain loops back", ["--config", "{dir}/a.yaml"], code=2,
         files={"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"}),
    Case("config not a mapping", "top level must be a mapping", ["--config", "{dir}/list.yaml"], code=2,
         files={"list.yaml": "- a\n- b\n"}),
    Case("file:// image base URL", "flickr30k.image_base_url",
         ["download.datasets.flickr30k.image_base_url=file:///etc/"], code=2),
    Case("ftp metadata URL", "nlvr2.files", ["download.datasets.nlvr2.files.dev=ftp://x.org/d.json"],
         code=2),
    Case("dataset name with a slash", "should match pattern",
         ["download.datasets.coco.files.a/b=http://x.org/a.json"], code=2),
    Case("unknown pretraining task", "unknown task(s) ['foo']", ["pretrain.tasks={mlm: 1, foo: 1}"],
         code=2),
    Case("warm-up past the last step", "warmup_steps",
         ["pretrain.steps=10", "pretrain.optim.warmup_steps=10"], code=2),
    Case("task listed twice", "lists a task twice", ["finetune.tasks=[vqa,vqa]"], code=2),
    Case("eval split of an unknown task", "unknown task(s) ['gqa2']", ["eval.splits={gqa2: [val]}"], code=2),
    Case("more hard negatives than candidates", "hard_negatives", ["finetune.retrieval.hard_negatives=9"],
         code=2),
    Case("more planted overlaps than images", "world", ["world.overlaps.vg_coco=500"], code=2),
    # Metadata as a broken or hostile mirror serves it.
    Case("missing field", "dev.json: record 0", mutate=_edit(NLVR2_DEV, _first_line(
        lambda line: line.replace('"sentence"', '"sentense"'))), recovers=True),
    Case("truncated JSON Lines", "dev.json", mutate=_edit(NLVR2_DEV, lambda d: d[: len(d) // 2])),
    Case("JSON Lines record not JSON", "snli_ve_dev.jsonl", mutate=_edit(SNLI_DEV, _first_line(
        lambda line: line[:-5]))),
    Case("TSV row without its URL", "Train_GCC-training.tsv", mutate=_edit(CC_TRAIN, _first_line(
        lambda line: line.split("\t")[0]))),
    Case("id list with a non-numeric id", "test.txt", mutate=_edit(ENTITIES_TEST, lambda d: b"x12\n" + d)),
    Case("metadata file gone (404)", "http_404", mutate=_delete(NLVR2_DEV)),
    Case("archive that is not a zip", "cannot read archive",
         mutate=_edit(REFCOCO, lambda d: b"PK\x03\x04" + d[:99])),
    Case("archive without the member", "has no member 'refcoco/refs(unc).p'",
         mutate=_edit_member(REFCOCO, "refcoco/refs(unc).p", None)),
    Case("truncated pickle", "invalid pickle", mutate=_edit_member(
        REFCOCO, "refcoco/refs(unc).p", lambda d: d[: len(d) // 2])),
    Case("COCO captions without annotations", "captions_train2014.json", mutate=_edit_member(
        COCO_ANN, "annotations/captions_train2014.json",
        lambda d: d.replace(b'"annotations"', b'"annotationz"'))),
    Case("truncated JSON in an archive", "v2_OpenEnded_mscoco_train2014_questions.json", mutate=_edit_member(
        VQA_Q_TRAIN, "v2_OpenEnded_mscoco_train2014_questions.json", lambda d: d[: len(d) // 3])),
    Case("tar archive that is not a tar", "cannot read archive", mutate=_edit(SBU, lambda d: d[:200])),
    Case("archive over the ratio cap (zip bomb)", "member_max_ratio", ["download.member_max_ratio=1.5"]),
    Case("metadata over the size cap", "metadata_max_bytes", ["download.metadata_max_bytes=1000"]),
    Case("unreachable mirror", "127.0.0.1:9", ["download.source=web", "download.mirror_url=http://127.0.0.1:9"]),
    # A committed input that lost a file: the consumer refuses it.
    Case("incomplete committed input", "input 'download' is incomplete", stage="dedup",
         mutate=_drop_committed_shard),
]


@dataclass
class Outcome:
    case: Case
    code: int
    line: str
    committed: list[str]
    recovered: bool | None = None  # the rerun's success once the input was repaired (recovers cases)

    @property
    def as_promised(self) -> bool:
        return (self.code == self.case.code and self.line.startswith("error: ")
                and self.case.expect in self.line and not self.committed and self.recovered is not False)


# A line Ray forwards from a worker: '(<task or actor> pid=N) ...', possibly coloured.
RAY_WORKER_LINE = re.compile(r"^(\x1b\[[0-9;]*m)*\((\S+ )?pid=\d+")


def _run(workdir: Path, case: Case, base: Path) -> Outcome:
    # The world as built once; the download too when the case's stage reads it (hard links: cheap).
    for stage in ("world", "download") if case.stage != "download" else ("world",):
        shutil.copytree(base / stage, workdir / stage, copy_function=os.link)
    for name, text in case.files.items():
        (workdir / name).write_text(text)
    if case.mutate is not None:
        case.mutate(workdir)
    args = [a.replace("{dir}", str(workdir)) for a in case.args]
    before = {p for p in (workdir / case.stage).glob("*")} if (workdir / case.stage).is_dir() else set()
    if "--config" not in args:
        args = ["--config", str(TINY), *args]
    command = [*args, "--workdir", str(workdir), "--stage", case.stage]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(command)
    # The probe's Ray is shared and its workers' log lines reach stderr asynchronously, so one may land
    # after the CLI's answer: leave them out (a CLI on its own Ray stops it before answering).
    lines = [line for line in err.getvalue().splitlines() if line.strip() and not RAY_WORKER_LINE.match(line)]
    if len([line for line in lines if line.startswith("error: ")]) > 1:
        lines.append("(more than one error line)")
    after = {p for p in (workdir / case.stage).glob("*")} if (workdir / case.stage).is_dir() else set()
    committed = [p.name for p in after - before if not p.name.startswith(".")]
    outcome = Outcome(case, code, lines[-1] if lines else "", committed)
    if case.recovers:
        shutil.rmtree(workdir / "world")
        shutil.copytree(base / "world", workdir / "world", copy_function=os.link)
        with contextlib.redirect_stderr(io.StringIO()):
            outcome.recovered = main(command) == 0
    return outcome


def probe(root: Path, cases: list[Case] = CASES) -> list[Outcome]:
    """Run every case in its own work dir under ``root``, after one run that builds the shared inputs.
    The invocations share one local Ray (the CLI keeps a connection its caller made): what each case
    checks is the CLI's own answer, and starting a Ray per case would cost most of the probe's time."""
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    try:
        base = root / "base"
        assert main(["--config", str(TINY), "--workdir", str(base), "--stage", "download"]) == 0
        return [_run(root / f"case-{i:02d}", case, base) for i, case in enumerate(cases)]
    finally:
        if started:
            ray.shutdown()


def report(outcomes: list[Outcome]) -> str:
    lines = [f"{'ok ' if o.as_promised else 'BAD'} {o.case.name}: exit {o.code}: {o.line}"
             + ("" if o.recovered is None else f" (repaired input: {'ok' if o.recovered else 'fails'})")
             for o in outcomes]
    handled = sum(o.as_promised for o in outcomes)
    lines.append(f"{handled} of {len(outcomes)} bad inputs handled as promised "
                 f"({100 * handled / len(outcomes):.0f}%)")
    return "\n".join(lines)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="vlp-bad-inputs-") as tmp:
        outcomes = probe(Path(tmp))
    print(report(outcomes))
    sys.exit(0 if all(o.as_promised for o in outcomes) else 1)
