"""The extrapolation displacements ξ of the unified framework, as functions over tensor lists.

Each writes x̃ = x + ξ into its outputs from the anchors; none touches the anchors.
:func:`place_direction_` chooses the function for a variant, for every backend that places x̃
(the optimizers' own step fuses the `past` direction into its kernels, for speed).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

EXTRAPOLATIONS = ("past", "gaussian", "uniform", "stochastic", "fresh")
NOISE_EXTRAPOLATIONS = ("gaussian", "uniform")


def place_direction_(
    variant: str,
    *,
    outs: list[Tensor],
    anchors: list[Tensor],
    local_grads: list[Tensor | None],
    averaged: list[Tensor | None],
    states: list[dict],
    group: dict[str, Any],
    extrap_lr: float,
    local_coef: float,
    local_direction: Callable[..., None],
    generator: Callable[[torch.device], torch.Generator],
) -> None:
    """x̃ for the next iteration into ``outs``, for the group's ``variant``.

    `past`: x − γ̃·d from this rank's local gradient and local ``states`` through the
    optimizer's ``local_direction`` (SGD or Adam); `stochastic`: x − γ̃·(gᵏ − g); `gaussian` /
    `uniform`: x + ξ from this rank's ``generator``. `fresh` places at the step (closure).
    """
    if variant == "past":
        for out, x, gk, state in zip(outs, anchors, local_grads, states):
            local_direction(group, out, x, gk, state, local_coef=local_coef, extrap_lr=extrap_lr)
    elif variant == "stochastic":  # maximize: ξ = −γ̃·((−gᵏ) − (−g))
        sign = -1.0 if group.get("maximize") else 1.0
        place_stochastic_(outs, anchors, local_grads, averaged, extrap_lr=sign * extrap_lr)
    elif variant in NOISE_EXTRAPOLATIONS:
        place_noise_(outs, anchors, group=group, generator=generator)
    else:
        raise ValueError(f"no direction to place for extrapolation={variant!r}")


def place_noise_(
    params: list[Tensor],
    anchors: list[Tensor],
    *,
    group: dict[str, Any],
    generator: Callable[[torch.device], torch.Generator],
) -> None:
    """x̃ = x + ξ with ξ gaussian N(0, s²) or uniform U[−s, s] per coordinate.

    s = noise_scale, or with ``filterwise`` s = noise_scale·‖Wᵢ‖/√nᵢ for filter i (the slice
    along dim 0 of the anchor, nᵢ elements); 1-D tensors are then left at the anchor.
    The noise is drawn in float32 (at least) and x̃ rounded once to the parameter dtype.
    """
    scale = float(group["noise_scale"])
    gaussian = group["extrapolation"] == "gaussian"
    filterwise = group["filterwise"]
    for p, x in zip(params, anchors):
        if x.numel() == 0:
            continue
        if filterwise and x.dim() < 2:
            p.copy_(x)
            continue
        compute_dtype = torch.promote_types(x.dtype, torch.float32)
        noise = torch.empty(x.shape, device=x.device, dtype=compute_dtype)
        gen = generator(x.device)
        if gaussian:
            noise.normal_(0.0, 1.0, generator=gen)
        else:
            noise.uniform_(-1.0, 1.0, generator=gen)
        xs = x.to(compute_dtype)
        if filterwise:
            per_filter = xs.reshape(xs.shape[0], -1)
            s = per_filter.norm(dim=1) * (scale / math.sqrt(per_filter.shape[1]))
            noise.reshape(xs.shape[0], -1).mul_(s.unsqueeze(1))
        else:
            noise.mul_(scale)
        p.copy_(noise.add_(xs))  # (rounded once to p's dtype)


def place_stochastic_(
    params: list[Tensor],
    anchors: list[Tensor],
    local_grads: list[Tensor],
    grads: list[Tensor],
    *,
    extrap_lr: float,
) -> None:
    """x̃ᵏ = x − γ̃·(gᵏ − g): zero-mean across workers, shaped like the gradient noise."""
    for p, x, gk, g in zip(params, anchors, local_grads, grads):
        diff = gk - g  # exactly 0 when gᵏ is g (one process)
        torch.add(x, diff, alpha=-extrap_lr, out=p)
