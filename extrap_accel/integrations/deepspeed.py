"""DeepSpeed engines: where x̃ lives at each ZeRO stage.

``attach(engine, optimizer)`` (or ``extrap_accel.prepare`` under accelerate with a DeepSpeed
config) installs a :class:`DeepSpeedExtrapolation` adapter, which binds the optimizer to the engine's
slots (a subclass of the core, ``extrap_accel.optim.core``):

- ZeRO-0 in fp32: DeepSpeed steps the model weights themselves with our optimizer ("direct"):
  the optimizer keeps its anchor copy and x̃ exactly as on one process.
- ZeRO-0 bf16 and ZeRO-1/2 (any precision): DeepSpeed's fp32 master (this rank's partition)
  is the anchor; our optimizer does only the base update on it. After each applied
  ``engine.step()`` DeepSpeed has written the anchor into every rank's full bit16 weights; the
  adapter keeps a bit16 copy of it, computes this rank's local direction in fp32 from its own
  captured gradient and local moments, and writes x̃ = x₁₆ − γ̃·d into the weights: computed
  in fp32 from the bit16 anchor x₁₆ the forward reads, rounded once (the fp32 master of the
  other ranks' partitions is not available without communication).
  The next step overwrites the weights from the master again, so nothing stacks.
- ZeRO-3: weights are sharded (``p.ds_tensor``). Each rank perturbs the shard it owns with the
  slice of its own local direction, so all ranks compute at the same *mixed* point
  x + [δ⁰ on shard 0 | δ¹ on shard 1 | …]. This holds for every parameter, also those kept
  whole by ``stage3_param_persistence_threshold``: the shards are perturbed inside the step,
  before DeepSpeed all-gathers the persistent parameters, so no communication is added and
  every later re-gather (DeepSpeed re-gathers in backward when it re-traces) sees the same
  point. Swapping the anchor in or out (evaluation, save) and loading change the shards
  outside the step: the adapter then releases every full copy DeepSpeed keeps gathered
  (persistent parameters, and others within the reuse distance, e.g. between micro-steps) and
  re-gathers the persistent ones (one collective per swap or load, none per training step).

Only the anchor is ever evaluated or saved: no-grad forwards, ``engine.module.state_dict()``,
``save_checkpoint`` / ``load_checkpoint`` and ZeRO-3's consolidated state dict run with the
anchor in the weights; each rank saves its own x̃ and local state beside the checkpoint.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from typing import Any

import torch
from torch import Tensor

from .. import _dist, checkpoint
from ..capture import CaptureMode
from ..handle import AttachHandle, unwrap_optimizer
from ..optim.base import ExtrapOptimizer
from ..optim.core import Core
from ..optim.registry import check_deepspeed_variant, variant_info
from ._placing import PlacingAdapter


def check_supported(engine, optimizer: ExtrapOptimizer) -> None:
    """Fail at setup, with what to do instead, for every combination that cannot be correct."""
    stage = engine.zero_optimization_stage()
    name = type(engine).__name__
    if name == "PipelineEngine" or hasattr(engine, "is_pipe_parallel") and engine.is_pipe_parallel:
        raise NotImplementedError(
            "extrap_accel does not support DeepSpeed pipeline parallelism: use data "
            "parallelism (ZeRO-0/1/2/3) without a PipelineModule"
        )
    offloaded = [
        key for key, config in (("offload_optimizer", engine.zero_offload_optimizer()),
                                ("offload_param", engine.zero_offload_param()))
        if _offload_device(config) not in ("none", None)
    ]  # fmt: skip
    if offloaded:
        raise NotImplementedError(
            "extrap_accel does not support ZeRO offload (the optimizer step would run on the "
            "CPU copy, out of reach of the per-rank extrapolation): set the device of "
            f"{' and '.join(offloaded)} to \"none\" in the DeepSpeed config"
        )
    if stage == 3 and not hasattr(engine.optimizer, "_post_step"):
        raise RuntimeError(
            "this ZeRO-3 DeepSpeed engine was built without a training optimizer (for "
            "inference; the Trainer builds one when evaluate() or predict() runs before "
            "train()): call train() first, or create a new Trainer for training"
        )
    hpz = getattr(engine, "zero_hpz_partition_size", lambda: 1)()
    if stage == 3 and hpz and hpz > 1:
        raise NotImplementedError(
            "extrap_accel does not support ZeRO++ hierarchical partitioning "
            f"(zero_hpz_partition_size={hpz}): its secondary copies of the weight shards would "
            "not see x̃ placed or the anchor swapped in; set zero_hpz_partition_size to 1"
        )
    if stage == 0 and engine.fp16_enabled():
        raise NotImplementedError(
            "DeepSpeed ZeRO-0 with fp16 is broken upstream (the loss is never scaled in "
            "backward while step() unscales; DeepSpeed PR #8393): use bf16, or fp16 with "
            "ZeRO stage 1 or 2"
        )
    direct = stage == 0 and not (engine.fp16_enabled() or engine.bfloat16_enabled())
    for group in optimizer.param_groups:
        info = variant_info(group["extrapolation"], bool(group.get("filterwise")))
        check_deepspeed_variant(info, stage, direct)


def _offload_device(config) -> str | None:
    """The device of a ZeRO offload config (None when absent); accelerate's DeepSpeed plugin
    writes ``{"device": "none"}`` sections, which offload nothing."""
    if config is None:
        return None
    device = config.get("device") if isinstance(config, dict) else getattr(config, "device", None)
    return None if device is None else str(getattr(device, "value", device)).lower()


class _ZeroCore(Core):
    """The slots of a DeepSpeed engine: whole bit16 weights (ZeRO-0 bf16/1/2, persistent ZeRO-3
    parameters) or this rank's own ZeRO-3 shard. The anchor copies are bit16 (the forward's
    x₁₆); the fp32 master stays the anchor DeepSpeed updates."""

    pointer_swap = False  # the weights are views into DeepSpeed's flat buffers

    def __init__(self, adapter: DeepSpeedExtrapolation):
        self.entries: dict[Tensor, dict[str, Any]] = {}
        super().__init__(lambda: self.entries)
        self.adapter = adapter

    def weight(self, p: Tensor) -> Tensor:
        if not _sharded(p):
            return p.data
        return p.ds_tensor.view(-1)[: self.adapter.shard_range(p)[1]]

    def displaced(self) -> list[tuple[Tensor, Tensor]]:
        return [(p, a) for p, a in super().displaced() if not _sharded(p)]

    def changed(self) -> None:
        self.adapter.refresh_gathered()

    def move_anchor_(self, p: Tensor, value: Tensor) -> Tensor | None:
        if self.is_displaced(p):
            raise RuntimeError(
                "loading weights into a DeepSpeed model with module.load_state_dict would leave "
                "DeepSpeed's fp32 master (the anchor) unchanged: load with "
                "engine.load_checkpoint / accelerator.load_state"
            )
        return None


def _sharded(p: Tensor) -> bool:
    return hasattr(p, "ds_tensor")


class DeepSpeedExtrapolation(PlacingAdapter):
    """The engine adapter: binds the optimizer to the engine's slots and places x̃ after each
    applied step; the module's :class:`AttachHandle` reads the anchor through the optimizer."""

    def __init__(self, engine, optimizer: ExtrapOptimizer):
        check_supported(engine, optimizer)
        self.engine = engine
        self.optimizer = optimizer
        self.stage = engine.zero_optimization_stage()
        self.fp16 = engine.fp16_enabled()
        self.direct = self.stage == 0 and not (self.fp16 or engine.bfloat16_enabled())
        self._init_rounding()
        groups = self._model_param_groups()
        if self.direct:
            optimizer.bind(backend="deepspeed", model_param_groups=groups)
            scaler = getattr(engine, "torch_autocast_z0_gradscaler", None)
            if scaler is not None:
                optimizer.set_grad_scaler(scaler)
        else:
            optimizer.bind(
                backend="deepspeed", core=_ZeroCore(self), base_update_only=True,
                layout=f"deepspeed-zero{self.stage}", model_param_groups=groups,
                capture=CaptureMode(dtype=torch.float32, follow_grad=False, missing_is_zero=True,
                                    always=True),  # DeepSpeed's update feeds zeros too
            )  # fmt: skip
        self.core = optimizer.core
        self._original = {}
        self._wrap("step", self._step)
        self._wrap("save_checkpoint", self._save_checkpoint)
        self._wrap("load_checkpoint", self._load_checkpoint)
        self._pending: tuple | None = None
        if self.stage == 3:
            self._wrap("_zero3_consolidated_16bit_state_dict", self._with_anchor_in_weights)
            zero = engine.optimizer
            post_step = zero._post_step

            def _post_step(*args, **kwargs):  # fp32 master → shards done, persistent not gathered
                if self._pending is not None:
                    self._place(*self._pending)
                    self._pending = None
                return post_step(*args, **kwargs)

            zero._post_step = _post_step

    def _model_param_groups(self) -> list[tuple[Tensor, ...]]:
        """DeepSpeed drops empty param groups from the optimizer: drop them from the model's
        groups too, so that group i's settings stay with group i's parameters."""
        opt = self.optimizer
        groups = opt.model_param_groups
        if len(groups) != len(opt.param_groups):
            groups = tuple(g for g in groups if g)
            if len(groups) != len(opt.param_groups):
                raise RuntimeError(
                    f"the optimizer has {len(opt.param_groups)} param groups but was built with "
                    f"{len(opt.model_param_groups)}: add param groups before deepspeed.initialize"
                )
        return list(groups)

    def _wrap(self, name: str, method) -> None:
        original = getattr(self.engine, name)
        self._original[name] = original

        def wrapper(*args, **kwargs):
            return method(original, *args, **kwargs)

        setattr(self.engine, name, wrapper)

    # ---------------------------------------------------------------- where the weights are
    def refresh_gathered(self) -> None:
        """ZeRO-3, after the shards changed outside a step (swap, load): no full copy may keep
        the old values. DeepSpeed keeps parameters gathered between uses — persistent ones
        always, others within ``stage3_max_reuse_distance`` (e.g. between the micro-steps of
        gradient accumulation) — and its ``all_gather`` skips a parameter that is AVAILABLE.
        So release every full copy (``partition`` of a parameter that has a shard only frees
        ``p.data``; it writes nothing back) and gather the persistent ones again (a collective;
        every rank holds the same list). The others are gathered from the shards when next used.
        """
        if self.stage != 3:
            return
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        gathered = [p for p in self.engine.module.parameters()
                    if getattr(p, "ds_status", None) == ZeroParamStatus.AVAILABLE]  # fmt: skip
        if gathered:
            gathered[0].partition(gathered)
        persistent = getattr(self.engine.optimizer, "persistent_parameters", None)
        if persistent:
            persistent[0].all_gather(persistent)

    def shard_range(self, p: Tensor) -> tuple[int, int]:
        """[start, start + n) of the flattened ``p`` held by this rank's shard (ZeRO-3)."""
        size = p.ds_tensor.ds_numel
        start = size * self.optimizer.rank
        return start, max(0, min(size, p.ds_numel - start))

    def local_slice(self, p: Tensor, local_grad: Tensor) -> Tensor:
        """The part of this rank's local gradient that matches its slot of ``p``."""
        if not _sharded(p):
            return local_grad
        start, n = self.shard_range(p)
        return local_grad.view(-1)[start : start + n]

    def _with_anchor_in_weights(self, original, *args, **kwargs):
        """ZeRO-3's consolidated state dict, built at the anchor. With one rank a gathered
        weight is the shard's own storage (and ``.cpu()`` of a CPU tensor does not copy), so the
        dict would change back to x̃ when the shards do: such entries are copied first."""
        with self.core.at_anchor():
            state = original(*args, **kwargs)
            if state:
                live = {t.untyped_storage().data_ptr()
                        for p in self.engine.module.parameters()
                        for t in (p.data, getattr(p, "ds_tensor", None))
                        if t is not None and t.numel()}  # fmt: skip
                for name, value in state.items():
                    if torch.is_tensor(value) and value.numel() and (
                        value.untyped_storage().data_ptr() in live
                    ):
                        state[name] = value.clone()
        return state

    # ---------------------------------------------------------------- the step
    def _step(self, original, *args, **kwargs):
        boundary = self.engine.is_gradient_accumulation_boundary()
        if boundary and not self.training:
            raise RuntimeError(
                "engine.step() in eval mode (the weights hold the anchor): call "
                "optimizer.train() before training again"
            )
        lrs = [float(g["lr"]) for g in self.optimizer.param_groups]  # the rates of this update
        # the scale this step's backward used (DeepSpeed changes it in step() on overflow)
        scale = float(getattr(self.engine.optimizer, "loss_scale", 1.0)) if self.fp16 else 1.0
        if boundary and self.stage == 3:
            self._pending = (lrs, scale)  # placed inside the step, see _post_step
        try:
            out = original(*args, **kwargs)
        finally:
            self._pending = None
        if boundary:
            overflow = bool(getattr(self.engine.optimizer, "overflow", False))
            if not self.direct and not overflow and self.stage < 3:
                self._place(lrs, scale)
            self.optimizer.reset_local_grads()
        return out

    @torch.no_grad()
    def _place(self, lrs: list[float], scale: float) -> None:
        """x̃ = x − γ̃·d (or x + ξ) from the fresh anchor DeepSpeed just wrote, rounded once."""
        opt, core = self.optimizer, self.core
        opt.resolve_world_size()
        if scale != 1.0:  # fp16: the hooks saw the scaled gradient
            grads = [g for p in opt.managed_params() if (g := opt.local_grad(p)) is not None]
            if grads:
                torch._foreach_mul_(grads, 1.0 / scale)
        coefs = opt.local_clip_coefs()
        sample = self._sample_rounding()
        for i, (group, params, lr) in enumerate(zip(opt.param_groups, opt.model_param_groups,
                                                    lrs)):  # fmt: skip
            placed, xs, outs, gks, states = [], [], [], [], []
            for p in params:
                if not p.requires_grad:  # frozen: no master, DeepSpeed never restores it
                    continue
                local = opt.local_grad(p)
                target = core.weight(p)
                if local is None or target.numel() == 0:
                    continue
                core.ensure_anchor(p).copy_(target)  # the anchor DeepSpeed just wrote
                x = target.float()
                placed.append(p)
                xs.append(x)
                outs.append(torch.empty_like(x))
                gks.append(self.local_slice(p, local).float())
                states.append(core.state[p])
            if not placed:
                continue
            opt.place_next_(group, placed, outs=outs, anchors=xs, local_grads=gks, states=states,
                            lr=lr, local_coef=coefs.get(i, 1.0))  # fmt: skip
            for p, x, out in zip(placed, xs, outs):
                target = core.weight(p)
                if sample and target.dtype != torch.float32:
                    self._count_rounding(x, out, target.dtype)
                target.copy_(out)

    # ---------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, original, save_dir, tag=None, *args, **kwargs):
        if tag is None:
            tag = f"global_step{self.engine.global_steps}"
        # direct: the optimizer's state dict holds x̃ and the anchor, and the module's state-dict
        # hook substitutes the anchor; otherwise the bit16 weights must hold the anchor
        context = contextlib.nullcontext() if self.direct else self.core.at_anchor()
        with context:
            out = original(save_dir, tag, *args, **kwargs)
        checkpoint.save(os.path.join(save_dir, str(tag)), [self.optimizer], self.optimizer.rank)
        return out

    def _load_checkpoint(self, original, load_dir, tag=None, *args, **kwargs):
        core = self.core
        was_training, kept = core.training, None
        if not self.direct:
            # Never let a load path copy x̃ from the weights into the master: the anchor goes
            # into the weights, and x̃ comes back from this rank's own file.
            core.set_mode(False)
            kept, core.entries = core.entries, {}
            core.training = True
        result = original(load_dir, tag, *args, **kwargs)
        path = result[0] if isinstance(result, tuple) else result
        options = inspect.signature(original).bind_partial(load_dir, tag, *args, **kwargs)
        weights_only = bool(options.arguments.get("load_module_only")) or not (
            options.arguments.get("load_optimizer_states", True))
        where = str(load_dir) if path is None else (
            os.path.dirname(path) if os.path.isfile(path) else path)
        states = None if path is None or weights_only else self.read_local_state(where)
        if not self.restore(states, where, found=path is not None, weights_only=weights_only):
            # no rank found a checkpoint: DeepSpeed changed nothing, and neither do we
            if kept is not None:
                core.entries, core.training = kept, False
                core.set_mode(was_training)  # x̃ back into the weights
        return result

    def restore(self, states: list[dict] | None, where: str, found: bool = True,
                weights_only: bool = False) -> bool:  # fmt: skip
        """After DeepSpeed loaded a checkpoint (``found``; ``weights_only``: without optimizer
        state), put this rank's x̃ and local state back from ``states`` (read from its file in
        ``where``; None if it has none), deciding alike on every rank
        (``extrap_accel.checkpoint.agree``). False if no rank found a checkpoint."""
        one_direct = self.direct and _dist.world_size() == 1  # its state dict holds x̃
        decision = checkpoint.agree(None if weights_only else states, where, found=found,
                                    optional=one_direct or weights_only,
                                    device=self.engine.device)  # fmt: skip
        if decision == "none":
            return False
        # weights only: the optimizer state starts afresh, and so does the local one
        checkpoint.apply("restart" if weights_only else decision, [self.optimizer], states)
        return True

    def read_local_state(self, load_dir: str, tag: str | None = None) -> list[dict] | None:
        """This rank's saved local state in a checkpoint folder, or None if it has none.
        ``tag`` as in ``engine.load_checkpoint``: None reads ``<load_dir>/latest`` if present."""
        folder = load_dir
        if tag is None and os.path.isfile(os.path.join(load_dir, "latest")):
            with open(os.path.join(load_dir, "latest")) as f:
                tag = f.read().strip()
        if tag is not None:
            folder = os.path.join(load_dir, str(tag))
        return checkpoint.read(folder, self.optimizer.rank)


