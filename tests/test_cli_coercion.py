"""The plain coercion of command-line values: what typer's own coercion gives, no pydantic."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import pytest
import typer
from typer.main import get_command

from rbees_core.programs import cli_coercion
from rbees_core.programs.cli_common import FormatOption, OutputFormat, new_app


def make_app(seen: list[dict[str, Any]]) -> typer.Typer:
    """A CLI with one option of each kind rbees' commands use."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                      rich_markup_mode=None)

    @app.callback()
    def root() -> None:
        pass

    @app.command("all")
    def every_kind(
        name: Annotated[str, typer.Argument()] = "-",
        text: Annotated[str | None, typer.Option()] = None,
        count: Annotated[int, typer.Option()] = 3,
        slots: Annotated[int | None, typer.Option(min=1, max=64)] = None,
        ratio: Annotated[float, typer.Option()] = 0.5,
        timeout: Annotated[float | None, typer.Option(min=0.0)] = None,
        tag: Annotated[list[str] | None, typer.Option()] = None,
        force: Annotated[bool, typer.Option("--force/--no-force")] = False,
        fmt: FormatOption = OutputFormat.text,
        path: Annotated[Path | None, typer.Option()] = None,
    ) -> None:
        seen.append({"name": name, "text": text, "count": count, "slots": slots,
                     "ratio": ratio, "timeout": timeout, "tag": tag, "force": force,
                     "fmt": fmt, "path": path})

    return app


def outcome(args: list[str], *, plain: bool) -> tuple[str, Any]:
    """What the command received for ``args``, with its types, or the usage error typer
    reported."""
    seen: list[dict[str, Any]] = []
    command = get_command(make_app(seen))
    if plain:
        cli_coercion.install(command)
    try:
        command.main(args=["all", *args], prog_name="t", standalone_mode=False)
    except typer._click.exceptions.UsageError as exc:
        return "error", exc.format_message()
    return "ok", {key: (type(value), value) for key, value in seen[0].items()}


SAMPLES = [
    [], ["x"], ["héllo wörld"], ["\udcff"], ["--text", ""], ["--text", "a b"],
    ["--count", "7"], ["--count", "-3"], ["--count", "0"], ["--count", "007"],
    ["--count", " 7"], ["--count", "1_000"], ["--count", "x"], ["--count", "2.5"],
    ["--count", "99999999999999999999999"],
    ["--slots", "1"], ["--slots", "64"], ["--slots", "0"], ["--slots", "65"],
    ["--ratio", "2"], ["--ratio", "0.25"], ["--ratio", "-1.5"], ["--ratio", "1e3"],
    ["--ratio", "inf"], ["--ratio", ".5"], ["--ratio", "x"],
    ["--timeout", "0"], ["--timeout", "2.5"], ["--timeout", "-1"],
    ["--tag", "a"], ["--tag", "a", "--tag", "b b"], ["--tag", "\udcff"],
    ["--force"], ["--no-force"],
    ["--format", "json"], ["--format", "JSON"], ["--format", "Text"], ["--format", "xml"],
    ["--format", ""], ["--path", "a/b"], ["--path", ""],
]


@pytest.mark.parametrize("args", SAMPLES, ids=repr)
def test_same_values_and_errors_as_typer(args: list[str]) -> None:
    assert outcome(args, plain=True) == outcome(args, plain=False)


def runtime_params(command: Any) -> dict[str, Any]:
    return {p.name: p._runtime_param for p in command.commands["all"].params}


def test_plain_and_missing_values_never_build_a_pydantic_adapter() -> None:
    seen: list[dict[str, Any]] = []
    command = get_command(make_app(seen))
    cli_coercion.install(command)
    command.main(args=["all", "x", "--text", "t", "--count", "7", "--slots", "8", "--ratio",
                       "2", "--tag", "a", "--format", "JSON"], prog_name="t",
                 standalone_mode=False)
    assert seen[0]["fmt"] is OutputFormat.json
    kinds = {name: type(p).__name__ for name, p in runtime_params(command).items()}
    assert set(kinds.values()) == {"PlainRuntimeParam"}, kinds


def test_other_values_go_to_typer() -> None:
    seen: list[dict[str, Any]] = []
    command = get_command(make_app(seen))
    cli_coercion.install(command)
    command.main(args=["all", "--path", "a/b"], prog_name="t", standalone_mode=False)
    assert seen[0]["path"] == Path("a/b")
    assert type(runtime_params(command)["path"]).__name__ == "AdapterRuntimeParam"
    with pytest.raises(typer._click.exceptions.BadParameter):
        command.main(args=["all", "--count", "x"], prog_name="t", standalone_mode=False)
    assert type(runtime_params(command)["count"]).__name__ == "AdapterRuntimeParam"


def test_every_rbees_app_installs_it() -> None:
    seen: list[str] = []
    app = new_app("t", "help")

    @app.command("echo")
    def echo(fmt: FormatOption = OutputFormat.text) -> None:
        seen.append(fmt.value)

    run: Callable[..., Any] = app
    run(args=["echo", "--format", "JSON"], prog_name="t", standalone_mode=False)
    assert seen == ["json"]
    assert type(get_command(app)).__name__ == "PlainCoercionGroup"
