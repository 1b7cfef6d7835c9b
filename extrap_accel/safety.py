"""The first-step check: an extrap_accel optimizer that accelerate (or the Hugging Face Trainer)
steps without being made anchor-safe stops, instead of saving or evaluating x̃ silently.

Between steps the parameters hold this rank's extrapolated point x̃. ``extrap_accel.prepare``,
``attach`` and the backends make no-grad forwards and every ``state_dict`` see the anchor; a
plain ``accelerator.prepare`` does not, so ``accelerator.save_model`` / ``get_state_dict`` /
``save_state`` and the Trainer's checkpoints would write x̃. At its first step an optimizer
that no backend attached looks whether accelerate is in use in this process (an
``Accelerator`` exists: created by the user, or by a ``transformers.Trainer``) and refuses.

The check reads accelerate's process-wide state, never the call stack, and only when
``accelerate`` has been imported. What it cannot see: a wrapper other than accelerate that
saves or evaluates on its own (PyTorch Lightning, a home-made loop that calls
``model.state_dict()``), and an ``Accelerator`` created only after the first step. There, use
``attach(model, optimizer)`` or the manual mode below.

The manual mode (``manual_mode(optimizer)``) is the documented opt-out: you call
``optimizer.eval()`` before every evaluation and save and ``optimizer.train()`` after.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any

# Optimizers whose user manages optimizer.eval()/train() (manual_mode).
_MANUAL: weakref.WeakSet = weakref.WeakSet()


def manual_mode(optimizer: Any) -> Any:
    """Opt ``optimizer`` out of the first-step check: you call ``optimizer.eval()`` before every
    evaluation and save and ``optimizer.train()`` after (wrappers such as accelerate's
    ``AcceleratedOptimizer`` forward both). Returns ``optimizer``.

    Not kept by a copy or a pickle of the optimizer: call it again on the copy.
    """
    from .handle import unwrap_optimizer

    _MANUAL.add(unwrap_optimizer(optimizer))
    return optimizer


def is_manual(optimizer: Any) -> bool:
    return optimizer in _MANUAL


def accelerate_in_use() -> bool:
    """Whether an ``accelerate.Accelerator`` (also the one a ``transformers.Trainer`` creates)
    exists in this process: accelerate keeps it in ``AcceleratorState``'s shared state, the
    one private name this relies on (``tests/test_safety.py`` fails loudly if it changes)."""
    if "accelerate" not in sys.modules:
        return False
    from accelerate.state import AcceleratorState

    shared = getattr(AcceleratorState, "_shared_state", None)
    if shared is None:
        raise RuntimeError(
            "extrap_accel cannot tell whether accelerate wraps this optimizer (this accelerate "
            "version has no AcceleratorState._shared_state). Use extrap_accel.prepare("
            "accelerator, model, optimizer, ...) or extrap_accel.attach(model, optimizer), or "
            "extrap_accel.manual_mode(optimizer) if you call optimizer.eval()/train() yourself"
        )
    return len(shared) > 0


def check_first_step(optimizer: Any) -> None:
    """Called by ``ExtrapOptimizer.step()`` at its first step when no model is attached."""
    binding = optimizer.binding
    if binding.attached or binding.backend != "torch" or is_manual(optimizer):
        return
    if not accelerate_in_use():
        return
    raise RuntimeError(
        f"this {type(optimizer).__name__} is stepped in a process where accelerate is in use "
        "(an Accelerator, or a Hugging Face Trainer, exists) but it was not made anchor-safe: "
        "save_model, get_state_dict, save_state, the Trainer's checkpoints and evaluation would "
        "see this rank's extrapolated point x̃ instead of the anchor. With accelerate use "
        "`model, optimizer, ... = extrap_accel.prepare(accelerator, model, optimizer, ...)` "
        "instead of accelerator.prepare; with the Hugging Face Trainer call "
        "extrap_accel.attach(trainer) before trainer.train() (or use "
        "extrap_accel.ExtrapTrainer). If you call optimizer.eval() before every evaluation and "
        "save and optimizer.train() after, opt out with extrap_accel.manual_mode(optimizer)"
    )


__all__ = ["accelerate_in_use", "check_first_step", "manual_mode"]
