"""attach(), the train/eval swap and checkpointing: only the anchor is evaluated and saved (I5),
and a resumed run continues bit for bit.

Models: a small CNN with BatchNorm and a language-model-like module whose output Linear shares
its weight with the embedding (tied weights). Both are trained a few steps so that the
parameters hold x̃ ≠ x before each check.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors import torch as safetensors_torch
from torch import nn

from extrap_accel import ExtrapAdam, ExtrapSGD, attach

# ----------------------------------------------------------------------------- models and data

VOCAB, DIM = 17, 12


class SmallCNN(nn.Module):
    kind = "cnn"

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class TiedLM(nn.Module):
    kind = "tied"

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.out = nn.Linear(DIM, VOCAB)
        self.out.weight = self.emb.weight  # tied: one Parameter, two state-dict keys

    def forward(self, tokens):
        return self.out(self.norm(torch.tanh(self.proj(self.emb(tokens)))))


MODELS = {"cnn": SmallCNN, "tied": TiedLM}

GAUSSIAN = dict(
    lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
    extrapolation="gaussian", noise_scale=1e-2, seed=7,
)  # fmt: skip


OPTIMIZERS = {
    "sgd_past": lambda ps: ExtrapSGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
    "sgd_gaussian": lambda ps: ExtrapSGD(ps, **GAUSSIAN),
    "adam": lambda ps: ExtrapAdam(ps, lr=1e-2, weight_decay=1e-2),
}


def make_model(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[kind]()


def batch(kind: str, step: int):
    g = torch.Generator().manual_seed(1000 + step)
    if kind == "cnn":
        return torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g)
    return (
        torch.randint(0, VOCAB, (3, 6), generator=g),
        torch.randint(0, VOCAB, (3, 6), generator=g),
    )


def bad_input(kind: str):
    """An input whose shape makes the forward raise inside the module."""
    return torch.randn(4, 5, 8, 8) if kind == "cnn" else torch.randn(3, 6)


def loss_of(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def train(model, opt, steps: int, start: int = 0) -> None:
    model.train()
    for i in range(start, start + steps):
        x, y = batch(model.kind, i)
        opt.zero_grad(set_to_none=True)
        loss_of(model(x), y).backward()
        opt.step()


def named_params(model):
    """Every parameter name, tied aliases included (what a state dict has)."""
    return list(model.named_parameters(remove_duplicate=False))


def snapshot(model, opt):
    """(x̃ by name, anchor by name), cloned."""
    xt = {n: p.detach().clone() for n, p in named_params(model)}
    anchors = {n: opt.anchor(p).detach().clone() for n, p in named_params(model)}
    return xt, anchors


def copy_at(model, params_by_name: dict, kind: str | None = None) -> nn.Module:
    """A plain (unattached) copy of ``model`` holding ``params_by_name`` and model's buffers."""
    kind = kind or model.kind
    ref = MODELS[kind]()
    sd = {n: b.detach().clone() for n, b in model.named_buffers()}
    sd.update({n: params_by_name[n].clone() for n, _ in named_params(model)})
    ref.load_state_dict(sd)
    ref.train(model.training)
    return ref


def assert_params_equal(model, expected: dict) -> None:
    for n, p in named_params(model):
        assert torch.equal(p.detach(), expected[n]), n


def assert_some_displaced(xt: dict, anchors: dict) -> None:
    differing = [n for n in xt if not torch.equal(xt[n], anchors[n])]
    assert differing, "training left x̃ == x: the test could not detect a swap"


def trained(kind: str, opt_name: str, steps: int = 3, seed: int = 0):
    model = make_model(kind, seed)
    opt = OPTIMIZERS[opt_name](model.parameters())
    train(model, opt, steps)
    return model, opt


# ----------------------------------------------------------------------------- 1. eval/train swap


