"""``rbees-pool``: local pool operations on one host (CONTRACT section 6). Never a REPL.

``rbees pool ... --host H`` runs this program on the pool host (over SSH with
``--format json``), so its JSON output is a wire format. Its own command groups are builtin
plugins (:data:`BUILTINS`, modules of :mod:`rbees_core.programs.pool_commands`); installed
plugins add more through :func:`rbees_core.hookspecs.rbees_register_cli` with
``program="rbees-pool"``. Builtins can be turned off by name with ``RBEES_DISABLED_PLUGINS``.
"""

from __future__ import annotations

from collections.abc import Sequence

from rbees_core.programs import cli_common

PROGRAM = "rbees-pool"
HELP = ("Operate the pool on this host: models, workers, the pool daemon. "
        "Every command that prints data takes --format text|json.")
#: The command groups of rbees-pool: (plugin name, module implementing rbees_register_cli).
BUILTINS = (
    ("pool-status", "rbees_core.programs.pool_commands.status"),
    ("pool-models", "rbees_core.programs.pool_commands.models"),
    ("pool-worker", "rbees_core.programs.pool_commands.worker"),
    ("pool-git", "rbees_core.programs.pool_commands.git"),
    ("pool-daemon", "rbees_core.programs.pool_commands.daemon"),
)


def builtin_plugins() -> list[tuple[str, object]]:
    """:data:`BUILTINS` as plugins, in ``--help`` order."""
    return cli_common.builtin_modules(BUILTINS)


create_app = cli_common.app_factory(PROGRAM, HELP)


def main(argv: Sequence[str] | None = None) -> None:
    cli_common.run(PROGRAM, create_app, argv, builtins=builtin_plugins())


if __name__ == "__main__":  # pragma: no cover
    main()
