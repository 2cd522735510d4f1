"""hf: downloads against a loopback hub (real HTTP, real huggingface_hub, real processes)."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pluggy
import pytest
from rbees_source_hf import HfRef, HfSource

from rbees_core import plugins
from rbees_core.errors import ChecksumMismatchError, ConflictError, ModelNotFoundError
from rbees_core.interfaces import DownloadProgress
from rbees_core.models import resolve_model
from rbees_core.pool import models
from rbees_core.testing.hub import FakeHub

POOL = str(Path(sys.executable).with_name("rbees-pool"))
REPO = "rbees-test/tiny-GGUF"
FILE = "tiny.Q4_0.gguf"
REF = f"hf:{REPO}/{FILE}"
MiB = 1024 * 1024


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RBEES_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RBEES_CONFIG", "RBEES_POOL_MODELS_DIR", "RBEES_POOL_CATALOG_FILE"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "home"


@pytest.fixture
def payload(fake_hub: FakeHub) -> bytes:
    data = os.urandom(3 * MiB)
    fake_hub.add(REPO, FILE, data)
    return data


def download(pm: pluggy.PluginManager, model: str, **kwargs: Any) -> models.LocalModel:
    local, _ = asyncio.run(models.download(pm, model, **kwargs))
    return local


def partials(home: Path) -> list[Path]:
    return sorted((home / "models" / ".partial").rglob("*.part"))


def run_pool(*args: str, env: dict[str, str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([POOL, *args], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=120, **kwargs)


def test_loads_through_its_entry_point(rbees_pm: pluggy.PluginManager) -> None:
    assert plugins.model_sources(rbees_pm)["hf"] is HfSource
    assert HfSource.can_download
    names = {p.name: p for p in plugins.list_plugins(rbees_pm)}
    assert names["source-hf"].version == "0.1.0"
    assert names["source-hf"].hooks == ["rbees_register_model_sources"]


@pytest.mark.parametrize(("ref", "parsed"), [
    ("o/r/f.gguf", HfRef("o/r", "f.gguf")),
    ("o/r@v1.0/sub/f.gguf", HfRef("o/r", "sub/f.gguf", "v1.0")),
    ("o/r", None), ("o/r/", None), ("o/r/a/../b", None), ("o/r//f", None), ("/o/r/f", None),
])
def test_references_parse(ref: str, parsed: HfRef | None) -> None:
    assert HfRef.parse(ref) == parsed
    if parsed is not None:
        assert str(parsed) == f"hf:{ref}"


def test_download_verifies_places_and_records(home: Path, rbees_pm: pluggy.PluginManager,
                                              fake_hub: FakeHub, payload: bytes) -> None:
    seen: list[DownloadProgress] = []
    local = download(rbees_pm, REF, progress=seen.append)
    sha = hashlib.sha256(payload).hexdigest()
    assert local.path == str(home / "models" / "hf" / REPO / FILE)
    assert Path(local.path).read_bytes() == payload
    assert (local.ref, local.sha256, local.size_bytes, local.source) == (REF, sha, len(payload),
                                                                          "hf")
    assert local.details["verified_against"] == "lfs-sha256"
    assert local.details["commit"] == fake_hub.commit
    assert seen[-1].stage == "verify" and seen[-1].bytes_done == len(payload)
    assert any(p.stage == "download" and p.bytes_done == len(payload) for p in seen)
    assert resolve_model(rbees_pm, REF) == local.path
    assert [m.ref for m in models.list_models(rbees_pm) if m.source == "hf"] == [REF]
    assert partials(home) == []
    # the home, the model, its record, its lock: the owner's alone (0700 / 0600)
    loose = {str(p): oct(p.stat().st_mode & 0o777) for p in [home, *home.rglob("*")]
             if p.stat().st_mode & 0o777 != (0o700 if p.is_dir() else 0o600)}
    assert not loose, loose
    # the token stays on the hub: the CDN GET comes without it
    (cdn_get,) = [r for r in fake_hub.requests if r.server == "cdn" and r.method == "GET"]
    assert "authorization" not in cdn_get.headers
    again, fetched = asyncio.run(models.download(rbees_pm, REF))
    assert (again.path, fetched) == (local.path, False)


def test_regular_files_are_checked_by_git_sha1(home: Path, rbees_pm: pluggy.PluginManager,
                                               fake_hub: FakeHub) -> None:
    fake_hub.add(REPO, "config.json", b'{"ctx": 2048}\n', lfs=False)
    local = download(rbees_pm, f"hf:{REPO}/config.json")
    assert local.details["verified_against"] == "git-sha1"
    assert Path(local.path).read_bytes() == b'{"ctx": 2048}\n'


def test_a_catalog_id_downloads_through_its_hf_source(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        rbees_pm: pluggy.PluginManager, fake_hub: FakeHub, payload: bytes) -> None:
    catalog = tmp_path / "extra.toml"
    catalog.write_text(f"""
