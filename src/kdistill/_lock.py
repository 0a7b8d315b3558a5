"""An exclusive lock on a run directory or an output file: one writer at a time.

The lock is a file created with ``O_EXCL`` that holds its holder's pid, host and start time. A second writer is
refused with a message naming the holder. A lock whose holder is gone (same host, no such process) is stale: it is
taken over. A lock from another host cannot be checked, so it is refused with the path to delete by hand.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kdistill.errors import KdistillError

LOCK_NAME = ".kdistill.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def lock_holder(lock_file: str | Path) -> dict[str, Any] | None:
    """The holder recorded in ``lock_file`` when it is held by a live process (or one on another host), else None
    (no lock, or a stale one, which is removed)."""
    lock_file = Path(lock_file)
    try:
        holder = json.loads(lock_file.read_text())
        pid, host = int(holder["pid"]), str(holder["host"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        try:
            written = lock_file.stat().st_mtime
        except FileNotFoundError:
            return None
        if time.time() - written < 10:  # being written by its holder this moment: held
            return {"pid": "?", "host": "?", "started": written}
        lock_file.unlink(missing_ok=True)  # torn by a kill while it was written: nobody holds it
        return None
    if host == socket.gethostname() and pid != os.getpid() and not _alive(pid):
        lock_file.unlink(missing_ok=True)  # its holder is gone
        return None
    return holder


def _refusal(what: Path, lock_file: Path, holder: dict[str, Any]) -> KdistillError:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
    return KdistillError(
        f"{what} is in use by another kdistill process (pid {holder['pid']} on {holder['host']}, since {since}); "
        f"wait for it to finish or choose another output, or delete {lock_file} if that process is gone"
    )


def check_unlocked(what: str | Path, lock_file: str | Path) -> None:
    """Raise naming the holder when another live process holds ``lock_file``."""
    holder = lock_holder(lock_file)
    if holder is not None and not (holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()):
        raise _refusal(Path(what), Path(lock_file), holder)


@contextlib.contextmanager
def exclusive(what: str | Path, lock_file: str | Path) -> Iterator[None]:
    """Hold ``lock_file`` (guarding ``what``) for the body; a live holder elsewhere is refused, a stale lock taken."""
    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": sys.argv[:8]}
    for _ in range(3):
        try:
            fd = os.open(lock_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = lock_holder(lock_file)
            if holder is not None:
                raise _refusal(Path(what), lock_file, holder) from None
            continue  # the stale lock was removed: try again
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(record))
        break
    else:
        raise KdistillError(f"could not take the lock {lock_file}; delete it if no kdistill process uses {what}")
    try:
        yield
    finally:
        lock_file.unlink(missing_ok=True)
