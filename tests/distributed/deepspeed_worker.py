"""Every DeepSpeed check, run on each rank of one real launch over several engine configs.

    deepspeed --num_gpus 2 --no_local_rank tests/distributed/deepspeed_worker.py \
        --configs z0-fp32 z1-bf16 ... --out /tmp/results

Each configuration builds fresh engines in the same processes (the process group is shared).
Each rank writes ``<out>/deepspeed_<tag>_rank<r>.json``; tests/test_deepspeed.py asserts on it.
fp16 runs on the CPU through the switch in DESIGN.md (DeepSpeed's CPU accelerator refuses it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import extrap_accel  # noqa: E402

LR, MOMENTUM, WD = 0.05, 0.9, 1e-2
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if CUDA else torch.device("cpu")


def ds_config(stage: int, precision: str, threshold: int | None = 0) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
    }
    if stage == 3 and threshold is not None:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = threshold
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    if precision == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 10, "loss_scale_window": 1000,
                       "hysteresis": 1}
    return cfg


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def batch(rank: int, step: int, dtype):
    g = torch.Generator().manual_seed(10_000 * step + rank)
    return (torch.randn(4, 6, generator=g).to(DEVICE, dtype),
            torch.randn(4, 3, generator=g).to(DEVICE, dtype))


def gather(t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


def _after_construction(cls):
    """torch's optimizer, minus the zero-gradient step DeepSpeed's ZeRO-0 mixed-precision
    wrapper runs while it is built (extrap_accel does not count it either)."""

    class Baseline(cls):
        built = False

        def step(self, closure=None):
            return super().step(closure) if self.built else None

    return Baseline


def build(stage, precision, threshold=0, optimizer="extrap_sgd", seed=0, **kwargs):
    import deepspeed

    model = make_model(seed)
    if optimizer == "torch_sgd":
        opt = _after_construction(torch.optim.SGD)(
            model.parameters(), lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=WD)
    elif optimizer == "torch_adamw":
        opt = _after_construction(torch.optim.AdamW)(model.parameters(), lr=1e-2,
                                                     weight_decay=WD)
    elif optimizer == "extrap_adam":
        opt = extrap_accel.ExtrapAdam(model.parameters(), lr=1e-2, weight_decay=WD, **kwargs)
    else:
        kw = dict(lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=WD)
        kw.update(kwargs)
        opt = extrap_accel.ExtrapSGD(model.parameters(), **kw)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt,
                                      config=ds_config(stage, precision, threshold))
    opt.built = True
    adapter = None
    if isinstance(opt, extrap_accel.ExtrapOptimizer):
        adapter = extrap_accel.attach(engine, opt)
    return engine, opt, adapter


def train_step(engine, rank, t, dtype, inf=False):
    x, y = batch(rank, t, dtype)
    loss = nn.functional.mse_loss(engine(x), y)
    if inf:
        loss = loss * float("inf")
    engine.backward(loss)
    engine.step()
    return float(loss)


def fp32_anchor(p, adapter=None):
    """The whole anchor in fp32: DeepSpeed's master, else the optimizer's or adapter's copy."""
    from deepspeed.utils import safe_get_full_fp32_param

    if adapter is not None and adapter.direct:
        return adapter.anchor(p).float().clone()
    full = safe_get_full_fp32_param(p)
    if full is None:  # ZeRO-0 bf16 keeps no hp mapping: the adapter's bit16 copy of it
        full = adapter.anchor(p) if adapter is not None else p.data
    return full.detach().float().clone()


def ulp(t: torch.Tensor) -> torch.Tensor:
    """Spacing of the bit16 (or fp32) grid at |t|."""
    finfo = torch.finfo(t.dtype)
    mant = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[t.dtype]
    e = torch.floor(torch.log2(t.float().abs().clamp_min(finfo.tiny)))
    return torch.exp2(e - mant)


def extra_bytes_per_param(engine, opt, adapter) -> float:
    """Bytes this rank holds for extrapolation, per model parameter (not counting the base
    optimizer's own state): anchor copies, local moments and the captured local gradient."""
    numel = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    tensors = [opt.anchor(p) for p in opt.managed_params() if opt.core.is_displaced(p)]
    tensors += [v for p in opt.managed_params() for v in adapter.local_state(p).values()
                if torch.is_tensor(v)]  # fmt: skip
    nbytes = sum(t.numel() * t.element_size() for t in tensors) + opt.local_grad_nbytes()
    return nbytes / numel


