"""rbees-orcd and the catalog's names: an alias (an Ollama name, an earlier id) is admitted
under its entry's id, the one pools and workers know; a generation job for an embedding
model is refused at once. rbees-orcd's service in this process, without pools."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from rbees_core.api.orchestrator import TaskRequest
from rbees_core.errors import InvalidParamsError, ModelNotFoundError
from rbees_core.orchestrator.service import OrchestratorService

from .test_orcd_service import new_service


@pytest.fixture
async def svc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
              ) -> AsyncIterator[OrchestratorService]:
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RBEES_CONFIG", "RBEES_POOL_CATALOG_FILE"):
        monkeypatch.delenv(name, raising=False)
    service = new_service(tmp_path)
    await service.start()
    yield service
    await service.close()


async def test_an_alias_is_admitted_under_its_entrys_id(svc: OrchestratorService) -> None:
    queued = {}
    for name in ("qwen", "qwen2.5:0.5b", "gemma3:4b", "gemma3"):
        accepted = await svc.submit(TaskRequest(model=name, prompt="x"))
        queued[name] = next(q.model for q in svc.queue if q.job_id == accepted.job_id)
    assert queued == {"qwen": "qwen2.5-0.5b", "qwen2.5:0.5b": "qwen2.5-0.5b",
                      "gemma3:4b": "gemma3-4b", "gemma3": "gemma3-4b"}
    assert (await svc.job(next(iter(svc.queue)).job_id)).model == "qwen2.5-0.5b"
    # /v1/models/{name} answers for an alias as for the id; the list shows ids only
    assert svc.model_state("gemma3:4b") == svc.model_state("gemma3-4b") == "not_on_any_pool"
    assert "gemma3:4b" not in svc.model_states() and "gemma3-4b" in svc.model_states()
    with pytest.raises(ModelNotFoundError):
        await svc.submit(TaskRequest(model="gemma9:99b", prompt="x"), refuse_unknown=True)
    # the /v1 routes refuse an unknown name at once; an alias is known
    accepted = await svc.submit(TaskRequest(model="llama32", prompt="x"), refuse_unknown=True)
    assert next(q.model for q in svc.queue if q.job_id == accepted.job_id) == "llama3.2-1b"
    for q in list(svc.queue):
        await svc.cancel(q.job_id)


async def test_an_embedding_model_takes_embedding_jobs_only(svc: OrchestratorService) -> None:
    with pytest.raises(InvalidParamsError, match=r"nomic-embed-text-v1\.5 is an embedding model"):
        await svc.submit(TaskRequest(model="nomic-embed-text", prompt="hi"))
    assert len(svc.queue) == 0
    kinds = {m["id"]: m["kind"] for m in svc.models()}  # GET /v2/models: the web UI's list
    assert kinds["nomic-embed-text-v1.5"] == "embedding" and kinds["gemma3-4b"] == "chat"
    accepted = await svc.submit(TaskRequest(model="nomic-embed-text", input=["hi"]))
    (job,) = list(svc.queue)
    assert (job.job_id, job.model) == (accepted.job_id, "nomic-embed-text-v1.5")
    await svc.cancel(accepted.job_id)
