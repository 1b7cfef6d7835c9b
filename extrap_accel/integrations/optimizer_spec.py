"""An extrap_accel optimizer named by a string: a DeepSpeed JSON ``"optimizer"`` section, or a
registry name handed to the Hugging Face Trainer (``trainer_optimizer``).

A DeepSpeed config may name ours, ``"optimizer": {"type": "ExtrapSGD" | "ExtrapAdam" | an
``extrap_*`` registry name, "params": {...}}``, on three routes, each of which builds it (DeepSpeed
only knows its own names): ``extrap_accel.prepare`` under ``accelerate launch`` (the script
passes ``accelerate.utils.DummyOptim``), ``extrap_accel.integrations.deepspeed.initialize``, and
``attach(trainer)`` / ``ExtrapTrainer`` with ``TrainingArguments(deepspeed=...)``. ``"auto"``
values are filled the way each route fills them (:data:`AUTO_KEYS`); ``betas`` and ``eps`` do
not apply to the SGD family, so an ``"auto"`` there is dropped. Imports only torch.
"""

from __future__ import annotations

from typing import Any

import torch

from ..optim.registry import get_optimizer_info, list_optimizers, optimizer_cls_and_kwargs

# The class names a DeepSpeed config may use besides the registry names.
ALIASES = {"ExtrapSGD": "extrap_sgd", "ExtrapAdam": "extrap_adam"}
# What each route fills where the config says "auto" (as accelerate and the Trainer do for
# DeepSpeed's own optimizers); plain DeepSpeed fills nothing.
AUTO_KEYS = {
    "accelerate": ("lr", "weight_decay"),  # from DummyOptim(params, lr=..., weight_decay=...)
    "trainer": ("lr", "betas", "eps", "weight_decay"),  # from the TrainingArguments
    "deepspeed": (),
}
_ADAM_ONLY = ("betas", "eps")
ROUTES = (
    "extrap_accel.prepare(accelerator, model, accelerate.utils.DummyOptim(params, lr=...), ...) "
    "under accelerate launch, extrap_accel.integrations.deepspeed.initialize(model=..., "
    "config=...), or the Hugging Face Trainer with extrap_accel.attach(trainer) / "
    "extrap_accel.ExtrapTrainer"
)


def registry_name(type_name: Any) -> str | None:
    """The registry name a DeepSpeed ``"type"`` names, if it names an extrap_accel optimizer."""
    if not isinstance(type_name, str):
        return None
    name = ALIASES.get(type_name, type_name)
    return name if name.startswith("extrap") and name in list_optimizers() else None


def known_types() -> list[str]:
    return [*ALIASES, *(n for n in list_optimizers() if n.startswith("extrap"))]


def names_ours(config: dict | None) -> bool:
    """Whether a DeepSpeed config's ``"optimizer"`` section names an extrap_accel optimizer."""
    spec = (config or {}).get("optimizer")
    return isinstance(spec, dict) and registry_name(spec.get("type")) is not None


def check_type(type_name: Any, builtins: list[str]) -> None:
    """An ``"optimizer"`` type that is neither ours nor one of DeepSpeed's ``builtins``: refused
    with the names there are."""
    if registry_name(type_name) is None and str(type_name).lower() not in builtins:
        raise ValueError(
            f"unknown optimizer type {type_name!r} in the DeepSpeed config: use one of "
            f"{', '.join(known_types())} (extrap_accel; built through {ROUTES}) or a DeepSpeed "
            f"built-in ({', '.join(sorted(builtins))})"
        )


def resolve(spec: dict, route: str, filled: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The registry name and constructor kwargs of the ``"optimizer"`` section ``spec``.

    ``"auto"`` values come from ``filled`` (what ``route`` fills, :data:`AUTO_KEYS`); an
    ``"auto"`` betas/eps of an SGD-family optimizer is dropped; any other ``"auto"`` is an error.
    """
    name = registry_name(spec.get("type"))
    if name is None:
        raise ValueError(f"the DeepSpeed optimizer type {spec.get('type')!r} is not extrap_accel's")
    info = get_optimizer_info(name)
    params = spec.get("params", {}) or {}
    if not isinstance(params, dict):
        raise TypeError(f'the DeepSpeed "optimizer" "params" must be an object, got {params!r}')
    kwargs: dict[str, Any] = {}
    for key, value in params.items():
        if value == "auto":
            if key in _ADAM_ONLY and info.family != "adam":
                continue  # (the Trainer fills betas/eps for every optimizer)
            if key not in AUTO_KEYS[route] or key not in filled:
                fills = ", ".join(AUTO_KEYS[route]) or "nothing"
                raise ValueError(
                    f'"optimizer.params.{key}": "auto" cannot be resolved on this route '
                    f"({route} fills {fills}): give {key} a value in the DeepSpeed config"
                )
            value = filled[key]
        if key == "betas" and isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return name, kwargs


def trainer_optimizer(name: str, **kwargs: Any) -> tuple[type[torch.optim.Optimizer], dict]:
    """``(cls, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)`` from a registry name (or
    ``"ExtrapSGD"`` / ``"ExtrapAdam"``), its bound defaults included::

        Trainer(..., optimizer_cls_and_kwargs=extrap_accel.trainer_optimizer(
            "extrap_sgd_gaussian", lr=0.1, momentum=0.9, noise_scale=1e-3))

    ``lr`` is required: the Trainer passes only these kwargs (and ``args.weight_decay``, through
    its parameter groups) to the class, not ``args.learning_rate``. The kwargs are checked now,
    by building the optimizer over a placeholder tensor, rather than when training starts.
    """
    ours = registry_name(name)
    if ours is None:
        raise ValueError(
            f"trainer_optimizer({name!r}): not an extrap_accel optimizer; use one of "
            f"{', '.join(known_types())}"
        )
    if "lr" not in kwargs:
        raise TypeError(
            f"trainer_optimizer({name!r}, lr=...): give lr; the Trainer does not pass "
            "TrainingArguments.learning_rate to optimizer_cls_and_kwargs"
        )
    cls, merged = optimizer_cls_and_kwargs(
        ours, kwargs, example=f"trainer_optimizer({name!r}, lr=..., {{arg}}=...)"
    )
    cls([torch.zeros(1, requires_grad=True)], **merged)  # bad kwargs fail here
    return cls, merged


__all__ = ["known_types", "names_ours", "registry_name", "resolve", "trainer_optimizer"]
