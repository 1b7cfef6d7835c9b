"""ExtrapSGD and ExtrapAdam against torch's own optimizer test inputs (issue #13).

``torch.testing._internal.common_optimizers`` (shipped in the torch wheel; it needs
``expecttest``) describes torch.optim.SGD and AdamW once: the configurations its generic tests
run (``optim_inputs_func_*``), the implementation flags (``supported_impls``) and the inputs
that must fail, with the expected error (``optim_error_inputs_func_*``, which include
``get_error_inputs_for_all_optims``). Here every configuration, on real and complex parameters,
either steps bit for bit like torch at ``extrap_scale=0`` or is refused with a ValueError that
names the argument, and every error input raises torch's error type with torch's message.
"""

from __future__ import annotations

import copy
import inspect
import re
import warnings

import pytest
import torch
from torch import nn
from torch.testing._internal import common_optimizers as torch_optim_db

import extrap_accel
from extrap_accel import ExtrapAdam, ExtrapSGD

# Importing torch's test helpers freezes torch.backends flags for the whole process
# (common_utils calls torch.backends.disable_global_flags()); other tests may set them.
torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True

OURS = {torch.optim.SGD: ExtrapSGD, torch.optim.AdamW: ExtrapAdam}
INFOS = [info for info in torch_optim_db.optim_db if info.optim_cls in OURS]
DTYPES = [torch.float32, torch.complex64]  # torch's optim_db: SGD and AdamW support complex
STEPS = 5


def _name(info) -> str:
    return info.optim_cls.__name__


def _config_cases():
    for info in INFOS:
        for i, oi in enumerate(info.optim_inputs_func(device="cpu")):
            for dtype in DTYPES:
                for foreach in (False, True):
                    yield pytest.param(
                        info, i, dtype, foreach,
                        id=f"{_name(info)}-{oi.desc}-{str(dtype)[6:]}-foreach{foreach}",
                    )  # fmt: skip


def _error_cases():
    for info in INFOS:
        for i, ei in enumerate(info.optim_error_inputs_func(device="cpu", dtype=torch.float32)):
            yield pytest.param(info, i, id=f"{_name(info)}-{ei.optimizer_error_input.desc}")


def _params(dtype: torch.dtype) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    real = dtype.to_real() if dtype.is_complex else dtype
    shapes = [(3, 4), (4,), (2, 2, 3)]
    out = []
    for s in shapes:
        t = torch.randn(s, generator=g, dtype=real)
        if dtype.is_complex:
            t = torch.complex(t, torch.randn(s, generator=g, dtype=real))
        out.append(nn.Parameter(t))
    return out


def _set_grads(params: list[torch.Tensor]) -> None:
    """A gradient that depends on where the parameters are (so trajectories can drift)."""
    for i, p in enumerate(params):
        p.grad = torch.sin(p.detach()) * (1.0 + 0.5 * i) + 0.1 * (i + 1)


def _clone(params):
    return [nn.Parameter(p.detach().clone()) for p in params]


def _step_both(theirs, ours, torch_params, our_params, steps=STEPS):
    for step in range(steps):
        for opt, params in ((theirs, torch_params), (ours, our_params)):
            _set_grads(params)
            opt.step()
        for p, q in zip(torch_params, our_params):
            assert torch.equal(p, q), f"step {step}: {(p - q).abs().max().item()}"
            assert torch.equal(q, ours.anchor(q))  # extrap_scale = 0: x̃ = x
    assert not torch.equal(torch_params[0], _params(torch_params[0].dtype)[0])  # it moved