def test_noise_extrapolation_can_be_built_on_ordinary_parameters():
    model = make_model("cnn")
    before = {n: p.detach().clone() for n, p in named_params(model)}
    # (ExtrapOptimizer.__init__ once placed the noise outside no_grad and raised here)
    opt = ExtrapSGD(model.parameters(), **GAUSSIAN)
    # no variant perturbs at t = 0: weights loaded after the optimizer was built are x₀
    for n, p in named_params(model):
        assert torch.equal(p.detach(), before[n]), n
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # the anchor is the loaded x₀ (+1); noise is placed around it for the next step
    for n, p in named_params(model):  # (weight decay moved it a little)
        torch.testing.assert_close(opt.anchor(p), before[n] + 1.0, rtol=1e-3, atol=1e-3)
    assert any(not torch.equal(p.detach(), before[n] + 1.0) for n, p in named_params(model))


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("kind", list(MODELS))
def test_eval_train_swap_without_attach(kind, opt_name):
    model, opt = trained(kind, opt_name)
    xt, anchors = snapshot(model, opt)
    assert_some_displaced(xt, anchors)
    assert opt.training and len(opt.displaced()) > 0

    opt.eval()
    assert not opt.training
    assert opt.displaced() == []
    assert_params_equal(model, anchors)
    for n, p in named_params(model):
        assert torch.equal(opt.anchor(p), anchors[n]), n
        assert torch.equal(opt.extrapolated(p), xt[n]), n

    opt.eval()  # a no-op
    assert not opt.training
    assert_params_equal(model, anchors)

    opt.train()
    assert opt.training
    assert_params_equal(model, xt)
    for n, p in named_params(model):
        assert torch.equal(opt.anchor(p), anchors[n]), n

    opt.train()  # a no-op
    assert_params_equal(model, xt)

    # step() in eval mode is refused and says what to call
    opt.eval()
    with pytest.raises(RuntimeError, match=r"optimizer\.train\(\)"):
        opt.step()
    assert_params_equal(model, anchors)


# ----------------------------------------------------------------------------- 2. forwards


