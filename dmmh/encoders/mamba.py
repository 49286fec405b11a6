"""``mamba``: feature vector → MLP → T tokens (+ positions) → Mamba layers (DMMH steps 1–3).

:class:`Mamba` has exactly the parameters (names, shapes, initialisation) of mamba-ssm's
``mamba_ssm.modules.mamba_simple.Mamba``, so state dicts load in either direction; its selective scan
runs on any backend of :func:`dmmh.ops.selective_scan_fn`. With ``bidirectional=True`` it adds a
second scan over the reversed sequence with its own ``A_b_log, D_b, conv1d_b, x_proj_b, dt_proj_b``
(Vision Mamba's "v2" names; ``in_proj`` and ``out_proj`` are shared) and averages the two directions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dmmh._passes import Dropout
from dmmh.encoders.base import Encoder, TokenExpansion, mlp
from dmmh.ops.causal_conv1d import causal_conv1d_fn
from dmmh.ops.selective_scan import BACKENDS, selective_scan_fn
from dmmh.registry import ENCODERS

__all__ = ["Mamba", "MambaEncoder"]


class _Direction(nn.Module):
    """Per-direction parameters: conv, x/dt projections, A and D. Registered under the names mamba-ssm uses."""

    def __init__(self, d_inner, d_state, d_conv, dt_rank, dt_min, dt_max, dt_init, dt_scale, dt_init_floor, conv_bias):
        super().__init__()
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        std = dt_rank**-0.5 * dt_scale  # mamba-ssm: keep the variance of dt_proj's output at init
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, std)
        elif dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -std, std)
        else:
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        # softplus(dt_proj.bias) log-uniform in [dt_min, dt_max] (inverse softplus of the sample)
        dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.bias._no_reinit = True
        # S4D-real initialisation: A = -(1, 2, ..., d_state) for every channel, kept as log in fp32
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(d_inner))
        self.D._no_weight_decay = True


class Mamba(nn.Module):
    """A Mamba (S6) block over ``(batch, length, d_model)``, parameter-compatible with mamba-ssm.

    Args mirror ``mamba_ssm.modules.mamba_simple.Mamba`` (``d_state=16, d_conv=4, expand=2,
    dt_rank="auto"`` = ``ceil(d_model / 16)``, ``dt_min, dt_max, dt_init, dt_scale, dt_init_floor,
    conv_bias, bias``), plus ``bidirectional`` (see the module docstring) and ``backend`` (the selective
    scan backend: ``"auto" | "ref" | "cpu" | "torch" | "cuda"``; the convolution uses the C++ kernel with
    ``"auto"`` and ``"cpu"``, else ``F.conv1d``).
    """

    def __init__(
        self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: float = 2, dt_rank: int | str = "auto",
        dt_min: float = 0.001, dt_max: float = 0.1, dt_init: str = "random", dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False, bidirectional: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if d_model < 1 or d_state < 1 or d_conv < 1:
            raise ValueError(f"d_model, d_state and d_conv must be >= 1, got {d_model}, {d_state}, {d_conv}")
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.bidirectional, self.backend = bool(bidirectional), backend
        direction = (self.d_inner, d_state, d_conv, self.dt_rank, dt_min, dt_max, dt_init, dt_scale, dt_init_floor, conv_bias)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        fwd = _Direction(*direction)
        # mamba-ssm's order of registration, so that state_dict() lists keys in the same order
        self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D = fwd.conv1d, fwd.x_proj, fwd.dt_proj, fwd.A_log, fwd.D
        if self.bidirectional:
            bwd = _Direction(*direction)
            self.conv1d_b, self.x_proj_b, self.dt_proj_b = bwd.conv1d, bwd.x_proj, bwd.dt_proj
            self.A_b_log, self.D_b = bwd.A_log, bwd.D  # Vim spells it A_b_log, not A_log_b
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def _scan(self, suffix: str, x: Tensor, z: Tensor) -> Tensor:
        """One direction: ``x, z (b, l, d_inner)`` → ``y (b, d_inner, l)``.

        Activations stay in the ``(b, l, channels)`` layout the Linear layers produce; the convolution and
        the scan take transposed views of them (channels contiguous), so no layer copies or transposes.
        """
        conv, x_proj, dt_proj = (getattr(self, k + suffix) for k in ("conv1d", "x_proj", "dt_proj"))
        u = causal_conv1d_fn(x.transpose(1, 2), conv.weight[:, 0], conv.bias, "silu", backend=self._conv_backend)
        dt, B, C = torch.split(x_proj(u.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        A = -torch.exp(_fp32(self.A_b_log if suffix else self.A_log))
        # dt_proj's product is taken by the scan (fused in the C++ kernel's inference path), its bias added there
        return selective_scan_fn(
            u, dt.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), _fp32(getattr(self, "D" + suffix)),
            z=z.transpose(1, 2), delta_bias=_fp32(dt_proj.bias), delta_softplus=True, backend=self.backend,
            delta_proj=dt_proj.weight,
        )

    def forward(self, hidden_states: Tensor) -> Tensor:
        """``(batch, length, d_model)`` → same shape."""
        if hidden_states.ndim != 3 or hidden_states.shape[-1] != self.d_model:
            raise ValueError(f"Mamba: expected input (batch, length, {self.d_model}), got {tuple(hidden_states.shape)}")
        x, z = self.in_proj(hidden_states).chunk(2, dim=-1)  # (b, l, d_inner) each
        y = self._scan("", x, z)
        if self.bidirectional:
            y = 0.5 * (y + self._scan("_b", x.flip(1), z.flip(1)).flip(-1))
        return self.out_proj(y.transpose(1, 2))

    @property
    def _conv_backend(self) -> str:
        """The convolution's backend: the C++ kernel where the scan may use the C++ kernel, else the reference."""
        return {"auto": "auto", "cpu": "cpu"}.get(self.backend, "ref")


