"""``extrap_accel.prepare(accelerator, model, optimizer, ...)``: accelerate's prepare plus
anchor safety, the fp16 scale, and per-rank checkpointing of the local extrapolation state."""

from __future__ import annotations

from typing import Any

from torch import nn

from .. import checkpoint
from ..attach import attach
from ..handle import unwrap_module, unwrap_optimizer
from ..optim.base import ExtrapOptimizer

_REGISTRY_ATTR = "_extrap_accel_optimizers"


def prepare(accelerator, *objects: Any) -> Any:
    """``accelerator.prepare(*objects)``, then make every extrap_accel optimizer among them safe.

    For each extrap_accel optimizer: ``attach`` it to the prepared model holding its
    parameters (no-grad forwards, ``save_model``, ``get_state_dict`` and ``save_state`` see the
    anchor), hand it accelerate's GradScaler (fp16), and save/restore its per-rank state
    (x̃, local moments, noise generators) on every rank in ``save_state``/``load_state``.
    Returns what ``accelerator.prepare`` returns.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        raise NotImplementedError(
            "extrap_accel.prepare does not support accelerate's FSDP plugin yet: apply FSDP2 "
            "yourself (torch.distributed.fsdp.fully_shard) and call "
            "extrap_accel.attach(model, optimizer) with the optimizer built on its parameters; "
            "or use DDP (MULTI_GPU) or DeepSpeed with extrap_accel.prepare"
        )
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if deepspeed:
        plugin = accelerator.state.deepspeed_plugin
        if plugin is not None and plugin.deepspeed_config.get("zero_optimization", {}).get(
            "stage", 0
        ) > 0:
            plugin.deepspeed_config.setdefault("zero_allow_untested_optimizer", True)
    prepared = accelerator.prepare(*objects)
    items = prepared if isinstance(prepared, (tuple, list)) else (prepared,)
    models = [o for o in items if isinstance(o, nn.Module)]
    registry = getattr(accelerator, _REGISTRY_ATTR, None)
    if registry is None:
        registry = []
        setattr(accelerator, _REGISTRY_ATTR, registry)
        _register_checkpoint_hooks(accelerator, registry)
    for obj in items:
        if isinstance(obj, nn.Module):
            continue
        try:
            optimizer = unwrap_optimizer(obj)
        except TypeError:
            continue
        if deepspeed:  # the engine adapter saves per-rank state inside save_checkpoint
            from .deepspeed import attach_engine

            engine = next((m for m in models if type(m).__name__ == "DeepSpeedEngine"), None)
            if engine is None:
                raise ValueError("extrap_accel.prepare under DeepSpeed: pass the model too")
            attach_engine(engine, optimizer)
            continue
        model = _model_of(optimizer, models)
        if model is None:
            raise ValueError(
                "extrap_accel.prepare: pass the model together with its optimizer "
                "(prepare(accelerator, model, optimizer, ...)) so the model can be attached"
            )
        attach(model, optimizer)
        if accelerator.scaler is not None:
            optimizer.set_grad_scaler(accelerator.scaler)
        if optimizer not in registry:
            registry.append(optimizer)
    return prepared


def _model_of(optimizer: ExtrapOptimizer, models: list[nn.Module]) -> nn.Module | None:
    params = {p for g in optimizer.param_groups for p in g["params"]}
    for model in models:
        if any(p in params for p in unwrap_module(model).parameters()):
            return model
    return None


def _register_checkpoint_hooks(accelerator, registry: list[ExtrapOptimizer]) -> None:
    def save_hook(models, weights, output_dir):
        if registry:  # (under DeepSpeed the engine adapter saves instead)
            checkpoint.save(output_dir, registry, accelerator.process_index)

    def load_hook(models, input_dir):
        if not registry:
            return
        # Runs on every rank before accelerate loads the optimizers: each one applies its
        # staged local state right after its load_state_dict.
        states = checkpoint.read(input_dir, accelerator.process_index, len(registry))
        if states is not None and len(states) != len(registry):
            raise ValueError(
                f"{checkpoint.path(input_dir, accelerator.process_index)} holds the state of "
                f"{len(states)} extrap_accel optimizers, but {len(registry)} were prepared"
            )
        # one process: the optimizer's own state dict already holds x̃ and its local state
        decision = checkpoint.agree(states, input_dir, optional=accelerator.num_processes == 1)
        for i, optimizer in enumerate(registry):
            if decision == "load":
                optimizer.stage_local_state(states[i])
            elif decision == "restart":
                optimizer.stage_local_state(None, restart=True)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
