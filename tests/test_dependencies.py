"""Every distribution's pyproject tells the truth (issue 26 item 7).

- Each top-level package a distribution's sources import (walked with ast; imports under
  ``if TYPE_CHECKING:`` and those a ``try: ... except ImportError`` guards are optional) is
  the standard library's, its own, or provided by a distribution it declares. The kernel's
  test kit (``rbees_core/testing``, ``bdd-runner``) may import from the kernel's extras.
- Every third-party requirement has a floor (or an exact pin), and this environment, where
  the tests run, meets it: a floor above what was tested is not one.
- ``requires-python`` is ``>=3.11`` (``asyncio.timeout``, ``tomllib``); ``license = "MIT"``
  with a LICENSE file beside the pyproject and setuptools >= 77 (PEP 639) to build it.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PYPROJECTS = sorted([ROOT / "pyproject.toml", *ROOT.glob("*/*/pyproject.toml")])
#: kernel modules that only a test environment imports: they may use the kernel's extras
TEST_KIT = ("rbees_core/testing/", "rbees_core/programs/bdd_runner.py")
#: rbees' own distributions (rbees, rbees-core, rbees-testing and every plugin's), developed
#: together in this repository: no floor to check
OWN = re.compile(r"rbees(-.+)?")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _optional(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Whether an import sits under ``if TYPE_CHECKING``, in the ``else`` of a
    ``sys.version_info`` check (an older Python's fallback), or in a ``try`` that catches
    ImportError (ModuleNotFoundError)."""
    child, parent = node, parents.get(node)
    while parent is not None:
        if isinstance(parent, ast.If) and "TYPE_CHECKING" in ast.unparse(parent.test) \
                and child in parent.body:
            return True
        if isinstance(parent, ast.If) and "sys.version_info" in ast.unparse(parent.test) \
                and child in parent.orelse:
            return True
        if isinstance(parent, ast.Try) and child in parent.body and any(
                h.type is not None and re.search(r"\b(ImportError|ModuleNotFoundError)\b",
                                                 ast.unparse(h.type))
                for h in parent.handlers):
            return True
        child, parent = parent, parents.get(parent)
    return False


def imports(path: Path) -> set[str]:
    """The top-level packages ``path`` imports for sure (not the optional ones)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        if not _optional(node, parents):
            found.update(n.split(".")[0] for n in names)
    return found


def project(pyproject: Path) -> dict[str, object]:
    data: dict[str, object] = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    return data


def sources(pyproject: Path) -> tuple[list[Path], set[str]]:
    """The distribution's source files and its own top-level packages."""
    base = pyproject.parent
    if (base / "src").is_dir():
        own = {p.name if p.is_dir() else p.stem for p in (base / "src").iterdir()}
        return sorted((base / "src").rglob("*.py")), own
    if base == ROOT:
        return sorted((base / "rbees_core").rglob("*.py")), {"rbees_core"}
    return [], set()  # distributions/: rbees and rbees-testing have no code of their own


@functools.cache
def _distributions() -> dict[str, list[str]]:
    return dict(importlib.metadata.packages_distributions())


def provided_by(top: str) -> set[str]:
    if top == "rbees_core":  # this repository's kernel, whatever an older venv installed it as
        return {"rbees-core"}
    return {norm(d) for d in _distributions().get(top, [top])}


def names(requirements: list[str]) -> set[str]:
    return {norm(Requirement(r).name) for r in requirements}


@pytest.mark.parametrize("pyproject", PYPROJECTS, ids=lambda p: p.parent.name)
def test_every_import_is_declared(pyproject: Path) -> None:
    meta = project(pyproject)
    declared = names(list(meta.get("dependencies", [])))  # type: ignore[call-overload]
    extras = names([r for group in dict(meta.get("optional-dependencies", {})).values()  # type: ignore[call-overload]
                    for r in group])
    files, own = sources(pyproject)
    missing: dict[str, list[str]] = {}
    for file in files:
        where = file.relative_to(pyproject.parent).as_posix()
        allowed = declared | (extras if where.startswith(TEST_KIT) else set())
        for top in imports(file):
            if top in sys.stdlib_module_names or top in own or top == "__future__":
                continue
            if not provided_by(top) & allowed:
                missing.setdefault(top, []).append(where)
    assert not missing, (
        f"{pyproject.relative_to(ROOT)} imports packages it does not declare: "
        + "; ".join(f"{top} ({', '.join(sorted(provided_by(top)))}) in {files[0]}"
                    for top, files in sorted(missing.items())))


@pytest.mark.parametrize("pyproject", PYPROJECTS, ids=lambda p: p.parent.name)
def test_floors_are_declared_and_met_here(pyproject: Path) -> None:
    meta = project(pyproject)
    for text in meta.get("dependencies", []):  # type: ignore[attr-defined]
        requirement = Requirement(text)
        if OWN.fullmatch(norm(requirement.name)):
            continue
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        operators = {spec.operator for spec in requirement.specifier}
        assert operators & {">=", "=="}, f"{pyproject.relative_to(ROOT)}: {text} has no floor"
        installed = importlib.metadata.version(requirement.name)
        assert requirement.specifier.contains(installed, prereleases=True), (
            f"{pyproject.relative_to(ROOT)}: {text}, but the tests ran on {installed}")


@pytest.mark.parametrize("pyproject", PYPROJECTS, ids=lambda p: p.parent.name)
def test_python_license_and_build_requirements_are_true(pyproject: Path) -> None:
    data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    meta = data["project"]
    assert meta["requires-python"] == ">=3.11"
    assert meta["license"] == "MIT" and meta["license-files"] == ["LICENSE"]
    assert "MIT License" in (pyproject.parent / "LICENSE").read_text(encoding="utf-8")
    assert "setuptools>=77" in data["build-system"]["requires"]


def test_the_walk_sees_what_an_undeclared_import_looks_like(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import os\nimport attrs.validators\nfrom httpx2 import Client\n"
                      "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n"
                      "try:\n    import uvloop\nexcept ImportError:\n    uvloop = None\n"
                      "def f():\n    import numpy\n")
    assert imports(module) == {"os", "attrs", "httpx2", "typing", "numpy"}
