"""The module side of ``attach``: hooks that make a model anchor-safe.

Once attached, a forward with gradients disabled (``torch.no_grad`` / ``inference_mode``) runs
at the anchor, ``model.state_dict()`` holds the anchor, and ``model.load_state_dict`` moves
the anchor (keeping this worker's displacement x̃ − x). Training forwards still run at x̃,
also in ``model.eval()`` mode (frozen BatchNorm): the signal is grad mode, not module mode.
A Hugging Face model's ``generate()`` runs at the anchor as a whole (it calls an
encoder-decoder's encoder directly, past the forward hooks).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from .optim.base import ExtrapOptimizer

_HANDLE_ATTR = "_extrap_accel_handle"


class AttachHandle:
    """The hooks ``attach`` installed; ``remove()`` takes them off again.

    Where the anchor of each parameter is, the hooks ask the optimizer's core
    (``optimizer.core``: its own, or the one a backend such as DeepSpeed bound to it).
    """

    def __init__(self, module: nn.Module, optimizer: ExtrapOptimizer):
        self.module = module
        self.optimizer = optimizer
        # every parameter of the module: the optimizer may take more later (add_param_group)
        self._names: dict[Tensor, list[str]] = {}
        for name, p in module.named_parameters(remove_duplicate=False):
            self._names.setdefault(p, []).append(name)
        if not set(optimizer.managed_params()) & set(self._names):
            raise ValueError(
                "attach(model, optimizer): none of the model's parameters is in the optimizer; "
                "build the optimizer from model.parameters() of this model"
            )
        optimizer.bind(attached=True)
        self._context = None
        self._depth = 0
        self._handles = [
            # first, before any framework hook gathers or prefetches weights (DeepSpeed ZeRO-3)
            module.register_forward_pre_hook(self._pre_forward, prepend=True),
            module.register_forward_hook(self._post_forward, always_call=True),
            # torch tags the hook function itself, which a bound method cannot take
            module.register_state_dict_post_hook(lambda *a: self._state_dict_hook(*a)),
            module.register_load_state_dict_pre_hook(self._load_hook),
        ]
        # Hugging Face generate() calls submodules directly (an encoder-decoder's encoder), which
        # the forward hooks above cannot see: the whole call runs at the anchor.
        self._generate = None
        if callable(getattr(type(module), "generate", None)) and "generate" not in vars(module):
            self._generate = module.generate
            module.generate = self._anchored_generate
        setattr(module, _HANDLE_ATTR, self)

    def __deepcopy__(self, memo) -> AttachHandle:
        """A deep copy of an attached module (an EMA model, say) is not attached: the copy's
        hooks do nothing and its ``generate`` is its class's; ``attach`` it anew if needed."""
        inert = object.__new__(AttachHandle)
        memo[id(self)] = inert
        inert.module = copy.deepcopy(self.module, memo)  # (the copy: already in memo)
        inert.optimizer, inert._names, inert._handles, inert._generate = None, {}, [], None
        inert._context, inert._depth = None, 0
        return inert

    def _active_for(self, module: nn.Module) -> bool:
        return self.optimizer is not None and module is self.module

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if vars(self.module).get("generate") == self._anchored_generate:
            del self.module.generate
        self._generate = None
        if getattr(self.module, _HANDLE_ATTR, None) is self:
            delattr(self.module, _HANDLE_ATTR)

    def _displaced(self) -> list[tuple[Tensor, Tensor]]:
        return [(p, a) for p, a in self.optimizer.core.displaced() if p in self._names]

    def _needs_anchor_forward(self) -> bool:
        return self.optimizer.core.holds_points()

    def _anchor_forward(self):
        return self.optimizer.core.at_anchor()

    # A forward with gradients disabled runs at the anchor; the weights go back afterwards.
    def _pre_forward(self, module: nn.Module, args: Any) -> None:
        if not self._active_for(module):
            return
        if self._context is not None:
            self._depth += 1
            return
        if torch.is_grad_enabled() or not self._needs_anchor_forward():
            return
        self._context = self._anchor_forward()
        self._context.__enter__()
        self._depth = 1

    def _post_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._context is None:
            return
        self._depth -= 1
        if self._depth > 0:
            return
        context, self._context = self._context, None
        context.__exit__(None, None, None)

    def _anchored_generate(self, *args: Any, **kwargs: Any) -> Any:
        """``module.generate`` at the anchor (it runs without gradients), x̃ back afterwards."""
        if self.optimizer is None:  # an inert copy
            return type(self.module).generate(self.module, *args, **kwargs)
        if self._context is not None or not self._needs_anchor_forward():
            return self._generate(*args, **kwargs)
        context = self._context = self._anchor_forward()
        context.__enter__()
        self._depth = 1
        try:
            return self._generate(*args, **kwargs)
        finally:
            self._context, self._depth = None, 0
            context.__exit__(None, None, None)

    def _state_dict_hook(self, module, state_dict, prefix, local_metadata) -> None:
        if not self._active_for(module):  # (a deep copy shares this hook function)
            return
        for p, anchor in self._displaced():
            for name in self._names[p]:
                if prefix + name in state_dict:
                    state_dict[prefix + name] = anchor.detach()

    @torch.no_grad()
    def _load_hook(self, module, state_dict, prefix, local_metadata, strict, *args) -> None:
        if not self._active_for(module):
            return
        if local_metadata.get("assign_to_params_buffers"):
            raise RuntimeError(
                "load_state_dict(assign=True) replaces the parameters that the extrap_accel "
                "optimizer holds; load with assign=False (the default) into an attached model"
            )
        for p, names in self._names.items():
            keys = [prefix + n for n in names if prefix + n in state_dict]
            if not keys:
                continue
            value = state_dict[keys[0]]
            if not isinstance(value, Tensor) or value.shape != p.shape:
                continue  # torch's own loading reports the mismatch
            loaded = self.optimizer.core.move_anchor_(p, value)
            if loaded is not None:  # what the parameter must hold now (x̃ in train mode)
                for key in keys:
                    state_dict[key] = loaded


