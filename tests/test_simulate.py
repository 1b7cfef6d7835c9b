"""The single-process simulator of K workers against the line-by-line oracle of docs/algorithms.md
(the check against a real 2-process run is in tests/test_ddp.py)."""

import pytest
import torch
from torch import nn

import extrap_accel
from reference import ReferenceExtrapAdam, ReferenceExtrapSGD

K = 3


class Quadratic(nn.Module):
    """f_k(x) = ½ Σ a_k (x − c_k)² on two tensors: every worker has its own objective."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(4, 3, generator=g, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(3, generator=g, dtype=torch.float64))
        self.a = torch.rand(K, generator=g, dtype=torch.float64) + 0.5
        self.c = torch.randn(K, generator=g, dtype=torch.float64)

    def loss(self, k):
        return 0.5 * self.a[k] * ((self.w - self.c[k]) ** 2).sum() + \
            0.5 * self.a[k] * ((self.b + self.c[k]) ** 2).sum()

    def grads(self, k, point):
        w, b = point
        return [self.a[k] * (w - self.c[k]), self.a[k] * (b + self.c[k])]


# torch's options (maximize, dampening, amsgrad) reach the backends' path too: the simulator
# runs the base update on the anchors and places each worker's x̃ like DeepSpeed and FSDP2 do.
_KINDS = ["sgd", "sgd_heavy_ball_clip", "stochastic", "adam", "sgd_maximize_dampening",
          "stochastic_maximize", "adam_amsgrad_maximize"]  # fmt: skip


@pytest.mark.parametrize("kind", _KINDS)
def test_simulator_follows_the_k_worker_oracle(kind):
    model = Quadratic()
    x0 = [p.detach().clone() for p in model.parameters()]
    if kind.startswith("adam"):
        kw = dict(lr=0.05, weight_decay=1e-2)
        if kind == "adam_amsgrad_maximize":
            kw.update(amsgrad=True, maximize=True)
        opt = extrap_accel.ExtrapAdam(model.parameters(), **kw)
        ref = ReferenceExtrapAdam(x0, world_size=K, **kw)
    else:
        kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=kind == "sgd")
        if kind == "sgd_heavy_ball_clip":
            kw.update(extrap_momentum=0.5, extrap_max_norm=0.5)
        if kind == "sgd_maximize_dampening":
            kw.update(extrap_momentum=0.5, dampening=0.3, maximize=True, extrap_max_norm=0.5)
        if kind.startswith("stochastic"):
            kw.update(extrapolation="stochastic", maximize=kind == "stochastic_maximize")
        opt = extrap_accel.ExtrapSGD(model.parameters(), **kw)
        kw.pop("extrapolation", None)
        ref = ReferenceExtrapSGD(x0, world_size=K, extrapolation="stochastic"
                                 if kind.startswith("stochastic") else "past", **kw)
    workers = extrap_accel.VirtualWorkers(model, opt, num_workers=K)
    for t in range(12):
        for k in range(K):
            for got, want in zip(workers.points[k], ref.points(k)):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        ref.step([model.grads(k, ref.points(k)) for k in range(K)])
        workers.step(model.loss)
        for got, want in zip(model.parameters(), ref.anchor):
            torch.testing.assert_close(got.detach(), want, rtol=0, atol=1e-12)
    assert not torch.equal(workers.points[0][0], workers.points[1][0])  # could fail


def test_baseline_is_large_batch_sgd_on_the_averaged_gradient():
    model, plain = Quadratic(), Quadratic()
    workers = extrap_accel.VirtualWorkers(
        model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), num_workers=K)
    opt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    for _ in range(5):
        workers.step(model.loss)
        opt.zero_grad()
        (sum(plain.loss(k) for k in range(K)) / K).backward()
        opt.step()
        assert all(torch.equal(pt, p) for pt, p in zip(workers.points[1], model.parameters()))
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_noise_workers_draw_their_own_noise_after_each_step():
    model = Quadratic()
    opt = extrap_accel.create_optimizer("extrap_sgd_gaussian", model.parameters(), lr=0.1,
                                        noise_scale=1e-2)
    workers = extrap_accel.VirtualWorkers(model, opt, num_workers=K)
    anchor = model.w.detach().clone()
    assert all(torch.equal(points[0], anchor) for points in workers.points)  # t = 0: x₀
    state = torch.random.get_rng_state()
    workers.step(model.loss)
    assert torch.equal(torch.random.get_rng_state(), state)  # explicit generators only
    anchor = model.w.detach()
    assert not torch.equal(workers.points[0][0], anchor)
    assert not torch.equal(workers.points[0][0], workers.points[1][0])


def test_errors():
    model = Quadratic()
    with pytest.raises(ValueError, match="num_workers"):
        extrap_accel.VirtualWorkers(model, extrap_accel.ExtrapSGD(model.parameters(), lr=0.1), 0)
    with pytest.raises(ValueError, match="world_size=2"):
        extrap_accel.VirtualWorkers(
            model, extrap_accel.ExtrapSGD(model.parameters(), lr=0.1, world_size=2), K)
    with pytest.raises(NotImplementedError, match="fresh"):
        extrap_accel.VirtualWorkers(
            model, extrap_accel.create_optimizer("extrap_sgd_fresh", model.parameters(), lr=0.1), K)
