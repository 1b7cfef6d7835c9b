"""The core (x̃ ↔ anchor), the binding, the per-rank checkpoint policy and the registry's
capabilities; and one regression test per state defect of extrap_accel 0.1 (issue 11)."""

from __future__ import annotations

import copy
import os
import pickle
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

import extrap_accel
from extrap_accel import ExtrapAdam, ExtrapSGD, checkpoint
from extrap_accel.capture import CaptureMode
from extrap_accel.optim import VARIANTS, Core, get_optimizer_info, list_optimizers


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)


def _steps(model, opt, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for _ in range(n):
        x = torch.randn(16, 6, generator=g).to(dtype)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def _sgd(model, **kw):
    return ExtrapSGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, **kw)


# --------------------------------------------------------------------------------------- core
def test_core_swaps_places_moves_and_restarts_in_both_modes():
    p = nn.Parameter(torch.arange(4.0))
    core = Core()
    assert not core.is_displaced(p) and torch.equal(core.anchor(p), p.detach())
    anchor = core.ensure_anchor(p)
    with torch.no_grad():
        p.add_(0.5)  # x̃ = x + 0.5
    assert core.displaced()[0][0] is p and core.holds_points()
    with core.at_anchor():  # a pointer swap: no copy
        assert torch.equal(p.detach(), anchor)
    assert torch.equal(p.detach(), anchor + 0.5)
    core.set_mode(False)
    assert torch.equal(p.detach(), torch.arange(4.0)) and not core.holds_points()
    assert torch.equal(core.point(p), torch.arange(4.0) + 0.5)
    # loading weights in eval mode: the anchor is loaded, x̃ keeps its displacement
    held = core.move_anchor_(p, torch.full((4,), 10.0))
    assert torch.equal(held, torch.full((4,), 10.0))
    p.data.copy_(held)  # (what the loader writes into the slot)
    assert torch.equal(core.point(p), torch.full((4,), 10.5))
    core.set_mode(True)
    assert torch.equal(p.detach(), torch.full((4,), 10.5))
    assert torch.equal(core.anchor(p), torch.full((4,), 10.0))
    # the same load in train mode returns the new x̃ for the slot
    held = core.move_anchor_(p, torch.ones(4))
    assert torch.equal(held, torch.full((4,), 1.5))
    p.data.copy_(held)
    core.set_mode(False)
    core.restart()  # in eval mode too: x̃ = x
    core.set_mode(True)
    assert not core.is_displaced(p) and torch.equal(p.detach(), torch.ones(4))


def test_core_local_entries_round_trip_in_eval_mode():
    p = nn.Parameter(torch.zeros(3))
    core = Core()
    core.ensure_anchor(p)
    core.state[p]["extrap_momentum_buffer"] = torch.ones(3)
    with torch.no_grad():
        p.fill_(2.0)
    saved = core.local_entries([p], ("extrap_momentum_buffer",), with_anchor=True)
    with torch.no_grad():
        p.fill_(7.0)  # the saved copy must not follow the live slot
    assert torch.equal(saved[0]["extrapolated"], torch.full((3,), 2.0))
    fresh = nn.Parameter(torch.zeros(3))
    other = Core()
    other.set_mode(False)
    other.load_local_entries([fresh], saved)
    assert torch.equal(fresh.detach(), torch.zeros(3))  # eval mode: the slot keeps the anchor
    other.set_mode(True)
    assert torch.equal(fresh.detach(), torch.full((3,), 2.0))
    assert torch.equal(other.state[fresh]["extrap_momentum_buffer"], torch.ones(3))


def test_bind_refuses_unknown_fields_and_another_k():
    opt = _sgd(_model(), world_size=2)
    with pytest.raises(TypeError, match="unknown fields: bogus"):
        opt.bind(bogus=1)
    with pytest.raises(ValueError, match="world_size=2 but its backend runs K=4"):
        opt.bind(world_size=4)
    assert opt.bind(per_rank_state=True).per_rank_state and opt.binding.backend == "torch"


