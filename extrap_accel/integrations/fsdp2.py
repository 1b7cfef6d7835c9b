"""FSDP2 (``torch.distributed.fsdp.fully_shard``): the ZeRO-3 semantics on DTensor shards.

``attach(model, optimizer)`` with a model to which ``fully_shard`` was applied (the root only or
per block) and an optimizer built on its DTensor parameters installs an
:class:`FSDP2Extrapolation` adapter. It answers the core's three questions:

- **The slot** of a parameter is this rank's own dim-0 shard (``Shard(0)``: the local tensor is
  ``torch.chunk(p, K)[rank]``), the storage FSDP2 all-gathers from. FSDP2 keeps no fp32 master,
  so x̃ is written into the shard *in place* (FSDP2 compares storage pointers: a ``.data`` swap
  would not be all-gathered) and the anchor is a separate shard-sized copy the core keeps.
- **This rank's local gradient** is captured by tensor hooks on the *unsharded* parameters,
  which fire with this rank's whole local gradient before FSDP2's reduce-scatter; only the rows
  of this rank's own shard are kept (a shard-sized fp32 buffer, summed over the micro-steps of
  an accumulation). ``extrap_max_norm`` takes the norm of the whole gradient in the hook (no
  buffer), so it supports one backward per step: a second backward reaching a parameter
  before the step raises (the norm of the sum would need the whole sum). Each rank
  displaces the shard it owns with its own local gradient's slice for that shard, so all ranks
  compute at one *mixed* point x + [δ⁰ on shard 0 | δ¹ on shard 1 | …], as at DeepSpeed ZeRO-3:
  the paper's per-worker x̃ᵏ (invariant I4) holds per shard, not per model.
- **The anchor** goes back into the shards before each base update (an optimizer step
  pre-hook); torch's update then runs on the DTensor parameters exactly as with a torch
  optimizer, and x̃ for the next iteration is placed from the new anchor in a step post-hook.

Whole filters (dim-0 slices) stay on one rank and each rank holds both its shard of the averaged
gradient and its local slice, so filter-wise noise and ``stochastic`` need no communication
(``VariantInfo.fsdp2`` in the registry). Nothing here issues a collective: all the math runs on
local tensors (norms, ``.item()`` or ``.any()`` on a DTensor would communicate).

Only the anchor is evaluated or saved: a forward with gradients disabled, ``model.state_dict()``
(DTensors) and ``get_model_state_dict`` (full or sharded) see it; swaps reshard every FSDP
module so that no unsharded copy keeps old values (the root keeps its parameters unsharded
after a forward without backward). Each rank's x̃ and local state go to
``extrap_accel_rank<r>.pt`` with :meth:`FSDP2Extrapolation.save_local_state` and come back with
:meth:`FSDP2Extrapolation.load_local_state` (``extrap_accel.checkpoint``'s policy).

This reads private attributes of FSDP2 (``_get_fsdp_state()._fsdp_param_group``, its
``reduce_grads`` and ``FSDPParam._unsharded_param``) to find the unsharded parameters and the
gradient-sync setting; tested with torch 2.13.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import _dist, checkpoint
from ..capture import CaptureMode
from ..handle import AttachHandle, unwrap_optimizer
from ..optim.base import ExtrapOptimizer
from ..optim.core import Core
from ..optim.registry import variant_info
from ._placing import PlacingAdapter

LAYOUT = "fsdp2-shard0"


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _from_local(p: Tensor, local: Tensor) -> Tensor:
    """``local`` (this rank's shard) as a DTensor laid out like ``p``."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                              shape=p.shape, stride=p.stride())  # fmt: skip


def check_supported(model: nn.Module, optimizer: ExtrapOptimizer) -> None:
    """Fail at attach, naming the fix, for what this adapter cannot run correctly."""
    for group in optimizer.param_groups:
        info = variant_info(group["extrapolation"], bool(group.get("filterwise")))
        if not info.fsdp2:
            raise NotImplementedError(
                f"extrapolation={info.name!r} is not supported under FSDP2 ({info.why_not}); "
                "use extrapolation='past' (extrap-SGD), 'stochastic', 'gaussian' or 'uniform'"
            )
    from torch.distributed.tensor import DTensor, Shard

    for p in (p for group in optimizer.param_groups for p in group["params"]):
        if not isinstance(p, DTensor):
            raise ValueError(
                "attach(model, optimizer) under FSDP2: the optimizer holds a parameter that is "
                "not a DTensor; build the optimizer from model.parameters() after fully_shard, "
                "while they are sharded (model.reshard() after a forward without backward)"
            )
        if tuple(p.placements) != (Shard(0),):
            raise NotImplementedError(
                f"extrap_accel supports FSDP2 parameters sharded as (Shard(0),) on a 1-D mesh, "
                f"got {tuple(p.placements)} (HSDP, tensor parallelism or a custom "
                "shard_placement_fn): use fully_shard with its default placement"
            )


class _ShardCore(Core):
    """The slots of an FSDP2 model: this rank's local shard of every DTensor parameter."""

    pointer_swap = False  # FSDP2 all-gathers from the shard's storage: in-place only

    def __init__(self, adapter: FSDP2Extrapolation):
        self.entries: dict[Tensor, dict[str, Any]] = {}
        super().__init__(lambda: self.entries)
        self.adapter = adapter

    def weight(self, p: Tensor) -> Tensor:
        return _local(p.data)

    def displaced(self) -> list[tuple[Tensor, Tensor]]:
        # what a state dict substitutes: DTensors laid out like the parameters
        return [(p, _from_local(p, a)) for p, a in super().displaced()]

    def changed(self) -> None:
        self.adapter.reshard()

    def move_anchor_(self, p: Tensor, value: Tensor) -> Tensor | None:
        """Weights loaded through ``load_state_dict``: a DTensor (this rank's shard is used) or
        a full tensor (this rank's chunk); returns a DTensor for FSDP2 to copy."""
        if not self.is_displaced(p):
            return None
        if hasattr(value, "to_local"):
            local = value.to_local()
        else:
            local = self.adapter.own_rows(p, value)
        out = super().move_anchor_(p, local)
        return None if out is None else _from_local(p, out)


class _Capture:
    """This rank's local gradient gᵏ of each sharded parameter, from tensor hooks on the
    unsharded parameters: only the rows of this rank's own shard (``own_rows``), kept as a
    shard-sized fp32 buffer and summed over the micro-steps of an accumulation.

    A new accumulation starts after each applied step and when the hook finds the sharded
    parameter's ``.grad`` cleared (``zero_grad``; FSDP2 reduce-scatters into it after the hook)
    unless the previous micro-step ran without gradient sync
    (``set_requires_gradient_sync(False)``, which leaves ``.grad`` unset until the last one).

    With ``needs_norm()`` (some group sets ``extrap_max_norm``) the hook also records the norm
    of the whole local gradient it sees (a 0-dim fp32 tensor, no host sync). The norm of a sum
    of micro-steps would need the whole sum, which is not kept: a second contribution to one
    parameter in one accumulation then raises.
    """

    def __init__(self, own_rows, needs_norm):
        self.own_rows = own_rows  # (sharded, whole) -> this rank's rows of whole
        self.needs_norm = needs_norm
        self.buffers: dict[Tensor, Tensor] = {}
        self.norms: dict[Tensor, Tensor] = {}
        self.fresh: set[Tensor] = set()
        self.unsynced: set[Tensor] = set()
        self.hooked: set[int] = set()
        self.handles = []

    def hook_unsharded(self, sharded: Tensor, unsharded: Tensor, group) -> None:
        if id(unsharded) in self.hooked or not unsharded.requires_grad:
            return
        self.hooked.add(id(unsharded))

        def hook(grad: Tensor) -> None:
            with torch.no_grad():
                grad = _local(grad)
                rows = self.own_rows(sharded, grad)
                buf = self.buffers.get(sharded)
                continuing = sharded in self.fresh and (
                    sharded.grad is not None or sharded in self.unsynced)
                if continuing and self.needs_norm():
                    raise RuntimeError(
                        "extrap_max_norm under FSDP2 with gradient accumulation is not "
                        "supported: a second backward reached a parameter before "
                        "optimizer.step(), and the norm of this rank's summed local gradient "
                        "would need a whole-size copy of it per rank (the adapter keeps only "
                        "this rank's shard). Remove extrap_max_norm, or take one backward per "
                        "step (a larger micro-batch)"
                    )
                if buf is None:
                    self.buffers[sharded] = rows.to(torch.float32, copy=True)
                elif continuing:
                    buf.add_(rows)
                else:
                    buf.copy_(rows)
                if self.needs_norm():
                    self.norms[sharded] = torch.linalg.vector_norm(grad, dtype=torch.float32)
            self.fresh.add(sharded)
            if group.reduce_grads:
                self.unsynced.discard(sharded)
            else:
                self.unsynced.add(sharded)

        self.handles.append(unsharded.register_hook(hook))

    def get(self, p: Tensor) -> Tensor | None:
        """This rank's rows of gᵏ of ``p`` in this accumulation (None: no backward reached it
        on this rank)."""
        return self.buffers.get(p) if p in self.fresh else None

    def norm(self, p: Tensor) -> Tensor | None:
        """The norm of this rank's whole gᵏ of ``p`` (with ``extrap_max_norm`` only)."""
        return self.norms.get(p) if p in self.fresh else None

    def reset(self) -> None:
        self.fresh.clear()
        self.unsynced.clear()
        self.norms.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class FSDP2Extrapolation(PlacingAdapter):
    """The FSDP2 adapter: binds the optimizer to the shards, captures gᵏ, places x̃ after each
    step; the root module's :class:`AttachHandle` reads the anchor through the optimizer."""

    def __init__(self, model: nn.Module, optimizer: ExtrapOptimizer):
        check_supported(model, optimizer)
        self.model = model
        self.optimizer = optimizer
        from torch.distributed.fsdp import FSDPModule

        self.fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
        self.capture = _Capture(self.own_rows, lambda: any(
            g["extrap_max_norm"] is not None for g in optimizer.param_groups))
        self._init_rounding()  # (what FSDP2's cast to its param_dtype erases)
        self._init_step = False
        self._lrs: list[float] = []
        self._param_dtypes: dict[Tensor, torch.dtype] | None = None  # known after lazy init
        optimizer.bind(
            backend="fsdp2", core=_ShardCore(self), base_update_only=True, layout=LAYOUT,
            # the DTensors it steps now (accelerate's prepare replaces the params it was built on)
            model_param_groups=[tuple(g["params"]) for g in optimizer.param_groups],
            capture=CaptureMode(off=True),  # gᵏ comes from the unsharded parameters (below)
            init_step=lambda: self._init_step,
        )  # fmt: skip
        self.core = optimizer.core
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
        ]
        for module in self.fsdp_modules:  # after FSDP2's own pre-forward, which unshards
            self._handles.append(module.register_forward_pre_hook(self._hook_unsharded))
        self.reshard()  # (a no-grad forward may have left the root unsharded: the module's
        # parameters must be the DTensors the optimizer holds when the handle reads them)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.capture.remove()

    # ---------------------------------------------------------------- where the tensors are
    def _fsdp_params(self, module: nn.Module) -> list:
        group = module._get_fsdp_state()._fsdp_param_group
        return [] if group is None else list(group.fsdp_params)

    def _read_param_dtypes(self) -> dict[Tensor, torch.dtype]:
        """The dtype FSDP2 all-gathers each parameter in (its ``MixedPrecisionPolicy``; FSDP2
        sets it at its lazy initialisation, in the first forward)."""
        out = {}
        for module in self.fsdp_modules:
            for fp in self._fsdp_params(module):
                dtype = getattr(fp, "param_dtype", None)
                out[fp.sharded_param] = dtype or fp.sharded_param.dtype
        return out

    def _hook_unsharded(self, module: nn.Module, args: Any) -> None:
        group = module._get_fsdp_state()._fsdp_param_group
        for fp in self._fsdp_params(module):
            unsharded = getattr(fp, "_unsharded_param", None)
            if unsharded is not None:
                self.capture.hook_unsharded(fp.sharded_param, unsharded, group)

    def reshard(self) -> None:
        """Free every unsharded copy (the shards changed outside a step): the next forward
        all-gathers the shards again. No collective."""
        for module in self.fsdp_modules:
            module.reshard()

    def own_rows(self, p: Tensor, full: Tensor) -> Tensor:
        """This rank's dim-0 rows of a whole tensor shaped like ``p`` (``torch.chunk``)."""
        k, rank = self.optimizer.resolve_world_size(), self.optimizer.rank
        n = full.shape[0]
        size = -(-n // k)
        start = min(n, rank * size)
        return full.narrow(0, start, _local(p.data).shape[0] if full.dim() else 0)

    # ---------------------------------------------------------------- inspection
    def local_grad(self, p: Tensor) -> Tensor | None:
        """The rows of this rank's own shard of its local gradient of ``p`` in the current
        accumulation (fp32, shaped like the shard; the rest of the local gradient is not
        kept)."""
        return self.capture.get(p)

    # ---------------------------------------------------------------- the step
    def _is_init_step(self) -> bool:
        """DCP's ``_init_optim_state`` (and no backward since the last step)."""
        return not self.capture.fresh and self.optimizer.is_dcp_init_step()

    def _pre_step(self, optimizer, args, kwargs) -> None:
        """The anchor back into the shards: torch's base update runs on the DTensors."""
        self._init_step = self._is_init_step()
        if self._init_step or not self.core.training:  # (step() itself refuses eval mode)
            return
        self._lrs = [float(g["lr"]) for g in optimizer.param_groups]  # the rates of this update
        self.core.restart()  # x̃ = x in every shard; local moments kept

    def _post_step(self, optimizer, args, kwargs) -> None:
        if self._init_step:
            self._init_step = False
            return
        self._place(self._lrs)
        self.capture.reset()

    @torch.no_grad()
    def _place(self, lrs: list[float]) -> None:
        """x̃ = x − γ̃·d (or x + ξ) into each shard from the new anchor, in the shard's dtype."""
        opt, core = self.optimizer, self.core
        opt.resolve_world_size()
        norms = [n for p in opt.managed_params() if (n := self.capture.norm(p)) is not None]
        coefs = opt.local_clip_coefs(norms=norms)
        if self._param_dtypes is None:
            self._param_dtypes = self._read_param_dtypes()
        sample = self._sample_rounding()
        for i, (group, params, lr) in enumerate(zip(opt.param_groups, opt.model_param_groups,
                                                    lrs)):  # fmt: skip
            placed, xs, outs, gks, averaged, states = [], [], [], [], {}, []
            for p in params:
                if not p.requires_grad or p.grad is None:  # not stepped: x̃ = x
                    continue
                slot = core.weight(p)
                if slot.numel() == 0:  # an empty shard (dim 0 < K)
                    continue
                local = self.capture.get(p)
                anchor = core.ensure_anchor(p)  # the anchor torch's update just wrote
                gk = torch.zeros(slot.shape, dtype=torch.float32) if local is None else local
                placed.append(p)
                xs.append(anchor.float())
                outs.append(torch.empty_like(xs[-1]))
                gks.append(gk)
                averaged[p] = _local(p.grad).float()
                states.append(core.state[p])
            if not placed:
                continue
            with opt.direction_grads(averaged):  # the averaged gradient's shard (stochastic)
                opt.place_next_(group, placed, outs=outs, anchors=xs, local_grads=gks,
                                states=states, lr=lr, local_coef=coefs.get(i, 1.0))  # fmt: skip
            for p, x, out in zip(placed, xs, outs):
                slot = core.weight(p)
                dtype = self._param_dtypes.get(p, slot.dtype)
                if sample and dtype != out.dtype:
                    self._count_rounding(x, out, dtype)
                slot.copy_(out)

    # ---------------------------------------------------------------- per-rank checkpoints
    def save_local_state(self, folder: str) -> str:
        """Write this rank's x̃ and local state to ``<folder>/extrap_accel_rank<r>.pt`` (call
        on every rank, beside the model and optimizer checkpoint); returns the path."""
        return checkpoint.save(folder, [self.optimizer], self.optimizer.rank)

    def load_local_state(self, folder: str) -> str:
        """After the model and optimizer state were loaded (the anchor and the base state):
        put this rank's x̃ and local state back from ``folder``, decided alike on every rank
        (``extrap_accel.checkpoint.agree``: all files, or none: restart from the anchor with a
        warning). Returns the decision ("load" or "restart")."""
        states = checkpoint.read(folder, self.optimizer.rank)
        decision = checkpoint.agree(states, folder)
        checkpoint.apply(decision, [self.optimizer], states)
        return decision


def attach_fsdp2(model: nn.Module, optimizer=None) -> FSDP2Extrapolation:
    """Install the adapter on a ``fully_shard`` model and make it anchor-safe."""
    if optimizer is None:
        raise TypeError("attach(model, optimizer): the optimizer is missing")
    opt = unwrap_optimizer(optimizer)
    existing = getattr(model, "_extrap_accel_adapter", None)
    if existing is not None:
        if existing.optimizer is opt:
            return existing
        raise RuntimeError("this FSDP2 model is already attached to another optimizer")
    if opt.core.displaced() or opt.state:
        raise RuntimeError(
            "attach(model, optimizer) under FSDP2 must come before the first optimizer step "
            "(and before loading optimizer state): attach right after building the optimizer"
        )
    if not _dist.is_initialized():
        raise RuntimeError("FSDP2 needs a process group: call attach after fully_shard")
    adapter = FSDP2Extrapolation(model, opt)
    model._extrap_accel_adapter = adapter
    adapter.handle = AttachHandle(model, opt)
    return adapter
