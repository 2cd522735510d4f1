"""Structural fuzzing of a daemon's HTTP routes, taken from its route table.

CONTRACT section 1 says every bad input is a 4xx in the error envelope and no request can make
a daemon fail. This package attacks that promise with what property tests built on a schema
rarely send: nesting thousands deep, unpaired surrogates (escaped and as raw bytes), numbers no
double holds, a wrong type in every field, duplicate keys, empty and truncated bodies, other
content types, very long strings, hostile path segments, queries and Authorization headers,
and every method a path does not allow. Each field of each example body first gets every wrong
type in turn (:func:`sweep`), then hypothesis draws the rest (:func:`attacks`). The routes come
from the daemon's own table (:func:`route_table` reads starlette routes and, for the bodies,
its ``/openapi.json``), so a new route is attacked without a new test. Used by
``tests/test_fuzz_structural.py`` for rbees-orcd, pool-managerd and rbees-workerd; a
third-party daemon or plugin route uses it the same way::

    targets = route_table(my_routes, openapi_doc, examples={("POST", "/v2/x"): [{...}]})
    sent = fire("http://127.0.0.1:9000", targets, total=600)

Needs hypothesis (the ``dev`` extra); nothing in rbees imports this package but tests.
"""

from __future__ import annotations

from rbees_core.testing.fuzz.attacks import (
    BAD_AUTH,
    BAD_UTF8,
    HUGE_NUMBERS,
    QUERY_NAMES,
    QUERY_VALUES,
    SURROGATES,
    SWEEP_LITERALS,
    WRONG_TYPES,
    Attack,
    Target,
    attacks,
    body_attacks,
    json_values,
    route_table,
    skeleton,
    sweep,
)
from rbees_core.testing.fuzz.runner import check_answer, fire, run_target, send

__all__ = ["BAD_AUTH", "BAD_UTF8", "HUGE_NUMBERS", "QUERY_NAMES", "QUERY_VALUES", "SURROGATES",
           "SWEEP_LITERALS", "WRONG_TYPES", "Attack", "Target", "attacks", "body_attacks",
           "check_answer", "fire", "json_values", "route_table", "run_target", "send",
           "skeleton", "sweep"]