@pytest.mark.parametrize("opt_name", ["sgd_past", "adam"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_no_grad_forward_runs_at_anchor(kind, opt_name):
    model, opt = trained(kind, opt_name)
    attach(model, opt)
    xt, anchors = snapshot(model, opt)
    assert_some_displaced(xt, anchors)
    ptrs = {n: p.data_ptr() for n, p in named_params(model)}
    x, _ = batch(kind, 99)

    for module_training in (False, True):  # the signal is grad mode, not module mode
        model.train(module_training)
        for ctx in (torch.no_grad, torch.inference_mode):
            at_anchor = copy_at(model, anchors)
            at_xt = copy_at(model, xt)
            with ctx():
                out = model(x)
                ref_anchor = at_anchor(x)
                ref_xt = at_xt(x)
            assert torch.equal(out, ref_anchor), (module_training, ctx)
            assert not torch.allclose(out, ref_xt), "anchor and x̃ give the same output"
            assert_params_equal(model, xt)  # x̃ is back, bit for bit
            assert {n: p.data_ptr() for n, p in named_params(model)} == ptrs
            for n, p in named_params(model):
                assert torch.equal(opt.anchor(p), anchors[n]), n


@pytest.mark.parametrize("kind", list(MODELS))
def test_grad_enabled_forward_runs_at_extrapolated_point(kind):
    model, opt = trained(kind, "sgd_past")
    attach(model, opt)
    xt, anchors = snapshot(model, opt)
    x, _ = batch(kind, 99)

    # model.train() (usual training) and model.eval() with grad enabled (frozen BatchNorm
    # training): both run at x̃.
    for module_training in (True, False):
        model.train(module_training)
        at_xt = copy_at(model, xt)
        at_anchor = copy_at(model, anchors)
        out = model(x)
        assert out.requires_grad
        assert torch.equal(out, at_xt(x)), module_training
        assert not torch.allclose(out, at_anchor(x))
        assert_params_equal(model, xt)


@pytest.mark.parametrize("kind", list(MODELS))
def test_forward_that_raises_under_no_grad_restores_xt(kind):
    model, opt = trained(kind, "sgd_past")
    attach(model, opt)
    xt, anchors = snapshot(model, opt)
    model.eval()
    with torch.no_grad(), pytest.raises(RuntimeError):
        model(bad_input(kind))
    assert_params_equal(model, xt)
    # the hooks are in a clean state: the next no-grad forward is at the anchor again, and the
    # next training forward at x̃
    x, _ = batch(kind, 5)
    with torch.no_grad():
        assert torch.equal(model(x), copy_at(model, anchors)(x))
    assert torch.equal(model(x), copy_at(model, xt)(x))
    assert_params_equal(model, xt)


@pytest.mark.parametrize("kind", list(MODELS))
def test_live_graph_survives_a_no_grad_forward(kind):
    model, opt = trained(kind, "sgd_past")
    attach(model, opt)
    xt, anchors = snapshot(model, opt)
    reference = copy_at(model, xt)  # unattached, at x̃
    model.zero_grad(set_to_none=True)
    model.train()
    reference.train()
    x, _ = batch(kind, 11)
    x_eval, _ = batch(kind, 12)

    loss = model(x).square().sum()
    with torch.no_grad():
        out_eval = model(x_eval)  # at the anchor, while the graph of `loss` is alive
    loss.backward()

    ref_loss = reference(x).square().sum()
    ref_loss.backward()
    assert torch.equal(loss.detach(), ref_loss.detach())
    ref_params = dict(named_params(reference))
    for n, p in named_params(model):
        assert p.grad is not None, n
        assert torch.equal(p.grad, ref_params[n].grad), n
    assert_params_equal(model, xt)
    # and the no-grad forward really was at the anchor (so the swap happened in between)
    at_anchor = copy_at(model, anchors)
    at_anchor.train()
    with torch.no_grad():
        ref_eval = at_anchor(x_eval)
    assert torch.equal(out_eval, ref_eval)


# ----------------------------------------------------------------------------- 3. state_dict


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("kind", list(MODELS))
def test_state_dict_holds_the_anchor(kind, opt_name):
    model, opt = trained(kind, opt_name)
    xt, anchors = snapshot(model, opt)
    assert_some_displaced(xt, anchors)
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    plain = model.state_dict()  # without attach: x̃
    for n, _ in named_params(model):
        assert torch.equal(plain[n], xt[n]), n

    attach(model, opt)
    sd = model.state_dict()
    assert set(sd) == set(plain)
    for n, p in named_params(model):
        assert torch.equal(sd[n], opt.anchor(p)), n
        assert torch.equal(sd[n], anchors[n]), n
    if kind == "tied":
        assert torch.equal(sd["emb.weight"], anchors["emb.weight"])
        assert torch.equal(sd["out.weight"], anchors["emb.weight"])
    for n, b in buffers.items():
        assert torch.equal(sd[n], b), n
        assert torch.equal(dict(model.named_buffers())[n], b), n
    assert_params_equal(model, xt)  # taking the state dict swapped nothing

    # in eval mode (params hold x) it holds the anchor too
    opt.eval()
    sd_eval = model.state_dict()
    for n, _ in named_params(model):
        assert torch.equal(sd_eval[n], anchors[n]), n
    opt.train()
    assert_params_equal(model, xt)


def test_safetensors_roundtrip_gives_the_anchor(tmp_path):
    model, opt = trained("cnn", "sgd_past")
    attach(model, opt)
    xt, anchors = snapshot(model, opt)
    assert_some_displaced(xt, anchors)
    path = tmp_path / "cnn.safetensors"
    safetensors_torch.save_file(model.state_dict(), str(path))
    fresh = make_model("cnn", seed=123)
    fresh.load_state_dict(safetensors_torch.load_file(str(path)))
    assert_params_equal(fresh, anchors)
    for (n, b), (_, b2) in zip(model.named_buffers(), fresh.named_buffers()):
        assert torch.equal(b, b2), n


def test_safetensors_save_model_with_tied_weights(tmp_path):
    model, opt = trained("tied", "adam")
    attach(model, opt)
    xt, anchors = snapshot(model, opt)
    assert not torch.equal(xt["emb.weight"], anchors["emb.weight"])
    path = tmp_path / "tied.safetensors"
    # the two tied keys share the anchor tensor, as they share the parameter without attach
    safetensors_torch.save_model(model, str(path))
    fresh = make_model("tied", seed=123)
    safetensors_torch.load_model(fresh, str(path))
    assert fresh.out.weight is fresh.emb.weight
    assert_params_equal(fresh, anchors)


@pytest.mark.parametrize("kind", list(MODELS))
def test_nested_state_dict_and_load(kind):
    model, opt = trained(kind, "sgd_past")
    attach(model, opt)
    xt, anchors = snapshot(model, opt)

    class Wrapper(nn.Module):
        def __init__(self, body):
            super().__init__()
            self.body = body
            self.extra = nn.Linear(2, 2)  # not in the optimizer

    wrapper = Wrapper(model)
    sd = wrapper.state_dict()
    for n, _ in named_params(model):
        assert torch.equal(sd["body." + n], anchors[n]), n
    assert torch.equal(sd["extra.weight"], wrapper.extra.weight)

    # loading through the wrapper moves the anchor of the attached submodule
    target = make_model(kind, seed=5)
    new_w = {n: p.detach().clone() for n, p in named_params(target)}
    wsd = {"body." + k: v for k, v in target.state_dict().items()}
    wsd.update({"extra." + k: v for k, v in wrapper.extra.state_dict().items()})
    wrapper.load_state_dict(wsd)
    for n, p in named_params(model):
        assert torch.equal(opt.anchor(p), new_w[n]), n
        torch.testing.assert_close(p.detach(), new_w[n] + (xt[n] - anchors[n]))


# ----------------------------------------------------------------------------- 4. load_state_dict


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("kind", list(MODELS))
def test_load_own_state_dict_changes_nothing(kind, opt_name):
    model, opt = trained(kind, opt_name)
    attach(model, opt)
    xt, anchors = snapshot(model, opt)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    model.load_state_dict(model.state_dict())
    assert_params_equal(model, xt)
    for n, p in named_params(model):
        assert torch.equal(opt.anchor(p), anchors[n]), n
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    # also from a copy (no aliasing with the optimizer state)
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
    assert_params_equal(model, xt)
    for n, p in named_params(model):
        assert torch.equal(opt.anchor(p), anchors[n]), n


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("kind", list(MODELS))
def test_load_other_weights_moves_the_anchor(kind, opt_name):
    model, opt = trained(kind, opt_name)
    attach(model, opt)
    xt, anchors = snapshot(model, opt)
    target = make_model(kind, seed=5)
    train(target, torch.optim.SGD(target.parameters(), lr=0.05), 2)  # other weights + buffers
    w_sd = {k: v.clone() for k, v in target.state_dict().items()}
    w = {n: p.detach().clone() for n, p in named_params(target)}
    assert all(not torch.equal(w[n], anchors[n]) for n in w)

    model.load_state_dict(w_sd)
    for n, p in named_params(model):
        assert torch.equal(opt.anchor(p), w[n]), n
        torch.testing.assert_close(p.detach(), w[n] + (xt[n] - anchors[n]))
    for n, b in model.named_buffers():
        assert torch.equal(b, w_sd[n]), n
    if kind == "tied":
        assert model.out.weight is model.emb.weight

    # in eval mode, loading W puts W into the parameters; train() then shows W + displacement
    _, anchors2 = snapshot(model, opt)
    xt2 = {n: p.detach().clone() for n, p in named_params(model)}
    target2 = make_model(kind, seed=6)
    w2 = {n: p.detach().clone() for n, p in named_params(target2)}
    opt.eval()
    model.load_state_dict(target2.state_dict())
    assert_params_equal(model, w2)
    for n, p in named_params(model):
        assert torch.equal(opt.anchor(p), w2[n]), n
    opt.train()
    for n, p in named_params(model):
        assert torch.equal(opt.anchor(p), w2[n]), n
        torch.testing.assert_close(p.detach(), w2[n] + (xt2[n] - anchors2[n]))


def test_load_with_assign_is_refused():
    model, opt = trained("cnn", "sgd_past")
    attach(model, opt)
    xt, anchors = snapshot(model, opt)
    sd = {k: v.clone() for k, v in make_model("cnn", seed=5).state_dict().items()}
    with pytest.raises(RuntimeError, match="assign=False"):
        model.load_state_dict(sd, assign=True)
    assert_params_equal(model, xt)
    for n, p in named_params(model):
        assert torch.equal(opt.anchor(p), anchors[n]), n


# ----------------------------------------------------------------------------- 5. resume


def _final(model, opt):
    xt, anchors = snapshot(model, opt)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return xt, anchors, buffers


@pytest.mark.parametrize("save_in_eval", [False, True], ids=["train_mode", "eval_mode"])
@pytest.mark.parametrize("order", ["model_first", "optimizer_first"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("kind", list(MODELS))
def test_resume_is_bit_identical(tmp_path, kind, opt_name, order, save_in_eval):
    n_steps, m_steps = 3, 3

    # uninterrupted run
    model = make_model(kind)
    opt = OPTIMIZERS[opt_name](model.parameters())
    attach(model, opt)
    train(model, opt, n_steps + m_steps)
    expected = _final(model, opt)
    assert_some_displaced(expected[0], expected[1])

    # interrupted run: same start, save after n steps
    model = make_model(kind)
    opt = OPTIMIZERS[opt_name](model.parameters())
    attach(model, opt)
    train(model, opt, n_steps)
    if save_in_eval:
        opt.eval()
        model.eval()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    del model, opt

    fresh = make_model(kind, seed=123)  # another init: everything must come from the file
    fresh_opt = OPTIMIZERS[opt_name](fresh.parameters())
    attach(fresh, fresh_opt)
    ckpt = torch.load(path, weights_only=True)
    loaded_weights = {k: v.clone() for k, v in ckpt["model"].items()}
    if order == "model_first":
        fresh.load_state_dict(ckpt["model"])
        fresh_opt.load_state_dict(ckpt["optimizer"])
    else:
        fresh_opt.load_state_dict(ckpt["optimizer"])
        fresh.load_state_dict(ckpt["model"])
    assert fresh_opt.training is (not save_in_eval)
    if save_in_eval:
        fresh_opt.train()
    train(fresh, fresh_opt, m_steps, start=n_steps)

    got = _final(fresh, fresh_opt)
    for what, exp, act in zip(("x̃", "anchor", "buffer"), expected, got):
        assert exp.keys() == act.keys()
        for n in exp:
            assert torch.equal(act[n], exp[n]), f"{what} {n}"
    # Training after the load did not write into the loaded checkpoint (its model entries
    # share storage with the optimizer's "anchor" entries when saved in one file).
    for k, v in loaded_weights.items():
        assert torch.equal(ckpt["model"][k], v), k


def test_saved_model_weights_are_the_anchor_in_both_modes(tmp_path):
    """The checkpoint's model weights are the anchor, its optimizer state has x and x̃."""
    for save_in_eval in (False, True):
        model, opt = trained("tied", "sgd_past")
        attach(model, opt)
        xt, anchors = snapshot(model, opt)
        if save_in_eval:
            opt.eval()
        path = tmp_path / f"ckpt{int(save_in_eval)}.pt"
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
        ckpt = torch.load(path, weights_only=True)
        for n, _ in named_params(model):
            assert torch.equal(ckpt["model"][n], anchors[n]), n
        index = {id(p): i for i, p in enumerate(opt.param_groups[0]["params"])}
        for n, p in model.named_parameters():
            entry = ckpt["optimizer"]["state"][index[id(p)]]
            assert torch.equal(entry["anchor"], anchors[n]), n
            assert torch.equal(entry["extrapolated"], xt[n]), n
        assert ckpt["optimizer"]["extrap"]["world_size"] == 1


# ------------------------------------------------------------------------- 6. corrupt checkpoints


def test_loading_a_torch_sgd_state_dict_is_refused():
    model = make_model("cnn")
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = batch("cnn", 0)
    loss_of(model(x), y).backward()
    sgd.step()

    other, opt = trained("cnn", "sgd_past")
    xt, anchors = snapshot(other, opt)
    with pytest.raises(ValueError, match="'extrap'"):
        opt.load_state_dict(sgd.state_dict())
    assert_params_equal(other, xt)
    for n, p in named_params(other):
        assert torch.equal(opt.anchor(p), anchors[n]), n


@pytest.mark.parametrize("dropped", ["extrapolated", "anchor"])
def test_half_a_displacement_is_corrupt(dropped):
    model, opt = trained("cnn", "sgd_past")
    xt, anchors = snapshot(model, opt)
    sd = opt.state_dict()
    sd = dict(sd, state={i: dict(e) for i, e in sd["state"].items()})
    victim = next(iter(sd["state"]))
    assert {"anchor", "extrapolated"} <= set(sd["state"][victim])
    del sd["state"][victim][dropped]
    with pytest.raises(ValueError, match="corrupt"):
        opt.load_state_dict(sd)
    assert_params_equal(model, xt)
    for n, p in named_params(model):
        assert torch.equal(opt.anchor(p), anchors[n]), n


# ----------------------------------------------------------------------------- 7. attach errors


def test_attach_needs_an_extrap_optimizer():
    model = make_model("cnn")
    with pytest.raises(TypeError, match="ExtrapSGD"):
        attach(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_attach_to_the_optimizer_of_another_model():
    model = make_model("cnn")
    other = make_model("cnn", seed=1)
    with pytest.raises(ValueError):
        attach(model, ExtrapSGD(other.parameters(), lr=0.1))


def test_attach_twice():
    model, opt = trained("cnn", "sgd_past")
    handle = attach(model, opt)
    assert attach(model, opt) is handle  # same optimizer: idempotent
    second = ExtrapSGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="already attached"):
        attach(model, second)
    handle.remove()
    attach(model, second)  # allowed once the first is removed


def test_handle_remove_restores_plain_behaviour():
    model, opt = trained("cnn", "sgd_past")
    xt, anchors = snapshot(model, opt)
    handle = attach(model, opt)
    sd = model.state_dict()
    for n, _ in named_params(model):
        assert torch.equal(sd[n], anchors[n]), n
    handle.remove()
    sd = model.state_dict()
    for n, _ in named_params(model):
        assert torch.equal(sd[n], xt[n]), n
    model.eval()
    x, _ = batch("cnn", 3)
    with torch.no_grad():
        assert torch.equal(model(x), copy_at(model, xt)(x))
    assert_params_equal(model, xt)


def test_attach_unwraps_orig_mod_and_optimizer_wrappers():
    model, opt = trained("cnn", "sgd_past")
    xt, anchors = snapshot(model, opt)

    class CompiledLike(nn.Module):  # the shape of torch.compile's OptimizedModule
        def __init__(self, mod):
            super().__init__()
            self._orig_mod = mod

        def forward(self, *args):
            return self._orig_mod(*args)

    class OptimizerWrapper:  # the shape of accelerate's AcceleratedOptimizer
        def __init__(self, optimizer):
            self.optimizer = optimizer

    wrapped = CompiledLike(model)
    handle = attach(wrapped, OptimizerWrapper(opt))
    assert handle.module is model and handle.optimizer is opt
    sd = wrapped.state_dict()
    for n, _ in named_params(model):
        assert torch.equal(sd["_orig_mod." + n], anchors[n]), n
    model.eval()
    x, _ = batch("cnn", 3)
    with torch.no_grad():
        assert torch.equal(wrapped(x), copy_at(model, anchors)(x))
    assert_params_equal(model, xt)
    assert attach(model, opt) is handle  # the inner module carries the attachment


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch-internal, on dynamo import
def test_attach_accepts_a_torch_compile_wrapper():
    """torch.compile's OptimizedModule (construction only: no compiled forward runs here)."""
    model, opt = trained("tied", "sgd_past")
    xt, anchors = snapshot(model, opt)
    compiled = torch.compile(model)
    assert compiled._orig_mod is model
    handle = attach(compiled, opt)
    assert handle.module is model
    sd = compiled.state_dict()
    for n, _ in named_params(model):
        assert torch.equal(sd["_orig_mod." + n], anchors[n]), n
    assert_params_equal(model, xt)


def test_hugging_face_generate_runs_at_the_anchor():
    """generate() of an encoder-decoder calls the encoder directly, past the root forward
    hook: attach runs the whole call at the anchor and leaves x̃ in place afterwards."""
    transformers = pytest.importorskip("transformers")
    import copy

    config = transformers.MarianConfig(
        vocab_size=32, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=16,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, forced_eos_token_id=None,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.MarianMTModel(config)
    opt = ExtrapAdam(model.parameters(), lr=1e-2, extrap_scale=5.0)
    ids = torch.randint(2, 32, (2, 6))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    at_point = copy.deepcopy(model)  # x̃ in the weights, no hooks
    handle = attach(model, opt)
    at_anchor = copy.deepcopy(at_point)
    at_anchor.load_state_dict(model.state_dict())  # the anchor
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    kwargs = dict(max_new_tokens=5, do_sample=False, num_beams=1, output_scores=True,
                  return_dict_in_generate=True)  # fmt: skip

    def scores(m):
        return torch.stack(m.generate(input_ids=ids, **kwargs).scores)

    got = scores(model)
    assert torch.equal(got, scores(at_anchor))
    assert not torch.equal(got, scores(at_point))  # the check can fail
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())  # x̃ is back
    handle.remove()
    assert "generate" not in vars(model)
    assert torch.equal(scores(model), scores(at_point))
