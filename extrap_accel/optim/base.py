"""What extrap-SGD and extrap-Adam share: the optimizer's side of the core (mode, anchor, local
state), K and rank resolution, the noise generators, checkpointing, and how a backend binds.

Between steps (train mode) each parameter holds this worker's extrapolated point x̃ and the
optimizer state holds the anchor x under ``"anchor"``; in eval mode the two trade places
(``extrap_accel.optim.core``). A backend that places x̃ in tensors of its own (DeepSpeed's
bit16 weights, the simulator's workers) binds to the optimizer with :meth:`ExtrapOptimizer.bind`
and hands it its core; the optimizer then runs only torch's base update on what the backend
steps, and every question about x̃ and the anchor goes to that core.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import warnings
from collections.abc import Callable, Collection, Iterator
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import _dist
from ..capture import CaptureMode, LocalGradCapture
from ..safety import check_first_step
from .core import ANCHOR, EXTRAPOLATED, Core
from .directions import EXTRAPOLATIONS, NOISE_EXTRAPOLATIONS, place_direction_

LOCAL_STATE_FORMAT = 2


@dataclasses.dataclass(frozen=True)
class Binding:
    """What a backend told the optimizer with :meth:`ExtrapOptimizer.bind`.

    - ``backend``: who steps the optimizer ("torch", "deepspeed", "simulator", ...).
    - ``core``: the backend's slots when it places x̃ itself (None: the optimizer's own core
      over ``p.data``).
    - ``base_update_only``: ``step()`` is torch's update of what the backend hands it (the
      anchors: DeepSpeed's fp32 master, the simulator's model); the backend places x̃.
    - ``layout``: how the backend's x̃ is cut (e.g. "deepspeed-zero3"), saved with each rank's
      local state; a load into another layout is refused.
    - ``model_param_groups``: the model's parameters per group, where the backend replaced
      ``group["params"]`` (DeepSpeed's flat partitions).
    - ``world_size``: K, where the backend knows it better than the process group (simulator).
    - ``capture``: how this rank's local gradient is captured (``CaptureMode``).
    - ``per_rank_state``: anchors and base moments differ per rank (post-local SGD), so each
      rank's local state carries all of it.
    - ``attached``: a model is attached (``extrap_accel.attach``), so saves see the anchor.
    - ``init_step``: answers, at the start of ``step()``, whether this step only creates the
      optimizer state (``torch.distributed.checkpoint``'s ``_init_optim_state``: zero gradients
      at lr 0 on an optimizer without state); such a step creates the base state as zeros and
      changes nothing else (no weight, no counter, no x̃).
    """

    backend: str = "torch"
    core: Core | None = None
    base_update_only: bool = False
    layout: str | None = None
    model_param_groups: tuple[tuple[Tensor, ...], ...] | None = None
    world_size: int | None = None
    capture: CaptureMode | None = None
    per_rank_state: bool = False
    attached: bool = False
    init_step: Callable[[], bool] | None = None


class ExtrapOptimizer(Optimizer):
    """Base class: subclasses implement ``_step_group`` (the base update and the fused `past`
    direction of one group), ``_base_update`` and ``local_direction_`` (one tensor's x̃)."""

    # Keys of per-parameter state that are local to this rank (reset by reset_local_state()).
    _local_state_keys: tuple[str, ...] = ()
    # Step counters among them: torch's load_state_dict casts every other floating-point
    # state to the parameter's dtype (a bf16 counter sticks at 256).
    _step_keys: tuple[str, ...] = ()
    _extrapolations: tuple[str, ...] = EXTRAPOLATIONS
    # Param-group keys added in 0.2 (torch's options), with the value that reproduces 0.1: filled
    # into the groups of older checkpoints on load, as torch's ``__setstate__`` does.
    _group_keys_since_0_1: ClassVar[dict[str, Any]] = {}

    def __init__(self, params, defaults: dict[str, Any], *, seed: int, world_size: int | None):
        if world_size is not None and (not isinstance(world_size, int) or world_size < 1):
            raise ValueError(
                f"world_size must be a positive int or None (resolve from torch.distributed), "
                f"got {world_size!r}"
            )
        if not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self._check_group(defaults)
        defaults = dict(defaults, train_mode=True)
        self._constructing = True
        super().__init__(params, defaults)
        self._constructing = False
        self._seed = seed
        self._requested_world_size = world_size
        self._init_runtime()

    def _init_runtime(self, generator_states: dict[str, Tensor] | None = None) -> None:
        """What is rebuilt rather than copied: hooks, the core, the resolved K and rank."""
        self._constructing = False
        self._world_size: int | None = None
        self._checkpoint_world_size: int | None = None
        self._rank: int | None = None
        self._generators: dict[torch.device, torch.Generator] = {}
        self._pending_generator_states = dict(generator_states or {})
        self._staged_local_state: dict[str, Any] | None = None
        self._restart_after_load = False
        self._grad_scaler = None
        self._warned_k1_stochastic = False
        self._direction_grads: dict[Tensor, Tensor] | None = None
        self._own_core = Core(lambda: self.state)
        self._binding = Binding(model_param_groups=tuple(tuple(g["params"])
                                                         for g in self.param_groups))  # fmt: skip
        # This rank's gradient before the all-reduce; without a process group gᵏ = p.grad.
        self._capture = LocalGradCapture(self.managed_params())

    # ------------------------------------------------------------------ copies and pickles
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["extrap"] = {
            "seed": self._seed,
            "requested_world_size": self._requested_world_size,
            "generators": self._generator_states(),
        }
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        extra = state.pop("extrap", None)
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("train_mode", True)
            for key, value in self._group_keys_since_0_1.items():
                group.setdefault(key, value)
        if extra is None and hasattr(self, "_binding"):  # torch's load_state_dict calls this
            return
        extra = extra or {}
        self._seed = extra.get("seed", 0)
        self._requested_world_size = extra.get("requested_world_size")
        self._init_runtime(extra.get("generators"))
        self._own_core.training = all(g["train_mode"] for g in self.param_groups)

    # ------------------------------------------------------------------ groups and options
    def _check_group(self, group: dict[str, Any]) -> None:
        """Validate one param group's options (constructor defaults and add_param_group)."""
        check_param_group_options(group, supports=self._extrapolations, owner=type(self).__name__,
                                  known=self.defaults if hasattr(self, "defaults") else group,
                                  wide=inspect.signature(type(self).__init__).parameters)  # fmt: skip

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if self._constructing:  # (validated below, with the defaults filled in)
            self._check_group(self.param_groups[-1])
            return
        group = self.param_groups[-1]
        try:
            self._check_group(group)
        except (ValueError, TypeError):
            self.param_groups.pop()
            raise
        group["train_mode"] = self.training
        groups = self._binding.model_param_groups or ()
        self._binding = dataclasses.replace(
            self._binding, model_param_groups=(*groups, tuple(group["params"])))
        self._capture.add(group["params"])

    def bind(self, **changes: Any) -> Binding:
        """A backend says how it drives this optimizer (see :class:`Binding`); returns the binding.

        Backends call this instead of setting attributes. Changing ``world_size`` after K was
        resolved, or the core after x̃ was placed, is refused.
        """
        unknown = set(changes) - {f.name for f in dataclasses.fields(Binding)}
        if unknown:
            raise TypeError(f"bind() got unknown fields: {', '.join(sorted(unknown))}")
        if "world_size" in changes and changes["world_size"] is not None:
            requested = self._requested_world_size
            if requested not in (None, changes["world_size"]) or (
                    self._world_size not in (None, changes["world_size"])):  # fmt: skip
                raise ValueError(
                    f"the optimizer was built with world_size={requested or self._world_size} "
                    f"but its backend runs K={changes['world_size']}: give the same K (or leave "
                    "world_size out)"
                )
        if "core" in changes and self._own_core.displaced():
            raise RuntimeError("bind(core=...): this optimizer has already placed x̃ itself")
        if "model_param_groups" in changes and changes["model_param_groups"] is not None:
            changes["model_param_groups"] = tuple(tuple(g) for g in changes["model_param_groups"])
        self._binding = dataclasses.replace(self._binding, **changes)
        if "capture" in changes and changes["capture"] is not None:
            self._capture.configure(changes["capture"])
        return self._binding

    @property
    def binding(self) -> Binding:
        return self._binding

    @property
    def core(self) -> Core:
        """The core that holds this rank's x̃ and the anchor: the optimizer's own or a backend's."""
        return self._binding.core or self._own_core

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self._capture.reset()

    def reset_local_grads(self) -> None:
        """Start a new accumulation of this rank's local gradient (backends that step without
        ``zero_grad``: DeepSpeed at each accumulation boundary)."""
        self._capture.reset()

    @property
    def grad_scaler(self):
        """The ``torch.amp.GradScaler`` handed over with :meth:`set_grad_scaler` (or None)."""
        return self._grad_scaler

    def set_grad_scaler(self, scaler) -> None:
        """Tell the optimizer which ``torch.amp.GradScaler`` scales the loss (fp16).

        The local gradients are captured before the scaler unscales ``.grad``, so they are
        divided by the scale the backward used. ``extrap_accel.prepare`` calls this for you.
        """
        self._grad_scaler = scaler

    # ------------------------------------------------------------------ K and rank
    @property
    def world_size(self) -> int | None:
        """K, once resolved at the first step (None before)."""
        return self._world_size

    def resolve_world_size(self) -> int:
        """K: fixed at the first step; a later change is an error."""
        current = self._binding.world_size or self._requested_world_size or _dist.world_size()
        if self._world_size is None:
            saved = self._checkpoint_world_size
            if saved is not None and saved != current:
                raise RuntimeError(
                    f"this optimizer's state was saved with world_size={saved} but this run has "
                    f"world_size={current}: the per-rank local state (local moments, noise "
                    "generators) belongs to the old ranks. Resume with the same number of "
                    "processes, or call optimizer.reset_local_state() after loading to restart "
                    "the local extrapolation state (d = 0)."
                )
            self._world_size = current
        elif current != self._world_size:
            raise RuntimeError(
                f"the data-parallel world size changed from {self._world_size} to {current} "
                "during training; K is fixed at the first step. Save a checkpoint and resume "
                "with optimizer.reset_local_state() to change it."
            )
        return self._world_size

    @property
    def rank(self) -> int:
        if self._rank is None:
            if not _dist.is_initialized():
                return 0  # not kept: the process group may come later (deepspeed.initialize)
            self._rank = _dist.rank()
        return self._rank

    def generator(self, device: torch.device) -> torch.Generator:
        """This rank's noise generator on ``device``, seeded from (seed, rank, device)."""
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(_dist.generator_seed(self._seed, self.rank, device))
            pending = self._pending_generator_states.pop(str(device), None)
            if pending is not None:
                gen.set_state(pending)
            self._generators[device] = gen
        return gen

    def _generator_states(self) -> dict[str, Tensor]:
        states = {d: s.clone() for d, s in self._pending_generator_states.items()}
        states.update({str(d): g.get_state() for d, g in self._generators.items()})
        return states

    def extrap_lr(self, group: dict[str, Any], lr: float | None = None) -> float:
        """γ̃ for this group: ``extrap_lr`` if set, else extrap_scale·γ/K (γ: the rate just used)."""
        if group["extrap_lr"] is not None:
            return float(group["extrap_lr"])
        lr = float(group["lr"]) if lr is None else lr
        return float(group["extrap_scale"]) * lr / self.resolve_world_size()

    # ------------------------------------------------------------------ modes and the anchor
    @property
    def training(self) -> bool:
        return self.core.training

    def _check_train_mode(self) -> None:
        if not self.training:
            raise RuntimeError(
                f"{type(self).__name__}.step() was called in eval mode, where the parameters "
                "hold the anchor. Call optimizer.train() before training again."
            )

    @torch.no_grad()
    def eval(self) -> None:
        """Put the anchor x into the parameters (for evaluation); x̃ is kept in the state."""
        self._set_mode(False)

    @torch.no_grad()
    def train(self) -> None:
        """Put this worker's extrapolated point x̃ back into the parameters."""
        self._set_mode(True)

    def _set_mode(self, train: bool) -> None:
        self.core.set_mode(train)
        for group in self.param_groups:
            group["train_mode"] = train

    def displaced(self) -> list[tuple[Tensor, Tensor]]:
        """(parameter, anchor) for every parameter that holds x̃ now (train mode)."""
        return self.core.displaced()

    def anchor(self, p: Tensor) -> Tensor:
        """The anchor x of parameter ``p`` on this rank (a live tensor: do not modify)."""
        return self.core.anchor(p)

    def extrapolated(self, p: Tensor) -> Tensor:
        """This worker's x̃ for parameter ``p`` (a live tensor: do not modify)."""
        return self.core.point(p)

    def move_anchor_(self, p: Tensor, value: Tensor) -> Tensor | None:
        """The anchor of ``p`` becomes ``value`` (weights loaded, anchors averaged), x̃ keeps
        its displacement; returns what ``p`` must hold now, None if ``p`` is not displaced."""
        return self.core.move_anchor_(p, value)

    @contextlib.contextmanager
    def at_anchor(self) -> Iterator[None]:
        """The parameters hold the anchor inside the block (no-grad use), x̃ again after it."""
        with self.core.at_anchor():
            yield

    def managed_params(self) -> list[Tensor]:
        """The parameters this optimizer was built with (the model's, also under DeepSpeed)."""
        return [p for group in self.model_param_groups for p in group]

    @property
    def model_param_groups(self) -> tuple[tuple[Tensor, ...], ...]:
        return self._binding.model_param_groups or ()

    def _stepped_by_a_wrapper(self) -> bool:
        managed = {id(p) for p in self.managed_params()}
        return any(id(p) not in managed for g in self.param_groups for p in g["params"])

    # ------------------------------------------------------------------ local state
    @torch.no_grad()
    def reset_local_state(self, *, warn: bool = True) -> None:
        """Forget this rank's local extrapolation state: x̃ = x, local moments and generators anew.

        Works in either mode. Use after loading a checkpoint saved with another number of
        processes; K is resolved again at the next step.
        """
        if warn:
            warnings.warn(
                "extrap_accel: resetting the local extrapolation state (d = 0, local moments and "
                "noise generators restarted); K is resolved again at the next step.",
                stacklevel=2,
            )
        self.core.restart(self._local_state_keys)
        self._world_size = None
        self._checkpoint_world_size = None
        self._rank = None
        self._generators.clear()
        self._pending_generator_states.clear()

    def local_grad(self, p: Tensor) -> Tensor | None:
        """This rank's local gradient gᵏ of ``p`` as the next step will use it.

        Under data parallelism: the captured pre-all-reduce gradient (still multiplied by the
        fp16 loss scale before ``step``); with one process: ``p.grad``.
        """
        if self._capture.active:
            g = self._capture.get(p)
            if g is not None:
                return g
        return self._averaged_grad(p)

    def _averaged_grad(self, p: Tensor) -> Tensor | None:
        """The averaged gradient before any base-update-only rescaling (LARS)."""
        if self._direction_grads is not None and p in self._direction_grads:
            return self._direction_grads[p]
        return p.grad

    @contextlib.contextmanager
    def direction_grads(self, grads: dict[Tensor, Tensor]) -> Iterator[None]:
        """Inside the block the local direction reads ``grads[p]`` where it would read
        ``p.grad`` (one process): a wrapper that rescales ``.grad`` for the base update only
        (LARS) keeps the direction on the true gradient."""
        self._direction_grads = grads
        try:
            yield
        finally:
            self._direction_grads = None

    @property
    def captures_local_grads(self) -> bool:
        """True once a backward ran under a process group of more than one rank."""
        return bool(self._capture.active)

    def local_grad_nbytes(self, at_step: bool = False) -> int:
        """Bytes of captured local gradients this rank holds now. Between steps that is 0
        where the capture is transient (parameters on a CUDA device: ``CaptureMode``);
        ``at_step=True``: the most it held at once, i.e. at a step (one buffer per captured
        parameter, in the gradient's dtype)."""
        return self._capture.nbytes(at_step)

    def local_state_dict(self) -> dict[str, Any]:
        """This rank's own state: its x̃, its local moments and its noise generators.

        Data-parallel frameworks save the optimizer from the main process only; save this on
        every rank (``extrap_accel.prepare``, ``attach(trainer)`` and the DeepSpeed adapter do,
        through ``extrap_accel.checkpoint``) so that a resumed run continues bit for bit.
        """
        per_rank = self._binding.per_rank_state
        keys = None if per_rank else self._local_state_keys
        return {
            "format": LOCAL_STATE_FORMAT,
            "rank": self.rank,
            "world_size": self._world_size or self._checkpoint_world_size,
            "layout": self._binding.layout,
            "state": self.core.local_entries(self.managed_params(), keys, with_anchor=per_rank),
            "generators": self._generator_states(),
        }

    @torch.no_grad()
    def load_local_state_dict(self, local: dict[str, Any]) -> None:
        """Restore what ``local_state_dict`` saved on this rank (after ``load_state_dict``)."""
        if local.get("rank") != self.rank:
            raise ValueError(
                f"this local extrapolation state belongs to rank {local.get('rank')}, not to "
                f"rank {self.rank}: load each rank's own file"
            )
        layout = local.get("layout")
        if layout is None and "stage" in local:  # written by extrap_accel 0.1's DeepSpeed adapter
            layout = f"deepspeed-zero{local['stage']}"
        if layout != self._binding.layout:
            raise ValueError(
                f"this local extrapolation state was saved with the layout {layout or 'plain'} "
                f"and this run has {self._binding.layout or 'plain'} (e.g. another ZeRO stage): "
                "resume with the configuration that saved it, or call "
                "optimizer.reset_local_state() to restart the local state"
            )
        self.core.load_local_entries(self.managed_params(), local["state"])
        self._checkpoint_world_size = local.get("world_size")
        self._generators.clear()
        self._pending_generator_states = {
            d: s.clone() for d, s in local.get("generators", {}).items()
        }

    def stage_local_state(self, local: dict[str, Any] | None, *, restart: bool = False) -> None:
        """Apply this rank's ``local`` state right after the next ``load_state_dict`` (for a
        checkpoint hook that runs before the framework loads the optimizer); ``restart``:
        restart the local state from the loaded anchor then (no rank has a file). Neither:
        forget what was staged."""
        self._staged_local_state = local
        self._restart_after_load = restart

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """The optimizer state, with both the anchor and this rank's x̃ of every parameter.

        Whatever the mode, each displaced parameter's entry has ``"anchor"`` and
        ``"extrapolated"``, both copies (a later ``train()``/``eval()`` swaps the live buffers
        in place), so a resumed run continues bit for bit even when the model weights were
        saved as the anchor.
        """
        sd = super().state_dict()
        index = {}
        for group, packed in zip(self.param_groups, sd["param_groups"]):
            index.update(zip(packed["params"], group["params"]))
        state = {}
        for idx, entry in sd["state"].items():
            entry = dict(entry)
            p = index.get(idx)
            if p is not None and (ANCHOR in entry or EXTRAPOLATED in entry):
                entry[ANCHOR] = self._own_core.anchor(p).clone()
                entry[EXTRAPOLATED] = self._own_core.point(p).clone()
            state[idx] = entry
        sd["state"] = state
        sd["extrap"] = {
            "format": 1,
            "world_size": self._world_size or self._checkpoint_world_size,
            "rank": self._rank,
            "seed": self._seed,
            "generators": self._generator_states(),
        }
        return sd

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("extrap", None)
        groups = state_dict.get("param_groups") or [{}]
        if extra is None and "train_mode" in groups[0]:
            extra = {}  # ours, through torch.distributed.checkpoint (which keeps state and groups;
            # the generators travel in each rank's local state)
        if extra is None:
            raise ValueError(
                f"this state dict has no 'extrap' entry: it was not saved by an extrap_accel "
                f"optimizer (or is corrupt). Load it into the optimizer that saved it, e.g. "
                f"torch.optim.SGD, or start {type(self).__name__} from fresh state."
            )
        counters = {}
        for idx, entry in state_dict.get("state", {}).items():
            if (ANCHOR in entry) != (EXTRAPOLATED in entry):
                raise ValueError(
                    f"corrupt {type(self).__name__} state dict: parameter {idx} has only one of "
                    "'anchor'/'extrapolated'; save it with this optimizer's state_dict()."
                )
            counters[idx] = {k: entry[k] for k in self._step_keys if torch.is_tensor(entry.get(k))}
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        # the saved keys, as torch maps them (indices, or names through DCP)
        by_key = dict(zip((k for g in groups for k in g.get("params", ())), params))
        for idx, saved in counters.items():  # torch cast them to the parameter dtype
            for key, value in saved.items():
                dtype = torch.float32 if value.dtype in (torch.float16, torch.bfloat16) else None
                self.state[by_key[idx]][key] = value.to("cpu", dtype, copy=True)
        train = all(group["train_mode"] for group in self.param_groups)
        for group in self.param_groups:
            group["train_mode"] = train
        core = self._own_core
        core.training = train
        shown, held = (EXTRAPOLATED, ANCHOR) if train else (ANCHOR, EXTRAPOLATED)
        for p in params:
            entry = self.state.get(p)
            if entry and shown in entry:
                p.copy_(entry.pop(shown))
                entry[held] = entry[held].clone(memory_format=torch.preserve_format)
        if self._binding.core is not None:  # the backend's core holds x̃: keep its mode
            for group in self.param_groups:
                group["train_mode"] = self.training
        self._world_size = None
        self._checkpoint_world_size = extra.get("world_size")
        self._rank = None
        self._seed = extra.get("seed", self._seed)
        self._generators.clear()
        self._pending_generator_states = {
            d: s.clone() for d, s in extra.get("generators", {}).items()
        }
        staged, self._staged_local_state = self._staged_local_state, None
        if staged is not None:
            self.load_local_state_dict(staged)
        elif self._restart_after_load:
            self.reset_local_state(warn=False)
        self._restart_after_load = False

    # ------------------------------------------------------------------ stepping
    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step at the anchor, then x̃ for the next forward into the parameters.

        ``closure`` (zero grads, forward, backward, return loss) is optional, and required by
        ``extrapolation="fresh"``, which calls it twice: at the anchor and at x̃.
        """
        if self._init_step():
            self._create_base_state()
            return None
        if not self._begin_step():
            return None
        loss = None
        if any(group["extrapolation"] == "fresh" for group in self.param_groups):
            self._fresh_pass(closure)
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._binding.base_update_only:  # the backend places x̃ (and consumes gᵏ)
            for group in self.param_groups:
                params = [p for p in group["params"] if p.grad is not None]
                if params:
                    self._base_update(group, params)
            return loss
        coefs = self.local_clip_coefs()
        for i, group in enumerate(self.param_groups):
            self._step_group(group, coefs.get(i, 1.0))
        self._capture.reset()  # gᵏ is consumed: the next backward starts a new sum
        return loss

    def is_dcp_init_step(self) -> bool:
        """Whether this step is ``torch.distributed.checkpoint``'s state-creating dummy step
        (``_init_optim_state``: no state yet, every lr 0, zero gradients), which must change
        nothing: not the weights, not a counter, not K. (DTensor gradients are read locally:
        no collective.)"""
        if self.state or any(float(g["lr"]) != 0.0 for g in self.param_groups):
            return False
        grads = [p.grad for p in self.managed_params() if p.grad is not None]
        grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        return bool(grads) and not any(bool(g.any()) for g in grads)

    def _init_step(self) -> bool:
        if self._binding.init_step is not None:  # a backend that knows (FSDP2)
            return self._binding.init_step()
        return not self._binding.base_update_only and self.is_dcp_init_step()

    def _create_base_state(self) -> None:
        """Create the base state of every parameter with a gradient (a bound backend's init
        step), all zeros: momentum buffers, moments and counters read as before any step, so
        the first real step is exactly the one it would have been without this call."""
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._base_update(group, params)
            for p in params:
                for value in self.state[p].values():
                    if torch.is_tensor(value):
                        value.zero_()

    def _step_group(self, group: dict[str, Any], local_coef: float) -> None:
        """The base update of one group and its next x̃."""
        raise NotImplementedError

    def _base_update(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """torch's update of ``params`` in place (they are the anchors: a bound backend)."""
        raise NotImplementedError

    @classmethod
    def local_direction_(cls, group: dict[str, Any], out: Tensor, x: Tensor, gk: Tensor,
                         state: dict, *, local_coef: float, extrap_lr: float) -> None:  # fmt: skip
        """out = x − γ̃·d for one tensor of the `past` direction, from its local gradient and
        local ``state`` (backends that place x̃ themselves)."""
        raise NotImplementedError

    def place_next_(self, group: dict[str, Any], params: list[Tensor], *, outs: list[Tensor],
                    anchors: list[Tensor], local_grads: list[Tensor | None],
                    states: list[dict], lr: float | None = None,
                    local_coef: float = 1.0, generator=None) -> None:  # fmt: skip
        """x̃ for the next iteration of ``params`` (one group) into ``outs``, for a backend that
        places x̃ itself: the direction of the group's variant (``directions.place_direction_``)
        from ``anchors``, this rank's ``local_grads`` and local ``states``."""
        place_direction_(
            group["extrapolation"], outs=outs, anchors=anchors, local_grads=local_grads,
            averaged=[self._averaged_grad(p) for p in params], states=states, group=group,
            extrap_lr=self.extrap_lr(group, lr), local_coef=local_coef,
            local_direction=self.local_direction_, generator=generator or self.generator,
        )  # fmt: skip

    def _begin_step(self) -> bool:
        """Checks and bookkeeping shared by every step(); False: skip this step entirely."""
        base_only = self._binding.base_update_only
        if not base_only and self._stepped_by_a_wrapper():
            if all(p.grad is None or not p.grad.any() for g in self.param_groups
                   for p in g["params"]):  # fmt: skip
                # DeepSpeed's ZeRO-0 mixed-precision wrapper steps its fp32 copies once with
                # zero gradients while it is being built: that is not a training step.
                return False
            raise RuntimeError(
                "this optimizer is being stepped on tensors that are not the model's "
                "parameters (DeepSpeed's fp32 copies): call extrap_accel.attach(engine, "
                "optimizer) after deepspeed.initialize, or use extrap_accel.prepare / "
                "extrap_accel.integrations.deepspeed.initialize; with the Hugging Face "
                "Trainer, extrap_accel.attach(trainer) before trainer.train()"
            )
        self._check_train_mode()
        if self._world_size is None and not self._binding.attached:  # the first step (of this run)
            check_first_step(self)  # accelerate / the Trainer without prepare or attach
            _refuse_unattached_dtensors(self)
        self.resolve_world_size()
        fresh = any(group["extrapolation"] == "fresh" for group in self.param_groups)
        if fresh and (self._capture.active or _dist.world_size() > 1):
            raise RuntimeError(
                "extrapolation='fresh' is not supported under data parallelism (its extra "
                "backward would be all-reduced); use 'past' (extrap-SGD) or run one process"
            )
        if not self._capture.active or base_only:
            return True
        if self._grad_scaler is not None:
            inv_scale = 1.0 / self._grad_scaler.get_scale()  # the scale of this step's backward
            grads = [g for p in self.managed_params() if (g := self._capture.get(p)) is not None]
            if grads:
                torch._foreach_mul_(grads, inv_scale)
        elif _patched_by_grad_scaler(self):
            raise RuntimeError(
                "fp16 loss scaling is active (accelerate's GradScaler) but the extrap_accel "
                "optimizer does not know the scale, so its local gradients would be scaled. "
                "Use `model, optimizer, ... = extrap_accel.prepare(accelerator, model, "
                "optimizer, ...)` or call optimizer.set_grad_scaler(accelerator.scaler)."
            )
        return True

    def local_clip_coefs(self, local_grads: list[Tensor] | None = None,
                         norms: list[Tensor] | None = None) -> dict[int, float]:
        """Per group: the factor that clips this rank's local gradient at ``extrap_max_norm``.

        The norm is the total norm of the local gradient over all of this optimizer's
        parameters (as ``clip_grad_norm_`` over the model); each group clips at its own threshold.
        ``local_grads``: this rank's whole local gradients, where a backend captures them itself;
        ``norms``: or their per-parameter norms (FSDP2: taken in the hooks on the unsharded
        parameters, which keep no whole gradient); default: ``local_grad`` of every parameter.
        """
        if all(group["extrap_max_norm"] is None for group in self.param_groups):
            return {}
        if norms is None:
            grads = local_grads
            if grads is None:
                grads = [self.local_grad(p) for p in self.managed_params()]
            grads = [g for g in grads if g is not None]
            if not grads:
                return {}
            if any(g.is_sparse for g in grads):
                raise RuntimeError(
                    "extrap_max_norm clips the local gradient by its total norm, which is not "
                    "implemented for sparse gradients (e.g. nn.Embedding(sparse=True)): remove "
                    "extrap_max_norm or use dense gradients"
                )
            norms = list(torch._foreach_norm(grads, 2.0))
        if not norms:
            return {}
        device = norms[0].device
        norms = [n.to(device, torch.float64) for n in norms]
        total = float(torch.linalg.vector_norm(torch.stack(norms), 2.0))  # one host sync
        out = {}
        for i, group in enumerate(self.param_groups):
            max_norm = group["extrap_max_norm"]
            if max_norm is not None:
                out[i] = min(1.0, float(max_norm) / (total + 1e-6))
        return out

    def _warn_stochastic_k1(self) -> None:
        if not self._warned_k1_stochastic and self.resolve_world_size() == 1:
            self._warned_k1_stochastic = True
            warnings.warn(
                "extrapolation='stochastic' with one worker (K = 1): ξ = −γ̃(gᵏ − g) is 0, so this "
                "is plain SGD. Use it under data parallelism.",
                stacklevel=3,
            )

    def _params_with_grad(self, group: dict[str, Any]) -> list[Tensor]:
        return [p for p in group["params"] if p.grad is not None]

    def _place_variant(self, group: dict[str, Any], params: list[Tensor],
                       anchors: list[Tensor], local_grads: list[Tensor]) -> None:  # fmt: skip
        """After the base update: x̃ of a variant other than `past` into the parameters."""
        variant = group["extrapolation"]
        if variant == "fresh":  # placed at the next step, from the closure at the anchor
            torch._foreach_copy_([p.data for p in params], anchors)
            return
        if variant == "stochastic":
            self._warn_stochastic_k1()
        self.place_next_(group, params, outs=[p.data for p in params], anchors=anchors,
                         local_grads=local_grads, states=[{} for _ in params])  # fmt: skip

    def _fresh_pass(self, closure) -> None:
        """`fresh`: evaluate ∇f at the anchor with the closure and move its groups to x̃ = x − γ̃∇f."""
        if closure is None:
            raise RuntimeError(
                "extrapolation='fresh' takes one extra forward/backward at the anchor each step: "
                "call optimizer.step(closure) with a closure that zeroes the gradients, runs the "
                "forward and backward on a mini-batch and returns the loss."
            )
        with torch.enable_grad():
            closure()
        for group in self.param_groups:
            if group["extrapolation"] != "fresh":
                continue
            gamma = self.extrap_lr(group)
            if group.get("maximize"):  # x̃ = x − γ̃·(−∇f(x))
                gamma = -gamma
            for p in self._params_with_grad(group):
                anchor = self.core.ensure_anchor(p)
                torch.add(anchor, self.local_grad(p), alpha=-gamma, out=p.data)


# The extrapolation options a param group may carry (each optimizer takes those in its defaults),
# the optimizer-wide arguments, and torch's options of the other family: a group key among these
# that this optimizer does not take is a mistake (torch would ignore it silently).
_EXTRAP_GROUP_KEYS = frozenset({
    "extrap_scale", "extrap_lr", "extrap_momentum", "extrap_max_norm", "extrapolation",
    "noise_scale", "filterwise",
})  # fmt: skip
_OPTIMIZER_WIDE_KEYS = frozenset({"seed", "world_size", "compile_direction"})
_TORCH_OPTION_KEYS = frozenset({
    "momentum", "dampening", "nesterov", "betas", "eps", "amsgrad", "maximize", "foreach",
    "capturable", "differentiable", "fused", "decoupled_weight_decay",
})  # fmt: skip

# torch's implementation flags that this package refuses when set, and why.
_REFUSED_FLAGS = {
    "fused": "extrap_accel's kernels compute the base update and the local direction together, "
    "in foreach or per-tensor form; leave fused unset (None) or False and choose foreach",
    "capturable": "CUDA graph capture is not supported (the step reads the step counters and "
    "the clipping norm on the host); leave capturable=False",
    "differentiable": "the step swaps the anchor and x̃ in place under torch.no_grad, so it "
    "cannot be differentiated through; leave differentiable=False",
}


def check_param_group_options(
    group: dict[str, Any],
    *,
    supports: tuple[str, ...] = EXTRAPOLATIONS,
    owner: str = "this optimizer",
    known: dict[str, Any] | None = None,
    wide: Collection[str] = ("seed", "world_size"),
) -> None:
    """Validate the options shared by every optimizer here (constructor and add_param_group).

    Error types and messages follow torch.optim's where torch has the same check. ``known``:
    the keys this optimizer takes (its defaults); ``wide``: its constructor's arguments.
    """
    if known is not None:
        for key in group:
            if key in known or key in ("params", "param_names", "train_mode"):
                continue
            if key in _OPTIMIZER_WIDE_KEYS and key in wide:
                raise ValueError(
                    f"{key} is an argument of the whole optimizer, not a param-group key: give "
                    f"{key}=... to {owner}(...)"
                )
            if (key in _EXTRAP_GROUP_KEYS or key.startswith("extrap") or key in _TORCH_OPTION_KEYS
                    or key in _OPTIMIZER_WIDE_KEYS):  # fmt: skip
                raise ValueError(
                    f"unknown param-group key {key!r}: {owner} does not take it (its keys: "
                    f"{', '.join(k for k in known if k != 'train_mode')})"
                )
    lr = group["lr"]
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if isinstance(lr, bool) or not isinstance(lr, (int, float, Tensor)) or not lr >= 0:
        raise ValueError(f"Invalid learning rate: {lr} (must be a float or 1-element Tensor >= 0)")
    weight_decay = group["weight_decay"]
    if isinstance(weight_decay, Tensor) and weight_decay.numel() != 1:
        raise ValueError(f"Invalid weight_decay value: {weight_decay} (must be one number)")
    if not weight_decay >= 0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay} (must be >= 0)")
    for flag, why in _REFUSED_FLAGS.items():
        if group.get(flag):
            raise ValueError(f"{flag}={group[flag]!r} is not supported by {owner}: {why}")
    if group.get("foreach") not in (None, True, False):
        raise ValueError(f"foreach must be None, True or False, got {group['foreach']!r}")
    extrapolation = group["extrapolation"]
    if extrapolation not in supports:
        raise ValueError(
            f"unknown extrapolation={extrapolation!r}; choose one of {', '.join(supports)}"
        )
    if group["extrap_scale"] < 0:
        raise ValueError(f"Invalid extrap_scale: {group['extrap_scale']} (must be >= 0)")
    if group["extrap_lr"] is not None:
        if group["extrap_lr"] < 0:
            raise ValueError(f"Invalid extrap_lr: {group['extrap_lr']} (must be >= 0 or None)")
        if group["extrap_scale"] != 1.0:
            raise ValueError(
                "give either extrap_lr (an absolute γ̃) or extrap_scale (γ̃ = extrap_scale·lr/K), "
                "not both"
            )
    max_norm = group["extrap_max_norm"]
    if max_norm is not None:
        if not max_norm > 0:
            raise ValueError(f"Invalid extrap_max_norm: {max_norm} (must be > 0 or None)")
        if extrapolation != "past":
            raise ValueError(
                f"extrap_max_norm clips the local gradient of the 'past' direction; it has no "
                f"effect with extrapolation={extrapolation!r}: remove it"
            )
    noise_scale = group.get("noise_scale")
    if extrapolation in NOISE_EXTRAPOLATIONS:
        if noise_scale is None or not noise_scale > 0:
            raise ValueError(
                f"extrapolation={extrapolation!r} needs noise_scale > 0 (the noise σ or half-width "
                f"a; with filterwise=True a fraction of each filter's norm, e.g. 1e-3), "
                f"got {noise_scale!r}"
            )
    elif noise_scale is not None:
        raise ValueError(
            f"noise_scale only applies to extrapolation='gaussian' or 'uniform', not "
            f"{extrapolation!r}: remove it"
        )
    if group.get("filterwise") and extrapolation not in NOISE_EXTRAPOLATIONS:
        raise ValueError(
            f"filterwise=True scales gaussian/uniform noise per filter; it does not apply to "
            f"extrapolation={extrapolation!r}"
        )


def _patched_by_grad_scaler(optimizer: Optimizer) -> bool:
    """accelerate patches ``step`` on the instance while its GradScaler steps; torch's LR
    schedulers wrap it there too (tagged ``_wrapped_by_lr_sched``), which is harmless."""
    patched = optimizer.__dict__.get("step")
    return patched is not None and not getattr(patched, "_wrapped_by_lr_sched", False)


def _refuse_unattached_dtensors(optimizer: Optimizer) -> None:
    """DTensor parameters (FSDP2's shards) need the FSDP2 adapter, which places x̃ in the local
    shards: the optimizer's own kernels cannot step DTensors."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if any(cls.__name__ == "DTensor" for cls in type(p).__mro__):
                raise RuntimeError(
                    "this extrap_accel optimizer holds DTensor parameters (FSDP2's fully_shard) "
                    "but was not attached: call extrap_accel.attach(model, optimizer) with the "
                    "fully_shard model before the first step"
                )