# ------------------------------------------------------------------- defects of 0.1 (issue 11)
def test_defect1_adam_local_step_counter_survives_a_bf16_load():
    model = _model(dtype=torch.bfloat16)
    opt = ExtrapAdam(model.parameters(), lr=1e-3)
    _steps(model, opt, n=260)
    sd = opt.state_dict()
    model2 = _model(dtype=torch.bfloat16)
    opt2 = ExtrapAdam(model2.parameters(), lr=1e-3)
    opt2.load_state_dict(sd)  # one process: no per-rank file
    p = next(model2.parameters())
    assert opt2.state[p]["extrap_step"].dtype == torch.float32
    assert opt2.state[p]["extrap_step"].item() == 260
    _steps(model2, opt2, n=1)
    assert opt2.state[p]["extrap_step"].item() == 261  # (in bf16, 260 + 1 rounds to 260)


def test_defect2_reset_local_state_in_eval_mode_restarts_x_tilde():
    model = _model()
    opt = _sgd(model)
    _steps(model, opt)
    opt.eval()
    opt.reset_local_state(warn=False)
    opt.train()
    for p in model.parameters():
        assert torch.equal(p.detach(), opt.anchor(p))
    assert opt.displaced() == []


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_defect3_copies_keep_seed_world_size_and_generators(how):
    model = _model()
    opt = ExtrapSGD(model.parameters(), lr=0.1, extrapolation="gaussian", noise_scale=0.01,
                    world_size=4, seed=7)
    _steps(model, opt, n=2)
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    _steps(model, opt, n=1, seed=5)
    _steps(model2, opt2, n=1, seed=5)
    assert opt2.world_size == 4
    for p, q in zip(model.parameters(), model2.parameters()):  # the same next noise
        assert torch.equal(p.detach(), q.detach())
        assert torch.equal(opt.anchor(p), opt2.anchor(q))


def test_defect4_state_dict_taken_in_eval_mode_survives_train():
    model = _model()
    opt = _sgd(model)
    _steps(model, opt)
    points = [opt.extrapolated(p).clone() for p in model.parameters()]
    anchors = [opt.anchor(p).clone() for p in model.parameters()]
    opt.eval()
    sd = opt.state_dict()
    opt.train()  # swaps the live buffers in place
    opt.load_state_dict(sd)  # an eval-mode state dict loads in eval mode
    opt.train()
    for p, point, anchor in zip(model.parameters(), points, anchors):
        assert torch.equal(p.detach(), point)
        assert torch.equal(opt.anchor(p), anchor)


def test_defect5_post_local_finish_in_eval_mode_averages_the_anchors(tmp_path, monkeypatch):
    from extrap_accel.integrations import post_local_sgd

    averaged = []
    original = post_local_sgd._average_in_place
    monkeypatch.setattr(post_local_sgd, "_average_in_place",
                        lambda tensors, group: averaged.append([t.clone() for t in tensors])
                        or original(tensors, group))  # fmt: skip
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model = _model()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = _sgd(model)
        local = extrap_accel.PostLocalSGD(ddp, opt, start_step=0, period=4)
        _steps(ddp, opt, n=2)  # local steps, no averaging due yet
        anchors = [opt.anchor(p).clone() for p in model.parameters()]
        opt.eval()
        assert local.finish()
        assert len(averaged) == 1 and len(averaged[0]) == len(anchors)
        for got, anchor in zip(averaged[0], anchors):
            assert torch.equal(got, anchor)
        local.remove()
    finally:
        dist.destroy_process_group()


