"""Token log probabilities: the entries a worker's token events carry, and OpenAI's forms.

The worker's decode loop (:mod:`rbees_core.engine`) makes one entry per generated token with
:func:`logprob_entry`, in the form of OpenAI's chat ``logprobs.content`` items, and sends
the entries with the token event of the piece that completes their text (a piece holds only
whole UTF-8 characters, so one event may carry several entries, and a token that ends
inside a character waits for the next piece). rbees-orcd's ``/v1`` passes them on as chat
entries (:func:`chat_logprobs`) or turns them into the legacy completions form
(:class:`CompletionLogprobs`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from rbees_core.backend import LoadedModel


def _token(model: LoadedModel, token: int) -> dict[str, Any]:
    raw = model.token_bytes(token)
    return {"token": raw.decode("utf-8", errors="replace"), "bytes": list(raw)}


def logprob_entry(model: LoadedModel, slot: int, token: int, top: int) -> dict[str, Any]:
    """The entry of ``token``, just sampled in ``slot``: ``{token, logprob, bytes,
    top_logprobs: [{token, logprob, bytes}]}`` with the ``top`` likeliest tokens.

    Called by the engine's decode thread right after :meth:`LoadedModel.sample`, only for
    jobs that asked for logprobs. Raises what :meth:`LoadedModel.logprobs` raises.
    """
    logprob, alternatives = model.logprobs(slot, token, top)
    return {**_token(model, token), "logprob": logprob, "top_logprobs": [
        {**_token(model, alt), "logprob": lp} for alt, lp in alternatives]}


#: Makes a choice's ``logprobs`` (or a streamed chunk's) of the entries of its tokens.
LogprobsForm = Callable[[Sequence[dict[str, Any]]], dict[str, Any]]


def chat_logprobs(entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A chat choice's (or chunk's) ``logprobs`` for the entries of its tokens."""
    return {"content": list(entries), "refusal": None}


class CompletionLogprobs:
    """The legacy completions ``logprobs`` of one choice (``tokens``, ``token_logprobs``,
    ``top_logprobs`` as ``{token: logprob}`` holding the sampled token too, and
    ``text_offset`` counted, as OpenAI does, from the start of the prompt).

    rbees-orcd keeps one per choice: :meth:`add` the entries of each token event in order,
    then :attr:`value` is the whole choice's; :meth:`add` also returns the part of those
    entries alone, for a streamed chunk.
    """

    def __init__(self, prompt_chars: int) -> None:
        self.offset = prompt_chars
        self.value: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                      "text_offset": []}

    def add(self, entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
        part: dict[str, list[Any]] = {key: [] for key in self.value}
        for entry in entries:
            top = {alt["token"]: alt["logprob"] for alt in entry.get("top_logprobs", ())}
            top.setdefault(entry["token"], entry["logprob"])
            part["tokens"].append(entry["token"])
            part["token_logprobs"].append(entry["logprob"])
            part["top_logprobs"].append(top)
            part["text_offset"].append(self.offset)
            self.offset += len(entry["token"])
        for key, values in part.items():
            self.value[key].extend(values)
        return part
