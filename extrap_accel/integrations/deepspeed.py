"""DeepSpeed engines: where x̃ lives at each ZeRO stage.

``attach(engine, optimizer)`` (or ``extrap_accel.prepare`` under accelerate with a DeepSpeed
config) installs a :class:`DeepSpeedExtrapolation` adapter:

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
import warnings
from typing import Any

import torch
from torch import Tensor

from .. import _dist
from ..optim.base import NOISE_EXTRAPOLATIONS, ExtrapOptimizer

# variant / option -> ZeRO stages where it is correct (README, section "DeepSpeed")
SUPPORT = {
    "past": (0, 1, 2, 3),
    "gaussian": (0, 1, 2, 3),
    "uniform": (0, 1, 2, 3),
    "filterwise": (0, 1, 2),  # needs whole tensors (filter norms)
    # "stochastic": ZeRO-0 in fp32 only, which no stage column can say (check_variant)
    "fresh": (),  # a second backward would run DeepSpeed's reduction
}


_LOCAL_KEYS = ("extrap_momentum_buffer", "extrap_exp_avg", "extrap_exp_avg_sq", "extrap_step")


def local_state_path(checkpoint_dir: str, rank: int) -> str:
    return os.path.join(checkpoint_dir, f"extrap_accel_rank{rank}.pt")


def check_variant(extrapolation: str, filterwise: bool, stage: int, direct: bool) -> None:
    """Refuse a variant at a ZeRO stage where it cannot be correct (the SUPPORT table).
    ``direct``: ZeRO-0 in fp32, where DeepSpeed steps our optimizer on the module itself."""
    variant = "filterwise" if filterwise else extrapolation
    if variant == "stochastic":
        if direct:
            return
        raise NotImplementedError(
            "extrapolation='stochastic' needs the whole averaged gradient in .grad, which "
            "DeepSpeed leaves there only at ZeRO-0 in fp32: use extrapolation='past', or ZeRO-0 "
            "without bf16/fp16"
        )
    if variant in SUPPORT and stage not in SUPPORT[variant]:
        allowed = ", ".join(map(str, SUPPORT[variant])) or "none"
        raise NotImplementedError(
            f"extrapolation={variant!r} is not correct at DeepSpeed ZeRO stage {stage} "
            f"(supported stages: {allowed}); use extrapolation='past' or change the stage"
        )


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
        check_variant(group["extrapolation"], bool(group.get("filterwise")), stage, direct)


def _offload_device(config) -> str | None:
    """The device of a ZeRO offload config (None when absent); accelerate's DeepSpeed plugin
    writes ``{"device": "none"}`` sections, which offload nothing."""
    if config is None:
        return None
    device = config.get("device") if isinstance(config, dict) else getattr(config, "device", None)
    return None if device is None else str(getattr(device, "value", device)).lower()


class DeepSpeedExtrapolation:
    """The engine adapter; also the anchor source of the module's :class:`AttachHandle`."""

    def __init__(self, engine, optimizer: ExtrapOptimizer):
        check_supported(engine, optimizer)
        self.engine = engine
        self.optimizer = optimizer
        self.stage = engine.zero_optimization_stage()
        self.fp16 = engine.fp16_enabled()
        self.direct = self.stage == 0 and not (self.fp16 or engine.bfloat16_enabled())
        self.state: dict[Tensor, dict[str, Any]] = {}
        self.training = True
        # elements of δ ≠ 0 that rounded to nothing / elements of δ ≠ 0, counted on the device
        # (no host sync) at every ``rounding_sample_every``-th placement, the first included
        self.rounded: list[Tensor | int] = [0, 0]
        self.rounding_sample_every = 16
        self._placements = 0
        if self.direct:
            scaler = getattr(engine, "torch_autocast_z0_gradscaler", None)
            if scaler is not None:
                optimizer.set_grad_scaler(scaler)
        else:
            optimizer.base_update_only = True
            optimizer.anchor_source = self
            optimizer._capture.dtype = torch.float32
            optimizer._capture.follow_grad = False
            optimizer._capture.missing_is_zero = True  # DeepSpeed's update feeds zeros too
            optimizer._capture.force_active()
        optimizer.stepped_by_deepspeed = True
        self._sync_param_groups()
        self._undo_eager_noise()
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

    def _sync_param_groups(self) -> None:
        """DeepSpeed drops empty param groups from the optimizer: drop them from the model's
        groups too, so that group i's settings stay with group i's parameters."""
        opt = self.optimizer
        groups = opt._model_param_groups
        if len(groups) != len(opt.param_groups):
            kept = [g for g in groups if g]
            if len(kept) != len(opt.param_groups):
                raise RuntimeError(
                    f"the optimizer has {len(opt.param_groups)} param groups but was built with "
                    f"{len(groups)}: add param groups before deepspeed.initialize"
                )
            opt._model_param_groups = kept

    @torch.no_grad()
    def _undo_eager_noise(self) -> None:
        """A noise-variant optimizer built before deepspeed.initialize created the process group
        put x̃₀ into the weights at once (with rank 0's noise), and DeepSpeed then broadcast
        rank 0's weights and built its master from them: put rank 0's x₀ back into the weights
        and the master; x̃₀ is placed again, per rank, by attach_engine."""
        x0 = self.optimizer._take_back_eager_noise()
        for p, anchor in x0.items():
            if self._sharded(p) and anchor.numel() != p.ds_numel:  # from the partitioned one
                continue
            target = self._target(p)
            target.copy_(self._local_slice(p, anchor).to(target.dtype).view_as(target))
        if x0 and not self.direct:
            self.engine.optimizer.refresh_fp32_params()
            self._refresh_gathered()

    def _wrap(self, name: str, method) -> None:
        original = getattr(self.engine, name)
        self._original[name] = original

        def wrapper(*args, **kwargs):
            return method(original, *args, **kwargs)

        setattr(self.engine, name, wrapper)

    # ---------------------------------------------------------------- anchor source protocol
    def managed_params(self) -> list[Tensor]:
        return self.optimizer.managed_params()

    def displaced(self) -> list[tuple[Tensor, Tensor]]:
        """(parameter, anchor) for the whole tensors holding x̃ (ZeRO-0/1/2, persistent ZeRO-3)."""
        if not self.training:
            return []
        return [(p, s["anchor"]) for p, s in self.state.items()
                if "anchor" in s and not self._sharded(p)]  # fmt: skip

    def move_anchor_(self, p: Tensor, value: Tensor) -> Tensor | None:
        if p in self.state and "anchor" in self.state[p]:
            raise RuntimeError(
                "loading weights into a DeepSpeed model with module.load_state_dict would leave "
                "DeepSpeed's fp32 master (the anchor) unchanged: load with "
                "engine.load_checkpoint / accelerator.load_state"
            )
        return None

    @contextlib.contextmanager
    def anchor_forward(self):
        with self.anchor_in_weights():
            yield

    def set_mode(self, train: bool) -> None:
        """optimizer.eval()/train() under DeepSpeed: the anchor into the weights, or x̃ back."""
        if train != self.training:
            self._swap_all()
            self.training = train

    # ---------------------------------------------------------------- inspection
    def anchor(self, p: Tensor) -> Tensor:
        """The anchor this rank holds for ``p`` (whole, or its ZeRO-3 shard); bit16 off direct."""
        if self.direct:
            return self.optimizer.anchor(p)
        state = self.state.get(p)
        if state is None or "anchor" not in state:
            return self._target(p)
        return state["anchor"] if self.training else self._target(p)

    def point(self, p: Tensor) -> Tensor:
        """This rank's x̃ of ``p`` as its forward reads it (whole, or its ZeRO-3 shard)."""
        if self.direct:
            return self.optimizer.extrapolated(p)
        state = self.state.get(p)
        if not self.training and state is not None and "anchor" in state:
            return state["anchor"]
        return self._target(p)

    def local_state(self, p: Tensor) -> dict[str, Any]:
        """This rank's local extrapolation state of ``p`` (local moments)."""
        state = self.optimizer.state if self.direct else self.state
        return {k: v for k, v in state.get(p, {}).items() if k in _LOCAL_KEYS}

    # ---------------------------------------------------------------- where the weights are
    @staticmethod
    def _sharded(p: Tensor) -> bool:
        return hasattr(p, "ds_tensor")

    def _refresh_gathered(self) -> None:
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

    def _shard_range(self, p: Tensor) -> tuple[int, int]:
        """[start, start + n) of the flattened ``p`` held by this rank's shard (ZeRO-3)."""
        size = p.ds_tensor.ds_numel
        start = size * self.optimizer.rank
        return start, max(0, min(size, p.ds_numel - start))

    def _target(self, p: Tensor) -> Tensor:
        """The tensor this rank holds of ``p``: whole weights, or its ZeRO-3 shard."""
        if not self._sharded(p):
            return p.data
        return p.ds_tensor.view(-1)[: self._shard_range(p)[1]]

    def _local_slice(self, p: Tensor, local_grad: Tensor) -> Tensor:
        """The part of this rank's local gradient that matches ``_target(p)``."""
        if not self._sharded(p):
            return local_grad
        start, n = self._shard_range(p)
        return local_grad.view(-1)[start : start + n]

    def _swap_all(self) -> None:
        for p, s in self.state.items():
            if "anchor" in s:
                target = self._target(p)
                tmp = target.clone()
                target.copy_(s["anchor"])
                s["anchor"].copy_(tmp)
        self._refresh_gathered()

    def needs_anchor_forward(self) -> bool:
        return self.training and any("anchor" in s for s in self.state.values())

    @contextlib.contextmanager
    def anchor_in_weights(self):
        """The anchor in the weights inside the block, x̃ back afterwards (exact swaps)."""
        swap = self.needs_anchor_forward()
        if swap:
            self.set_mode(False)  # also tells the module hooks there is nothing to substitute
        try:
            yield
        finally:
            if swap:
                self.set_mode(True)

    def _with_anchor_in_weights(self, original, *args, **kwargs):
        with self.anchor_in_weights():
            return original(*args, **kwargs)

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
            self.optimizer._capture.reset()
        return out

    @torch.no_grad()
    def place_initial_noise(self) -> None:
        """x̃₀ = x₀ + ξ₀ in the noise groups before the first step (the others start at x₀)."""
        self.optimizer._initial_placement_pending = False
        self._place([float(g["lr"]) for g in self.optimizer.param_groups], 1.0, initial=True)
        self._refresh_gathered()  # ZeRO-3: the shards changed outside a step

    @torch.no_grad()
    def _place(self, lrs: list[float], scale: float, initial: bool = False) -> None:
        """x̃ = x − γ̃·d (or x + ξ) from the fresh anchor DeepSpeed just wrote, rounded once."""
        opt = self.optimizer
        if not initial:
            opt._resolve_world_size()
        if scale != 1.0:  # fp16: the hooks saw the scaled gradient
            grads = [g for p in opt.managed_params() if (g := opt._capture.get(p)) is not None]
            if grads:
                torch._foreach_mul_(grads, 1.0 / scale)
        coefs = {} if initial else opt._local_clip_coef()
        sample = not initial and self._placements % self.rounding_sample_every == 0
        self._placements += not initial
        for i, (group, params, lr) in enumerate(zip(opt.param_groups, opt._model_param_groups,
                                                    lrs)):  # fmt: skip
            noise = group["extrapolation"] in NOISE_EXTRAPOLATIONS
            if initial and not noise:
                continue
            gamma = opt._extrap_lr(group, lr)
            for p in params:
                if not p.requires_grad:  # frozen: no master, DeepSpeed never restores it
                    continue
                local = None if initial else opt._capture.get(p)
                if local is None and not initial:
                    continue
                target = self._target(p)
                if target.numel() == 0:
                    continue
                state = self.state.setdefault(p, {})
                anchor = state.get("anchor")
                if anchor is None:
                    anchor = state["anchor"] = target.clone()
                else:
                    anchor.copy_(target)
                x = anchor.float()
                out = torch.empty_like(x)
                if noise:
                    from ..optim.directions import place_noise_

                    place_noise_([out], [x], group=group, generator=opt._generator)
                else:
                    gk = self._local_slice(p, local)
                    opt._extrapolate_into(group, out, x, gk.float(), state,
                                          local_coef=coefs.get(i, 1.0), extrap_lr=gamma)  # fmt: skip
                if sample and anchor.dtype != torch.float32:
                    moved = out != x
                    self.rounded[0] += (moved & (out.to(anchor.dtype) == anchor)).sum()
                    self.rounded[1] += moved.sum()
                target.copy_(out)

    @property
    def rounded_to_zero_fraction(self) -> float:
        """Fraction of the displacement's nonzero elements that rounding to bit16 erased
        (sampled: every ``rounding_sample_every``-th step, the first included; set it to 1 to
        count every step)."""
        gone, moved = (int(n) for n in self.rounded)
        return gone / moved if moved else 0.0

    # ---------------------------------------------------------------- checkpoints
    def local_state_dict(self) -> dict[str, Any]:
        """This rank's x̃ (whole or its shard) and local state, keyed by parameter index."""
        if self.direct:
            return self.optimizer.local_state_dict()
        index = {p: i for i, p in enumerate(self.optimizer.managed_params())}
        state = {}
        for p, s in self.state.items():
            if "anchor" not in s:
                continue
            target = self._target(p)
            point = target if self.training else s["anchor"]
            state[index[p]] = {**{k: v for k, v in s.items() if k != "anchor"},
                               "extrapolated": point.clone()}  # fmt: skip
        opt = self.optimizer
        return {
            "format": 1, "rank": opt.rank, "stage": self.stage, "state": state,
            "world_size": opt._world_size or opt._checkpoint_world_size,
            "generators": {str(d): g.get_state() for d, g in opt._generators.items()},
        }  # fmt: skip

    @torch.no_grad()
    def load_local_state_dict(self, local: dict[str, Any]) -> None:
        if self.direct:
            return self.optimizer.load_local_state_dict(local)
        opt = self.optimizer
        if local.get("rank") != opt.rank or local.get("stage") != self.stage:
            raise ValueError(
                f"this local extrapolation state was saved by rank {local.get('rank')} at ZeRO "
                f"stage {local.get('stage')}; this is rank {opt.rank} at stage {self.stage}"
            )
        params = opt.managed_params()
        self._anchor_into_weights()  # x̃ placed since the weights were loaded (x̃₀ at attach)
        for idx, entry in local["state"].items():
            p = params[int(idx)]
            target = self._target(p)
            state = self.state[p] = {"anchor": target.clone()}  # the weights hold the anchor now
            for key, value in entry.items():
                if key == "extrapolated":
                    target.copy_(value)
                elif torch.is_tensor(value):
                    state[key] = value.to(target.device, copy=True)
                else:
                    state[key] = value
        self.training = True
        self._refresh_gathered()
        opt._checkpoint_world_size = local.get("world_size")
        opt._generators.clear()
        opt._pending_generator_states = {d: s.clone() for d, s in local["generators"].items()}

    def _save_checkpoint(self, original, save_dir, tag=None, *args, **kwargs):
        if tag is None:
            tag = f"global_step{self.engine.global_steps}"
        local = self.local_state_dict()
        context = contextlib.nullcontext() if self.direct else self.anchor_in_weights()
        with context:  # (direct: the module's state-dict hook already substitutes the anchor)
            out = original(save_dir, tag, *args, **kwargs)
        path = local_state_path(os.path.join(save_dir, str(tag)), self.optimizer.rank)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(local, path)
        return out

    def _load_checkpoint(self, original, load_dir, tag=None, *args, **kwargs):
        was_training, kept = self.training, self.state
        if not self.direct:
            # Never let a load path copy x̃ from the weights into the master: the anchor goes
            # back into the weights, and x̃ comes back below from this rank's own file.
            if self.training:
                self._swap_all()
            self.state, self.training = {}, True
        result = original(load_dir, tag, *args, **kwargs)
        path = result[0] if isinstance(result, tuple) else result
        options = inspect.signature(original).bind_partial(load_dir, tag, *args, **kwargs)
        weights_only = bool(options.arguments.get("load_module_only")) or not (
            options.arguments.get("load_optimizer_states", True))
        where = str(load_dir) if path is None else (
            os.path.dirname(path) if os.path.isfile(path) else path)
        local = None if path is None or weights_only else self._read_local_file(where)
        if not self.restore_on_every_rank(local, where, found=path is not None,
                                          weights_only=weights_only):  # fmt: skip
            # no rank found a checkpoint: DeepSpeed changed nothing, and neither do we
            if not self.direct:
                self.state = kept
                if was_training:
                    self._swap_all()  # x̃ back into the weights
                self.training = was_training
        return result

    def restore_on_every_rank(self, local: dict[str, Any] | None, where: str, found: bool = True,
                              weights_only: bool = False) -> bool:  # fmt: skip
        """After DeepSpeed loaded a checkpoint (``found``; ``weights_only``: without optimizer
        state), put this rank's x̃ and local state back from ``local`` (its file in ``where``,
        None if it has none), deciding the same way on every rank (one all-reduce): either each
        rank has its own file, saved with this number of processes, or none has (a checkpoint
        saved without extrap_accel, or converted to a universal one: every rank starts again
        from the anchor, with a warning). Anything else — also a checkpoint that only some
        ranks found — raises on every rank, instead of leaving a rank on another's x̃ or
        waiting in a collective. False if no rank found a checkpoint (nothing was loaded)."""
        world = _dist.world_size()
        saved_k = None if local is None else (local.get("world_size") or world)
        # [ranks that found the checkpoint, ranks with a file, ranks whose file is for another
        # number of processes]
        flags = torch.tensor([found, local is not None, saved_k not in (None, world)],
                             dtype=torch.int64, device=self.engine.device)  # fmt: skip
        if _dist.is_initialized():
            torch.distributed.all_reduce(flags)
        n_found, with_file, other_k = (int(f) for f in flags)
        if n_found == 0:
            return False
        if n_found < world:
            raise ValueError(
                f"DeepSpeed found the checkpoint in {where} on {n_found} of {world} ranks only: "
                "every rank must load it (copy the checkpoint folder to every node's disk, or "
                "load from a shared file system)"
            )
        if weights_only:  # the optimizer state starts afresh, and so does the local one
            self._restart_local_state()
            return True
        if other_k or 0 < with_file < world:
            raise ValueError(
                f"{where} holds extrap_accel's per-rank state for {with_file} of {world} ranks"
                + (f" (saved with {saved_k} processes)" if saved_k not in (None, world) else "")
                + "; each rank's x̃ and local moments belong to one data-parallel worker: resume "
                "with the number of processes that saved it, with every rank's "
                "extrap_accel_rank<r>.pt in that folder (copy them from each node's disk), or "
                "remove them all to restart the local extrapolation state from the anchor"
            )
        if local is None:
            if world > 1:
                warnings.warn(
                    f"extrap_accel: {where} has no local extrapolation state (saved without "
                    "extrap_accel, or a universal checkpoint); every rank starts again from "
                    "the anchor with fresh local moments",
                    stacklevel=3,
                )
            if world > 1 or not self.direct:  # (one direct process: its state dict holds x̃)
                self._restart_local_state()
            return True
        self.load_local_state_dict(local)
        return True

    @torch.no_grad()
    def _restart_local_state(self) -> None:
        """x̃ = anchor and fresh local moments on this rank; the noise variants place x̃₀."""
        if self.direct:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.optimizer.reset_local_state()
            self.optimizer.place_initial_noise()
            return
        self._anchor_into_weights()
        self.place_initial_noise()

    def _anchor_into_weights(self) -> None:
        """Drop x̃ and the local state: the anchor back into the weights (train mode)."""
        if self.training:
            for p, s in self.state.items():
                if "anchor" in s:
                    self._target(p).copy_(s["anchor"])
        self.state.clear()
        self.training = True

    def read_local_state(self, load_dir: str, tag: str | None = None) -> dict[str, Any] | None:
        """This rank's saved x̃ and local state in a checkpoint folder, or None if it has none.
        ``tag`` as in ``engine.load_checkpoint``: None reads ``<load_dir>/latest``."""
        if tag is None:
            latest = os.path.join(load_dir, "latest")
            if not os.path.isfile(latest):
                return None
            with open(latest) as f:
                tag = f.read().strip()
        return self._read_local_file(os.path.join(load_dir, str(tag)))

    def restore_local_state(self, load_dir: str, tag: str | None = None) -> bool:
        """Put this rank's x̃ and local state back from a checkpoint the engine loaded before
        the adapter was attached (the weights hold the anchor then). False if the checkpoint
        has no file for this rank."""
        if self._placements:
            raise RuntimeError(
                "restore_local_state: this adapter has already placed x̃; load the checkpoint "
                "with engine.load_checkpoint instead"
            )
        local = self.read_local_state(load_dir, tag)
        if local is None:
            return False
        self.load_local_state_dict(local)
        return True

    def _read_local_file(self, tag_dir: str) -> dict[str, Any] | None:
        path = local_state_path(tag_dir, self.optimizer.rank)
        if not os.path.exists(path):
            return None
        return torch.load(path, map_location="cpu", weights_only=True)


