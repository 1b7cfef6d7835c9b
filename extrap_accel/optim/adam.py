"""extrap-Adam (Lin et al. 2020, Algorithm 3): AdamW at the anchor, gradients at x̃."""

from __future__ import annotations

from typing import Any, ClassVar

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
         &\quad (\textit{amsgrad}: v, \tilde v^k \text{ replaced by their running maxima in }
            \hat v, \hat{\tilde v}^k;\; \textit{maximize}: g, g^k \leftarrow -g, -g^k) \\
         &\textbf{return}\: x_t
       \end{aligned}

    A drop-in for ``torch.optim.AdamW`` (decoupled weight decay): the same arguments in the
    same order with the same defaults (``lr=1e-3``, ``weight_decay=1e-2``), and
    ``extrap_scale = 0`` is exactly ``torch.optim.AdamW``. torch's options act on the local
    direction as on the base update: ``maximize`` negates g and every gᵏ; ``amsgrad`` keeps a
    running maximum of ṽ for d as of v for the base update. Complex parameters are viewed as
    real pairs, as torch does (each of the real and imaginary parts has its own second moment).
    A tensor ``lr`` is used as torch uses it (per-tensor kernels; with ``foreach=True`` it is
    refused, as by torch). Tensor ``betas``, ``fused``, ``capturable`` and ``differentiable``
    are refused (ValueError).
    Each worker's local moments m̃, ṽ use its own gradient, so the math is the same whatever
    backend shards the global moments.
    For Adam, γ̃ = lr/K is rarely the right size: tune ``extrap_scale`` or give ``extrap_lr``.
    """

    _local_state_keys = ("extrap_exp_avg", "extrap_exp_avg_sq", "extrap_max_exp_avg_sq",
                         "extrap_step")  # fmt: skip
    _step_keys = ("extrap_step",)
    _extrapolations = ("past",)
    _group_keys_since_0_1: ClassVar[dict[str, Any]] = {
        "amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
        "differentiable": False, "fused": None, "decoupled_weight_decay": True,
    }  # fmt: skip

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        extrap_scale: float = 1.0,
        extrap_lr: float | None = None,
        extrap_max_norm: float | None = None,
        seed: int = 0,
        world_size: int | None = None,
    ):
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
            extrap_scale=extrap_scale,
            extrap_lr=extrap_lr,
            extrap_max_norm=extrap_max_norm,
            extrapolation="past",
        )
        super().__init__(params, defaults, seed=seed, world_size=world_size)

    def _check_group(self, group: dict[str, Any]) -> None:
        # torch.optim.Adam's checks, in its order and with its messages
        lr, eps, betas = group["lr"], group["eps"], group["betas"]
        foreach, capturable = group["foreach"], group["capturable"]
        if isinstance(lr, Tensor) and foreach and not capturable:
            raise ValueError(
                "lr as a Tensor is not supported for capturable=False and foreach=True"
            )
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"Invalid betas: {betas!r} (two values in [0, 1))")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps} (must be >= 0)")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta} (must be in [0, 1))")
        super()._check_group(group)
        tensors = [isinstance(b, Tensor) for b in betas]
        if not (all(isinstance(b, float) for b in betas) or all(tensors)):
            raise ValueError("betas must be either both floats or both Tensors")
        if all(tensors):
            if foreach and not capturable:
                raise ValueError(
                    "betas[0] as a Tensor is not supported for capturable=False and foreach=True"
                )
            raise ValueError(
                "ExtrapAdam takes betas as floats: Tensor betas serve torch's capturable and "
                "differentiable modes, which extrap_accel does not support"
            )
        if not group["decoupled_weight_decay"]:
            raise ValueError(
                "ExtrapAdam is AdamW (decoupled weight decay); decoupled_weight_decay=False "
                "(Adam's L2 penalty) is not supported: remove the key"
            )
        group["betas"] = tuple(betas)

    def _group_lists(self, group: dict[str, Any], params: list[Tensor], direction: bool):
        """The state lists of ``params`` for the kernels (created where missing)."""
        amsgrad = group["amsgrad"]
        lists: dict[str, list] = {k: [] for k in _STATE_KEYS}
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=_scalar_dtype())
                for key in ("exp_avg", "exp_avg_sq"):
                    state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if amsgrad and "max_exp_avg_sq" not in state:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if direction:
                if "extrap_exp_avg" not in state:  # new, or restarted by reset_local_state()
                    state["extrap_step"] = torch.zeros((), dtype=_scalar_dtype())
                    for key in ("extrap_exp_avg", "extrap_exp_avg_sq"):
                        state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if amsgrad and "extrap_max_exp_avg_sq" not in state:
                    state["extrap_max_exp_avg_sq"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format)  # fmt: skip
            for key in _STATE_KEYS:
                lists[key].append(state.get(key))
        return lists

    def _step_group(self, group: dict[str, Any], local_coef: float) -> None:
        params = self._params_with_grad(group)
        if not params:
            return
        anchors, grads, local_grads = [], [], []
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError(
                    "ExtrapAdam does not support sparse gradients (nor does torch.optim.AdamW)"
                )
            anchors.append(self.core.ensure_anchor(p))
            grads.append(p.grad)
            local_grads.append(self.local_grad(p))
        lists = self._group_lists(group, params, direction=True)
        lr = group["lr"]
        extrap_adam(
            [p.data for p in params], anchors, grads, local_grads,
            *(lists[k] for k in _POSITIONAL_KEYS),
            max_exp_avg_sqs=lists["max_exp_avg_sq"],
            extrap_max_exp_avg_sqs=lists["extrap_max_exp_avg_sq"],
            **self._hyper(group), extrap_lr=self.extrap_lr(group, float(lr)),
            local_coef=local_coef, foreach=_foreach(group),
        )  # fmt: skip

    @staticmethod
    def _hyper(group: dict[str, Any]) -> dict[str, Any]:
        beta1, beta2 = group["betas"]
        return dict(
            lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"], amsgrad=group["amsgrad"],
            maximize=group["maximize"],
        )  # fmt: skip

    def _base_update(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """torch.optim.AdamW's update of ``params`` in place (they are the anchors: DeepSpeed)."""
        lists = self._group_lists(group, params, direction=False)
        grads = [p.grad for p in params]
        none = [None] * len(params)
        extrap_adam(
            [torch.empty_like(p) for p in params],  # scratch
            [p.data for p in params], grads, grads, *(lists[k] for k in _POSITIONAL_KEYS[:3]),
            none, none, none, max_exp_avg_sqs=lists["max_exp_avg_sq"],
            **self._hyper(group), extrap_lr=0.0, direction=False, foreach=_foreach(group),
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
        amsgrad = group.get("amsgrad", False)
        if amsgrad and "extrap_max_exp_avg_sq" not in state:
            state["extrap_max_exp_avg_sq"] = torch.zeros_like(x)
        state["extrap_step"] += 1
        beta1, beta2 = group["betas"]
        step = state["extrap_step"]
        vmax = state["extrap_max_exp_avg_sq"] if amsgrad else None
        tensors = _real((out, x, gk, state["extrap_exp_avg"], state["extrap_exp_avg_sq"], vmax))
        _adam_direction_(
            *tensors, coef=-local_coef if group.get("maximize") else local_coef, beta1=beta1,
            beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
            extrap_lr=extrap_lr, bc1=1 - beta1**step, bc2_sqrt=(1 - beta2**step) ** 0.5,
        )  # fmt: skip


_STATE_KEYS = (
    "step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "extrap_exp_avg", "extrap_exp_avg_sq",
    "extrap_max_exp_avg_sq", "extrap_step",
)  # fmt: skip
# the state lists extrap_adam takes positionally, in its order
_POSITIONAL_KEYS = (
    "step", "exp_avg", "exp_avg_sq", "extrap_exp_avg", "extrap_exp_avg_sq", "extrap_step"
)


def _foreach(group: dict[str, Any]) -> bool | None:
    """The group's foreach, except that a tensor lr takes the per-tensor kernels (as torch's
    AdamW does when foreach is left unset; foreach=True with a tensor lr is refused)."""
    return False if isinstance(group["lr"], Tensor) else group["foreach"]


def _real(tensors):
    """Complex tensors viewed as real pairs (torch's Adam does the same); None stays None."""
    return [torch.view_as_real(t) if t is not None and t.is_complex() else t for t in tensors]


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
    lr: float | Tensor,
    extrap_lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool = False,
    maximize: bool = False,
    max_exp_avg_sqs: list[Tensor] | None = None,
    extrap_max_exp_avg_sqs: list[Tensor] | None = None,
    local_coef: float = 1.0,
    direction: bool = True,
    foreach: bool | None = None,
) -> None:
    """Functional extrap-Adam step: see :class:`ExtrapAdam` for the math.

    Updates ``anchors`` exactly as ``torch.optim.AdamW`` updates its parameters, then
    (``direction=True``) writes x̃ = x − γ̃·d into ``params`` from this rank's ``local_grads``
    (scaled by ``local_coef``). ``params`` also serve as scratch space. The local moments are
    bias-corrected with their own age ``extrap_steps`` (= the step count unless they were reset).
    ``amsgrad`` needs ``max_exp_avg_sqs`` (and ``extrap_max_exp_avg_sqs`` with ``direction``).
    """
    n = len(anchors)
    if amsgrad and (max_exp_avg_sqs is None or (direction and extrap_max_exp_avg_sqs is None)):
        raise ValueError("amsgrad=True needs max_exp_avg_sqs (and extrap_max_exp_avg_sqs)")
    kernel = _single_tensor_extrap_adam if foreach is False else _multi_tensor_extrap_adam
    kernel(
        params, anchors, grads, local_grads, steps, exp_avgs, exp_avg_sqs,
        max_exp_avg_sqs if amsgrad else [None] * n, extrap_exp_avgs, extrap_exp_avg_sqs,
        extrap_max_exp_avg_sqs if amsgrad and direction else [None] * n, extrap_steps, lr=lr,
        extrap_lr=extrap_lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
        amsgrad=amsgrad, maximize=maximize, local_coef=local_coef, direction=direction,
    )  # fmt: skip


