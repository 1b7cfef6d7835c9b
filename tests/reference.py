"""Test oracle: a slow, line-by-line reference of docs/algorithms.md.

Used ONLY by the tests to check the fast implementation in ``extrap_accel``; it must stay
obviously correct rather than fast.  K workers are simulated explicitly in one process, one
parameter group, parameters given as a list of (float64) tensors.  Each line names the line
of docs/algorithms.md it implements.  Conventions:
- ``points(k)`` is worker k's current extrapolated point x̃ᵏ_t (what its forward sees);
- ``step(local_grads)`` takes local_grads[k] = gᵏ_t (list of tensors, evaluated at points(k));
- lr / extrap_lr / extrap_scale (and extrap_momentum) are read at every step (schedules);
- γ̃_t = extrap_lr if given, else extrap_scale·lr/K, taken from the lr of the update just made;
- extrap_max_norm clips each worker's gᵏ (entering its local direction only) by its own total
  L2 norm, clip_grad_norm_ convention; the anchor update uses the unclipped average.
  The 'stochastic' variant uses the raw (unclipped) gᵏ_t − g_t.
- torch's options act on the local direction exactly as on the base update (ALGORITHMS.md,
  Notation): ``maximize`` negates g and every gᵏ; ``dampening`` δ damps u and ũ alike, each
  starting undamped (u_1 = h_0, ũ_1 = ĥ_0, torch's convention); Adam's ``amsgrad`` keeps a
  running maximum of v for the base update and of ṽ for the local direction.
"""
import torch


def _clip_local(grads, max_norm):
    """Local-gradient clipping (docs/algorithms.md 'Clipping'), torch.nn.utils.clip_grad_norm_ rule."""
    if max_norm is None:
        return [g.clone() for g in grads]
    total_norm = torch.sqrt(sum((g * g).sum() for g in grads))  # total L2 norm over all params
    coef = min(1.0, float(max_norm / (total_norm + 1e-6)))  # clamp(max_norm/(norm+1e-6), max=1)
    return [g * coef for g in grads]