def check_extrapolation(stage, precision, threshold, results, steps=4, overflow_at=None):
    """I4 (x̃ differs across ranks by −γ̃(d⁰−d¹), each d from its own gradients), I6, anchors."""
    rank, dtype = dist.get_rank(), DTYPES[precision]
    engine, opt, adapter = build(stage, precision, threshold)
    adapter.rounding_sample_every = 1  # count the rounding at every step
    params = list(engine.module.parameters())
    u = [None] * len(params)  # each rank's own float64 local momentum, for the expected x̃
    r = {k: [] for k in ("i4_err_ulps", "i6_err", "anchors_equal", "points_differ",
                         "mixed_point_consistent", "skipped", "unchanged_after_skip")}
    for t in range(steps):
        x, y = batch(rank, t, dtype)
        loss = nn.functional.mse_loss(engine(x), y)
        if overflow_at == t and rank == 0:
            loss = loss * float("inf")
        engine.backward(loss)
        from deepspeed.utils import safe_get_full_grad

        scale = float(getattr(engine.optimizer, "loss_scale", 1.0)) if precision == "fp16" else 1
        local = [opt.local_grad(p).double() / scale for p in params]
        averaged = [safe_get_full_grad(p) for p in params]
        before = ([adapter.point(p).clone() for p in params], [fp32_anchor(p, adapter) for p in params],
                  {p: {k: v.clone() for k, v in adapter.local_state(p).items()
                       if torch.is_tensor(v)} for p in params})
        engine.step()
        skipped = not engine.was_step_applied()
        r["skipped"].append(skipped)
        if skipped:
            r["unchanged_after_skip"].append(
                all(torch.equal(adapter.point(p), b) for p, b in zip(params, before[0]))
                and all(torch.equal(fp32_anchor(p, adapter), b) for p, b in zip(params, before[1]))
                and all(torch.equal(adapter.local_state(p)[k], v) for p, s in before[2].items()
                        for k, v in s.items()))
            continue
        if averaged[0] is not None and not math.isinf(scale):
            mean_local = [torch.stack(gather(g)).mean(0) for g in local]
            r["i6_err"].append(max(float((m - a.double() / scale).abs().max()
                                         / (a.double() / scale).abs().max().clamp_min(1e-12))
                                   for m, a in zip(mean_local, averaged)))  # relative
        # this rank's expected x̃ from its own gradients, around the anchor the adapter holds
        errs, own, differ = [], [], False
        for i, p in enumerate(params):
            anchor_t = adapter.anchor(p)
            anchor = anchor_t.double()
            g = adapter.local_slice(p, local[i]).view_as(anchor)
            h = g + WD * anchor
            u[i] = h.clone() if u[i] is None else MOMENTUM * u[i] + h
            expected = anchor - opt.extrap_lr(opt.param_groups[0]) * (h + MOMENTUM * u[i])
            point = adapter.point(p).double()
            tol = ulp(anchor_t).double() if dtype != torch.float32 else 1e-6
            err = point - expected.to(anchor_t.dtype).double()
            own.append(float((err.abs() / tol).max()) if err.numel() else 0.0)
            if not hasattr(p, "ds_tensor"):  # I4 across ranks (sharded ZeRO-3: a mixed point)
                diff = gather(err)
                errs.append(float(((diff[0] - diff[1]).abs() / tol).max()))
                pts = gather(point)
                differ |= not torch.equal(pts[0], pts[1])
        r["i4_err_ulps"].append(max(errs, default=0.0))
        r.setdefault("own_err_ulps", []).append(max(own))
        r["points_differ"].append(differ)
        r["anchors_equal"].append(all(torch.equal(*gather(fp32_anchor(p, adapter))) for p in params))
        if stage == 3:  # all ranks compute at one mixed point: each shard from its owner
            import deepspeed

            with deepspeed.zero.GatheredParameters(params):
                full = [p.data.clone() for p in params]
            ok = True
            for p, f in zip(params, full):
                same = gather(f)
                ok &= torch.equal(same[0], same[1])
                n = p.ds_tensor.ds_numel
                mine = adapter.point(p).reshape(-1)
                owner = gather(nn.functional.pad(mine, (0, n - mine.numel())))
                for k, shard in enumerate(owner):
                    m = max(0, min(n, f.numel() - k * n))
                    ok &= torch.equal(f.view(-1)[k * n: k * n + m], shard[:m])
            r["mixed_point_consistent"].append(ok)
    r["rounded_to_zero_fraction"] = adapter.rounded_to_zero_fraction
    r["extra_bytes_per_param"] = extra_bytes_per_param(engine, opt, adapter)
    results["extrapolation"] = r
    return engine, opt, adapter


