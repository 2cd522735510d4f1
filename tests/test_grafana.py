"""Issue 26 item 5: every query of the Grafana dashboard (``deploy/grafana/rbees.json``)
names a metric that rbees-orcd, pool-managerd or a worker exports, read from the
``/metrics`` of a real cluster's daemons, with the series suffixes of counters
(``_total``) and histograms (``_bucket``, ``_sum``, ``_count``) mapped from their families.
A panel that names a metric nobody exports fails the test (the negative case below)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "rbees.json"
METRICS_DOC = ROOT / "docs" / "metrics.md"

_STRINGS = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
#: a name not preceded by a word character, ``$`` (a Grafana variable) or ``.`` and not
#: followed by ``(`` (a function or aggregation)
_NAME = re.compile(r"(?<![\w:$.])([A-Za-z_:][\w:]*)(?!\w|\s*\()")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
             "or", "unless", "offset", "inf", "nan"}
#: Grafana's ``label_values(METRIC, LABEL)`` of a template variable: the metric is PromQL
_LABEL_VALUES = re.compile(r"label_values\(\s*(.+?)\s*,\s*\w+\s*\)\s*$")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (strings, label matchers, ranges and
    grouping label lists removed; functions and keywords are not names)."""
    label_values = _LABEL_VALUES.match(expr.strip())
    if label_values is not None:
        expr = label_values.group(1)
    for pattern in (_STRINGS, _MATCHERS, _RANGES, _GROUPING):
        expr = pattern.sub(" ", expr)
    return {name for name in _NAME.findall(expr) if name.lower() not in _KEYWORDS}


def _queries(node: Any) -> Iterator[str]:
    """Every PromQL text of a dashboard: panels' (rows' too) target ``expr`` and the
    template variables' queries."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            elif key == "query" and isinstance(value, dict) and "query" in value:
                yield str(value["query"])
            else:
                yield from _queries(value)
    elif isinstance(node, list):
        for item in node:
            yield from _queries(item)


def dashboard_names(dashboard: dict[str, Any]) -> set[str]:
    names: set[str] = set()
    for expr in _queries({"panels": dashboard.get("panels", []),
                          "templating": dashboard.get("templating", {})}):
        names |= metric_names(expr)
    return names


_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count",
                                                              "_created"),
             "summary": ("", "_sum", "_count", "_created"), "info": ("_info",)}


def exported_names(text: str) -> set[str]:
    """The series names a Prometheus exposition offers: each family's, mapped by its type
    (a family with no sample yet, such as the GPU gauges of a host without GPUs, counts),
    and every sample's."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names |= {family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",))}
        names |= {sample.name for sample in family.samples}
    return names


def unknown_metrics(dashboard: dict[str, Any], exported: set[str]) -> set[str]:
    return dashboard_names(dashboard) - exported


def test_every_panel_names_a_metric_the_daemons_export(rbees_cluster: Any) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    # one job: a worker starts (its /metrics is scraped too) and the histograms get samples
    events = rbees_cluster.events(rbees_cluster.submit()["job_id"])
    assert events[-1][1] == "end", events
    workers = httpx.get(f"{rbees_cluster.pool_url}/v2/workers", timeout=10).json()["workers"]
    uris = [w["uri"] for w in workers if w["state"] in ("ready", "busy")]
    assert uris, workers
    exported: set[str] = set()
    documented = METRICS_DOC.read_text()
    for url in (rbees_cluster.url, rbees_cluster.pool_url, *uris):
        answer = httpx.get(f"{url}/metrics", timeout=10)
        assert answer.status_code == 200
        exported |= exported_names(answer.text)
        # and docs/metrics.md lists every rbees family a daemon exports
        for family in text_string_to_metric_families(answer.text):
            name = family.name + ("_total" if family.type == "counter" else "")
            if name.startswith("rbees_") and not name.endswith("_created"):
                assert f"`{name}`" in documented, (url, name)
    names = dashboard_names(dashboard)
    # what the issue asks the dashboard to show is there: the extraction is not vacuous
    assert {"rbees_worker_tokens_generated_total", "rbees_ttft_seconds_bucket",
            "rbees_queue_depth", "rbees_jobs_total", "rbees_gpu_utilization_ratio",
            "rbees_gpu_memory_used_bytes", "rbees_gpu_temperature_celsius",
            "rbees_gpu_power_watts", "rbees_key_tokens_total"} <= names, names
    assert unknown_metrics(dashboard, exported) == set()
    assert all(p["datasource"]["uid"] == "${DS_PROMETHEUS}" for p in dashboard["panels"]
               if p["type"] != "row")


def test_a_panel_naming_an_unknown_metric_fails() -> None:
    r = CollectorRegistry()
    Counter("rbees_jobs", "", ["outcome"], registry=r)  # no sample yet: the family counts
    Histogram("rbees_ttft_seconds", "", ["model"], registry=r)
    Gauge("rbees_queue_depth", "", ["lane"], registry=r).labels("batch").set(1)
    exported = exported_names(generate_latest(r).decode())
    dashboard = {"panels": [
        {"type": "row", "panels": [{"targets": [{"expr": "rbees_queue_depth{lane=\"batch\"}"}]}]},
        {"targets": [
            {"expr": 'sum by (outcome) (rate(rbees_jobs_total{outcome!~"x|y"}[$__rate_interval]))'},
            {"expr": "histogram_quantile(0.95, sum by (le, model) "
                     "(rate(rbees_ttft_seconds_bucket[5m])))"},
            {"expr": "rate(rbees_no_such_metric_total[5m]) / on (instance) group_left (model) "
                     "rbees_ttft_seconds"}]}],
        "templating": {"list": [{"query": {"query": "label_values(rbees_typo_count, model)"}}]}}
    assert unknown_metrics(dashboard, exported) == {
        "rbees_no_such_metric_total",  # nobody exports it
        "rbees_ttft_seconds",  # a histogram has no series of its bare name
        "rbees_typo_count",  # a template variable's query is checked too
    }
    assert metric_names('sum by (le) (rate(a_b:c_bucket{x="rate(y)"}[1m])) > bool 0.5') == {
        "a_b:c_bucket"}
