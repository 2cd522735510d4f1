"""OpenAI's Files and Batch API on rbees-orcd: ``/v1/files`` and ``/v1/batches``.

A batch's input file is uploaded (``POST /v1/files``, multipart, purpose ``batch``: JSONL,
one request object ``{custom_id, method, url, body}`` a line), a batch is made of it
(``POST /v1/batches``), and the batch runner (:mod:`.orcd_batch_runner`) runs each line as
a batch-lane job. Files, batches and each line's answer live in the orchestrator's SQLite
store (:mod:`rbees_core.orchestrator.batches`): a batch survives a restart of rbees-orcd
and each line is answered once. The objects have OpenAI's shapes (``file``, ``batch``,
a cursor ``list``); errors OpenAI's ``{"error": {...}}``.

What is refused with a 400 at once: an upload whose purpose is not ``batch`` or whose
content is not JSONL of objects; a batch with another ``completion_window`` than ``24h``,
an unknown ``endpoint``, a line without a string ``custom_id`` or with one used before.
What a line gets in the error file: a ``method`` other than POST, a ``url`` other than the
batch's endpoint, a body its route would refuse, a job that failed.

Files and batches belong to the key that uploaded or made them (a batch's output and error
files to the batch's): a key with ``inference`` alone lists, reads, cancels and deletes its
own only (another's answer 404, as an unknown one), as with jobs; ``admin`` and the
operator see all.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from rbees_core.api import openapi
from rbees_core.auth import current_principal, visible_to
from rbees_core.errors import PayloadTooLargeError
from rbees_core.http.app import read_body
from rbees_core.orchestrator.batches import FINAL_BATCH, BatchStore, StoredFile
from rbees_core.programs.openai_errors import OpenAIError, read_object
from rbees_core.programs.orcd_batch_runner import ENDPOINTS, BatchRunner, parse_window

#: Largest upload (the store keeps it whole).
MAX_FILE_BYTES = 64 * 1024 * 1024
#: Most lines of one batch (OpenAI's limit).
MAX_LINES = 50_000
#: The only completion window (OpenAI's).
WINDOWS = {"24h": 24 * 3600.0}
TIMES = ("created_at", "expires_at", "in_progress_at", "finalizing_at", "completed_at",
         "failed_at", "expired_at", "cancelling_at", "cancelled_at")


def runner(request: Request) -> BatchRunner:
    """The app's batch runner (``app.state.batches``, set by the app factory)."""
    run: BatchRunner = request.app.state.batches
    return run


def _store(request: Request) -> BatchStore:
    return runner(request).store


def _owner() -> str | None:
    """The name of the request's key (what it uploads and makes is its own), None without
    credentials."""
    principal = current_principal.get()
    return None if principal is None else principal.name


def _only_own() -> str | None:
    """The owner a listing keeps to: the key's name for an ``inference``-only key, None
    (everything) for ``read``, ``admin``, the operator and no credentials."""
    principal = current_principal.get()
    return None if principal is None or principal.sees_all_jobs else principal.name


def _sees(owner: str | None) -> bool:
    """Whether the request may see a file or batch of ``owner`` (another key's looks absent
    to an ``inference``-only key, as its jobs do)."""
    return visible_to(current_principal.get(), owner)


def _file_object(f: StoredFile) -> dict[str, Any]:
    return {"id": f.file_id, "object": "file", "bytes": f.bytes,
            "created_at": int(f.created_at), "filename": f.filename, "purpose": f.purpose,
            "status": "processed", "expires_at": None, "status_details": None}


