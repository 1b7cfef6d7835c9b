"""extrap-SGD (Lin et al. 2020, Algorithm 1) and the unified extrapolation framework."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import EXTRAPOLATIONS, NOISE_EXTRAPOLATIONS, ExtrapOptimizer, check_param_group_options
from .directions import place_noise_, place_stochastic_

__all__ = ["ExtrapSGD", "extrap_sgd"]


class ExtrapSGD(ExtrapOptimizer):
    r"""SGD with (Nesterov) momentum whose gradients are taken at extrapolated points.

    .. math::
       \begin{aligned}
         &\textbf{input}: \gamma_t \text{ (lr)}, m \text{ (momentum)}, \lambda
            \text{ (weight\_decay)}, \tilde m \text{ (extrap\_momentum, default } m),
            \tilde\gamma_t = c\,\gamma_t/K \text{ (extrap\_scale } c \text{) or extrap\_lr} \\
         &\textbf{initialize}: u_0 = \tilde u_0 = 0,\; d_0 = 0 \\
         &\textbf{for}\: t = 0, 1, \dots \textbf{ on worker } k: \\
         &\quad \tilde x^k_t = x_t - \tilde\gamma_{t-1} d^k_t
            \qquad\text{(what the parameters hold between steps)} \\
         &\quad g^k_t = \nabla f_{B^k_t}(\tilde x^k_t),\quad g_t = \tfrac1K\textstyle\sum_k g^k_t
            \qquad\text{(the usual all-reduce)} \\
         &\quad h_t = g_t + \lambda x_t,\; u_{t+1} = m u_t + h_t,\;
            x_{t+1} = x_t - \gamma_t (h_t + m u_{t+1}) \quad
            (\text{heavy ball: } x_t - \gamma_t u_{t+1}) \\
         &\quad \hat h^k_t = g^k_t + \lambda x_{t+1},\; \tilde u^k_{t+1} = \tilde m \tilde u^k_t
            + \hat h^k_t,\; d^k_{t+1} = \hat h^k_t + \tilde m \tilde u^k_{t+1}
            \quad (\text{heavy ball: } \tilde u^k_{t+1}) \\
         &\textbf{return}\: x_t \text{ (the anchor: } \texttt{optimizer.eval()}
            \text{ or } \texttt{extrap\_accel.attach)}
       \end{aligned}

    With ``extrapolation`` other than ``"past"`` the displacement x̃ − x is instead Gaussian or
    uniform noise of scale ``noise_scale`` (per coordinate, or per filter with ``filterwise``),
    ``"stochastic"``: −γ̃(gᵏ − g), or ``"fresh"``: −γ̃∇f(x) from an extra closure call.
    ``extrap_scale = 0`` is exactly ``torch.optim.SGD`` (dampening 0). The paper's symbols:
    γ = ``lr``, γ̃ = ``extrap_lr``, m = ``momentum``, λ = ``weight_decay``.

    Between steps the parameters hold x̃; call ``optimizer.eval()`` before evaluating or saving
    and ``optimizer.train()`` after, or ``extrap_accel.attach(model, optimizer)`` once.
    The hyperparameters and extrapolation settings live in the param groups.
    """

    _local_state_keys = ("extrap_momentum_buffer",)

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        extrap_scale: float = 1.0,
        extrap_lr: float | None = None,
        extrap_momentum: float | None = None,
        extrap_max_norm: float | None = None,
        extrapolation: str = "past",
        noise_scale: float | None = None,
        filterwise: bool = False,
        seed: int = 0,
        world_size: int | None = None,
        foreach: bool | None = None,
    ):
        if momentum < 0:
            raise ValueError(f"Invalid momentum value: {momentum} (must be >= 0)")
        if extrap_momentum is not None and extrap_momentum < 0:
            raise ValueError(f"Invalid extrap_momentum value: {extrap_momentum} (must be >= 0)")
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum requires momentum > 0 (dampening is always 0)")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            nesterov=nesterov,
            extrap_scale=extrap_scale,
            extrap_lr=extrap_lr,
            extrap_momentum=extrap_momentum,
            extrap_max_norm=extrap_max_norm,
            extrapolation=extrapolation,
            noise_scale=noise_scale,
            filterwise=filterwise,
            foreach=foreach,
        )
        check_param_group_options(defaults, supports=EXTRAPOLATIONS)
        super().__init__(params, defaults, seed=seed, world_size=world_size)
        for group in self.param_groups:
            if group is not self.defaults:
                check_param_group_options(group, supports=EXTRAPOLATIONS)
        self._first_noise_placement()

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step at the anchor, then x̃ for the next forward into the parameters.

        ``closure`` (zero grads, forward, backward, return loss) is required by
        ``extrapolation="fresh"``, which calls it twice: at the anchor and at x̃.
        """
        self._check_train_mode()
        self._resolve_world_size()
        loss = None
        if any(group["extrapolation"] == "fresh" for group in self.param_groups):
            self._fresh_pass(closure)
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        coefs = self._local_clip_coef()
        for i, group in enumerate(self.param_groups):
            self._step_group(group, coefs.get(i, 1.0))
        return loss

    def _step_group(self, group: dict[str, Any], local_coef: float) -> None:
        params = self._params_with_grad(group)
        if not params:
            return
        variant = group["extrapolation"]
        if variant == "stochastic":
            self._warn_stochastic_k1()
        anchors, grads, local_grads, bufs, extrap_bufs = [], [], [], [], []
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("ExtrapSGD does not support sparse gradients")
            state = self.state[p]
            anchors.append(self._ensure_anchor(p, state))
            grads.append(p.grad)
            local_grads.append(self._local_grad(p))
            bufs.append(state.get("momentum_buffer"))
            extrap_bufs.append(state.get("extrap_momentum_buffer"))
        lr = float(group["lr"])
        gamma = self._extrap_lr(group, lr)
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
            weight_decay=group["weight_decay"],
            nesterov=group["nesterov"],
            local_coef=local_coef,
            direction=variant == "past",
            foreach=group["foreach"],
        )
        for p, buf, extrap_buf in zip(params, bufs, extrap_bufs):
            if buf is not None:
                self.state[p]["momentum_buffer"] = buf
            if extrap_buf is not None:
                self.state[p]["extrap_momentum_buffer"] = extrap_buf
        if variant == "stochastic":
            place_stochastic_(params, anchors, local_grads, grads, extrap_lr=gamma)
        elif variant in NOISE_EXTRAPOLATIONS:
            place_noise_(params, anchors, group=group, generator=self._generator)
        elif variant == "fresh":
            torch._foreach_copy_([p.data for p in params], anchors)


