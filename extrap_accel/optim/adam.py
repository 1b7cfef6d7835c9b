"""extrap-Adam (Lin et al. 2020, Algorithm 3): AdamW at the anchor, gradients at x̃."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import ExtrapOptimizer
from .sgd import _batches, _chunks, _foreach_scale_, _group_by_device_and_dtype, _split_large

__all__ = ["ExtrapAdam", "extrap_adam"]


class ExtrapAdam(ExtrapOptimizer):
    r"""AdamW (decoupled weight decay) whose gradients are taken at extrapolated points.

    .. math::
       \begin{aligned}
         &\textbf{input}: \gamma_t \text{ (lr)}, \beta_1, \beta_2, \epsilon, \lambda
            \text{ (weight\_decay)}, \tilde\gamma_t = c\,\gamma_t/K \text{ or extrap\_lr} \\
         &\textbf{initialize}: m_0 = v_0 = \tilde m^k_0 = \tilde v^k_0 = 0,\; d^k_0 = 0 \\
         &\textbf{for}\: t = 0, 1, \dots \textbf{ on worker } k: \\
         &\quad \tilde x^k_t = x_t - \tilde\gamma_{t-1} d^k_t,\quad
            g^k_t = \nabla f_{B^k_t}(\tilde x^k_t),\quad g_t = \tfrac1K\textstyle\sum_k g^k_t \\
         &\quad m_{t+1} = \beta_1 m_t + (1-\beta_1) g_t,\;
            v_{t+1} = \beta_2 v_t + (1-\beta_2) g_t^2 \\
         &\quad x_{t+1} = x_t - \gamma_t\big(\hat m_{t+1}/(\sqrt{\hat v_{t+1}} + \epsilon)
            + \lambda x_t\big) \qquad (\hat\cdot: \text{bias-corrected with } t+1) \\
         &\quad \tilde m^k_{t+1} = \beta_1 \tilde m^k_t + (1-\beta_1) g^k_t,\;
            \tilde v^k_{t+1} = \beta_2 \tilde v^k_t + (1-\beta_2) (g^k_t)^2 \\
         &\quad d^k_{t+1} = \hat{\tilde m}^k_{t+1}/(\sqrt{\hat{\tilde v}^k_{t+1}} + \epsilon)
            + \lambda x_{t+1} \\
         &\textbf{return}\: x_t
       \end{aligned}

    ``extrap_scale = 0`` is exactly ``torch.optim.AdamW``. Each worker's local moments m̃, ṽ
    use its own gradient, so the math is the same whatever backend shards the global moments.
    For Adam, γ̃ = lr/K is rarely the right size: tune ``extrap_scale`` or give ``extrap_lr``.
    """

    _local_state_keys = ("extrap_exp_avg", "extrap_exp_avg_sq", "extrap_step")
    _step_keys = ("extrap_step",)
    _extrapolations = ("past",)

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        extrap_scale: float = 1.0,
        extrap_lr: float | None = None,
        extrap_max_norm: float | None = None,
        seed: int = 0,
        world_size: int | None = None,
        foreach: bool | None = None,
    ):
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            extrap_scale=extrap_scale,
            extrap_lr=extrap_lr,
            extrap_max_norm=extrap_max_norm,
            extrapolation="past",
            foreach=foreach,
        )
        super().__init__(params, defaults, seed=seed, world_size=world_size)

    def _check_group(self, group: dict[str, Any]) -> None:
        eps, betas = group["eps"], group["betas"]
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps} (must be >= 0)")
        if not (len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"Invalid betas: {betas!r} (two values in [0, 1))")
        group["betas"] = tuple(betas)
        super()._check_group(group)

    def _step_group(self, group: dict[str, Any], local_coef: float) -> None:
        params = self._params_with_grad(group)
        if not params:
            return
        lists: dict[str, list[Tensor]] = {k: [] for k in _STATE_KEYS}
        anchors, grads, local_grads = [], [], []
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("ExtrapAdam does not support sparse gradients")
            state = self.state[p]
            anchors.append(self.core.ensure_anchor(p))
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=_scalar_dtype())
                for key in ("exp_avg", "exp_avg_sq"):
                    state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if "extrap_exp_avg" not in state:  # new, or restarted by reset_local_state()
                state["extrap_step"] = torch.zeros((), dtype=_scalar_dtype())
                for key in ("extrap_exp_avg", "extrap_exp_avg_sq"):
                    state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
            for key in _STATE_KEYS:
                lists[key].append(state[key])
            grads.append(p.grad)
            local_grads.append(self.local_grad(p))
        lr = float(group["lr"])
        beta1, beta2 = group["betas"]
        extrap_adam(
            [p.data for p in params],
            anchors,
            grads,
            local_grads,
            *(lists[k] for k in _STATE_KEYS),
            lr=lr,
            extrap_lr=self.extrap_lr(group, lr),
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            local_coef=local_coef,
            foreach=group["foreach"],
        )


    def _base_update(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """torch.optim.AdamW's update of ``params`` in place (they are the anchors: DeepSpeed)."""
        lists: dict[str, list[Tensor]] = {k: [] for k in _STATE_KEYS[:3]}
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=_scalar_dtype())
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            for key in lists:
                lists[key].append(state[key])
        beta1, beta2 = group["betas"]
        grads = [p.grad for p in params]
        none = [None] * len(params)
        extrap_adam(
            [torch.empty_like(p) for p in params],  # scratch
            [p.data for p in params], grads, grads, *(lists[k] for k in _STATE_KEYS[:3]),
            none, none, none, lr=float(group["lr"]), extrap_lr=0.0, beta1=beta1, beta2=beta2,
            eps=group["eps"], weight_decay=group["weight_decay"], direction=False,
            foreach=group["foreach"],
        )  # fmt: skip

    @classmethod
    def local_direction_(cls, group, out: Tensor, x: Tensor, gk: Tensor, state: dict,
                         *, local_coef: float, extrap_lr: float) -> None:  # fmt: skip
        """out = x − γ̃·d for one tensor from its local gradient and local ``state``.

        The local moments are bias-corrected with their own age (``extrap_step``).
        """
        if "extrap_exp_avg" not in state:
            state["extrap_exp_avg"] = torch.zeros_like(x)
            state["extrap_exp_avg_sq"] = torch.zeros_like(x)
            state["extrap_step"] = 0
        state["extrap_step"] += 1
        beta1, beta2 = group["betas"]
        step = state["extrap_step"]
        _adam_direction_(
            out, x, gk, state["extrap_exp_avg"], state["extrap_exp_avg_sq"], coef=local_coef,
            beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
            extrap_lr=extrap_lr, bc1=1 - beta1**step, bc2_sqrt=(1 - beta2**step) ** 0.5,
        )  # fmt: skip