class ReferenceExtrapSGD:
    """extrap-SGD (Algorithm 1) and the 'stochastic' variant of Section 3.2, K simulated workers."""

    def __init__(self, params, *, lr, momentum=0.0, weight_decay=0.0, nesterov=False,
                 extrap_lr=None, extrap_scale=1.0, extrap_momentum=None, extrap_max_norm=None,
                 world_size=1, extrapolation="past", dampening=0.0, maximize=False):
        assert extrapolation in ("past", "stochastic"), extrapolation
        assert world_size >= 1
        self.dampening, self.maximize = dampening, maximize
        self.lr, self.momentum, self.weight_decay, self.nesterov = lr, momentum, weight_decay, nesterov
        self.extrap_lr, self.extrap_scale, self.extrap_momentum = extrap_lr, extrap_scale, extrap_momentum
        self.extrap_max_norm, self.K, self.extrapolation = extrap_max_norm, world_size, extrapolation
        self.anchor = [p.detach().clone() for p in params]  # x_0
        self.u = [torch.zeros_like(p) for p in self.anchor]  # u_0 = 0
        self.u_loc = [[torch.zeros_like(p) for p in self.anchor] for _ in range(self.K)]  # ũᵏ_0 = 0
        self.xi = [[torch.zeros_like(p) for p in self.anchor] for _ in range(self.K)]  # ξᵏ_0 = 0 (dᵏ_0 = 0)
        self.t = 0

    def extrap_step_size(self):
        """γ̃_t = extrap_lr, else c·γ_t/K (Notation)."""
        if self.extrap_lr is not None:
            return self.extrap_lr
        return self.extrap_scale * self.lr / self.K

    def points(self, k):
        """x̃ᵏ_t = x_t + ξᵏ_t  (Alg.1 step 1: ξᵏ_t = −γ̃_{t−1}·dᵏ_t; 0 at t = 0)."""
        return [x + xi for x, xi in zip(self.anchor, self.xi[k])]

    def step(self, local_grads):
        assert len(local_grads) == self.K
        K, lr, m, lam = self.K, self.lr, self.momentum, self.weight_decay
        m_tilde = self.extrap_momentum if self.extrap_momentum is not None else m  # m̃ defaults to m
        gamma_tilde = self.extrap_step_size()  # γ̃_t from γ_t, the rate of this update
        n, damp = len(self.anchor), 1 - self.dampening  # dampening δ: (1 − δ), not at t = 0
        if self.maximize:  # maximize: g and every gᵏ negated
            local_grads = [[-g for g in gs] for gs in local_grads]
        # Alg.1 step 3: g_t = (1/K)·Σ_k gᵏ_t
        g = [sum(local_grads[k][i] for k in range(K)) / K for i in range(n)]
        new_anchor = []
        for i in range(n):
            x = self.anchor[i]
            h = g[i] + lam * x  # Alg.1 step 4: h_t = g_t + λ·x_t
            # Alg.1 step 4: u_{t+1} = m·u_t + (1 − δ)·h_t (u_1 = h_0)
            self.u[i] = h.clone() if self.t == 0 else m * self.u[i] + damp * h
            if self.nesterov:
                new_anchor.append(x - lr * (h + m * self.u[i]))  # Alg.1 step 4: x_{t+1} = x_t − γ_t·(h_t + m·u_{t+1})
            else:
                new_anchor.append(x - lr * self.u[i])  # Alg.1 step 4 (heavy ball): x_{t+1} = x_t − γ_t·u_{t+1}
        self.anchor = new_anchor
        for k in range(K):
            if self.extrapolation == "stochastic":
                for i in range(n):
                    # Sec.3.2 'stochastic': ξᵏ_{t+1} = −γ̃_t·(gᵏ_t − g_t)
                    self.xi[k][i] = -gamma_tilde * (local_grads[k][i] - g[i])
                continue
            gk = _clip_local(local_grads[k], self.extrap_max_norm)  # local clipping at extrap_max_norm
            for i in range(n):
                h_hat = gk[i] + lam * self.anchor[i]  # Alg.1 step 5: ĥᵏ_t = gᵏ_t + λ·x_{t+1}
                # Alg.1 step 5: ũᵏ_{t+1} = m̃·ũᵏ_t + (1 − δ)·ĥᵏ_t (ũᵏ_1 = ĥᵏ_0)
                self.u_loc[k][i] = h_hat.clone() if self.t == 0 else m_tilde * self.u_loc[k][i] + damp * h_hat
                if self.nesterov:
                    d = h_hat + m_tilde * self.u_loc[k][i]  # Alg.1 step 5: dᵏ_{t+1} = ĥᵏ_t + m̃·ũᵏ_{t+1}
                else:
                    d = self.u_loc[k][i]  # Alg.1 step 5 (heavy ball): dᵏ_{t+1} = ũᵏ_{t+1}
                self.xi[k][i] = -gamma_tilde * d  # Alg.1 step 1 (next t): x̃ᵏ_{t+1} = x_{t+1} − γ̃_t·dᵏ_{t+1}
        self.t += 1


