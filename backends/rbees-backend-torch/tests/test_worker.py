"""A real rbees-workerd --backend torch on the embedded SmolLM2 GGUF, over HTTP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from rbees_backend_torch.backend import TorchBackend

from rbees_core.testing import WorkerHandle, workerd_argv

PROMPT = "The capital of France is"


def _run(worker: WorkerHandle, job_id: str, **body: Any
         ) -> tuple[str, dict[str, Any], list[tuple[int | None, str, dict[str, Any]]]]:
    frames = worker.execute({"job_id": job_id, "prompt": PROMPT, "max_tokens": 12,
                             "temperature": 0, "seed": 7, **body})
    text = "".join(d["t"] for _, event, d in frames if event == "token")
    return text, frames[-1][2], frames


def test_ready_reports_the_torch_backend(gguf_worker: WorkerHandle,
                                        smollm2_gguf: Path) -> None:
    ready = httpx.get(f"{gguf_worker.url}/v2/ready").json()
    assert ready["ready"] is True
    assert ready["backend"] == "torch"
    assert ready["device"] == "cpu"
    assert ready["memory_bytes"] > 135_000_000 * 4  # float32 weights at least
    # The pool's preflight estimate, from the GGUF header alone, is what the worker holds.
    estimate = TorchBackend().estimate_memory(str(smollm2_gguf), device="cpu", slots=1,
                                              ctx=None)
    assert estimate is not None
    loaded = estimate.weights_bytes + estimate.kv_cache_bytes
    assert abs(loaded - ready["memory_bytes"]) < 0.001 * ready["memory_bytes"]


def test_events_come_in_contract_order(gguf_worker: WorkerHandle) -> None:
    text, end, frames = _run(gguf_worker, "order-1")
    events = [event for _, event, _ in frames]
    assert events[0] == "started"
    assert events[-1] == "end"
    assert set(events[1:-1]) <= {"token", "metrics"}
    assert "token" in events
    ids = [ident for ident, _, _ in frames if ident is not None]
    assert len(ids) == len(frames)
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    tokens = [d for _, event, d in frames if event == "token"]
    assert [d["i"] for d in tokens] == list(range(len(tokens)))
    assert frames[0][2]["job_id"] == "order-1" and end["job_id"] == "order-1"
    assert end["seed"] == 7 and end["tokens_in"] == 5
    assert text.strip()


def test_greedy_decoding_repeats(gguf_worker: WorkerHandle) -> None:
    first, _, _ = _run(gguf_worker, "greedy-1")
    second, _, _ = _run(gguf_worker, "greedy-2")
    assert first == second
    assert "Paris" in first


def test_seeded_sampling_repeats(gguf_worker: WorkerHandle) -> None:
    sampled = {"temperature": 0.9, "top_k": 40, "top_p": 0.95, "repetition_penalty": 1.1,
               "max_tokens": 16}
    first, _, _ = _run(gguf_worker, "seeded-1", seed=1234, **sampled)
    second, _, _ = _run(gguf_worker, "seeded-2", seed=1234, **sampled)
    assert first == second
    others = {_run(gguf_worker, f"seeded-other-{s}", seed=s, **sampled)[0] for s in (1, 2, 3)}
    assert len(others | {first}) > 1, "different seeds should not all give one text"


def test_max_tokens_ends_the_job(gguf_worker: WorkerHandle) -> None:
    _, end, _ = _run(gguf_worker, "max-1", max_tokens=3)
    assert end["stop_reason"] == "max_tokens"
    assert end["tokens_out"] == 3


def test_stop_sequence_ends_the_job(gguf_worker: WorkerHandle) -> None:
    full, _, _ = _run(gguf_worker, "stop-probe", max_tokens=8)
    stop = full.strip()[-3:]
    text, end, _ = _run(gguf_worker, "stop-1", max_tokens=8, stop=[stop])
    assert end["stop_reason"] == "stop"
    assert text == full[: full.index(stop)]


def test_chat_messages_use_the_model_template(gguf_worker: WorkerHandle) -> None:
    frames = gguf_worker.execute({"job_id": "chat-1", "max_tokens": 8, "temperature": 0,
                                  "messages": [{"role": "user", "content": "Say hello."}]})
    assert frames[-1][1] == "end"
    assert frames[-1][2]["tokens_in"] > 20  # the template's system prompt is in
    assert "".join(d["t"] for _, e, d in frames if e == "token").strip()


def test_split_characters_arrive_whole(gguf_worker: WorkerHandle) -> None:
    text, end, _ = _run(gguf_worker, "utf8-1", prompt="Écris « 日本語 » trois fois: 日本語,",
                        max_tokens=16)
    assert end["stop_reason"] in ("max_tokens", "eos")
    assert any(ord(c) > 0x3000 for c in text), "the model should answer with CJK characters"
    # max_tokens may cut the last character; everything before it must be whole
    assert "\ufffd" not in text.rstrip("\ufffd")


@pytest.mark.parametrize("device", ["missing-kind", "cuda:99"])
def test_unusable_device_fails_the_worker(rbees_process: Any, tmp_path: Path,
                                          free_port: int, device: str) -> None:
    from rbees_backend_torch import TorchBackend

    if device == "missing-kind":
        available = TorchBackend.available_devices()
        device = next(kind for kind in ("mps", "cuda") if kind not in available)
    proc = rbees_process(
        workerd_argv("torch-bad", free_port, backend="torch", device=device),
        env={"RBEES_HOME": str(tmp_path / "home")}, name="workerd-bad")
    assert proc.proc.wait(timeout=120) == 1
    log = proc.log()
    assert "BACKEND_UNAVAILABLE" in log
    assert "load_failed" in log


def test_structured_output_is_refused_naming_the_backend_that_can(
        gguf_worker: WorkerHandle) -> None:
    for extra, field in (({"json_schema": {"type": "object"}}, "json_schema"),
                         ({"grammar": 'root ::= "a"'}, "grammar")):
        answer = httpx.post(f"{gguf_worker.url}/v2/execute", json={
            "job_id": "grammar-1", "prompt": PROMPT, "max_tokens": 4, **extra})
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["details"]["field"] == field
        assert "torch" in error["message"] and "llamacpp" in error["message"]


def test_logprobs_and_sampling_fields(gguf_worker: WorkerHandle) -> None:
    """The torch backend reports logprobs (greedy: the chosen token is the likeliest) and
    honours penalties, min_p and logit_bias as the llama.cpp one does."""
    text, end, frames = _run(gguf_worker, "torch-lp", logprobs=True, top_logprobs=3)
    entries = [e for _, event, d in frames if event == "token" for e in d.get("logprobs", ())]
    assert len(entries) == end["tokens_out"]
    assert b"".join(bytes(e["bytes"]) for e in entries) == text.encode()
    for e in entries:
        assert len(e["top_logprobs"]) == 3 and e["logprob"] <= 0
        assert (e["top_logprobs"][0]["token"], e["top_logprobs"][0]["logprob"]) == (
            e["token"], e["logprob"])
    first = entries[0]
    plain, _, _ = _run(gguf_worker, "torch-plain")
    assert plain == text
    banned = httpx.post(f"{gguf_worker.url}/v2/execute", json={
        "job_id": "torch-oov", "prompt": PROMPT, "logit_bias": {"10000000": 1}})
    assert banned.status_code == 400 and "logit_bias" in banned.text
    import llama_cpp  # SmolLM2's token ids, from its vocabulary alone

    from rbees_core import plugins
    from rbees_core.models import DEFAULT_MODEL_REF, resolve_model

    vocab = llama_cpp.Llama(resolve_model(plugins.make_manager(), DEFAULT_MODEL_REF),
                            vocab_only=True, verbose=False)
    ban = {str(t): -100 for t in vocab.tokenize(first["token"].encode(), add_bos=False)}
    other, _, _ = _run(gguf_worker, "torch-ban", logit_bias=ban, max_tokens=1)
    assert other != first["token"]
    (bees,) = vocab.tokenize(b" bees", add_bos=False)
    forced, _, _ = _run(gguf_worker, "torch-force", logit_bias={str(bees): 100}, max_tokens=1)
    assert forced == " bees"
    long, _, _ = _run(gguf_worker, "torch-long", max_tokens=32)
    penalized, _, _ = _run(gguf_worker, "torch-pen", presence_penalty=2.0,
                           frequency_penalty=2.0, max_tokens=32)
    assert penalized != long
    _, end, _ = _run(gguf_worker, "torch-min-p", temperature=0.8, min_p=0.1)
    assert end["stop_reason"] in ("eos", "max_tokens")
