"""The session-end scan for keys and tokens in logs (rbees_core.testing.leaks) can fail.

Everything planted here lives outside this run's temporary directory (a planted secret
under it would fail this very run: that is the scan working)."""

from __future__ import annotations

import secrets
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from rbees_core.auth import control_token, join_token, new_key
from rbees_core.testing import leaks

PLANTED = '''
import subprocess, sys
from pathlib import Path

def test_writes_a_log(tmp_path: Path) -> None:
    (tmp_path / "daemon.log").write_text('{"event": "x", "credential": "%s"}\\n')

def test_starts_a_process_with_a_token(tmp_path: Path) -> None:
    log = open(tmp_path / "worker.log", "w")
    subprocess.run([sys.executable, "-c", "import os; print(os.environ['RBEES_API_TOKEN'])"],
                   env={"RBEES_API_TOKEN": "%s"}, stdout=log, check=True)
'''


@pytest.fixture
def outside() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="rbees-leaks-") as folder:
        yield Path(folder)


def test_the_scan_finds_each_kind_of_secret_and_nothing_in_clean_logs(outside: Path) -> None:
    operator = secrets.token_hex(16)
    key = new_key()[2]
    join = join_token(operator, "gpu1")
    control = control_token(join)
    worker = f"rbw_worker-cpu-0_{secrets.token_hex(24)}"
    (outside / "run").mkdir()
    (outside / "run" / "pool-gpu1.control").write_text(control + "\n")  # harvested
    (outside / "clean.log").write_text('{"event": "listening", "key": "alice"}\n')
    assert leaks.scan(outside) == []
    for name, secret in (("a.log", key), ("b.log", join), ("c.log", worker),
                         ("d.log", control), ("e.err", operator)):
        (outside / name).write_text(f"some line {secret} more\n")
    found = leaks.scan(outside, [("test_x (stderr)", f"printed {key}")], [operator])
    where = {(Path(leak.where).name, leak.secret) for leak in found}
    assert where == {("a.log", key), ("b.log", join), ("c.log", worker), ("d.log", control),
                     ("e.err", operator), ("test_x (stderr)", key)}
    assert all(leak.secret not in leak.line() for leak in found)  # the report shows no secret


def test_a_run_whose_logs_hold_a_secret_fails(outside: Path) -> None:
    key, operator = new_key()[2], "op-" + secrets.token_hex(16)
    (outside / "test_planted.py").write_text(PLANTED % (key, operator))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "test_planted.py", "-q", "-p", "no:cacheprovider",
         "--basetemp", str(outside / "tmp")],
        cwd=outside, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout[-3000:]
    assert "2 passed" in done.stdout and "leaked secrets" in done.stdout
    assert "daemon.log: holds a secret" in done.stdout  # by its shape
    assert "worker.log: holds a secret" in done.stdout  # the token its process was given
    assert key not in done.stdout and operator not in done.stdout
    clean = subprocess.run(
        [sys.executable, "-m", "pytest", "test_planted.py", "-q", "-p", "no:cacheprovider",
         "--basetemp", str(outside / "tmp2"), "-k", "nothing_matches"],
        cwd=outside, capture_output=True, text=True, timeout=120)
    assert clean.returncode == 5, clean.stdout[-2000:]  # nothing ran, nothing leaked
