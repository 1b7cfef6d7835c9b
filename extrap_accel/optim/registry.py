"""A registry of optimizers: variants are entries that bind defaults, not subclasses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .adam import ExtrapAdam
from .sgd import ExtrapSGD


@dataclass(frozen=True)
class OptimizerInfo:
    """One registry entry: the class it builds and the defaults it binds."""

    name: str
    cls: type[torch.optim.Optimizer]
    defaults: dict[str, Any] = field(default_factory=dict)
    required: tuple[str, ...] = ()  # kwargs the user must give (no sensible default)
    extrapolates: bool = True
    description: str = ""


_REGISTRY: dict[str, OptimizerInfo] = {}


def register_optimizer(info: OptimizerInfo) -> OptimizerInfo:
    if info.name in _REGISTRY:
        raise ValueError(f"optimizer {info.name!r} is already registered")
    _REGISTRY[info.name] = info
    return info


def list_optimizers() -> list[str]:
    """The registered names, sorted."""
    return sorted(_REGISTRY)


def get_optimizer_info(name: str) -> OptimizerInfo:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown optimizer {name!r}; known optimizers: {', '.join(list_optimizers())}"
        ) from None


def create_optimizer(name: str, params, **kwargs: Any) -> torch.optim.Optimizer:
    """Build the registered optimizer ``name`` over ``params``; ``kwargs`` override its defaults."""
    info = get_optimizer_info(name)
    missing = [k for k in info.required if kwargs.get(k) is None]
    if missing:
        raise ValueError(
            f"optimizer {name!r} needs {', '.join(missing)} "
            f"(e.g. create_optimizer({name!r}, params, {missing[0]}=...)); {info.description}"
        )
    return info.cls(params, **{**info.defaults, **kwargs})


_NOISE = "noise_scale: σ (gaussian) or half-width (uniform) per coordinate"

for _info in (
    OptimizerInfo("sgd", torch.optim.SGD, extrapolates=False,
                  description="torch.optim.SGD, the mini-batch baseline"),
    OptimizerInfo("adamw", torch.optim.AdamW, extrapolates=False,
                  description="torch.optim.AdamW, the Adam baseline"),
    OptimizerInfo("extrap_sgd", ExtrapSGD, description="extrap-SGD (Algorithm 1)"),
    OptimizerInfo("extrap_sgd_gaussian", ExtrapSGD, {"extrapolation": "gaussian"},
                  required=("noise_scale",), description=_NOISE),
    OptimizerInfo("extrap_sgd_uniform", ExtrapSGD, {"extrapolation": "uniform"},
                  required=("noise_scale",), description=_NOISE),
    OptimizerInfo("extrap_sgd_filterwise", ExtrapSGD,
                  {"extrapolation": "uniform", "filterwise": True}, required=("noise_scale",),
                  description="noise_scale: fraction of each filter's norm (adaptive SmoothOut)"),
    OptimizerInfo("extrap_sgd_stochastic", ExtrapSGD, {"extrapolation": "stochastic"},
                  description="ξ = −γ̃(gᵏ − g), needs data parallelism"),
    OptimizerInfo("extrap_sgd_fresh", ExtrapSGD, {"extrapolation": "fresh"},
                  description="extragradient: step(closure) with an extra forward/backward"),
    OptimizerInfo("extrap_adam", ExtrapAdam, description="extrap-Adam (Algorithm 3)"),
):  # fmt: skip
    register_optimizer(_info)