# ---------------------------------------------------------------------------------------------
# The signature: torch's arguments, in torch's order, with torch's defaults.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("info", INFOS, ids=_name)
def test_signature_is_torchs_then_keyword_only_extrapolation(info):
    theirs = list(inspect.signature(info.optim_cls.__init__).parameters.values())
    ours = inspect.signature(OURS[info.optim_cls].__init__).parameters
    positional = [p.name for p in theirs if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert [p.name for p in ours.values() if p.kind is p.POSITIONAL_OR_KEYWORD] == positional
    for p in theirs:
        assert p.name in ours, p.name
        assert ours[p.name].kind is p.kind, p.name
        assert ours[p.name].default == p.default, p.name
    torch_names = {p.name for p in theirs}
    extra = [p for p in ours.values() if p.name not in torch_names]
    assert extra and all(p.kind is p.KEYWORD_ONLY for p in extra)


def test_positional_order_and_defaults_reach_the_groups():
    p = [nn.Parameter(torch.zeros(2))]
    group = ExtrapSGD(p, 0.1, 0.9, 0.5, 1e-4, False).param_groups[0]
    assert (group["lr"], group["momentum"], group["dampening"], group["weight_decay"]) == (
        0.1, 0.9, 0.5, 1e-4)  # fmt: skip
    assert ExtrapSGD(p).param_groups[0]["lr"] == torch.optim.SGD(p).param_groups[0]["lr"]
    group = ExtrapAdam(p, 0.01, (0.8, 0.9), 1e-6, 0.5, True).param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (
        0.01, (0.8, 0.9), 1e-6, 0.5)  # fmt: skip
    assert group["amsgrad"] is True
    theirs, ours = torch.optim.AdamW(p).param_groups[0], ExtrapAdam(p).param_groups[0]
    for key in ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"):
        assert ours[key] == theirs[key], key


# ---------------------------------------------------------------------------------------------
# torch's configurations: bit for bit at extrap_scale = 0 (real and complex parameters).
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("info,index,dtype,foreach", list(_config_cases()))
def test_torch_config_is_bitwise_torch_at_extrap_scale_0(info, index, dtype, foreach):
    kwargs = {**info.optim_inputs_func(device="cpu")[index].kwargs, "foreach": foreach}
    torch_params = _params(dtype)
    our_params = _clone(torch_params)
    try:
        theirs = info.optim_cls(torch_params, **kwargs)
    except (ValueError, RuntimeError) as e:  # torch refuses this combination: so must we
        with pytest.raises(type(e), match=re.escape(str(e))):
            OURS[info.optim_cls](our_params, extrap_scale=0.0, **kwargs)
        return
    ours = OURS[info.optim_cls](our_params, extrap_scale=0.0, **kwargs)
    _step_both(theirs, ours, torch_params, our_params)


@pytest.mark.parametrize("info", INFOS, ids=_name)
def test_implementation_flags_torch_supports_are_refused_by_name(info):
    """``supported_impls`` (foreach, differentiable, fused) and capturable: foreach is
    implemented (tested above); the others are refused with a ValueError naming them."""
    flags = [f for f in info.supported_impls if f != "foreach"]
    if info.has_capturable_arg:
        flags.append("capturable")
    assert "fused" in flags and "differentiable" in flags
    cls = OURS[info.optim_cls]
    for flag in flags:
        with pytest.raises(ValueError, match=rf"{flag}=True is not supported by {cls.__name__}"):
            cls(_params(torch.float32), **{flag: True})
        cls(_params(torch.float32), **{flag: False})  # the default value is accepted


# ---------------------------------------------------------------------------------------------
# torch's error inputs: the same error type, the same message.
# ---------------------------------------------------------------------------------------------
def _raises(error_type, regex):
    if issubclass(error_type, Warning):
        return pytest.warns(error_type, match=regex)
    return pytest.raises(error_type, match=regex)


def _attempt(cls, error_input, construction: bool, **extra):
    oi = error_input.optimizer_error_input
    params = oi.params if oi.params is not None else [nn.Parameter(torch.randn(1, 1))]
    if construction:
        cls(params, **oi.kwargs, **extra)
        return
    opt = cls(params, **oi.kwargs, **extra)
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.randn_like(p)
    opt.step()


@pytest.mark.parametrize("info,index", list(_error_cases()))
def test_torch_error_input_gives_torchs_error(info, index):
    def error_input():  # fresh parameters for each optimizer
        return info.optim_error_inputs_func(device="cpu", dtype=torch.float32)[index]

    ei = error_input()
    construction = ei.error_on == torch_optim_db.OptimizerErrorEnum.CONSTRUCTION_ERROR
    with _raises(ei.error_type, ei.error_regex):  # torch itself (the input is what it says)
        _attempt(info.optim_cls, error_input(), construction)
    with _raises(ei.error_type, ei.error_regex):
        _attempt(OURS[info.optim_cls], error_input(), construction)


# ---------------------------------------------------------------------------------------------
# Param groups: torch's keys work (or are refused) through add_param_group as in the constructor.
# ---------------------------------------------------------------------------------------------
_GROUP_KEYS = {
    torch.optim.SGD: [
        {"maximize": True},
        {"lr": torch.tensor(0.02)},
        {"momentum": 0.9, "dampening": 0.5},
        {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1, "maximize": True},
    ],
    torch.optim.AdamW: [
        {"maximize": True},
        {"lr": torch.tensor(0.02)},
        {"amsgrad": True, "weight_decay": 0.1},
        {"amsgrad": True, "maximize": True},
    ],
}


def _group_cases():
    for info in INFOS:
        for keys in _GROUP_KEYS[info.optim_cls]:
            yield pytest.param(info.optim_cls, keys, id=f"{_name(info)}-{'-'.join(keys)}")


@pytest.mark.parametrize("torch_cls,keys", list(_group_cases()))
def test_group_keys_through_add_param_group_act_as_in_torch(torch_cls, keys):
    """A second group added later with torch's keys steps exactly as torch's group does (a
    group with maximize=True maximizes; a tensor lr is taken as in the constructor)."""
    torch_params = _params(torch.float32)
    our_params = _clone(torch_params)
    theirs = torch_cls(torch_params[:1], lr=0.01)
    ours = OURS[torch_cls](our_params[:1], lr=0.01, extrap_scale=0.0)
    theirs.add_param_group({"params": torch_params[1:], **keys})
    ours.add_param_group({"params": our_params[1:], **keys})
    for key, value in keys.items():
        assert ours.param_groups[1][key] is value or ours.param_groups[1][key] == value
    _step_both(theirs, ours, torch_params, our_params)
    # and the same group given to the constructor
    our_params2 = _clone(_params(torch.float32))
    ours2 = OURS[torch_cls](
        [{"params": our_params2[:1]}, {"params": our_params2[1:], **keys}], lr=0.01,
        extrap_scale=0.0,
    )  # fmt: skip
    for _ in range(STEPS):
        _set_grads(our_params2)
        ours2.step()
    for p, q in zip(our_params, our_params2):
        assert torch.equal(p, q)


_REFUSED_GROUP_KEYS = [
    (ExtrapSGD, {"fused": True}, r"fused=True is not supported by ExtrapSGD"),
    (ExtrapSGD, {"differentiable": True}, r"differentiable=True is not supported"),
    (ExtrapSGD, {"extrap_scael": 2.0}, r"unknown param-group key 'extrap_scael'"),
    (ExtrapSGD, {"amsgrad": True}, r"unknown param-group key 'amsgrad': ExtrapSGD does not"),
    (ExtrapSGD, {"seed": 3}, r"seed is an argument of the whole optimizer"),
    (ExtrapSGD, {"lr": torch.tensor([0.1, 0.1])}, r"Tensor lr must be 1-element"),
    (ExtrapSGD, {"lr": -1.0}, r"Invalid learning rate"),
    (ExtrapSGD, {"momentum": 0.9, "dampening": 0.1, "nesterov": True}, r"zero dampening"),
    (ExtrapAdam, {"capturable": True}, r"capturable=True is not supported by ExtrapAdam"),
    (ExtrapAdam, {"fused": True}, r"fused=True is not supported by ExtrapAdam"),
    (ExtrapAdam, {"extrap_momentum": 0.5}, r"unknown param-group key 'extrap_momentum'"),
    (ExtrapAdam, {"noise_scale": 0.1}, r"unknown param-group key 'noise_scale'"),
    (ExtrapSGD, {"compile_direction": True}, r"compile_direction is an argument of the whole"),
    (ExtrapAdam, {"compile_direction": True}, r"key 'compile_direction': ExtrapAdam does not"),
    (ExtrapAdam, {"decoupled_weight_decay": False}, r"ExtrapAdam is AdamW"),
    (ExtrapAdam, {"betas": (torch.tensor(0.9), torch.tensor(0.99))}, r"betas as floats"),
    (ExtrapAdam, {"betas": (1.0, 0.9)}, r"Invalid beta parameter at index 0: 1.0"),
    (ExtrapAdam, {"lr": torch.tensor(0.01), "foreach": True}, r"lr as a Tensor is not supp"),
]


@pytest.mark.parametrize(
    "cls,keys,match", _REFUSED_GROUP_KEYS,
    ids=[f"{c.__name__}-{'-'.join(k)}" for c, k, _ in _REFUSED_GROUP_KEYS],
)  # fmt: skip
def test_refused_group_keys_alike_in_constructor_and_add_param_group(cls, keys, match):
    params = _params(torch.float32)
    with pytest.raises(ValueError, match=match):
        cls([{"params": params[:1]}, {"params": params[1:2], **keys}], lr=0.01)
    opt = cls([{"params": params[:1]}], lr=0.01)
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": params[1:2], **keys})
    assert len(opt.param_groups) == 1  # the refused group was not kept
    opt.add_param_group({"params": params[1:2]})  # and the parameters can still be added
    _set_grads(params[:2])
    opt.step()


# ---------------------------------------------------------------------------------------------
# What torch's inputs do not cover.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [ExtrapSGD, ExtrapAdam])
def test_state_dict_of_0_1_lacks_the_new_group_keys_and_still_loads(cls):
    """0.1 saved groups without torch's newer keys: on load they take the 0.1 behaviour
    (torch's __setstate__ convention) and the run continues in lockstep."""
    kwargs = {"lr": 0.05, "momentum": 0.9} if cls is ExtrapSGD else {"lr": 0.01}
    a = _params(torch.float64)
    opt = cls(a, **kwargs)
    for _ in range(2):
        _set_grads(a)
        opt.step()
    sd = copy.deepcopy(opt.state_dict())  # (torch's state_dict shares the buffers)
    new_keys = set(cls._group_keys_since_0_1)
    for group in sd["param_groups"]:
        for key in new_keys:
            group.pop(key)
    b = [nn.Parameter(p.detach().clone()) for p in a]
    opt2 = cls(b, **kwargs, maximize=True)  # the loaded groups win over the constructor's
    opt2.load_state_dict(sd)
    for key in new_keys:
        assert opt2.param_groups[0][key] == cls._group_keys_since_0_1[key], key
    for _ in range(3):
        for o, ps in ((opt, a), (opt2, b)):
            _set_grads(ps)
            o.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q) and torch.equal(opt.anchor(p), opt2.anchor(q))


