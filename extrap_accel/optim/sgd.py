"""extrap-SGD (Lin et al. 2020, Algorithm 1) and the unified extrapolation framework."""

from __future__ import annotations

import functools
import itertools
import threading
import types
from typing import Any, ClassVar

import torch
from torch import Tensor

from .base import ExtrapOptimizer

__all__ = ["ExtrapSGD", "extrap_sgd"]


class ExtrapSGD(ExtrapOptimizer):
    r"""SGD with (Nesterov) momentum whose gradients are taken at extrapolated points.

    .. math::
       \begin{aligned}
         &\textbf{input}: \gamma_t \text{ (lr)}, m \text{ (momentum)}, \lambda
            \text{ (weight\_decay)}, \delta \text{ (dampening)}, \tilde m
            \text{ (extrap\_momentum, default } m),
            \tilde\gamma_t = c\,\gamma_t/K \text{ (extrap\_scale } c \text{) or extrap\_lr} \\
         &\textbf{initialize}: d_0 = 0;\; u_1 = h_0,\; \tilde u^k_1 = \hat h^k_0
            \text{ (undamped, as torch)};\; \textit{maximize}: g, g^k \leftarrow -g, -g^k \\
         &\textbf{for}\: t = 0, 1, \dots \textbf{ on worker } k: \\
         &\quad \tilde x^k_t = x_t - \tilde\gamma_{t-1} d^k_t
            \qquad\text{(what the parameters hold between steps)} \\
         &\quad g^k_t = \nabla f_{B^k_t}(\tilde x^k_t),\quad g_t = \tfrac1K\textstyle\sum_k g^k_t
            \qquad\text{(the usual all-reduce)} \\
         &\quad h_t = g_t + \lambda x_t,\; u_{t+1} = m u_t + (1-\delta) h_t,\;
            x_{t+1} = x_t - \gamma_t (h_t + m u_{t+1}) \quad
            (\text{heavy ball: } x_t - \gamma_t u_{t+1}) \\
         &\quad \hat h^k_t = g^k_t + \lambda x_{t+1},\; \tilde u^k_{t+1} = \tilde m \tilde u^k_t
            + (1-\delta) \hat h^k_t,\; d^k_{t+1} = \hat h^k_t + \tilde m \tilde u^k_{t+1}
            \quad (\text{heavy ball: } \tilde u^k_{t+1}) \\
         &\textbf{return}\: x_t \text{ (the anchor: } \texttt{optimizer.eval()}
            \text{ or } \texttt{extrap\_accel.attach)}
       \end{aligned}

    With ``extrapolation`` other than ``"past"`` the displacement x̃ − x is instead Gaussian or
    uniform noise of scale ``noise_scale`` (per coordinate, or per filter with ``filterwise``),
    ``"stochastic"``: −γ̃(gᵏ − g), or ``"fresh"``: −γ̃∇f(x) from an extra closure call.
    The paper's symbols: γ = ``lr``, γ̃ = ``extrap_lr``, m = ``momentum``, λ = ``weight_decay``.

    A drop-in for ``torch.optim.SGD``: the same arguments in the same order with the same
    defaults, and ``extrap_scale = 0`` is exactly ``torch.optim.SGD``. torch's options act on
    the local direction d as on the base update: ``maximize`` negates g and every gᵏ;
    ``dampening`` δ gives u ← m·u + (1−δ)·h and ũ ← m̃·ũ + (1−δ)·ĥ (both buffers start undamped,
    as torch's). A tensor ``lr`` is used as torch uses it; complex parameters are stepped as
    torch steps them. ``fused=True`` and ``differentiable=True`` are refused (ValueError), as
    are sparse gradients (torch's SGD takes them).

    ``compile_direction=True`` (keyword-only, for the whole optimizer; default False) computes
    the local direction of the foreach path in one ``torch.compile``d pass (inductor) that reads
    gᵏ, x, ũ and writes ũ and x̃, instead of several foreach operations: about 1.5× torch's
    foreach SGD step instead of 1.8× on ResNet-20's 59 small tensors (docs/benchmarks.md). The
    base update stays torch's operations (I1 is bit for bit); the direction agrees with the eager
    one to rounding (~1e-7), not bit for bit. The first step that uses it compiles (seconds),
    once per list of shapes and dtypes (a param group) and per ``nesterov``; lr, γ̃, the clipping
    factor and the other hyperparameters are data, so a schedule does not recompile. It needs
    torch.compile (RuntimeError otherwise) and the foreach path (ValueError with
    ``foreach=False``); the step that creates ũ, the tensors of 1 MiB and more on CPU (the
    per-tensor kernels) and the DeepSpeed/FSDP2 placement (``local_direction_``) run eagerly.
    Only measured on CPU.

    Between steps the parameters hold x̃; call ``optimizer.eval()`` before evaluating or saving
    and ``optimizer.train()`` after, or ``extrap_accel.attach(model, optimizer)`` once.
    The hyperparameters and extrapolation settings live in the param groups.
    """

    _local_state_keys = ("extrap_momentum_buffer",)
    _group_keys_since_0_1: ClassVar[dict[str, Any]] = {
        "dampening": 0.0, "maximize": False, "foreach": None, "differentiable": False,
        "fused": None,
    }  # fmt: skip

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float | Tensor = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        extrap_scale: float = 1.0,
        extrap_lr: float | None = None,
        extrap_momentum: float | None = None,
        extrap_max_norm: float | None = None,
        extrapolation: str = "past",
        noise_scale: float | None = None,
        filterwise: bool = False,
        seed: int = 0,
        world_size: int | None = None,
        compile_direction: bool = False,
    ):
        if not isinstance(compile_direction, bool):
            raise TypeError(f"compile_direction must be a bool, got {compile_direction!r}")
        if compile_direction and not _dynamo_supported():
            raise RuntimeError(
                "compile_direction=True needs torch.compile, which this Python/torch build does "
                "not support: leave compile_direction=False"
            )
        self._compile_direction = compile_direction
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
            differentiable=differentiable,
            fused=fused,
            extrap_scale=extrap_scale,
            extrap_lr=extrap_lr,
            extrap_momentum=extrap_momentum,
            extrap_max_norm=extrap_max_norm,
            extrapolation=extrapolation,
            noise_scale=noise_scale,
            filterwise=filterwise,
        )
        super().__init__(params, defaults, seed=seed, world_size=world_size)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["compile_direction"] = self._compile_direction
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "compile_direction" in state:  # a copy; not torch's load_state_dict, which keeps it
            self._compile_direction = state.pop("compile_direction")
        super().__setstate__(state)

    def _check_group(self, group: dict[str, Any]) -> None:
        momentum, extrap_momentum = group["momentum"], group["extrap_momentum"]
        if not momentum >= 0:
            raise ValueError(f"Invalid momentum value: {momentum} (must be >= 0)")
        if extrap_momentum is not None and not extrap_momentum >= 0:
            raise ValueError(f"Invalid extrap_momentum value: {extrap_momentum} (must be >= 0)")
        if group["nesterov"] and (momentum <= 0 or group["dampening"] != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        if getattr(self, "_compile_direction", False) and group["foreach"] is False:
            raise ValueError(
                "compile_direction=True fuses the foreach path's direction: a group with "
                "foreach=False cannot use it; give foreach=None/True or compile_direction=False"
            )
        super()._check_group(group)

    def _step_group(self, group: dict[str, Any], local_coef: float) -> None:
        params = self._params_with_grad(group)
        if not params:
            return
        variant = group["extrapolation"]
        anchors, grads, local_grads, bufs, extrap_bufs = [], [], [], [], []
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError(
                    "ExtrapSGD does not support sparse gradients (torch.optim.SGD does): use "
                    "dense gradients, e.g. nn.Embedding(sparse=False)"
                )
            state = self.state[p]
            anchors.append(self.core.ensure_anchor(p))
            grads.append(p.grad)
            local_grads.append(self.local_grad(p))
            bufs.append(state.get("momentum_buffer"))
            extrap_bufs.append(state.get("extrap_momentum_buffer"))
        lr = group["lr"]
        gamma = self.extrap_lr(group, float(lr))
        extrap_momentum = group["extrap_momentum"]
        if extrap_momentum is None:
            extrap_momentum = group["momentum"]
        extrap_sgd(
            [p.data for p in params],
            anchors,
            grads,
            local_grads,
            bufs,
            extrap_bufs,
            lr=lr,
            extrap_lr=gamma,
            momentum=group["momentum"],
            extrap_momentum=extrap_momentum,
            dampening=group["dampening"],
            weight_decay=group["weight_decay"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
            local_coef=local_coef,
            direction=variant == "past",
            foreach=group["foreach"],
            compile_direction=getattr(self, "_compile_direction", False),
        )
        for p, buf, extrap_buf in zip(params, bufs, extrap_bufs):
            if buf is not None:
                self.state[p]["momentum_buffer"] = buf
            if extrap_buf is not None:
                self.state[p]["extrap_momentum_buffer"] = extrap_buf
        if variant != "past":
            self._place_variant(group, params, anchors, local_grads)

    def _base_update(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """torch.optim.SGD's update of ``params`` in place (they are the anchors: DeepSpeed)."""
        bufs = [self.state[p].get("momentum_buffer") for p in params]
        grads = [p.grad for p in params]
        extrap_sgd(
            [torch.empty_like(p) for p in params],  # scratch
            [p.data for p in params], grads, grads, bufs, [None] * len(params),
            lr=group["lr"], extrap_lr=0.0, momentum=group["momentum"], extrap_momentum=0.0,
            dampening=group["dampening"], weight_decay=group["weight_decay"],
            nesterov=group["nesterov"], maximize=group["maximize"], direction=False,
            foreach=group["foreach"],
        )  # fmt: skip
        for p, buf in zip(params, bufs):
            if buf is not None:
                self.state[p]["momentum_buffer"] = buf

    @classmethod
    def local_direction_(cls, group, out: Tensor, x: Tensor, gk: Tensor, state: dict,
                         *, local_coef: float, extrap_lr: float) -> None:  # fmt: skip
        """out = x − γ̃·d for one tensor from its local gradient and local ``state``."""
        momentum = group["extrap_momentum"]
        if momentum is None:
            momentum = group["momentum"]
        ubuf, first = None, False
        if momentum != 0:
            ubuf = state.get("extrap_momentum_buffer")
            if ubuf is None:
                ubuf = state["extrap_momentum_buffer"] = torch.empty_like(x)
                first = True
        _sgd_direction_(
            out, x, gk, ubuf, coef=-local_coef if group["maximize"] else local_coef,
            weight_decay=group["weight_decay"], momentum=momentum, dampening=group["dampening"],
            nesterov=group["nesterov"], extrap_lr=extrap_lr, first=first,
        )  # fmt: skip


def extrap_sgd(
    params: list[Tensor],
    anchors: list[Tensor],
    grads: list[Tensor],
    local_grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    extrap_buffers: list[Tensor | None],
    *,
    lr: float | Tensor,
    extrap_lr: float,
    momentum: float,
    extrap_momentum: float,
    weight_decay: float | Tensor,
    nesterov: bool,
    dampening: float = 0.0,
    maximize: bool = False,
    local_coef: float = 1.0,
    direction: bool = True,
    foreach: bool | None = None,
    compile_direction: bool = False,
) -> None:
    """Functional extrap-SGD step: see :class:`ExtrapSGD` for the math.

    Updates ``anchors`` (x) with the averaged ``grads`` exactly as ``torch.optim.SGD`` would
    update the parameters, then (``direction=True``) writes x̃ = x − γ̃·d into ``params`` from
    ``local_grads`` (scaled by ``local_coef``, the local clipping factor). Buffers that are
    None are created and stored back into the two buffer lists. ``maximize`` negates g and gᵏ;
    ``dampening`` damps both momentum buffers. ``compile_direction`` computes the direction of
    the foreach path in one ``torch.compile``d pass (see :class:`ExtrapSGD`).
    """
    if foreach is False:
        if compile_direction:
            raise ValueError("compile_direction=True needs the foreach path (foreach=None/True)")
        kernel = _single_tensor_extrap_sgd
    else:
        kernel = functools.partial(_multi_tensor_extrap_sgd, compile_direction=compile_direction)
    kernel(
        params,
        anchors,
        grads,
        local_grads,
        momentum_buffers,
        extrap_buffers,
        lr=lr,
        extrap_lr=extrap_lr,
        momentum=momentum,
        extrap_momentum=extrap_momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
        maximize=maximize,
        local_coef=local_coef,
        direction=direction,
    )


def _single_tensor_extrap_sgd(
    params, anchors, grads, local_grads, momentum_buffers, extrap_buffers, *, lr, extrap_lr,
    momentum, extrap_momentum, dampening, weight_decay, nesterov, maximize, local_coef, direction,
):  # fmt: skip
    # The parameter p holds x̃_t, which is dead once the gradients exist: temporaries go into p.
    coef = -local_coef if maximize else local_coef  # maximize: ĥ from −gᵏ
    for i, (p, x, g, gk) in enumerate(zip(params, anchors, grads, local_grads)):
        # Base update at the anchor, torch.optim.SGD's operations in its order (bitwise equal).
        if maximize:
            h = torch.neg(g, out=p)
            if weight_decay != 0:
                h.add_(x, alpha=weight_decay)
        else:
            h = g if weight_decay == 0 else torch.add(g, x, alpha=weight_decay, out=p)
        if momentum != 0:
            buf = momentum_buffers[i]
            if buf is None:
                buf = momentum_buffers[i] = h.detach().clone()
            else:
                buf.mul_(momentum).add_(h, alpha=1 - dampening)
            h = torch.add(h, buf, alpha=momentum, out=p) if nesterov else buf
        x.add_(h, alpha=-lr)
        if not direction:
            continue
        # Local direction from the new anchor, one cache-sized chunk at a time (CPU).
        ubuf, first = None, False
        if extrap_momentum != 0:
            ubuf = extrap_buffers[i]
            if ubuf is None:
                ubuf = extrap_buffers[i] = torch.empty_like(x)
                first = True
        tensors = (p, x, gk) if ubuf is None else (p, x, gk, ubuf)
        for chunk in _chunks(tensors):
            _sgd_direction_(
                *chunk, coef=coef, weight_decay=weight_decay, momentum=extrap_momentum,
                dampening=dampening, nesterov=nesterov, extrap_lr=extrap_lr, first=first,
            )  # fmt: skip


def _sgd_direction_(
    p, x, gk, ubuf=None, *, coef, weight_decay, momentum, dampening, nesterov, extrap_lr, first
):
    """p ← x − γ̃·d:  ĥ = c·gᵏ + λx,  ũ ← m̃ũ + (1−δ)ĥ (ũ = ĥ at first),  d = ĥ + m̃ũ
    (heavy ball: d = ũ). c carries the local clipping factor and the sign of ``maximize``.

    One tensor or one chunk; p is the scratch (it may be overwritten before it is read).
    """
    if coef != 1.0:
        hk = torch.mul(gk, coef, out=p)
        if weight_decay != 0:
            hk.add_(x, alpha=weight_decay)
    elif weight_decay != 0:
        hk = torch.add(gk, x, alpha=weight_decay, out=p)
    else:
        hk = gk
    d = hk
    if ubuf is not None:
        if first:
            ubuf.copy_(hk)
        elif dampening == 0:
            torch.add(hk, ubuf, alpha=momentum, out=ubuf)
        else:
            ubuf.mul_(momentum).add_(hk, alpha=1 - dampening)
        if extrap_lr != 0:
            d = torch.add(hk, ubuf, alpha=momentum, out=p) if nesterov else ubuf
    if extrap_lr == 0:
        p.copy_(x)
    else:
        torch.add(x, d, alpha=-extrap_lr, out=p)


def _multi_tensor_extrap_sgd(
    params, anchors, grads, local_grads, momentum_buffers, extrap_buffers, *, lr, extrap_lr,
    momentum, extrap_momentum, dampening, weight_decay, nesterov, maximize, local_coef, direction,
    compile_direction=False,
):  # fmt: skip
    kw = dict(
        lr=lr, extrap_lr=extrap_lr, momentum=momentum, extrap_momentum=extrap_momentum,
        dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
        local_coef=local_coef, direction=direction,
    )  # fmt: skip
    for idx in _group_by_device_and_dtype(anchors):
        large, idx = _split_large(anchors, idx)
        if large:  # CPU: finish each large tensor while it is in cache (see _split_large)
            lists = [[t[i] for i in large] for t in (momentum_buffers, extrap_buffers)]
            _single_tensor_extrap_sgd(
                *([t[i] for i in large] for t in (params, anchors, grads, local_grads)),
                *lists,
                **kw,
            )  # fmt: skip
            for j, i in enumerate(large):
                momentum_buffers[i], extrap_buffers[i] = lists[0][j], lists[1][j]
        if idx:
            _foreach_extrap_sgd(
                params, anchors, grads, local_grads, momentum_buffers, extrap_buffers, idx, **kw,
                compile_direction=compile_direction,
            )  # fmt: skip


def _foreach_extrap_sgd(
    params, anchors, grads, local_grads, momentum_buffers, extrap_buffers, idx, *, lr, extrap_lr,
    momentum, extrap_momentum, dampening, weight_decay, nesterov, maximize, local_coef, direction,
    compile_direction=False,
):  # fmt: skip
    P = [params[i] for i in idx]
    X = [anchors[i] for i in idx]
    G = [grads[i] for i in idx]
    # Base update at the anchor, in torch.optim.SGD's foreach order (bitwise equal).
    if maximize:
        H = torch._foreach_neg(G)
        if weight_decay != 0:
            torch._foreach_add_(H, X, alpha=weight_decay)
    else:
        H = G if weight_decay == 0 else torch._foreach_add(G, X, alpha=weight_decay)
    if momentum != 0:
        bufs = _update_buffers(momentum_buffers, idx, H, momentum, dampening)
        if nesterov and H is G:
            # torch adds in place into the gradients; g stays intact for the local step.
            H = torch._foreach_add(G, bufs, alpha=momentum)
        elif nesterov:
            torch._foreach_add_(H, bufs, alpha=momentum)
        else:
            H = bufs
    torch._foreach_add_(X, H, alpha=-lr)
    del H
    if not direction:
        return
    # Local direction from the new anchor; the parameters (x̃_t is dead) serve as the scratch.
    Gk = [local_grads[i] for i in idx]
    U, first = None, False
    if extrap_momentum != 0:
        U = [extrap_buffers[i] for i in idx]
        if any(u is None for u in U):
            if not all(u is None for u in U):  # a partial state: restart ũ where missing
                for j, i in enumerate(idx):
                    if U[j] is None:
                        U[j] = extrap_buffers[i] = torch.zeros_like(X[j])
            else:
                U = [torch.empty_like(x) for x in X]
                for i, u in zip(idx, U):
                    extrap_buffers[i] = u
                first = True
    coef = -local_coef if maximize else local_coef
    if compile_direction and not first and extrap_lr != 0:
        _compiled_sgd_direction_(
            P, X, Gk, U, coef=coef, weight_decay=weight_decay, momentum=extrap_momentum,
            dampening=dampening, nesterov=nesterov, extrap_lr=extrap_lr,
        )  # fmt: skip
        return
    lists = (P, X, Gk) if U is None else (P, X, Gk, U)
    for batch in _batches(lists):
        _foreach_sgd_direction_(
            *batch, coef=-local_coef if maximize else local_coef, weight_decay=weight_decay,
            momentum=extrap_momentum, dampening=dampening, nesterov=nesterov,
            extrap_lr=extrap_lr, first=first,
        )  # fmt: skip


def _foreach_sgd_direction_(
    P, X, Gk, U=None, *, coef, weight_decay, momentum, dampening, nesterov, extrap_lr, first
):
    """Foreach form of :func:`_sgd_direction_`: in-place operations only, P as the scratch."""
    Hk = Gk
    if coef != 1.0 or weight_decay != 0:
        Hk = P
        torch._foreach_copy_(P, Gk)
        if coef != 1.0:
            _foreach_scale_(P, coef)
        if weight_decay != 0:
            torch._foreach_add_(P, X, alpha=weight_decay)
    if U is not None:
        if first:
            torch._foreach_copy_(U, Hk)
        else:
            _foreach_scale_(U, momentum)
            torch._foreach_add_(U, Hk, alpha=1 - dampening)
    if extrap_lr == 0:
        torch._foreach_copy_(P, X)
        return
    if Hk is P:  # P = ĥ:  d = ĥ + m̃ũ (or ũ) in P, then P = x − γ̃·d
        if U is not None and nesterov:
            torch._foreach_add_(P, U, alpha=momentum)
        elif U is not None:
            torch._foreach_copy_(P, U)
        _foreach_scale_(P, -extrap_lr)
        torch._foreach_add_(P, X)
        return
    # ĥ = gᵏ:  P = x − γ̃·gᵏ − γ̃m̃·ũ (heavy ball: x − γ̃·ũ)
    torch._foreach_copy_(P, X)
    if U is None or nesterov:
        torch._foreach_add_(P, Gk, alpha=-extrap_lr)
    if U is not None:
        torch._foreach_add_(P, U, alpha=-extrap_lr * momentum if nesterov else -extrap_lr)


def _direction_math(P, X, Gk, U, scalars, nesterov: bool) -> None:
    """The traced body of the compiled direction: one fused pass over all tensors.

    ``scalars`` = [c, λ, m̃, 1 − δ, γ̃] as one float64 tensor, so a new learning rate or clipping
    factor is new data, not a recompile; ``U`` is empty without local momentum.
    """
    c, wd, m, damp, gamma = (scalars[i] for i in range(5))
    for j, (p, x, g) in enumerate(zip(P, X, Gk)):
        h = g * c + x * wd
        if U:
            u = U[j] * m + h * damp
            U[j].copy_(u)
            h = h + u * m if nesterov else u
        p.copy_(x - h * gamma)


_COMPILED: dict[tuple, Any] = {}
_THREAD = threading.local()  # each thread's CPU scalars tensor (optimizers stepped in threads)


def _compiled_sgd_direction_(
    P, X, Gk, U=None, *, coef, weight_decay, momentum, dampening, nesterov, extrap_lr
):
    """:func:`_foreach_sgd_direction_` (not its first step) as one ``torch.compile``d kernel.

    dynamic=False: one compile per list of shapes/dtypes (a param group) and ``nesterov``; the
    hyperparameters are a tensor, so schedules do not recompile. Within rounding of the eager
    direction (not bit for bit: the fused kernel rounds in its own order).
    """
    # torch.compile caches per code object, at most recompile_limit (8) graphs, and fails
    # beyond it (fullgraph): each list (told apart by its length and end shapes) gets its own
    # copy of the code, hence its own cache (a functools.partial would share dynamo's wrapper).
    key = (nesterov, U is None, len(X), X[0].shape, X[-1].shape, X[0].dtype, X[0].device)
    fn = _COMPILED.get(key)
    if fn is None:
        body = types.FunctionType(_direction_math.__code__.replace(), _direction_math.__globals__)
        fn = _COMPILED[key] = torch.compile(
            body,
            dynamic=False,
            fullgraph=True,
            options={"size_asserts": False, "alignment_asserts": False},  # dynamo guards them
        )
    values = (coef, float(weight_decay), momentum, 1.0 - dampening, extrap_lr)
    if X[0].is_cpu:  # one CPU tensor per thread, rewritten in place: read before returning
        scalars = getattr(_THREAD, "scalars", None)
        if scalars is None:
            scalars = _THREAD.scalars = torch.zeros(5, dtype=torch.float64)
        scalars.numpy()[:] = values
    else:
        scalars = torch.tensor(values, dtype=torch.float64, device=X[0].device)
    fn(P, X, Gk, U or [], scalars, nesterov)


def _dynamo_supported() -> bool:
    try:
        from torch._dynamo.eval_frame import is_dynamo_supported
    except ImportError:
        return False
    return bool(is_dynamo_supported())


def _foreach_scale_(tensors: list[Tensor], value: float | list[float]) -> None:
    """``torch._foreach_mul_(tensors, value)`` (one number, or one per tensor), faster on CPU.

    torch's CPU foreach path spends six operator calls per tensor on a Python number (it wraps
    and converts it for every tensor) but one on a 0-dim tensor of the tensors' dtype. For
    float32 and float64 the product is the same bit for bit (the number is rounded to that
    dtype either way); bf16 and fp16 compute with the number in float32, which a 0-dim tensor
    of their dtype would round first, so those keep the number (tests/test_small_tensor_step.py).
    """
    if isinstance(value, list):
        if any(v != value[0] for v in value):
            torch._foreach_mul_(tensors, value)
            return
        value = value[0]
    if tensors[0].is_cpu and tensors[0].dtype in (torch.float32, torch.float64):
        torch._foreach_mul_(tensors, torch.tensor(value, dtype=tensors[0].dtype))
    else:
        torch._foreach_mul_(tensors, value)


def _update_buffers(
    buffers: list, idx: list[int], H: list[Tensor], momentum: float, dampening: float
) -> list:
    """buf = m·buf + (1−δ)·h (created as a copy of h on the first step), as torch.optim.SGD."""
    bufs = [buffers[i] for i in idx]
    if all(b is not None for b in bufs):
        _foreach_scale_(bufs, momentum)  # torch's _foreach_mul_, bit for bit
        torch._foreach_add_(bufs, H, alpha=1 - dampening)
        return bufs
    for j, i in enumerate(idx):
        if bufs[j] is None:
            bufs[j] = buffers[i] = H[j].detach().clone()
        else:
            bufs[j].mul_(momentum).add_(H[j], alpha=1 - dampening)
    return bufs


# On CPU the step is bound by memory bandwidth. The base update keeps torch's operations (for
# bitwise equality), but the passes of the local direction may be reordered: they run over
# chunks of _CHUNK_BYTES per buffer, which stay in the last-level cache from one pass to the
# next, so that each buffer crosses the memory bus about once for the whole direction.
# Tensors of _LARGE_BYTES and more take the per-tensor kernels on CPU (see _split_large).
_CHUNK_BYTES = 4 << 20
_LARGE_BYTES = 1 << 20


def _is_large(t: Tensor) -> bool:
    return t.numel() * t.element_size() >= _LARGE_BYTES


def _split_large(anchors: list[Tensor], idx: list[int]) -> tuple[list[int], list[int]]:
    """(large, rest) of one device group: the large tensors only on CPU, else ([], idx).

    A CPU foreach op is a loop over the same per-tensor kernels as the single-tensor path, so
    the foreach path gains nothing on large CPU tensors and loses locality: running base update
    and direction of one tensor back to back finds its buffers still in the last-level cache.
    The small tensors keep the foreach ops (one dispatch for many tensors).
    """
    if not anchors[idx[0]].is_cpu:
        return [], idx
    large = [i for i in idx if _is_large(anchors[i])]
    if not large:
        return [], idx
    return large, [i for i in idx if not _is_large(anchors[i])]


def _chunks(items: tuple):
    """Aligned chunks of same-shaped tensors (CPU, contiguous, large), else the items whole.

    Items that are not tensors (per-tensor scalars) are repeated for every chunk.
    """
    t = items[0]
    chunk = _CHUNK_BYTES // t.element_size()
    tensors = [s for s in items if isinstance(s, Tensor)]
    if not t.is_cpu or t.numel() < 2 * chunk or not all(s.is_contiguous() for s in tensors):
        return (items,)
    return zip(*(
        s.view(-1).split(chunk) if isinstance(s, Tensor) else itertools.repeat(s) for s in items
    ))  # fmt: skip


def _batches(lists: tuple[list, ...]):
    """Aligned lists for the direction's passes: on CPU batches of about _CHUNK_BYTES per list
    (large tensors in cache-sized chunks), which stay in cache from one pass to the next;
    elsewhere the whole lists. The first list holds tensors; lists of per-tensor scalars follow.
    """
    if not lists[0][0].is_cpu:
        yield lists
        return
    chunk = _CHUNK_BYTES // lists[0][0].element_size()
    if sum(t.numel() for t in lists[0]) < chunk:  # one batch: the lists (no per-tensor loop)
        yield lists
        return
    batch: list[list] = [[] for _ in lists]
    size = 0
    for items in zip(*lists):
        for piece in _chunks(items) if items[0].numel() >= 2 * chunk else (items,):
            for out, t in zip(batch, piece):
                out.append(t)
            size += piece[0].numel()
            if size >= chunk:
                yield batch
                batch, size = [[] for _ in lists], 0
    if batch[0]:
        yield batch


def _group_by_device_and_dtype(tensors: list[Tensor]) -> list[list[int]]:
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return list(groups.values())
