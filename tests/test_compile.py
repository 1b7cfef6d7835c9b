"""torch.compile(model) with attach and the local-gradient capture (one process, CPU).

backend="aot_eager": TorchDynamo traces the model with attach's forward hooks, and AOTAutograd
builds the compiled forward and backward, the parts that meet extrap_accel's hooks (the
anchor swap around no-grad forwards, the tensor hooks that capture gᵏ); inductor only generates
other kernels for the same graphs (checked by hand with inductor: the same results, about
17 s of CPU compile time, too slow for the suite).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import extrap_accel
from extrap_accel.capture import CaptureMode


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def _train(compiled: bool, steps: int = 3) -> dict:
    torch._dynamo.reset()
    model = _model()
    opt = extrap_accel.ExtrapSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.0)
    opt.bind(capture=CaptureMode(always=True))  # capture gᵏ as under DDP, in one process
    run = torch.compile(model, backend="aot_eager") if compiled else model
    extrap_accel.attach(run, opt)
    out = {"loss": [], "eval": [], "captured": []}
    for t in range(steps):
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(t))
        loss = run(x).square().mean()
        loss.backward()
        out["captured"].append([opt.local_grad(p).clone() for p in model.parameters()])
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            out["eval"].append(run(x))
        out["loss"].append(loss.detach())
    out["anchors"] = [opt.anchor(p).clone() for p in model.parameters()]
    out["points"] = [p.detach().clone() for p in model.parameters()]
    out["state_dict"] = run.state_dict()
    return out


def _close(a, b) -> bool:
    return all(torch.allclose(x, y, rtol=0, atol=1e-6) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def runs():
    return _train(compiled=False), _train(compiled=True)


def test_compiled_training_matches_eager_with_the_local_gradient_captured(runs):
    eager, compiled = runs
    assert _close(eager["loss"], compiled["loss"])
    for a, b in zip(eager["captured"], compiled["captured"], strict=True):
        assert _close(a, b) and any(bool(g.any()) for g in b)
    assert _close(eager["anchors"], compiled["anchors"])
    assert _close(eager["points"], compiled["points"])
    assert any(not torch.equal(p, a) for p, a in zip(compiled["points"], compiled["anchors"]))


def test_a_compiled_model_evaluates_and_saves_the_anchor(runs):
    eager, compiled = runs
    assert _close(eager["eval"], compiled["eval"])
    saved = compiled["state_dict"]  # the compiled wrapper's keys: "_orig_mod." + name
    assert list(saved) == [f"_orig_mod.{n}" for n, _ in _model().named_parameters()]
    assert _close(list(saved.values()), compiled["anchors"])
    plain = _model()  # the anchor, evaluated without extrap_accel
    plain.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in saved.items()})
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(2))  # the last step's batch
    with torch.no_grad():
        assert torch.allclose(compiled["eval"][-1], plain(x), rtol=0, atol=1e-6)
