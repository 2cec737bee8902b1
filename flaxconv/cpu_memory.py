"""XLA:CPU's per-call scratch memory, kept by the C allocator for the next call instead of
handed back to the operating system.

Each call of a compiled program allocates its temporary buffer (a training step's
activations and gradients: 39 MB for the zoo's BatchNorm + SAME model at batch 64, 83 MB
for its small ResNet) and frees it on return. glibc's ``malloc`` serves a block that large
with a fresh ``mmap`` (or trims a thread's arena), so every call faults its buffer's pages
in again: about 10,000 and 21,000 page faults per step, which made a Python loop over a
jitted step (``fc.train_step``, a streamed ``fc.fit``) 1.3-2x slower than the same steps
inside one ``lax.scan``, which allocates once (``benchmarks/fit_vs_step.py
--keep-freed-memory``, ``benchmarks/RESULTS.md`` §0, session 10).

:func:`keep_freed_memory` turns that off for the process: call it once, early, in a
program that runs jitted steps one call at a time on CPU (a loop over ``fc.train_step``, a
streamed ``fc.fit``). It is not on by default: ``fc.fit`` on arrays runs each epoch as one
call, where it has nothing to save, and there, in interleaved A/B runs on the 2-core
development machine, the one shared arena made the MNIST convnet's epoch 0-15% slower
(within that machine's noise, but never faster).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

#: What :func:`keep_freed_memory` sets: one arena for every thread, no ``mmap`` for large
#: blocks, and no trimming below 1 GiB of free memory at the top of the heap.
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 1 << 30))


def keep_freed_memory() -> bool:
    """Makes the C allocator keep freed memory for reuse (glibc's ``mallopt``: see
    :data:`SETTINGS`), so a compiled program's temporary buffer is faulted in during the
    first few calls (while the heap grows to its working size), not on every call.
    Process-wide and not undone: the process's resident memory then stays near its peak,
    as with PyTorch's and TensorFlow's caching allocators. Call it before the first
    computation, since threads that already hold an arena keep it.

    Returns:
      Whether it applied: False off Linux or without glibc (e.g. musl), changing nothing.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(option, value) == 1 for option, value in SETTINGS)
