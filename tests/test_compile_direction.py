"""ExtrapSGD(compile_direction=True): the foreach path's local direction as one torch.compile'd
pass. Within 1e-6 of the float64 oracle, one compile per shape set (a schedule changes data,
not the graph), I1 still bit for bit, the default path untouched, misuse refused."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from extrap_accel import ExtrapSGD
from extrap_accel.optim import sgd
from tests.reference import ReferenceExtrapSGD

SHAPES = [(8, 3, 3, 3), (8,), (16, 8, 3, 3), (10, 16)]  # one shape set: the compiles are shared
LRS = [0.1, 0.05, 0.02, 0.08, 0.01]  # a schedule: changes every step
CONFIGS = [
    {
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 5e-4,
        "maximize": True,
        "extrap_max_norm": 0.5,
    },
    {
        "momentum": 0.8,
        "dampening": 0.3,
        "weight_decay": 1e-3,
        "maximize": True,
        "extrap_momentum": 0.6,
    },
    {"momentum": 0.0, "weight_decay": 1e-2},  # no local momentum: the graph without ũ
]


def _data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES] for _ in LRS]
    return init, grads


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["nesterov-maximize-clip", "damped-heavyball", "m0"])
def test_compiled_direction_matches_oracle_and_compiles_once(cfg, monkeypatch):
    calls = []
    compiled = sgd._compiled_sgd_direction_
    monkeypatch.setattr(
        sgd, "_compiled_sgd_direction_", lambda *a, **k: (calls.append(1), compiled(*a, **k))
    )
    init, grads = _data()
    params = [torch.nn.Parameter(t.float()) for t in init]
    opt = ExtrapSGD(params, lr=LRS[0], world_size=1, extrap_scale=2.0, compile_direction=True,
                    **cfg)  # fmt: skip
    ref = ReferenceExtrapSGD(init, lr=LRS[0], world_size=1, extrap_scale=2.0, **cfg)
    for t, (lr, gs) in enumerate(zip(LRS, grads)):
        opt.param_groups[0]["lr"] = ref.lr = lr
        for p, g in zip(params, gs):
            p.grad = g.float()
        before = _graphs()
        if t >= 2:  # compiled at step 0 or 1 (the one after ũ exists): no recompile after that
            with torch._dynamo.config.patch(error_on_recompile=True):
                opt.step()
            assert _graphs() == before
        else:
            opt.step()
        ref.step([[g.float().double() for g in gs]])
        for p, x in zip(params, ref.points(0)):
            err = (p.detach().double() - x).abs().max() / x.abs().max()
            assert err < 1e-6, (t, float(err))
    first_eager = cfg["momentum"] != 0  # the step that creates ũ runs eagerly
    assert len(calls) == len(LRS) - first_eager  # every other step took the compiled kernel


def test_extrap_scale_zero_is_torch_sgd_bit_for_bit_with_compile_direction():
    init, grads = _data(1)
    ours = [torch.nn.Parameter(t.float()) for t in init]
    theirs = [torch.nn.Parameter(t.float()) for t in init]
    kw = {"momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}
    opt = ExtrapSGD(ours, lr=0.1, extrap_scale=0.0, world_size=1, compile_direction=True, **kw)
    base = torch.optim.SGD(theirs, lr=0.1, foreach=True, **kw)
    for lr, gs in zip(LRS, grads):
        for o in (opt, base):
            o.param_groups[0]["lr"] = lr
        for p, q, g in zip(ours, theirs, gs):
            p.grad, q.grad = g.float(), g.float()
        opt.step()
        base.step()
        assert all(torch.equal(p, q) for p, q in zip(ours, theirs))


def test_default_path_does_not_compile():
    init, grads = _data(2)
    params = [torch.nn.Parameter(t.float()) for t in init]
    opt = ExtrapSGD(params, lr=0.1, momentum=0.9, nesterov=True, world_size=1)
    before = dict(counters["stats"])
    for gs in grads[:3]:
        for p, g in zip(params, gs):
            p.grad = g.float()
        opt.step()
    assert dict(counters["stats"]) == before


def test_compile_direction_misuse_is_refused(monkeypatch):
    p = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="foreach=False"):
        ExtrapSGD(p, lr=0.1, foreach=False, compile_direction=True)
    with pytest.raises(ValueError, match="foreach=False"):
        ExtrapSGD([{"params": p, "foreach": False}], lr=0.1, compile_direction=True)
    with monkeypatch.context() as m:
        m.setattr(sgd, "_dynamo_supported", lambda: False)
        with pytest.raises(RuntimeError, match="leave compile_direction=False"):
            ExtrapSGD(p, lr=0.1, compile_direction=True)
    with pytest.raises(TypeError, match="compile_direction must be a bool"):
        ExtrapSGD(p, lr=0.1, compile_direction="yes")
    # a constructor option, not a group key: a group naming it is refused, a typo too
    with pytest.raises(ValueError, match="argument of the whole optimizer"):
        ExtrapSGD([{"params": p, "compile_direction": True}], lr=0.1)
    with pytest.raises(TypeError, match="compile_directoin"):
        ExtrapSGD(p, lr=0.1, compile_directoin=True)
    with pytest.raises(ValueError, match="foreach"):
        sgd.extrap_sgd(p, [torch.zeros(3)], [torch.zeros(3)], [torch.zeros(3)], [None], [None],
                       lr=0.1, extrap_lr=0.1, momentum=0.0, extrap_momentum=0.0,
                       weight_decay=0.0, nesterov=False, foreach=False, compile_direction=True)  # fmt: skip


def test_more_param_groups_than_dynamos_recompile_limit():
    """Nine groups of different shapes: each list compiles once, none hits recompile_limit (8)
    (fullgraph=True would raise there); the result is the eager one's to rounding."""
    limit = torch._dynamo.config.recompile_limit
    init = [torch.randn(n + 2) for n in range(limit + 1)]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    eager = [torch.nn.Parameter(t.clone()) for t in init]
    kw = {"lr": 0.1, "momentum": 0.9, "world_size": 1}
    opt = ExtrapSGD([{"params": [p]} for p in ours], compile_direction=True, **kw)
    ref = ExtrapSGD([{"params": [p]} for p in eager], **kw)
    for step in range(3):
        for p, q in zip(ours, eager):
            p.grad = q.grad = torch.full_like(p, 1.0 + step)
        opt.step()
        ref.step()
    for p, q in zip(ours, eager):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_copies_and_load_state_dict_keep_compile_direction():
    p = [torch.nn.Parameter(torch.randn(4))]
    opt = ExtrapSGD(p, lr=0.1, momentum=0.9, world_size=1, compile_direction=True)
    p[0].grad = torch.ones(4)
    opt.step()
    for other in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert other._compile_direction is True
    fresh = ExtrapSGD([torch.nn.Parameter(torch.randn(4))], lr=0.1, momentum=0.9, world_size=1)
    opt.load_state_dict(fresh.state_dict())
    assert opt._compile_direction is True
