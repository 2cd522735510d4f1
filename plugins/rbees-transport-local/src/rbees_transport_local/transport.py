"""The ``local`` transport (:class:`LocalTransport`); see :mod:`rbees_transport_local`."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from rbees_core.errors import RemoteProgramMissingError
from rbees_core.hosts import DEFAULT_REMOTE_POOL, read_lines
from rbees_core.transport import CommandHostFields, LineCallback, Transport, TransportResult

#: Longest output line read (JSON lines of progress are short; a status is pretty-printed).
LINE_LIMIT = 16 * 1024 * 1024


class LocalTransport(Transport):
    """Runs ``remote_pool argv...`` here, with the host's ``env`` over this environment."""

    name: ClassVar[str] = "local"
    host_fields: ClassVar[type[CommandHostFields]] = CommandHostFields
    fields: CommandHostFields

    def program(self) -> str:
        """``remote_pool``; the default is the rbees-pool beside this Python, else PATH's."""
        configured = self.fields.remote_pool
        if configured == DEFAULT_REMOTE_POOL:
            beside = Path(sys.executable).with_name(DEFAULT_REMOTE_POOL)
            if beside.exists():
                return str(beside)
        return os.path.expanduser(configured)

    async def run(self, argv: Sequence[str], *, on_line: LineCallback | None = None,
                  on_stderr: LineCallback | None = None) -> TransportResult:
        import asyncio

        program = self.program()
        try:
            proc = await asyncio.create_subprocess_exec(
                program, *argv, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                env={**os.environ, **self.fields.env}, limit=LINE_LIMIT)
        except OSError as exc:
            raise RemoteProgramMissingError(
                f"{self.host.name}: cannot run {program}: {exc.strerror}; set the path with "
                f"rbees hosts add {self.host.name} --transport local --remote-pool PATH"
            ) from exc
        assert proc.stdout is not None and proc.stderr is not None
        try:
            out, err = await asyncio.gather(read_lines(proc.stdout, on_line),
                                            read_lines(proc.stderr, on_stderr))
            code = await proc.wait()
        except asyncio.CancelledError:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise
        return TransportResult(exit_code=code, stdout=out, stderr=err)