def persistent_is_mixed_point(engine) -> bool:
    """ZeRO-3: the full copies DeepSpeed keeps of persistent parameters (what the forward reads)
    equal the gathered shards (what a re-gather in backward reads). True below ZeRO-3."""
    ok = True
    for p in engine.module.parameters():
        if getattr(p, "ds_persist", False):
            full = torch.cat(gather(p.ds_tensor.view(-1)))[: p.ds_numel].view(p.ds_shape)
            ok &= p.data.shape == p.ds_shape and torch.equal(p.data, full)
    return bool(ok)


def check_i3(stage, precision, threshold, results):
    """I3: a training step issues the same collectives, moving the same number of elements,
    as DeepSpeed with torch's SGD (gloo events under the profiler), after 2 warm-up steps
    (ZeRO-3 traces its first iteration)."""
    from extrap_accel.diagnostics import count_collectives

    rank, dtype = dist.get_rank(), DTYPES[precision]
    counts = {}
    for name in ("torch_sgd", "extrap_sgd"):
        engine = build(stage, precision, threshold, name)[0]
        for t in range(2):
            train_step(engine, rank, t, dtype)
        counts[name] = count_collectives(lambda: train_step(engine, rank, 2, dtype))
    results["i3"] = counts


def check_no_grad_forward_changes_nothing(stage, precision, threshold, results):
    """A no-grad forward (at the anchor) between the micro-steps of gradient accumulation, or
    between steps, leaves training exactly as without it: ZeRO-3 keeps parameters gathered
    between uses, and none may keep the anchor (or x̃) after the swap back."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    rank, dtype = dist.get_rank(), DTYPES[precision]

    def run(evaluate: bool):
        model = make_model()
        opt = extrap_accel.ExtrapSGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        cfg = dict(ds_config(stage, precision, threshold), gradient_accumulation_steps=2)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        adapter = extrap_accel.attach(engine, opt)
        for t in range(4):
            for micro in range(2):
                x, y = batch(rank, 10 * t + micro, dtype)
                engine.backward(nn.functional.mse_loss(engine(x), y))
                engine.step()
                if evaluate:
                    with torch.no_grad():
                        engine(x)
        return ([adapter.point(p).clone() for p in engine.module.parameters()]
                + [fp32_anchor(p, adapter) for p in engine.module.parameters()])

    results["no_grad_forward_changes_nothing"] = all(
        torch.equal(a, b) for a, b in zip(run(False), run(True)))


class Branched(nn.Module):
    """make_model plus a branch that a forward may leave out (``use=False``) or use times 0."""

    def __init__(self):
        super().__init__()
        self.trunk = make_model()
        self.branch = nn.Linear(6, 3)

    def forward(self, x, use: bool | float = True):
        if use is False:
            return self.trunk(x)
        return self.trunk(x) + use * self.branch(x)


def check_unused_parameter_is_a_zero_gradient(stage, precision, threshold, results):
    """A parameter a rank's forward left out is updated by DeepSpeed as if its gradient were
    zero (flat partitions), so its local direction is the one of a zero gradient (weight decay
    and momentum still move it): a run whose forwards leave the branch out for three steps gives
    the same x̃, anchors and local state on every rank as a run that multiplies it by 0. (Ranks
    leaving out different parameters break DeepSpeed's own gradient reduction at ZeRO-1/2/3.)"""
    import deepspeed

    rank, dtype = dist.get_rank(), DTYPES[precision]

    def run(leave_out: bool):
        torch.manual_seed(0)
        model = Branched()
        opt = extrap_accel.ExtrapSGD(model.parameters(), lr=LR, momentum=MOMENTUM,
                                     nesterov=True, weight_decay=0.5)  # δ above bf16's ulp
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt,
                                          config=ds_config(stage, precision, threshold))
        adapter = extrap_accel.attach(engine, opt)
        for t in range(5):
            x, y = batch(rank, t, dtype)
            use = True if t >= 3 else (False if leave_out else 0.0)
            engine.backward(nn.functional.mse_loss(engine(x, use), y))
            engine.step()
            if t == 1:
                branch = list(engine.module.branch.parameters())
                moved = any(not torch.equal(adapter.point(p), adapter.anchor(p)) for p in branch)
        params = list(engine.module.parameters())
        return moved, ([adapter.point(p).clone() for p in params]
                       + [fp32_anchor(p, adapter) for p in params]
                       + [v for p in params for v in adapter.local_state(p).values()
                          if torch.is_tensor(v)])

    moved, zero = run(False)
    moved_left_out, left_out = run(True)
    results["unused_parameter"] = {
        "same_as_zero_gradient": len(zero) == len(left_out)
        and all(torch.equal(a, b) for a, b in zip(zero, left_out)),
        "branch_displaced_while_unused": moved_left_out and moved,
    }


