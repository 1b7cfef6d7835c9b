"""LARS (apex LARC semantics) rescales the base update only, never the extrapolation."""

import pytest
import torch
from torch import nn

import extrap_accel


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _grads(model):
    x = torch.randn(16, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    model.zero_grad()
    model(x).square().mean().backward()
    return {p: p.grad.clone() for p in model.parameters()}


@pytest.mark.parametrize("clip", [True, False])
def test_base_update_is_apex_larc(clip):
    model = _model()
    lr, wd, eta = 0.5, 1e-2, 0.02
    opt = extrap_accel.LARS(extrap_accel.ExtrapSGD(model.parameters(), lr=lr, weight_decay=wd),
                            trust_coefficient=eta, clip=clip)
    before = {p: p.detach().clone() for p in model.parameters()}
    grads = _grads(model)
    opt.step()
    for p in model.parameters():
        g, w = grads[p], before[p]
        a = 1.0
        if p.dim() > 1:
            a = eta * w.norm() / (g.norm() + wd * w.norm() + 1e-8)
            a = min(a / lr, 1.0) if clip else a
        expected = w - lr * a * (g + wd * w)
        torch.testing.assert_close(opt.optimizer.anchor(p), expected, rtol=1e-12, atol=1e-14)
    assert any(r < 1.0 for r in opt.trust_ratios().values()) or not clip


def test_local_direction_uses_the_unscaled_gradient():
    model, ref_model = _model(), _model()
    kwargs = dict(lr=0.5, momentum=0.9, nesterov=True, weight_decay=1e-2, extrap_momentum=0.5)
    opt = extrap_accel.LARS(extrap_accel.ExtrapSGD(model.parameters(), **kwargs))
    plain = extrap_accel.ExtrapSGD(ref_model.parameters(), **kwargs)
    grads = _grads(model)
    _grads(ref_model)
    opt.step()
    plain.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        # ũ₁ = gᵏ + λx₁: the unscaled gradient at this optimizer's own new anchor
        x1 = opt.optimizer.anchor(p)
        torch.testing.assert_close(opt.optimizer.state[p]["extrap_momentum_buffer"],
                                   grads[p] + 1e-2 * x1)
        assert torch.equal(p.grad, grads[p])  # the user's gradients are given back untouched
    assert any(not torch.equal(opt.optimizer.anchor(p), plain.anchor(q))
               for p, q in zip(model.parameters(), ref_model.parameters()))


def test_bad_arguments():
    model = _model()
    with pytest.raises(ValueError, match="trust_coefficient"):
        extrap_accel.LARS(torch.optim.SGD(model.parameters(), lr=0.1), trust_coefficient=0)
    opt = extrap_accel.LARS(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match="closure"):
        opt.step(lambda: 0.0)