def _fp32(t: Tensor) -> Tensor:
    """The scan's parameters in float32 at least (as mamba-ssm keeps them), float64 left as it is."""
    return t if t.dtype == torch.float64 else t.float()


@ENCODERS.register("mamba")
class MambaEncoder(Encoder):
    """``features → MLP(hidden) → dim → T tokens (+ positions) → depth × (x + Mamba(LayerNorm(x))) → LayerNorm``.

    Args:
        in_dim: width of the input features.
        dim: token width (Mamba's ``d_model``).
        num_tokens: tokens ``T`` (the model passes ``n_bits`` by default, as in BSTH).
        depth: number of Mamba layers (pre-norm residual blocks).
        d_state, d_conv, expand: Mamba sizes (mamba-ssm's defaults).
        bidirectional: also scan each sequence reversed (see :class:`Mamba`).
        hidden: widths of the projection MLP's hidden layers.
        dropout: dropout in the projection MLP and after each Mamba layer.
        backend: selective scan backend (``"auto"`` picks mamba-ssm's kernel on CUDA when installed).
    """

    def __init__(
        self, in_dim: int, dim: int = 128, num_tokens: int = 16, depth: int = 1, d_state: int = 16, d_conv: int = 4,
        expand: float = 2, bidirectional: bool = False, hidden: tuple[int, ...] = (512,), dropout: float = 0.1,
        backend: str = "auto",
    ):
        super().__init__(in_dim, dim, num_tokens)
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.proj = nn.Sequential(mlp(in_dim, list(hidden), dim, dropout), nn.ReLU(inplace=True))
        self.expand = TokenExpansion(dim, num_tokens)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.layers = nn.ModuleList(
            Mamba(dim, d_state=d_state, d_conv=d_conv, expand=expand, bidirectional=bidirectional, backend=backend)
            for _ in range(depth)
        )
        self.drop = Dropout(dropout) if dropout > 0 else nn.Identity()
        self.norm_out = nn.LayerNorm(dim)

    def encode_tokens(self, x: Tensor) -> Tensor:
        tokens = self.expand(self.proj(x))
        for norm, layer in zip(self.norms, self.layers):
            tokens = tokens + self.drop(layer(norm(tokens)))
        return self.norm_out(tokens)