def check_param_groups_and_frozen(stage, precision, threshold, results):
    """Param groups with their own rates, one of them empty (DeepSpeed drops it), and a frozen
    bias: the empty group changes nothing, and the frozen bias never moves (no master holds it,
    so a displacement would stay and pile up)."""
    rank, dtype = dist.get_rank(), DTYPES[precision]

    def run(empty_group: bool):
        model = make_model()
        model[0].bias.requires_grad_(False)
        frozen = model[0].bias.detach().clone()
        groups = [{"params": [model[0].weight, model[0].bias]},
                  {"params": [model[2].weight, model[2].bias], "lr": 4 * LR}]
        opt = extrap_accel.ExtrapSGD([{"params": []}] * empty_group + groups, lr=LR,
                                     momentum=MOMENTUM, weight_decay=0.5)
        engine, *_ = __import__("deepspeed").initialize(
            model=model, optimizer=opt, config=ds_config(stage, precision, threshold))
        adapter = extrap_accel.attach(engine, opt)
        for t in range(3):
            train_step(engine, rank, t, dtype)
        bias = engine.module[0].bias
        if stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([bias]):
                weights = bias.data.clone()
        else:
            weights = bias.data.clone()
        params = [p for p in engine.module.parameters() if p.requires_grad]
        return (torch.equal(weights, frozen.to(weights)),
                [adapter.point(p).clone() for p in params]
                + [fp32_anchor(p, adapter) for p in params])

    frozen_kept, plain = run(False)
    frozen_kept_too, with_empty = run(True)
    results["groups"] = {
        "frozen_unchanged": frozen_kept and frozen_kept_too,
        "empty_group_changes_nothing": all(torch.equal(a, b) for a, b in zip(plain, with_empty)),
    }


def check_initial_noise(stage, precision, threshold, results):
    """No variant perturbs at t = 0: before the first step the weights hold rank 0's x₀ (which
    DeepSpeed broadcast) on every rank, and the anchor is x₀ — also for an optimizer built
    before the process group existed (simulated here; the ranks initialize differently). After
    the first step each rank holds its own noise around the common anchor."""
    import deepspeed

    from extrap_accel import _dist

    rank, dtype = dist.get_rank(), DTYPES[precision]
    out = {}
    for case in ("after_process_group", "before_process_group"):
        model = make_model(seed=rank)  # DeepSpeed broadcasts rank 0's weights
        x0 = [gather(p.detach())[0] for p in model.parameters()]
        real = _dist.is_initialized
        if case == "before_process_group":
            _dist.is_initialized = lambda: False
        try:
            opt = extrap_accel.ExtrapSGD(model.parameters(), lr=LR, momentum=MOMENTUM,
                                         extrapolation="gaussian", noise_scale=0.05)
        finally:
            _dist.is_initialized = real
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt,
                                          config=ds_config(stage, precision, threshold))
        adapter = extrap_accel.attach(engine, opt)
        params = list(engine.module.parameters())
        anchors = [fp32_anchor(p, adapter) for p in params]
        at_t0 = all(torch.equal(adapter.point(p), adapter.anchor(p)) for p in params)
        mine = [a.reshape(-1) for a in anchors]
        anchor_is_x0 = all(torch.equal(a, x.to(dtype).float().view_as(a))
                           for a, x in zip(mine, [x.reshape(-1) for x in x0]))  # fmt: skip
        train_step(engine, rank, 0, dtype)
        points = [adapter.point(p).float() for p in params]
        displaced = [not torch.equal(pt, adapter.anchor(p).float())
                     for pt, p in zip(points, params) if pt.numel()]  # fmt: skip
        out[case] = {
            "anchor_is_x0": anchor_is_x0, "x0_at_t0": at_t0, "displaced": all(displaced),
            "ranks_differ": stage == 3 or any(not torch.equal(*gather(pt)) for pt in points),
        }  # fmt: skip
    results["initial_noise"] = out


