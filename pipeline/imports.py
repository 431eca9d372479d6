"""The code a stage runs: the import closure of its entry module within the repository.

Computed by parsing sources, not by importing them: every ``import`` / ``from ... import`` statement of
a module (at module level and inside functions, where lazy imports of optional backends live) that names a
module of the repository is followed, with the ``__init__.py`` of every package on the way (Python runs
them on import). Imports under ``if TYPE_CHECKING:`` are skipped: they never run. Third-party and
standard-library imports are outside the repository and not followed.

A module may declare the data files it reads (id lists, vocabularies) as a module-level tuple of string
literals ``PACKAGE_DATA = ("data/x.txt", ...)``, relative to the module's directory; they belong to the
closure too.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

DATA_DECLARATION = "PACKAGE_DATA"


def _parse(path: Path) -> ast.Module:
    return _parse_source(path.read_bytes())


@functools.cache  # keyed by content, so an edited file is parsed again
def _parse_source(source: bytes) -> ast.Module:
    return ast.parse(source)


def module_file(root: Path, name: str) -> Path | None:
    """The source of the repository module ``name`` (``a.b`` -> a/b.py or a/b/__init__.py), if any."""
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Import statements anywhere in ``tree`` except under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _package_parts(root: Path, path: Path) -> list[str]:
    """The package a file's relative imports resolve against (its directory, as a dotted name)."""
    return list(path.relative_to(root).parts[:-1])


def imported_names(root: Path, path: Path) -> set[str]:
    """Dotted names of the modules (and, for ``from m import x``, the candidates ``m.x``) a file imports."""
    names: set[str] = set()
    for node in _import_nodes(_parse(path)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
            continue
        if node.level:  # relative: resolved against the importing module's package
            package = _package_parts(root, path)
            base = package[: len(package) - (node.level - 1)]
            module = ".".join([*base, *([node.module] if node.module else [])])
        else:
            module = node.module or ""
        if module:
            names.add(module)
        names.update(f"{module}.{alias.name}" if module else alias.name for alias in node.names)
    return names


def declared_data(path: Path) -> list[Path]:
    """The files a module lists in its module-level ``PACKAGE_DATA`` (relative to its directory)."""
    for node in _parse(path).body:
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, ast.AnnAssign) and node.value is not None else [])
        if any(isinstance(t, ast.Name) and t.id == DATA_DECLARATION for t in targets):
            files = ast.literal_eval(node.value)
            return [path.parent / f for f in files]
    return []


def _with_parents(root: Path, name: str) -> list[Path]:
    """Files Python runs to import ``name``: each enclosing package's __init__.py, then the module."""
    parts = name.split(".")
    files = []
    for i in range(1, len(parts) + 1):
        found = module_file(root, ".".join(parts[:i]))
        if found is None:
            break
        files.append(found)
    return files


def closure(root: Path, module: str) -> tuple[list[Path], list[Path]]:
    """(source files, declared data files) of ``module`` and everything it imports within ``root``."""
    root = root.resolve()
    if module_file(root, module) is None:
        raise ValueError(f"module {module!r} is not in {root}")
    seen: set[Path] = set()
    todo = _with_parents(root, module)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_names(root, path):
            todo.extend(p for p in _with_parents(root, name) if p not in seen)
    data = {f for path in seen for f in declared_data(path)}
    return sorted(seen), sorted(data)