def _single_tensor_extrap_adam(
    params, anchors, grads, local_grads, steps, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
    extrap_exp_avgs, extrap_exp_avg_sqs, extrap_max_exp_avg_sqs, extrap_steps, *, lr, extrap_lr,
    beta1, beta2, eps, weight_decay, amsgrad, maximize, local_coef, direction,
):  # fmt: skip
    coef = -local_coef if maximize else local_coef  # maximize: the local moments see −gᵏ
    # The parameter p holds x̃_t, which is dead once the gradients exist: temporaries go into p.
    for i, x in enumerate(anchors):
        # Base update at the anchor, in torch.optim.AdamW's order of operations (bitwise equal).
        steps[i] += 1
        if weight_decay != 0:
            x.mul_(1 - lr * weight_decay)
        p, x, g, m, v, vmax = _real(
            (params[i], x, grads[i], exp_avgs[i], exp_avg_sqs[i], max_exp_avg_sqs[i]))
        if maximize:
            g = torch.neg(g, out=p)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step = steps[i].item()
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        if amsgrad:
            torch.maximum(vmax, v, out=vmax)
            v = vmax
        denom = torch.sqrt(v, out=p).div_(bias_correction2_sqrt).add_(eps)
        x.addcdiv_(m, denom, value=-(lr / bias_correction1))
        if not direction:
            continue
        extrap_steps[i] += 1
        local_step = extrap_steps[i].item()
        bias_correction1 = 1 - beta1**local_step
        bias_correction2_sqrt = (1 - beta2**local_step) ** 0.5
        # Local direction from the new anchor, one cache-sized chunk at a time (CPU).
        tensors = _real((local_grads[i], extrap_exp_avgs[i], extrap_exp_avg_sqs[i]))
        if amsgrad:
            tensors += _real((extrap_max_exp_avg_sqs[i],))
        for chunk in _chunks((p, x, *tensors)):
            _adam_direction_(
                *chunk, coef=coef, beta1=beta1, beta2=beta2, eps=eps,
                weight_decay=weight_decay, extrap_lr=extrap_lr, bc1=bias_correction1,
                bc2_sqrt=bias_correction2_sqrt,
            )  # fmt: skip


