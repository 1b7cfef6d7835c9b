"""``attach(...)``: the single primitive that makes a model, engine or Trainer anchor-safe.

It dispatches on what it is given through a table of backends; each backend module imports
its own library (and ``extrap_accel.handle``) only when its entry is taken, so the arrows
point one way: ``attach`` → backends → ``handle`` → ``optim``.

Once attached, a forward with gradients disabled (``torch.no_grad`` / ``inference_mode``) runs
at the anchor, ``model.state_dict()`` holds the anchor, and ``model.load_state_dict`` moves
the anchor (keeping this worker's displacement x̃ − x). Training forwards still run at x̃,
also in ``model.eval()`` mode (frozen BatchNorm): the signal is grad mode, not module mode.
A Hugging Face model's ``generate()`` runs at the anchor as a whole.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from .handle import AttachHandle, attach_module


def _is_hf_trainer(obj: Any) -> bool:
    """A ``transformers.Trainer`` (or subclass), recognised without importing transformers."""
    return any(
        cls.__name__ == "Trainer" and cls.__module__.split(".")[0] == "transformers"
        for cls in type(obj).__mro__
    )


def _is_deepspeed_engine(obj: Any) -> bool:
    return type(obj).__name__ in ("DeepSpeedEngine", "PipelineEngine")


def _is_fsdp2_module(obj: Any) -> bool:
    """A module to which ``torch.distributed.fsdp.fully_shard`` was applied."""
    return any(cls.__name__ == "FSDPModule" and "fsdp" in cls.__module__
               for cls in type(obj).__mro__)  # fmt: skip


# (recognises it, "module:function" that attaches it, whether it takes an optimizer argument)
BACKENDS: list[tuple[Callable[[Any], bool], str, bool]] = [
    (_is_hf_trainer, "extrap_accel.integrations.transformers:attach_trainer", False),
    (_is_deepspeed_engine, "extrap_accel.integrations.deepspeed:attach_engine", True),
    (_is_fsdp2_module, "extrap_accel.integrations.fsdp2:attach_fsdp2", True),
]


def attach(model, optimizer=None):
    """Make ``model`` anchor-safe for ``optimizer`` (an ExtrapSGD / ExtrapAdam).

    ``model`` may be a plain module or wrapped in DistributedDataParallel; ``optimizer`` may be
    wrapped by accelerate. Returns the handle (``handle.remove()`` undoes it).

    ``attach(engine, optimizer)`` with a DeepSpeed engine installs the engine adapter
    (``extrap_accel.integrations.deepspeed``); ``attach(trainer)`` with a
    ``transformers.Trainer`` (no optimizer argument) makes the Trainer save, evaluate and resume
    correctly (``extrap_accel.integrations.transformers``); ``attach(model, optimizer)`` with
    a model to which FSDP2's ``fully_shard`` was applied installs the FSDP2 adapter
    (``extrap_accel.integrations.fsdp2``; it returns the adapter, whose ``save_local_state`` /
    ``load_local_state`` carry each rank's x̃).
    """
    for recognises, target, takes_optimizer in BACKENDS:
        if not recognises(model):
            continue
        if not takes_optimizer and optimizer is not None:
            raise TypeError(
                "attach(trainer) takes no optimizer: it uses the Trainer's (optimizers=... or "
                "optimizer_cls_and_kwargs=...)"
            )
        module_name, function = target.split(":")
        backend = getattr(importlib.import_module(module_name), function)
        return backend(model, optimizer) if takes_optimizer else backend(model)
    if optimizer is None:
        raise TypeError("attach(model, optimizer): the optimizer is missing")
    return attach_module(model, optimizer)


__all__ = ["AttachHandle", "attach"]
