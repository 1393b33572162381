"""One run at a time per run directory: a file lock locally, a lease object on object storage.

Two runs on one directory would duplicate work and race on the same stage directories, so `run`
holds `run_lock(run_dir)` while its stages execute. The second run fails at once with
`RunLockedError`, which says who holds the lock (pid, host, since when, command).

- Locally the lock is an OS file lock (`filelock`, `flock` on POSIX): the kernel releases it when
  its process dies, so a run killed with SIGKILL never blocks its own resume.
- On object storage (fsspec URLs) there is no such lock, so the run writes a lease object
  (`RUN_DIR/.run.lease.json`) with an expiry that a background thread renews. A lease is
  taken over when it has expired, or when it was written on this host by a process that is no
  longer alive (a SIGKILLed run resumed on the same machine). Object stores offer no
  compare-and-swap, so two runs starting within the same second can both win: the lease guards
  against the common mistake, not against a determined race.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aligned_probing.pipeline import fs as _fs

LOCK_FILE = ".run.lock"
HOLDER_FILE = ".run.lock.json"
LEASE_FILE = ".run.lease.json"
LEASE_SECONDS = 300.0


class RunLockedError(RuntimeError):
    """Another run holds the run directory's lock; the message says which process."""


def _holder() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv[:6]),
    }


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process (its details are not recorded)"
    return (
        f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('started')} "
        f"({holder.get('command') or 'unknown command'})"
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


@contextlib.contextmanager
def run_lock(
    run_dir: _fs.Resolved, storage_options: _fs.StorageOptions = None, *, lease_seconds: float = LEASE_SECONDS
) -> Iterator[None]:
    """Hold the run directory's lock while the block runs.

    Args:
        run_dir: The run directory (a `Path`, or a URL string on object storage).
        storage_options: fsspec options of a URL `run_dir`.
        lease_seconds: Lifetime of a lease on object storage (renewed every third of it).

    Raises:
        RunLockedError: Another live run holds the lock.
    """
    if isinstance(run_dir, Path):
        with _file_lock(run_dir):
            yield
    else:
        with _lease(run_dir, dict(storage_options or {}), lease_seconds):
            yield


@contextlib.contextmanager
def _file_lock(run_dir: Path) -> Iterator[None]:
    from filelock import FileLock, Timeout

    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(run_dir / LOCK_FILE, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        try:
            holder = json.loads((run_dir / HOLDER_FILE).read_text())
        except (OSError, ValueError):
            holder = None
        raise RunLockedError(
            f"Run directory {run_dir} is in use by {_describe(holder)}. Wait for that run to finish, "
            "or set another output.run_dir."
        ) from None
    try:
        (run_dir / HOLDER_FILE).write_text(json.dumps(_holder()))
        yield
    finally:
        with contextlib.suppress(OSError):
            (run_dir / HOLDER_FILE).unlink()
        lock.release()


def _read_lease(location: _fs.Resolved, options: dict[str, Any]) -> dict[str, Any] | None:
    try:
        return json.loads(_fs.read_text(location, options))
    except (FileNotFoundError, ValueError):
        return None


def _lease_is_live(lease: dict[str, Any], now: float) -> bool:
    if float(lease.get("expires", 0)) <= now:
        return False
    if lease.get("host") == socket.gethostname() and isinstance(lease.get("pid"), int):
        return _pid_alive(lease["pid"])  # a killed run on this machine never blocks its resume
    return True


@contextlib.contextmanager
def _lease(run_dir: str, options: dict[str, Any], seconds: float) -> Iterator[None]:
    location = _fs.child(run_dir, LEASE_FILE)
    current = _read_lease(location, options)
    if current is not None and _lease_is_live(current, time.time()):
        raise RunLockedError(
            f"Run directory {run_dir} is in use by {_describe(current)} (lease until "
            f"{datetime.fromtimestamp(float(current['expires']), UTC).isoformat(timespec='seconds')}). Wait for "
            f"that run to finish, set another output.run_dir, or, if that run is dead, delete {location}."
        )
    token = uuid.uuid4().hex
    lease = {**_holder(), "token": token}

    def write() -> None:
        _fs.write_text_atomic(location, json.dumps({**lease, "expires": time.time() + seconds}), options)

    write()
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(seconds / 3):
            with contextlib.suppress(Exception):  # a missed renewal is retried; the lease lasts 3 periods
                write()

    thread = threading.Thread(target=renew, name="aligned-probing-lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        mine = _read_lease(location, options)
        if mine is not None and mine.get("token") == token:
            with contextlib.suppress(Exception):
                _fs.rm(location, options)