class ReferenceExtrapAdam:
    """extrap-Adam (Algorithm 3), K simulated workers each with its own local moments."""

    def __init__(self, params, *, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 extrap_lr=None, extrap_scale=1.0, extrap_max_norm=None, world_size=1,
                 amsgrad=False, maximize=False):
        assert world_size >= 1
        self.amsgrad, self.maximize = amsgrad, maximize
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.extrap_lr, self.extrap_scale, self.extrap_max_norm = extrap_lr, extrap_scale, extrap_max_norm
        self.K = world_size
        self.anchor = [p.detach().clone() for p in params]  # x_0
        self.m = [torch.zeros_like(p) for p in self.anchor]  # m_0 = 0
        self.v = [torch.zeros_like(p) for p in self.anchor]  # v_0 = 0
        self.m_loc = [[torch.zeros_like(p) for p in self.anchor] for _ in range(self.K)]  # m̃ᵏ_0 = 0
        self.v_loc = [[torch.zeros_like(p) for p in self.anchor] for _ in range(self.K)]  # ṽᵏ_0 = 0
        self.v_max = [torch.zeros_like(p) for p in self.anchor]  # amsgrad: max_{s≤t} v_s
        self.v_loc_max = [[torch.zeros_like(p) for p in self.anchor] for _ in range(self.K)]
        self.xi = [[torch.zeros_like(p) for p in self.anchor] for _ in range(self.K)]  # dᵏ_0 = 0
        self.t = 0

    def extrap_step_size(self):
        """γ̃_t = extrap_lr, else c·γ_t/K (Notation)."""
        if self.extrap_lr is not None:
            return self.extrap_lr
        return self.extrap_scale * self.lr / self.K

    def points(self, k):
        """x̃ᵏ_t = x_t − γ̃_{t−1}·dᵏ_t (0 displacement at t = 0)."""
        return [x + xi for x, xi in zip(self.anchor, self.xi[k])]

    def step(self, local_grads):
        assert len(local_grads) == self.K
        K, lr, lam, eps = self.K, self.lr, self.weight_decay, self.eps
        b1, b2 = self.betas
        gamma_tilde = self.extrap_step_size()  # γ̃_t from γ_t, the rate of this update
        n, t = len(self.anchor), self.t
        bc1 = 1 - b1 ** (t + 1)  # Alg.3: 1 − β₁^{t+1}
        bc2 = 1 - b2 ** (t + 1)  # Alg.3: 1 − β₂^{t+1}
        if self.maximize:  # maximize: g and every gᵏ negated
            local_grads = [[-g for g in gs] for gs in local_grads]
        # Alg.1 step 3 (shared): g_t = (1/K)·Σ_k gᵏ_t
        g = [sum(local_grads[k][i] for k in range(K)) / K for i in range(n)]
        new_anchor = []
        for i in range(n):
            x = self.anchor[i]
            self.m[i] = b1 * self.m[i] + (1 - b1) * g[i]  # Alg.3: m_{t+1} = β₁m_t + (1−β₁)g_t
            self.v[i] = b2 * self.v[i] + (1 - b2) * g[i] * g[i]  # Alg.3: v_{t+1} = β₂v_t + (1−β₂)g_t²
            m_hat = self.m[i] / bc1  # Alg.3: m̂ = m_{t+1}/(1−β₁^{t+1})
            v = self.v[i]
            if self.amsgrad:  # amsgrad: v̂ from the running maximum of v
                self.v_max[i] = v = torch.maximum(self.v_max[i], v)
            v_hat = v / bc2  # Alg.3: v̂ = v_{t+1}/(1−β₂^{t+1})
            new_anchor.append(x - lr * (m_hat / (v_hat.sqrt() + eps) + lam * x))  # Alg.3: x_{t+1}
        self.anchor = new_anchor
        for k in range(K):
            gk = _clip_local(local_grads[k], self.extrap_max_norm)  # local clipping at extrap_max_norm
            for i in range(n):
                self.m_loc[k][i] = b1 * self.m_loc[k][i] + (1 - b1) * gk[i]  # Alg.3: m̃ᵏ_{t+1}
                self.v_loc[k][i] = b2 * self.v_loc[k][i] + (1 - b2) * gk[i] * gk[i]  # Alg.3: ṽᵏ_{t+1}
                v_loc = self.v_loc[k][i]
                if self.amsgrad:  # amsgrad: the running maximum of ṽᵏ, as for the base update
                    self.v_loc_max[k][i] = v_loc = torch.maximum(self.v_loc_max[k][i], v_loc)
                # Alg.3: dᵏ_{t+1} = (m̃/(1−β₁^{t+1})) / (√(ṽ/(1−β₂^{t+1})) + ε) + λ·x_{t+1}
                d = (self.m_loc[k][i] / bc1) / ((v_loc / bc2).sqrt() + eps) + lam * self.anchor[i]
                self.xi[k][i] = -gamma_tilde * d  # x̃ᵏ_{t+1} = x_{t+1} − γ̃_t·dᵏ_{t+1}
        self.t += 1


