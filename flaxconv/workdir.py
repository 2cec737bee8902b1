"""Workdirs: creating one, holding its lock for a run, and writing files into it atomically.

A run (``fc.fit``, ``train_and_evaluate``, the experiments) claims its workdir with
:func:`claim_workdir` or :func:`lock_workdir`, so a second run in the same folder is refused
instead of deleting the first one's checkpoints in flight; every file it writes goes
through :func:`replace_file`, so a kill never leaves half a file, and a write that fails for
want of space or permission stops the run with one :class:`WorkdirWriteError`. Which run a
workdir holds, and whether this one may resume it, is :mod:`flaxconv.resume`'s.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import jax

__all__ = [
    "LOCK_FILE",
    "WorkdirLock",
    "WorkdirLockedError",
    "WorkdirWriteError",
    "claim_workdir",
    "lock_workdir",
    "make_workdir",
    "replace_file",
    "write_error",
    "write_json",
]

# Why a write can fail that the user, not the code, must fix: errno -> what they are told.
_CANNOT_WRITE = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
}
# How Orbax/TensorStore errors (ValueError texts) carry the OS error.
_ERRNO_IN_TEXT = re.compile(r"os_error_code='(\d+)'|\[Errno (\d+)\]")
_STRERROR = {os.strerror(code).lower(): code for code in _CANNOT_WRITE}


class WorkdirWriteError(OSError):
    """A file of a run could not be written: the disk is full, the workdir is read-only, ...

    ``errno``, ``strerror`` and ``filename`` (the file or checkpoint that was being
    written) are those of an ``OSError``; ``str()`` is one line that names the path and the
    reason and says what to do.
    """

    def __str__(self) -> str:
        if self.errno in (errno.ENOSPC, errno.EDQUOT):
            fix = "free some space"
        else:
            fix = "make it writable or use another workdir"
        return (
            f"cannot write {self.filename}: {self.strerror}; {fix}, then run the same "
            f"command again to resume from the last checkpoint"
        )


def write_error(path: str | os.PathLike, error: BaseException) -> WorkdirWriteError | None:
    """The :class:`WorkdirWriteError` for ``error`` raised while writing ``path``, or None
    when ``error`` is not a full disk, a read-only file system or a permission denied.

    Recognizes an ``OSError``'s ``errno`` and the OS error that Orbax and TensorStore put in
    their messages (``os_error_code='28'``, ``No space left on device``), along the chain of
    causes.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, WorkdirWriteError):
            return error
        code = getattr(error, "errno", None) if isinstance(error, OSError) else None
        if code not in _CANNOT_WRITE:
            text = str(error)
            match = _ERRNO_IN_TEXT.search(text)
            code = int(match.group(1) or match.group(2)) if match else None
            if code not in _CANNOT_WRITE:
                code = next((c for s, c in _STRERROR.items() if s in text.lower()), None)
        if code in _CANNOT_WRITE:
            return WorkdirWriteError(code, _CANNOT_WRITE[code], os.fspath(path))
        error = error.__cause__ or error.__context__
    return None


def replace_file(path: str, write: Callable[[str], Any]) -> None:
    """Writes ``path`` through a temporary file, so a kill never leaves half a file.

    ``write(tmp)`` writes the content to the file ``tmp``, which then replaces ``path``. If
    that fails, the temporary file is removed and ``path`` keeps its previous content.
    Only process 0 writes: in a multi-host run every process holds the same numbers.

    Raises:
      WorkdirWriteError: the disk is full or the folder is not writable (naming ``path``).
      Any other exception of ``write``.
    """
    if jax.process_index() != 0:
        return
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{ext}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        failed = write_error(path, error) if isinstance(error, Exception) else None
        if failed is not None:
            raise failed from error
        raise


def make_workdir(workdir: str | os.PathLike) -> str:
    """Creates ``workdir`` (and its parents) unless it exists; returns it as a str.

    Raises:
      ValueError: it cannot be a directory (a file in the way, no permission, ...), naming
        the path and the reason.
    """
    workdir = os.fspath(workdir)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(
            f"workdir={workdir!r} is a file; expected a directory (created if missing)"
        )
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as error:
        raise ValueError(
            f"workdir={workdir!r} cannot be created as a directory: "
            f"{error.strerror or error} ({error.filename or workdir})"
        ) from error
    return workdir


#: The lock file :func:`lock_workdir` holds inside a workdir.
LOCK_FILE = ".lock"


class WorkdirLockedError(RuntimeError):
    """Another run holds the workdir's lock (:func:`lock_workdir`)."""