def check_i1(stage, precision, threshold, results, adam=False):
    """extrap_scale = 0 equals DeepSpeed with torch's optimizer, bit for bit."""
    rank, dtype = dist.get_rank(), DTYPES[precision]
    ours, opt, adapter = build(stage, precision, threshold,
                               "extrap_adam" if adam else "extrap_sgd", extrap_scale=0.0)
    theirs = build(stage, precision, threshold, "torch_adamw" if adam else "torch_sgd")[0]
    for t in range(4):
        train_step(ours, rank, t, dtype)
        train_step(theirs, rank, t, dtype)
    a = [fp32_anchor(p) for p in ours.module.parameters()]
    b = [fp32_anchor(p) for p in theirs.module.parameters()]
    results["i1_adam" if adam else "i1_sgd"] = all(torch.equal(x, y) for x, y in zip(a, b))
    if adam:
        results["adam_extra_bytes_per_param"] = extra_bytes_per_param(ours, opt, adapter)


def check_saving_and_resume(stage, precision, threshold, results, tmp):
    rank, dtype = dist.get_rank(), DTYPES[precision]
    engine, opt, adapter = build(stage, precision, threshold)
    params = list(engine.module.parameters())
    for t in range(3):
        train_step(engine, rank, t, dtype)
    out = {}
    # what a user saves or evaluates is the anchor
    if stage < 3:
        sd = engine.module.state_dict()
        out["module_state_dict_is_anchor"] = all(
            torch.equal(sd[n], adapter.anchor(p))
            for n, p in engine.module.named_parameters())
    else:
        sd = engine._zero3_consolidated_16bit_state_dict()
        if rank == 0:
            out["consolidated_is_anchor"] = all(
                torch.equal(sd[n].float(), fp32_anchor(p, adapter).to(sd[n].dtype).float())
                for n, p in engine.module.named_parameters())
        else:
            [fp32_anchor(p, adapter) for p in params]  # collective: match rank 0
            out["consolidated_is_anchor"] = True
    x, _ = batch(rank, 99, dtype)
    plain = make_model().to(DEVICE, dtype)
    plain.load_state_dict({n: fp32_anchor(p, adapter).to(dtype).view(dict(plain.named_parameters())[n]
                                                              .shape)
                           for n, p in engine.module.named_parameters()})
    with torch.no_grad():
        evaluated = engine(x)
    out["no_grad_forward_is_anchor"] = bool(torch.allclose(evaluated.float(), plain(x).float(),
                                                           rtol=0, atol=0))
    persistent_ok = [persistent_is_mixed_point(engine)]  # after the swaps of a no-grad forward
    points = [adapter.point(p).clone() for p in params]
    out["weights_still_extrapolated"] = any(
        not torch.equal(pt, adapter.anchor(p)) for pt, p in zip(points, params))
    # save, continue, and compare with a fresh engine resumed from the checkpoint
    ckpt = os.path.join(tmp, f"ckpt_{stage}_{precision}_{threshold}")
    engine.save_checkpoint(ckpt, tag="t3")
    out["local_file"] = os.path.exists(os.path.join(ckpt, "t3", f"extrap_accel_rank{rank}.pt"))
    out["unchanged_by_save"] = all(torch.equal(adapter.point(p), pt)
                                   for p, pt in zip(params, points))
    persistent_ok.append(persistent_is_mixed_point(engine))  # after save_checkpoint

    def trace(engine, adapter):
        rows = []
        for t in range(3, 6):
            train_step(engine, rank, t, dtype)
            ps = list(engine.module.parameters())
            rows.append([adapter.point(p).clone() for p in ps]
                        + [fp32_anchor(p, adapter) for p in ps])
        return rows

    # a load that finds no checkpoint changes nothing (DeepSpeed returns (None, None))
    engine.load_checkpoint(os.path.join(tmp, "no_checkpoint_here"))
    expected = trace(engine, adapter)
    engine2, opt2, adapter2 = build(stage, precision, threshold, seed=7)
    engine2.load_checkpoint(ckpt, tag="t3")
    persistent_ok.append(persistent_is_mixed_point(engine2))  # after load_checkpoint
    out["persistent_is_mixed_point"] = persistent_ok
    got = trace(engine2, adapter2)
    out["resume_bit_identical"] = all(torch.equal(a, b) for e, g in zip(expected, got)
                                      for a, b in zip(e, g))
    out["resume_mismatches"] = [(t, j) for t, (e, g) in enumerate(zip(expected, got))
                                for j, (a, b) in enumerate(zip(e, g)) if not torch.equal(a, b)]
    out["incomplete_local_state"] = check_incomplete_local_state(stage, precision, threshold,
                                                                 ckpt)  # fmt: skip
    # weights only: no saved x̃ on top of whatever anchor the load leaves (ZeRO-3: the fresh one)
    engine3, _, adapter3 = build(stage, precision, threshold, seed=7)
    engine3.load_checkpoint(ckpt, tag="t3", load_module_only=True)
    out["module_only_load_at_anchor"] = all(
        torch.equal(adapter3.point(p), adapter3.anchor(p)) for p in engine3.module.parameters())
    # ... the noise variants too: they start again at x̃ = x (noise follows the next step)
    for flag in ("load_module_only", "load_optimizer_states"):
        engine4, _, adapter4 = build(stage, precision, threshold, seed=7,
                                     extrapolation="gaussian", noise_scale=0.05)
        engine4.load_checkpoint(ckpt, tag="t3", **{flag: flag == "load_module_only"})
        out[f"noise_after_{flag}"] = all(
            torch.equal(adapter4.point(p), adapter4.anchor(p))
            for p in engine4.module.parameters())
    results["saving"] = out


