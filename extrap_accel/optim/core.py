"""The one place where this rank's extrapolated point x̃ and the anchor x trade places.

A *slot* is the tensor the forward pass reads on this rank for one parameter: ``p.data`` on one
process and under DDP, DeepSpeed's bit16 weight at ZeRO-0 bf16/1/2, this rank's own shard at
ZeRO-3. A :class:`Core` keeps one dict of state per parameter, in which a key says what the
stored buffer is: in train mode the slot holds x̃ and the dict holds the anchor under
``"anchor"``; in eval mode the slot holds the anchor and the dict keeps x̃ under
``"extrapolated"``. A parameter with neither key is not displaced (x̃ = x). The local state of
the extrapolation (local moments) lives in the same dict.

The optimizer owns a Core over ``p.data`` whose dicts are its own ``optimizer.state`` (so the
state dict carries the anchor). A backend that places x̃ itself subclasses Core to say where
its slots are (:meth:`Core.weight`), whether a slot may be re-pointed for a no-grad forward
(``pointer_swap``), what must follow a change of the slots outside a step (:meth:`Core.changed`)
and whether weights may be loaded through the module (:meth:`Core.move_anchor_`), and hands it
to the optimizer with ``optimizer.bind(core=...)``. Nothing else in the package swaps or places.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from typing import Any

import torch
from torch import Tensor

ANCHOR, EXTRAPOLATED = "anchor", "extrapolated"


class Core:
    """x̃ ↔ anchor for a set of slots: the mode, the swap, placement, restart, local state."""

    # A slot that is a whole tensor of its own may be re-pointed (``p.data = anchor``) for a
    # no-grad forward: no copy. Slots that are views into a backend's flat buffers may not.
    pointer_swap = True

    def __init__(self, state: Callable[[], MutableMapping[Tensor, dict]] | None = None):
        own: dict[Tensor, dict] = {}
        self._state = state or (lambda: own)
        self.training = True
        self._swapped: dict[Tensor, Tensor] = {}  # x̃ re-pointed out of its slot by at_anchor

    @property
    def state(self) -> MutableMapping[Tensor, dict]:
        return self._state()

    # ---------------------------------------------------------------- what an adapter answers
    def weight(self, p: Tensor) -> Tensor:
        """The tensor this rank's forward reads for ``p`` (its slot)."""
        return p.data

    def changed(self) -> None:
        """The slots were changed outside a training step (swap, load, restart)."""

    # ---------------------------------------------------------------- reading
    def _entry(self, p: Tensor) -> dict | None:
        state = self.state
        return state.get(p) if p in state else None  # (a defaultdict must not grow)

    def is_displaced(self, p: Tensor) -> bool:
        entry = self._entry(p)
        return bool(entry) and (ANCHOR in entry or EXTRAPOLATED in entry)

    def anchor(self, p: Tensor) -> Tensor:
        """The anchor of ``p`` on this rank, in either mode (a live tensor: do not modify)."""
        entry = self._entry(p)
        return entry[ANCHOR] if entry and ANCHOR in entry else self.weight(p)

    def point(self, p: Tensor) -> Tensor:
        """This rank's x̃ of ``p``, in either mode (a live tensor: do not modify)."""
        if p in self._swapped:
            return self._swapped[p]
        entry = self._entry(p)
        return entry[EXTRAPOLATED] if entry and EXTRAPOLATED in entry else self.weight(p)

    def displaced(self) -> list[tuple[Tensor, Tensor]]:
        """(parameter, anchor) for every whole parameter that holds x̃ now (train mode): what a
        state dict substitutes."""
        return [(p, e[ANCHOR]) for p, e in list(self.state.items()) if e and ANCHOR in e]

    def holds_points(self) -> bool:
        """Whether any slot holds x̃ now (a no-grad forward must then swap the anchor in)."""
        return self.training and any(e and ANCHOR in e for e in list(self.state.values()))

    # ---------------------------------------------------------------- writing
    def _check_not_at_anchor(self, what: str) -> None:
        if self._swapped:
            raise RuntimeError(f"{what} inside at_anchor() (a no-grad forward at the anchor): "
                               "call it outside the block")

    def ensure_anchor(self, p: Tensor) -> Tensor:
        """The anchor buffer of ``p`` (train mode), created from the slot if ``p`` is not
        displaced yet: whatever the slot holds then is the anchor."""
        entry = self.state.setdefault(p, {})
        anchor = entry.get(ANCHOR)
        if anchor is None:
            anchor = entry[ANCHOR] = self.weight(p).clone(memory_format=torch.preserve_format)
        return anchor

    @torch.no_grad()
    def set_mode(self, train: bool) -> None:
        """Train: x̃ into the slots; eval: the anchor into the slots (exact in-place swaps)."""
        if train == self.training:
            return
        self._check_not_at_anchor("train()/eval()")
        held, other = (EXTRAPOLATED, ANCHOR) if train else (ANCHOR, EXTRAPOLATED)
        for p, entry in list(self.state.items()):
            if entry and held in entry:
                buf = entry.pop(held)
                _swap_(self.weight(p), buf)
                entry[other] = buf
        self.training = train
        self.changed()

    @contextlib.contextmanager
    def at_anchor(self) -> Iterator[None]:
        """The slots hold the anchor inside the block and x̃ again afterwards, even if the block
        raises. Pointer swaps where the slots allow them (no copy), else exact in-place swaps.
        For no-grad use: nothing an autograd graph saved may change."""
        if self._swapped or not self.holds_points():  # (already at the anchor: nested)
            yield
            return
        if not self.pointer_swap:
            self.set_mode(False)
            try:
                yield
            finally:
                self.set_mode(True)
            return
        pairs = self.displaced()
        self._swapped = {p: p.data for p, _ in pairs}
        for p, anchor in pairs:
            p.data = anchor
        try:
            yield
        finally:
            for p, data in self._swapped.items():
                p.data = data
            self._swapped = {}

    def ensure_point(self, p: Tensor) -> Tensor:
        """The x̃ buffer of ``p`` in eval mode (the slot holds the anchor), created from the slot
        if ``p`` is not displaced yet."""
        entry = self.state.setdefault(p, {})
        point = entry.get(EXTRAPOLATED)
        if point is None:
            point = entry[EXTRAPOLATED] = self.weight(p).clone(memory_format=torch.preserve_format)
        return point

    @contextlib.contextmanager
    def at_points(self) -> Iterator[None]:
        """Eval mode's counterpart of :meth:`at_anchor`: the slots hold x̃ inside the block
        (pointer swaps, values untouched) and the anchor again afterwards, even if the block
        raises. For a forward *and backward* at x̃ of a core whose slots keep the anchor (the
        simulator's workers): the x̃ buffers must not change until the backward is done."""
        pairs = [(p, e[EXTRAPOLATED]) for p, e in list(self.state.items())
                 if not self.training and e and EXTRAPOLATED in e]  # fmt: skip
        saved = [(p, p.data) for p, _ in pairs]
        for p, point in pairs:
            p.data = point
        try:
            yield
        finally:
            for p, data in saved:
                p.data = data

    @torch.no_grad()
    def move_anchor_(self, p: Tensor, value: Tensor) -> Tensor | None:
        """Weights loaded into ``p``: the anchor becomes ``value`` and x̃ keeps its displacement
        x̃ − x (bit for bit where ``value`` equals the old anchor). Returns what the slot must
        hold now (x̃ in train mode, the anchor in eval mode), or None if ``p`` is not displaced
        (then ``value`` is simply loaded)."""
        entry = self._entry(p)
        if not entry or not (ANCHOR in entry or EXTRAPOLATED in entry):
            return None
        self._check_not_at_anchor("loading weights")
        old_anchor, old_point = self.anchor(p), self.point(p)
        value = value.to(device=old_anchor.device, dtype=old_anchor.dtype)
        new_point = torch.where(value == old_anchor, old_point, value + (old_point - old_anchor))
        if ANCHOR in entry:
            entry[ANCHOR].copy_(value)
            return new_point
        entry[EXTRAPOLATED].copy_(new_point)
        return value

    @torch.no_grad()
    def restart(self, local_keys: Sequence[str] = ()) -> None:
        """x̃ = x on every slot and the local state forgotten (d = 0, as at t = 0)."""
        self._check_not_at_anchor("restarting the local state")
        for p, entry in list(self.state.items()):
            if not entry:
                continue
            if ANCHOR in entry:
                self.weight(p).copy_(entry.pop(ANCHOR))
            entry.pop(EXTRAPOLATED, None)
            for key in local_keys:
                entry.pop(key, None)
        self.changed()

    # ---------------------------------------------------------------- per-rank checkpoints
    def local_entries(self, params: Sequence[Tensor], keys: Sequence[str] | None,
                      with_anchor: bool = False) -> dict[int, dict[str, Any]]:  # fmt: skip
        """This rank's x̃ (copied) and local state ``keys`` (all keys: None) per parameter
        index, for the displaced parameters among ``params``; ``with_anchor``: its anchor too
        (post-local SGD, where anchors differ per rank)."""
        out = {}
        for idx, p in enumerate(params):
            entry = self._entry(p)
            if not entry or not (ANCHOR in entry or EXTRAPOLATED in entry):
                continue
            names = set(entry) - {ANCHOR, EXTRAPOLATED} if keys is None else keys
            local = {k: entry[k].clone() if torch.is_tensor(entry[k]) else entry[k]
                     for k in names if k in entry}  # fmt: skip
            local[EXTRAPOLATED] = self.point(p).clone()
            if with_anchor:
                local[ANCHOR] = self.anchor(p).clone()
            out[idx] = local
        return out

    @torch.no_grad()
    def load_local_entries(self, params: Sequence[Tensor], entries: dict) -> None:
        """Put back what :meth:`local_entries` saved on this rank. A parameter that is not
        displaced takes what its slot holds now as the anchor (the checkpoint's weights)."""
        self._check_not_at_anchor("loading the local state")
        for idx, saved in entries.items():
            p = params[int(idx)]
            slot = self.weight(p)
            entry = self.state.setdefault(p, {})
            for key, value in saved.items():
                if key not in (ANCHOR, EXTRAPOLATED):
                    entry[key] = value.to(slot.device, copy=True) if torch.is_tensor(value) else value
            if ANCHOR in saved:  # this rank's own anchor (post-local SGD)
                anchor = saved[ANCHOR].to(device=slot.device, dtype=slot.dtype)
                (entry[ANCHOR] if ANCHOR in entry else slot).copy_(anchor)
            point = saved[EXTRAPOLATED].to(device=slot.device, dtype=slot.dtype)
            if self.training:
                self.ensure_anchor(p)
                slot.copy_(point)
            elif EXTRAPOLATED in entry:
                entry[EXTRAPOLATED].copy_(point)
            else:
                entry[EXTRAPOLATED] = point.clone()
        self.changed()


def _swap_(a: Tensor, b: Tensor) -> None:
    """Exchange the values of ``a`` and ``b`` in place."""
    tmp = a.clone()
    a.copy_(b)
    b.copy_(tmp)
