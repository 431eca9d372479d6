"""Content-addressed stage outputs: ``<workdir>/<stage>/<key>/`` committed atomically.

A stage writes into ``<workdir>/<stage>/.partial-<key>/`` (deterministic, so a killed stage can resume
from what it already wrote there); the commit writes ``manifest.json`` last and renames the directory.
A directory without a manifest is never taken for a finished output.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.config import REPO_ROOT
from pipeline.imports import closure

MANIFEST = "manifest.json"


def code_digest(module: str, root: Path = REPO_ROOT) -> str:
    """Hash of the code a stage runs: the sources of its entry ``module``'s import closure within ``root``
    and the data files those modules declare (pipeline/imports.py), by path and content."""
    sources, data = closure(root, module)
    h = hashlib.sha256()
    for f in [*sources, *data]:
        h.update(str(f.relative_to(root.resolve())).encode())
        h.update(b"\0")
        h.update(f.read_bytes() if f.is_file() else b"<missing>")
        h.update(b"\0")
    return h.hexdigest()


def content_digest(path: str) -> str:
    """Hash of a user-supplied file (or of every file under a dir): weights, vocabularies, tokenizers.

    A missing path hashes as such; the stage that reads it reports the error with its own message.
    """
    p = Path(path).expanduser()
    if not p.exists():
        return f"missing:{p}"
    h = hashlib.sha256()
    for f in [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file()):
        h.update(str(f.relative_to(p)).encode() if f != p else b"")
        h.update(b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def stage_key(
    stage: str, code: str, config: dict[str, Any], inputs: dict[str, str], files: dict[str, str] | None = None
) -> str:
    payload = {"stage": stage, "code": code, "config": config, "inputs": inputs}
    if files:  # only present when a stage reads user files, so other keys stay as they were
        payload["files"] = files
    payload = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@contextmanager
def file_lock(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` for the block; the kernel releases it if the process dies, so a
    killed run never leaves a stale lock. ``on_wait`` is called once if another holder makes us wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class StageStore:
    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)

    def final_dir(self, stage: str, key: str) -> Path:
        return self.workdir / stage / key

    def partial_dir(self, stage: str, key: str) -> Path:
        return self.workdir / stage / f".partial-{key}"

    def lock(self, stage: str, key: str, on_wait: Callable[[], None] | None = None):
        """Held while a run computes and commits ``stage``/``key``: two runs on one work dir never write the
        same partial dir at once; the second waits and then finds the output committed."""
        return file_lock(self.workdir / stage / f".lock-{key}", on_wait)

    def manifest(self, stage: str, key: str) -> dict[str, Any] | None:
        path = self.final_dir(stage, key) / MANIFEST
        if not path.is_file():
            return None
        return json.loads(path.read_text())

    def is_done(self, stage: str, key: str) -> bool:
        return self.manifest(stage, key) is not None

    def begin(self, stage: str, key: str, fresh: bool = False) -> Path:
        """The partial dir to write into; kept across a killed run unless ``fresh``."""
        partial = self.partial_dir(stage, key)
        if fresh and partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)
        return partial

    def commit(self, stage: str, key: str, manifest: dict[str, Any]) -> Path:
        partial = self.partial_dir(stage, key)
        final = self.final_dir(stage, key)
        tmp = partial / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        os.replace(tmp, partial / MANIFEST)
        if final.exists():  # --force: the old output goes away only once the new one is complete
            trash = final.with_name(f".trash-{key}-{time.time_ns()}")
            os.replace(final, trash)
            os.replace(partial, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(partial, final)
        return final
