"""``extrap_accel.prepare(accelerator, model, optimizer, ...)``: accelerate's prepare plus
anchor safety, the fp16 scale, and per-rank checkpointing of the local extrapolation state."""

from __future__ import annotations

from typing import Any

from torch import nn

from .. import checkpoint
from ..attach import _is_fsdp2_module, attach
from ..handle import unwrap_module, unwrap_optimizer
from ..optim.base import ExtrapOptimizer
from .optimizer_spec import check_type, names_ours, resolve

_REGISTRY_ATTR = "_extrap_accel_optimizers"


def prepare(accelerator, *objects: Any) -> Any:
    """``accelerator.prepare(*objects)``, then make every extrap_accel optimizer among them safe.

    For each extrap_accel optimizer: ``attach`` it to the prepared model holding its
    parameters (no-grad forwards, ``save_model``, ``get_state_dict`` and ``save_state`` see the
    anchor), hand it accelerate's GradScaler (fp16), and save/restore its per-rank state
    (x̃, local moments, noise generators) on every rank in ``save_state``/``load_state``.
    Under DeepSpeed, a config whose ``"optimizer"`` names ``ExtrapSGD`` / ``ExtrapAdam`` / an
    ``extrap_*`` registry name is built here: pass ``accelerate.utils.DummyOptim(params,
    lr=..., weight_decay=...)`` in its place (``"auto"``: lr and weight_decay from it).
    Under accelerate's FSDP2 plugin (``fsdp_version: 2``) the prepared model is a ``fully_shard``
    module and gets the FSDP2 adapter (``extrap_accel.integrations.fsdp2``); accelerate's FSDP1
    plugin is refused. Returns what ``accelerator.prepare`` returns.
    """
    from accelerate.utils import DistributedType

    fsdp2 = accelerator.distributed_type == DistributedType.FSDP
    if fsdp2 and _fsdp_version(accelerator) != 2:
        raise NotImplementedError(
            "extrap_accel.prepare does not support accelerate's FSDP1 plugin (flat parameters "
            "lose the tensor boundaries): set fsdp_version: 2 in the accelerate config "
            "(FSDP2, fully_shard), or apply fully_shard yourself and call "
            "extrap_accel.attach(model, optimizer); or use DDP (MULTI_GPU) or DeepSpeed"
        )
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    config: dict = {}
    if deepspeed:
        plugin = accelerator.state.deepspeed_plugin
        config = plugin.deepspeed_config if plugin is not None else {}
        if config.get("zero_optimization", {}).get("stage", 0) > 0:
            config.setdefault("zero_allow_untested_optimizer", True)
        objects = _build_config_optimizer(config, objects)
    spec = config.pop("optimizer", None) if names_ours(config) else None
    try:  # (accelerate would hand a section naming ours to DeepSpeed, which does not know it)
        prepared = accelerator.prepare(*objects)
    finally:
        if spec is not None:
            config["optimizer"] = spec
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
        attach(model, optimizer)  # (a fully_shard model: the FSDP2 adapter)
        if accelerator.scaler is not None:
            optimizer.set_grad_scaler(accelerator.scaler)
        if optimizer not in registry:
            registry.append(optimizer)
    return prepared


def _build_config_optimizer(config: dict, objects: tuple) -> tuple:
    """A DeepSpeed config whose ``"optimizer"`` names ours (``ExtrapSGD``, ``ExtrapAdam``, an
    ``extrap_*`` registry name): build it in place of the ``accelerate.utils.DummyOptim`` the
    script passes, as accelerate's docs say for a config-defined optimizer ("auto": ``lr`` and
    ``weight_decay`` from the DummyOptim, as accelerate fills them)."""
    from accelerate.utils import DummyOptim
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    from ..optim.registry import create_optimizer

    spec = config.get("optimizer")
    if not isinstance(spec, dict):
        return objects
    check_type(spec.get("type"), DEEPSPEED_OPTIMIZERS)
    if not names_ours(config):
        return objects  # DeepSpeed's own: accelerate's business
    dummies = [i for i, o in enumerate(objects) if isinstance(o, DummyOptim)]
    if len(dummies) != 1:
        raise ValueError(
            f"extrap_accel.prepare: the DeepSpeed config names the optimizer {spec.get('type')!r}; "
            "pass exactly one accelerate.utils.DummyOptim(model.parameters(), lr=..., "
            "weight_decay=...) in its place (extrap_accel.prepare builds it from the config), "
            'or remove the config\'s "optimizer" section and pass the optimizer itself'
        )
    dummy = objects[dummies[0]]
    if dummy.kwargs:
        raise ValueError(
            f"extrap_accel.prepare: DummyOptim(..., {', '.join(dummy.kwargs)}=...): only lr and "
            'weight_decay fill the config\'s "auto" values; put the others in the DeepSpeed '
            "config's optimizer params"
        )
    name, kwargs = resolve(spec, "accelerate", {"lr": dummy.lr, "weight_decay": dummy.weight_decay})
    optimizer = create_optimizer(name, dummy.params, **kwargs)
    return (*objects[: dummies[0]], optimizer, *objects[dummies[0] + 1 :])


def _fsdp_version(accelerator) -> int:
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    return int(getattr(plugin, "fsdp_version", 1) or 1)


def _model_of(optimizer: ExtrapOptimizer, models: list[nn.Module]) -> nn.Module | None:
    params = {p for g in optimizer.param_groups for p in g["params"]}
    for model in models:
        module = model if _is_fsdp2_module(model) else unwrap_module(model)
        if any(p in params for p in module.parameters()):
            return model
    return None


def _register_checkpoint_hooks(accelerator, registry: list[ExtrapOptimizer]) -> None:
    from accelerate.utils import DistributedType

    def save_hook(models, weights, output_dir):
        if registry:  # (under DeepSpeed the engine adapter saves instead)
            checkpoint.save(output_dir, registry, accelerator.process_index)

    def load_hook(models, input_dir):
        if not registry:
            return
        # Runs on every rank. DDP and one process: before accelerate loads the optimizers,
        # so each one applies its staged local state right after its load_state_dict. FSDP:
        # after accelerate loaded the sharded model and optimizer state (load_state calls
        # load_fsdp_model and load_fsdp_optimizer before the hooks), so it is applied now.
        loaded = accelerator.distributed_type == DistributedType.FSDP
        states = checkpoint.read(input_dir, accelerator.process_index, len(registry))
        if states is not None and len(states) != len(registry):
            raise ValueError(
                f"{checkpoint.path(input_dir, accelerator.process_index)} holds the state of "
                f"{len(states)} extrap_accel optimizers, but {len(registry)} were prepared"
            )
        # one process without FSDP: the optimizer's own state dict already holds x̃ and its
        # local state (accelerate saves an FSDP optimizer through DCP: the files are needed)
        optional = accelerator.num_processes == 1 and not loaded
        decision = checkpoint.agree(states, input_dir, optional=optional)
        checkpoint.apply(decision, registry, states, staged=not loaded)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
