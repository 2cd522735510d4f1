"""The life of a daemon process: pid file, signals, serving, exit, one-line errors.

rbees-orcd, pool-managerd and rbees-workerd each have an async ``run()`` that builds a
:class:`Daemon`, claims its pid file, builds the app and calls :meth:`Daemon.serve`; their
typer command hands that ``run()`` to :func:`launch`. What differs between them is passed
in: what a signal does (rbees-orcd stops at once, the others drain first), whether a second
instance may start beside a live one, work that runs beside the server (the worker's model
load) and the exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, NoReturn

from starlette.types import ASGIApp

from rbees_core.errors import ConflictError, RbeesError
from rbees_core.files import private_dir, write_private
from rbees_core.http.server import is_loopback, notify_ready, run_daemon, serve
from rbees_core.log import DESTINATIONS, LEVELS, Logger, route_stdlib
from rbees_core.processes import pid_file_holder, read_pid
from rbees_core.tls import ServerTLS


class Daemon:
    """One daemon process, from its pid file to its exit.

    ``program`` names it in errors and logs; ``pid_file`` holds its pid while it serves.
    ``exclusive``: refuse to start while the pid file names another live process (one
    rbees-orcd and one pool-managerd per ``RBEES_HOME``; a worker's pid file is its own).
    ``shutdown`` is the event that ends serving; pass the daemon's own when it has one.
    """

    def __init__(self, program: str, *, pid_file: Path, log: Logger, exclusive: bool = True,
                 shutdown: asyncio.Event | None = None) -> None:
        self.program = program
        self.pid_file = pid_file
        self.log = log
        self.exclusive = exclusive
        self.shutdown = shutdown if shutdown is not None else asyncio.Event()
        self._claimed = False

    def claim(self) -> None:
        """Write this process's pid to the pid file. Call it before building anything the
        process must not share (rbees-orcd's database); :meth:`serve` calls it otherwise.
        Raises :class:`~rbees_core.errors.ConflictError` when ``exclusive`` and another
        live process holds the file (:func:`~rbees_core.processes.pid_file_holder`: one that
        started after the file was written does not)."""
        if self._claimed:
            return
        private_dir(self.pid_file.parent)
        if self.exclusive:
            # a live pid that started after the file was written is not the holder: the
            # holder died (a SIGKILL, a reboot) and the kernel gave its pid to another process
            other = pid_file_holder(self.pid_file)
            if other is not None and other != os.getpid():
                self.log.error("already_running", pid=other)
                raise ConflictError(f"already running for this RBEES_HOME (pid {other})")
        write_private(self.pid_file, f"{os.getpid()}\n")
        self._claimed = True

    @contextlib.contextmanager
    def claimed(self) -> Iterator[None]:
        """:meth:`claim`, and :meth:`release` again when the block raises: what the
        daemon builds after claiming (its service, its app) failed, so it never serves."""
        self.claim()
        try:
            yield
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Remove the pid file if it still names this process."""
        if self._claimed and read_pid(self.pid_file) == os.getpid():
            self.pid_file.unlink(missing_ok=True)
        self._claimed = False

    async def serve(self, app: ASGIApp, host: str, port: int, *,
                    on_signal: Callable[[], object] | None = None,
                    beside: Callable[[], Coroutine[Any, Any, None]] | None = None,
                    after: Callable[[], Awaitable[None] | None] | None = None,
                    exit_code: Callable[[], int] | None = None,
                    tls: ServerTLS | None = None,
                    **listening: Any) -> int:
        """Serve ``app`` on ``host:port`` until :attr:`shutdown` is set; the exit code.

        SIGTERM and SIGINT call ``on_signal`` (default: set :attr:`shutdown` at once).
        ``listening`` goes into the ``listening`` log line. An exclusive daemon tells
        systemd it is ready once its app has started (:func:`notify_ready`). ``beside``
        starts once the server task does and is cancelled when serving ends; ``after`` runs
        then (stop an engine, close a model), before the pid file goes and the ``exit`` line
        is logged with ``exit_code()`` (default 0). Raises what
        :func:`~rbees_core.http.server.serve` raises (OSError when the port cannot be
        bound) and ConflictError from :meth:`claim`. ``tls``: serve HTTPS; a host address
        (not loopback) served without it is one ``plaintext_bind`` warning line.
        """
        self.claim()
        loop = asyncio.get_running_loop()
        handler = on_signal if on_signal is not None else self.shutdown.set
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, handler)
        self.log.info("listening", tls=tls is not None, **listening)
        if tls is None and not is_loopback(host):
            self.log.warning("plaintext_bind", host=host,
                             hint="credentials cross the network in clear text; serve "
                                  "HTTPS with --tls-cert and --tls-key (rbees up --tls "
                                  "makes them)")
        try:
            # the one process of its home (rbees-orcd, pool-managerd) is what a service
            # manager waits for; a worker is its pool's, never a service of its own
            server = asyncio.create_task(serve(
                app, host, port, self.shutdown,
                on_ready=notify_ready if self.exclusive else None, tls=tls))
            side = asyncio.create_task(beside()) if beside is not None else None
            try:
                await server
            finally:
                if side is not None:
                    side.cancel()
                if after is not None:
                    done = after()
                    if done is not None:
                        await done
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            self.release()
        code = exit_code() if exit_code is not None else 0
        self.log.info("exit", code=code)
        return code


def launch(program: str, main: Coroutine[Any, Any, int]) -> int:
    """Run a daemon's ``main`` on the event loop (:func:`run_daemon`); its exit code.

    Every stdlib ``logging`` record of the process goes into the JSON lines from here on
    (:func:`rbees_core.log.route_stdlib`). An :class:`RbeesError` (a refused start, a
    failed lifespan start-up) or an ``OSError`` (the port is taken) becomes one JSON line
    (``start_failed``, like every other line of a running daemon: its pool's log of it
    stays JSON) and exit code 1, with ``<program>: error: <message>`` after it for a
    person at a terminal; ``RBEES_DEBUG=1`` lets the traceback through instead.
    """
    route_stdlib(program)
    try:
        code = run_daemon(main)
    except (RbeesError, OSError) as exc:
        if os.environ.get("RBEES_DEBUG") != "1":
            Logger(program).error("start_failed", error=_message(exc))
            if not sys.stderr.isatty():
                sys.exit(1)
        fail(program, exc)
    # The process exits next. Its heap is frozen out of the collection the interpreter
    # runs as it shuts down: a worker's heap (its model's vocabulary, built after the
    # start-up freeze of FullCollections) took 0.6-0.9 s to walk, the worker was still a
    # live process ("stopping" to its pool) that long after it had closed its model, and
    # `keep_alive: 0` missed its second (issue 22). Nothing is left to collect that
    # matters: sockets, files and the model are closed, the pid file is gone.
    gc.freeze()
    return code


def fail(program: str, exc: RbeesError | OSError) -> NoReturn:
    """Print ``exc`` as one line and exit 1 (re-raise it when ``RBEES_DEBUG=1``). Called by
    the daemons' commands for errors in their flags and settings, before serving."""
    if os.environ.get("RBEES_DEBUG") == "1":
        raise exc
    print(f"{program}: error: {_message(exc)}", file=sys.stderr)
    sys.exit(1)


def _message(exc: RbeesError | OSError) -> str:
    return exc.message if isinstance(exc, RbeesError) else str(exc)


def _sets_env(variable: str, choices: tuple[str, ...]) -> Callable[[str | None], str | None]:
    """A typer callback that checks a flag's value against ``choices`` and puts it in
    ``variable``: the environment carries it to every Logger of the process and to the
    workers it starts (``--log-level``, ``--log-to``)."""

    def callback(value: str | None) -> str | None:
        if value is not None:
            if value.lower() not in choices:
                import typer

                raise typer.BadParameter(f"{value!r} is not one of {', '.join(choices)}")
            os.environ[variable] = value.lower()
        return value

    return callback


def tls_cert_option() -> Any:
    """``--tls-cert PEM`` of the three daemons (with :func:`tls_key_option`; checked by
    :func:`rbees_core.tls.server_tls`)."""
    import typer

    return typer.Option("--tls-cert", metavar="PEM",
                        help="Serve HTTPS with this certificate chain (with --tls-key; "
                             "[tls] cert, RBEES_TLS_CERT)")


def tls_key_option() -> Any:
    """``--tls-key PEM`` of the three daemons: the key of :func:`tls_cert_option`'s
    certificate (checked by :func:`rbees_core.tls.server_tls`: not readable by others)."""
    import typer

    return typer.Option("--tls-key", metavar="PEM",
                        help="The certificate's private key, not readable by others "
                             "([tls] key, RBEES_TLS_KEY)")


def ca_file_option() -> Any:
    """``--ca-file PEM``: the CA certificates that this program's clients verify the
    daemons they call with (:func:`rbees_core.tls.use_ca_file`)."""
    import typer

    return typer.Option("--ca-file", metavar="PEM",
                        help="Verify the daemons this one calls with these CA certificates "
                             "instead of the system store ([tls] ca_file, RBEES_CA_FILE)")


def log_level_option() -> Any:
    """The daemons' ``--log-level debug|info|warning|error`` (a typer option): it sets
    ``RBEES_LOG_LEVEL`` as the command line is read, before the command runs, so the
    daemon's lines, its stdlib records and the workers it starts all use it."""
    import typer

    return typer.Option("--log-level", callback=_sets_env("RBEES_LOG_LEVEL", LEVELS),
                        metavar="LEVEL",
                        help="Lowest level logged: debug, info, warning, error "
                             "(default: RBEES_LOG_LEVEL, else info)")


def log_to_option() -> Any:
    """The daemons' ``--log-to stdout|stderr`` (a typer option): it sets ``RBEES_LOG_TO`` as
    the command line is read. The service units pass ``stdout`` (the journal); without it a
    daemon writes to stdout when that is the journal (``JOURNAL_STREAM``), else stderr
    (:func:`rbees_core.log.log_stream`)."""
    import typer

    return typer.Option("--log-to", callback=_sets_env("RBEES_LOG_TO", DESTINATIONS),
                        metavar="STREAM",
                        help="Where the JSON log lines go: stdout or stderr (default: "
                             "RBEES_LOG_TO, else stdout under systemd, else stderr)")