def attach_engine(engine, optimizer=None):
    """Install the adapter on a DeepSpeed engine and make its module anchor-safe."""
    from ..attach import AttachHandle, _unwrap_optimizer

    opt = _unwrap_optimizer(optimizer if optimizer is not None else engine.optimizer)
    existing = getattr(engine, "_extrap_accel_adapter", None)
    if existing is not None:
        if existing.optimizer is opt:
            return existing
        raise RuntimeError("this DeepSpeed engine is already attached to another optimizer")
    adapter = DeepSpeedExtrapolation(engine, opt)
    engine._extrap_accel_adapter = adapter
    adapter.handle = AttachHandle(engine.module, opt if adapter.direct else adapter)
    if opt._initial_placement_pending:
        (opt if adapter.direct else adapter).place_initial_noise()
    return adapter


# DeepSpeed JSON "optimizer" types that name ours (class names and registry names)
def _our_optimizer_name(type_name: str) -> str | None:
    from ..optim.registry import list_optimizers

    aliases = {"ExtrapSGD": "extrap_sgd", "ExtrapAdam": "extrap_adam"}
    name = aliases.get(type_name, type_name)
    return name if name in list_optimizers() and name.startswith("extrap") else None


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

    from ..attach import _unwrap_optimizer
    from ..optim.registry import create_optimizer

    if isinstance(config, (str, os.PathLike)):
        with open(config) as f:
            config = json.load(f)
    config = dict(config)
    spec = config.get("optimizer")
    if optimizer is None and spec is not None:
        type_name = spec.get("type", "")
        ours = _our_optimizer_name(type_name)
        if ours is not None:
            config.pop("optimizer")
            params = model_parameters if model_parameters is not None else model.parameters()
            optimizer = create_optimizer(ours, params, **spec.get("params", {}))
        elif type_name.lower() not in DEEPSPEED_OPTIMIZERS:
            raise ValueError(
                f"unknown optimizer type {type_name!r} in the DeepSpeed config: use one of "
                f"ExtrapSGD, ExtrapAdam, the extrap_accel registry names "
                f"(extrap_accel.list_optimizers()) or a DeepSpeed built-in "
                f"({', '.join(sorted(DEEPSPEED_OPTIMIZERS))})"
            )
    extrap = optimizer is not None
    try:
        _unwrap_optimizer(optimizer)
    except TypeError:
        extrap = False
    if extrap:
        config.setdefault("zero_allow_untested_optimizer", True)
    out = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                               model_parameters=model_parameters, **kwargs)  # fmt: skip
    if extrap:
        attach_engine(out[0], optimizer)
    return out
