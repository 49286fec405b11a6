"""Selective scan (Mamba's S6 recurrence): a reference loop, a C++ CPU kernel, a pure-PyTorch path, mamba-ssm's CUDA kernel.

Every path takes mamba-ssm's ``selective_scan_fn`` signature and semantics::

    delta' = softplus(delta + delta_bias)            (bias and softplus optional)
    x_t    = exp(delta'_t * A) * x_{t-1} + delta'_t * B_t * u_t     x_{-1} = 0, per (batch, channel, state)
    y_t    = <x_t, C_t> + D * u_t;   out = y * silu(z)  (D and z optional)

Shapes (``b`` batch, ``d`` channels, ``l`` length, ``n`` state size, ``g`` groups dividing ``d``):
``u, delta, z: (b, d, l)``; ``A: (d, n)`` real; ``B, C``: ``(d, n)`` (constant), ``(b, n, l)`` (shared by all
channels) or ``(b, g, n, l)`` (one per channel group); ``D, delta_bias: (d,)``. Returns ``out (b, d, l)``
and, with ``return_last_state``, ``x_{l-1} (b, d, n)``. Computation runs in float32 (float64 for float64
inputs); the output has ``u``'s dtype.

Backends (``backend=``):

- ``"ref"``: the per-step loop, the oracle of the tests (autograd gives its gradients).
- ``"cpu"``: a C++ kernel (``mamba_cpu.cpp``, built once per machine, see
  :mod:`dmmh.ops._cpp`): one pass over time per channel block with the state in registers,
  fused softplus, ``D`` and ``silu(z)``, one parallel region per call. Without gradients it keeps one
  state per channel (memory ``O(b d n)``); for training it saves a state every 64 steps and its
  backward recomputes each 64-step chunk from it. CPU tensors only.
- ``"torch"``: pure PyTorch on any device, in large time-major blocks: its forward carries the state
  across chunks of a few steps (memory ``O(b d n)`` per block), its hand-written backward recomputes
  a batch block's states instead of storing them.
- ``"cuda"``: mamba-ssm's compiled kernel (``selective_scan_cuda``, imported lazily).
- ``"auto"``: ``"cuda"`` for CUDA tensors when mamba-ssm imports, ``"cpu"`` for CPU tensors when the
  kernel builds, else ``"torch"`` (with a warning once when the CPU kernel cannot be built).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from dmmh._optional import available, require
from dmmh.ops import _cpp

__all__ = [
    "selective_scan_fn", "selective_scan_ref", "selective_scan_cpu", "selective_scan_torch", "selective_scan_cuda",
    "resolve_backend", "BACKENDS",
]

BACKENDS = ("auto", "ref", "cpu", "torch", "cuda")
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what mamba-ssm's kernel accepts as input

# Target size (elements) of the torch path's working blocks: a few MiB keeps a block in cache while each
# per-step slice stays large enough to be worth PyTorch's intra-op threads.
_BLOCK_ELEMENTS = 1 << 20


def selective_scan_fn(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None, z: Tensor | None = None,
    delta_bias: Tensor | None = None, delta_softplus: bool = False, return_last_state: bool = False,
    *, backend: str = "auto", delta_proj: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """The selective scan on the chosen ``backend`` (see the module docstring).

    With ``delta_proj`` ``(d, r)`` (dmmh's addition: Mamba's ``dt_proj`` weight), ``delta`` is ``(b, r, l)``
    and the scan uses ``delta_proj @ delta``: the C++ kernel computes it step by step when no gradient is
    needed (the ``(b, d, l)`` delta is never stored), the other paths materialise it first.
    """
    name = resolve_backend(backend, u)
    if name == "cpu":
        return selective_scan_cpu(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, delta_proj=delta_proj)
    if delta_proj is not None:
        delta = project_delta(delta, delta_proj, u)
    impl = {"ref": selective_scan_ref, "torch": selective_scan_torch, "cuda": selective_scan_cuda}[name]
    return impl(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def project_delta(delta: Tensor, delta_proj: Tensor, u: Tensor) -> Tensor:
    """``delta_proj @ delta``: ``(d, r)`` and ``(b, r, l)`` → ``(b, d, l)`` with contiguous channels, as a
    Linear layer's output transposed (what the Mamba layer computed before the scan)."""
    _check_low_rank(delta, delta_proj, u)
    return (delta.transpose(1, 2) @ delta_proj.t()).transpose(1, 2)


