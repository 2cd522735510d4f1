"""``bdd-runner`` itself, on a small feature folder: exit status, tags, JSON records, transcript."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

RUNNER = str(Path(sys.executable).with_name("bdd-runner"))
FEATURE = """\
Feature: Arithmetic
  @good
  Scenario: Adding works
    Given the number 2
    When 3 is added
    Then the number is 5

  @bad
  Scenario: Adding is checked
    Given the number 2
    When 3 is added
    Then the number is 6
"""
STEPS = """\
from pytest_bdd import given, parsers, then, when
import pytest

def pytest_configure(config):
    for tag in ("good", "bad"):
        config.addinivalue_line("markers", tag)

@pytest.fixture
def box():
    return {}

@given(parsers.parse("the number {n:d}"))
def number(box, n):
    box["n"] = n

@when(parsers.parse("{n:d} is added"))
def add(box, n):
    box["n"] += n

@then(parsers.parse("the number is {n:d}"))
def check(box, n):
    assert box["n"] == n
"""
BIND = "from pytest_bdd import scenarios\n\nscenarios('.')\n"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    features = tmp_path / "features"
    features.mkdir()
    (features / "arithmetic.feature").write_text(FEATURE)
    (features / "conftest.py").write_text(STEPS)
    (features / "test_features.py").write_text(BIND)
    return features


def run(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([RUNNER, "--features-dir", str(folder), *args], cwd=folder.parent,
                          capture_output=True, text=True, timeout=120)


def test_a_failing_scenario_fails_the_run_and_json_says_which(folder: Path) -> None:
    transcript = folder.parent / "t.jsonl"
    done = run(folder, "--format", "json", "--transcript", str(transcript))
    assert done.returncode == 1, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert {(r["scenario"], r["status"]) for r in records} == {
        ("Adding works", "passed"), ("Adding is checked", "failed")}
    failed = next(r for r in records if r["status"] == "failed")
    assert failed["tags"] == ["bad"] and failed["feature"] == "Arithmetic"
    assert [s["status"] for s in failed["steps"]] == ["passed", "passed", "failed"]
    lines = [json.loads(line) for line in transcript.read_text().splitlines()]
    assert [r["event"] for r in lines] == ["run", "scenario", "scenario", "summary"]
    assert lines[-1]["failed"] == 1 and lines[-1]["passed"] == 1


def test_tags_select_scenarios(folder: Path) -> None:
    done = run(folder, "--tags", "@good", "--format", "json")
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["scenario"] for line in done.stdout.splitlines()] == ["Adding works"]
    assert "1 scenarios, 0 failed" in done.stderr


def test_nothing_selected_or_a_missing_feature_is_a_usage_error(folder: Path) -> None:
    assert run(folder, "--tags", "nothing_has_this").returncode == 2
    missing = run(folder, "--feature", "nope.feature")
    assert missing.returncode == 2 and "no such feature file" in missing.stderr
