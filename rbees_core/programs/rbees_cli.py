"""``rbees``: the orchestrator command line (CONTRACT section 6). Never a REPL.

The root app holds the builtin commands; plugins add command groups through
:func:`rbees_core.hookspecs.rbees_register_cli` with ``program="rbees"``. Command modules
import their heavy dependencies inside the commands, so ``rbees --help`` stays fast.
"""

from __future__ import annotations

from collections.abc import Sequence

from rbees_core.programs import cli_common

PROGRAM = "rbees"
HELP = ("Control the rbees orchestrator, pools and jobs. "
        "Every command that prints data takes --format text|json.")


#: ``(plugin name, module)`` of the builtin command groups, in ``--help`` order. Each module
#: implements :func:`rbees_core.hookspecs.rbees_register_cli` for ``program="rbees"``.
BUILTINS = (
    ("rbees-cluster", "rbees_core.programs.rbees_commands.cluster"),
    ("rbees-jobs", "rbees_core.programs.rbees_commands.jobs"),
    ("rbees-batches", "rbees_core.programs.rbees_commands.batches"),
    ("rbees-models", "rbees_core.programs.rbees_commands.models"),
    ("rbees-pool", "rbees_core.programs.rbees_commands.pool"),
    ("rbees-hosts", "rbees_core.programs.rbees_commands.hosts"),
    ("rbees-scheduler", "rbees_core.programs.rbees_commands.scheduler"),
    ("rbees-keys", "rbees_core.programs.rbees_commands.keys"),
    ("rbees-service", "rbees_core.programs.rbees_commands.service"),
)


def builtin_plugins() -> list[tuple[str, object]]:
    """:data:`BUILTINS` as plugins, in ``--help`` order."""
    return cli_common.builtin_modules(BUILTINS)


create_app = cli_common.app_factory(PROGRAM, HELP)


def main(argv: Sequence[str] | None = None) -> None:
    cli_common.run(PROGRAM, create_app, argv, builtins=builtin_plugins())


if __name__ == "__main__":  # pragma: no cover
    main()
