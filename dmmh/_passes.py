"""A CPU batch in passes, the passes spread over worker threads: inference and training of the encoders.

PyTorch parallelises each operator over its intra-op threads: every matrix product, every elementwise
operation opens an OpenMP region that all threads must join and leave together. A model made of
hundreds of operators per batch opens hundreds of such regions; when one of the threads is slow to be
scheduled (a virtual machine's vCPU, a core shared with another process) every region waits for it,
and two threads can then be several times slower than one (measured: 8x on a shared 2-vCPU VM).

Items are independent in the encoders (and, in eval mode, in the whole model), so none of that
synchronisation is needed. Here the batch is cut into passes of a few MiB of activations each, which
``torch.get_num_threads()`` worker threads take from a queue, each running its passes from start to end
with one intra-op thread: no thread ever waits for another inside a pass, a worker that is slowed down
simply takes fewer passes, and each pass's arithmetic is that of a one-thread run, whatever the
thread count. With one intra-op thread the passes run on a single worker, by the same path.

- :func:`run_passes` (inference): ``fn`` over slices of the batch, results concatenated.
- :func:`encoder_in_passes` (training): the forward passes run on the workers, recording their graphs;
  the backward runs each pass's graph on the workers, which add the parameters' gradients up in pass
  order (so results do not depend on which thread ran what), and hands the sums to autograd as the
  gradients of one operation: hooks on the parameters (DDP's included) see one ordinary gradient.
- :class:`Dropout`: ``nn.Dropout`` that, inside a training pass, draws its mask from the pass's own
  generator, seeded from torch's generator in pass order: the same masks whichever thread runs which
  pass, so seeded training is reproducible (the passes, hence the masks, depend on the thread count).
  Encoders holding other random modules (``nn.Dropout`` itself, ...) are trained one pass after
  another on the calling thread.

Under a Python dispatch or function mode (``FlopCounterMode``, ...), which worker threads would not
see, passes run one after another on the calling thread.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = ["run_passes", "encoder_in_passes", "Dropout"]


def run_passes(fn: Callable[[slice], Tensor], n: int, step: int) -> Tensor:
    """``fn(rows)`` for slices of at most ``step`` of the ``n`` rows (and at least one per intra-op thread),
    concatenated in order, run on the worker threads. The caller's grad, inference and autocast modes
    apply there too."""
    workers = _workers()
    parts = _slices(n, step, workers or 1)
    if len(parts) == 1:
        return fn(parts[0])
    if not workers:
        return torch.cat([fn(rows) for rows in parts])
    state = _ThreadState()
    return torch.cat(list(_pool(workers).map(lambda rows: state.run(fn, rows), parts)))


def encoder_in_passes(encoder: nn.Module, x: Tensor, step: int) -> Tensor:
    """``encoder(x)`` with ``x`` taken ``step`` rows at a time (and at least one pass per intra-op thread),
    for training or any use with gradients: the passes run on the worker threads. An encoder whose
    BatchNorm is training takes the whole batch at once (its statistics must see every item)."""
    n = x.shape[0]
    if encoder.training and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in encoder.modules()):
        return encoder(x)
    params = [p for p in encoder.parameters() if p.requires_grad]
    random = [m for m in encoder.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0]
    workers = _workers() if torch.is_grad_enabled() and params and all(isinstance(m, Dropout) for m in random) else None
    parts = _slices(n, step, workers or 1)
    if len(parts) == 1:
        return encoder(x)
    if not workers:
        return torch.cat([encoder(x[rows]) for rows in parts])
    # one seed per pass, drawn here in pass order: the masks do not depend on which thread runs which pass
    seeds = torch.randint(2**62, (len(parts),)).tolist() if random else [None] * len(parts)
    return _EncoderPasses.apply(encoder, parts, seeds, _ThreadState(), _pool(workers), x, *params)


class _EncoderPasses(torch.autograd.Function):
    """Forward: the passes on the workers, each recording its graph. Backward: each pass's graph on the
    workers, the gradients of the input and of the parameters collected in pass order."""

    @staticmethod
    def forward(ctx, encoder, parts, seeds, state, pool, x, *params):
        out: list[Tensor] = []  # the whole batch's output, allocated by the first pass to finish
        lock = threading.Lock()

        def forward_pass(i: int) -> tuple[Tensor, Tensor]:
            xi = x[parts[i]].detach().requires_grad_(x.requires_grad)
            with state.entered(grad=True), _pass_generator(seeds[i]):
                yi = encoder(xi)
            with lock:
                if not out:
                    out.append(yi.new_empty((x.shape[0], *yi.shape[1:])))
            out[0][parts[i]] = yi.detach()  # copied by the worker: no operator on the calling thread
            return xi, yi

        ctx.passes = list(pool.map(forward_pass, range(len(parts))))
        ctx.pool, ctx.params = pool, params
        return out[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        passes, params = ctx.passes, ctx.params
        if passes is None:
            raise RuntimeError("the encoders' passes were backpropagated already: a second backward (retain_graph=True) "
                               "needs the encoders in one pass: set model.rows_per_pass = None")
        ctx.passes = None  # the graphs go once used
        grads = grad.split([len(out) for _, out in passes])
        with_x = passes[0][0].requires_grad
        dx: list[Tensor | None] = [None] * len(passes)
        dparams: list[Tensor | None] = [None] * len(params)
        turn, done = threading.Condition(), [0]

        def backward_pass(i: int) -> None:
            xi, out = passes[i]
            res = torch.autograd.grad(out, ((xi,) if with_x else ()) + tuple(params), grads[i], allow_unused=True)
            if with_x:
                dx[i], res = res[0], res[1:]
            with turn:  # added in pass order (passes are taken in order, so pass i - 1 is running or done)
                turn.wait_for(lambda: done[0] == i)
                for j, g in enumerate(res):
                    if g is not None:
                        dparams[j] = g if dparams[j] is None else dparams[j].add_(g)
                done[0] += 1
                turn.notify_all()

        list(ctx.pool.map(backward_pass, range(len(passes))))
        return (None, None, None, None, None, torch.cat(dx) if with_x else None, *dparams)


class Dropout(nn.Dropout):
    """``nn.Dropout``, except inside a training pass of :func:`encoder_in_passes`: there the mask comes
    from the pass's own generator (see the module docstring). Same arguments, same state dict."""

    def forward(self, x: Tensor) -> Tensor:
        generator = getattr(_local, "generator", None)
        if generator is None or not self.training or self.p == 0:
            return super().forward(x)
        if self.p == 1:
            return x.mul_(0) if self.inplace else x * 0
        mask = torch.empty_like(x).bernoulli_(1 - self.p, generator=generator).div_(1 - self.p)
        return x.mul_(mask) if self.inplace else x * mask