def _adam_direction_(
    p, x, gk, mk, vk, vkmax=None, *, coef, beta1, beta2, eps, weight_decay, extrap_lr, bc1,
    bc2_sqrt,
):  # fmt: skip
    """m̃, ṽ ← one AdamW moment update with c·gᵏ (amsgrad: ṽmax ← max(ṽmax, ṽ) serves as ṽ);
    p ← x − γ̃·(m̃/bc1 / (√(ṽ/bc2) + ε) + λx). c: the local clipping factor, negated by maximize.

    One tensor or one chunk; p is the scratch (it may be overwritten before it is read).
    """
    if coef != 1.0:
        gk = torch.mul(gk, coef, out=p)
    mk.lerp_(gk, 1 - beta1)
    vk.mul_(beta2).addcmul_(gk, gk, value=1 - beta2)
    if vkmax is not None:
        torch.maximum(vkmax, vk, out=vkmax)
        vk = vkmax
    if extrap_lr == 0:
        p.copy_(x)
        return
    # m̃/bc1 / (√ṽ/√bc2 + ε) = (√bc2/bc1)·m̃ / (√ṽ + ε·√bc2)
    denom = torch.sqrt(vk, out=p).add_(eps * bc2_sqrt)
    torch.addcdiv(x, mk, denom, value=-extrap_lr * bc2_sqrt / bc1, out=p)
    if weight_decay != 0:
        p.add_(x, alpha=-extrap_lr * weight_decay)