def extrap_sgd(
    params: list[Tensor],
    anchors: list[Tensor],
    grads: list[Tensor],
    local_grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    extrap_buffers: list[Tensor | None],
    *,
    lr: float,
    extrap_lr: float,
    momentum: float,
    extrap_momentum: float,
    weight_decay: float,
    nesterov: bool,
    local_coef: float = 1.0,
    direction: bool = True,
    foreach: bool | None = None,
) -> None:
    """Functional extrap-SGD step: see :class:`ExtrapSGD` for the math.

    Updates ``anchors`` (x) with the averaged ``grads`` exactly as ``torch.optim.SGD`` would
    update the parameters, then (``direction=True``) writes x̃ = x − γ̃·d into ``params`` from
    ``local_grads`` (scaled by ``local_coef``, the local clipping factor). Buffers that are
    None are created and stored back into the two buffer lists.
    """
    kernel = _single_tensor_extrap_sgd if foreach is False else _multi_tensor_extrap_sgd
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
        weight_decay=weight_decay,
        nesterov=nesterov,
        local_coef=local_coef,
        direction=direction,
    )


def _single_tensor_extrap_sgd(
    params, anchors, grads, local_grads, momentum_buffers, extrap_buffers, *,
    lr, extrap_lr, momentum, extrap_momentum, weight_decay, nesterov, local_coef, direction,
):  # fmt: skip
    for i, (p, x, g, gk) in enumerate(zip(params, anchors, grads, local_grads)):
        # Base update at the anchor, in torch.optim.SGD's order of operations (bitwise equal).
        h = g if weight_decay == 0 else g.add(x, alpha=weight_decay)
        if momentum != 0:
            buf = momentum_buffers[i]
            if buf is None:
                buf = momentum_buffers[i] = h.detach().clone()
            else:
                buf.mul_(momentum).add_(h)
            h = h.add(buf, alpha=momentum) if nesterov else buf
        x.add_(h, alpha=-lr)
        if not direction:
            continue
        # Local direction from the new anchor: ĥ = c·gᵏ + λx_{t+1}, ũ = m̃ũ + ĥ, d = ĥ + m̃ũ.
        hk = gk if local_coef == 1.0 else gk.mul(local_coef)
        if weight_decay != 0:
            hk = hk.add(x, alpha=weight_decay)
        if extrap_momentum != 0:
            ubuf = extrap_buffers[i]
            if ubuf is None:
                ubuf = extrap_buffers[i] = hk.detach().clone()
            else:
                ubuf.mul_(extrap_momentum).add_(hk)
            d = hk.add(ubuf, alpha=extrap_momentum) if nesterov else ubuf
        else:
            d = hk
        if extrap_lr == 0:
            p.copy_(x)
        else:
            torch.add(x, d, alpha=-extrap_lr, out=p)


