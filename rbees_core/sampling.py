"""What the worker makes of an execute request's sampling fields, before queueing the job.

Called by rbees-workerd's ``POST /v2/execute`` handler; the checks that need the loaded
model (vocabulary size, whether its backend reports logprobs) live here, the rest in
:mod:`rbees_core.api.rules`.
"""

from __future__ import annotations

from rbees_core.api.rules import logit_bias_pairs
from rbees_core.api.worker import ExecuteRequest
from rbees_core.backend import LoadedModel, SamplingParams
from rbees_core.errors import InvalidParamsError


def sampling_params(model: LoadedModel, req: ExecuteRequest, *, seed: int,
                    grammar: str | None) -> SamplingParams:
    """The :class:`SamplingParams` of ``req``. Raises :class:`InvalidParamsError` (a 400
    naming ``logit_bias``) for a token id beyond the model's vocabulary, or any
    ``logit_bias`` for a model that does not say its vocabulary size."""
    pairs = logit_bias_pairs(req.logit_bias)
    if pairs and not model.n_vocab:  # no vocabulary to check ids against, nor to bias
        raise InvalidParamsError("logit_bias", "this model's backend does not say its "
                                 "vocabulary, so it cannot apply logit_bias; run the model "
                                 "on the llamacpp or torch backend for it")
    if pairs and pairs[-1][0] >= model.n_vocab:
        raise InvalidParamsError("logit_bias", f"token {pairs[-1][0]} is not in the "
                                 f"model's vocabulary of {model.n_vocab} tokens")
    return SamplingParams(
        temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
        repetition_penalty=req.repetition_penalty, seed=seed, grammar=grammar,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        min_p=req.min_p, logit_bias=pairs)


def logprobs_top(model: LoadedModel, req: ExecuteRequest, backend: str) -> int | None:
    """How many alternatives each token's logprob entry of ``req`` holds (None: it asks
    for no logprobs). Raises :class:`InvalidParamsError` (a 400) for a model whose backend
    cannot report them, naming the backends that can."""
    if not req.logprobs:
        return None
    if not model.supports_logprobs:
        raise InvalidParamsError(
            "logprobs", f"the {backend} backend cannot report logprobs; run the model on "
            "the llamacpp or torch backend for them")
    return req.top_logprobs