@pytest.mark.parametrize("cls", [ExtrapSGD, ExtrapAdam])
@pytest.mark.parametrize("foreach", [False, True])
def test_complex_params_step_as_their_real_view_with_extrapolation(cls, foreach):
    """Complex parameters are pairs of real ones (torch's convention), also for the local
    direction: ours on complex128 equals ours on the float64 real view (to rounding: complex
    and real kernels may fuse differently)."""
    kwargs = {"lr": 0.05, "weight_decay": 0.01, "foreach": foreach, "extrap_scale": 3.0}
    if cls is ExtrapSGD:
        kwargs.update(momentum=0.9, nesterov=True, maximize=True)
    else:
        kwargs.update(amsgrad=True, maximize=True)
    cplx = _params(torch.complex128)
    real = [nn.Parameter(torch.view_as_real(p.detach()).clone()) for p in cplx]
    opt_c, opt_r = cls(cplx, **kwargs), cls(real, **kwargs)
    for _ in range(STEPS):
        for p, q in zip(cplx, real):  # ∇ of a quadratic (sin of a complex number grows fast)
            p.grad = 0.5 * p.detach() + (0.1 - 0.2j)
            q.grad = torch.view_as_real(p.grad).clone()
        opt_c.step()
        opt_r.step()
        for p, q in zip(cplx, real):
            torch.testing.assert_close(torch.view_as_real(p.detach()), q.detach(), rtol=1e-14,
                                       atol=1e-15)  # fmt: skip
            torch.testing.assert_close(torch.view_as_real(opt_c.anchor(p)), opt_r.anchor(q),
                                       rtol=1e-14, atol=1e-15)  # fmt: skip
    assert (cplx[0].detach() - opt_c.anchor(cplx[0])).abs().max() > 1e-3  # x̃ ≠ x


