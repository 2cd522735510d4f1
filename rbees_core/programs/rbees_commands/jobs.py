"""``rbees jobs submit|list|status|cancel|why``: jobs through rbees-orcd.

``submit`` streams the job's tokens to stdout as they arrive and its statistics to stderr;
``--format json`` prints the job's end record instead. Ctrl+C cancels the job and exits 130.
"""

from __future__ import annotations

import sys
import time
from typing import Annotated, Any

import typer

from rbees_core.hookspecs import hookimpl
from rbees_core.programs.cli_common import FormatOption, OutputFormat, emit, print_json
from rbees_core.programs.rbees_commands.job_answers import check_answer as _check
from rbees_core.programs.rbees_commands.job_answers import print_stats as _stats

LIST_COLUMNS = ("job_id", "status", "model", "priority", "pool_id", "worker_id", "tokens_out",
                "created_at")


def _client() -> Any:
    import httpx

    from rbees_core.config import auth_headers
    from rbees_core.programs.rbees_commands.cluster import orchestrator_url
    from rbees_core.tls import client_context

    return httpx.Client(base_url=orchestrator_url(), headers=auth_headers(),
                        timeout=httpx.Timeout(30.0, read=None), verify=client_context())


def _request(method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
    """One request to rbees-orcd: its status and JSON, the envelope's message as an
    RbeesError, or an RbeesError saying rbees-orcd cannot be reached."""
    import httpx

    try:
        with _client() as client:
            answer = client.request(method, path, **kwargs)
    except httpx.TransportError as exc:
        raise _unreachable(exc) from exc
    return answer.status_code, _check(answer)


def _unreachable(exc: Exception) -> Exception:
    from rbees_core.errors import RbeesError
    from rbees_core.programs.rbees_commands.cluster import orchestrator_url
    from rbees_core.tls import describe_unreachable, tls_failure

    line = describe_unreachable("rbees-orcd", orchestrator_url(), exc)
    return RbeesError(line if tls_failure(exc) else f"{line}; start it with `rbees up`")


def submit(
    model: Annotated[str, typer.Option("--model", help="Catalog id or model reference")],
    prompt: Annotated[str, typer.Option("--prompt", help="The prompt; - reads stdin")],
    chat: Annotated[bool, typer.Option("--chat/--raw",
                                       help="Send the prompt as a user message (default) "
                                            "or as raw text")] = True,
    max_tokens: Annotated[int, typer.Option(
        "--max-tokens", min=1, max=2**31 - 1,
        help="Most tokens to generate (the worker clamps it to its context)")] = 256,
    temperature: Annotated[float, typer.Option("--temperature", min=0, max=2)] = 0.7,
    presence_penalty: Annotated[float | None, typer.Option(
        "--presence-penalty", min=-2, max=2,
        help="Lower the logits of tokens already generated")] = None,
    frequency_penalty: Annotated[float | None, typer.Option(
        "--frequency-penalty", min=-2, max=2,
        help="Lower the logits of generated tokens by how often each came")] = None,
    min_p: Annotated[float | None, typer.Option(
        "--min-p", min=0, max=1,
        help="Drop tokens less likely than this times the likeliest one")] = None,
    logprobs: Annotated[int | None, typer.Option(
        "--logprobs", metavar="N", min=0, max=20,
        help="Each token's log probability and its N likeliest alternatives: on stderr "
             "after the answer (json: the end's logprobs)")] = None,
    seed: Annotated[int | None, typer.Option("--seed", min=0)] = None,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="Stop sequence (repeat)")
                    ] = None,
    priority: Annotated[str, typer.Option("--priority", help="interactive or batch")
                        ] = "interactive",
    pool: Annotated[str | None, typer.Option("--pool", help="Run only on this pool")] = None,
    device: Annotated[str | None, typer.Option("--device", help="Run only on this device")
                      ] = None,
    host: Annotated[str | None, typer.Option(
        "--host", metavar="NAME|auto",
        help="Schedule here, with no rbees-orcd, on this configured host or (auto) the best "
             "one; the default when no rbees-orcd answers and hosts are configured")] = None,
    once: Annotated[bool, typer.Option("--once", help="Without rbees-orcd: stop the worker "
                                                     "this job started when it ends")] = False,
    keep_alive: Annotated[str | None, typer.Option(
        "--keep-alive", metavar="DURATION",
        help="With rbees-orcd: how long the worker stays loaded after this job (Ollama's "
             "keep_alive: 5m, 30s, 0 = unload right after, -1 = keep)")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v",
                                          help="Say how the job was placed")] = False,
    json_schema: Annotated[str | None, typer.Option(
        "--json-schema", metavar="FILE",
        help="Constrain the answer to JSON valid under the JSON schema in FILE")] = None,
    tools_file: Annotated[str | None, typer.Option(
        "--tools", metavar="FILE",
        help="Offer the OpenAI function tools listed (a JSON array) in FILE")] = None,
    tool_choice: Annotated[str | None, typer.Option(
        "--tool-choice", metavar="auto|none|required|NAME",
        help="With --tools: whether the model must call a tool, or which one")] = None,
    fmt: FormatOption = OutputFormat.text,
) -> None:
    """Submit a job and stream its tokens to stdout as they arrive (tool calls, with
    --tools, are printed when the job ends; a thinking model's reasoning goes to stderr)."""
    import httpx

    from rbees_core.programs.rbees_commands import m0

    if prompt == "-":
        prompt = sys.stdin.read()
    task: dict[str, Any] = {"model": model, "max_tokens": max_tokens,
                            "temperature": temperature, "priority": priority}
    if chat:
        task["messages"] = [{"role": "user", "content": prompt}]
    else:
        task["prompt"] = prompt
    if seed is not None:
        task["seed"] = seed
    for key, value in (("presence_penalty", presence_penalty),
                       ("frequency_penalty", frequency_penalty), ("min_p", min_p)):
        if value is not None:
            task[key] = value
    if logprobs is not None:
        task.update(logprobs=True, top_logprobs=logprobs)
    if keep_alive is not None:
        task["keep_alive"] = keep_alive  # checked by rbees-orcd (400 naming it)
    if stop:
        task["stop"] = stop
    task.update(_structured(json_schema, tools_file, tool_choice))
    if pool or device:
        task["placement"] = {k: v for k, v in (("pool", pool), ("device", device)) if v}
    started = time.monotonic()
    if m0.use_m0(host):  # no daemon: schedule and stream over the hosts' transports
        try:
            code = m0.submit(task, host=host, once=once, verbose=verbose,
                             json_out=fmt is OutputFormat.json, started=started)
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
        if code:
            raise typer.Exit(code)
        return
    try:
        with _client() as client:
            accepted = _check(client.post("/v2/tasks", json=task))
            job_id = accepted["job_id"]
            try:
                end = _follow(client, accepted["events_url"], fmt, started)
            except KeyboardInterrupt:
                client.post(f"/v2/tasks/{job_id}/cancel")
                print(f"\ncancelled {job_id}", file=sys.stderr)
                raise typer.Exit(130) from None
            if fmt is OutputFormat.json:
                record = _check(client.get(f"/v2/tasks/{job_id}"))
                print_json({**record, "end": end})
    except httpx.TransportError as exc:
        raise _unreachable(exc) from exc