def test_defect6_add_param_group_validates_and_hooks_each_parameter_once():
    model = _model()
    opt = _sgd(model)
    extra = nn.Parameter(torch.zeros(3))
    for bad, match in (({"extrapolation": "bogus"}, "unknown extrapolation"),
                       ({"extrap_max_norm": -1.0}, "Invalid extrap_max_norm"),
                       ({"lr": -1.0}, "Invalid learning rate"),
                       ({"lr": torch.tensor([0.1, 0.1])}, "Tensor lr must be 1-element"),
                       ({"maximize": "yes", "fused": True}, "fused=True is not supported"),
                       ({"extrap_sacle": 2.0}, "unknown param-group key")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            opt.add_param_group({"params": [extra], **bad})
        assert len(opt.param_groups) == 1  # not added
    opt.add_param_group({"params": [extra], "lr": 0.01})
    assert len(opt.param_groups) == 2 and any(extra is q for q in opt.managed_params())
    for p in model.parameters():  # one capture hook each, not one per add_param_group
        assert len(p._backward_hooks) == 1


def test_defect8_virtual_workers_see_through_lars_and_skip_unused_parameters():
    model = _model()
    unused = nn.Parameter(torch.ones(3))
    model.register_parameter("unused", unused)
    opt = extrap_accel.LARS(ExtrapSGD(model.parameters(), lr=0.1, momentum=0.9,
                                      weight_decay=0.1))  # fmt: skip
    workers = extrap_accel.VirtualWorkers(model, opt, num_workers=2)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(8, 6, generator=g) for _ in range(2)]
    for _ in range(2):
        workers.step(lambda k: model(xs[k]).square().mean())
    assert opt.optimizer.world_size == 2
    i = next(i for i, p in enumerate(workers.params) if p is model[0].weight)
    assert not torch.equal(workers.points[0][i], model[0].weight.detach())  # own x̃ each
    assert not torch.equal(workers.points[0][i], workers.points[1][i])
    assert torch.equal(unused.detach(), torch.ones(3))  # no gradient: weight decay skips it


def test_defect9_weights_loaded_after_the_optimizer_is_built_are_x0():
    model = _model()
    opt = ExtrapSGD(model.parameters(), lr=0.1, extrapolation="uniform", noise_scale=0.01)
    loaded = _model(seed=1).state_dict()
    model.load_state_dict(loaded)  # no attach: nothing was placed at construction
    for p, (name, value) in zip(model.parameters(), loaded.items()):
        assert torch.equal(p.detach(), value), name
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, value in zip(model.parameters(), loaded.values()):
        assert torch.equal(opt.anchor(p), value)


def test_defect10_a_parameter_unfrozen_later_gets_its_own_local_gradient():
    model = _model()
    last = model[2].weight
    last.requires_grad_(False)
    opt = _sgd(model)
    opt.bind(capture=CaptureMode(always=True))  # capture as under data parallelism
    last.requires_grad_(True)
    x = torch.randn(4, 6)
    model(x).square().mean().backward()
    assert torch.equal(opt.local_grad(last), last.grad)  # (0.1 read zeros)
    opt.zero_grad()  # hooks the unfrozen parameter
    model(2 * x).square().mean().backward()
    local = opt.local_grad(last)
    assert torch.equal(local, last.grad) and local is not last.grad  # captured


# ------------------------------------------------------- transient capture buffers (issue 15)
def _capture_run(transient, opt_cls, kw, *, micro=1, overflow_at=None, steps=4):
    """Train with gᵏ captured as under DDP; per step the weights, anchors and the capture's
    bytes: between micro-steps, at the step and after it."""
    model = _model()
    opt = opt_cls(model.parameters(), **kw)
    opt.bind(capture=CaptureMode(always=True, transient=transient))
    scaler = None
    if overflow_at is not None:
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        opt.set_grad_scaler(scaler)
    g = torch.Generator().manual_seed(0)
    trace, held = [], []
    for t in range(steps):
        between = []
        for m in range(micro):
            loss = model(torch.randn(8, 6, generator=g)).square().mean() / micro
            if overflow_at == t and m == micro - 1:
                loss = loss * float("inf")
            (scaler.scale(loss) if scaler else loss).backward()
            between.append(opt.local_grad_nbytes())
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        after_step = opt.local_grad_nbytes()
        opt.zero_grad()
        held.append((between, after_step, opt.local_grad_nbytes(), opt.local_grad_nbytes(True)))
        trace.append([v.clone() for p in model.parameters() for v in (p.detach(), opt.anchor(p))])
    return trace, held


