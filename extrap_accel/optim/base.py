"""What extrap-SGD and extrap-Adam share: the anchor ↔ x̃ bookkeeping, the train/eval swap,
K and rank resolution, the noise generators, and checkpointing of all of it.

Between steps (train mode) each parameter holds this worker's extrapolated point x̃ and the
optimizer state holds the anchor x under ``"anchor"``. In eval mode the two are swapped: the
parameter holds x and the state holds x̃ under ``"extrapolated"``. The key always says what the
buffer is, so there is one buffer per parameter whatever the mode. Parameters that have not
been displaced yet (before the first step) hold x = x̃ and have neither key.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import _dist
from ..capture import LocalGradCapture

EXTRAPOLATIONS = ("past", "gaussian", "uniform", "stochastic", "fresh")
NOISE_EXTRAPOLATIONS = ("gaussian", "uniform")


class ExtrapOptimizer(Optimizer):
    """Base class: subclasses implement ``_step_group`` (base update + next x̃ for one group)."""

    # Keys of per-parameter state that are local to this rank (reset by reset_local_state()).
    _local_state_keys: tuple[str, ...] = ()

    def __init__(self, params, defaults: dict[str, Any], *, seed: int, world_size: int | None):
        if world_size is not None and (not isinstance(world_size, int) or world_size < 1):
            raise ValueError(
                f"world_size must be a positive int or None (resolve from torch.distributed), "
                f"got {world_size!r}"
            )
        if not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        defaults = dict(defaults, train_mode=True)
        super().__init__(params, defaults)
        self._init_extrap_attributes(seed=seed, world_size=world_size)

    def _init_extrap_attributes(self, *, seed: int = 0, world_size: int | None = None) -> None:
        self._requested_world_size = world_size
        self._world_size: int | None = None
        self._checkpoint_world_size: int | None = None
        # set by a checkpoint hook that found no local-state file for this rank
        self._local_state_missing: str | None = None
        self._seed = seed
        self._rank: int | None = None
        self._generators: dict[torch.device, torch.Generator] = {}
        self._pending_generator_states: dict[str, Tensor] = {}
        self._pending_local_state: dict[str, Any] | None = None
        self._grad_scaler = None
        self._warned_k1_stochastic = False
        self._initial_placement_pending = False
        # x̃₀ placed at construction, before any process group: with rank 0's noise on every
        # rank (and, under DeepSpeed, before the engine built its master from the weights)
        self._eager_noise_placed = False
        self.stepped_by_deepspeed = False  # set by the DeepSpeed engine adapter
        self.attached = False  # set by extrap_accel.attach (its handle's source is this or
        # an adapter of this)
        self._unscaled_grads: dict[Tensor, Tensor] | None = None  # set by LARS during step()
        # Post-local SGD: anchors and momenta differ per rank, so all of it is per-rank state.
        self.per_rank_state = False
        # The model's parameters per group, kept because DeepSpeed replaces group["params"].
        self._model_param_groups = [list(g["params"]) for g in self.param_groups]
        # Under DeepSpeed ZeRO the groups hold fp32 master partitions = the anchor; step() is
        # then only the base update, and the engine adapter (anchor_source) places x̃.
        self.base_update_only = False
        self.anchor_source = None
        # This rank's gradient before the all-reduce; without a process group gᵏ = p.grad.
        self._capture = LocalGradCapture([p for g in self.param_groups for p in g["params"]])

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("train_mode", True)
        if not hasattr(self, "_capture"):
            self._init_extrap_attributes()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_capture"):  # not during __init__
            self._model_param_groups.append(list(self.param_groups[-1]["params"]))
            self._capture = LocalGradCapture([p for g in self.param_groups for p in g["params"]])

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self._capture.reset()

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

    def _resolve_world_size(self) -> int:
        current = self._requested_world_size or _dist.world_size()
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
            if self._local_state_missing is not None and current > 1:
                raise RuntimeError(
                    f"{self._local_state_missing} is missing: this rank's x̃ and local moments "
                    "were not restored, and it would continue from rank 0's. Copy every rank's "
                    "extrap_accel_local_*_rank*.pt into the checkpoint folder (with node-local "
                    "disks each node writes its own ranks' files), or call "
                    "optimizer.reset_local_state() after loading to restart the local "
                    "extrapolation state (d = 0) on every rank."
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

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(_dist.generator_seed(self._seed, self.rank, device))
            pending = self._pending_generator_states.pop(str(device), None)
            if pending is not None:
                gen.set_state(pending)
            self._generators[device] = gen
        return gen

    def _extrap_lr(self, group: dict[str, Any], lr: float | None = None) -> float:
        """γ̃ for this group: ``extrap_lr`` if set, else extrap_scale·γ/K (γ: the rate just used)."""
        if group["extrap_lr"] is not None:
            return float(group["extrap_lr"])
        lr = float(group["lr"]) if lr is None else lr
        return float(group["extrap_scale"]) * lr / self._resolve_world_size()

    # ------------------------------------------------------------------ modes and swaps
    @property
    def training(self) -> bool:
        return all(group["train_mode"] for group in self.param_groups)

    def _check_train_mode(self) -> None:
        if not self.training:
            raise RuntimeError(
                f"{type(self).__name__}.step() was called in eval mode, where the parameters "
                "hold the anchor. Call optimizer.train() before training again."
            )

    @torch.no_grad()
    def eval(self) -> None:
        """Put the anchor x into the parameters (for evaluation); x̃ is kept in the state."""
        self._set_mode(train=False)

    @torch.no_grad()
    def train(self) -> None:
        """Put this worker's extrapolated point x̃ back into the parameters."""
        self._set_mode(train=True)

    def _set_mode(self, train: bool) -> None:
        if self.base_update_only:  # the engine adapter owns x̃ and the anchor copies
            self.anchor_source.set_mode(train)
            for group in self.param_groups:
                group["train_mode"] = train
            return
        held, other = ("extrapolated", "anchor") if train else ("anchor", "extrapolated")
        for group in self.param_groups:
            if group["train_mode"] == train:
                continue
            for p in group["params"]:
                state = self.state.get(p)
                if state and held in state:
                    buf = state.pop(held)
                    _swap_(p, buf)
                    state[other] = buf
            group["train_mode"] = train

    def displaced(self) -> list[tuple[Tensor, Tensor]]:
        """(parameter, anchor) for every parameter that holds x̃ now (train mode)."""
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and "anchor" in state:
                    out.append((p, state["anchor"]))
        return out

    def anchor(self, p: Tensor) -> Tensor:
        """The anchor x of parameter ``p`` (a live tensor: do not modify)."""
        state = self.state.get(p)
        if state and "anchor" in state:
            return state["anchor"]
        return p.detach()

    def extrapolated(self, p: Tensor) -> Tensor:
        """This worker's x̃ for parameter ``p`` (a live tensor: do not modify)."""
        state = self.state.get(p)
        if state and "extrapolated" in state:
            return state["extrapolated"]
        return p.detach()

    @torch.no_grad()
    def set_anchor_(self, p: Tensor, value: Tensor) -> Tensor:
        """Move the anchor of ``p`` to ``value`` keeping the displacement x̃ − x.

        Returns the new x̃. Where ``value`` equals the old anchor, x̃ is kept bit for bit.
        The caller writes whatever the parameter must hold (x̃ in train mode, x in eval mode).
        """
        old_anchor, old_point = self.anchor(p), self.extrapolated(p)
        value = value.to(device=p.device, dtype=p.dtype)
        moved = value + (old_point - old_anchor)
        new_point = torch.where(value == old_anchor, old_point, moved)
        state = self.state.get(p)
        if state and "anchor" in state:
            state["anchor"].copy_(value)
        elif state and "extrapolated" in state:
            state["extrapolated"].copy_(new_point)
        return new_point

    def _stepped_by_a_wrapper(self) -> bool:
        managed = {id(p) for p in self.managed_params()}
        return any(id(p) not in managed for g in self.param_groups for p in g["params"])

    def managed_params(self) -> list[Tensor]:
        """The parameters this optimizer was built with (the model's, also under DeepSpeed)."""
        return [p for group in self._model_param_groups for p in group]

    @torch.no_grad()
    def move_anchor_(self, p: Tensor, value: Tensor) -> Tensor | None:
        """Loading weights into ``p``: the anchor becomes ``value``; returns what ``p`` must hold.

        None if ``p`` carries no displacement (then ``value`` is simply loaded).
        """
        state = self.state.get(p)
        if not state or not ("anchor" in state or "extrapolated" in state):
            return None
        new_point = self.set_anchor_(p, value)
        return new_point if "anchor" in state else value

    def _ensure_anchor(self, p: Tensor, state: dict[str, Any]) -> Tensor:
        anchor = state.get("anchor")
        if anchor is None:
            anchor = state["anchor"] = p.detach().clone(memory_format=torch.preserve_format)
        return anchor

    # ------------------------------------------------------------------ local state
    @torch.no_grad()
    def reset_local_state(self) -> None:
        """Forget this rank's local extrapolation state: x̃ = x, local moments and generators anew.

        Use after loading a checkpoint saved with another number of processes.
        """
        warnings.warn(
            "extrap_accel: resetting the local extrapolation state (d = 0, local moments and "
            "noise generators restarted); K is resolved again at the next step.",
            stacklevel=2,
        )
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                if "anchor" in state:
                    p.copy_(state["anchor"])
                for key in self._local_state_keys:
                    state.pop(key, None)
        self._world_size = None
        self._checkpoint_world_size = None
        self._local_state_missing = None
        self._rank = None
        self._generators.clear()
        self._pending_generator_states.clear()

    def _local_grad(self, p: Tensor) -> Tensor:
        if self._capture.active:
            g = self._capture.get(p)
            if g is not None:
                return g
        return self._averaged_grad(p)

    def _averaged_grad(self, p: Tensor) -> Tensor:
        """The averaged gradient before any base-update-only rescaling (LARS)."""
        if self._unscaled_grads is not None and p in self._unscaled_grads:
            return self._unscaled_grads[p]
        return p.grad

    def local_grad(self, p: Tensor) -> Tensor | None:
        """This rank's local gradient gᵏ of ``p`` as the next step will use it.

        Under data parallelism: the captured pre-all-reduce gradient (still multiplied by the
        fp16 loss scale before ``step``); with one process: ``p.grad``.
        """
        return self._local_grad(p)

    @property
    def captures_local_grads(self) -> bool:
        """True once a backward ran under a process group of more than one rank."""
        return bool(self._capture.active)

    def _begin_step(self) -> bool:
        """Checks and bookkeeping shared by every step(); False: skip this step entirely."""
        if not self.base_update_only and self._stepped_by_a_wrapper():
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
        if self._world_size is None and not self.attached:  # the first step (of this run)
            _refuse_an_unattached_trainer()
        self._resolve_world_size()
        self._initial_placement_pending = self._eager_noise_placed = False
        fresh = any(group["extrapolation"] == "fresh" for group in self.param_groups)
        if fresh and (self._capture.active or _dist.world_size() > 1):
            raise RuntimeError(
                "extrapolation='fresh' is not supported under data parallelism (its extra "
                "backward would be all-reduced); use 'past' (extrap-SGD) or run one process"
            )
        if not self._capture.active:
            return True
        if self._grad_scaler is not None:
            inv_scale = 1.0 / self._grad_scaler.get_scale()  # the scale of this step's backward
            grads = [
                self._capture.get(p) for g in self.param_groups for p in g["params"]
            ]
            grads = [g for g in grads if g is not None]
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

    def _local_clip_coef(self) -> dict[int, float | None]:
        """Per group: the factor that clips this rank's local gradient at ``extrap_max_norm``.

        The norm is the total norm of the local gradient over all of this optimizer's
        parameters (as ``clip_grad_norm_`` over the model); each group clips at its own threshold.
        """
        if all(group["extrap_max_norm"] is None for group in self.param_groups):
            return {}
        grads = [self._local_grad(p) for p in self.managed_params()]
        grads = [g for g in grads if g is not None]
        if not grads:
            return {}
        device = grads[0].device
        norms = [n.to(device, torch.float64) for n in torch._foreach_norm(grads, 2.0)]
        total = float(torch.linalg.vector_norm(torch.stack(norms), 2.0))  # one host sync
        out = {}
        for i, group in enumerate(self.param_groups):
            max_norm = group["extrap_max_norm"]
            if max_norm is not None:
                out[i] = min(1.0, float(max_norm) / (total + 1e-6))
        return out

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """The optimizer state, with both the anchor and this rank's x̃ of every parameter.

        Whatever the mode, each displaced parameter's entry has ``"anchor"`` and
        ``"extrapolated"`` (one of them is the live parameter), so a resumed run continues
        bit for bit even when the model weights were saved as the anchor.
        """
        sd = super().state_dict()
        index = {}
        for group, packed in zip(self.param_groups, sd["param_groups"]):
            index.update(zip(packed["params"], group["params"]))
        state = {}
        for idx, entry in sd["state"].items():
            entry = dict(entry)
            p = index.get(idx)
            if p is not None:
                if "anchor" in entry and "extrapolated" not in entry:
                    entry["extrapolated"] = p.detach()
                elif "extrapolated" in entry and "anchor" not in entry:
                    entry["anchor"] = p.detach()
            state[idx] = entry
        sd["state"] = state
        sd["extrap"] = {
            "format": 1,
            "world_size": self._world_size or self._checkpoint_world_size,
            "rank": self._rank,
            "seed": self._seed,
            "generators": {str(d): g.get_state() for d, g in self._generators.items()},
        }
        return sd

    def _param_index(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def local_state_dict(self) -> dict[str, Any]:
        """This rank's own state: its x̃, its local moments and its noise generators.

        Data-parallel frameworks save the optimizer from the main process only; save this on
        every rank (``extrap_accel.prepare`` and ``attach(trainer)`` do) so that a resumed run
        continues bit for bit on every rank.
        """
        state = {}
        for idx, p in enumerate(self._param_index()):
            entry = self.state.get(p)
            if not entry or not ("anchor" in entry or "extrapolated" in entry):
                continue
            keys = set(entry) - {"anchor", "extrapolated"} if self.per_rank_state else (
                self._local_state_keys)
            local = {k: entry[k] for k in keys if k in entry}
            local["extrapolated"] = self.extrapolated(p)
            if self.per_rank_state:
                local["anchor"] = self.anchor(p)
            state[idx] = local
        return {
            "format": 1,
            "rank": self.rank,
            "world_size": self._world_size or self._checkpoint_world_size,
            "state": state,
            "generators": {str(d): g.get_state() for d, g in self._generators.items()},
        }

    @torch.no_grad()
    def load_local_state_dict(self, local: dict[str, Any]) -> None:
        """Restore what ``local_state_dict`` saved on this rank (after ``load_state_dict``)."""
        if local.get("rank") != self.rank:
            raise ValueError(
                f"this local extrapolation state belongs to rank {local.get('rank')}, not to "
                f"rank {self.rank}: load each rank's own file"
            )
        self._local_state_missing = None
        params = self._param_index()
        for idx, entry in local["state"].items():
            p = params[int(idx)]
            state = self.state[p]
            for key, value in entry.items():
                if key in ("extrapolated", "anchor"):
                    continue
                dtype = value.dtype if key in ("step", "extrap_step") else p.dtype
                state[key] = value.to(device=p.device, dtype=dtype, copy=True)
            if "anchor" in entry:  # post-local SGD: this rank's own anchor
                anchor = entry["anchor"].to(device=p.device, dtype=p.dtype)
                (state["anchor"] if "anchor" in state else p.data).copy_(anchor)
            point = entry["extrapolated"].to(device=p.device, dtype=p.dtype)
            if "anchor" in state:  # train mode: the parameter holds x̃
                p.copy_(point)
            elif "extrapolated" in state:
                state["extrapolated"].copy_(point)
            else:
                raise ValueError(
                    f"local state for parameter {idx} but the optimizer has no anchor for it: "
                    "load the optimizer's state_dict first"
                )
        self._checkpoint_world_size = local.get("world_size")
        self._generators.clear()
        self._pending_generator_states = {
            d: s.clone() for d, s in local.get("generators", {}).items()
        }

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("extrap", None)
        if extra is None:
            raise ValueError(
                f"this state dict has no 'extrap' entry: it was not saved by an extrap_accel "
                f"optimizer (or is corrupt). Load it into the optimizer that saved it, e.g. "
                f"torch.optim.SGD, or start {type(self).__name__} from fresh state."
            )
        for idx, entry in state_dict.get("state", {}).items():
            if ("anchor" in entry) != ("extrapolated" in entry):
                raise ValueError(
                    f"corrupt {type(self).__name__} state dict: parameter {idx} has only one of "
                    "'anchor'/'extrapolated'; save it with this optimizer's state_dict()."
                )
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            held = "anchor" if group["train_mode"] else "extrapolated"
            shown = "extrapolated" if group["train_mode"] else "anchor"
            for p in group["params"]:
                state = self.state.get(p)
                if state and shown in state:
                    p.copy_(state.pop(shown))
                    state[held] = state[held].clone(memory_format=torch.preserve_format)
        if any("anchor" in st or "extrapolated" in st for st in self.state.values()):
            self._initial_placement_pending = False  # the checkpoint's x̃ is this run's x̃
        self._eager_noise_placed = False
        self._world_size = None
        self._checkpoint_world_size = extra.get("world_size")
        self._rank = None
        self._seed = extra.get("seed", self._seed)
        self._generators.clear()
        self._pending_generator_states = {
            d: s.clone() for d, s in extra.get("generators", {}).items()
        }
        pending, self._pending_local_state = self._pending_local_state, None
        if pending is not None:  # set by a checkpoint hook that ran before this load
            self.load_local_state_dict(pending)

    # ------------------------------------------------------------------ stepping
    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step at the anchor, then x̃ for the next forward into the parameters.

        ``closure`` (zero grads, forward, backward, return loss) is optional, and required by
        ``extrapolation="fresh"``, which calls it twice: at the anchor and at x̃.
        """
        if not self._begin_step():
            return None
        loss = None
        if any(group["extrapolation"] == "fresh" for group in self.param_groups):
            self._fresh_pass(closure)
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # (base update only: the DeepSpeed adapter clips the local direction itself, once)
        coefs = {} if self.base_update_only else self._local_clip_coef()
        for i, group in enumerate(self.param_groups):
            self._step_group(group, coefs.get(i, 1.0))
        if not self.base_update_only:  # (DeepSpeed: the adapter still needs them, and resets)
            self._capture.reset()  # gᵏ is consumed: the next backward starts a new sum
        return loss

    def _step_group(self, group: dict[str, Any], local_coef: float) -> None:
        """The base update of one group and, unless ``base_update_only``, its next x̃."""
        raise NotImplementedError

    def _first_noise_placement(self) -> None:
        """Noise variants perturb from t = 0: place x̃₀ = x₀ + ξ₀ as soon as the optimizer exists.

        Under a process group the model is usually wrapped (and its weights broadcast from
        rank 0) after the optimizer is built, so the placement waits for ``attach``/``prepare``.
        """
        if not any(g["extrapolation"] in NOISE_EXTRAPOLATIONS for g in self.param_groups):
            return
        if _dist.is_initialized():
            self._initial_placement_pending = True
            return
        self.place_initial_noise()
        self._eager_noise_placed = True

    @torch.no_grad()
    def place_initial_noise(self) -> None:
        """x̃₀ = x₀ + ξ₀ for the noise variants, from the current parameters as x₀."""
        from .directions import place_noise_

        self._initial_placement_pending = False
        for group in self.param_groups:
            if group["extrapolation"] in NOISE_EXTRAPOLATIONS:
                params = [p for p in group["params"] if p.numel() > 0 and p.requires_grad]
                anchors = [self._ensure_anchor(p, self.state[p]) for p in params]
                place_noise_(params, anchors, group=group, generator=self._generator)

    @torch.no_grad()
    def _take_back_eager_noise(self) -> dict[Tensor, Tensor]:
        """An x̃₀ placed at construction, before the process group existed, holds rank 0's
        noise on every rank around each rank's own x₀, while the wrapper (DDP, DeepSpeed) has
        since made rank 0's weights everyone's. Returns x₀ from rank 0 for each displaced
        parameter (one broadcast each, at setup) and forgets those anchors and the generators
        seeded for rank 0; the caller puts x₀ back, and x̃₀ is placed again (pending)."""
        if not (self._eager_noise_placed and _dist.is_initialized()):
            return {}
        self._eager_noise_placed = False
        self._generators.clear()
        x0 = {}
        for p in self.managed_params():
            state = self.state.get(p)
            if not state or "anchor" not in state:
                continue
            anchor = state.pop("anchor").to(p.device)
            state.pop("extrapolated", None)
            torch.distributed.broadcast(anchor, src=0)
            x0[p] = anchor
        self._initial_placement_pending = True
        return x0

    def _warn_stochastic_k1(self) -> None:
        if not self._warned_k1_stochastic and self._resolve_world_size() == 1:
            self._warned_k1_stochastic = True
            warnings.warn(
                "extrapolation='stochastic' with one worker (K = 1): ξ = −γ̃(gᵏ − g) is 0, so this "
                "is plain SGD. Use it under data parallelism.",
                stacklevel=3,
            )

    def _params_with_grad(self, group: dict[str, Any]) -> list[Tensor]:
        return [p for p in group["params"] if p.grad is not None]

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
            gamma = self._extrap_lr(group)
            for p in self._params_with_grad(group):
                anchor = self._ensure_anchor(p, self.state[p])
                torch.add(anchor, self._local_grad(p), alpha=-gamma, out=p.data)


def _swap_(p: Tensor, buf: Tensor) -> None:
    """Exchange the values of parameter ``p`` and buffer ``buf`` in place."""
    tmp = p.detach().clone()
    p.detach().copy_(buf)
    buf.copy_(tmp)


def check_param_group_options(
    defaults: dict[str, Any], *, supports: Iterable[str] = EXTRAPOLATIONS
) -> None:
    """Validate the extrapolation options shared by every optimizer here."""
    lr = defaults["lr"]
    if not (isinstance(lr, (int, float)) and lr >= 0):
        raise ValueError(f"Invalid learning rate: {lr!r} (must be a float >= 0)")
    if defaults["weight_decay"] < 0:
        raise ValueError(f"Invalid weight_decay value: {defaults['weight_decay']} (must be >= 0)")
    extrapolation = defaults["extrapolation"]
    if extrapolation not in supports:
        raise ValueError(
            f"unknown extrapolation={extrapolation!r}; choose one of {', '.join(supports)}"
        )
    if defaults["extrap_scale"] < 0:
        raise ValueError(f"Invalid extrap_scale: {defaults['extrap_scale']} (must be >= 0)")
    if defaults["extrap_lr"] is not None:
        if defaults["extrap_lr"] < 0:
            raise ValueError(f"Invalid extrap_lr: {defaults['extrap_lr']} (must be >= 0 or None)")
        if defaults["extrap_scale"] != 1.0:
            raise ValueError(
                "give either extrap_lr (an absolute γ̃) or extrap_scale (γ̃ = extrap_scale·lr/K), "
                "not both"
            )
    max_norm = defaults["extrap_max_norm"]
    if max_norm is not None:
        if not max_norm > 0:
            raise ValueError(f"Invalid extrap_max_norm: {max_norm} (must be > 0 or None)")
        if extrapolation != "past":
            raise ValueError(
                f"extrap_max_norm clips the local gradient of the 'past' direction; it has no "
                f"effect with extrapolation={extrapolation!r}: remove it"
            )
    noise_scale = defaults.get("noise_scale")
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
    if defaults.get("filterwise") and extrapolation not in NOISE_EXTRAPOLATIONS:
        raise ValueError(
            f"filterwise=True scales gaussian/uniform noise per filter; it does not apply to "
            f"extrapolation={extrapolation!r}"
        )


def _patched_by_grad_scaler(optimizer: Optimizer) -> bool:
    """accelerate patches ``step`` on the instance while its GradScaler steps; torch's LR
    schedulers wrap it there too (tagged ``_wrapped_by_lr_sched``), which is harmless."""
    patched = optimizer.__dict__.get("step")
    return patched is not None and not getattr(patched, "_wrapped_by_lr_sched", False)


def _refuse_an_unattached_trainer() -> None:
    """A Hugging Face Trainer never swaps the anchor in before it saves: stepping one that was
    not attached would write x̃ into every checkpoint (and, under DDP, resume every rank from
    rank 0's x̃). Found by the Trainer's training loop on the stack, at the first step only."""
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "_inner_training_loop" and "transformers" in code.co_filename:
            raise RuntimeError(
                "a Hugging Face Trainer is stepping this extrap_accel optimizer, but it was not "
                "attached: call extrap_accel.attach(trainer) before trainer.train(), so that "
                "checkpoints and save_model hold the anchor and each rank's state is saved"
            )
        frame = frame.f_back
