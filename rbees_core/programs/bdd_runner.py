"""``bdd-runner``: runs the Gherkin features against the real programs (CONTRACT section 0).

The features live in ``features/`` (pytest-bdd): each scenario starts or reuses real daemons
on the simulated hosts blep, mac and workstation (:mod:`rbees_core.testing.hosts`). The
runner is pytest underneath, with :class:`Transcript` as a plugin that records every
scenario, step by step, as JSON Lines.

- ``--tags EXPR``: scenarios whose tags match, e.g. ``"m2 and not queue"`` (``@`` optional).
- ``--feature PATH``: only these feature files (repeat).
- ``--format json``: one JSON record per scenario on stdout, as each ends (pytest's own report
  goes to stderr); ``text``: pytest's report and a summary.
- ``--mode``: ``auto`` (network namespaces when possible, else loopback), ``netns``,
  ``loopback``. The summary says which ran.

Exit status: 0 when every selected scenario passed; 1 on any failure; 2 on usage errors
(and when nothing was selected).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from contextlib import redirect_stdout
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Annotated, Any

import typer

from rbees_core.programs.cli_common import FormatOption, OutputFormat

PROGRAM = "bdd-runner"
MODES = ("auto", "netns", "loopback")


def default_features_dir() -> Path:
    """``./features`` when it exists, else the ``features/`` of the checkout this package is
    installed from."""
    here = Path.cwd() / "features"
    if (here / "test_features.py").exists():
        return here
    return Path(__file__).resolve().parents[2] / "features"


class Transcript:
    """A pytest plugin writing one JSON line per event of the run to ``out``: ``run`` at the
    start, ``scenario`` as each ends (feature, scenario, tags, status, seconds, steps), and
    ``summary``; with ``echo`` each scenario record is printed to ``echo`` too."""

    def __init__(self, out: IO[str], echo: IO[str] | None = None) -> None:
        self.out = out
        self.echo = echo
        self.records: dict[str, dict[str, Any]] = {}
        self.results: list[dict[str, Any]] = []
        self.began = time.monotonic()
        self.hosts = ""

    def _write(self, record: dict[str, Any], *, echo: bool = False) -> None:
        line = json.dumps(record, ensure_ascii=False)
        self.out.write(line + "\n")
        self.out.flush()
        if echo and self.echo is not None:
            self.echo.write(line + "\n")
            self.echo.flush()

    def pytest_sessionstart(self) -> None:
        self._write({"event": "run", "started_at": datetime.now(timezone.utc).isoformat(),
                     "argv": sys.argv[1:]})

    def _record(self, item: Any) -> dict[str, Any]:
        return self.records.setdefault(item.nodeid, {
            "event": "scenario", "feature": "", "file": "", "scenario": item.name,
            "tags": [], "status": "passed", "seconds": 0.0, "steps": [], "error": None})

    def pytest_bdd_before_scenario(self, request: Any, feature: Any, scenario: Any) -> None:
        record = self._record(request.node)
        record.update(feature=feature.name, file=Path(feature.filename).name,
                      scenario=scenario.name, tags=sorted(scenario.tags | feature.tags))

    def pytest_bdd_after_step(self, request: Any, step: Any, **_: Any) -> None:
        self._record(request.node)["steps"].append(
            {"keyword": step.keyword, "text": step.name, "status": "passed"})

    def pytest_bdd_step_error(self, request: Any, step: Any, exception: Exception,
                              **_: Any) -> None:
        self._record(request.node)["steps"].append(
            {"keyword": step.keyword, "text": step.name, "status": "failed",
             "error": f"{type(exception).__name__}: {exception}"[:2000]})

    def pytest_runtest_logreport(self, report: Any) -> None:
        record = self.records.setdefault(report.nodeid, {
            "event": "scenario", "feature": "", "file": "", "scenario": report.nodeid,
            "tags": [], "status": "passed", "seconds": 0.0, "steps": [], "error": None})
        record["seconds"] = round(record["seconds"] + report.duration, 3)
        if report.failed and record["status"] != "failed":
            record["status"] = "failed"
            record["error"] = f"{report.when}: {report.longreprtext[-3000:]}"
        elif report.skipped and record["status"] == "passed":
            record["status"] = "skipped"
        if report.when == "teardown":
            self.results.append(record)
            self._write(record, echo=True)

    def pytest_sessionfinish(self, session: Any, exitstatus: int) -> None:
        from rbees_core.testing.hosts import LAB_DESCRIPTION

        self.hosts = session.config.stash.get(LAB_DESCRIPTION, "no hosts were needed")
        counts = {status: sum(r["status"] == status for r in self.results)
                  for status in ("passed", "failed", "skipped")}
        self._write({"event": "summary", **counts, "scenarios": len(self.results),
                     "seconds": round(time.monotonic() - self.began, 1), "hosts": self.hosts,
                     "exit_status": int(exitstatus)})


app = typer.Typer(add_completion=False, help=__doc__.split("\n\n")[0] if __doc__ else None,
                  rich_markup_mode=None)  # plain click help, as cli_common.new_app


@app.command()
def run_features(
    tags: Annotated[str | None, typer.Option("--tags", help="Tag expression, e.g. 'm2 and not "
                                                          "queue'")] = None,
    feature: Annotated[list[str] | None, typer.Option(
        "--feature", help="A feature file to run (repeat); default: all")] = None,
    output_format: FormatOption = OutputFormat.text,
    mode: Annotated[str, typer.Option("--mode", help="auto, netns or loopback")] = "auto",
    transcript: Annotated[Path | None, typer.Option(
        "--transcript", help="JSON Lines file (default: artifacts/bdd/run-<time>.jsonl)")
    ] = None,
    features_dir: Annotated[Path | None, typer.Option("--features-dir")] = None,
    exitfirst: Annotated[bool, typer.Option("-x", "--exitfirst",
                                            help="Stop at the first failure")] = False,
) -> None:
    """Run the Gherkin features against the real programs."""
    import pytest

    if mode not in MODES:
        raise typer.BadParameter(f"{mode!r} is not one of {', '.join(MODES)}", param_hint="--mode")
    folder = (features_dir or default_features_dir()).resolve()
    if not (folder / "test_features.py").exists():
        raise typer.BadParameter(f"{folder} holds no features (test_features.py)",
                                 param_hint="--features-dir")
    paths = []
    for name in feature or []:
        path = Path(name) if Path(name).is_absolute() else Path.cwd() / name
        if not path.exists() and (folder / name).exists():
            path = folder / name
        if not path.exists():
            raise typer.BadParameter(f"{name}: no such feature file", param_hint="--feature")
        paths.append(str(path.resolve()))
    os.environ["RBEES_BDD_FEATURES"] = os.pathsep.join(paths)
    os.environ["RBEES_BDD_MODE"] = mode
    args = [str(folder / "test_features.py"), "-p", "no:cacheprovider",
            "-o", "console_output_style=classic"]
    if tags:
        args += ["-m", re.sub(r"@(\w)", r"\1", tags)]
    if exitfirst:
        args.append("-x")
    as_json = output_format == OutputFormat.json
    args.append("-q" if as_json else "-v")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = transcript or Path("artifacts") / "bdd" / f"run-{stamp}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        plugin = Transcript(out, echo=sys.stdout if as_json else None)
        try:
            if as_json:  # pytest's report to stderr; stdout carries only the records
                with redirect_stdout(sys.stderr):
                    code = int(pytest.main(args, plugins=[plugin]))
            else:
                code = int(pytest.main(args, plugins=[plugin]))
        except Exception as exc:  # e.g. a warning turned error after the last scenario
            print(f"{PROGRAM}: error after the scenarios: {type(exc).__name__}: {exc}",
                  file=sys.stderr)
            plugin._write({"event": "error", "error": f"{type(exc).__name__}: {exc}"[:4000]})
            code = 1
    failed = sum(r["status"] == "failed" for r in plugin.results)
    print(f"{PROGRAM}: {len(plugin.results)} scenarios, {failed} failed, "
          f"{time.monotonic() - plugin.began:.0f} s; {plugin.hosts}; transcript {path}",
          file=sys.stderr)
    if code == 5:  # nothing selected
        print(f"{PROGRAM}: error: no scenario matched", file=sys.stderr)
        raise typer.Exit(2)
    raise typer.Exit(0 if code == 0 else 1)


def main(argv: list[str] | None = None) -> None:
    app(args=argv, prog_name=PROGRAM)


if __name__ == "__main__":  # pragma: no cover
    main()
