"""``rbees-pool``: local pool operations on one host (CONTRACT section 6). Never a REPL.

``rbees pool ... --host H`` runs this program on the pool host (over SSH with
``--format json``), so its JSON output is a wire format. Plugins add command groups through
:func:`rbees_core.hookspecs.rbees_register_cli` with ``program="rbees-pool"``.
"""

from __future__ import annotations

from collections.abc import Sequence

import pluggy
import typer

from rbees_core.programs import cli_common

PROGRAM = "rbees-pool"
HELP = ("Operate the pool on this host: models, workers, the pool daemon. "
        "Every command that prints data takes --format text|json.")


def create_app(pm: pluggy.PluginManager) -> typer.Typer:
    """The ``rbees-pool`` app over ``pm``, with the commands its plugins add."""
    app = cli_common.new_app(PROGRAM, HELP)
    cli_common.add_plugins_command(app, pm)
    pm.hook.rbees_register_cli(app=app, program=PROGRAM)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    cli_common.run(PROGRAM, create_app, argv)


if __name__ == "__main__":  # pragma: no cover
    main()
