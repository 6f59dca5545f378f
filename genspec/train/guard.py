"""Keeping two processes out of one folder, and worker processes from outliving their parent.

A run folder, a tuning folder and a study's run folders are written by one process at a time:
`folder_lock` holds an advisory lock (flock) on a file in the folder for as long as the work
goes on, and a second process asking for it gets a `RunError` naming the holder. The kernel
drops the lock when its holder dies, however it dies, so a killed run never leaves a stale one.

`exit_with_parent` is for the worker processes of `study --parallel` and `tune --parallel`:
a parent killed outright (SIGKILL, a closed terminal) would leave them training on, re-parented
to init, and writing into folders a rerun writes too.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from genspec.errors import RunError

try:
    import fcntl
except ImportError:  # not POSIX: no locking, as before
    fcntl = None

LOCK_FILE = ".genspec.lock"
_watching = False  # exit_with_parent started its thread


@contextmanager
def folder_lock(folder: Path, what: str = "run"):
    """Hold `folder`'s lock for the `with` block, creating the folder if needed. The lock file
    goes when the block ends (and the folder too, if the block left nothing else in it)."""
    if fcntl is None:
        yield
        return
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    descriptor = _acquire(path, folder, what)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # before the release: a process waiting on this file sees it gone
        os.close(descriptor)
        if created and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()  # a run that failed before writing anything leaves no folder


def _acquire(path: Path, folder: Path, what: str) -> int:
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(descriptor, 32).decode(errors="replace").strip() or "unknown"
            os.close(descriptor)
            raise RunError(f"{folder} is in use: another genspec process (pid {holder}) is writing its {what} there; "
                           "wait for it to finish or stop it, then run again") from None
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(descriptor).st_ino:  # not a file its holder removed as we opened it
            os.ftruncate(descriptor, 0)
            os.write(descriptor, str(os.getpid()).encode())
            return descriptor
        os.close(descriptor)


def exit_with_parent(poll_s: float = 1.0) -> None:
    """Exit this process (as a kill would: checkpoints are written atomically) within `poll_s`
    seconds of its parent's death, which re-parents it. Once per process: a worker runs many jobs."""
    global _watching
    if _watching:
        return
    _watching = True
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
