"""``rbees batches submit|list|status|cancel|results``: OpenAI batches on rbees-orcd.

``submit FILE.jsonl`` uploads the file (``POST /v1/files``, purpose ``batch``) and makes a
batch of it (``POST /v1/batches``; the endpoint is the first line's ``url`` unless
``--endpoint`` says), printing the batch's id; ``--wait`` polls until it is final.
``results ID`` prints the output file's lines (``--errors``: the error file's) as JSONL.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from rbees_core.hookspecs import hookimpl
from rbees_core.programs.cli_common import FormatOption, OutputFormat, emit, print_json

FINAL = ("completed", "failed", "cancelled", "expired")
LIST_COLUMNS = ("id", "status", "endpoint", "total", "completed", "failed", "created_at")


def _request(method: str, path: str, **kwargs: Any) -> Any:
    """One request to rbees-orcd: the answer (JSON, or bytes for a file's content), its
    OpenAI error's message as an RbeesError, or an RbeesError saying it cannot be reached."""
    import httpx

    from rbees_core.config import auth_headers
    from rbees_core.errors import RbeesError
    from rbees_core.programs.rbees_commands.cluster import orchestrator_url
    from rbees_core.tls import client_context

    try:
        with httpx.Client(base_url=orchestrator_url(), headers=auth_headers(),
                          timeout=httpx.Timeout(60.0), verify=client_context()) as client:
            answer = client.request(method, path, **kwargs)
    except httpx.TransportError as exc:
        from rbees_core.programs.rbees_commands.jobs import _unreachable

        raise _unreachable(exc) from exc
    if answer.status_code >= 400:
        try:
            error = answer.json()["error"]
            message = f"{error.get('code') or answer.status_code}: {error['message']}"
        except (ValueError, KeyError, TypeError, AttributeError):
            message = f"HTTP {answer.status_code}: {answer.text[:200]}"
        raise RbeesError(message)
    if answer.headers.get("content-type", "").startswith("application/json"):
        return answer.json()
    return answer.content


def _row(batch: dict[str, Any]) -> dict[str, Any]:
    counts = batch.get("request_counts") or {}
    return {"id": batch["id"], "status": batch["status"], "endpoint": batch["endpoint"],
            "total": counts.get("total"), "completed": counts.get("completed"),
            "failed": counts.get("failed"), "created_at": batch.get("created_at")}


def _wait(batch_id: str, poll_s: float = 1.0) -> dict[str, Any]:
    while True:
        batch: dict[str, Any] = _request("GET", f"/v1/batches/{batch_id}")
        if batch["status"] in FINAL:
            return batch
        counts = batch.get("request_counts") or {}
        answered = counts.get("completed", 0) + counts.get("failed", 0)
        print(f"{batch_id}: {batch['status']} {answered}/{counts.get('total', 0)}",
              file=sys.stderr)
        time.sleep(poll_s)


def submit(
    file: Annotated[Path, typer.Argument(help="JSONL of {custom_id, method, url, body}",
                                         exists=True, dir_okay=False, readable=True)],
    endpoint: Annotated[str | None, typer.Option(
        "--endpoint", help="/v1/chat/completions, /v1/completions or /v1/embeddings "
                           "[default: the first line's url]")] = None,
    window: Annotated[str | None, typer.Option(
        "--window", help="Run the lines only in this local time window, e.g. 22:00-07:00")
    ] = None,
    pools: Annotated[str | None, typer.Option(
        "--pools", help="Run the lines only on these pools (ids separated by commas)")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Poll until the batch is final")
                    ] = False,
    fmt: FormatOption = OutputFormat.text,
) -> None:
    """Upload a batch file and start a batch of it; print the batch's id."""
    from rbees_core.errors import RbeesError

    content = file.read_bytes()
    if endpoint is None:
        first = next((line for line in content.decode("utf-8", "replace").splitlines()
                      if line.strip()), "")
        try:
            endpoint = json.loads(first).get("url")
        except (ValueError, AttributeError):
            endpoint = None
        if not isinstance(endpoint, str):
            raise RbeesError(f"{file}: the first line has no url; give --endpoint")
    uploaded = _request("POST", "/v1/files", data={"purpose": "batch"},
                        files={"file": (file.name, content, "application/jsonl")})
    body: dict[str, Any] = {"input_file_id": uploaded["id"], "endpoint": endpoint,
                            "completion_window": "24h"}
    metadata = {k: v for k, v in (("rbees_window", window), ("rbees_pools", pools)) if v}
    if metadata:
        body["metadata"] = metadata
    batch = _request("POST", "/v1/batches", json=body)
    if wait:
        batch = _wait(batch["id"])
    if fmt is OutputFormat.json:
        print_json(batch)
    else:
        print(batch["id"] if not wait else f"{batch['id']} {batch['status']}")


def list_(limit: Annotated[int, typer.Option("--limit", min=1, max=100)] = 20,
          fmt: FormatOption = OutputFormat.text) -> None:
    """Batches, newest first."""
    page = _request("GET", "/v1/batches", params={"limit": limit})
    data = page.get("data", [])
    if fmt is OutputFormat.json:
        print_json(data)
    else:
        emit([_row(b) for b in data], fmt, LIST_COLUMNS)


def status_(batch_id: Annotated[str, typer.Argument()],
            fmt: FormatOption = OutputFormat.text) -> None:
    """One batch: its status, request counts, files and times."""
    batch = _request("GET", f"/v1/batches/{batch_id}")
    if fmt is OutputFormat.json:
        print_json(batch)
        return
    for key, value in {**_row(batch), "output_file_id": batch.get("output_file_id"),
                       "error_file_id": batch.get("error_file_id"),
                       "metadata": batch.get("metadata")}.items():
        print(f"{key:16} {value if value is not None else '-'}")


def cancel(batch_id: Annotated[str, typer.Argument()]) -> None:
    """Cancel a batch: lines not yet answered end in its error file."""
    batch = _request("POST", f"/v1/batches/{batch_id}/cancel")
    print(f"{batch_id}: {batch['status']}", file=sys.stderr)


def results(batch_id: Annotated[str, typer.Argument()],
            errors: Annotated[bool, typer.Option("--errors", help="The error file instead")
                              ] = False) -> None:
    """Print a finished batch's output (or error) file, JSONL, in the input's order."""
    from rbees_core.errors import RbeesError

    batch = _request("GET", f"/v1/batches/{batch_id}")
    file_id = batch.get("error_file_id" if errors else "output_file_id")
    if batch["status"] not in FINAL:
        raise RbeesError(f"batch {batch_id} is {batch['status']}: no results yet")
    if file_id:
        sys.stdout.write(_request("GET", f"/v1/files/{file_id}/content").decode())


@hookimpl
def rbees_register_cli(app: typer.Typer, program: str) -> None:
    if program != "rbees":
        return
    group = typer.Typer(name="batches", help="OpenAI batches: submit a JSONL file, follow, "
                        "cancel, get the results.", no_args_is_help=True)
    group.command("submit")(submit)
    group.command("list")(list_)
    group.command("status")(status_)
    group.command("cancel")(cancel)
    group.command("results")(results)
    app.add_typer(group)