@pytest.mark.parametrize("opt_cls, kw, micro, overflow_at", [
    (ExtrapSGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2}, 1, None),
    (ExtrapSGD, {"lr": 0.1, "momentum": 0.9, "extrap_max_norm": 0.05}, 2, None),  # accumulate
    (ExtrapSGD, {"lr": 0.1, "extrapolation": "stochastic"}, 1, None),
    (ExtrapAdam, {"lr": 1e-2, "weight_decay": 1e-2, "extrap_max_norm": 0.05}, 1, None),
    (ExtrapSGD, {"lr": 0.1, "momentum": 0.9}, 1, 1),  # fp16 GradScaler, step 1 overflows
], ids=["sgd", "sgd-accumulate2-clip", "stochastic", "adam-clip", "fp16-overflow"])
def test_transient_capture_is_bit_identical_and_released_after_each_step(opt_cls, kw, micro,
                                                                         overflow_at):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (stochastic with K = 1)
        kept, kept_bytes = _capture_run(False, opt_cls, kw, micro=micro, overflow_at=overflow_at)
        freed, freed_bytes = _capture_run(True, opt_cls, kw, micro=micro, overflow_at=overflow_at)
    for t, (a, b) in enumerate(zip(kept, freed)):
        assert all(torch.equal(x, y) for x, y in zip(a, b)), t
    if overflow_at is not None:  # the skipped step changed nothing, in both modes
        assert all(torch.equal(x, y) for x, y in zip(kept[overflow_at - 1], kept[overflow_at]))
    size = sum(p.numel() * 4 for p in _model().parameters())  # one fp32 gᵏ per parameter
    for (between, after, _, _), (between_t, after_t, zeroed_t, at_step_t) in zip(kept_bytes,
                                                                                freed_bytes):
        assert between == between_t == [size] * micro  # held through the micro-steps
        assert after == size and at_step_t == size
        assert zeroed_t == 0  # released by zero_grad (after a skipped step: nothing else ran)
        if after_t:  # only a skipped step leaves them to zero_grad
            assert overflow_at is not None
    assert sum(1 for h in freed_bytes if h[1] == 0) == 4 - (overflow_at is not None)


