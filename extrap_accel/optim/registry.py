"""A registry of optimizers: variants are entries that bind defaults, not subclasses.

Each entry carries what it can do (timm-style info records): its family, whether its step needs
a closure, whether it draws noise, and on which backends it is correct. Everything that asks
"can this run here" (the DeepSpeed adapter, the Trainer, the recipes, the tests) reads these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .adam import ExtrapAdam
from .sgd import ExtrapSGD


@dataclass(frozen=True)
class VariantInfo:
    """What an extrapolation variant needs and where it is correct.

    ``deepspeed``: the ZeRO configurations where it is correct: "zero0".."zero3", or
    "zero0-fp32" (ZeRO-0 without bf16/fp16, where DeepSpeed steps the module itself and
    ``.grad`` holds the whole averaged gradient).
    ``fsdp2``: correct under FSDP2 (``fully_shard``, dim-0 shards): each rank holds whole
    filters, its shard of the averaged gradient and its local gradient's slice, so every
    variant but ``fresh`` runs there without communication.
    """

    name: str
    needs_closure: bool = False
    noise: bool = False
    ddp: bool = True
    deepspeed: tuple[str, ...] = ("zero0", "zero1", "zero2", "zero3")
    fsdp2: bool = True
    why_not: str = ""  # shown when a backend refuses it


VARIANTS = {v.name: v for v in (
    VariantInfo("past"),
    VariantInfo("gaussian", noise=True),
    VariantInfo("uniform", noise=True),
    VariantInfo("filterwise", noise=True, deepspeed=("zero0", "zero1", "zero2"),
                why_not="filter norms need whole tensors, which ZeRO-3 shards"),
    VariantInfo("stochastic", deepspeed=("zero0-fp32",),
                why_not="it needs the whole averaged gradient in .grad, which DeepSpeed leaves "
                        "there only at ZeRO-0 in fp32"),
    VariantInfo("fresh", needs_closure=True, ddp=False, deepspeed=(), fsdp2=False,
                why_not="its second backward would run the data-parallel reduction"),
)}  # fmt: skip


def variant_info(extrapolation: str = "past", filterwise: bool = False) -> VariantInfo:
    """The capabilities of a param group's variant (``extrapolation``, ``filterwise``)."""
    return VARIANTS["filterwise" if filterwise else extrapolation]


def check_deepspeed_variant(info: VariantInfo, stage: int, direct: bool) -> None:
    """Refuse ``info`` at a ZeRO stage where it cannot be correct. ``direct``: ZeRO-0 in fp32."""
    if f"zero{stage}" in info.deepspeed or (direct and "zero0-fp32" in info.deepspeed):
        return
    allowed = ", ".join(info.deepspeed) or "none"
    raise NotImplementedError(
        f"extrapolation={info.name!r} is not correct at DeepSpeed ZeRO stage {stage}"
        f"{' with bf16/fp16' if stage == 0 else ''} ({info.why_not}; supported: {allowed}); "
        "use extrapolation='past' or change the stage"
    )


@dataclass(frozen=True)
class OptimizerInfo:
    """One registry entry: the class it builds, the defaults it binds, what it can do."""

    name: str
    cls: type[torch.optim.Optimizer]
    defaults: dict[str, Any] = field(default_factory=dict)
    required: tuple[str, ...] = ()  # kwargs the user must give (no sensible default)
    extrapolates: bool = True
    description: str = ""
    family: str = "sgd"  # "sgd" or "adam": which hyperparameters it takes

    @property
    def variant(self) -> VariantInfo | None:
        """The extrapolation variant's capabilities (None for the baselines)."""
        if not self.extrapolates:
            return None
        return variant_info(self.defaults.get("extrapolation", "past"),
                            bool(self.defaults.get("filterwise")))  # fmt: skip

    @property
    def needs_closure(self) -> bool:
        return self.variant is not None and self.variant.needs_closure


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


_CREATE_EXAMPLE = "create_optimizer({name!r}, params, {arg}=...)"


def optimizer_cls_and_kwargs(
    name: str, kwargs: dict[str, Any], example: str = _CREATE_EXAMPLE
) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The class of the registered optimizer ``name`` and its constructor kwargs: its bound
    defaults overridden by ``kwargs``. A required argument that is missing is refused, with
    ``example`` (formatted with ``name`` and the argument ``arg``) as the call that gives it."""
    info = get_optimizer_info(name)
    missing = [k for k in info.required if kwargs.get(k) is None]
    if missing:
        call = example.format(name=name, arg=missing[0])
        raise ValueError(
            f"optimizer {name!r} needs {', '.join(missing)} (e.g. {call}); {info.description}"
        )
    return info.cls, {**info.defaults, **kwargs}


def create_optimizer(name: str, params, **kwargs: Any) -> torch.optim.Optimizer:
    """Build the registered optimizer ``name`` over ``params``; ``kwargs`` override its defaults."""
    cls, kwargs = optimizer_cls_and_kwargs(name, kwargs)
    return cls(params, **kwargs)


_NOISE = "noise_scale: σ (gaussian) or half-width (uniform) per coordinate"

for _info in (
    OptimizerInfo("sgd", torch.optim.SGD, extrapolates=False,
                  description="torch.optim.SGD, the mini-batch baseline"),
    OptimizerInfo("adamw", torch.optim.AdamW, extrapolates=False, family="adam",
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
    OptimizerInfo("extrap_adam", ExtrapAdam, family="adam",
                  description="extrap-Adam (Algorithm 3)"),
):  # fmt: skip
    register_optimizer(_info)