def test_complex_adam_second_moment_is_per_real_component():
    """Not g·g of the complex number (the 0.1 behaviour, which differs from AdamW)."""
    p = nn.Parameter(torch.tensor([1.0 + 0.0j], dtype=torch.complex128))
    opt = ExtrapAdam([p], lr=0.1, betas=(0.0, 0.0), weight_decay=0.0, extrap_scale=0.0)
    p.grad = torch.tensor([3.0 + 4.0j], dtype=torch.complex128)
    opt.step()
    assert torch.equal(torch.view_as_real(opt.state[p]["exp_avg_sq"]),
                       torch.tensor([[9.0, 16.0]], dtype=torch.float64))  # fmt: skip


@pytest.mark.parametrize("max_norm", [None, 1.0])
def test_sparse_gradients_are_refused_clearly(max_norm):
    emb = nn.Embedding(10, 3, sparse=True)
    opt = ExtrapSGD(emb.parameters(), lr=0.1, extrap_max_norm=max_norm)
    emb(torch.tensor([1, 2])).sum().backward()
    match = "extrap_max_norm .* sparse gradients" if max_norm else "does not support sparse"
    with pytest.raises(RuntimeError, match=match):
        opt.step()


def test_maximize_moves_the_noise_free_variants_uphill():
    """maximize reaches the variants that use the gradient outside the kernels: 'fresh' places
    x̃ = x + γ̃∇f, 'stochastic' x̃ = x + γ̃(gᵏ − g) (here K = 1: x̃ = x), both at the anchor step
    of torch.optim.SGD(maximize=True)."""
    x0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    p = nn.Parameter(x0.clone())
    opt = extrap_accel.create_optimizer("extrap_sgd_fresh", [p], lr=0.1, extrap_lr=0.5,
                                        maximize=True)  # fmt: skip
    seen = []

    def closure():
        opt.zero_grad()
        seen.append(p.detach().clone())
        loss = (p**2).sum() / 2  # ∇f = p
        loss.backward()
        return loss

    opt.step(closure)
    torch.testing.assert_close(seen[0], x0)  # the extra pass at the anchor
    torch.testing.assert_close(seen[1], x0 + 0.5 * x0)  # x̃ = x + γ̃∇f(x): uphill
    torch.testing.assert_close(opt.anchor(p), x0 + 0.1 * seen[1])  # x₁ = x₀ + γ∇f(x̃)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # K = 1: 'stochastic' is plain SGD (warned)
        q = nn.Parameter(x0.clone())
        opt = ExtrapSGD([q], lr=0.1, extrapolation="stochastic", maximize=True)
        q.grad = q.detach().clone()
        opt.step()
    torch.testing.assert_close(opt.anchor(q), 1.1 * x0)
    torch.testing.assert_close(q.detach(), 1.1 * x0)
