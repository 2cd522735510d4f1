"""Configuration: precedence flag > env > file > default, and failing fast with the TOML path."""

from __future__ import annotations

from pathlib import Path

import pytest

from rbees_core.config import Config, WorkerConfig, config_path, load_config, rbees_home
from rbees_core.errors import ConfigError


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A HOME with no config file and no RBEES_* settings from the caller."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("RBEES_CONFIG", "RBEES_HOME", "RBEES_WORKER_SLOTS", "RBEES_WORKER_CTX",
                 "RBEES_WORKER_THREADS"):
        monkeypatch.delenv(name, raising=False)
    return home


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_defaults_without_a_file() -> None:
    assert load_config(environ={}) == Config()
    assert Config().worker == WorkerConfig(slots=1, ctx=None, threads=None,
                                           drain_timeout_s=30.0, ready_callback_timeout_s=10.0)


def test_the_default_file_is_read(isolated: Path) -> None:
    default = isolated / ".config" / "rbees" / "config.toml"
    assert config_path() == (default, False)
    write(default, "[worker]\nslots = 3\n")
    assert load_config(environ={}).worker.slots == 3


def test_file_over_default(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", "[worker]\nslots = 4\nctx = 2048\n")
    worker = load_config(path, environ={}).worker
    assert (worker.slots, worker.ctx, worker.threads) == (4, 2048, None)


def test_env_over_file(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", "[worker]\nslots = 4\nctx = 2048\n")
    worker = load_config(path, environ={"RBEES_WORKER_SLOTS": "6"}).worker
    assert (worker.slots, worker.ctx) == (6, 2048)


def test_flag_over_env(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", "[worker]\nslots = 4\nctx = 2048\n")
    env = {"RBEES_WORKER_SLOTS": "6", "RBEES_WORKER_THREADS": "2"}
    worker = load_config(path, environ=env,
                         flags={"worker": {"slots": 8, "threads": None, "ctx": None}}).worker
    assert (worker.slots, worker.threads, worker.ctx) == (8, 2, 2048)


def test_process_environment_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RBEES_WORKER_CTX", "4096")
    assert load_config().worker.ctx == 4096


def test_rbees_config_names_the_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env_file = write(tmp_path / "env.toml", "[worker]\nslots = 5\n")
    flag_file = write(tmp_path / "flag.toml", "[worker]\nslots = 7\n")
    monkeypatch.setenv("RBEES_CONFIG", env_file)
    assert config_path() == (Path(env_file), True)
    assert load_config(environ={}).worker.slots == 5
    assert load_config(flag_file, environ={}).worker.slots == 7


def test_an_int_is_a_valid_float(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", "[worker]\ndrain_timeout_s = 5\n")
    value = load_config(path, environ={}).worker.drain_timeout_s
    assert value == 5.0 and isinstance(value, float)


@pytest.mark.parametrize(("toml", "key", "why"), [
    ('[worker]\nslots = "four"\n', "worker.slots", "must be an integer"),
    ("[worker]\nslots = true\n", "worker.slots", "must be an integer"),
    ("[worker]\nslots = 2.5\n", "worker.slots", "must be an integer"),
    ("[worker]\nslots = 0\n", "worker.slots", "must be >= 1"),
    ("[worker]\nslots = 65\n", "worker.slots", "must be <= 64"),
    ("[worker]\nctx = 8\n", "worker.ctx", "must be >= 16"),
    ('[worker]\ndrain_timeout_s = "soon"\n', "worker.drain_timeout_s", "must be a number"),
    ("[worker]\nslot = 2\n", "worker.slot", "unknown field"),
    ("[wroker]\nslots = 2\n", "wroker", "unknown field"),
    ("worker = 3\n", "worker", "must be an object"),
])
def test_a_bad_value_names_its_toml_path(tmp_path: Path, toml: str, key: str, why: str) -> None:
    path = write(tmp_path / "bad.toml", toml)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert caught.value.message == f"{path}: {key}: {why}"
    assert caught.value.details == {"key": key}
    assert caught.value.code == "CONFIG_INVALID"


def test_invalid_toml(tmp_path: Path) -> None:
    path = write(tmp_path / "broken.toml", "[worker\nslots = \n")
    with pytest.raises(ConfigError, match=r"broken\.toml: not valid TOML"):
        load_config(path, environ={})


def test_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'# caf\xe9\n[worker]\nslots = 2\n')
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(str(path), environ={})


def test_a_named_missing_file_is_an_error(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"nope\.toml: config file does not exist"):
        load_config(str(missing), environ={})
    monkeypatch.setenv("RBEES_CONFIG", str(missing))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(environ={})


def test_a_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="RBEES_WORKER_SLOTS: must be int, got 'many'"):
        load_config(environ={"RBEES_WORKER_SLOTS": "many"})
    with pytest.raises(ConfigError, match=r"worker\.slots: must be <= 64"):
        load_config(environ={"RBEES_WORKER_SLOTS": "100"})


def test_a_bad_flag_value_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"worker\.slots: must be >= 1"):
        load_config(environ={}, flags={"worker": {"slots": 0}})


def test_rbees_home(monkeypatch: pytest.MonkeyPatch, isolated: Path, tmp_path: Path) -> None:
    assert rbees_home() == isolated / ".local" / "share" / "rbees"
    monkeypatch.setenv("RBEES_HOME", str(tmp_path / "state"))
    assert rbees_home() == tmp_path / "state"
