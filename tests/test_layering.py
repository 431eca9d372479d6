"""The shape the code keeps: the library never reaches Ray or the app, a stage never imports another stage,
and the world is a package of its own. Checked on every source file's imports (functions included)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import REPO_ROOT
from pipeline.imports import closure, imported_names


def sources(package: str) -> list[Path]:
    return sorted((REPO_ROOT / package).rglob("*.py"))


def repo_imports(path: Path) -> set[str]:
    """Top-level packages and dotted names a file imports (``from a.b import c`` gives a.b and a.b.c)."""
    return imported_names(REPO_ROOT, path)


def top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("path", sources("vlp"), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_the_library_imports_neither_ray_nor_the_app(path):
    names = {top(n) for n in repo_imports(path)}
    assert not names & {"ray", "stages", "pipeline", "worldgen", "mlflow"}, names


def test_no_ray_is_reachable_from_the_library():
    for path in sources("vlp"):
        module = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__")
        for dependency in closure(REPO_ROOT, module)[0]:
            assert "ray" not in {top(n) for n in repo_imports(dependency)}, (module, dependency)


def _stage_package(path: Path) -> str | None:
    parts = path.relative_to(REPO_ROOT / "stages").parts
    return parts[0] if len(parts) > 1 and parts[0] != "outputs" else None


@pytest.mark.parametrize("path", sources("stages"), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_a_stage_imports_only_itself_the_contract_and_the_library(path):
    own = _stage_package(path)
    for name in repo_imports(path):
        assert top(name) != "pipeline", name
        parts = name.split(".")
        if parts[0] != "stages" or len(parts) < 2 or parts[1] in ("base", "outputs"):
            continue
        assert parts[1] == own, f"{path.relative_to(REPO_ROOT)} imports {name}"
    if own is None and path.parent.name == "outputs":  # the contract reads no stage package either
        assert not [n for n in repo_imports(path) if n.startswith("stages.")
                    and n.split(".")[1] not in ("base", "outputs")]


@pytest.mark.parametrize("path", sources("worldgen"), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_the_world_is_a_package_of_its_own(path):
    assert not {top(n) for n in repo_imports(path)} & {"stages", "pipeline", "vlp"}


def test_the_registry_lists_no_code_paths():
    registry = (REPO_ROOT / "pipeline" / "stages.py").read_text()
    assert "code=" not in registry and ".py\"" not in registry
