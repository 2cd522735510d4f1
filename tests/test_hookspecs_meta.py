"""Meta-tests over the hook specifications (datasette style).

Every hook is documented (who calls it, what it returns) and exercised by at least one test
somewhere in the repository, so a new hook cannot land undocumented or untested.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rbees_core import hookspecs

ROOT = Path(__file__).resolve().parents[1]
TEST_DIRS = ("tests", "backends/*/tests", "plugins/*/tests", "examples/*/tests",
             "schedulers/*/tests")


def hookspec_functions() -> dict[str, Callable[..., Any]]:
    marker = f"{hookspecs.PROJECT}_spec"
    return {name: fn for name, fn in vars(hookspecs).items()
            if callable(fn) and hasattr(fn, marker)}


HOOKS = sorted(hookspec_functions())


def test_hooks_are_found() -> None:
    assert "rbees_register_backends" in HOOKS
    assert len(HOOKS) >= 9
    assert all(name.startswith("rbees_") for name in HOOKS)


@pytest.mark.parametrize("name", HOOKS)
def test_hookspec_is_documented(name: str) -> None:
    fn = hookspec_functions()[name]
    doc = inspect.getdoc(fn) or ""
    assert doc, f"{name} has no docstring"
    assert "Called by" in doc, f"{name}: the docstring must say who calls it ('Called by')"
    returns_nothing = inspect.signature(fn).return_annotation in (None, "None")
    if returns_nothing:
        assert re.search(r"[Rr]eturns\s+nothing", doc), f"{name}: say that it returns nothing"
    else:
        assert re.search(r"Returns:", doc), f"{name}: say what it returns ('Returns:')"


def test_hookspecs_take_keyword_friendly_arguments() -> None:
    for name, fn in hookspec_functions().items():
        for param in inspect.signature(fn).parameters.values():
            assert param.kind is param.POSITIONAL_OR_KEYWORD, f"{name}({param.name})"


def files_of_tests() -> list[Path]:
    this = Path(__file__).resolve()
    found = {p.resolve() for pattern in TEST_DIRS for p in ROOT.glob(f"{pattern}/**/*.py")}
    found.discard(this)
    return sorted(found)


@pytest.mark.parametrize("name", HOOKS)
def test_every_hook_is_exercised_by_a_test(name: str) -> None:
    word = re.compile(rf"\b{re.escape(name)}\b")
    users = [p for p in files_of_tests() if word.search(p.read_text(encoding="utf-8"))]
    assert users, f"no test under {', '.join(TEST_DIRS)} mentions {name}"
