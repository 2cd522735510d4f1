"""Sending :mod:`rbees_core.testing.fuzz`'s attacks to a live daemon and checking each answer."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence

import httpx
from hypothesis import HealthCheck, given, settings

from rbees_core import sse
from rbees_core.http import error_shape
from rbees_core.testing.fuzz.attacks import BODY_METHODS, Attack, Target, attacks, sweep

#: How many times the attacks of a route without a body a route with one gets.
BODY_WEIGHT = 4


#: Error events a stream may end with after a 200 whatever the request: the job was cancelled.
#: Any other (DECODE_FAILED, INTERNAL...) means the daemon accepted what it could not serve.
STREAM_ERRORS_OK = frozenset({"CANCELLED"})


def _check_stream(text: str, path: str) -> None:
    for frame in sse.parse(text):
        try:
            data = json.loads(frame.data)
        except ValueError:
            continue  # OpenAI's [DONE]
        if frame.event == "error" and isinstance(data, dict):
            assert data.get("code") in STREAM_ERRORS_OK, f"200, then an error event: {data}"
        elif path.startswith("/v1/") and isinstance(data, dict) and "error" in data:
            raise AssertionError(f"200, then an error chunk: {data}")


def check_answer(response: httpx.Response, path: str) -> None:
    """Assert the contract for one answer: below 500, and every error in its envelope --
    under a client protocol's prefix its shape's (:func:`rbees_core.http.error_shape`:
    OpenAI's ``{"error": {message, type, param, code}}`` under ``/v1/``, the shapes plugins
    register for theirs), rbees' ``{"error": {code, message, retriable, correlation_id}}``
    (the id echoed in ``X-Correlation-Id``) elsewhere; a 200 event stream ends with no error
    but :data:`STREAM_ERRORS_OK` (what a daemon accepts it must serve). Raises
    AssertionError."""
    assert response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
    if response.status_code < 400:
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            _check_stream(response.text, path)
        return
    try:
        body = response.json()
        error = body["error"]
    except (ValueError, KeyError, TypeError) as exc:
        raise AssertionError(f"{response.status_code} without an envelope: "
                             f"{response.text[:300]!r}") from exc
    shape = error_shape(path.split("?", 1)[0])
    if shape is not None:  # a client protocol's: the keys its shape has, a message
        expected = shape(response.status_code, "m", "INVALID_PARAMS", None)
        assert set(body) == set(expected), body
        if isinstance(expected["error"], dict):
            assert set(error) == set(expected["error"]), error
            error = error["message"]
        assert isinstance(error, str) and error, body
        return
    assert isinstance(error["code"], str) and error["code"].isupper(), error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["retriable"], bool), error
    assert error["correlation_id"] == response.headers["x-correlation-id"], error


def _healthy(client: httpx.Client, base_url: str) -> None:
    try:
        health = client.get(f"{base_url}/health", timeout=10)
    except httpx.HTTPError as exc:
        raise AssertionError(f"the daemon no longer answers /health: {exc!r}") from exc
    assert health.status_code == 200 and health.json().get("status") == "ok", health.text


def fire(base_url: str, targets: Sequence[Target], *, total: int = 600,
         check: Callable[[httpx.Response, str], None] = check_answer,
         headers: Mapping[str, str] | None = None, timeout: float = 20.0,
         health_every: int = 1) -> Counter[str]:
    """Attack ``targets`` at ``base_url``: first the deterministic :func:`sweep` of each,
    then about ``total`` generated :func:`attacks` (hypothesis drives and shrinks them; a
    route taking a body gets :data:`BODY_WEIGHT` times the share of one that does not, an
    excluded one has few attacks to draw from), then a plain GET of each route without
    parameters, to read back what the attacks left. ``check`` each answer, and ``GET
    /health`` after every ``health_every`` requests and after each target. ``headers`` go
    on every request (a bearer token). Returns how many requests of each kind went out;
    raises AssertionError (hypothesis' falsifying example first) at the first broken
    promise."""
    weights = [BODY_WEIGHT if t.method in BODY_METHODS and t.excluded is None else 1
               for t in targets]
    share = total / max(sum(weights), 1)
    sent: Counter[str] = Counter()
    with httpx.Client(headers=dict(headers or {}), timeout=timeout) as client:
        for target, weight in zip(targets, weights, strict=True):
            for attack in sweep(target):
                send(client, base_url, attack, check, sent, health_every)
            run_target(client, base_url, target, math.ceil(share * weight), check, sent,
                       health_every)
            _healthy(client, base_url)
        # what the attacks left behind (a pool registered with odd values...) must not
        # break a reader: every plain GET once more, last
        for target in targets:
            if target.method == "GET" and "{" not in target.path and target.excluded is None:
                send(client, base_url, Attack("read-back", "GET", target.path, None, None),
                     check, sent, health_every)
    return sent


def send(client: httpx.Client, base_url: str, attack: Attack,
         check: Callable[[httpx.Response, str], None] = check_answer,
         sent: Counter[str] | None = None, health_every: int = 1) -> httpx.Response:
    """Send one ``attack``, ``check`` its answer, count it in ``sent`` and check
    ``GET /health`` when ``health_every`` requests have gone out. Raises AssertionError
    naming the attack when there is no answer or a check fails."""
    headers: dict[bytes, bytes] = {k.encode(): v for k, v in attack.headers.items()}
    if attack.content_type is not None:
        headers[b"Content-Type"] = attack.content_type.encode()
    content: bytes | Iterator[bytes] | None = attack.body
    if attack.chunked and attack.body is not None:
        body = attack.body
        content = iter([body[i:i + 4096] for i in range(0, len(body), 4096)] or [b""])
    try:
        response = client.request(attack.method, f"{base_url}{attack.path}",
                                  content=content, headers=headers)
    except httpx.HTTPError as exc:
        raise AssertionError(f"{attack.describe()}: no answer: {exc!r}") from exc
    counted = sent if sent is not None else Counter()
    counted[attack.kind] += 1
    try:
        check(response, attack.path)
        if sum(counted.values()) % health_every == 0:
            _healthy(client, base_url)
    except AssertionError as exc:
        raise AssertionError(f"{attack.describe()}: {exc}") from exc
    return response


def run_target(client: httpx.Client, base_url: str, target: Target, per_target: int,
               check: Callable[[httpx.Response, str], None], sent: Counter[str],
               health_every: int = 1) -> None:
    """The generated part of :func:`fire` for one target, counting into ``sent``."""

    @settings(max_examples=per_target, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(attack=attacks(target))
    def one(attack: Attack) -> None:
        send(client, base_url, attack, check, sent, health_every)

    one()
