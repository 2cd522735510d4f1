"""Command-line values coerced without pydantic, so a command starts in well under 300 ms.

Typer (0.29) turns every command-line value into its annotated type through a pydantic
``TypeAdapter`` it builds on first use; importing pydantic for that costs about 80 ms of
every command that takes an option or an argument, ``rbees-pool models list`` included (its
``--format`` is coerced even when left out). :func:`install` gives each parameter of a
command tree a runtime coercion that passes a missing value (None) through and coerces
itself the values of the types rbees' commands take (choices such as ``--format``, ``str``,
``int``, ``float``, ``list[str]``), with the same results as typer's; anything else (a
spelling it does not read, an invalid value, another type) goes to typer's own coercion,
which then reports errors with its own messages. With a typer that does not coerce this way
it does nothing.

It reaches into typer's private modules, so pyproject.toml pins typer exactly, and
tests/test_library_internals.py fails, naming what changed, when another typer is installed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from typer.core import TyperGroup

#: Numbers that typer's adapters read as int() and float() do; the other spellings they
#: accept (" 7", "1_000", "1e3", "inf") are left to them.
_INT = re.compile(r"-?(?:0|[1-9][0-9]{0,17})")
_FLOAT = re.compile(r"-?(?:0|[1-9][0-9]{0,14})(?:\.[0-9]{1,15})?")


class _Miss(Exception):
    """The value is not one this module coerces; typer's coercion takes it."""


try:
    from typer._coercion import RuntimeParam, TypeDescriptor, build_runtime_param
    from typer._param_types import coerce_cli_choice
    from typer.core import _TyperParameter
except ImportError:  # pragma: no cover - another typer: nothing to replace
    SUPPORTED = False
else:
    SUPPORTED = True

    def _in_range(number: Any, descriptor: TypeDescriptor) -> Any:
        info = descriptor.parameter_info
        if info.clamp or (info.min is not None and number < info.min) or (
                info.max is not None and number > info.max):
            raise _Miss
        return number

    def _coerce_str(value: Any, descriptor: TypeDescriptor, ctx: Any) -> Any:
        if type(value) is not str:
            raise _Miss
        return value

    def _typers(value: Any, descriptor: TypeDescriptor, ctx: Any) -> Any:
        raise _Miss

    def _coerce_int(value: Any, descriptor: TypeDescriptor, ctx: Any) -> Any:
        if type(value) is int:
            return _in_range(value, descriptor)
        if type(value) is str and _INT.fullmatch(value):
            return _in_range(int(value), descriptor)
        raise _Miss

    def _coerce_float(value: Any, descriptor: TypeDescriptor, ctx: Any) -> Any:
        if type(value) is float:
            return _in_range(value, descriptor)
        if type(value) is int or (type(value) is str and _FLOAT.fullmatch(value)):
            return _in_range(float(value), descriptor)
        raise _Miss

    def _coerce_choice(value: Any, descriptor: TypeDescriptor, ctx: Any) -> Any:
        try:
            return coerce_cli_choice(value, choices=descriptor.choices or (),
                                     case_sensitive=descriptor.case_sensitive, ctx=ctx)
        except ValueError:
            raise _Miss from None

    def _coerce_str_list(value: Any, descriptor: TypeDescriptor, ctx: Any) -> Any:
        if not isinstance(value, list | tuple) or any(type(v) is not str for v in value):
            raise _Miss
        return list(value)

    Coerce = Callable[[Any, TypeDescriptor, Any], Any]

    def _coercion(descriptor: TypeDescriptor) -> Coerce:
        """The coercion of ``descriptor``'s values; :func:`_typers` leaves them to typer
        (a flag's bool, which typer passes through, and None never get this far)."""
        annotation = descriptor.annotation
        if descriptor.parameter_info.parser is not None or descriptor.is_file:
            return _typers
        if descriptor.is_list:
            return _coerce_str_list if annotation == list[str] else _typers
        if descriptor.is_choice:
            return _coerce_choice
        return {str: _coerce_str, int: _coerce_int, float: _coerce_float}.get(
            annotation, _typers)

    @dataclass(frozen=True)
    class PlainRuntimeParam(RuntimeParam):
        """Coerces the values :func:`_coercion` knows; typer's coercion takes the rest."""

        descriptor: TypeDescriptor
        coerce_plain: Coerce

        def _coerce_value(self, value: Any, param: _TyperParameter, ctx: Any) -> Any:
            try:
                return self.coerce_plain(value, self.descriptor, ctx)
            except _Miss:
                pass
            typers = build_runtime_param(self.descriptor)
            param._runtime_param = typers
            return typers._coerce_value(value, param=param, ctx=ctx)

    def _install_param(param: Any) -> None:
        if isinstance(param, _TyperParameter) and param._runtime_param is None:
            param._runtime_param = PlainRuntimeParam(
                parameter_info=param.type_descriptor.parameter_info,
                annotation=param.type_descriptor.annotation,
                descriptor=param.type_descriptor, coerce_plain=_coercion(param.type_descriptor))

    def _install_on(command: Any) -> None:
        if "get_help_option" in vars(command):  # installed already
            return
        for param in command.params:
            _install_param(param)
        # typer makes the -h/--help option of a command while parsing its arguments, and
        # coerces its missing value (None) after building a pydantic adapter for it
        make_help_option = command.get_help_option

        def get_help_option(ctx: Any) -> Any:
            option = make_help_option(ctx)
            _install_param(option)
            return option

        command.get_help_option = get_help_option
        for sub in getattr(command, "commands", {}).values():
            _install_on(sub)


def install(command: Any) -> None:
    """Give every parameter of ``command`` and its subcommands the plain coercion."""
    if SUPPORTED:
        _install_on(command)


class PlainCoercionGroup(TyperGroup):
    """The root group of a CLI: installs the plain coercion when it runs."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        install(self)
        return super().main(*args, **kwargs)