_local = threading.local()


@contextmanager
def _pass_generator(seed: int | None) -> Iterator[None]:
    """Within the block, :class:`Dropout` on this thread draws from a generator seeded with ``seed``."""
    if seed is None:
        yield
        return
    before = getattr(_local, "generator", None)
    _local.generator = torch.Generator().manual_seed(seed)
    try:
        yield
    finally:
        _local.generator = before


def _workers() -> int | None:
    """Worker threads for the passes: torch's intra-op thread count; None (passes on the calling thread)
    under a Python dispatch or function mode, which worker threads would not see."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    if _get_current_dispatch_mode() is not None or torch._C._is_torch_function_mode_enabled():
        return None
    return torch.get_num_threads()


def _slices(n: int, step: int, threads: int) -> list[slice]:
    """Slices of at most ``step`` rows, at least ``threads`` of them when ``n`` allows."""
    step = max(1, min(step, math.ceil(n / threads)))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)] or [slice(0, 0)]


class _ThreadState:
    """The thread-local modes of the calling thread, to be entered in a worker thread."""

    def __init__(self):
        self.grad, self.inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
        self.autocast, self.autocast_dtype = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")

    @contextmanager
    def entered(self, grad: bool | None = None) -> Iterator[None]:
        with torch.inference_mode(self.inference), torch.set_grad_enabled(self.grad if grad is None else grad), \
                torch.autocast("cpu", dtype=self.autocast_dtype, enabled=self.autocast):
            yield

    def run(self, fn: Callable[[slice], Tensor], rows: slice) -> Tensor:
        with self.entered():
            return fn(rows)


_POOL: dict[int, ThreadPoolExecutor] = {}  # at most one pool: {workers: pool}


def _pool(workers: int) -> ThreadPoolExecutor:
    """``workers`` threads with one intra-op thread each, kept for the process (a new count replaces them)."""
    if workers in _POOL:
        return _POOL[workers]
    for old in _POOL.values():
        old.shutdown(wait=False)
    _POOL.clear()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="dmmh-pass")
    default = torch.get_num_threads()
    # torch.set_num_threads sets the calling thread's OpenMP/MKL thread count and the default of threads
    # created later: each worker sets its own (all at once: the barrier keeps one thread from taking two
    # of these tasks), then the default is restored for every other thread
    barrier = threading.Barrier(workers)
    list(pool.map(lambda _: (_one_intra_op_thread(), barrier.wait()), range(workers)))
    torch.set_num_threads(default)
    _POOL[workers] = pool
    return pool


if hasattr(os, "register_at_fork"):  # a forked child has none of the parent's threads
    os.register_at_fork(after_in_child=_POOL.clear)


def _one_intra_op_thread() -> None:
    torch.get_num_threads()  # torch initialises a thread's count from the default on first use: do it now, not later
    torch.set_num_threads(1)
