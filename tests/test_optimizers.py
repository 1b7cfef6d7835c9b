"""Conformance tests for the optimizers of extrap_accel (CPU, fast).

Modelled on torch's ``common_optimizers``: every registry entry is described once in ``SPECS``
(the kwargs that build it, its error inputs with the expected message, what it needs), and the
generic tests enumerate that table. The algorithm-specific tests below check the invariants of
docs/algorithms.md against the slow oracle in ``tests/reference.py``.
"""

from __future__ import annotations

import copy
import io
import math
import re
import warnings
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import extrap_accel
from extrap_accel import ExtrapAdam, ExtrapOptimizer, ExtrapSGD, create_optimizer, list_optimizers
from extrap_accel import get_optimizer_info
from reference import ReferenceExtrapAdam, ReferenceExtrapSGD, reference_extragradient_past_k1

# The K = 1 warning of 'stochastic' is tested explicitly; elsewhere it is expected noise.
pytestmark = pytest.mark.filterwarnings(
    "ignore:extrapolation='stochastic' with one worker:UserWarning"
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add latency (100x on a loaded CI machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# The conformance table: one record per registry entry.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ErrorInput:
    """Constructor kwargs (merged over the spec's valid kwargs) that must raise ``error``."""

    kwargs: dict[str, Any]
    match: str
    error: type[Exception] = ValueError


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    kwargs: dict[str, Any]
    error_inputs: tuple[ErrorInput, ...] = ()

    # what the entry can do comes from its registry record, not from this table
    @property
    def extrapolates(self) -> bool:
        return get_optimizer_info(self.name).extrapolates

    @property
    def needs_closure(self) -> bool:
        return get_optimizer_info(self.name).needs_closure

    @property
    def noise(self) -> bool:
        variant = get_optimizer_info(self.name).variant
        return variant is not None and variant.noise


_EXTRAP_COMMON_ERRORS = (
    ErrorInput({"lr": -0.1}, r"Invalid learning rate"),
    ErrorInput({"weight_decay": -1e-3}, r"Invalid weight_decay"),
    ErrorInput({"extrap_scale": -1.0}, r"Invalid extrap_scale"),
    ErrorInput({"extrap_lr": -0.01}, r"Invalid extrap_lr"),
    ErrorInput({"extrap_lr": 0.01, "extrap_scale": 2.0}, r"either extrap_lr .* or extrap_scale"),
    ErrorInput({"world_size": 0}, r"world_size must be a positive int"),
    ErrorInput({"world_size": -2}, r"world_size must be a positive int"),
    ErrorInput({"seed": 1.5}, r"seed must be an int"),
)
_SGD_ERRORS = _EXTRAP_COMMON_ERRORS + (
    ErrorInput({"momentum": -0.5}, r"Invalid momentum value"),
    ErrorInput({"extrap_momentum": -0.5}, r"Invalid extrap_momentum value"),
    ErrorInput({"momentum": 0.0, "nesterov": True}, r"Nesterov momentum requires a momentum"),
    ErrorInput({"dampening": 0.5, "nesterov": True}, r"Nesterov momentum requires .* zero damp"),
    ErrorInput({"extrapolation": "sideways"}, r"unknown extrapolation='sideways'; choose one of"),
)
_NOISE_ERRORS = _SGD_ERRORS + (
    # through the registry: the required kwarg is named, with an example
    ErrorInput({"noise_scale": None}, r"needs noise_scale \(e\.g\. create_optimizer"),
    ErrorInput({"noise_scale": 0.0}, r"needs noise_scale > 0"),
    ErrorInput({"noise_scale": -1e-3}, r"needs noise_scale > 0"),
    ErrorInput({"extrap_max_norm": 1.0}, r"extrap_max_norm clips .* 'past'"),
)
_NON_PAST_ERRORS = (
    ErrorInput({"extrap_max_norm": 1.0}, r"extrap_max_norm clips .* 'past'"),
    ErrorInput({"noise_scale": 0.1}, r"noise_scale only applies to extrapolation='gaussian'"),
    ErrorInput({"filterwise": True}, r"filterwise=True scales gaussian/uniform noise"),
)

SPECS: tuple[OptimizerSpec, ...] = (
    OptimizerSpec(
        "sgd",
        dict(lr=0.05, momentum=0.9),
        (
            ErrorInput({"lr": -0.1}, r"Invalid learning rate"),
            ErrorInput({"momentum": -0.5}, r"Invalid momentum value"),
        ),
    ),
    OptimizerSpec(
        "adamw",
        dict(lr=1e-2),
        (
            ErrorInput({"lr": -0.1}, r"Invalid learning rate"),
            ErrorInput({"betas": (1.0, 0.999)}, r"Invalid beta parameter at index 0"),
            ErrorInput({"eps": -1e-8}, r"Invalid epsilon value"),
        ),
    ),
    OptimizerSpec(
        "extrap_sgd",
        dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4),
        _SGD_ERRORS
        + (
            ErrorInput({"noise_scale": 0.1}, r"noise_scale only applies to extrapolation="),
            ErrorInput({"filterwise": True}, r"filterwise=True scales gaussian/uniform noise"),
            ErrorInput({"extrap_max_norm": 0.0}, r"Invalid extrap_max_norm"),
            ErrorInput({"extrap_max_norm": -1.0}, r"Invalid extrap_max_norm"),
        ),
    ),
    OptimizerSpec(
        "extrap_sgd_gaussian",
        dict(lr=0.05, momentum=0.9, noise_scale=1e-3),
        _NOISE_ERRORS,
    ),
    OptimizerSpec(
        "extrap_sgd_uniform",
        dict(lr=0.05, momentum=0.9, noise_scale=1e-3),
        _NOISE_ERRORS,
    ),
    OptimizerSpec(
        "extrap_sgd_filterwise",
        dict(lr=0.05, momentum=0.9, noise_scale=1e-2),
        _NOISE_ERRORS,
    ),
    OptimizerSpec(
        "extrap_sgd_stochastic",
        dict(lr=0.05, momentum=0.9),
        _SGD_ERRORS + _NON_PAST_ERRORS,
    ),
    OptimizerSpec(
        "extrap_sgd_fresh",
        dict(lr=0.05, momentum=0.9),
        _SGD_ERRORS + _NON_PAST_ERRORS,
    ),
    OptimizerSpec(
        "extrap_adam",
        dict(lr=1e-2, weight_decay=1e-4),
        _EXTRAP_COMMON_ERRORS
        + (
            ErrorInput({"betas": (0.9, 1.0)}, r"Invalid beta parameter at index 1: 1.0"),
            ErrorInput({"betas": (-0.1, 0.999)}, r"Invalid beta parameter at index 0: -0.1"),
            ErrorInput({"betas": (0.9,)}, r"Invalid betas"),
            ErrorInput({"eps": -1e-8}, r"Invalid epsilon value"),
            ErrorInput({"extrap_max_norm": 0.0}, r"Invalid extrap_max_norm"),
        ),
    ),
)
SPEC_BY_NAME = {s.name: s for s in SPECS}
EXTRAP_SPECS = [s for s in SPECS if s.extrapolates]


def _ids(specs):
    return [s.name for s in specs]


def _error_cases():
    for spec in SPECS:
        for i, err in enumerate(spec.error_inputs):
            yield pytest.param(spec, err, id=f"{spec.name}-{i}-{'-'.join(err.kwargs)}")


# ---------------------------------------------------------------------------------------------
# A small regression problem and helpers shared by the generic tests.
# ---------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """8 → 16 → 1 tanh MLP with deterministic initialisation (no global RNG)."""

    def __init__(self, seed: int = 0, dtype: torch.dtype = torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(torch.randn(16, 8, generator=g, dtype=dtype) / math.sqrt(8))
        self.b1 = nn.Parameter(0.1 * torch.randn(16, generator=g, dtype=dtype))
        self.w2 = nn.Parameter(torch.randn(1, 16, generator=g, dtype=dtype) / 4)
        self.b2 = nn.Parameter(torch.zeros(1, dtype=dtype))

    def forward(self, x):
        return torch.tanh(x @ self.w1.T + self.b1) @ self.w2.T + self.b2


def make_data(dtype=torch.float32):
    g = torch.Generator().manual_seed(1234)
    X = torch.randn(64, 8, generator=g, dtype=dtype)
    v = torch.randn(8, generator=g, dtype=dtype)
    y = (torch.sin(X @ v) + 0.5 * X[:, 0]).unsqueeze(1)
    return X, y


DATA = make_data()


def mse(model, data=DATA):
    X, y = data
    return ((model(X) - y) ** 2).mean()


def build(spec: OptimizerSpec, params, **overrides):
    return create_optimizer(spec.name, params, **{**spec.kwargs, **overrides})


def anchor_of(opt, p):
    """The anchor x of ``p`` (for the torch baselines the parameter itself)."""
    return opt.anchor(p) if isinstance(opt, ExtrapOptimizer) else p.detach()


def take_step(opt, spec: OptimizerSpec, loss_fn):
    """One training step: ``loss_fn()`` builds the loss; a closure where the optimizer needs one."""

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        return loss

    if spec.needs_closure:
        return opt.step(closure)
    loss = closure()
    opt.step()
    return loss


def roundtrip(obj):
    """What a checkpoint does to ``obj``: torch.save, then torch.load."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf)


def snapshot_state(opt, p):
    state = opt.state.get(p, {})
    return {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in state.items()}


def assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


# ---------------------------------------------------------------------------------------------
# Generic tests over the table.
# ---------------------------------------------------------------------------------------------
def test_registry_has_exactly_the_table():
    assert list_optimizers() == sorted(SPEC_BY_NAME), (
        "every registry entry needs a record in SPECS (and every record an entry)"
    )


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match=r"unknown optimizer 'nope'") as info:
        create_optimizer("nope", [nn.Parameter(torch.zeros(2))], lr=0.1)
    for name in list_optimizers():
        assert name in str(info.value)


@pytest.mark.parametrize("spec", SPECS, ids=_ids(SPECS))
def test_builds_the_registered_class(spec):
    model = MLP()
    opt = build(spec, model.parameters())
    info = get_optimizer_info(spec.name)
    assert type(opt) is info.cls
    for key, value in info.defaults.items():
        assert opt.param_groups[0][key] == value


@pytest.mark.parametrize("spec", SPECS, ids=_ids(SPECS))
def test_loss_falls(spec):
    model = MLP()
    with torch.no_grad():
        initial = mse(model).item()
    opt = build(spec, model.parameters())
    for _ in range(30):
        take_step(opt, spec, lambda: mse(model))
    if isinstance(opt, ExtrapOptimizer):
        opt.eval()  # evaluate the anchor
    with torch.no_grad():
        final = mse(model).item()
    assert math.isfinite(final)
    assert final < 0.6 * initial, (initial, final)


@pytest.mark.parametrize("spec", SPECS, ids=_ids(SPECS))
def test_per_group_lr_and_weight_decay_isolated(spec):
    model = MLP()
    z = nn.Parameter(torch.randn(5, generator=torch.Generator().manual_seed(3)))
    opt = build(
        spec,
        [
            {"params": [model.w1, model.b1], "weight_decay": 0.1},
            {"params": [model.w2, model.b2], "lr": 0.0, "weight_decay": 0.1},
            # no gradient signal and no weight decay: must not move although group 0 decays
            {"params": [z], "weight_decay": 0.0},
        ],
    )
    before = {p: anchor_of(opt, p).clone() for p in (model.w1, model.w2, model.b2, z)}
    for _ in range(5):
        take_step(opt, spec, lambda: mse(model) + 0.0 * z.sum())
    assert torch.equal(anchor_of(opt, model.w2), before[model.w2])
    assert torch.equal(anchor_of(opt, model.b2), before[model.b2])
    assert torch.equal(anchor_of(opt, z), before[z])
    assert not torch.equal(anchor_of(opt, model.w1), before[model.w1])


@pytest.mark.parametrize("spec", SPECS, ids=_ids(SPECS))
def test_none_grads_change_nothing(spec):
    model = MLP()
    z = nn.Parameter(torch.randn(5, generator=torch.Generator().manual_seed(4)))
    opt = build(spec, [*model.parameters(), z])
    for _ in range(3):  # z gets gradients and state first
        take_step(opt, spec, lambda: mse(model) + (z**2).sum())
    z_value, z_state = z.detach().clone(), snapshot_state(opt, z)
    w1 = model.w1.detach().clone()
    for _ in range(4):
        take_step(opt, spec, lambda: mse(model))
        assert z.grad is None
    assert torch.equal(z.detach(), z_value)
    assert_state_equal(snapshot_state(opt, z), z_state)
    assert not torch.equal(model.w1.detach(), w1)


@pytest.mark.parametrize("spec", SPECS, ids=_ids(SPECS))
def test_frozen_params(spec):
    model = MLP()
    frozen = nn.Parameter(torch.randn(16, generator=torch.Generator().manual_seed(5)),
                          requires_grad=False)
    frozen0 = frozen.detach().clone()
    w1 = model.w1.detach().clone()
    opt = build(spec, [*model.parameters(), frozen])

    def loss():
        X, y = DATA
        h = torch.tanh(X @ model.w1.T + model.b1 + frozen)
        return ((h @ model.w2.T + model.b2 - y) ** 2).mean()

    losses = [take_step(opt, spec, loss).item() for _ in range(5)]
    assert all(math.isfinite(v) for v in losses)
    assert frozen.grad is None
    assert torch.equal(anchor_of(opt, frozen), frozen0)
    assert not torch.equal(anchor_of(opt, model.w1), w1)
    if isinstance(opt, ExtrapOptimizer):
        opt.eval()  # NB: the noise variants perturb frozen tensors too (once, at t = 0)
    assert torch.equal(frozen.detach(), frozen0)




def _empty_cases():
    for spec in SPECS:
        for shape in ((0, 3), (3, 0), (0,)):
            yield pytest.param(spec, shape, id=f"{spec.name}-{'x'.join(map(str, shape))}")


@pytest.mark.parametrize("spec,shape", list(_empty_cases()))
def test_empty_params(spec, shape):
    model = MLP()
    empty = nn.Parameter(torch.zeros(shape))
    w1 = model.w1.detach().clone()
    opt = build(spec, [*model.parameters(), empty])
    for _ in range(3):
        loss = take_step(opt, spec, lambda: mse(model) + empty.sum())
        assert math.isfinite(loss.item())
    assert empty.grad is not None and empty.shape == shape
    assert anchor_of(opt, empty).shape == shape
    assert not torch.equal(anchor_of(opt, model.w1), w1)


@pytest.mark.parametrize("spec", SPECS, ids=_ids(SPECS))
def test_state_dict_lockstep(spec):
    """Save (model at the anchor, optimizer state via torch.save), load into fresh objects,
    then both continue bit-identically (parameters and anchors), noise generators included."""
    model = MLP()
    opt = build(spec, model.parameters())
    for _ in range(5):
        take_step(opt, spec, lambda: mse(model))
    extrap = isinstance(opt, ExtrapOptimizer)
    if extrap:
        opt.eval()
    model_sd = roundtrip(model.state_dict())  # the anchor (I5)
    if extrap:
        opt.train()
    opt_sd = roundtrip(opt.state_dict())
    if extrap:
        assert "extrap" in opt_sd and "generators" in opt_sd["extrap"]
        if spec.noise:
            assert opt_sd["extrap"]["generators"], "noise generator state must be checkpointed"

    model2 = MLP(seed=99)
    model2.load_state_dict(model_sd)
    # another seed: the generator state must come from the checkpoint
    opt2 = build(spec, model2.parameters(), **({"seed": 12345} if extrap else {}))
    opt2.load_state_dict(opt_sd)
    pairs = list(zip(model.parameters(), model2.parameters()))
    for p, q in pairs:
        assert torch.equal(p, q)
        assert torch.equal(anchor_of(opt, p), anchor_of(opt2, q))
    for step in range(10):
        take_step(opt, spec, lambda: mse(model))
        take_step(opt2, spec, lambda: mse(model2))
        for p, q in pairs:
            assert torch.equal(p, q), step
            assert torch.equal(anchor_of(opt, p), anchor_of(opt2, q)), step
    if spec.noise:  # the noise really differs from step to step (so the test is not vacuous)
        assert not torch.equal(model.w1.detach(), anchor_of(opt, model.w1))


@pytest.mark.parametrize("spec,err", list(_error_cases()))
def test_error_inputs(spec, err):
    kwargs = {**spec.kwargs, **err.kwargs}
    with pytest.raises(err.error, match=err.match):
        create_optimizer(spec.name, MLP().parameters(), **kwargs)


@pytest.mark.parametrize("extrapolation", ["gaussian", "uniform"])
def test_noise_without_noise_scale_direct_class(extrapolation):
    with pytest.raises(ValueError, match=r"needs noise_scale > 0"):
        ExtrapSGD(MLP().parameters(), lr=0.1, extrapolation=extrapolation)
    # a param group may choose a noise variant too, and is validated the same way
    model = MLP()
    with pytest.raises(ValueError, match=r"needs noise_scale > 0"):
        ExtrapSGD([{"params": [model.w1], "extrapolation": extrapolation},
                   {"params": [model.w2]}], lr=0.1)


@pytest.mark.parametrize("spec", EXTRAP_SPECS, ids=_ids(EXTRAP_SPECS))
def test_step_in_eval_mode_raises(spec):
    model = MLP()
    opt = build(spec, model.parameters())
    take_step(opt, spec, lambda: mse(model))
    opt.eval()
    assert not opt.training
    with pytest.raises(RuntimeError, match=r"eval mode.*optimizer\.train\(\)"):
        take_step(opt, spec, lambda: mse(model))
    opt.train()
    take_step(opt, spec, lambda: mse(model))


def test_fresh_without_closure_says_closure():
    model = MLP()
    opt = build(SPEC_BY_NAME["extrap_sgd_fresh"], model.parameters())
    mse(model).backward()
    with pytest.raises(RuntimeError, match=r"step\(closure\)"):
        opt.step()


# ---------------------------------------------------------------------------------------------
# I1: γ̃ = 0 is exactly torch.optim.SGD / AdamW.
# ---------------------------------------------------------------------------------------------
def _two_groups(model, **extra):
    return [
        {"params": [model.w1, model.b1], "lr": 0.1, "weight_decay": 1e-3, **extra},
        {"params": [model.w2, model.b2], "lr": 0.03, "weight_decay": 5e-2, **extra},
    ]


def _assert_lockstep_with_torch(ours_model, ours, torch_model, theirs, steps=60):
    for _ in range(steps):
        for model, opt in ((ours_model, ours), (torch_model, theirs)):
            opt.zero_grad()
            mse(model).backward()
            opt.step()
        for p, q in zip(ours_model.parameters(), torch_model.parameters()):
            assert torch.equal(p, ours.anchor(p))  # x̃ = x when γ̃ = 0, already in train mode
            assert torch.equal(p, q)
    ours.eval()
    for p, q in zip(ours_model.parameters(), torch_model.parameters()):
        assert torch.equal(p, q)
    assert not torch.equal(torch_model.w1.detach(), MLP().w1.detach())


_FOREACH_PAIRS = [(True, True), (False, False), (True, False), (False, True)]
_I1_CASES = [
    pytest.param(zero, fo, ft, id=f"{name}-ours{fo}-torch{ft}")
    for name, zero in (("scale0", {"extrap_scale": 0.0}), ("lr0", {"extrap_lr": 0.0}))
    for fo, ft in _FOREACH_PAIRS
]


@pytest.mark.parametrize("zero,foreach_ours,foreach_torch", _I1_CASES)
@pytest.mark.parametrize("nesterov", [True, False])
def test_I1_sgd_bitwise(zero, nesterov, foreach_ours, foreach_torch):
    m1, m2 = MLP(), MLP()
    ours = ExtrapSGD(_two_groups(m1), lr=0.5, momentum=0.9, nesterov=nesterov,
                     foreach=foreach_ours, **zero)
    theirs = torch.optim.SGD(_two_groups(m2), lr=0.5, momentum=0.9, nesterov=nesterov,
                             foreach=foreach_torch)
    _assert_lockstep_with_torch(m1, ours, m2, theirs)


@pytest.mark.parametrize("zero,foreach_ours,foreach_torch", _I1_CASES)
def test_I1_adam_bitwise(zero, foreach_ours, foreach_torch):
    m1, m2 = MLP(), MLP()
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    ours = ExtrapAdam(_two_groups(m1), foreach=foreach_ours, **kw, **zero)
    theirs = torch.optim.AdamW(_two_groups(m2), foreach=foreach_torch, **kw)
    _assert_lockstep_with_torch(m1, ours, m2, theirs)


# ---------------------------------------------------------------------------------------------
# I2: K = 1, m = m̃ = 0, λ = 0 is extragradient from the past.
# ---------------------------------------------------------------------------------------------
def _spd(n, seed):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=g, dtype=torch.float64)
    return M @ M.T / n + torch.eye(n, dtype=torch.float64)


def test_I2_extragradient_from_the_past():
    A = _spd(5, 0)
    x0 = torch.randn(5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    lr, extrap_lr, steps = 0.1, 0.25, 30
    hand = reference_extragradient_past_k1(x0, lambda x: A @ x, lr, extrap_lr, steps)

    x = nn.Parameter(x0.clone())
    opt = ExtrapSGD([x], lr=lr, momentum=0.0, weight_decay=0.0, extrap_lr=extrap_lr)
    y = nn.Parameter(x0.clone())
    sgd = torch.optim.SGD([y], lr=lr)
    for t in range(steps):
        x.grad = A @ x.detach()
        opt.step()
        torch.testing.assert_close(opt.anchor(x), hand[t], rtol=0, atol=1e-12)
        y.grad = A @ y.detach()
        sgd.step()
    assert (opt.anchor(x) - y.detach()).abs().max() > 1e-6  # extrapolation made a difference


# ---------------------------------------------------------------------------------------------
# foreach vs per-tensor loop vs the reference oracle (float64, schedules, K > 1).
# ---------------------------------------------------------------------------------------------
_SHAPES = [(4, 3), (5,)]


def _quadratic_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    dt = torch.float64
    A = [_spd(s[0], seed + 10 + i) for i, s in enumerate(_SHAPES)]
    b = [torch.randn(s, generator=g, dtype=dt) for s in _SHAPES]
    x0 = [torch.randn(s, generator=g, dtype=dt) for s in _SHAPES]
    return A, b, x0


def _quad_grads(A, b, xs):
    return [A[i] @ x - b[i] for i, x in enumerate(xs)]


def _run_against_reference(make_ours, ref, A, b, x0, steps=25):
    """Drive foreach and loop versions of our optimizer and the reference side by side.

    Before each step the parameters must equal worker 0's x̃ of the reference, after it the
    anchors the reference's anchors. At t = 10 the lr changes, at t = 17 extrap_scale.
    (rtol: maximize climbs the quadratic, to values of order 1e3.)"""
    runs = []
    for foreach in (True, False):
        params = [nn.Parameter(x.clone()) for x in x0]
        runs.append((params, make_ours(params, foreach)))
    clipped = False
    for t in range(steps):
        if t == 10:
            ref.lr = 0.02
            for _, opt in runs:
                for group in opt.param_groups:
                    group["lr"] = 0.02
        if t == 17:
            ref.extrap_scale = 2.5
            for _, opt in runs:
                for group in opt.param_groups:
                    group["extrap_scale"] = 2.5
        pts = [x.clone() for x in ref.points(0)]
        g_ref = _quad_grads(A, b, pts)
        max_norm = getattr(ref, "extrap_max_norm", None)
        if max_norm is not None:
            clipped |= float(torch.sqrt(sum((g * g).sum() for g in g_ref))) > max_norm
        ref.step([g_ref] * ref.K)  # one process: every worker's local gradient is .grad
        for params, opt in runs:
            for p, x_ref in zip(params, pts):
                torch.testing.assert_close(p.detach(), x_ref, rtol=1e-14, atol=1e-12)
            for p, g in zip(params, _quad_grads(A, b, [p.detach() for p in params])):
                p.grad = g
            opt.step()
            for p, a_ref in zip(params, ref.anchor):
                torch.testing.assert_close(opt.anchor(p), a_ref, rtol=1e-14, atol=1e-12)
    (pf, of), (pl, ol) = runs
    for p, q in zip(pf, pl):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-14, atol=1e-12)
        torch.testing.assert_close(of.anchor(p), ol.anchor(q), rtol=1e-14, atol=1e-12)
    # the displacement is really there (the comparison above is not trivially x̃ = x)
    assert max((p.detach() - of.anchor(p)).abs().max().item() for p in pf) > 1e-6
    if ref.extrap_max_norm is not None:
        assert clipped, "extrap_max_norm never clipped: choose a smaller threshold"


_SGD_CONFIGS = {
    "nesterov-wd-mt": dict(momentum=0.9, nesterov=True, weight_decay=1e-2, extrap_momentum=0.5),
    "heavyball-wd-mt-K4": dict(momentum=0.9, nesterov=False, weight_decay=1e-2,
                               extrap_momentum=0.3, world_size=4),
    "nesterov-clip-K4": dict(momentum=0.9, nesterov=True, extrap_max_norm=0.5, world_size=4),
    "heavyball-clip-wd": dict(momentum=0.8, nesterov=False, weight_decay=1e-2,
                              extrap_max_norm=0.5),
    "nomomentum-mt": dict(momentum=0.0, weight_decay=1e-2, extrap_momentum=0.6, world_size=4),
    "nesterov-mt0": dict(momentum=0.9, nesterov=True, extrap_momentum=0.0),
    # torch's options act on the local direction as on the base update
    "maximize-nesterov-wd-mt": dict(momentum=0.9, nesterov=True, weight_decay=1e-2,
                                    extrap_momentum=0.5, maximize=True),
    "dampening-heavyball-wd-K4": dict(momentum=0.9, dampening=0.3, weight_decay=1e-2,
                                      world_size=4),
    "dampening-mt-clip-maximize": dict(momentum=0.8, dampening=0.5, extrap_momentum=0.6,
                                       extrap_max_norm=0.5, maximize=True),
}


@pytest.mark.parametrize("config", list(_SGD_CONFIGS), ids=list(_SGD_CONFIGS))
def test_sgd_foreach_loop_reference(config):
    kw = _SGD_CONFIGS[config]
    A, b, x0 = _quadratic_problem()
    ref = ReferenceExtrapSGD(x0, lr=0.05, **{"world_size": 1, **kw})
    _run_against_reference(lambda ps, fe: ExtrapSGD(ps, lr=0.05, foreach=fe, **kw), ref, A, b, x0)


_ADAM_CONFIGS = {
    "K1": dict(weight_decay=1e-2),
    "K3": dict(weight_decay=1e-2, world_size=3),
    "K1-clip": dict(weight_decay=0.0, extrap_max_norm=0.5),
    "K3-clip-wd": dict(weight_decay=1e-2, extrap_max_norm=0.5, world_size=3),
    "amsgrad-K3": dict(weight_decay=1e-2, amsgrad=True, world_size=3),
    "maximize-clip": dict(weight_decay=1e-2, maximize=True, extrap_max_norm=0.5),
    "amsgrad-maximize-K1": dict(weight_decay=0.0, amsgrad=True, maximize=True),
}


@pytest.mark.parametrize("config", list(_ADAM_CONFIGS), ids=list(_ADAM_CONFIGS))
def test_adam_foreach_loop_reference(config):
    kw = _ADAM_CONFIGS[config]
    A, b, x0 = _quadratic_problem(seed=2)
    common = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-8)
    ref = ReferenceExtrapAdam(x0, **common, **{"world_size": 1, **kw})
    _run_against_reference(lambda ps, fe: ExtrapAdam(ps, foreach=fe, **common, **kw),
                           ref, A, b, x0)


# ---------------------------------------------------------------------------------------------
# 'past' does not extrapolate at t = 0; step 1 places x̃₁ = x₁ − γ̃·d₁.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("foreach", [True, False])
def test_first_step_unextrapolated(nesterov, foreach):
    g = torch.Generator().manual_seed(7)
    dt = torch.float64
    x0 = [torch.randn(s, generator=g, dtype=dt) for s in _SHAPES]
    g0 = [torch.randn(s, generator=g, dtype=dt) for s in _SHAPES]
    lr, m, lam, mt, K = 0.1, 0.9, 1e-2, 0.5, 2
    params = [nn.Parameter(x.clone()) for x in x0]
    opt = ExtrapSGD(params, lr=lr, momentum=m, weight_decay=lam, nesterov=nesterov,
                    extrap_momentum=mt, world_size=K, foreach=foreach)
    for p, x in zip(params, x0):
        assert torch.equal(p.detach(), x)
        assert "anchor" not in opt.state.get(p, {})
        assert torch.equal(opt.anchor(p), x)
    for p, gr in zip(params, g0):
        p.grad = gr.clone()
    opt.step()
    gamma = lr / K
    for p, x, gr in zip(params, x0, g0):
        h = gr + lam * x
        x1 = x - lr * (h + m * h) if nesterov else x - lr * h
        torch.testing.assert_close(opt.anchor(p), x1, rtol=0, atol=1e-14)
        h_hat = gr + lam * x1
        d1 = h_hat + mt * h_hat if nesterov else h_hat
        torch.testing.assert_close(p.detach() - opt.anchor(p), -gamma * d1, rtol=0, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# Noise variants.
# ---------------------------------------------------------------------------------------------
def _big(seed=0):
    return torch.randn(400, 500, generator=torch.Generator().manual_seed(seed))


def _displacement(opt, p):
    return p.detach().double() - opt.anchor(p).double()


def _zero_grad_step(opt, *params):
    """One step with zero gradients: the anchor stays, noise is placed for the next iteration."""
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()


def test_gaussian_noise_statistics():
    W = nn.Parameter(_big())
    sigma = 0.01
    opt = ExtrapSGD([W], lr=0.1, extrapolation="gaussian", noise_scale=sigma)
    _zero_grad_step(opt, W)
    xi = _displacement(opt, W)
    n = xi.numel()
    assert abs(xi.mean().item()) < 5 * sigma / math.sqrt(n)
    assert xi.std().item() == pytest.approx(sigma, rel=0.02)


def test_uniform_noise_statistics():
    W = nn.Parameter(_big())
    a = 0.01
    opt = ExtrapSGD([W], lr=0.1, extrapolation="uniform", noise_scale=a)
    _zero_grad_step(opt, W)
    xi = _displacement(opt, W)
    n = xi.numel()
    # x̃ is rounded to float32 once: allow one ulp of |x| (≤ ~5) on top of a
    assert xi.abs().max().item() <= a + 1e-6
    assert xi.abs().max().item() > 0.99 * a
    assert abs(xi.mean().item()) < 5 * a / math.sqrt(3 * n)
    assert xi.std().item() == pytest.approx(a / math.sqrt(3), rel=0.02)


@pytest.mark.parametrize("extrapolation", ["uniform", "gaussian"])
def test_filterwise_noise_is_per_filter(extrapolation):
    g = torch.Generator().manual_seed(0)
    row_scales = torch.logspace(-2, 2, 400).unsqueeze(1)  # filter norms over four decades
    W = nn.Parameter(torch.randn(400, 500, generator=g) * row_scales)
    conv = nn.Parameter(torch.randn(64, 4, 5, 5, generator=g) * torch.logspace(-1, 1, 64).view(
        64, 1, 1, 1))
    bias = nn.Parameter(torch.randn(400, generator=g))
    s = 0.05
    opt = ExtrapSGD([W, conv, bias], lr=0.1, extrapolation=extrapolation, noise_scale=s,
                    filterwise=True)
    unit_std = 1 / math.sqrt(3) if extrapolation == "uniform" else 1.0

    def check():
        for p in (W, conv):
            xi = _displacement(opt, p).reshape(p.shape[0], -1)
            x = opt.anchor(p).double().reshape(p.shape[0], -1)
            n = x.shape[1]
            expected = s * x.norm(dim=1) / math.sqrt(n) * unit_std
            ratio = xi.std(dim=1) / expected
            assert ratio.mean().item() == pytest.approx(1.0, rel=0.03)
            tol = 0.15 if n >= 500 else 0.35
            assert (ratio - 1).abs().max().item() < tol
            if extrapolation == "uniform":
                bound = s * x.norm(dim=1) / math.sqrt(n)
                assert (xi.abs().amax(dim=1) <= bound * (1 + 1e-4) + 1e-6).all()
        assert torch.equal(bias.detach(), opt.anchor(bias))  # 1-D tensors are not perturbed

    for p in (W, conv, bias):  # t = 0 runs at x₀ (d₀ = 0), as for `past`
        assert torch.equal(p.detach(), opt.anchor(p))
    _zero_grad_step(opt, W, conv, bias)
    check()
    _zero_grad_step(opt, W, conv, bias)
    check()


def test_noise_after_each_step_new_draw_each_step_seeded_and_off_the_global_rng():
    def make(seed):
        W = nn.Parameter(_big())
        return W, ExtrapSGD([W], lr=0.1, extrapolation="gaussian", noise_scale=0.01, seed=seed)

    rng = torch.random.get_rng_state()
    W, opt = make(seed=0)
    assert torch.equal(W.detach(), _big())  # t = 0 runs at x₀: nothing placed before a step
    draws = []
    for _ in range(3):
        _zero_grad_step(opt, W)
        draws.append(_displacement(opt, W))
    assert draws[0].abs().max() > 0
    assert torch.equal(torch.random.get_rng_state(), rng), "the global RNG was consumed"
    assert torch.equal(opt.anchor(W), _big())  # zero gradient: the anchor stays
    for i in range(len(draws)):
        for j in range(i):
            assert not torch.allclose(draws[i], draws[j]), "noise must be redrawn every step"
    # same seed: the same noise, step by step; another seed: other noise
    W2, opt2 = make(seed=0)
    W3, opt3 = make(seed=1)
    _zero_grad_step(opt2, W2)
    _zero_grad_step(opt3, W3)
    assert torch.equal(_displacement(opt2, W2), draws[0])
    assert not torch.allclose(_displacement(opt3, W3), draws[0])
    _zero_grad_step(opt2, W2)
    assert torch.equal(_displacement(opt2, W2), draws[1])


# ---------------------------------------------------------------------------------------------
# 'stochastic' with one worker, 'fresh'.
# ---------------------------------------------------------------------------------------------
def test_stochastic_k1_is_plain_sgd_and_warns_once():
    model = MLP()
    opt = ExtrapSGD(model.parameters(), lr=0.05, momentum=0.9, extrapolation="stochastic")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            opt.zero_grad()
            mse(model).backward()
            opt.step()
            for p in model.parameters():
                assert torch.equal(p.detach(), opt.anchor(p))
    k1 = [w for w in caught if issubclass(w.category, UserWarning) and "K = 1" in str(w.message)]
    assert len(k1) == 1, [str(w.message) for w in caught]


def test_fresh_calls_closure_at_anchor_then_at_extragradient_point():
    A = _spd(5, 3)
    x0 = torch.randn(5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    lr = 0.1
    x = nn.Parameter(x0.clone())
    opt = ExtrapSGD([x], lr=lr, extrapolation="fresh", world_size=2)
    gamma = lr / 2
    seen = []

    def closure():
        opt.zero_grad()
        seen.append(x.detach().clone())
        loss = 0.5 * x @ (A @ x)
        loss.backward()
        return loss

    anchor = x0.clone()
    for _ in range(3):
        seen.clear()
        opt.step(closure)
        assert len(seen) == 2
        assert torch.equal(seen[0], anchor)  # first call at the anchor
        x_tilde = anchor - gamma * (A @ anchor)
        torch.testing.assert_close(seen[1], x_tilde, rtol=0, atol=1e-14)
        anchor = anchor - lr * (A @ x_tilde)  # the base update uses ∇f(x̃)
        torch.testing.assert_close(opt.anchor(x), anchor, rtol=0, atol=1e-14)
        assert torch.equal(x.detach(), opt.anchor(x))  # after the step, params hold the anchor
        anchor = opt.anchor(x).clone()


# ---------------------------------------------------------------------------------------------
# extrap_max_norm.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("clips", [True, False])
def test_extrap_max_norm(foreach, clips):
    gen = torch.Generator().manual_seed(11)
    dt = torch.float64
    x0 = [torch.randn(s, generator=gen, dtype=dt) for s in _SHAPES]
    grads = [1e6 * torch.randn(s, generator=gen, dtype=dt) for s in _SHAPES]
    total = math.sqrt(sum(float((g * g).sum()) for g in grads))
    max_norm = 2.0 if clips else 10 * total
    lr, extrap_lr = 1e-7, 1e-3
    params = [nn.Parameter(x.clone()) for x in x0]
    opt = ExtrapSGD(params, lr=lr, extrap_lr=extrap_lr, extrap_max_norm=max_norm,
                    foreach=foreach)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    coef = max_norm / (total + 1e-6) if clips else 1.0
    for p, x, g in zip(params, x0, grads):
        torch.testing.assert_close(opt.anchor(p), x - lr * g, rtol=1e-12, atol=1e-12)  # unclipped
        torch.testing.assert_close(p.detach() - opt.anchor(p), -extrap_lr * coef * g,
                                   rtol=1e-10, atol=1e-12)
    if clips:
        norm = math.sqrt(sum(float(((p.detach() - opt.anchor(p)) ** 2).sum()) for p in params))
        assert norm == pytest.approx(extrap_lr * max_norm, rel=1e-8)


# ---------------------------------------------------------------------------------------------
# train / eval modes, their checkpointing, and a change of K.
# ---------------------------------------------------------------------------------------------
_MODE_SPECS = [SPEC_BY_NAME[n] for n in ("extrap_sgd", "extrap_sgd_gaussian", "extrap_adam")]


@pytest.mark.parametrize("spec", _MODE_SPECS, ids=_ids(_MODE_SPECS))
def test_eval_train_roundtrip_and_mode_in_state_dict(spec):
    model = MLP()
    opt = build(spec, model.parameters())
    for _ in range(4):
        take_step(opt, spec, lambda: mse(model))
    params = list(model.parameters())
    x_tilde = [p.detach().clone() for p in params]
    anchors = [opt.anchor(p).clone() for p in params]
    assert any(not torch.equal(a, b) for a, b in zip(x_tilde, anchors))

    opt.eval()
    assert not opt.training
    for p, xt, a in zip(params, x_tilde, anchors):
        assert torch.equal(p.detach(), a)
        assert torch.equal(opt.anchor(p), a)
        assert torch.equal(opt.extrapolated(p), xt)
    opt.eval()  # idempotent
    assert all(torch.equal(p.detach(), a) for p, a in zip(params, anchors))

    sd = roundtrip(opt.state_dict())
    model2 = MLP(seed=5)  # whatever weights; the optimizer state holds both points
    opt2 = build(spec, model2.parameters())
    opt2.load_state_dict(sd)
    assert not opt2.training
    for q, a in zip(model2.parameters(), anchors):
        assert torch.equal(q.detach(), a)
    with pytest.raises(RuntimeError, match=r"optimizer\.train\(\)"):
        take_step(opt2, spec, lambda: mse(model2))
    opt2.train()
    for q, xt, a in zip(model2.parameters(), x_tilde, anchors):
        assert torch.equal(q.detach(), xt)
        assert torch.equal(opt2.anchor(q), a)

    opt.train()
    assert opt.training
    for p, xt, a in zip(params, x_tilde, anchors):
        assert torch.equal(p.detach(), xt)
        assert torch.equal(opt.anchor(p), a)


@pytest.mark.parametrize(
    "spec",
    [
        s for s in _MODE_SPECS
    ],
    ids=_ids(_MODE_SPECS),
)
def test_world_size_change_needs_reset_local_state(spec):
    model = MLP()
    opt = build(spec, model.parameters(), world_size=2)
    for _ in range(3):
        take_step(opt, spec, lambda: mse(model))
    assert opt.world_size == 2
    sd = roundtrip(opt.state_dict())
    assert sd["extrap"]["world_size"] == 2

    model2 = MLP()
    opt2 = build(spec, model2.parameters(), world_size=3)
    opt2.load_state_dict(sd)
    before = [p.detach().clone() for p in model2.parameters()]
    with pytest.raises(RuntimeError, match=r"world_size=2.*world_size=3.*reset_local_state"):
        take_step(opt2, spec, lambda: mse(model2))
    for p, b in zip(model2.parameters(), before):  # the failed step changed nothing
        assert torch.equal(p.detach(), b)

    with pytest.warns(UserWarning, match=r"resetting the local extrapolation state"):
        opt2.reset_local_state()
    for p in model2.parameters():
        assert torch.equal(p.detach(), opt2.anchor(p))
    anchors = [opt2.anchor(p).clone() for p in model2.parameters()]
    take_step(opt2, spec, lambda: mse(model2))
    assert opt2.world_size == 3
    assert any(not torch.equal(opt2.anchor(p), a) for p, a in zip(model2.parameters(), anchors))
    assert all(torch.isfinite(p).all() for p in model2.parameters())


def test_same_world_size_resumes_without_reset():
    model = MLP()
    spec = SPEC_BY_NAME["extrap_sgd"]
    opt = build(spec, model.parameters(), world_size=2)
    take_step(opt, spec, lambda: mse(model))
    model2 = MLP()
    opt2 = build(spec, model2.parameters(), world_size=2)
    opt2.load_state_dict(roundtrip(opt.state_dict()))
    before = model2.w1.detach().clone()
    take_step(opt2, spec, lambda: mse(model2))  # no error
    assert opt2.world_size == 2
    assert not torch.equal(model2.w1.detach(), before)


def test_package_exports():
    assert extrap_accel.ExtrapSGD is ExtrapSGD and extrap_accel.ExtrapAdam is ExtrapAdam
    assert re.fullmatch(r"\d+\.\d+\.\d+", extrap_accel.__version__)


@pytest.mark.parametrize("foreach", [True, False])
def test_adam_local_moments_restart_with_their_own_bias_correction(foreach):
    """After reset_local_state the local moments are young again: with a tiny ε and λ = 0 the
    first local Adam direction is sign(g) per coordinate, so |x̃ − x| = γ̃ exactly; bias-
    correcting them with the global step count would shrink it to about 0.52·γ̃ at t = 6."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(50, dtype=torch.float64))
    opt = extrap_accel.ExtrapAdam(
        [p], lr=1e-2, eps=1e-30, weight_decay=0.0, extrap_lr=1e-3, foreach=foreach
    )
    for _ in range(5):
        p.grad = torch.randn(50, dtype=torch.float64)
        opt.step()
    with pytest.warns(UserWarning, match="resetting the local extrapolation state"):
        opt.reset_local_state()
    p.grad = torch.randn(50, dtype=torch.float64)
    opt.step()
    assert float(opt.state[p]["step"]) == 6 and float(opt.state[p]["extrap_step"]) == 1
    torch.testing.assert_close((p.detach() - opt.anchor(p)).abs(),
                               torch.full_like(p, 1e-3), rtol=1e-9, atol=0)