def reference_extragradient_past_k1(x0, grad_fn, lr, extrap_lr, steps):
    """Invariant I2 by hand (K=1, m=0, λ=0). x0: a tensor; grad_fn(tensor) -> tensor.
    Returns the anchors [x_1, ..., x_steps]."""
    x = x0.detach().clone()
    g_prev = torch.zeros_like(x)  # g_{−1} = 0
    anchors = []
    for _ in range(steps):
        x_tilde = x - extrap_lr * g_prev  # I2: x̃_t = x_t − γ̃·g_{t−1}
        g = grad_fn(x_tilde)  # I2: g_t = ∇f(x̃_t)
        x = x - lr * g  # I2: x_{t+1} = x_t − γ_t·g_t
        anchors.append(x.clone())
        g_prev = g
    return anchors


if __name__ == "__main__":
    torch.manual_seed(0)
    dt = torch.float64
    K = 3
    # worker k's loss: 0.5·xᵀA_k x − b_kᵀx per parameter tensor (two tensors), distinct per worker
    shapes = [(4, 3), (5,)]
    A = [[(lambda M: M @ M.T / 5 + torch.eye(M.shape[0], dtype=dt))(torch.randn(s[0], s[0], dtype=dt))
          for s in shapes] for _ in range(K)]
    B = [[torch.randn(s, dtype=dt) for s in shapes] for _ in range(K)]
    x0 = [torch.randn(s, dtype=dt) for s in shapes]

    def local_grad(k, xs):
        return [A[k][i] @ xs[i] - B[k][i] for i in range(len(xs))]

    def run(ref, steps=20):
        for _ in range(steps):
            ref.step([local_grad(k, ref.points(k)) for k in range(ref.K)])
        return ref

    def torch_run(opt_cls, steps=20, **kw):
        ps = [p.clone().requires_grad_(True) for p in x0]
        opt = opt_cls(ps, **kw)
        for _ in range(steps):
            with torch.no_grad():
                gs = [local_grad(k, ps) for k in range(K)]
            for i, p in enumerate(ps):
                p.grad = sum(gs[k][i] for k in range(K)) / K
            opt.step()
        return [p.detach() for p in ps]

    def close(a, b):
        return all(torch.allclose(x, y, rtol=1e-10, atol=1e-12) for x, y in zip(a, b))

    # I1: extrap_lr = 0 (and extrap_scale = 0) reproduces torch.optim.SGD
    for nesterov in (True, False):
        kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-2, nesterov=nesterov)
        want = torch_run(torch.optim.SGD, **kw)
        assert close(run(ReferenceExtrapSGD(x0, extrap_lr=0.0, world_size=K, **kw)).anchor, want)
        assert close(run(ReferenceExtrapSGD(x0, extrap_scale=0.0, world_size=K, **kw)).anchor, want)
    # ... with torch's options: dampening, maximize
    for extra in (dict(dampening=0.3), dict(maximize=True), dict(nesterov=True, maximize=True)):
        kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-2, **extra)
        want = torch_run(torch.optim.SGD, **kw)
        assert close(run(ReferenceExtrapSGD(x0, extrap_lr=0.0, world_size=K, **kw)).anchor, want)
    # I1 for Adam: extrap_lr = 0 reproduces torch.optim.AdamW (also amsgrad, maximize)
    for extra in ({}, dict(amsgrad=True), dict(maximize=True), dict(amsgrad=True, maximize=True)):
        kw = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=1e-2, **extra)
        assert close(run(ReferenceExtrapAdam(x0, extrap_lr=0.0, world_size=K, **kw)).anchor,
                     torch_run(torch.optim.AdamW, **kw))

    # I2: K=1, m=0, λ=0 matches the hand-written extragradient-from-the-past loop
    ref = ReferenceExtrapSGD([x0[0]], lr=0.05, extrap_lr=0.02, world_size=1)
    hand = reference_extragradient_past_k1(x0[0], lambda x: A[0][0] @ x - B[0][0], 0.05, 0.02, 15)
    for t in range(15):
        ref.step([[A[0][0] @ ref.points(0)[0] - B[0][0]]])
        assert close(ref.anchor, [hand[t]])

    # I4 after one step: dᵏ_1 = (1+m̃)(gᵏ_0 + λx_1) (Nesterov), so x̃⁰ − x̃¹ = −γ̃(1+m̃)(g⁰_0 − g¹_0)
    lr, m, lam, mt = 0.1, 0.9, 1e-2, 0.5
    ref = ReferenceExtrapSGD(x0, lr=lr, momentum=m, weight_decay=lam, nesterov=True,
                             extrap_momentum=mt, world_size=2)
    assert close(ref.points(0), x0) and close(ref.points(1), x0)  # no extrapolation at t = 0
    g0 = [local_grad(k, x0) for k in range(2)]
    ref.step(g0)
    gt = lr / 2  # default γ̃ = lr/K
    diff = [a - b for a, b in zip(ref.points(0), ref.points(1))]
    assert close(diff, [-gt * (1 + mt) * (a - b) for a, b in zip(g0[0], g0[1])])
    # each point individually: x̃ᵏ_1 = x_1 − γ̃(1+m̃)(gᵏ_0 + λx_1)
    for k in range(2):
        assert close(ref.points(k), [x - gt * (1 + mt) * (g + lam * x) for x, g in zip(ref.anchor, g0[k])])

    # Adam: after one step with λ=0, eps tiny: dᵏ_1 ≈ sign(gᵏ_0)
    ref = ReferenceExtrapAdam(x0, lr=0.01, eps=1e-30, extrap_lr=0.003, world_size=2)
    ref.step(g0)
    assert close(ref.points(1), [x - 0.003 * torch.sign(g) for x, g in zip(ref.anchor, g0[1])])

    # local clipping: heavy ball, m=0, λ=0 ⇒ dᵏ_1 = clip(gᵏ_0), compared with clip_grad_norm_
    ref = ReferenceExtrapSGD(x0, lr=0.1, extrap_lr=0.01, extrap_max_norm=0.5, world_size=2)
    ref.step(g0)
    for k in range(2):
        ps = [torch.zeros_like(p, requires_grad=True) for p in x0]
        for p, g in zip(ps, g0[k]):
            p.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(ps, 0.5)
        assert close(ref.points(k), [x - 0.01 * p.grad for x, p in zip(ref.anchor, ps)])
    # ... and the anchor still uses the unclipped average
    assert close(ref.anchor, [x - 0.1 * (a + b) / 2 for x, a, b in zip(x0, g0[0], g0[1])])

    # 'stochastic': ξ is zero-mean across workers and equals −γ̃(gᵏ_t − g_t)
    ref = run(ReferenceExtrapSGD(x0, lr=0.05, momentum=0.9, weight_decay=1e-2, world_size=K,
                                 extrapolation="stochastic"), steps=5)
    mean_pt = [sum(ref.points(k)[i] for k in range(K)) / K for i in range(len(x0))]
    assert close(mean_pt, ref.anchor)
    ref = ReferenceExtrapSGD(x0, lr=0.2, extrap_scale=2.0, world_size=2, extrapolation="stochastic")
    ref.step(g0)
    assert close(ref.points(0), [x - 0.2 * (a - (a + b) / 2) for x, a, b in zip(ref.anchor, g0[0], g0[1])])

    # schedules: γ̃ is taken from the lr of the update that just happened
    ref = ReferenceExtrapSGD(x0, lr=0.1, world_size=2)
    ref.step(g0)
    ref.lr = 1000.0  # a scheduler moving the rate afterwards must not change x̃_1
    assert close(ref.points(0), [x - 0.05 * g for x, g in zip(ref.anchor, g0[0])])
    print("reference.py self-checks passed")