def _multi_tensor_extrap_sgd(
    params, anchors, grads, local_grads, momentum_buffers, extrap_buffers, *,
    lr, extrap_lr, momentum, extrap_momentum, weight_decay, nesterov, local_coef, direction,
):  # fmt: skip
    for idx in _group_by_device_and_dtype(anchors):
        P = [params[i] for i in idx]
        X = [anchors[i] for i in idx]
        G = [grads[i] for i in idx]
        # Base update at the anchor, in torch.optim.SGD's foreach order (bitwise equal).
        H = G if weight_decay == 0 else torch._foreach_add(G, X, alpha=weight_decay)
        if momentum != 0:
            bufs = _update_buffers(momentum_buffers, idx, H, momentum)
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
            continue
        # Local direction from the new anchor: ĥ = c·gᵏ + λx_{t+1}, ũ = m̃ũ + ĥ, d = ĥ + m̃ũ.
        Hk = [local_grads[i] for i in idx]
        owned = False
        if local_coef != 1.0:
            Hk, owned = torch._foreach_mul(Hk, local_coef), True
        if weight_decay != 0:
            if owned:
                torch._foreach_add_(Hk, X, alpha=weight_decay)
            else:
                Hk, owned = torch._foreach_add(Hk, X, alpha=weight_decay), True
        if extrap_momentum != 0:
            ubufs = _update_buffers(extrap_buffers, idx, Hk, extrap_momentum)
            if nesterov:
                if owned:
                    torch._foreach_add_(Hk, ubufs, alpha=extrap_momentum)
                    D = Hk
                else:
                    D = torch._foreach_add(Hk, ubufs, alpha=extrap_momentum)
            else:
                D = ubufs
        else:
            D = Hk
        torch._foreach_copy_(P, X)
        if extrap_lr != 0:
            torch._foreach_add_(P, D, alpha=-extrap_lr)


def _update_buffers(buffers: list, idx: list[int], H: list[Tensor], momentum: float) -> list:
    """buf = m·buf + h (created as a copy of h on the first step), as torch.optim.SGD does."""
    bufs = [buffers[i] for i in idx]
    if all(b is not None for b in bufs):
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, H)
        return bufs
    for j, i in enumerate(idx):
        if bufs[j] is None:
            bufs[j] = buffers[i] = H[j].detach().clone()
        else:
            bufs[j].mul_(momentum).add_(H[j])
    return bufs


def _group_by_device_and_dtype(tensors: list[Tensor]) -> list[list[int]]:
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return list(groups.values())
