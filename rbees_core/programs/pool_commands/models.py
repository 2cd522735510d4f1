"""``rbees-pool models catalog|list|download|info|verify|rm``: models on this host."""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated, Any

import pluggy
import typer

from rbees_core.hookspecs import hookimpl
from rbees_core.programs.cli_common import (
    FormatOption,
    OutputFormat,
    TerminalProgress,
    emit,
    human_bytes,
    print_json,
)

PROGRAM = "rbees-pool"
ModelArg = Annotated[str, typer.Argument(
    metavar="MODEL", help="Catalog id (tinyllama), reference (hf:OWNER/REPO/FILE) or path.")]
#: JSON progress lines are written at most this often (seconds).
JSON_PROGRESS_EVERY_S = 0.25


def _short(sha: str | None) -> str | None:
    return sha[:12] if sha else None


def _json_line(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


def register(app: typer.Typer, pm: pluggy.PluginManager) -> None:
    group = typer.Typer(name="models", no_args_is_help=True,
                        help="The model catalog and the models on this host.")

    @group.command("catalog")
    def catalog_command(fmt: FormatOption = OutputFormat.text) -> None:
        """List the models rbees knows by id, and whether each is on this host."""
        from rbees_core.pool import models
        from rbees_core.pool.catalog import configured_catalog

        catalog = configured_catalog()
        here = {m.id for m in models.list_models(pm, catalog=catalog) if m.id}
        rows = [{**e.to_dict(), "present": e.id in here} for e in catalog]
        if fmt is OutputFormat.json:
            print_json(rows)
            return
        emit([{**r, "size": human_bytes(r["size_bytes"]), "context": r["context_length"],
               "present": "yes" if r["present"] else "no"} for r in rows],
             fmt, ("id", "name", "size", "context", "license", "present"))

    @group.command("list")
    def list_command(fmt: FormatOption = OutputFormat.text) -> None:
        """List the models on this host (downloaded, and provided by installed packages)."""
        from rbees_core.pool import models

        rows = [m.to_dict() for m in models.list_models(pm)]
        if fmt is OutputFormat.json:
            print_json(rows)
            return
        emit([{**r, "size": human_bytes(r["size_bytes"]), "sha256": _short(r["sha256"])}
              for r in rows], fmt, ("id", "ref", "size", "sha256", "source", "path"))

    @group.command("download")
    def download_command(
        model: ModelArg,
        force: Annotated[bool, typer.Option(
            "--force", help="Download again even if the model is already here.")] = False,
        fmt: FormatOption = OutputFormat.text,
    ) -> None:
        """Download a model, resuming an interrupted download, and verify its sha256.

        A progress bar shows on a terminal, nothing on a pipe; --format json writes JSON
        lines: {"event": "progress", ...} then {"event": "end", ...} (or "error").
        """
        import asyncio

        from rbees_core.errors import RbeesError
        from rbees_core.interfaces import DownloadProgress
        from rbees_core.pool import models
        from rbees_core.programs.cli_common import fail

        bar = TerminalProgress(model) if fmt is OutputFormat.text else None
        last: dict[str, Any] = {"at": 0.0, "stage": ""}

        def progress(p: DownloadProgress) -> None:
            if bar is not None:
                bar(p.bytes_done, p.bytes_total, p.rate_bps, p.stage)
                return
            now = time.monotonic()
            final = p.bytes_total is not None and p.bytes_done >= p.bytes_total
            if now - last["at"] >= JSON_PROGRESS_EVERY_S or p.stage != last["stage"] or final:
                last["at"], last["stage"] = now, p.stage
                _json_line({"event": "progress", "stage": p.stage, "bytes_done": p.bytes_done,
                            "bytes_total": p.bytes_total, "rate_bps": round(p.rate_bps)})

        try:
            local, fetched = asyncio.run(models.download(pm, model, force=force,
                                                         progress=progress))
        except KeyboardInterrupt:
            if bar is not None:
                bar.close()
            print(f"{PROGRAM}: interrupted; run the command again to resume", file=sys.stderr)
            raise typer.Exit(130) from None
        except RbeesError as exc:
            if bar is not None:
                bar.close()
            if fmt is OutputFormat.json:
                _json_line({"event": "error", "code": exc.code, "message": exc.message,
                            "retriable": exc.retriable})
            fail(PROGRAM, exc)
        if bar is not None:
            bar.close()
        if fmt is OutputFormat.json:
            _json_line({"event": "end", **local.to_dict(), "fetched": fetched})
        elif fetched:
            print(f"{local.id or local.ref}: downloaded to {local.path} "
                  f"({human_bytes(local.size_bytes)}, sha256 {local.sha256})")
        else:
            print(f"{local.id or local.ref}: already here at {local.path}")

    @group.command("info")
    def info_command(model: ModelArg, fmt: FormatOption = OutputFormat.text) -> None:
        """Show a model's catalog entry and its copies on this host."""
        from rbees_core.pool import models

        data = models.info(pm, model)
        if fmt is OutputFormat.json:
            print_json(data)
            return
        entry = data["catalog"]
        if entry:
            for key in ("id", "name", "quantization", "hf_repo", "hf_file", "revision",
                        "license", "context_length", "sha256"):
                print(f"{key + ':':16}{entry.get(key) if entry.get(key) is not None else '-'}")
            print(f"{'size:':16}{human_bytes(entry['size_bytes'])}")
            print(f"{'sources:':16}{', '.join(entry['sources'])}")
        else:
            print(f"{'catalog:':16}- (not in the catalog)")
        if not data["local"]:
            print(f"{'on this host:':16}no")
        for m in data["local"]:
            print(f"{'on this host:':16}{m['path']} ({human_bytes(m['size_bytes'])}, "
                  f"{m['source']}, sha256 {m['sha256'] or 'unknown'})")

    @group.command("verify")
    def verify_command(model: ModelArg, fmt: FormatOption = OutputFormat.text) -> None:
        """Hash a model's local copies and compare with their known sha256 (exit 1 if one
        differs)."""
        from rbees_core.errors import ChecksumMismatchError
        from rbees_core.pool import models
        from rbees_core.programs.cli_common import fail

        results = models.verify(pm, model)
        if fmt is OutputFormat.json:
            print_json(results)
        else:
            emit([{**r, "result": {True: "ok", False: "MISMATCH", None: "no known sha256"}[
                r["ok"]], "sha256": r["sha256"]} for r in results],
                 fmt, ("ref", "result", "sha256", "path"))
        bad = [r for r in results if r["ok"] is False]
        if bad:
            fail(PROGRAM, ChecksumMismatchError(
                f"{bad[0]['path']}: sha256 {bad[0]['sha256']} differs from the expected "
                f"{bad[0]['expected_sha256']}"))

    @group.command("rm")
    def rm_command(
        model: ModelArg,
        force: Annotated[bool, typer.Option(
            "--force", help="Remove it even if a running worker has it loaded.")] = False,
        fmt: FormatOption = OutputFormat.text,
    ) -> None:
        """Delete a downloaded model from this host."""
        from rbees_core.pool import models

        removed = [m.to_dict() for m in models.remove(pm, model, force=force)]
        if fmt is OutputFormat.json:
            print_json(removed)
        else:
            for m in removed:
                print(f"removed {m['path']}")

    app.add_typer(group)


@hookimpl
def rbees_register_cli(app: typer.Typer, program: str, pm: pluggy.PluginManager) -> None:
    if program == PROGRAM:
        register(app, pm)
