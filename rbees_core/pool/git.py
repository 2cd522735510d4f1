"""The pool's git checkout (``[pool] checkout``): status, pull, submodules.

Everything runs the ``git`` command line with argument lists (no shell), without a terminal
prompt (``GIT_TERMINAL_PROMPT=0``) and in the C locale. Refusals and failures are
:class:`rbees_core.errors.GitError` with one clear message: not a checkout, uncommitted
changes before a pull, no remote or upstream, git missing, git failing (its last error line).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rbees_core.errors import GitError

TIMEOUT_S = 600.0
#: porcelain v2 entry kinds -> number of fields before the path
_FIELDS = {"1 ": 8, "2 ": 9, "u ": 10}
SUBMODULE_STATES = {" ": "ok", "-": "uninitialized", "+": "modified", "U": "conflict"}


def git(repo: Path, *args: str, timeout: float = TIMEOUT_S) -> str:
    """Run ``git -C repo args...`` and return its stdout; :class:`GitError` on failure."""
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C", "LANG": "C"}
    try:
        done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              env=env, stdin=subprocess.DEVNULL, timeout=timeout)
    except FileNotFoundError as exc:
        raise GitError("git is not installed (no `git` on PATH)") from exc
    except subprocess.TimeoutExpired as exc:
        raise GitError(f"git {args[0]} did not finish within {timeout:.0f} s") from exc
    if done.returncode != 0:
        lines = [ln.strip() for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith(("fatal:", "error:"))]
        reason = (errors or lines or [f"exit status {done.returncode}"])[-1]
        raise GitError(f"git {args[0]} failed in {repo}: {reason}",
                       details={"exit_code": done.returncode})
    return done.stdout


def checkout(path: str | Path) -> Path:
    """The top of the work tree containing ``path``; :class:`GitError` if there is none."""
    repo = Path(path).expanduser()
    if not repo.is_dir():
        raise GitError(f"{repo}: the pool checkout does not exist")
    try:
        top = git(repo, "rev-parse", "--show-toplevel").strip()
    except GitError as exc:
        raise GitError(f"{repo} is not a git checkout") from exc
    return Path(top)


def _porcelain(repo: Path) -> dict[str, Any]:
    out = git(repo, "status", "--porcelain=v2", "--branch")
    info: dict[str, Any] = {"commit": None, "branch": None, "upstream": None, "ahead": 0,
                            "behind": 0, "changes": [], "untracked": []}
    for line in out.splitlines():
        if line.startswith("# branch.oid "):
            oid = line.split()[2]
            info["commit"] = None if oid == "(initial)" else oid
        elif line.startswith("# branch.head "):
            head = line.split(maxsplit=2)[2]
            info["branch"] = None if head == "(detached)" else head
        elif line.startswith("# branch.upstream "):
            info["upstream"] = line.split(maxsplit=2)[2]
        elif line.startswith("# branch.ab "):
            ahead, behind = line.split()[2:4]
            info["ahead"], info["behind"] = int(ahead), -int(behind)
        elif line[:2] in _FIELDS:  # ordinary, renamed/copied, unmerged entries
            info["changes"].append(line.split(" ", _FIELDS[line[:2]])[-1].split("\t")[0])
        elif line.startswith("? "):
            info["untracked"].append(line[2:])
    return info


def remotes(repo: Path) -> dict[str, str]:
    out = git(repo, "remote", "-v")
    found: dict[str, str] = {}
    for line in out.splitlines():
        name, url, *_ = line.split()
        found.setdefault(name, url)
    return found


def status(path: str | Path) -> dict[str, Any]:
    """Branch, commit, upstream and ahead/behind counts, changes, remotes of the checkout.

    ``dirty`` means tracked files differ from HEAD (untracked files are listed apart).
    """
    repo = checkout(path)
    info = _porcelain(repo)
    return {"path": str(repo), **info, "dirty": bool(info["changes"]),
            "remotes": remotes(repo)}


def pull(path: str | Path) -> dict[str, Any]:
    """Fast-forward the checkout from its upstream, then bring submodules to the recorded
    commits. Refuses a dirty tree, a detached HEAD, and a branch without remote/upstream."""
    before = status(path)
    repo = Path(before["path"])
    if before["dirty"]:
        shown = ", ".join(before["changes"][:5]) + (", ..." if len(before["changes"]) > 5 else "")
        raise GitError(f"{repo} has uncommitted changes ({shown}); commit or stash them first",
                       details={"changes": before["changes"]})
    if not before["remotes"]:
        raise GitError(f"{repo} has no remote to pull from (git remote add origin URL)")
    if before["branch"] is None:
        raise GitError(f"{repo} is on a detached HEAD; check out a branch first")
    if before["upstream"] is None:
        raise GitError(f"branch {before['branch']} of {repo} has no upstream "
                       f"(git branch --set-upstream-to=origin/{before['branch']})")
    git(repo, "pull", "--ff-only", "--no-rebase", "--recurse-submodules=no")
    if (repo / ".gitmodules").exists():
        git(repo, "submodule", "sync", "--recursive")
        git(repo, "submodule", "update", "--init", "--recursive")
    after = status(repo)
    return {"path": str(repo), "branch": after["branch"], "before": before["commit"],
            "after": after["commit"], "updated": before["commit"] != after["commit"],
            "submodules": submodule_status(repo)}


def submodule_list(path: str | Path) -> list[dict[str, Any]]:
    """Submodules declared in ``.gitmodules``: name, path, url, branch."""
    repo = checkout(path)
    if not (repo / ".gitmodules").exists():
        return []
    try:
        out = git(repo, "config", "-f", ".gitmodules", "--get-regexp",
                  r"^submodule\..*\.(path|url|branch)$")
    except GitError:
        return []
    modules: dict[str, dict[str, Any]] = {}
    for line in out.splitlines():
        key, _, value = line.partition(" ")
        name, _, attr = key[len("submodule."):].rpartition(".")
        modules.setdefault(name, {"name": name, "path": None, "url": None, "branch": None})
        modules[name][attr] = value
    return sorted(modules.values(), key=lambda m: str(m["path"]))


def submodule_status(path: str | Path) -> list[dict[str, Any]]:
    """Each submodule (recursively): path, state (ok, uninitialized, modified, conflict),
    checked-out commit and its describe text, with the url from ``.gitmodules``."""
    repo = checkout(path)
    if not (repo / ".gitmodules").exists():
        return []
    urls = {m["path"]: m["url"] for m in submodule_list(repo)}
    rows = []
    for line in git(repo, "submodule", "status", "--recursive").splitlines():
        if not line:
            continue
        state, rest = line[0], line[1:]
        commit, _, tail = rest.partition(" ")
        sub_path, _, describe = tail.partition(" (")
        rows.append({"path": sub_path, "state": SUBMODULE_STATES.get(state, state),
                     "commit": commit, "describe": describe.rstrip(")") or None,
                     "url": urls.get(sub_path)})
    return rows


def submodule_update(path: str | Path, paths: Sequence[str] = (), *, remote: bool = False
                     ) -> list[dict[str, Any]]:
    """Initialise and check out submodules (all, or ``paths``) at their recorded commits, or
    at their remote branch's tip with ``remote``; returns the status afterwards."""
    repo = checkout(path)
    if not (repo / ".gitmodules").exists():
        raise GitError(f"{repo} has no submodules (.gitmodules is missing)")
    known = {m["path"] for m in submodule_list(repo)}
    unknown = [p for p in paths if p.rstrip("/") not in known]
    if unknown:
        raise GitError(f"{unknown[0]!r} is not a submodule of {repo} (known: "
                       f"{', '.join(sorted(str(k) for k in known)) or 'none'})")
    git(repo, "submodule", "sync", "--recursive")
    git(repo, "submodule", "update", "--init", "--recursive",
        *(["--remote"] if remote else []), "--", *paths)
    return submodule_status(repo)