def check_incomplete_local_state(stage, precision, threshold, ckpt) -> dict:
    """engine.load_checkpoint of a copy of ``ckpt`` whose per-rank files are incomplete: one
    rank's missing or saved by 4 processes raises on every rank; none at all (a checkpoint
    saved without extrap_accel, or a universal one) warns and starts from the anchor."""
    import shutil
    import warnings

    rank = dist.get_rank()
    out = {}
    cases = ["rank1_file_missing", "other_world_size", "no_files"]
    if stage < 3:  # ZeRO-3: DeepSpeed's own load gathers, so a rank without the checkpoint
        cases.append("rank1_finds_nothing")  # leaves the others waiting in it (upstream)
    for case in cases:
        copy = f"{ckpt}_{case}"
        if rank == 0:
            shutil.rmtree(copy, ignore_errors=True)  # a retried launch reuses it
            shutil.copytree(ckpt, copy)
            for r in range(dist.get_world_size()):
                path = os.path.join(copy, "t3", f"extrap_accel_rank{r}.pt")
                if case == "other_world_size":
                    saved = torch.load(path, weights_only=True)
                    saved["optimizers"][0]["world_size"] = 4
                    torch.save(saved, path)
                elif case == "no_files" or case == "rank1_file_missing" and r == 1:
                    os.remove(path)
        dist.barrier()
        engine, _, adapter = build(stage, precision, threshold, seed=7)
        tag = "t3"
        if case == "rank1_finds_nothing":  # no `latest` on rank 1: DeepSpeed returns None there
            tag = None
            copy += "_not_copied_to_this_node" if rank == 1 else ""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                engine.load_checkpoint(copy, tag=tag)
                params = list(engine.module.parameters())
                out[case] = {"warned": any("no per-rank extrapolation state" in str(w.message)
                                           for w in caught),
                             "at_anchor": all(torch.equal(adapter.point(p), adapter.anchor(p))
                                              for p in params)}  # fmt: skip
            except ValueError as e:
                out[case] = str(e)
        dist.barrier()
    return out


