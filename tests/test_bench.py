"""The benchmarks of bench/ cannot rot: their judging and report code, and one quick run of
bench/worker.py against a real rbees-workerd (llama-server's cases left out: the test must not
depend on bench/setup.sh having built it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(autouse=True)
def _bench_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))


def test_report_has_a_column_per_run_and_counts_the_runs_that_held() -> None:
    from sidebyside import Check, ratio_check, report

    runs = [
        [ratio_check("tok/s ratio", ">= 1.05", 1.10, 1.05),
         ratio_check("TTFT", "<= +2 ms", 3.0, 2.0, at_least=False, fmt="{:+.1f} ms")],
        [ratio_check("tok/s ratio", ">= 1.05", 1.00, 1.05),
         ratio_check("TTFT", "<= +2 ms", None, 2.0, at_least=False)],
        [ratio_check("tok/s ratio", ">= 1.05", 1.20, 1.05),
         Check("TTFT", "<= +2 ms", "-1.0 ms", True)],
    ]
    lines = report(runs).splitlines()
    assert lines[0] == "| row | target | run 1 | run 2 | run 3 | holds |"
    assert lines[2] == ("| tok/s ratio | >= 1.05 | 1.100 PASS | 1.000 FAIL | 1.200 PASS "
                        "| 2 of 3 |")
    # an unmeasured row (a missing baseline) does not hold
    assert lines[3] == "| TTFT | <= +2 ms | +3.0 ms FAIL | n/a n/a | -1.0 ms PASS | 1 of 3 |"


def test_worker_bench_judges_issue_21s_rows() -> None:
    import worker

    def r(name: str, tps: float | None, ttft: float | None) -> worker.Result:
        return worker.Result(name, name, tps, ttft, 128)

    checks = worker.checks({x.name: x for x in [
        r("L1", 70.0, 20.0), r("W1", 77.0, 21.0), r("L4", 90.0, 60.0), r("W4", 90.0, 50.0),
        r("L1k", None, 1000.0), r("W1k", None, 1200.0), r("Wj", 40.0, 30.0),
        r("Wg", 38.0, 30.0)]})
    assert [(c.measured, c.ok) for c in checks] == [
        ("1.100", True), ("+1.0 ms", True), ("1.000", False), ("1.200", False),
        ("0.950", True)]
    # without llama-server every judged row is n/a, not a pass
    assert {c.ok for c in worker.checks({"W1": r("W1", 77.0, 21.0)})} == {None}


def test_worker_bench_prints_the_engines_ceiling_beside_the_judged_rows() -> None:
    import worker

    def r(name: str, tps: float) -> worker.Result:
        return worker.Result(name, name, tps, None, 128)

    by = {x.name: x for x in [r("L1", 100.0), r("W1", 98.0), r("a1", 104.0), r("L4", 150.0)]}
    assert worker.ceilings(by) == ["1.040", "0.942", "-", "-"]
    assert [label.split(" (")[1][:5] for label, _, _ in worker.CEILINGS] == [
        "a1/L1", "W1/a1", "a4/L4", "W4/a4"]


def test_orchestrator_bench_parses_its_options() -> None:
    out = subprocess.run([sys.executable, str(BENCH / "orchestrator.py"), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for option in ("--skip-speed", "--speed-tokens", "--llama-server", "--device", "--quick"):
        assert option in out.stdout


def test_gpu_check_offers_issue_21s_benches() -> None:
    """scripts/gpu_check.py runs on GPU hosts only; its options are checked here."""
    script = BENCH.parent / "scripts" / "gpu_check.py"
    out = subprocess.run([sys.executable, str(script), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for option in ("--bench", "--skip-torch", "--llama-server", "--tokens"):
        assert option in out.stdout


@pytest.mark.model
def test_worker_bench_runs_quickly_against_a_real_worker() -> None:
    out = subprocess.run([sys.executable, str(BENCH / "worker.py"), "--quick",
                          "--skip", "L1,L4,W4"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "| W1 | rbees-workerd" in out.stdout, out.stdout + out.stderr
    assert "| W1k | rbees-workerd" in out.stdout
    assert "| Wg | rbees-workerd" in out.stdout  # issue 23's grammar row
    assert "failed" not in out.stderr, out.stderr
    assert "## Acceptance, every run (issue 21)" in out.stdout


@pytest.mark.model
def test_worker_bench_runs_the_bare_loops_on_the_real_model() -> None:
    """Cases a1 and a4 (the engine's ceiling) decode the real model and count every token."""
    out = subprocess.run([sys.executable, str(BENCH / "worker.py"), "--tokens", "8",
                          "--runs", "1", "--skip", "L1,W1,L4,W4,a,c,e,g,s"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert "failed" not in out.stderr, out.stderr
    rows = {line.split(" | ")[0]: line for line in out.stdout.splitlines()
            if line.startswith("| a")}
    assert rows["| a1"].endswith("| - | 8 |"), rows
    assert rows["| a4"].endswith("| - | 32 |"), rows


def test_protocol_adapter_bench_runs_every_installed_protocol() -> None:
    """Section (p1) of bench/orchestrator.py in one round: every protocol answers through
    rbees-orcd's real app over the stub orchestrator, and each row is judged."""
    from protocols import REFERENCE, bench_adapter_costs

    lines = bench_adapter_costs(1)
    rows = [line for line in lines if line.startswith("| ") and "---" not in line][1:]
    assert rows[0].startswith(f"| {REFERENCE} |")
    assert all(row.endswith(("| yes |", "| NO |")) for row in rows[1:]), rows