[[models]]
id = "tiny-test"
name = "Tiny test model"
hf_repo = "{REPO}"
hf_file = "{FILE}"
size_bytes = {len(payload)}
context_length = 128
license = "mit"
sha256 = "{hashlib.sha256(payload).hexdigest()}"
sources = ["{REF}"]
""")
    monkeypatch.setenv("RBEES_POOL_CATALOG_FILE", str(catalog))
    with pytest.raises(ModelNotFoundError, match="rbees-pool models download tiny-test"):
        resolve_model(rbees_pm, "tiny-test")
    local = download(rbees_pm, "tiny-test")
    assert local.id == "tiny-test"
    assert local.details["verified_against"] == "catalog"
    assert resolve_model(rbees_pm, "tiny-test") == local.path
    assert models.info(rbees_pm, "tiny-test")["local"][0]["path"] == local.path


def test_a_catalog_sha256_the_hub_contradicts_is_refused_before_transfer(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        rbees_pm: pluggy.PluginManager, fake_hub: FakeHub, payload: bytes) -> None:
    catalog = tmp_path / "extra.toml"
    catalog.write_text(f"""
[[models]]
id = "tiny-test"
name = "Tiny"
hf_repo = "{REPO}"
hf_file = "{FILE}"
size_bytes = 1
context_length = 128
license = "mit"
sha256 = "{'0' * 64}"
sources = ["{REF}"]
""")
    monkeypatch.setenv("RBEES_POOL_CATALOG_FILE", str(catalog))
    with pytest.raises(ChecksumMismatchError, match="catalog expects"):
        download(rbees_pm, "tiny-test")
    assert not [r for r in fake_hub.requests if r.server == "cdn"]


def test_a_corrupted_file_fails_and_leaves_nothing_behind(
        home: Path, rbees_pm: pluggy.PluginManager, fake_hub: FakeHub) -> None:
    good = os.urandom(MiB)
    fake_hub.add(REPO, FILE, good[:-1] + b"\0", advertised_sha256=hashlib.sha256(good)
                 .hexdigest())
    with pytest.raises(ChecksumMismatchError, match="removed it"):
        download(rbees_pm, REF)
    assert not (home / "models" / "hf" / REPO / FILE).exists()
    assert partials(home) == []
    assert [m for m in models.list_models(rbees_pm) if m.source != "pkg"] == []
    with pytest.raises(ModelNotFoundError):
        resolve_model(rbees_pm, REF)
    # the CLI says so in one line and exits 1; with --format json the stream ends in "error"
    done = run_pool("models", "download", REF, "--format", "json",
                    env={"RBEES_HOME": str(home), "HF_ENDPOINT": fake_hub.endpoint})
    assert done.returncode == 1
    assert done.stderr.startswith("rbees-pool: error: ") and done.stderr.count("\n") == 1
    last = json.loads(done.stdout.splitlines()[-1])
    assert last["event"] == "error" and last["code"] == "CHECKSUM_MISMATCH"
    assert partials(home) == []


@pytest.mark.parametrize("ref", [f"hf:{REPO}/absent.gguf", "hf:rbees-test/no-such-repo/x.gguf",
                                 f"hf:{REPO}@v9/{FILE}"])
def test_missing_remote_files_are_model_not_found(home: Path, rbees_pm: pluggy.PluginManager,
                                                  payload: bytes, ref: str) -> None:
    with pytest.raises(ModelNotFoundError, match="not found"):
        download(rbees_pm, ref)


def test_a_second_download_of_the_same_file_is_refused(
        home: Path, rbees_pm: pluggy.PluginManager, payload: bytes) -> None:
    lock = home / "models" / ".partial" / "hf" / REPO / f"{FILE}.lock"
    lock.parent.mkdir(parents=True)
    with open(lock, "wb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ConflictError, match="already being downloaded"):
            download(rbees_pm, REF)


def test_the_cli_shows_a_bar_on_a_terminal_and_nothing_on_a_pipe(
        home: Path, fake_hub: FakeHub, payload: bytes) -> None:
    env = {"RBEES_HOME": str(home), "HF_ENDPOINT": fake_hub.endpoint}
    piped = run_pool("models", "download", REF, env=env)
    assert piped.returncode == 0, piped.stderr
    assert piped.stderr == ""
    assert piped.stdout.startswith(f"{REF}: downloaded to {home}/models/hf/{REPO}/{FILE}")
    main, secondary = os.openpty()
    try:
        done = subprocess.run([POOL, "models", "download", REF, "--force"],
                              env={**os.environ, **env}, stdout=subprocess.PIPE,
                              stderr=secondary, text=True, timeout=120)
        os.close(secondary)
        drawn = b""
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(main)
    assert done.returncode == 0
    text = drawn.decode()
    assert "\r" in text and "download [" in text and "verify [" in text and "100.0%" in text


def test_json_lines_report_progress_then_the_result(home: Path, fake_hub: FakeHub,
                                                    payload: bytes) -> None:
    done = run_pool("models", "download", REF, "--format", "json",
                    env={"RBEES_HOME": str(home), "HF_ENDPOINT": fake_hub.endpoint})
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert {e["event"] for e in events[:-1]} == {"progress"}
    assert {e["stage"] for e in events[:-1]} == {"download", "verify"}
    assert set(events[0]) == {"event", "stage", "bytes_done", "bytes_total", "rate_bps"}
    end = events[-1]
    assert end["event"] == "end" and end["fetched"] is True
    assert end["sha256"] == hashlib.sha256(payload).hexdigest()
    assert end["path"] == str(home / "models" / "hf" / REPO / FILE)


def test_a_killed_download_resumes_where_it_stopped(home: Path, fake_hub: FakeHub) -> None:
    # http_get writes 10 MiB blocks: 24 MiB at 8 MiB/s leaves time to kill after the first
    data = os.urandom(24 * MiB)
    fake_hub.add(REPO, FILE, data)
    fake_hub.throttle_bps = 8 * MiB
    env = {**os.environ, "RBEES_HOME": str(home), "HF_ENDPOINT": fake_hub.endpoint}
    proc = subprocess.Popen([POOL, "models", "download", REF, "--format", "json"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            parts = partials(home)
            if parts and parts[0].stat().st_size >= 10 * MiB:
                break
            assert proc.poll() is None, "the download ended before it could be killed"
            time.sleep(0.02)
        else:
            pytest.fail("no partial file grew to 10 MiB")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    (part,) = partials(home)
    kept = part.stat().st_size
    assert 10 * MiB <= kept < len(data)
    assert not (home / "models" / "hf" / REPO / FILE).exists()

    fake_hub.throttle_bps = None
    done = run_pool("models", "download", REF, "--format", "json", env=env)
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert events[0]["bytes_done"] == kept  # started from what was on disk
    assert fake_hub.ranges() == [f"bytes={kept}-"]
    assert events[-1]["sha256"] == hashlib.sha256(data).hexdigest()
    assert (home / "models" / "hf" / REPO / FILE).read_bytes() == data
    assert partials(home) == []


def test_a_cancelled_download_keeps_its_bytes_for_the_next_one(
        home: Path, rbees_pm: pluggy.PluginManager, fake_hub: FakeHub) -> None:
    """What pool-managerd does when a client goes away: cancel the task, resume later."""
    data = os.urandom(24 * MiB)
    fake_hub.add(REPO, FILE, data)
    fake_hub.throttle_bps = 8 * MiB
    first_block = threading.Event()

    def on_progress(p: DownloadProgress) -> None:
        if p.bytes_done >= 10 * MiB:
            first_block.set()

    async def start_then_cancel() -> None:
        task = asyncio.create_task(models.download(rbees_pm, REF, progress=on_progress))
        while not first_block.is_set():
            assert not task.done(), task
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(start_then_cancel())  # returns once the transfer thread has stopped
    (part,) = partials(home)
    assert part.stat().st_size == 10 * MiB
    assert not list(part.parent.glob("*.lock"))
    fake_hub.throttle_bps = None
    local = download(rbees_pm, REF)
    assert fake_hub.ranges() == [f"bytes={10 * MiB}-"]
    assert local.sha256 == hashlib.sha256(data).hexdigest()


def test_ctrl_c_exits_130_and_the_next_run_resumes(home: Path, fake_hub: FakeHub) -> None:
    data = os.urandom(24 * MiB)
    fake_hub.add(REPO, FILE, data)
    # 5 s of transfer left when the Ctrl+C goes: on a loaded machine this poll may see the
    # partial file late, and a download that finished first would rightly exit 0
    fake_hub.throttle_bps = 4 * MiB
    env = {**os.environ, "RBEES_HOME": str(home), "HF_ENDPOINT": fake_hub.endpoint}
    # as in a terminal's foreground: a test run started in the background (`cmd &` in a
    # script) ignores SIGINT, and a child inherits that
    proc = subprocess.Popen([POOL, "models", "download", REF], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not (partials(home) and partials(home)[0].stat().st_size >= 4 * MiB):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err == "rbees-pool: interrupted; run the command again to resume\n"
    assert out == ""
    kept = partials(home)[0].stat().st_size
    fake_hub.throttle_bps = None
    done = run_pool("models", "download", REF, env=env)
    assert done.returncode == 0, done.stderr
    assert fake_hub.ranges() == [f"bytes={kept}-"]


def test_a_catalog_entry_without_size_or_sha256_is_checked_against_the_hub(
        home: Path, tmp_path: Path, fake_hub: FakeHub, payload: bytes) -> None:
    """The shipped catalog records no sha256 for hub files: the download takes the file's
    size and LFS sha256 from the hub's metadata (``HEAD /resolve``: ``X-Linked-Size``,
    ``X-Linked-Etag``) and checks the bytes against them, through the real CLI and an
    Ollama-style alias. A file whose bytes differ from what the hub says is refused."""
    bad = os.urandom(MiB)
    fake_hub.add(REPO, "bad.gguf", bad[:-1] + b"\1",
                 advertised_sha256=hashlib.sha256(bad).hexdigest())
    catalog = tmp_path / "extra.toml"
    entry = """