def attach_engine(engine, optimizer=None):
    """Install the adapter on a DeepSpeed engine and make its module anchor-safe."""
    opt = unwrap_optimizer(optimizer if optimizer is not None else engine.optimizer)
    existing = getattr(engine, "_extrap_accel_adapter", None)
    if existing is not None:
        if existing.optimizer is opt:
            return existing
        raise RuntimeError("this DeepSpeed engine is already attached to another optimizer")
    adapter = DeepSpeedExtrapolation(engine, opt)
    engine._extrap_accel_adapter = adapter
    adapter.handle = AttachHandle(engine.module, opt)
    return adapter


def initialize(model, config, optimizer=None, model_parameters=None, **kwargs):
    """``deepspeed.initialize`` that also builds an extrap_accel optimizer named in the config.

    ``"optimizer": {"type": "ExtrapSGD", "params": {...}}`` (or any ``extrap_*`` registry name)
    is built by the library (DeepSpeed only knows its built-in names), ZeRO's
    ``zero_allow_untested_optimizer`` is set, and the engine is attached. Returns what
    ``deepspeed.initialize`` returns.
    """
    import json

    import deepspeed
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    from ..optim.registry import create_optimizer
    from .optimizer_spec import check_type, registry_name, resolve

    if isinstance(config, (str, os.PathLike)):
        with open(config) as f:
            config = json.load(f)
    config = dict(config)
    spec = config.get("optimizer")
    if optimizer is None and spec is not None:
        check_type(spec.get("type"), DEEPSPEED_OPTIMIZERS)
        if registry_name(spec.get("type")) is not None:
            config.pop("optimizer")
            name, spec_kwargs = resolve(spec, "deepspeed", {})
            params = model_parameters if model_parameters is not None else model.parameters()
            optimizer = create_optimizer(name, params, **spec_kwargs)
    extrap = optimizer is not None
    try:
        unwrap_optimizer(optimizer)
    except TypeError:
        extrap = False
    if extrap:
        config.setdefault("zero_allow_untested_optimizer", True)
    out = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                               model_parameters=model_parameters, **kwargs)  # fmt: skip
    if extrap:
        attach_engine(out[0], optimizer)
    return out