_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "extrap_exp_avg", "extrap_exp_avg_sq", "extrap_step")


def _scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def extrap_adam(
    params: list[Tensor],
    anchors: list[Tensor],
    grads: list[Tensor],
    local_grads: list[Tensor],
    steps: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    extrap_exp_avgs: list[Tensor],
    extrap_exp_avg_sqs: list[Tensor],
    extrap_steps: list[Tensor],
    *,
    lr: float,
    extrap_lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    local_coef: float = 1.0,
    direction: bool = True,
    foreach: bool | None = None,
) -> None:
    """Functional extrap-Adam step: see :class:`ExtrapAdam` for the math.

    Updates ``anchors`` exactly as ``torch.optim.AdamW`` updates its parameters, then
    (``direction=True``) writes x̃ = x − γ̃·d into ``params`` from this rank's ``local_grads``
    (scaled by ``local_coef``). ``params`` also serve as scratch space. The local moments are
    bias-corrected with their own age ``extrap_steps`` (= the step count unless they were reset).
    """
    kernel = _single_tensor_extrap_adam if foreach is False else _multi_tensor_extrap_adam
    kernel(
        params, anchors, grads, local_grads, steps, exp_avgs, exp_avg_sqs,
        extrap_exp_avgs, extrap_exp_avg_sqs, extrap_steps, lr=lr, extrap_lr=extrap_lr, beta1=beta1,
        beta2=beta2, eps=eps, weight_decay=weight_decay, local_coef=local_coef,
        direction=direction,
    )  # fmt: skip