def batch_object(store: BatchStore, row: dict[str, Any]) -> dict[str, Any]:
    """A batch row as OpenAI's ``batch`` object."""
    counts = store.counts(row["batch_id"])
    errors = json.loads(row["errors"]) if row["errors"] else None
    out: dict[str, Any] = {
        "id": row["batch_id"], "object": "batch", "endpoint": row["endpoint"],
        "errors": None if errors is None else {"object": "list", "data": errors},
        "input_file_id": row["input_file_id"], "completion_window": row["completion_window"],
        "status": row["status"], "output_file_id": row["output_file_id"],
        "error_file_id": row["error_file_id"],
        "request_counts": {"total": counts.total, "completed": counts.completed,
                           "failed": counts.failed},
        "metadata": json.loads(row["metadata"]) if row["metadata"] else None,
    }
    for name in TIMES:
        out[name] = None if row[name] is None else int(row[name])
    return out


def _form(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """A multipart/form-data body's parts: name -> (filename, bytes)."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise OpenAIError(400, "the upload must be multipart/form-data with file and purpose",
                          param="file")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    parts: dict[str, tuple[str | None, bytes]] = {}
    if not message.is_multipart():
        raise OpenAIError(400, "the multipart body has no parts", param="file")
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if isinstance(name, str):
            payload = part.get_payload(decode=True)
            parts[name] = (part.get_filename(), payload if isinstance(payload, bytes) else b"")
    return parts


def _requests(content: bytes) -> list[dict[str, Any]]:
    """The JSONL's objects (blank lines skipped); 400 naming the line otherwise."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise OpenAIError(400, "the file is not UTF-8 text", param="file") from exc
    out: list[dict[str, Any]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise OpenAIError(400, f"line {number} of the file is not JSON: {exc.msg}",
                              param="file", code="invalid_jsonl") from exc
        if not isinstance(obj, dict):
            raise OpenAIError(400, f"line {number} of the file is not a JSON object",
                              param="file", code="invalid_jsonl")
        out.append(obj)
    if not out:
        raise OpenAIError(400, "the file has no request lines", param="file",
                          code="empty_file")
    if len(out) > MAX_LINES:
        raise OpenAIError(400, f"the file has more than {MAX_LINES} lines", param="file")
    return out


async def create_file(request: Request) -> Response:
    """``POST /v1/files``."""
    try:
        upload = await read_body(request, MAX_FILE_BYTES, what="the upload")
        parts = _form(request.headers.get("content-type", ""), upload)
        purpose = parts.get("purpose", (None, b""))[1].decode("utf-8", "replace").strip()
        if purpose != "batch":
            raise OpenAIError(400, "purpose must be batch (the only purpose rbees keeps "
                              "files for)", param="purpose")
        if "file" not in parts:
            raise OpenAIError(400, "file is required", param="file")
        filename, content = parts["file"]
        _requests(content)
    except PayloadTooLargeError as exc:
        return OpenAIError(413, exc.message, param="file").response()
    except OpenAIError as exc:
        return exc.response()
    stored = await _store(request).add_file(purpose, filename or "upload.jsonl", content,
                                            owner=_owner())
    return JSONResponse(_file_object(stored))


def _missing(kind: str, ident: str) -> Response:
    return OpenAIError(404, f"no {kind} {ident}", code="not_found").response()


def _visible_file(request: Request) -> StoredFile | None:
    stored = _store(request).file(request.path_params["file_id"])
    return stored if stored is not None and _sees(stored.owner) else None


async def get_file(request: Request) -> Response:
    """``GET /v1/files/{file_id}``."""
    stored = _visible_file(request)
    if stored is None:
        return _missing("file", request.path_params["file_id"])
    return JSONResponse(_file_object(stored))


async def list_files(request: Request) -> Response:
    """``GET /v1/files?purpose=&limit=&order=&after=``: OpenAI's cursor page (newest first
    unless ``order=asc``); an ``inference``-only key's own files only."""
    raw = request.query_params.get("limit", "10000")
    if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= 10_000:
        return OpenAIError(400, "limit must be an integer from 1 to 10000",
                           param="limit").response()
    order = request.query_params.get("order", "desc")
    if order not in ("asc", "desc"):
        return OpenAIError(400, "order must be asc or desc", param="order").response()
    page, more = _store(request).files(
        after=request.query_params.get("after"), limit=int(raw), newest_first=order == "desc",
        purpose=request.query_params.get("purpose") or None, owner=_only_own())
    data = [_file_object(f) for f in page]
    return JSONResponse({"object": "list", "data": data,
                         "first_id": data[0]["id"] if data else None,
                         "last_id": data[-1]["id"] if data else None, "has_more": more})


async def delete_file(request: Request) -> Response:
    """``DELETE /v1/files/{file_id}``: OpenAI's ``{id, object: "file", deleted: true}``."""
    stored = _visible_file(request)
    if stored is None or not await _store(request).delete_file(stored.file_id):
        return _missing("file", request.path_params["file_id"])
    return JSONResponse({"id": stored.file_id, "object": "file", "deleted": True})


async def file_content(request: Request) -> Response:
    """``GET /v1/files/{file_id}/content``: the file's bytes."""
    stored = _visible_file(request)
    content = None if stored is None else _store(request).content(stored.file_id)
    if content is None:
        return _missing("file", request.path_params["file_id"])
    return Response(content, media_type="application/octet-stream")


def _metadata(body: dict[str, Any]) -> dict[str, str] | None:
    meta = body.get("metadata")
    if meta is None:
        return None
    if not isinstance(meta, dict) or len(meta) > 16 or not all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
            for k, v in meta.items()):
        raise OpenAIError(400, "metadata must be an object of at most 16 string values "
                          "(keys up to 64 characters, values up to 512)", param="metadata")
    if "rbees_window" in meta:
        try:
            parse_window(meta["rbees_window"])
        except ValueError as exc:
            raise OpenAIError(400, f"rbees_window {exc}", param="metadata") from exc
    return dict(meta)


async def create_batch(request: Request) -> Response:
    """``POST /v1/batches``."""
    store = _store(request)
    try:
        body = await read_object(request)
        endpoint = body.get("endpoint")
        if endpoint not in ENDPOINTS:
            raise OpenAIError(400, f"endpoint must be one of {', '.join(ENDPOINTS)}",
                              param="endpoint")
        window = body.get("completion_window")
        if window not in WINDOWS:
            raise OpenAIError(400, "completion_window must be 24h",
                              param="completion_window")
        metadata = _metadata(body)
        file_id = body.get("input_file_id")
        stored = store.file(file_id) if isinstance(file_id, str) else None
        if stored is None or not _sees(stored.owner):
            raise OpenAIError(400, f"no file {file_id}", param="input_file_id")
        if stored.purpose != "batch":
            raise OpenAIError(400, f"file {file_id} has purpose {stored.purpose}, not batch",
                              param="input_file_id")
        content = store.content(stored.file_id) or b""
        lines: list[tuple[str, dict[str, Any]]] = []
        seen: set[str] = set()
        for number, req in enumerate(_requests(content), start=1):
            custom_id = req.get("custom_id")
            if not isinstance(custom_id, str) or not custom_id:
                raise OpenAIError(400, f"request {number} has no custom_id",
                                  param="input_file_id", code="missing_custom_id")
            if custom_id in seen:
                raise OpenAIError(400, f"request {number} repeats custom_id {custom_id!r}",
                                  param="input_file_id", code="duplicate_custom_id")
            seen.add(custom_id)
            lines.append((custom_id, {k: req.get(k) for k in ("method", "url", "body")}))
    except OpenAIError as exc:
        return exc.response()
    principal = current_principal.get()  # its lines' jobs are this key's (models, usage)
    row = await store.add_batch(endpoint=str(endpoint), input_file_id=stored.file_id,
                                completion_window=str(window), window_s=WINDOWS[str(window)],
                                metadata=metadata, lines=lines,
                                owner=None if principal is None else principal.name,
                                owner_models=None if principal is None or principal.models is None
                                else list(principal.models))
    runner(request).wake()
    return JSONResponse(batch_object(store, row))


async def get_batch(request: Request) -> Response:
    """``GET /v1/batches/{batch_id}``."""
    store, batch_id = _store(request), request.path_params["batch_id"]
    row = store.batch(batch_id)
    if row is None or not _sees(row["owner"]):
        return _missing("batch", batch_id)
    return JSONResponse(batch_object(store, row))


async def list_batches(request: Request) -> Response:
    """``GET /v1/batches?after=&limit=``: newest first, OpenAI's cursor page."""
    store = _store(request)
    raw = request.query_params.get("limit", "20")
    if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= 100:
        return OpenAIError(400, "limit must be an integer from 1 to 100",
                           param="limit").response()
    page, more = store.batches(after=request.query_params.get("after"), limit=int(raw),
                               owner=_only_own())
    data = [batch_object(store, row) for row in page]
    return JSONResponse({"object": "list", "data": data,
                         "first_id": data[0]["id"] if data else None,
                         "last_id": data[-1]["id"] if data else None, "has_more": more})


async def cancel_batch(request: Request) -> Response:
    """``POST /v1/batches/{batch_id}/cancel``: ``cancelling`` now, ``cancelled`` once the
    runner stopped its lines (those answered stay in the output file)."""
    store, batch_id = _store(request), request.path_params["batch_id"]
    row = store.batch(batch_id)
    if row is None or not _sees(row["owner"]):
        return _missing("batch", batch_id)
    if row["status"] in FINAL_BATCH and row["status"] != "cancelled":
        return OpenAIError(409, f"batch {batch_id} is {row['status']}: it cannot be "
                           "cancelled", code="batch_not_cancellable").response()
    await store.set_status(batch_id, "cancelling",
                           only_from=("validating", "in_progress", "finalizing"))
    runner(request).wake()
    row = store.batch(batch_id)
    assert row is not None
    return JSONResponse(batch_object(store, row))


_ERRORS = {"400": "invalid request (OpenAI error shape)", "404": "unknown file or batch"}
OPERATIONS = [openapi.Operation(method, path, summary, errors=errors, scope="inference")
              for method, path, summary, errors in (
    ("POST", "/v1/files", "OpenAI file upload (multipart: file, purpose batch; JSONL of batch "
     "requests)", {**_ERRORS, "413": "too big"}),
    ("GET", "/v1/files", "OpenAI files, newest first (purpose, limit, order, after); an "
     "inference-only key's own", _ERRORS),
    ("GET", "/v1/files/{file_id}", "OpenAI file object", _ERRORS),
    ("DELETE", "/v1/files/{file_id}", "delete a file", _ERRORS),
    ("GET", "/v1/files/{file_id}/content", "a file's bytes (a batch's input, output or error "
     "JSONL)", _ERRORS),
    ("POST", "/v1/batches", "OpenAI batch: each line a batch-lane job", _ERRORS),
    ("GET", "/v1/batches", "OpenAI batches, newest first (after, limit)", _ERRORS),
    ("GET", "/v1/batches/{batch_id}", "OpenAI batch object", _ERRORS),
    ("POST", "/v1/batches/{batch_id}/cancel", "cancel a batch",
     {**_ERRORS, "409": "the batch is already final"}),
)]


def routes() -> list[BaseRoute]:
    return [
        Route("/v1/files", create_file, methods=["POST"]),
        Route("/v1/files", list_files, methods=["GET"]),
        Route("/v1/files/{file_id}", get_file, methods=["GET"]),
        Route("/v1/files/{file_id}", delete_file, methods=["DELETE"]),
        Route("/v1/files/{file_id}/content", file_content, methods=["GET"]),
        Route("/v1/batches", create_batch, methods=["POST"]),
        Route("/v1/batches", list_batches, methods=["GET"]),
        Route("/v1/batches/{batch_id}", get_batch, methods=["GET"]),
        Route("/v1/batches/{batch_id}/cancel", cancel_batch, methods=["POST"]),
    ]
