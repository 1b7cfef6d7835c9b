"""The first-step check (extrap_accel/safety.py): an extrap_accel optimizer that accelerate steps
without extrap_accel.prepare / attach stops instead of saving or evaluating x̃ silently.

One process, in this process; accelerate's process-wide state is reset around every test.
(Two processes under DDP: tests/test_ddp.py::test_plain_accelerator_prepare_stops_...)
"""

from __future__ import annotations

import pathlib
import re
import sys

import pytest
import torch
from torch import nn

import extrap_accel
from extrap_accel.safety import accelerate_in_use

accelerate = pytest.importorskip("accelerate")
from accelerate.state import AcceleratorState

PACKAGE = pathlib.Path(extrap_accel.__file__).parent


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = extrap_accel.ExtrapSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.0,
                                 extrapolation="gaussian", noise_scale=0.05)  # fmt: skip
    return model, opt


def _step(accelerator, model, opt, t: int = 0) -> None:
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(t))
    accelerator.backward(model(x).square().mean())
    opt.step()
    opt.zero_grad()


def test_the_accelerate_state_it_reads_exists_and_tracks_an_accelerator():
    """The one private name the check relies on: fails here, loudly, if accelerate renames it."""
    assert isinstance(AcceleratorState._shared_state, dict)
    assert not accelerate_in_use()
    accelerate.Accelerator(cpu=True)
    assert accelerate_in_use()


def test_plain_accelerator_prepare_stops_at_the_first_step_and_changes_nothing():
    accelerator = accelerate.Accelerator(cpu=True)
    model, opt = accelerator.prepare(*_setup())
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=re.escape(
            "extrap_accel.prepare(accelerator, model, optimizer, ...)")):  # fmt: skip
        _step(accelerator, model, opt)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert not opt.optimizer.state  # no step was taken


def test_manual_mode_opts_out_and_eval_puts_the_anchor_into_saves():
    accelerator = accelerate.Accelerator(cpu=True)
    model, opt = accelerator.prepare(*_setup())
    assert extrap_accel.manual_mode(opt) is opt  # (the accelerate wrapper is unwrapped)
    for t in range(3):
        _step(accelerator, model, opt, t)
    base = opt.optimizer
    anchors = {n: base.anchor(p).clone() for n, p in model.named_parameters()}
    assert any(not torch.equal(p, anchors[n]) for n, p in model.named_parameters())  # x̃ held
    opt.eval()
    saved = {k: v.clone() for k, v in accelerator.get_state_dict(model).items()}
    opt.train()
    assert all(torch.equal(saved[n], a) for n, a in anchors.items())


def test_extrap_accel_prepare_is_unaffected_and_saves_the_anchor():
    accelerator = accelerate.Accelerator(cpu=True)
    model, opt = extrap_accel.prepare(accelerator, *_setup())
    for t in range(3):
        _step(accelerator, model, opt, t)
    base = opt.optimizer
    saved = accelerator.get_state_dict(model)
    displaced = 0
    for n, p in model.named_parameters():
        assert torch.equal(saved[n], base.anchor(p))
        displaced += not torch.equal(p, base.anchor(p))
    assert displaced


def test_without_an_accelerator_the_plain_manual_mode_needs_no_opt_out():
    assert "accelerate" in sys.modules and not accelerate_in_use()  # imported, none created
    model, opt = _setup()
    model(torch.randn(8, 4)).square().mean().backward()
    opt.step()
    assert opt.state


def test_manual_mode_refuses_an_optimizer_that_is_not_extrap():
    model = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="extrap_accel optimizer"):
        extrap_accel.manual_mode(torch.optim.SGD(model.parameters(), lr=0.1))


def test_no_call_stack_inspection_is_left_in_the_package():
    """Wrappers are detected from state, never by walking frames (which breaks silently when a
    library renames its functions)."""
    pattern = re.compile(r"sys\._getframe|inspect\.stack|inspect\.currentframe|\.f_back|"
                         r"_inner_training_loop|traceback\.extract_stack")  # fmt: skip
    offenders = [f"{path.relative_to(PACKAGE)}:{i}" for path in sorted(PACKAGE.rglob("*.py"))
                 for i, line in enumerate(path.read_text().splitlines(), 1)
                 if pattern.search(line)]  # fmt: skip
    assert not offenders, offenders