def _structured(json_schema: str | None, tools_file: str | None, tool_choice: str | None
                ) -> dict[str, Any]:
    """The task fields of --json-schema, --tools and --tool-choice (files read as JSON).
    Raises typer.BadParameter for a file that cannot be read or is not JSON."""
    import json
    from pathlib import Path

    def load(path: str, option: str) -> Any:
        try:
            return json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise typer.BadParameter(f"{path}: {exc}", param_hint=option) from exc

    fields: dict[str, Any] = {}
    if json_schema is not None:
        fields["json_schema"] = load(json_schema, "--json-schema")
    if tools_file is not None:
        offered = load(tools_file, "--tools")
        fields["tools"] = offered.get("tools") if isinstance(offered, dict) else offered
    if tool_choice is not None:
        fields["tool_choice"] = tool_choice if tool_choice in ("auto", "none", "required") \
            else {"type": "function", "function": {"name": tool_choice}}
    return fields


def _follow(client: Any, url: str, fmt: OutputFormat, started: float) -> dict[str, Any]:
    from rbees_core.errors import RbeesError
    from rbees_core.sse import iter_events

    first: float | None = None
    last_id = 0
    entries: list[dict[str, Any]] = []  # logprobs, when the job asked for them
    shown = -1  # the tenth of its model's download last told (pull on first use)
    for _attempt in range(5):  # resume with Last-Event-ID if the stream breaks
        try:
            with client.stream("GET", url, headers={"Last-Event-ID": str(last_id)}) as answer:
                _check_stream(answer)
                for frame in iter_events(answer.iter_lines()):
                    if frame.id:
                        last_id = int(frame.id)
                    event, data = frame.event, frame.json()
                    if event == "token":
                        if first is None:
                            first = time.monotonic()
                        if fmt is OutputFormat.text:
                            _write(data)
                        entries.extend(data.get("logprobs") or ())
                    elif event == "end":
                        if entries:
                            data = {**data, "logprobs": entries}
                        if fmt is OutputFormat.text:
                            sys.stdout.write("\n")
                            _print_logprobs(entries)
                            for call in data.get("tool_calls") or []:
                                function = call.get("function", {})
                                print(f"tool call {call.get('id')}: {function.get('name')}"
                                      f"({function.get('arguments')})")
                            _stats(data, started, first)
                        return dict(data)
                    elif event == "error":
                        raise RbeesError(f"{data.get('code')}: {data.get('message')}")
                    elif event == "downloading" and fmt is OutputFormat.text:
                        shown = _show_download(data, shown)
        except Exception as exc:
            import httpx

            if not isinstance(exc, httpx.TransportError):
                raise
            time.sleep(0.5)
    raise RbeesError("lost the job's event stream")