# Workdir locks this process holds: lock file path -> [fd, thread id, depth].
_held_locks: dict[str, list[int]] = {}
_held_locks_guard = threading.Lock()


class WorkdirLock:
    """A held workdir lock (from :func:`lock_workdir`); :meth:`release` it, or use it as a
    context manager."""

    def __init__(self, path: str | None):
        self.path = path  # the lock file; None: nothing was locked

    def release(self) -> None:
        """Releases this hold; the lock itself goes when the outermost hold is released.
        Calling it again does nothing."""
        path, self.path = self.path, None
        if path is None:
            return
        with _held_locks_guard:
            entry = _held_locks[path]
            entry[2] -= 1
            if entry[2] == 0:
                del _held_locks[path]
                os.ftruncate(entry[0], 0)  # no PID left behind by a clean exit
                os.close(entry[0])  # closing the file releases the flock

    def __enter__(self) -> WorkdirLock:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def lock_workdir(workdir: str | os.PathLike) -> WorkdirLock:
    """Takes the lock of ``workdir`` (an existing directory) for one run.

    The lock is an exclusive ``fcntl.flock`` on ``<workdir>/.lock``, held open for the run
    and holding the process's PID. The OS releases it when the process ends however it
    ends (``kill -9`` included), so a lock never goes stale; the file stays and is harmless.
    Two runs in one workdir would delete each other's checkpoints in flight; this refuses
    the second. In one process, the thread that holds the lock may take it again (nested:
    ``train_and_evaluate`` around ``fit``); it goes with the outermost :meth:`~WorkdirLock.
    release`. In a multi-process run only process 0 locks (the others share its workdir).

    Returns:
      A :class:`WorkdirLock`; release it when the run ends, or use ``with``.

    Raises:
      WorkdirLockedError: another run holds it, naming its PID.
      WorkdirWriteError: the workdir is read-only or its disk full (naming the lock file).
      ValueError: the lock file cannot be created for another reason (naming it and why).
      A file system that cannot lock gets a ``RuntimeWarning`` and no lock.
    """
    if jax.process_index() != 0:
        return WorkdirLock(None)
    path = os.path.join(os.path.realpath(os.fspath(workdir)), LOCK_FILE)

    def busy(holder: str) -> WorkdirLockedError:
        return WorkdirLockedError(
            f"workdir {os.fspath(workdir)} is in use by another run ({holder}, which holds "
            f"{path}); wait for it to end or use another workdir"
        )

    with _held_locks_guard:
        entry = _held_locks.get(path)
        if entry is not None:
            if entry[1] != threading.get_ident():
                raise busy(f"PID {os.getpid()}, another thread of this process")
            entry[2] += 1
            return WorkdirLock(path)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            failed = write_error(path, error)  # a read-only workdir, a full disk
            if failed is not None:
                raise failed from error
            raise ValueError(
                f"cannot create the lock file {path} of workdir {os.fspath(workdir)}: "
                f"{error.strerror or error}"
            ) from error
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            # Empty: the holder has the lock but has not written its PID yet.
            raise busy(f"PID {pid or 'unknown'}") from None
        except OSError as error:  # a file system without flock (some network mounts)
            os.close(fd)
            warnings.warn(
                f"cannot lock workdir {os.fspath(workdir)} ({error.strerror or error}); "
                f"nothing stops another run from using it at the same time",
                RuntimeWarning,
                stacklevel=2,
            )
            return WorkdirLock(None)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _held_locks[path] = [fd, threading.get_ident(), 1]
    return WorkdirLock(path)


@contextlib.contextmanager
def claim_workdir(workdir: str | os.PathLike) -> Iterator[str]:
    """``with claim_workdir(workdir) as workdir:`` a whole run in ``workdir``: creates it
    (:func:`make_workdir`) and holds its lock (:func:`lock_workdir`) until the block ends.

    A workdir that this call created is removed again if the block fails before anything
    was written into it (a dataset that does not load, say), so a failed start leaves no
    empty folder behind.
    """
    new = not os.path.exists(workdir)
    workdir = make_workdir(workdir)
    lock = lock_workdir(workdir)
    try:
        yield workdir
    except BaseException:
        if new and lock.path is not None and os.listdir(workdir) == [LOCK_FILE]:
            lock.release()
            with contextlib.suppress(OSError):  # never hide the error itself
                os.remove(os.path.join(workdir, LOCK_FILE))
                os.rmdir(workdir)
        raise
    finally:
        lock.release()


def write_json(path: str, obj: Any) -> None:
    """``obj`` as indented JSON at ``path``, atomically (see :func:`replace_file`)."""

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)

    replace_file(path, write)
