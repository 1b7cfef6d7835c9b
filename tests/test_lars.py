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


def test_adam_type_optimizers_are_refused():
    model = _model()
    for opt in (torch.optim.AdamW(model.parameters()), extrap_accel.ExtrapAdam(model.parameters())):
        with pytest.raises(ValueError, match="wrap SGD / ExtrapSGD"):
            extrap_accel.LARS(opt)


@pytest.mark.parametrize("name", ["sgd", "extrap_sgd"])
def test_fp16_loss_scaling_is_undone_before_the_norms(name):
    """Under accelerate's GradScaler, LARS sees the true gradient: three steps with a loss
    scale of 2^16 equal three without (powers of two unscale exactly)."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.state import AcceleratorState

    Accelerator(cpu=True)  # AcceleratedOptimizer reads the process state

    def run(scaled: bool):
        model = _model().float()
        opt = extrap_accel.create_optimizer(name, model.parameters(), lr=0.1, momentum=0.9,
                                            weight_decay=1e-2)  # fmt: skip
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16) if scaled else None
        if name != "sgd":  # (no model to attach; nothing is saved here)
            extrap_accel.manual_mode(opt)
        lars = extrap_accel.LARS(AcceleratedOptimizer(opt, device_placement=False,
                                                      scaler=scaler), clip=False)  # fmt: skip
        for t in range(3):
            x = torch.randn(16, 5, generator=torch.Generator().manual_seed(t))
            loss = model(x).square().mean()
            (scaler.scale(loss) if scaled else loss).backward()
            lars.step()
            lars.zero_grad()
        return [p.detach().clone() for p in model.parameters()]

    try:
        assert all(torch.equal(a, b) for a, b in zip(run(True), run(False)))
    finally:
        AcceleratorState._reset_state(True)