def _show_download(data: dict[str, Any], shown: int) -> int:
    """Tell on stderr how far the job's model's download is, at each tenth; the tenth told."""
    done, total = int(data.get("bytes") or 0), data.get("total")
    tenth = min(10, done * 10 // int(total)) if total else 0
    if tenth > shown:
        of = f" of {total}" if total else ""
        print(f"downloading {data.get('model')} to pool {data.get('pool_id')}: {done}{of} "
              "bytes", file=sys.stderr)
    return max(tenth, shown)


def _print_logprobs(entries: list[dict[str, Any]]) -> None:
    """One line per token on stderr: the token, its logprob, then its alternatives."""
    for entry in entries:
        alternatives = "  ".join(f"{alt['token']!r} {alt['logprob']:.3f}"
                                 for alt in entry.get("top_logprobs", ()))
        print(f"{entry['token']!r}\t{entry['logprob']:.4f}\t{alternatives}", file=sys.stderr)


def _write(token: dict[str, Any]) -> None:
    """A token event's text on stdout; a thinking model's reasoning (``reasoning``, see
    rbees_core.reasoning) on stderr, so that stdout holds the answer alone."""
    if token.get("reasoning"):
        sys.stderr.write(token["reasoning"])
        sys.stderr.flush()
    sys.stdout.write(token["t"])
    sys.stdout.flush()


def _check_stream(answer: Any) -> None:
    if answer.status_code >= 400:
        answer.read()
        _check(answer)


def list_(
    status: Annotated[str | None, typer.Option("--status", help="e.g. queued,running")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 50,
    fmt: FormatOption = OutputFormat.text,
) -> None:
    """Jobs, newest first."""
    params: dict[str, Any] = {"limit": limit}
    if status:
        params["status"] = status
    _, page = _request("GET", "/v2/tasks", params=params)
    emit(page.get("jobs", []), fmt, LIST_COLUMNS)


def status_(job_id: Annotated[str, typer.Argument()], fmt: FormatOption = OutputFormat.text
            ) -> None:
    """One job's record."""
    _, record = _request("GET", f"/v2/tasks/{job_id}")
    if fmt is OutputFormat.json:
        print_json(record)
    else:
        for key, value in record.items():
            print(f"{key:16} {value if value is not None else '-'}")


def cancel(job_id: Annotated[str, typer.Argument()]) -> None:
    """Cancel a queued or running job."""
    status, _ = _request("POST", f"/v2/tasks/{job_id}/cancel")
    print(f"{job_id}: {'cancelled' if status == 202 else 'already finished'}", file=sys.stderr)


def why(job_id: Annotated[str, typer.Argument()], fmt: FormatOption = OutputFormat.text
        ) -> None:
    """Why the scheduler placed (or is holding) a job, in words."""
    _, decision = _request("GET", f"/v2/tasks/{job_id}/decision")
    if fmt is OutputFormat.json:
        print_json(decision)
    else:
        print(decision.get("explanation", ""))


@hookimpl
def rbees_register_cli(app: typer.Typer, program: str) -> None:
    if program != "rbees":
        return
    group = typer.Typer(name="jobs", help="Submit, list, inspect and cancel jobs.",
                        no_args_is_help=True)
    group.command("submit")(submit)
    group.command("list")(list_)
    group.command("status")(status_)
    group.command("cancel")(cancel)
    group.command("why")(why)
    app.add_typer(group)
