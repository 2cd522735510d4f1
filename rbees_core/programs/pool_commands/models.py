"""``rbees-pool models catalog|search|list|download|info|verify|rm``: the model catalog and
the models on this host."""

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
    human_bytes,
    print_json,
    print_table,
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


def print_catalog(rows: list[dict[str, Any]]) -> None:
    """``models catalog``'s and ``models search``'s JSON as text."""
    print_table([{**r, "size": human_bytes(r.get("size_bytes")),
                  "class": r.get("size_class") or "-", "kind": r.get("kind", "chat"),
                  "context": r["context_length"],
                  "present": "yes" if r["present"] else "no"} for r in rows],
                ("id", "name", "kind", "class", "size", "context", "license", "present"))


def catalog_rows(pm: pluggy.PluginManager, text: str | None = None) -> list[dict[str, Any]]:
    """The catalog's entries (those matching ``text``, best first, when given) as JSON rows,
    each with ``present``: whether it is on this host."""
    from rbees_core.catalog import configured_catalog
    from rbees_core.pool import models

    catalog = configured_catalog(pm)
    entries = list(catalog) if text is None else catalog.search(text)
    here = {m.id for m in models.list_models(pm, catalog=catalog) if m.id}
    return [{**e.to_dict(), "present": e.id in here} for e in entries]


def print_list(rows: list[dict[str, Any]]) -> None:
    """``models list``'s JSON as text."""
    print_table([{**r, "size": human_bytes(r["size_bytes"]), "sha256": _short(r["sha256"])}
                 for r in rows], ("id", "ref", "size", "sha256", "source", "path"))


def print_downloaded(end: dict[str, Any]) -> None:
    """The ``end`` line of ``models download --format json`` as text."""
    name = end.get("id") or end.get("ref")
    if end.get("fetched"):
        print(f"{name}: downloaded to {end['path']} ({human_bytes(end['size_bytes'])}, "
              f"sha256 {end['sha256']})")
    else:
        print(f"{name}: already here at {end['path']}")


def print_info(data: dict[str, Any]) -> None:
    """``models info``'s JSON as text."""
    entry = data["catalog"]
    if entry:
        from rbees_core.catalog import CatalogEntry

        own = [k for k in entry if k not in (*CatalogEntry.core_keys(), "size_class")]
        for key in ("id", "name", "kind", "family", "size_class", "quantization", *own,
                    "license", "context_length", "sha256", "checked"):
            print(f"{key + ':':16}{entry.get(key) if entry.get(key) is not None else '-'}")
        if entry.get("aliases"):
            print(f"{'aliases:':16}{', '.join(entry['aliases'])}")
        if entry.get("tags"):
            print(f"{'tags:':16}{', '.join(entry['tags'])}")
        print(f"{'size:':16}{human_bytes(entry.get('size_bytes'))}"
              + ("" if entry.get("sha256") else " (sha256 and exact size from the hub)"))
        print(f"{'sources:':16}{', '.join(entry['sources'])}")
    else:
        print(f"{'catalog:':16}- (not in the catalog)")
    if not data["local"]:
        print(f"{'on this host:':16}no")
    for m in data["local"]:
        print(f"{'on this host:':16}{m['path']} ({human_bytes(m['size_bytes'])}, "
              f"{m['source']}, sha256 {m['sha256'] or 'unknown'})")


def print_verify(results: list[dict[str, Any]]) -> None:
    """``models verify``'s JSON as text."""
    print_table([{**r, "result": {True: "ok", False: "MISMATCH", None: "no known sha256"}[
        r["ok"]]} for r in results], ("ref", "result", "sha256", "path"))


def print_removed(removed: list[dict[str, Any]]) -> None:
    """``models rm``'s JSON as text."""
    for m in removed:
        print(f"removed {m['path']}")


def register(app: typer.Typer, pm: pluggy.PluginManager) -> None:
    group = typer.Typer(name="models", no_args_is_help=True,
                        help="The model catalog and the models on this host.")

    @group.command("catalog")
    def catalog_command(fmt: FormatOption = OutputFormat.text) -> None:
        """List the models rbees knows by id, and whether each is on this host."""
        rows = catalog_rows(pm)
        print_json(rows) if fmt is OutputFormat.json else print_catalog(rows)

    @group.command("search")
    def search_command(
        text: Annotated[list[str], typer.Argument(
            metavar="TEXT...", help="Words to find: in ids, aliases (qwen2.5:7b), names, "
            "families, tags (coder, reasoning, embedding), kind and size class (small, "
            "medium, large, xlarge).")],
        fmt: FormatOption = OutputFormat.text,
    ) -> None:
        """Find catalog models: entries matching every word, an exact id or alias first.

        Exit 1 when nothing matches.
        """
        from rbees_core.errors import ModelNotFoundError
        from rbees_core.programs.cli_common import fail

        query = " ".join(text)
        rows = catalog_rows(pm, query)
        if not rows:
            if fmt is OutputFormat.json:
                print_json([])
            fail(PROGRAM, ModelNotFoundError(
                f"no catalog model matches {query!r} (rbees-pool models catalog lists them "
                "all)", details={"model": query}))
        print_json(rows) if fmt is OutputFormat.json else print_catalog(rows)

    @group.command("list")
    def list_command(fmt: FormatOption = OutputFormat.text) -> None:
        """List the models on this host (downloaded, and provided by installed packages)."""
        from rbees_core.pool import models

        rows = [m.to_dict() for m in models.list_models(pm)]
        print_json(rows) if fmt is OutputFormat.json else print_list(rows)

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
        end = {"event": "end", **local.to_dict(), "fetched": fetched}
        _json_line(end) if fmt is OutputFormat.json else print_downloaded(end)

    @group.command("info")
    def info_command(model: ModelArg, fmt: FormatOption = OutputFormat.text) -> None:
        """Show a model's catalog entry and its copies on this host."""
        from rbees_core.pool import models

        data = models.info(pm, model)
        print_json(data) if fmt is OutputFormat.json else print_info(data)

    @group.command("verify")
    def verify_command(model: ModelArg, fmt: FormatOption = OutputFormat.text) -> None:
        """Hash a model's local copies and compare with their known sha256 (exit 1 if one
        differs)."""
        from rbees_core.errors import ChecksumMismatchError
        from rbees_core.pool import models
        from rbees_core.programs.cli_common import fail

        results = models.verify(pm, model)
        print_json(results) if fmt is OutputFormat.json else print_verify(results)
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
        print_json(removed) if fmt is OutputFormat.json else print_removed(removed)

    app.add_typer(group)


#: How each command's JSON reads as text (``rbees pool ... --host`` renders remote JSON).
TEXT_RENDERERS = {
    ("models", "catalog"): print_catalog,
    ("models", "search"): print_catalog,
    ("models", "list"): print_list,
    ("models", "download"): print_downloaded,
    ("models", "info"): print_info,
    ("models", "verify"): print_verify,
    ("models", "rm"): print_removed,
}


@hookimpl
def rbees_register_cli(app: typer.Typer, program: str, pm: pluggy.PluginManager) -> None:
    if program == PROGRAM:
        register(app, pm)
