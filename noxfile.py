"""The test matrix: lint, the kernel, then each plugin distribution on its own.

Sessions run in nox's own environment, ``.venv`` (``python=False``, tools run with
``sys.executable -m``): every distribution of the
repository is installed there by ``scripts/setup.sh``, and each session runs exactly one
distribution's tests, so a failure names the plugin that broke.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nox

nox.options.sessions = ["lint", "kernel", "plugin", "bdd"]
nox.options.error_on_missing_interpreters = True
ROOT = Path(__file__).parent
DISTRIBUTIONS = sorted(
    str(p.parent.relative_to(ROOT))
    for pattern in ("plugins/*/pyproject.toml", "backends/*/pyproject.toml",
                    "schedulers/*/pyproject.toml")
    for p in ROOT.glob(pattern)
)


@nox.session(python=False)
def lint(session: nox.Session) -> None:
    """ruff, mypy, and the import-linter contracts of pyproject.toml (layers, forbidden
    imports, no cycle in rbees_core)."""
    session.run(sys.executable, "-m", "ruff", "check", ".")
    session.run(sys.executable, "-m", "mypy", "rbees_core", "features",
                *[f"{d}/src" for d in DISTRIBUTIONS])
    # The examples are outsiders' plugins, not installed by setup.sh; their sources join
    # the path so the contracts check them too.
    examples = [str(p) for p in sorted(ROOT.glob("examples/*/src"))]
    session.run(str(Path(sys.executable).with_name("lint-imports")),
                env={"PYTHONPATH": os.pathsep.join(examples)})


@nox.session(python=False)
def kernel(session: nox.Session) -> None:
    session.run(sys.executable, "-m", "pytest", "tests", *session.posargs)


@nox.session(python=False)
@nox.parametrize("dist", DISTRIBUTIONS)
def plugin(session: nox.Session, dist: str) -> None:
    session.run(sys.executable, "-m", "pytest", f"{dist}/tests", *session.posargs)


@nox.session(python=False)
def bdd(session: nox.Session) -> None:
    """The Gherkin features on the simulated hosts (network namespaces when run as root)."""
    session.run(str(Path(sys.executable).with_name("bdd-runner")), *session.posargs)
