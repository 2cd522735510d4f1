"""What ``rbees jobs submit`` reads from an answer and prints at the end, shared by the
daemon path (:mod:`.jobs`) and M0 (:mod:`.m0`)."""

from __future__ import annotations

import sys
from typing import Any


def check_answer(answer: Any) -> Any:
    """The JSON of an answer, or the envelope's message as an RbeesError."""
    from rbees_core.errors import RbeesError

    if answer.status_code >= 400:
        try:
            error = answer.json()["error"]
            message = f"{error['code']}: {error['message']}"
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {answer.status_code}: {answer.text[:200]}"
        raise RbeesError(message)
    return answer.json() if answer.content else {}


def print_stats(end: dict[str, Any], started: float, first: float | None) -> None:
    """The one stats line on stderr after a job's text (tokens, rate, first token)."""
    tokens = end.get("tokens_out", 0)
    decode = float(end.get("decode_ms") or 0) / 1000
    rate = tokens / decode if decode else 0.0
    ttft = (first - started) * 1000 if first else None
    print(f"[{end.get('job_id')}] {tokens} tokens, {rate:.1f} tok/s, first token "
          f"{ttft:.0f} ms after submit, stop: {end.get('stop_reason')}"
          if ttft is not None else f"[{end.get('job_id')}] {tokens} tokens",
          file=sys.stderr)