def _multi_tensor_extrap_adam(
    params, anchors, grads, local_grads, steps, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
    extrap_exp_avgs, extrap_exp_avg_sqs, extrap_max_exp_avg_sqs, extrap_steps, *, lr, extrap_lr,
    beta1, beta2, eps, weight_decay, amsgrad, maximize, local_coef, direction,
):  # fmt: skip
    lists = (
        params, anchors, grads, local_grads, steps, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
        extrap_exp_avgs, extrap_exp_avg_sqs, extrap_max_exp_avg_sqs, extrap_steps,
    )  # fmt: skip
    kw = dict(
        lr=lr, extrap_lr=extrap_lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
        amsgrad=amsgrad, maximize=maximize, local_coef=local_coef, direction=direction,
    )  # fmt: skip
    for idx in _group_by_device_and_dtype(anchors):
        large, idx = _split_large(anchors, idx)
        if large:  # CPU: finish each large tensor while it is in cache (see _split_large)
            _single_tensor_extrap_adam(*([t[i] for i in large] for t in lists), **kw)
        if idx:
            _foreach_extrap_adam(*([t[i] for i in idx] for t in lists), **kw)


def _foreach_extrap_adam(
    P, X, G, Gk, S, M, V, Vmax, Mk, Vk, Vkmax, ES, *, lr, extrap_lr, beta1, beta2, eps,
    weight_decay, amsgrad, maximize, local_coef, direction,
):  # fmt: skip
    if X[0].is_complex():  # one dtype per call: complex tensors viewed as real pairs, as torch
        P, X, G, Gk, M, V, Mk, Vk = (_real(t) for t in (P, X, G, Gk, M, V, Mk, Vk))
        if amsgrad:
            Vmax, Vkmax = _real(Vmax), _real(Vkmax)
    # Base update at the anchor, in torch.optim.AdamW's foreach order (bitwise equal).
    if maximize:
        G = torch._foreach_neg(G)
    if S[0].is_cpu:
        torch._foreach_add_(S, torch.tensor(1.0, device="cpu"), alpha=1.0)
    else:
        torch._foreach_add_(S, 1)
    if weight_decay != 0:  # (_foreach_scale_: torch's _foreach_mul_, bit for bit)
        _foreach_scale_(X, 1 - lr * weight_decay)
    torch._foreach_lerp_(M, G, 1 - beta1)
    _foreach_scale_(V, beta2)
    torch._foreach_addcmul_(V, G, G, 1 - beta2)
    del G
    bias_correction1 = [1 - beta1 ** s.item() for s in S]
    bias_correction2_sqrt = [(1 - beta2 ** s.item()) ** 0.5 for s in S]
    step_size = [(lr / bc) * -1 for bc in bias_correction1]
    if amsgrad:
        torch._foreach_maximum_(Vmax, V)
    denom = torch._foreach_sqrt(Vmax if amsgrad else V)
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
    lists = (P, X, Gk, Mk, Vk) + ((Vkmax,) if amsgrad else ())
    for batch in _batches((*lists, bias_correction1, bias_correction2_sqrt)):
        *tensors, bc1, bc2_sqrt = batch
        _foreach_adam_direction_(
            *tensors, BC1=bc1, BC2_sqrt=bc2_sqrt,
            coef=-local_coef if maximize else local_coef, beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, extrap_lr=extrap_lr,
        )  # fmt: skip


def _foreach_adam_direction_(
    P, X, Gk, Mk, Vk, Vkmax=None, *, BC1, BC2_sqrt, coef, beta1, beta2, eps, weight_decay,
    extrap_lr,
):  # fmt: skip
    """Foreach form of :func:`_adam_direction_`: in-place operations only, P as the scratch."""
    if coef != 1.0:
        torch._foreach_copy_(P, Gk)
        _foreach_scale_(P, coef)
        Gk = P
    torch._foreach_lerp_(Mk, Gk, 1 - beta1)
    _foreach_scale_(Vk, beta2)
    torch._foreach_addcmul_(Vk, Gk, Gk, 1 - beta2)
    if Vkmax is not None:
        torch._foreach_maximum_(Vkmax, Vk)
        Vk = Vkmax
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