def _single_tensor_extrap_adam(
    params, anchors, grads, local_grads, steps, exp_avgs, exp_avg_sqs, extrap_exp_avgs,
    extrap_exp_avg_sqs, extrap_steps, *, lr, extrap_lr, beta1, beta2, eps, weight_decay,
    local_coef, direction,
):  # fmt: skip
    # The parameter p holds x̃_t, which is dead once the gradients exist: temporaries go into p.
    for i, x in enumerate(anchors):
        p, g, m, v = params[i], grads[i], exp_avgs[i], exp_avg_sqs[i]
        # Base update at the anchor, in torch.optim.AdamW's order of operations (bitwise equal).
        steps[i] += 1
        if weight_decay != 0:
            x.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step = steps[i].item()
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        denom = torch.sqrt(v, out=p).div_(bias_correction2_sqrt).add_(eps)
        x.addcdiv_(m, denom, value=-lr / bias_correction1)
        if not direction:
            continue
        extrap_steps[i] += 1
        local_step = extrap_steps[i].item()
        bias_correction1 = 1 - beta1**local_step
        bias_correction2_sqrt = (1 - beta2**local_step) ** 0.5
        # Local direction from the new anchor, one cache-sized chunk at a time (CPU).
        tensors = (p, x, local_grads[i], extrap_exp_avgs[i], extrap_exp_avg_sqs[i])
        for chunk in _chunks(tensors):
            _adam_direction_(
                *chunk, coef=local_coef, beta1=beta1, beta2=beta2, eps=eps,
                weight_decay=weight_decay, extrap_lr=extrap_lr, bc1=bias_correction1,
                bc2_sqrt=bias_correction2_sqrt,
            )  # fmt: skip


def _adam_direction_(
    p, x, gk, mk, vk, *, coef, beta1, beta2, eps, weight_decay, extrap_lr, bc1, bc2_sqrt
):
    """m̃, ṽ ← one AdamW moment update with c·gᵏ;  p ← x − γ̃·(m̃/bc1 / (√(ṽ/bc2) + ε) + λx).

    One tensor or one chunk; p is the scratch (it may be overwritten before it is read).
    """
    if coef != 1.0:
        gk = torch.mul(gk, coef, out=p)
    mk.lerp_(gk, 1 - beta1)
    vk.mul_(beta2).addcmul_(gk, gk, value=1 - beta2)
    if extrap_lr == 0:
        p.copy_(x)
        return
    # m̃/bc1 / (√ṽ/√bc2 + ε) = (√bc2/bc1)·m̃ / (√ṽ + ε·√bc2)
    denom = torch.sqrt(vk, out=p).add_(eps * bc2_sqrt)
    torch.addcdiv(x, mk, denom, value=-extrap_lr * bc2_sqrt / bc1, out=p)
    if weight_decay != 0:
        p.add_(x, alpha=-extrap_lr * weight_decay)


def _multi_tensor_extrap_adam(
    params, anchors, grads, local_grads, steps, exp_avgs, exp_avg_sqs, extrap_exp_avgs,
    extrap_exp_avg_sqs, extrap_steps, *, lr, extrap_lr, beta1, beta2, eps, weight_decay,
    local_coef, direction,
):  # fmt: skip
    lists = (
        params, anchors, grads, local_grads, steps, exp_avgs, exp_avg_sqs, extrap_exp_avgs,
        extrap_exp_avg_sqs, extrap_steps,
    )  # fmt: skip
    kw = dict(
        lr=lr, extrap_lr=extrap_lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
        local_coef=local_coef, direction=direction,
    )  # fmt: skip
    for idx in _group_by_device_and_dtype(anchors):
        large, idx = _split_large(anchors, idx)
        if large:  # CPU: finish each large tensor while it is in cache (see _split_large)
            _single_tensor_extrap_adam(*([t[i] for i in large] for t in lists), **kw)
        if idx:
            _foreach_extrap_adam(*([t[i] for i in idx] for t in lists), **kw)


