"""One report per Orbax failure: the stray tracebacks around a failed save or restore,
dropped once the failure has reached the caller.

Orbax saves and restores a checkpoint with many reads or writes in flight at once
(tensorstore's threads, asyncio tasks). When one fails, the caller gets that error
(:mod:`flaxconv.checkpoint` turns it into one line: a ``WorkdirWriteError``, a
``CorruptCheckpointError`` or a warning naming the checkpoint), but the others report too:

* a save that failed for want of space or permission: each writer thread logs a traceback
  (hundreds of lines), and asyncio logs the futures it abandoned;
* a restore that failed part-way (a missing or truncated array file): the reads it started
  finish after Orbax has closed its event loop, and each prints an unraisable
  ``RuntimeError("Event loop is closed")`` from tensorstore's threads, or fails again as
  its coroutine is closed (an unraisable exception that names the checkpoint's folder), or
  is logged by asyncio as an exception "never retrieved" that names it; Orbax 0.12 also
  leaves a coroutine unawaited, which Python warns of as it is freed.

Importing this module installs a logging filter on the ``absl`` and ``asyncio`` loggers and
a warnings filter for that coroutine; :func:`reading` (called before every restore) arms
the drop of the restore's stray reports, :func:`write_error_raised` that of a save's.
Everything else passes through unchanged.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
import warnings

from flaxconv.workdir import write_error

_write_error_raised = False  # a save's WorkdirWriteError was raised in this process
_read_folders: set[str] = set()  # checkpoint folders a restore read: "/abs/path/3/"


class _DropReportedOrbaxErrors(logging.Filter):
    """Drops the log records of a failed save's writers (once its ``WorkdirWriteError`` was
    raised) and of a failed restore's orphaned reads (naming a folder that was read)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not record.exc_info or record.exc_info[1] is None:
            return True
        if record.name == "asyncio":
            message = record.getMessage()
            if "never retrieved" not in message:
                return True
            if any(folder in message for folder in _read_folders):
                return False
            if not _write_error_raised:
                return True
        elif f"{os.sep}orbax{os.sep}" not in record.pathname:
            return True
        return write_error("", record.exc_info[1]) is None


for _logger in ("absl", "asyncio"):  # Orbax logs through absl
    logging.getLogger(_logger).addFilter(_DropReportedOrbaxErrors())
warnings.filterwarnings("ignore", r"coroutine 'Store\._get_array_metadatas' was never awaited",
                        RuntimeWarning)


def write_error_raised() -> None:
    """Called as a save's ``WorkdirWriteError`` is raised: from now on its writers' log
    records and abandoned futures that are space or permission errors are dropped."""
    global _write_error_raised
    _write_error_raised = True


def reading(folder: str) -> None:
    """Called before Orbax reads checkpoint ``folder``: should the restore fail, the stray
    reports of its orphaned reads are dropped. An unraisable-exception hook drops exactly the
    closed-loop errors and the read errors that name a folder being read, and passes
    everything else to the hook that was there before
    (installed again if something replaced it: pytest does, per test)."""
    _read_folders.add(os.path.join(os.path.abspath(folder), ""))
    if getattr(sys.unraisablehook, "drops_orphaned_reads", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        error, trace = unraisable.exc_value, unraisable.exc_traceback
        if not (_is_closed_loop_error(error, trace) or _is_orphaned_read_error(error, trace)):
            previous(unraisable)

    hook.drops_orphaned_reads = True
    sys.unraisablehook = hook


def _is_orphaned_read_error(error: BaseException | None, trace) -> bool:
    """Whether ``error`` is an Orbax read of a checkpoint folder being read, failing as its
    coroutine is closed after the restore gave up (it names the folder)."""
    if error is None or not any(folder in str(error) for folder in _read_folders):
        return False
    return any(f"{os.sep}orbax{os.sep}" in frame.filename
               for frame in traceback.extract_tb(trace))


def _is_closed_loop_error(error: BaseException | None, trace) -> bool:
    """Whether ``error`` is asyncio refusing a callback because its loop is closed."""
    if not isinstance(error, RuntimeError) or str(error) != "Event loop is closed":
        return False
    return any(frame.name == "call_soon_threadsafe" and f"asyncio{os.sep}" in frame.filename
               for frame in traceback.extract_tb(trace))
