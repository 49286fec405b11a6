"""Inference over a CPU batch in passes, the passes spread over worker threads.

PyTorch parallelises each operator over its intra-op threads: every matrix product, every elementwise
operation opens an OpenMP region that all threads must join and leave together. A model made of
hundreds of operators per batch opens hundreds of such regions; when one of the threads is slow to
be scheduled (a virtual machine's vCPU, a core shared with another process) every region waits for
it, and two threads can then be several times slower than one (measured: 8x on a shared 2-vCPU VM).

Inference needs none of that synchronisation: items are independent. :func:`run_passes` cuts the
batch into passes of a few MiB of activations each and gives them to ``torch.get_num_threads()``
worker threads, each running its passes from start to end with one intra-op thread: no thread ever
waits for another inside a pass, a worker that is slowed down simply takes fewer passes, and each
pass's arithmetic is that of a one-thread run, whatever the thread count.
"""

from __future__ import annotations

import functools
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
from torch import Tensor

__all__ = ["run_passes"]


def run_passes(fn: Callable[[slice], Tensor], n: int, step: int) -> Tensor:
    """``fn(rows)`` for slices of at most ``step`` of the ``n`` rows, concatenated in order.

    With several intra-op threads the batch is cut into at least that many passes and the passes run
    on worker threads (see the module docstring); the caller's grad, inference and autocast modes
    apply there too. Under a Python dispatch or function mode (``FlopCounterMode``, ...), which
    worker threads would not see, the passes run one after another on the calling thread.
    """
    threads = torch.get_num_threads()
    parallel = threads > 1 and n > 1 and not _modes_active()
    if parallel:
        step = min(step, math.ceil(n / threads))
    parts = [slice(i, min(i + step, n)) for i in range(0, n, step)] or [slice(0, 0)]
    if len(parts) == 1:
        return fn(parts[0])
    if not parallel:
        return torch.cat([fn(rows) for rows in parts])
    state = _ThreadState.capture()
    return torch.cat(list(_pool(threads).map(lambda rows: state.run(fn, rows), parts)))


class _ThreadState:
    """The thread-local modes of the calling thread, to be entered in a worker thread."""

    def __init__(self, grad: bool, inference: bool, autocast: bool, autocast_dtype: torch.dtype):
        self.grad, self.inference, self.autocast, self.autocast_dtype = grad, inference, autocast, autocast_dtype

    @classmethod
    def capture(cls) -> _ThreadState:
        return cls(torch.is_grad_enabled(), torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cpu"),
                   torch.get_autocast_dtype("cpu"))

    def run(self, fn: Callable[[slice], Tensor], rows: slice) -> Tensor:
        with torch.inference_mode(self.inference), torch.set_grad_enabled(self.grad), \
                torch.autocast("cpu", dtype=self.autocast_dtype, enabled=self.autocast):
            return fn(rows)


@functools.lru_cache(maxsize=1)
def _pool(workers: int) -> ThreadPoolExecutor:
    """``workers`` threads with one intra-op thread each (kept for the process; a new count makes a new pool)."""
    pool = ThreadPoolExecutor(workers, thread_name_prefix="dmmh-pass")
    default = torch.get_num_threads()
    # torch.set_num_threads sets the calling thread's OpenMP/MKL thread count and the default of threads
    # created later: each worker sets its own (all at once: the barrier keeps one thread from taking two
    # of these tasks), then the default is restored for every other thread
    barrier = threading.Barrier(workers)
    list(pool.map(lambda _: (_one_intra_op_thread(), barrier.wait()), range(workers)))
    torch.set_num_threads(default)
    return pool


def _one_intra_op_thread() -> None:
    torch.get_num_threads()  # torch initialises a thread's count from the default on first use: do it now, not later
    torch.set_num_threads(1)


def _modes_active() -> bool:
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode() is not None or torch._C._is_torch_function_mode_enabled()