# ----------------------------------------------------------------- per-rank checkpoint files
def test_checkpoint_files_one_name_legacy_names_and_damage(tmp_path):
    model = _model()
    opt = _sgd(model)
    _steps(model, opt)
    path = checkpoint.save(str(tmp_path), [opt], rank=0)
    assert os.path.basename(path) == "extrap_accel_rank0.pt"
    states = checkpoint.read(str(tmp_path), 0)
    assert len(states) == 1 and states[0]["rank"] == 0
    assert checkpoint.read(str(tmp_path), 1) is None
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save(opt.local_state_dict(), legacy / "extrap_accel_local_0_rank0.pt")  # 0.1's name
    assert checkpoint.read(str(legacy), 0)[0]["state"].keys() == states[0]["state"].keys()
    (tmp_path / "extrap_accel_rank0.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="extrap_accel_rank0.pt .*damaged.*remove every rank"):
        checkpoint.read(str(tmp_path), 0)


def test_checkpoint_policy_with_one_process():
    assert checkpoint.agree([{"world_size": 1}], "ckpt") == "load"
    assert checkpoint.agree(None, "ckpt", optional=True) == "skip"
    assert checkpoint.agree(None, "ckpt", found=False) == "none"
    with pytest.warns(UserWarning, match="restarts its local state from the anchor"):
        assert checkpoint.agree(None, "ckpt") == "restart"
    with pytest.raises(ValueError, match="saved with 2 processes"):
        checkpoint.agree([{"world_size": 2}], "ckpt")


def test_a_local_state_of_another_layout_is_refused():
    model = _model()
    opt = _sgd(model)
    _steps(model, opt)
    local = opt.local_state_dict()
    local["stage"] = 2  # written by 0.1's DeepSpeed adapter at ZeRO-2
    with pytest.raises(ValueError, match="layout deepspeed-zero2 .* plain"):
        opt.load_local_state_dict(local)


# -------------------------------------------------------------------------------- registry
def test_registry_records_say_what_each_entry_can_do():
    for name in list_optimizers():
        info = get_optimizer_info(name)
        assert info.family in ("sgd", "adam")
        if not info.extrapolates:
            assert info.variant is None and not info.needs_closure
            continue
        assert info.variant.name in VARIANTS
        variant = info.defaults.get("extrapolation", "past")
        assert info.needs_closure == (variant == "fresh")
        assert info.variant.noise == (variant in ("gaussian", "uniform"))
    assert get_optimizer_info("extrap_sgd_filterwise").variant.deepspeed == ("zero0", "zero1",
                                                                              "zero2")
    assert get_optimizer_info("extrap_adam").family == "adam"
    assert not get_optimizer_info("extrap_sgd_fresh").variant.ddp


def test_no_module_outside_optim_writes_an_optimizer_attribute():
    """Backends bind (``optimizer.bind``); they never set the optimizer's attributes."""
    import ast
    import pathlib

    root = pathlib.Path(extrap_accel.__file__).parent
    offenders = []
    names = ("opt", "optimizer", "self.optimizer", "base", "self._extrap", "self.extrap")
    for path in root.rglob("*.py"):
        if path.parent.name == "optim":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Assign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if isinstance(target, ast.Attribute) and ast.unparse(target.value) in names:
                        offenders.append(f"{path.name}:{node.lineno}: {ast.unparse(target)}")
    assert offenders == []


def test_the_package_has_no_import_cycle():
    """Module-level imports inside extrap_accel point one way (lazy imports are allowed)."""
    import ast
    import pathlib

    root = pathlib.Path(extrap_accel.__file__).parent
    graph = {}
    for path in root.rglob("*.py"):
        module = ".".join(path.relative_to(root.parent).with_suffix("").parts)
        module = module.removesuffix(".__init__")
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        deps = set()
        for node in ast.parse(path.read_text()).body:  # top level only
            if isinstance(node, ast.ImportFrom) and node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                if node.module:
                    deps.add(f"{base}.{node.module}")
                else:  # from . import a, b: the submodules a and b
                    deps.update(f"{base}.{alias.name}" for alias in node.names)
        graph[module] = {d for d in deps if d != module}

    def reaches(start, goal, seen=()):
        return any(d == goal or (d not in seen and reaches(d, goal, (*seen, d)))
                   for d in graph.get(start, ()))  # fmt: skip

    assert "extrap_accel.attach" in graph and graph["extrap_accel.integrations.deepspeed"]
    cycles = [m for m in graph if reaches(m, m)]
    assert cycles == []


@pytest.mark.parametrize("name", ["extrap_sgd", "extrap_adam", "extrap_sgd_stochastic"])
def test_fused_step_and_the_shared_direction_function_agree(name):
    """The optimizer's fused `past` kernel and `place_direction_` (what DeepSpeed and the
    simulator use) give the same x̃ and anchors: one process vs one virtual worker."""
    kwargs = {"lr": 0.05, "weight_decay": 1e-3}
    if name != "extrap_adam":
        kwargs.update(momentum=0.9, nesterov=True)
    a, b = _model(), _model()
    opt_a = extrap_accel.create_optimizer(name, a.parameters(), **kwargs)
    opt_b = extrap_accel.create_optimizer(name, b.parameters(), **kwargs)
    workers = extrap_accel.VirtualWorkers(b, opt_b, num_workers=1)
    g = torch.Generator().manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stochastic with K = 1
        for _ in range(4):
            x = torch.randn(8, 6, generator=g)
            opt_a.zero_grad()
            a(x).square().mean().backward()
            opt_a.step()
            workers.step(lambda k: b(x).square().mean())
    for i, (p, q) in enumerate(zip(a.parameters(), b.parameters())):
        torch.testing.assert_close(opt_a.anchor(p), q.detach(), rtol=0, atol=1e-6)
        torch.testing.assert_close(p.detach(), workers.points[0][i], rtol=0, atol=1e-6)


# ------------------------------------------------------------- found by the review of 0.2
def test_inside_at_anchor_the_state_dicts_still_hold_x_tilde_and_mode_changes_are_refused():
    model = _model()
    opt = _sgd(model)
    _steps(model, opt)
    points = [opt.extrapolated(p).clone() for p in model.parameters()]
    with opt.at_anchor():
        sd, local = opt.state_dict(), opt.local_state_dict()
        with pytest.raises(RuntimeError, match="inside at_anchor"):
            opt.eval()
    for i, (p, point) in enumerate(zip(model.parameters(), points)):
        assert torch.equal(p.detach(), point)
        assert torch.equal(sd["state"][i]["extrapolated"], point)
        assert torch.equal(local["state"][i]["extrapolated"], point)
        assert not torch.equal(sd["state"][i]["anchor"], point)


def test_parameters_added_after_attach_are_saved_and_loaded_as_the_anchor():
    model = _model()
    opt = ExtrapSGD(model[0].parameters(), lr=0.1, momentum=0.9)
    extrap_accel.attach(model, opt)
    opt.add_param_group({"params": list(model[2].parameters())})  # progressive unfreezing
    _steps(model, opt)
    w = model[2].weight
    assert not torch.equal(w.detach(), opt.anchor(w))
    assert torch.equal(model.state_dict()["2.weight"], opt.anchor(w))
    model.load_state_dict({**model.state_dict(), "2.weight": torch.zeros_like(w)})
    assert torch.equal(opt.anchor(w), torch.zeros_like(w))


def test_a_deep_copy_of_an_attached_model_is_not_attached():
    model = _model()
    opt = _sgd(model)
    extrap_accel.attach(model, opt)
    _steps(model, opt)
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.fill_(0.5)
        x = torch.randn(3, 6)
        plain = _model()
        plain.load_state_dict({k: torch.full_like(v, 0.5) for k, v in plain.state_dict().items()})
        assert torch.equal(ema(x), plain(x))  # its own weights, not the optimizer's anchors
    assert all(torch.equal(v, torch.full_like(v, 0.5)) for v in ema.state_dict().values())
    opt2 = _sgd(ema)
    extrap_accel.attach(ema, opt2)  # and it can be attached to an optimizer of its own
    assert torch.equal(model.state_dict()["0.weight"], opt.anchor(model[0].weight))


@pytest.mark.parametrize("cls", [ExtrapSGD, ExtrapAdam])
def test_torch_distributed_checkpoint_state_dicts_round_trip_and_its_dummy_step_changes_nothing(cls):
    """DCP's get/set_optimizer_state_dict (as DDP users save with it): its state-creating dummy
    step (zero gradients at lr 0) changes nothing, not even Adam's counters, and the state dict
    it keeps (state and param_groups, no 'extrap' entry) loads and continues exactly."""
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    kwargs = {"lr": 1e-2, "weight_decay": 0.1} | ({"momentum": 0.9} if cls is ExtrapSGD else {})
    a, b = _model(), _model()
    opt_a, opt_b = cls(a.parameters(), **kwargs), cls(b.parameters(), **kwargs)
    get_optimizer_state_dict(b, opt_b)  # on an optimizer without state: the dummy step
    _steps(a, opt_a, n=3)
    _steps(b, opt_b, n=3)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q) and torch.equal(opt_a.anchor(p), opt_b.anchor(q))
    saved = copy.deepcopy(get_optimizer_state_dict(a, opt_a))
    assert "extrap" not in saved
    c = _model(seed=1)
    opt_c = cls(c.parameters(), **kwargs)
    c.load_state_dict(a.state_dict())
    set_optimizer_state_dict(c, opt_c, saved)
    _steps(a, opt_a, n=2, seed=5)
    _steps(c, opt_c, n=2, seed=5)
    for p, q in zip(a.parameters(), c.parameters()):
        assert torch.equal(p, q) and torch.equal(opt_a.anchor(p), opt_c.anchor(q))


def test_lars_refuses_fsdp2_shards(tmp_path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        w = nn.Parameter(distribute_tensor(torch.zeros(4, 3), mesh, [Shard(0)]))
        with pytest.raises(NotImplementedError, match="LARS under FSDP2.*use LARS with DDP"):
            extrap_accel.LARS(ExtrapSGD([w], lr=0.1))
    finally:
        dist.destroy_process_group()
