"""Files rbees keeps under ``$RBEES_HOME``: directories 0700, files 0600, whatever the umask.

Logs, pid and url files, worker records and model records say which models a host holds,
where its daemons listen and what they were asked; none of it is for other local users. The
modes are set where each file is made, not through the process umask, which would also reach
what rbees makes for the user elsewhere (a git checkout, a file the CLI is told to write).

Existing directories keep their mode: a directory the operator made (``RBEES_HOME=/data``)
is theirs to set.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Literal, TextIO, cast, overload

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: str | os.PathLike[str]) -> Path:
    """Make ``path`` and each missing parent with mode 0700 (``mkdir -p`` with the mode
    applied to every directory it makes, which ``Path.mkdir(parents=True)`` does not do).
    Returns the path."""
    path = Path(path)
    missing: list[Path] = []
    at = path
    while not at.exists() and at != at.parent:
        missing.append(at)
        at = at.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=DIR_MODE)
        except FileExistsError:  # made meanwhile by another process: its mode stands
            continue
        os.chmod(folder, DIR_MODE)  # the umask may have taken bits off; never added any
    return path


@overload
def open_private(path: str | os.PathLike[str], mode: Literal["ab", "wb"] = "ab") -> BinaryIO: ...
@overload
def open_private(path: str | os.PathLike[str], mode: Literal["a", "w"]) -> TextIO: ...
def open_private(path: str | os.PathLike[str], mode: str = "ab") -> BinaryIO | TextIO:
    """Open ``path`` for writing (``"ab"``, ``"a"``, ``"wb"``, ``"w"``), creating it 0600 and
    its directory 0700. What a daemon's or a worker's log is opened with."""
    path = Path(path)
    private_dir(path.parent)
    flags = os.O_WRONLY | os.O_CREAT
    flags |= os.O_APPEND if mode.startswith("a") else os.O_TRUNC
    fd = os.open(path, flags, FILE_MODE)
    if "b" in mode:
        return cast(BinaryIO, os.fdopen(fd, mode))
    return cast(TextIO, os.fdopen(fd, mode, encoding="utf-8"))


def write_private(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Replace ``path`` with ``data`` atomically (a temporary file beside it, renamed over
    it), mode 0600, its directory made 0700. Returns the path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open_private(tmp, "wb") as out:
        out.write(data.encode("utf-8") if isinstance(data, str) else data)
    os.replace(tmp, path)
    return path