[[models]]
id = "{id}"
aliases = ["{alias}"]
name = "Tiny"
hf_repo = "{repo}"
hf_file = "{file}"
context_length = 128
license = "mit"
sources = ["hf:{repo}/{file}"]
"""
    catalog.write_text(entry.format(id="tiny-1b", alias="tiny:1b", repo=REPO, file=FILE)
                       + entry.format(id="bad-1b", alias="bad:1b", repo=REPO, file="bad.gguf"))
    env = {"RBEES_HOME": str(home), "HF_ENDPOINT": fake_hub.endpoint,
           "RBEES_POOL_CATALOG_FILE": str(catalog)}
    done = run_pool("models", "download", "tiny:1b", "--format", "json", env=env)
    assert done.returncode == 0, done.stderr
    end = json.loads(done.stdout.splitlines()[-1])
    assert (end["event"], end["id"], end["size_bytes"], end["sha256"]) == (
        "end", "tiny-1b", len(payload), hashlib.sha256(payload).hexdigest())
    info = run_pool("models", "info", "tiny:1b", "--format", "json", env=env)
    (local,) = json.loads(info.stdout)["local"]
    assert local["details"]["verified_against"] == "lfs-sha256"
    assert local["details"]["etag"] == hashlib.sha256(payload).hexdigest()

    refused = run_pool("models", "download", "bad:1b", env=env)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert "downloaded file does not match its checksum" in refused.stderr
    assert f"expected {hashlib.sha256(bad).hexdigest()}" in refused.stderr
    assert not (home / "models" / "hf" / REPO / "bad.gguf").exists()


def test_the_users_hugging_face_cache_is_used_before_downloading(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        rbees_pm: pluggy.PluginManager, fake_hub: FakeHub, payload: bytes) -> None:
    """Issue 26 item 6: a file in HF_HOME's cache is not downloaded again; with
    ``download_to_hf_cache`` a download goes into that cache, where other tools find it."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("RBEES_SOURCES_HF_DOWNLOAD_TO_HF_CACHE", "true")
    local = download(rbees_pm, REF)
    snapshot = tmp_path / "hf" / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots"
    cached = snapshot / fake_hub.commit / FILE
    assert cached.read_bytes() == payload
    # the models directory links to the cache's file: recorded and listed like a download
    assert local.path == str(home / "models" / "hf" / REPO / FILE)
    assert Path(local.path).is_symlink() and Path(local.path).resolve() == cached.resolve()
    assert local.sha256 == hashlib.sha256(payload).hexdigest()
    assert local.details["hf_cache_file"] == str(cached)
    assert local.details["commit"] == fake_hub.commit
    assert [m.ref for m in models.list_models(rbees_pm) if m.source == "hf"] == [REF]
    assert not list(snapshot.rglob("*.json"))  # nothing of rbees' in the user's cache

    monkeypatch.delenv("RBEES_SOURCES_HF_DOWNLOAD_TO_HF_CACHE")
    asked = len(fake_hub.requests)
    assert resolve_model(rbees_pm, REF) == local.path
    again, fetched = asyncio.run(models.download(rbees_pm, REF))
    assert (again.path, fetched) == (local.path, False)
    assert len(fake_hub.requests) == asked  # the hub was not asked again

    # a file already in the cache (another tool put it there) is found before any download
    Path(local.path).unlink()
    Path(f"{local.path}.rbees.json").unlink()
    assert resolve_model(rbees_pm, REF) == str(cached)
    again, fetched = asyncio.run(models.download(rbees_pm, REF))
    assert fetched and again.path == local.path and Path(again.path).is_symlink()
    assert len(fake_hub.requests) == asked
    assert cached.read_bytes() == payload  # `models rm` removes the link, not the user's file
    models.remove(rbees_pm, REF)
    assert not Path(local.path).exists() and cached.read_bytes() == payload

    monkeypatch.setenv("RBEES_SOURCES_HF_USE_HF_CACHE", "false")
    with pytest.raises(ModelNotFoundError):
        resolve_model(rbees_pm, REF)
    source = HfSource(home / "models", use_hf_cache=True, download_to_hf_cache=False)
    assert source.resolve(REF[3:]) == str(cached)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "elsewhere"))  # read at each call
    assert source.resolve(REF[3:]) is None


def test_a_download_without_the_cache_setting_stays_in_the_models_directory(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        rbees_pm: pluggy.PluginManager, fake_hub: FakeHub, payload: bytes) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    local = download(rbees_pm, REF)
    assert local.path == str(home / "models" / "hf" / REPO / FILE)
    assert not (tmp_path / "hf").exists()