def _foreach_extrap_adam(
    P, X, G, Gk, S, M, V, Mk, Vk, ES, *, lr, extrap_lr, beta1, beta2, eps, weight_decay,
    local_coef, direction,
):  # fmt: skip
    # Base update at the anchor, in torch.optim.AdamW's foreach order (bitwise equal).
    if S[0].is_cpu:
        torch._foreach_add_(S, torch.tensor(1.0, device="cpu"), alpha=1.0)
    else:
        torch._foreach_add_(S, 1)
    if weight_decay != 0:  # (_foreach_scale_: torch's _foreach_mul_, bit for bit)
        _foreach_scale_(X, 1 - lr * weight_decay)
    torch._foreach_lerp_(M, G, 1 - beta1)
    _foreach_scale_(V, beta2)
    torch._foreach_addcmul_(V, G, G, 1 - beta2)
    bias_correction1 = [1 - beta1 ** s.item() for s in S]
    bias_correction2_sqrt = [(1 - beta2 ** s.item()) ** 0.5 for s in S]
    step_size = [(lr / bc) * -1 for bc in bias_correction1]
    denom = torch._foreach_sqrt(V)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(X, M, denom, step_size)
    del denom
    if not direction:
        return
    if ES[0].is_cpu:
        torch._foreach_add_(ES, torch.tensor(1.0, device="cpu"), alpha=1.0)
    else:
        torch._foreach_add_(ES, 1)
    bias_correction1 = [1 - beta1 ** s.item() for s in ES]
    bias_correction2_sqrt = [(1 - beta2 ** s.item()) ** 0.5 for s in ES]
    # Local direction from the new anchor; the parameters (x̃_t is dead) serve as the scratch.
    for batch in _batches((P, X, Gk, Mk, Vk, bias_correction1, bias_correction2_sqrt)):
        _foreach_adam_direction_(
            *batch, coef=local_coef, beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, extrap_lr=extrap_lr,
        )  # fmt: skip


def _foreach_adam_direction_(
    P, X, Gk, Mk, Vk, BC1, BC2_sqrt, *, coef, beta1, beta2, eps, weight_decay, extrap_lr
):  # fmt: skip
    """Foreach form of :func:`_adam_direction_`: in-place operations only, P as the scratch."""
    if coef != 1.0:
        torch._foreach_copy_(P, Gk)
        _foreach_scale_(P, coef)
        Gk = P
    torch._foreach_lerp_(Mk, Gk, 1 - beta1)
    _foreach_scale_(Vk, beta2)
    torch._foreach_addcmul_(Vk, Gk, Gk, 1 - beta2)
    if extrap_lr == 0:
        torch._foreach_copy_(P, X)
        return
    # m̃/bc1 / (√ṽ/√bc2 + ε) = (√bc2/bc1)·m̃ / (√ṽ + ε·√bc2)
    torch._foreach_copy_(P, Vk)
    torch._foreach_sqrt_(P)
    torch._foreach_add_(P, [eps * b2 for b2 in BC2_sqrt])
    # (√ṽ + ε')/m̃, then its reciprocal: m̃/(√ṽ + ε'), in place
    torch._foreach_div_(P, Mk)
    torch._foreach_reciprocal_(P)
    _foreach_scale_(P, [-extrap_lr * b2 / b1 for b1, b2 in zip(BC1, BC2_sqrt)])
    torch._foreach_add_(P, X, alpha=1 - extrap_lr * weight_decay)