def check_config_named_optimizer(results):
    from extrap_accel.integrations.deepspeed import initialize

    cfg = ds_config(1, "bf16")
    cfg["optimizer"] = {"type": "ExtrapSGD", "params": {"lr": LR, "momentum": MOMENTUM}}
    engine, optimizer, *_ = initialize(model=make_model(), config=cfg)
    results["config_named"] = {
        "type": type(engine._extrap_accel_adapter.optimizer).__name__,
        "lr": engine._extrap_accel_adapter.optimizer.param_groups[0]["lr"],
    }
    cfg["optimizer"] = {"type": "NoSuchOptimizer", "params": {"lr": 0.1}}
    try:
        initialize(model=make_model(), config=cfg)
        results["config_unknown_error"] = ""
    except ValueError as e:
        results["config_unknown_error"] = str(e)


def check_construction_and_unattached(results):
    """ZeRO-0 mixed precision steps the client optimizer once with zero gradients while it is
    built: no step may count. Without attach, stepping DeepSpeed's fp32 copies is refused."""
    import deepspeed

    engine, opt, _ = build(0, "bf16", 0, "extrap_adam")
    results["steps_after_construction"] = [float(s["step"]) for s in opt.state.values()
                                           if "step" in s]
    model = make_model()
    opt = extrap_accel.ExtrapSGD(model.parameters(), lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(1, "fp32"))
    try:
        train_step(engine, dist.get_rank(), 0, torch.float32)
        results["unattached_error"] = ""
    except RuntimeError as e:
        results["unattached_error"] = str(e)


def check_refusals(results):
    out = {}
    for name, kwargs in (("z0_fp16", dict(stage=0, precision="fp16")),
                         ("z2_stochastic", dict(stage=2, precision="bf16",
                                                extrapolation="stochastic")),
                         ("z0_bf16_stochastic", dict(stage=0, precision="bf16",
                                                     extrapolation="stochastic")),
                         ("z3_filterwise", dict(stage=3, precision="bf16",
                                                extrapolation="uniform", filterwise=True,
                                                noise_scale=1e-3)),
                         ("fresh", dict(stage=1, precision="fp32", extrapolation="fresh"))):
        try:
            build(**kwargs)
            out[name] = ""
        except (NotImplementedError, ValueError) as e:
            out[name] = str(e)
    engine, opt, _ = build(stage=1, precision="bf16")
    for name, wrapped in (("lars_engine_optimizer", engine.optimizer), ("lars_optimizer", opt)):
        try:
            extrap_accel.LARS(wrapped)
            out[name] = ""
        except NotImplementedError as e:
            out[name] = str(e)
    results["refusals"] = out


def run_config(tag: str, results: dict, tmp: str) -> None:
    stage_s, precision, *rest = tag.split("-")
    stage = int(stage_s[1:])
    threshold = None if rest == ["default"] else 0
    results["stage"], results["precision"] = stage, precision
    overflow_at = 2 if precision == "fp16" else None
    check_extrapolation(stage, precision, threshold, results, steps=5 if overflow_at else 4,
                        overflow_at=overflow_at)
    check_i3(stage, precision, threshold, results)
    check_no_grad_forward_changes_nothing(stage, precision, threshold, results)
    if not (stage == 0 and precision == "fp32"):  # there torch's SGD steps: None is skipped
        check_unused_parameter_is_a_zero_gradient(stage, precision, threshold, results)
    check_param_groups_and_frozen(stage, precision, threshold, results)
    check_initial_noise(stage, precision, threshold, results)
    if precision != "fp16":
        check_i1(stage, precision, threshold, results)
        if stage in (0, 2):
            check_i1(stage, precision, threshold, results, adam=True)
    check_saving_and_resume(stage, precision, threshold, results, tmp)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", nargs="+", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if not CUDA:
        get_accelerator().is_fp16_supported = lambda: True  # DeepSpeed's fp16 paths on CPU
    deepspeed.init_distributed(dist_backend="nccl" if CUDA else "gloo")
    rank = dist.get_rank()
    tmp = [tempfile.mkdtemp(prefix="extrap_ds_")]
    dist.broadcast_object_list(tmp, src=0)
    os.makedirs(args.out, exist_ok=True)
    for tag in args.configs:
        results: dict = {}
        try:
            if tag == "extras":
                check_config_named_optimizer(results)
                check_refusals(results)
                check_construction_and_unattached(results)
            else:
                run_config(tag, results, tmp[0])
        except Exception:
            results["error"] = traceback.format_exc()
        with open(os.path.join(args.out, f"deepspeed_{tag}_rank{rank}.json"), "w") as f:
            json.dump(results, f, indent=1)
        dist.barrier()


if __name__ == "__main__":
    main()