def attach_module(model: nn.Module, optimizer) -> AttachHandle:
    """``attach`` for a plain module or a DDP-wrapped one (idempotent for the same optimizer)."""
    module = unwrap_module(model)
    opt = unwrap_optimizer(optimizer)
    existing = getattr(module, _HANDLE_ATTR, None)
    if existing is not None and existing.optimizer is None:  # a deep copy's inert handle
        existing.remove()
        existing = None
    if existing is not None:
        if existing.optimizer is opt:
            return existing
        raise RuntimeError(
            "this model is already attached to another optimizer; call handle.remove() on the "
            "first attach before attaching a new optimizer"
        )
    return AttachHandle(module, opt)


def unwrap_module(model: Any) -> nn.Module:
    name = type(model).__name__
    if name == "FullyShardedDataParallel":
        raise NotImplementedError(
            "extrap_accel does not support FSDP1 (FullyShardedDataParallel: flat parameters "
            "lose the tensor boundaries); use FSDP2 (torch.distributed.fsdp.fully_shard) and "
            "extrap_accel.attach(model, optimizer), DDP, or DeepSpeed"
        )
    if name.startswith("FSDP"):  # a fully_shard module that did not reach attach's FSDP2 entry
        raise NotImplementedError(
            "an FSDP2 (fully_shard) module is attached with extrap_accel.attach(model, "
            "optimizer) on the module fully_shard returned, not through this path"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"attach() needs a torch.nn.Module, got {name}")
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel) or hasattr(model, "_orig_mod"):
            model = getattr(model, "module", None) or model._orig_mod
            continue
        return model


def unwrap_optimizer(optimizer: Any) -> ExtrapOptimizer:
    seen = optimizer
    while not isinstance(seen, ExtrapOptimizer) and hasattr(seen, "optimizer"):
        seen = seen.optimizer  # accelerate's AcceleratedOptimizer and similar wrappers
    if not isinstance(seen, ExtrapOptimizer):
        raise TypeError(
            f"attach() needs an extrap_accel optimizer (ExtrapSGD, ExtrapAdam or "
            f"create_optimizer('extrap_...')), got {type(optimizer).__name__}"
        )
    return seen