def resolve_backend(backend: str, u: Tensor) -> str:
    """The concrete backend ``"auto"`` stands for with input ``u``; checks explicit requests."""
    if backend not in BACKENDS:
        raise ValueError(f"selective scan backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":  # mamba-ssm's kernel takes fp32/fp16/bf16 only: float64 falls back
        if u.is_cuda:
            return "cuda" if u.dtype in _CUDA_DTYPES and _cuda_kernel_available() else "torch"
        return "cpu" if u.device.type == "cpu" and _cpp.available() else "torch"
    if backend == "cuda":
        _cuda_kernel()  # raises MissingDependencyError naming the extra
        if not u.is_cuda:
            raise ValueError(f"selective scan backend 'cuda' needs CUDA tensors; u is on {u.device}")
    if backend == "cpu":
        if u.device.type != "cpu":
            raise ValueError(f"selective scan backend 'cpu' needs CPU tensors; u is on {u.device} (use 'torch' or 'auto')")
        _cpp.load()  # raises KernelUnavailable with the compiler's message
    return backend


# -- checks --------------------------------------------------------------------------------------


def _groups(M: Tensor, what: str, b: int, d: int, n: int, l: int) -> int:
    """Channel groups of ``B``/``C``: ``d`` for a constant (d, n) matrix, 1 for (b, n, l), g for (b, g, n, l)."""
    shape = tuple(M.shape)
    if M.is_complex():
        raise NotImplementedError(f"{what}: complex B/C (complex A) are not supported by dmmh's selective scan")
    if M.ndim == 2 and shape == (d, n):
        return d
    if M.ndim == 3 and shape == (b, n, l):
        return 1
    if M.ndim == 4 and shape[0] == b and shape[2:] == (n, l) and shape[1] >= 1 and d % shape[1] == 0:
        return shape[1]
    raise ValueError(
        f"selective scan: {what} has shape {shape}; expected ({d}, {n}), ({b}, {n}, {l}) or "
        f"({b}, g, {n}, {l}) with g dividing {d} (u is (b, d, l) = ({b}, {d}, {l}), A is (d, n) = ({d}, {n}))"
    )


def _check(u, delta, A, B, C, D, z, delta_bias) -> tuple[int, int]:
    """Validate shapes; returns (groups of B, groups of C)."""
    if u.ndim != 3:
        raise ValueError(f"selective scan: u must be (batch, channels, length), got shape {tuple(u.shape)}")
    b, d, l = u.shape
    if A.ndim != 2 or A.shape[0] != d:
        raise ValueError(f"selective scan: A must be (channels, state) = ({d}, n), got shape {tuple(A.shape)}")
    if A.is_complex():
        raise NotImplementedError("selective scan: complex A is not supported by dmmh (use mamba-ssm's reference)")
    n = A.shape[1]
    for name, t, want in (("delta", delta, (b, d, l)), ("z", z, (b, d, l)), ("D", D, (d,)), ("delta_bias", delta_bias, (d,))):
        if t is not None and tuple(t.shape) != want:
            raise ValueError(f"selective scan: {name} has shape {tuple(t.shape)}, expected {want}")
    gb, gc = _groups(B, "B", b, d, n, l), _groups(C, "C", b, d, n, l)
    if B.ndim == 4 and C.ndim == 4 and gb != gc:
        raise ValueError(f"selective scan: B has {gb} groups but C has {gc}; grouped B and C must agree")
    return gb, gc


def _check_low_rank(delta: Tensor, delta_proj: Tensor, u: Tensor) -> None:
    """``delta_proj (d, r)`` and ``delta (b, r, l)`` for ``u (b, d, l)``."""
    b, d, l = u.shape if u.ndim == 3 else (None, None, None)
    if delta_proj.ndim != 2 or delta_proj.shape[0] != d or delta.ndim != 3 or (delta.shape[0], delta.shape[2]) != (b, l) \
            or delta.shape[1] != delta_proj.shape[1]:
        raise ValueError(
            f"selective scan: with delta_proj of shape (d, r), delta must be (b, r, l) for u of shape (b, d, l); got "
            f"delta_proj {tuple(delta_proj.shape)}, delta {tuple(delta.shape)}, u {tuple(u.shape)}"
        )


def _prepare_delta(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool, dtype: torch.dtype) -> Tensor:
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    return F.softplus(delta) if delta_softplus else delta


def _finish(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None, inplace: bool = False) -> Tensor:
    """``(y + D u) * silu(z)`` in the compute dtype of ``y`` (overwriting ``y`` when ``inplace``), cast to ``u``'s dtype."""
    if D is not None:
        y = torch.addcmul(y, u.to(y.dtype), D.to(y.dtype)[:, None], out=y if inplace else None)
    if z is not None:
        y = y.mul_(F.silu(z.to(y.dtype))) if inplace else y * F.silu(z.to(y.dtype))
    return y.to(u.dtype)


# -- reference -----------------------------------------------------------------------------------


def _channel_view(M: Tensor, d: int, dtype: torch.dtype) -> Tensor:
    """``B``/``C`` as ``(b, d, n, l)`` (variable) or ``(d, n)`` (constant)."""
    M = M.to(dtype)
    if M.ndim == 3:
        return M[:, None].expand(-1, d, -1, -1)
    if M.ndim == 4:
        return M.repeat_interleave(d // M.shape[1], dim=1)
    return M


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
    """The selective scan as a plain loop over time steps (autograd gives its gradients): the oracle.

    Structured like mamba-ssm's ``selective_scan_ref`` (decays and inputs precomputed for all steps, then
    one state update per step), except that steps are taken with ``unbind``, whose backward is one
    ``stack``: indexing ``[:, :, t]`` would allocate a full-size zero gradient per step (quadratic in ``l``).
    """
    _check(u, delta, A, B, C, D, z, delta_bias)
    dtype = _cpp.compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    b, d, l = u.shape
    dt = _prepare_delta(delta, delta_bias, delta_softplus, dtype)
    uf, Af = u.to(dtype), A.to(dtype)
    Bc, Cc = _channel_view(B, d, dtype), _channel_view(C, d, dtype)
    decay = torch.exp(torch.einsum("bdl,dn->lbdn", dt, Af))
    if Bc.ndim == 2:
        inputs = torch.einsum("bdl,dn->lbdn", dt * uf, Bc)
    else:
        inputs = torch.einsum("bdl,bdnl->lbdn", dt * uf, Bc)
    Cs = [Cc] * l if Cc.ndim == 2 else Cc.unbind(-1)
    x = u.new_zeros((b, d, A.shape[1]), dtype=dtype)
    ys = []
    for decay_t, input_t, C_t in zip(decay.unbind(0), inputs.unbind(0), Cs):
        x = decay_t * x + input_t
        ys.append((x * C_t).sum(-1))
    y = torch.stack(ys, dim=2) if ys else u.new_zeros((b, d, 0), dtype=dtype)
    out = _finish(y, u, D, z)
    return (out, x) if return_last_state else out


# -- C++ kernel (mamba_cpu.cpp) -------------------------------------------------------------------


def _kernel_inputs(u, delta, A, B, C, D, z, delta_bias, dtype: torch.dtype) -> list[Tensor | None]:
    """The kernel's operands: (b, d, l) tensors channels-contiguous, variable B/C as (b, G, n, l) with one G."""
    Bk, Ck = (M.to(dtype).unsqueeze(1) if M.ndim == 3 else M.to(dtype) for M in (B, C))
    if Bk.ndim == 4 and Ck.ndim == 4 and Bk.shape[1] != Ck.shape[1]:  # shared (G = 1) next to grouped
        g = max(Bk.shape[1], Ck.shape[1])
        Bk, Ck = Bk.expand(-1, g, -1, -1), Ck.expand(-1, g, -1, -1)
    vec = lambda t: None if t is None else t.to(dtype).contiguous()  # noqa: E731
    return [_cpp.channels_last(u, dtype), _cpp.channels_last(delta, dtype), A.to(dtype), Bk, Ck, vec(D), _cpp.channels_last(z, dtype), vec(delta_bias)]


class _SelectiveScanCPU(torch.autograd.Function):
    """The C++ kernel's forward (saving a state every 64 steps) and backward (recomputing from them)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        originals = (u, delta, A, B, C, D, z, delta_bias)
        dtype = _cpp.compute_dtype(*originals)
        ins = _kernel_inputs(*originals, dtype)
        out, last, ckpt = _cpp.load().selective_scan_fwd(*ins, delta_softplus, return_last_state, True)
        ctx.save_for_backward(*ins, ckpt)
        ctx.meta = (delta_softplus, dtype, [None if t is None else (t.dtype, t.ndim) for t in originals])
        out = out.to(u.dtype)
        return (out, last) if return_last_state else out

    @staticmethod
    def backward(ctx, dout, dlast=None):
        *ins, ckpt = ctx.saved_tensors
        delta_softplus, dtype, originals = ctx.meta
        dlast = None if dlast is None else dlast.to(dtype).contiguous()
        grads = _cpp.load().selective_scan_bwd(*ins, delta_softplus, _cpp.channels_last(dout, dtype), dlast, ckpt)
        out = []
        for g, spec in zip(grads, originals):  # u, delta, A, B, C, D, z, delta_bias
            if spec is None:
                out.append(None)
                continue
            g = g.sum(1) if spec[1] == 3 and g.ndim == 4 else g  # B or C shared by all channels
            out.append(g.to(spec[0]))
        return (*out, None, None)


def selective_scan_cpu(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
                       *, delta_proj=None):
    """The C++ kernel (CPU tensors; see the module docstring). Without gradients it stores no states at all
    (and computes a low-rank ``delta`` with ``delta_proj`` step by step, see :func:`selective_scan_fn`)."""
    resolve_backend("cpu", u)
    needs_grad = _cpp.needs_grad(u, delta, A, B, C, D, z, delta_bias, delta_proj)
    if delta_proj is not None and needs_grad:  # gradients through the projection: materialised by autograd
        delta, delta_proj = project_delta(delta, delta_proj, u), None
    _check(u, delta if delta_proj is None else None, A, B, C, D, z, delta_bias)
    args = (u, delta, A, B, C, D, z, delta_bias)
    if needs_grad:
        return _SelectiveScanCPU.apply(*args, bool(delta_softplus), bool(return_last_state))
    dtype = _cpp.compute_dtype(*args, delta_proj)
    if delta_proj is None:
        ins, proj = _kernel_inputs(*args, dtype), None
    else:
        _check_low_rank(delta, delta_proj, u)
        ins, proj = _kernel_inputs(u, None, A, B, C, D, z, delta_bias, dtype), delta_proj.to(dtype)
        ins[1] = delta.to(dtype)  # (b, r, l), any strides
    out, last, _ = _cpp.load().selective_scan_fwd(*ins, bool(delta_softplus), bool(return_last_state), False, proj)
    out = out.to(u.dtype)
    return (out, last) if return_last_state else out


# -- pure PyTorch --------------------------------------------------------------------------------
# Internal layout is time-major: per-step slices are contiguous. The state of a batch block is
# (l, bb, gs, hs, n) with gs * hs = d: gs = d when B or C is constant (one "group" per channel),
# else the groups of the grouped B/C, else 1. B and C become (l|1, bb|1, gs, 1, n) to broadcast.


def _time_major(M: Tensor, gs: int, d: int, dtype: torch.dtype) -> Tensor:
    M = M.to(dtype)
    if M.ndim == 2:
        return M.reshape(1, 1, d, 1, M.shape[1])
    if M.ndim == 3:
        M = M.permute(2, 0, 1)[:, :, None, None, :]
    else:
        M = M.permute(3, 0, 1, 2)[:, :, :, None, :]
    if 1 < M.shape[2] < gs:
        M = M.repeat_interleave(gs // M.shape[2], dim=2)
    return M.contiguous()


def _from_time_major(dM: Tensor, like: Tensor) -> Tensor:
    """Gradient ``(l|1, b|1, gs, n)`` back to the layout and groups of ``like`` (B or C)."""
    if like.ndim == 2:
        return dM.sum((0, 1)).reshape(like.shape)
    if like.ndim == 3:
        return dM.sum(2).permute(1, 2, 0)
    g = like.shape[1]
    dM = dM.reshape(dM.shape[0], dM.shape[1], g, -1, dM.shape[-1]).sum(3)
    return dM.permute(1, 2, 3, 0)


def _dot_n(X: Tensor, M: Tensor) -> Tensor:
    """``sum_n X * M`` for X ``(l, bb, gs, hs, n)``, M ``(l|1, bb|1, gs, 1, n)`` → ``(l, bb, gs, hs)``."""
    if X.shape[3] >= 8:
        return torch.matmul(X, M.transpose(-1, -2)).squeeze(-1)
    return (X * M).sum(-1)


def _dot_h(X: Tensor, v: Tensor) -> Tensor:
    """``sum_h X * v`` for X ``(l, bb, gs, hs, n)``, v ``(l, bb, gs, hs)`` → ``(l, bb, gs, n)``."""
    if X.shape[3] >= 8:
        return torch.matmul(v.unsqueeze(-2), X).squeeze(-2)
    return (X * v.unsqueeze(-1)).sum(3)


class _Workspace:
    """Buffers reused by every block: large CPU allocations are fresh pages from the OS each time,
    and their page faults cost more than the arithmetic done in them."""

    def __init__(self, count: int, elements: int, like: Tensor):
        self.flat = [torch.empty(elements, dtype=like.dtype, device=like.device) for _ in range(count)]

    def views(self, *shape: int) -> list[Tensor]:
        numel = 1
        for s in shape:
            numel *= s
        return [f[:numel].view(shape) for f in self.flat]


def _block_states(decay: Tensor, X: Tensor, dt: Tensor, du: Tensor, A: Tensor, Bx: Tensor, x0: Tensor | None = None) -> None:
    """Fill ``decay = exp(dt A)`` and the states ``X`` (both ``(steps, bb, gs, hs, n)``) of one block, from state ``x0``."""
    l, bb, gs, hs, n = decay.shape
    torch.mul(dt.reshape(l, bb, gs, hs, 1), A.view(gs, hs, n), out=decay).exp_()
    torch.mul(du.reshape(l, bb, gs, hs, 1), Bx, out=X)
    if x0 is not None:
        X[0].addcmul_(decay[0], x0)
    for t in range(1, l):
        X[t].addcmul_(decay[t], X[t - 1])


def _blocks(b: int, per_item: int) -> tuple[int, list[slice]]:
    size = min(b, max(1, _BLOCK_ELEMENTS // max(per_item, 1)))
    return size, [slice(i, min(i + size, b)) for i in range(0, b, size)]


def _bx(M: Tensor, blk: slice, steps: slice | None = None) -> Tensor:
    """The part of a time-major ``B``/``C`` for batch block ``blk`` (and ``steps``), broadcast dims kept."""
    M = M if M.shape[1] == 1 else M[:, blk]
    return M if steps is None or M.shape[0] == 1 else M[steps]


def _torch_states(u, delta, A, B, C, delta_bias, delta_softplus, return_last_state, gs) -> tuple[Tensor, Tensor | None]:
    """``y = <x_t, C_t>`` as ``(b, d, l)`` (compute dtype) and the last state, in pieces of (batch block x a few
    steps) that carry the state from piece to piece: memory is ``y`` plus ``O(b d n)``."""
    dtype = _cpp.compute_dtype(u, delta, A, B, C, delta_bias)
    b, d, l = u.shape
    n = A.shape[1]
    Af = A.to(dtype)
    Bx, Cx = _time_major(B, gs, d, dtype), _time_major(C, gs, d, dtype)
    y = torch.empty(l, b, d, dtype=dtype, device=u.device)
    last = torch.zeros(b, d, n, dtype=dtype, device=u.device) if return_last_state else None
    size, blocks = _blocks(b, d * n)  # one step of a block: at most _BLOCK_ELEMENTS
    steps = min(max(l, 1), max(1, 4 * _BLOCK_ELEMENTS // (size * d * n)))
    work = _Workspace(2, steps * size * d * n, y)
    carry = torch.empty(size, gs, d // gs, n, dtype=dtype, device=u.device)
    for blk in blocks:
        bb = blk.stop - blk.start
        x = carry[:bb].zero_()  # x_{-1} = 0, multiplied by the first decay as in the reference (NaN * 0 is NaN)
        for t0 in range(0, l, steps):
            ts = slice(t0, min(t0 + steps, l))
            dt = _prepare_delta(delta[blk, :, ts], delta_bias, delta_softplus, dtype).permute(2, 0, 1)  # (steps, bb, d)
            du = dt * u[blk, :, ts].permute(2, 0, 1)
            decay, X = work.views(ts.stop - t0, bb, gs, d // gs, n)
            _block_states(decay, X, dt, du, Af, _bx(Bx, blk, ts), x)
            y[ts, blk] = _dot_n(X, _bx(Cx, blk, ts)).reshape(-1, bb, d)
            x = carry[:bb].copy_(X[-1])  # the workspace is overwritten by the next piece
        if last is not None:
            last[blk] = x.reshape(bb, d, n)
    return y.permute(1, 2, 0), last


class _SelectiveScanTorch(torch.autograd.Function):
    """The forward of :func:`_torch_states`; the backward recomputes the states of each batch block."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, gs):
        y, last = _torch_states(u, delta, A, B, C, delta_bias, delta_softplus, return_last_state, gs)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, y)
        ctx.meta = (delta_softplus, gs, _cpp.compute_dtype(u, delta, A, B, C, D, z, delta_bias))
        out = _finish(y, u, D, z)
        return (out, last) if return_last_state else out

    @staticmethod
    def backward(ctx, dout, dlast=None):
        u, delta, A, B, C, D, z, delta_bias, y = ctx.saved_tensors
        delta_softplus, gs, dtype = ctx.meta
        b, d, l = u.shape
        n = A.shape[1]
        uf, dout = u.to(dtype), dout.to(dtype)
        grads: dict[str, Tensor | None] = dict.fromkeys(("u", "delta", "A", "B", "C", "D", "z", "delta_bias"))
        if z is not None:
            zf = z.to(dtype)
            sig = torch.sigmoid(zf)
            out_y = y if D is None else y + uf * D.to(dtype)[:, None]
            grads["z"] = (dout * out_y * sig * (1 + zf * (1 - sig))).to(z.dtype)
            dout = dout * zf * sig
        du_total = None if D is None else dout * D.to(dtype)[:, None]
        if D is not None:
            grads["D"] = (dout * uf).sum((0, 2)).to(D.dtype)
        pre = delta.to(dtype) if delta_bias is None else delta.to(dtype) + delta_bias.to(dtype)[:, None]
        dt = (F.softplus(pre) if delta_softplus else pre).permute(2, 0, 1).contiguous()
        ut = uf.permute(2, 0, 1).contiguous()
        dvt = dt * ut
        dyt = dout.permute(2, 0, 1).contiguous()
        Af = A.to(dtype)
        Bx, Cx = _time_major(B, gs, d, dtype), _time_major(C, gs, d, dtype)
        dlast = None if dlast is None else dlast.to(dtype)
        ddt = torch.empty(l, b, d, dtype=dtype, device=u.device)
        dut = torch.empty(l, b, d, dtype=dtype, device=u.device)
        dA = torch.zeros_like(Af)
        dBx = torch.zeros(Bx.shape[0], Bx.shape[1] if Bx.shape[1] == 1 else b, gs, n, dtype=dtype, device=u.device)
        dCx = torch.zeros(Cx.shape[0], Cx.shape[1] if Cx.shape[1] == 1 else b, gs, n, dtype=dtype, device=u.device)
        hs = d // gs
        size, blocks = _blocks(b, l * d * n)
        work = _Workspace(3, l * size * d * n, dt)
        for blk in blocks:
            bb = blk.stop - blk.start
            decay, X, G = work.views(l, bb, gs, hs, n)
            dt_b, ut_b, dv_b = dt[:, blk], ut[:, blk], dvt[:, blk]
            dy5 = dyt[:, blk].reshape(l, bb, gs, hs)
            Bb, Cb = _bx(Bx, blk), _bx(Cx, blk)
            _block_states(decay, X, dt_b, dv_b, Af, Bb)
            _accumulate(dCx, blk, _dot_h(X, dy5))
            torch.mul(dy5.unsqueeze(-1), Cb, out=G)  # d loss / d x_t, accumulated backwards through the recurrence
            if dlast is not None and l > 0:
                G[-1] += dlast[blk].reshape(bb, gs, hs, n)
            for t in range(l - 2, -1, -1):
                G[t].addcmul_(decay[t + 1], G[t + 1])
            _accumulate(dBx, blk, _dot_h(G, dv_b.reshape(l, bb, gs, hs)))
            ddv = _dot_n(G, Bb).reshape(l, bb, d)  # d loss / d (dt * u)
            ddt_b = ddv * ut_b
            dut[:, blk] = ddv * dt_b
            if l > 1:  # d loss / d (dt A) at t >= 1: G_t * x_{t-1} * exp(dt_t A)
                W = G[1:].mul_(X[:-1]).mul_(decay[1:]).view(l - 1, bb, d, n)
                tmp = X[1:].view(l - 1, bb, d, n)  # X is no longer needed: reuse it
                ddt_b[1:] += torch.mul(W, Af, out=tmp).sum(-1)
                dA += torch.mul(W, dt_b[1:, :, :, None], out=tmp).sum((0, 1))
            ddt[:, blk] = ddt_b
        du_scan = dut.permute(1, 2, 0)
        du_total = du_scan if du_total is None else du_total + du_scan
        ddelta = ddt.permute(1, 2, 0)
        if delta_softplus:
            ddelta = ddelta * torch.sigmoid(pre)
        grads.update(
            u=du_total.to(u.dtype), delta=ddelta.to(delta.dtype), A=dA.to(A.dtype),
            B=_from_time_major(dBx, B).to(B.dtype), C=_from_time_major(dCx, C).to(C.dtype),
        )
        if delta_bias is not None:
            grads["delta_bias"] = ddelta.sum((0, 2)).to(delta_bias.dtype)
        g = grads
        return g["u"], g["delta"], g["A"], g["B"], g["C"], g["D"], g["z"], g["delta_bias"], None, None, None


def _accumulate(total: Tensor, blk: slice, part: Tensor) -> None:
    """Add a block's B/C gradient ``(l, bb, gs, n)`` into ``total`` (summing over broadcast dims)."""
    if total.shape[0] == 1 and part.shape[0] != 1:
        part = part.sum(0, keepdim=True)
    if total.shape[1] == 1:
        total += part.sum(1, keepdim=True)
    else:
        total[:, blk] += part


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
    """The pure-PyTorch selective scan with a hand-written backward (any device)."""
    gb, gc = _check(u, delta, A, B, C, D, z, delta_bias)
    gs = max(gb, gc)
    args = (u, delta, A, B, C, D, z, delta_bias)
    if _cpp.needs_grad(*args):
        return _SelectiveScanTorch.apply(*args, bool(delta_softplus), bool(return_last_state), gs)
    y, last = _torch_states(u, delta, A, B, C, delta_bias, delta_softplus, return_last_state, gs)
    out = _finish(y, u, D, z, inplace=True)
    return (out, last) if return_last_state else out


# -- mamba-ssm's CUDA kernel ---------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _cuda_kernel_available() -> bool:
    return available("selective_scan_cuda")


def _cuda_kernel():
    import torch  # noqa: F401  (the extension needs torch's libraries loaded first)

    return require("selective_scan_cuda", "dmmh's CUDA selective scan (backend='cuda')")


class _SelectiveScanCUDA(torch.autograd.Function):
    """mamba-ssm's ``selective_scan_cuda.fwd/bwd``, called as mamba-ssm's own ``SelectiveScanFn`` does."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        kernel = _cuda_kernel()
        u, delta, B, C = (t if t.stride(-1) == 1 else t.contiguous() for t in (u, delta, B, C))
        if z is not None and z.stride(-1) != 1:
            z = z.contiguous()
        D = None if D is None else D.float().contiguous()
        delta_bias = None if delta_bias is None else delta_bias.float().contiguous()
        ctx.squeeze = (B.ndim == 3, C.ndim == 3)
        B = B.unsqueeze(1) if B.ndim == 3 else B
        C = C.unsqueeze(1) if C.ndim == 3 else C
        out, x, *rest = kernel.fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        ctx.delta_softplus = delta_softplus
        ctx.has_z = z is not None
        last_state = x[:, :, -1, 1::2]
        if z is None:
            ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, x)
        else:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, x, out)
            out = rest[0]
        if return_last_state:
            ctx.mark_non_differentiable(last_state)
            return out, last_state
        return out

    @staticmethod
    def backward(ctx, dout, *_):
        kernel = _cuda_kernel()
        if ctx.has_z:
            u, delta, A, B, C, D, z, delta_bias, x, out = ctx.saved_tensors
        else:
            (u, delta, A, B, C, D, delta_bias, x), z, out = ctx.saved_tensors, None, None
        dout = dout if dout.stride(-1) == 1 else dout.contiguous()
        du, ddelta, dA, dB, dC, dD, ddelta_bias, *rest = kernel.bwd(
            u, delta, A, B, C, D, z, delta_bias, dout, x, out, None, ctx.delta_softplus, False
        )
        dB = dB.squeeze(1) if ctx.squeeze[0] else dB
        dC = dC.squeeze(1) if ctx.squeeze[1] else dC
        dz = rest[0] if ctx.has_z else None
        return (du, ddelta, dA, dB, dC, dD if D is not None else None, dz,
                ddelta_bias if delta_bias is not None else None, None, None)


def selective_scan_cuda(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
    """mamba-ssm's CUDA kernel (needs ``mamba-ssm`` and CUDA tensors). No gradient flows through the last state."""
    _check(u, delta, A, B, C, D, z, delta_bias)
    resolve_backend("cuda", u)
    return _SelectiveScanCUDA.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), bool(return_last_state))
