"""GPU proof in one command: correctness of every CUDA path, then overhead ratios.

On a machine with one NVIDIA GPU (the lent H100 image: Python 3.12, torch 2.11, accelerate 1.15,
transformers 5.17, no deepspeed; the wheels come from benchmarks/device_wheels.sh)::

    bash benchmarks/device_wheels.sh            # here, once: .device_wheels/ (gitignored)
    # there, from the repository root, with .device_wheels carried:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .device_wheels/*.whl \
        && PYTHONPATH=.:/tmp/site python3 benchmarks/gpu_check.py --output_dir $OUT

at most 4 minutes. ``--device cpu --tiny`` runs the same code paths on a CPU in under a minute
(tests/test_gpu_check.py runs it): one DeepSpeed configuration, small sizes, and only the
CUDA-only things (torch.cuda memory statistics) skipped, each with its reason in the output.

Sections, in order, each in its own forked process with its own time box (a section that runs
out of time is killed and reported; the next one starts):

* ``optimizers`` — ExtrapSGD / ExtrapAdam, foreach and per-tensor, fp32 and bf16 parameters,
  against the float64 oracle (tests/reference.py); I1: ``extrap_scale=0`` bit for bit against
  ``torch.optim.SGD`` / ``AdamW`` with ``foreach=True``; against ``fused=True`` (a different
  kernel, which rounds differently) within the dtype's tolerance, the bitwise result reported.
* ``amp`` — a bf16-autocast and an fp16-GradScaler loop through ``extrap_accel.prepare`` (one
  process, accelerate ``mixed_precision``) against the oracle fed with the captured unscaled
  gradients; an injected overflow (loss × inf) must skip the step and change nothing.
* ``deepspeed`` — one process at ZeRO-0..3 in bf16 and fp16 (ZeRO-0 fp16 must be refused:
  upstream bug): the saved module is the anchor, a no-grad forward runs at the anchor, the
  per-rank file exists, a resume from ``save_checkpoint`` is bit-identical; fp16 overflow skip.
* ``fsdp2`` — ``fully_shard`` on one device: I1 bit for bit, x̃ and anchor against the oracle,
  the full state dict is the anchor.
* ``two_process`` — two processes on the one device over gloo (CUDA tensors on a GPU), DDP:
  x̃ and anchors against the K = 2 oracle fed with each rank's captured gradient, I4
  (x̃⁰ − x̃¹ = −γ̃(d⁰ − d¹)), equal anchors, I3 (gloo calls equal DDP + torch SGD's).
* ``performance`` (reports only, never fails the run) — optimizer step on the 24 M
  Transformer-shaped and the 0.27 M ResNet-20 parameter sets against torch foreach and fused
  SGD / AdamW; one training step of the translation recipe's model and of ResNet-20 against
  the torch optimizer; extra peak memory per parameter (``torch.cuda.max_memory_allocated``).

Output in ``--output_dir``: ``gpu_check.json`` and ``gpu_check.md``, rewritten after every
section (``gpu_check_partial.json`` holds the section in progress), so a run cut off still
returns what it measured. Exit status 1 if any correctness check failed (or a correctness
section crashed or ran out of time), else 0; ``--inject_fault`` makes one I1 check fail on
purpose (the test of the exit status).
"""

from __future__ import annotations

import os

# Ask NVML, not the CUDA driver, whether a GPU exists: the orchestrator forks the sections and
# must not initialise CUDA itself (a forked child cannot use a driver its parent initialised).
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

import argparse
import contextlib
import json
import math
import multiprocessing
import platform
import socket
import statistics
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (REPO, os.path.join(REPO, "tests"), os.path.join(REPO, "tests", "distributed"),
              os.path.join(REPO, "benchmarks"), os.path.join(REPO, "recipes")):  # fmt: skip
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch
from reference import ReferenceExtrapAdam, ReferenceExtrapSGD
from torch import nn

import extrap_accel

SGD_KW = {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2}
ADAM_KW = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 1e-2}
# max |ours − float64 oracle| relative to max |x|, after the steps below: about 100 roundings
# of the dtype (each step rounds a handful of times; the quadratic problem contracts errors)
TOL = {torch.float32: 1e-5, torch.bfloat16: 0.1}


# ----------------------------------------------------------------------------- recording
class Recorder:
    """The checks and measurements of one section, written to ``path`` after every record."""

    def __init__(self, name: str, path: str, config: dict):
        self.path, self.config = path, config
        self.data = {"section": name, "checks": [], "measurements": [], "skipped": []}
        self.device = torch.device(config["device"])
        self.tiny = config["tiny"]

    def _flush(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.data["checks"].append({"name": name, "ok": bool(ok), "detail": detail})
        self._flush()
        return bool(ok)

    def measure(self, name: str, **values) -> None:
        self.data["measurements"].append({"name": name, **values})
        self._flush()

    def skip(self, what: str, reason: str) -> None:
        self.data["skipped"].append({"what": what, "reason": reason})
        self._flush()

    def attempt(self, name: str, fn, *args, **kwargs):
        """Run one sub-check; an exception fails it (recorded with the error) and goes on."""
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 -- a crash is a failed check, not the end
            self.check(name, False, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}")
            return None


def cuda(rec: Recorder) -> bool:
    return rec.device.type == "cuda"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rel_err(a, b) -> float:
    """max |a − b| / max(1, max |b|) over lists of tensors, in float64 on the CPU."""
    num = max(float((x.detach().double().cpu() - y.double().cpu()).abs().max())
              for x, y in zip(a, b))  # fmt: skip
    den = max(1.0, max(float(y.double().abs().max()) for y in b))
    return num / den


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single_process_group(device: torch.device) -> None:
    """A process group of one (DeepSpeed and FSDP2 need one): NCCL on a GPU, gloo on a CPU."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")  # fmt: skip
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo",
                            rank=0, world_size=1)  # fmt: skip


# ----------------------------------------------------------------------------- optimizers
SHAPES = [(64, 32), (32,), (16, 3, 3, 3), (7,)]


def quadratic(device, seed=0):
    """Per element f = ½·a·x² − b·x (a > 0): gradient a·x − b; x₀; all float64."""
    g = torch.Generator().manual_seed(seed)
    a = [torch.rand(s, generator=g, dtype=torch.float64) + 0.5 for s in SHAPES]
    b = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
    x0 = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
    grad = [lambda x, a=a_, b=b_: a.to(x.device) * x.double() - b.to(x.device)
            for a_, b_ in zip(a, b)]  # fmt: skip
    return x0, grad


def run_ours(make, dtype, device, steps, grad, x0):
    """Our optimizer on the quadratic: the parameters (x̃) and anchors after ``steps`` steps."""
    params = [nn.Parameter(x.to(device, dtype, copy=True)) for x in x0]
    opt = make(params)
    for _ in range(steps):
        for p, gf in zip(params, grad):
            p.grad = gf(p.detach()).to(dtype)
        opt.step()
    anchors = [opt.anchor(p).clone() for p in params] if hasattr(opt, "anchor") else None
    return [p.detach().clone() for p in params], anchors


def run_oracle(ref, steps, grad):
    for _ in range(steps):
        ref.step([[gf(x) for gf, x in zip(grad, ref.points(0))]])
    return ref.points(0), ref.anchor


def section_optimizers(rec: Recorder) -> None:
    device, steps = rec.device, 10
    x0, grad = quadratic(device)
    families = {
        "ExtrapSGD": (lambda ps, fe, **kw: extrap_accel.ExtrapSGD(ps, foreach=fe, **SGD_KW, **kw),
                      lambda: ReferenceExtrapSGD(x0, **SGD_KW)),
        "ExtrapAdam": (lambda ps, fe, **kw: extrap_accel.ExtrapAdam(ps, foreach=fe, **ADAM_KW,
                                                                    **kw),
                       lambda: ReferenceExtrapAdam(x0, **ADAM_KW)),
    }  # fmt: skip
    for family, (make, make_ref) in families.items():
        ref = run_oracle(make_ref(), steps, grad)
        for dtype in (torch.float32, torch.bfloat16):
            runs = {}
            for foreach in (True, False):
                name = f"{family} {str(dtype)[6:]} foreach={foreach} vs float64 oracle"
                runs[foreach] = rec.attempt(name, check_against_oracle, rec, name,
                                            lambda ps, fe=foreach, mk=make: mk(ps, fe,
                                                                               world_size=1),
                                            dtype, ref, steps, grad, x0)  # fmt: skip
            if all(r is not None for r in runs.values()):
                diff = rel_err(runs[True], runs[False])
                rec.check(
                    f"{family} {str(dtype)[6:]} foreach vs per-tensor",
                    diff <= TOL[dtype],
                    f"max rel diff {diff:.2e} (bitwise {diff == 0})",
                )
    for dtype in (torch.float32, torch.bfloat16):
        rec.attempt(f"I1 {dtype}", check_i1, rec, dtype, x0, grad)


def check_against_oracle(rec: Recorder, name: str, make, dtype, ref, steps, grad, x0):
    """x̃ and anchor of ours after ``steps`` steps against the oracle's (points, anchors)."""
    pts, anchors = run_ours(make, dtype, rec.device, steps, grad, x0)
    err = max(rel_err(pts, ref[0]), rel_err(anchors, ref[1]))
    moved = rel_err(pts, anchors)
    rec.check(
        name,
        err <= TOL[dtype] and moved > 0,
        f"max rel err {err:.2e} (tol {TOL[dtype]:g}); x̃ − x {moved:.2e}",
    )
    return pts + anchors


def check_i1(rec: Recorder, dtype, x0, grad, steps=10):
    """extrap_scale=0 against torch.optim.SGD / AdamW: bit for bit against the same
    implementation (foreach / for-loop); torch's fused kernel, which ours does not mirror,
    compared with the float64 run of torch's optimizer (reported, not a check of ours)."""
    device, d = rec.device, str(dtype)[6:]
    scale = 1e-3 if rec.config["inject_fault"] else 0.0  # the fault: a nonzero γ̃
    pairs = {
        "SGD": (lambda ps, fe: extrap_accel.ExtrapSGD(ps, foreach=fe, extrap_scale=scale,
                                                      **SGD_KW),
                lambda ps, **kw: torch.optim.SGD(ps, **SGD_KW, **kw)),
        "AdamW": (lambda ps, fe: extrap_accel.ExtrapAdam(ps, foreach=fe, extrap_scale=scale,
                                                         **ADAM_KW),
                  lambda ps, **kw: torch.optim.AdamW(ps, **ADAM_KW, **kw)),
    }  # fmt: skip
    for base, (ours, theirs) in pairs.items():
        exact = run_ours(lambda ps, th=theirs: th(ps, foreach=False), torch.float64, device, steps,
                         grad, x0)[0]  # fmt: skip
        got = {}
        for foreach in (True, False):
            got[foreach] = run_ours(lambda ps, fe=foreach, us=ours: us(ps, fe), dtype, device, steps,
                                    grad, x0)[0]  # fmt: skip
            want = run_ours(lambda ps, fe=foreach, th=theirs: th(ps, foreach=fe), dtype, device,
                            steps, grad, x0)[0]  # fmt: skip
            same = all(torch.equal(a, b) for a, b in zip(got[foreach], want))
            rec.check(f"I1 bitwise: {base} extrap_scale=0 foreach={foreach} == torch "
                      f"{base}(foreach={foreach}) {d}", same,
                      f"max rel diff {rel_err(got[foreach], want):.2e}; vs float64 torch "
                      f"{rel_err(got[foreach], exact):.2e}")  # fmt: skip
        try:
            fused = run_ours(lambda ps, th=theirs: th(ps, fused=True), dtype, device, steps,
                             grad, x0)[0]  # fmt: skip
        except (RuntimeError, ValueError) as e:  # a torch without this implementation
            rec.skip(f"torch {base}(fused=True) {d}", f"torch refuses it here: {e}")
            continue
        rec.skip(f"I1 bitwise vs torch {base}(fused=True) {d}",
                 "not a property of ours: torch's fused step is one kernel with its own "
                 "rounding, ours runs torch's foreach / for-loop operations (bit-exact above); "
                 "errors against the float64 run are in the measurements")  # fmt: skip
        rec.measure(
            f"I1 {base} {d}: fused vs ours",
            fused_bitwise_equal_ours=all(torch.equal(a, b) for a, b in zip(fused, got[True])),
            fused_err_vs_float64=rel_err(fused, exact),
            ours_err_vs_float64=rel_err(got[True], exact),
        )


# ----------------------------------------------------------------------------- amp (accelerate)
def amp_model(device):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)).to(device)


def amp_batch(t, device):
    g = torch.Generator().manual_seed(t)
    return torch.randn(16, 16, generator=g).to(device), torch.randn(16, 4, generator=g).to(device)


def section_amp(rec: Recorder) -> None:
    for precision in ("bf16", "fp16"):
        rec.attempt(f"amp {precision}", amp_loop, rec, precision)


def amp_loop(rec: Recorder, precision: str, steps: int = 6, overflow_at: int = 2) -> None:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    device = rec.device
    AcceleratorState._reset_state(True)
    handlers = []
    if precision == "fp16" and cuda(rec):  # a small initial scale: no overflow but the injected
        from accelerate.utils import GradScalerKwargs

        handlers.append(GradScalerKwargs(init_scale=2.0**10))
    accelerator = Accelerator(mixed_precision=precision, cpu=not cuda(rec),
                              kwargs_handlers=handlers)  # fmt: skip
    if precision == "fp16" and accelerator.scaler is None:
        accelerator.scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10)
        rec.skip("accelerate's own fp16 GradScaler", "accelerate makes none on a CPU: a "
                 "torch.amp.GradScaler('cpu') is injected (the same protocol)")  # fmt: skip
    model = amp_model(device)
    opt = extrap_accel.ExtrapSGD(model.parameters(), **SGD_KW)
    model, opt = extrap_accel.prepare(accelerator, model, opt)
    base, scaler = opt.optimizer, accelerator.scaler
    params = list(model.parameters())
    ref = ReferenceExtrapSGD([p.detach().double().cpu() for p in params], **SGD_KW)
    errs, skipped_ok, skipped = [], [], []
    inject = precision == "fp16"
    for t in range(steps):
        x, y = amp_batch(t, device)
        loss = nn.functional.mse_loss(model(x).float(), y)
        if inject and t == overflow_at:
            loss = loss * float("inf")
        accelerator.backward(loss)
        scale = scaler.get_scale() if scaler is not None else 1.0
        gk = [base.local_grad(p).detach().double().cpu() / scale for p in params]
        before = ([p.detach().clone() for p in params], [base.anchor(p).clone() for p in params],
                  [{k: v.clone() for k, v in base.state[p].items() if torch.is_tensor(v)}
                   for p in params])  # fmt: skip
        opt.step()
        opt.zero_grad()
        skipped.append(bool(opt.step_was_skipped))
        if skipped[-1]:
            skipped_ok.append(
                all(torch.equal(p, b) for p, b in zip(params, before[0]))
                and all(torch.equal(base.anchor(p), b) for p, b in zip(params, before[1]))
                and all(torch.equal(base.state[p][k], v) for p, s in zip(params, before[2])
                        for k, v in s.items()))  # fmt: skip
            continue
        ref.step([gk])
        errs.append(max(rel_err(params, ref.points(0)),
                        rel_err([base.anchor(p) for p in params], ref.anchor)))  # fmt: skip
    err = max(errs)
    rec.check(
        f"{precision} autocast loop vs float64 oracle (captured unscaled gᵏ)",
        err <= TOL[torch.float32] and len(errs) >= steps - 2,
        f"max rel err {err:.2e} over {len(errs)} steps (tol {TOL[torch.float32]:g})",
    )
    if inject:
        rec.check("fp16 GradScaler: injected overflow skipped, nothing changed",
                  skipped[overflow_at] and sum(skipped) <= 2 and all(skipped_ok),
                  f"skipped {skipped}, unchanged {skipped_ok}; scale now "
                  f"{scaler.get_scale():g}")  # fmt: skip


# ----------------------------------------------------------------------------- deepspeed
def deepspeed_configs(rec: Recorder) -> list[tuple[int, str]]:
    if rec.tiny:  # ZeRO-3: the sharded weights and the consolidated state dict
        return [(3, "bf16")]
    return [(s, p) for p in ("bf16", "fp16") for s in (0, 1, 2, 3)]


def section_deepspeed(rec: Recorder) -> None:
    # DeepSpeed detects its accelerator at import; a wheel built on a CPU machine records
    # "cpu" as the build's, so name it (the section runs in its own process)
    os.environ.setdefault("DS_ACCELERATOR", rec.device.type)
    try:
        import deepspeed
    except ImportError as e:
        rec.check("deepspeed importable", False, f"{e}: install the wheels of "
                  "benchmarks/device_wheels.sh first")  # fmt: skip
        return
    init_single_process_group(rec.device)
    import deepspeed_worker as dsw

    if not cuda(rec):  # DeepSpeed's CPU accelerator refuses fp16 (DESIGN.md): allow it
        import deepspeed.accelerator

        deepspeed.accelerator.get_accelerator().is_fp16_supported = lambda: True
    if rec.tiny:
        rec.skip("ZeRO-0/1/2 and fp16", "--tiny runs one DeepSpeed configuration")
    dsw.DEVICE = rec.device
    # The worker's checks compare 2 ranks; with one process, a gather returns this rank twice
    # (its cross-rank comparisons are then trivially true and not reported here).
    dsw.gather = lambda t: [t, t]
    for stage, precision in deepspeed_configs(rec):
        rec.attempt(f"ZeRO-{stage} {precision}", deepspeed_config, rec, dsw, stage, precision)


def deepspeed_config(rec: Recorder, dsw, stage: int, precision: str) -> None:
    tag = f"ZeRO-{stage} {precision}"
    if stage == 0 and precision == "fp16":  # upstream: loss never scaled in backward
        try:
            dsw.build(stage, precision)
            rec.check(f"{tag} refused with a clear message", False, "it was accepted")
        except (RuntimeError, ValueError, NotImplementedError) as e:
            rec.check(f"{tag} refused with a clear message", "fp16" in str(e), str(e)[:200])
        return
    results: dict = {}
    dsw.check_extrapolation(stage, precision, 0, results, steps=4,
                            overflow_at=2 if precision == "fp16" else None)  # fmt: skip
    r = results["extrapolation"]
    own = max(r["own_err_ulps"], default=math.inf)
    rec.check(
        f"{tag}: x̃ = anchor − γ̃·d from the captured gradient (within 1 ulp)",
        own <= 1.0,
        f"max error {own:.2f} ulp; rounded to zero {r['rounded_to_zero_fraction']}",
    )
    if precision == "fp16":
        rec.check(
            f"{tag}: injected overflow skipped, nothing changed",
            r["skipped"].count(True) == 1 and all(r["unchanged_after_skip"]),
            f"skipped {r['skipped']}, unchanged {r['unchanged_after_skip']}",
        )
    rec.measure(f"{tag} extra bytes/param", value=r["extra_bytes_per_param"])
    with tempfile.TemporaryDirectory() as tmp:
        dsw.check_saving_and_resume(stage, precision, 0, results, tmp)
    s = results["saving"]
    for key in (
        "module_state_dict_is_anchor",
        "consolidated_is_anchor",
        "no_grad_forward_is_anchor",
        "weights_still_extrapolated",
        "local_file",
        "unchanged_by_save",
        "resume_bit_identical",
        "module_only_load_at_anchor",
    ):
        if key in s:
            rec.check(
                f"{tag}: {key.replace('_', ' ')}",
                bool(s[key]),
                f"(step, tensor) mismatches {s.get('resume_mismatches')}"
                if key == "resume_bit_identical" and not s[key]
                else "",
            )


# ----------------------------------------------------------------------------- fsdp2
def section_fsdp2(rec: Recorder) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    device = rec.device
    init_single_process_group(device)

    def make():
        model = amp_model(device)
        fully_shard(model[0])
        fully_shard(model)
        return model

    def step(model, opt, t):
        x, y = amp_batch(t, device)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()

    # I1: extrap_scale=0 equals FSDP2 + torch SGD bit for bit
    a, b = make(), make()
    oa = extrap_accel.ExtrapSGD(a.parameters(), extrap_scale=0.0, **SGD_KW)
    ob = torch.optim.SGD(b.parameters(), **SGD_KW)
    extrap_accel.attach(a, oa)
    for t in range(4):
        step(a, oa, t)
        step(b, ob, t)
    same = all(torch.equal(p.full_tensor(), q.full_tensor())
               for p, q in zip(a.parameters(), b.parameters()))  # fmt: skip
    rec.check("FSDP2 I1: extrap_scale=0 == FSDP2 + torch SGD bit for bit", same)
    # x̃ and anchor against the oracle (K = 1: the local gradient is the gradient)
    model = make()
    opt = extrap_accel.ExtrapSGD(model.parameters(), **SGD_KW)
    extrap_accel.attach(model, opt)
    params = list(model.parameters())
    ref = ReferenceExtrapSGD([p.full_tensor().double().cpu() for p in params], **SGD_KW)
    errs = []
    for t in range(4):
        x, y = amp_batch(t, device)
        nn.functional.mse_loss(model(x), y).backward()
        grads = [p.grad.full_tensor().double().cpu() for p in params]
        opt.step()
        opt.zero_grad()
        ref.step([grads])
        errs.append(rel_err([p.full_tensor() for p in params], ref.points(0)))
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    names = [n for n, _ in model.named_parameters()]
    anchor_err = rel_err([full[n] for n in names], ref.anchor)
    err = max(errs)
    rec.check("FSDP2 x̃ vs float64 oracle", err <= TOL[torch.float32], f"max rel err {err:.2e}")
    moved = rel_err([p.full_tensor() for p in params], ref.anchor)
    rec.check(
        "FSDP2 full state dict is the anchor",
        anchor_err <= TOL[torch.float32] and moved > TOL[torch.float32],
        f"state dict vs oracle anchor {anchor_err:.2e}; x̃ vs anchor {moved:.2e}",
    )


# ----------------------------------------------------------------------------- two processes
def section_two_process(rec: Recorder) -> None:
    ctx = multiprocessing.get_context("fork")
    port, out = free_port(), tempfile.mkdtemp()
    procs = [ctx.Process(target=two_process_worker, args=(rank, port, out, rec.config))
             for rank in range(2)]  # fmt: skip
    for p in procs:
        p.start()
    for p in procs:
        p.join(rec.config["box"])
    for p in procs:
        if p.is_alive():
            p.kill()
    ranks = []
    for rank in range(2):
        path = os.path.join(out, f"rank{rank}.json")
        if not os.path.exists(path):
            rec.check(f"two processes: rank {rank} finished", False, f"exit code {procs[rank]}")
            return
        with open(path) as f:
            ranks.append(json.load(f))
    r0 = ranks[0]
    if "error" in r0 or "error" in ranks[1]:
        rec.check("two processes: ranks ran", False, r0.get("error") or ranks[1].get("error"))
        return
    tol = TOL[torch.float32]
    for rank, r in enumerate(ranks):
        rec.check(
            f"two processes, rank {rank}: x̃ᵏ and anchor vs K=2 float64 oracle",
            max(r["point_err"] + r["anchor_err"]) <= tol,
            f"max rel err x̃ {max(r['point_err']):.2e}, anchor {max(r['anchor_err']):.2e}",
        )
    rec.check(
        "two processes: I4 x̃⁰ − x̃¹ = −γ̃(d⁰ − d¹), points differ",
        max(r0["i4_err"]) <= tol and min(r0["i4_norm"][1:]) > 0,
        f"max err {max(r0['i4_err']):.2e}; ‖x̃⁰ − x̃¹‖ {r0['i4_norm']}",
    )
    rec.check("two processes: anchors equal across ranks", all(r0["anchors_equal"]))
    c = r0["collectives"]
    rec.check(
        "two processes: I3 gloo calls and elements equal DDP + torch SGD's",
        c["extrap_sgd"] == c["sgd"] and c["sgd"]["calls"] > 0,
        json.dumps(c),
    )


def two_process_worker(rank: int, port: int, out: str, config: dict) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from extrap_accel.diagnostics import count_collectives

    result: dict = {}
    try:
        device = torch.device(config["device"])
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=2)  # fmt: skip

        def ddp(model):
            return DDP(model, device_ids=[device.index or 0] if device.type == "cuda" else None)

        def gather(t):
            parts = [torch.empty_like(t.cpu()) for _ in range(2)]
            dist.all_gather(parts, t.detach().cpu().contiguous())
            return parts

        model = ddp(amp_model(device))
        opt = extrap_accel.ExtrapSGD(model.parameters(), **SGD_KW)
        extrap_accel.attach(model, opt)
        params = list(model.parameters())
        ref = ReferenceExtrapSGD([p.detach().double().cpu() for p in params], world_size=2,
                                 **SGD_KW)  # fmt: skip
        r = {k: [] for k in ("point_err", "anchor_err", "i4_err", "i4_norm", "anchors_equal")}
        for t in range(4):
            x, y = amp_batch(10 * t + rank, device)
            nn.functional.mse_loss(model(x), y).backward()
            gk = [opt.local_grad(p).double() for p in params]
            opt.step()
            opt.zero_grad()
            per_rank = list(zip(*[gather(g) for g in gk]))
            ref.step([list(per_rank[k]) for k in range(2)])
            r["point_err"].append(rel_err(params, ref.points(rank)))
            r["anchor_err"].append(rel_err([opt.anchor(p) for p in params], ref.anchor))
            pts = [gather(p) for p in params]
            expected = [a - b for a, b in zip(ref.points(0), ref.points(1))]
            r["i4_err"].append(rel_err([q[0] - q[1] for q in pts], expected))
            r["i4_norm"].append(float(sum((q[0] - q[1]).double().norm() for q in pts)))
            r["anchors_equal"].append(all(torch.equal(*gather(opt.anchor(p))) for p in params))
        counts = {}
        for name in ("sgd", "extrap_sgd"):
            m = ddp(amp_model(device))
            if name == "sgd":
                o = torch.optim.SGD(m.parameters(), **SGD_KW)
            else:
                o = extrap_accel.ExtrapSGD(m.parameters(), **SGD_KW)
                extrap_accel.attach(m, o)

            def one(t, m=m, o=o):
                x, y = amp_batch(100 + t + rank, device)
                nn.functional.mse_loss(m(x), y).backward()
                o.step()
                o.zero_grad()

            for t in range(2):  # DDP rebuilds its buckets after the first iteration
                one(t)
            counts[name] = count_collectives(lambda one=one: one(2))
        r["collectives"] = counts
        result = r
        dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001 -- reported to the parent as a failed check
        result = {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}"}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


# ----------------------------------------------------------------------------- performance
def section_performance(rec: Recorder) -> None:
    from step_overhead import resnet20_shapes, transformer_shapes

    tiny = rec.tiny
    if not cuda(rec):  # two threads on a shared CPU wait for each other at every operator
        torch.set_num_threads(1)
        rec.skip("intra-op threads on the CPU", "timed with one thread (torch.set_num_threads(1))")
    sets = {"transformer": transformer_shapes(d_model=64, d_ff=128, layers=1, vocab=500)
            if tiny else transformer_shapes(),
            "resnet20": resnet20_shapes()}  # fmt: skip
    repeats = 3 if tiny else 20
    for name, shapes in sets.items():
        rec.attempt(f"step {name}", step_ratios, rec, name, shapes, repeats)
    if not cuda(rec):
        rec.skip("extra peak memory (torch.cuda.max_memory_allocated)", "CUDA-only statistics; "
                 "the state bytes per parameter are reported instead")  # fmt: skip
    for task in ("resnet20", "translate"):
        rec.attempt(f"train step {task}", train_step_ratio, rec, task, 2 if tiny else 20)


def _optimizer_pairs():
    sgd = {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}
    adam = {"lr": 1e-3, "weight_decay": 1e-2}
    return {
        "SGD": (lambda ps: extrap_accel.ExtrapSGD(ps, world_size=1, **sgd),
                lambda ps, **kw: torch.optim.SGD(ps, **sgd, **kw)),
        "AdamW": (lambda ps: extrap_accel.ExtrapAdam(ps, world_size=1, **adam),
                  lambda ps, **kw: torch.optim.AdamW(ps, **adam, **kw)),
    }  # fmt: skip


def _state_bytes(opt) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if torch.is_tensor(v) and v.dim() > 0)  # fmt: skip


def step_ratios(rec: Recorder, set_name: str, shapes, repeats: int) -> None:
    """Median step time of ours and torch's foreach / fused, interleaved; extra memory."""
    device = rec.device
    gen = torch.Generator().manual_seed(0)
    init = [(torch.randn(s, generator=gen) * 0.02).to(device) for s in shapes]
    grads = [(torch.randn(s, generator=gen) * 1e-2).to(device) for s in shapes]
    n = sum(t.numel() for t in init)
    for family, (ours, theirs) in _optimizer_pairs().items():
        builders = {"ours": ours, "foreach": lambda ps, t=theirs: t(ps, foreach=True),
                    "fused": lambda ps, t=theirs: t(ps, fused=True)}  # fmt: skip
        runs, peak = {}, {}
        for impl, build in builders.items():
            params = [nn.Parameter(t.clone()) for t in init]
            for p, g in zip(params, grads):
                p.grad = g.clone()
            if cuda(rec):
                sync(device)
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            opt = build(params)
            for _ in range(3):  # warm-up: state created, caches filled
                opt.step()
            if cuda(rec):
                sync(device)
                peak[impl] = torch.cuda.max_memory_allocated(device) - before
            runs[impl] = (params, opt, [])
        for _ in range(repeats):
            for impl, (params, opt, times) in runs.items():
                torch._foreach_copy_([p.grad for p in params], grads)
                sync(device)
                start = time.perf_counter()
                opt.step()
                sync(device)
                times.append(time.perf_counter() - start)
        med = {impl: statistics.median(r[2]) for impl, r in runs.items()}
        values = {"params": n, "tensors": len(shapes), "ms_ours": med["ours"] * 1e3,
                      "ms_foreach": med["foreach"] * 1e3, "ms_fused": med["fused"] * 1e3,
                      "ratio_foreach": med["ours"] / med["foreach"],
                      "ratio_fused": med["ours"] / med["fused"],
                      "extra_state_bytes_per_param": (_state_bytes(runs["ours"][1])
                                                   - _state_bytes(runs["foreach"][1])) / n}  # fmt: skip
        if peak:
            values["extra_peak_bytes_per_param"] = (peak["ours"] - peak["foreach"]) / n
        rec.measure(f"step {set_name} {family}", **values)
        del runs


def train_step_ratio(rec: Recorder, task: str, repeats: int) -> None:
    """One training step (forward, backward, step) of a model with ours vs torch's optimizer."""
    from ddp_overhead import make

    device = rec.device
    runs = {}
    for name in ("torch", "ours"):
        model, batch, loss_fn = make(task)
        model.to(device)
        if task == "translate":
            kw = {"lr": 1e-3, "betas": (0.9, 0.98), "eps": 1e-9, "weight_decay": 0.0}
            opt = (
                torch.optim.AdamW(model.parameters(), foreach=True, **kw)
                if name == "torch"
                else extrap_accel.ExtrapAdam(model.parameters(), world_size=1, **kw)
            )
        else:
            kw = {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}
            opt = (
                torch.optim.SGD(model.parameters(), foreach=True, **kw)
                if name == "torch"
                else extrap_accel.ExtrapSGD(model.parameters(), world_size=1, **kw)
            )
        runs[name] = (model, opt, batch, loss_fn, [])
    for t in range(repeats + 2):
        for model, opt, batch, loss_fn, times in runs.values():
            data = _to(batch(0, t % 4), device)
            sync(device)
            start = time.perf_counter()
            loss_fn(model, data).backward()
            opt.step()
            opt.zero_grad()
            sync(device)
            if t >= 2:
                times.append(time.perf_counter() - start)
    med = {name: statistics.median(r[4]) for name, r in runs.items()}
    rec.measure(f"train step {task}", ms_torch=med["torch"] * 1e3, ms_ours=med["ours"] * 1e3,
                ratio=med["ours"] / med["torch"], repeats=repeats)  # fmt: skip


def _to(data, device):
    if isinstance(data, dict):
        return {k: v.to(device) for k, v in data.items()}
    if isinstance(data, (tuple, list)):
        return type(data)(v.to(device) for v in data)
    return data.to(device)


# ----------------------------------------------------------------------------- orchestration
# name: (function, correctness?, time box in seconds (full, tiny))
SECTIONS = {
    "optimizers": (section_optimizers, True, (25, 15)),
    "amp": (section_amp, True, (30, 15)),
    "deepspeed": (section_deepspeed, True, (80, 25)),
    "fsdp2": (section_fsdp2, True, (20, 15)),
    "two_process": (section_two_process, True, (30, 20)),
    "performance": (section_performance, False, (55, 25)),
}


def _run_section(name: str, path: str, config: dict) -> None:
    """Child process: run one section, recording into ``path``; a crash is a failed check."""
    rec = Recorder(name, path, config)
    rec._flush()
    torch.manual_seed(0)
    if rec.device.type == "cuda" and name != "two_process":  # that one forks its ranks first
        torch.cuda.set_device(rec.device)
    fn = SECTIONS[name][0]
    rec.attempt(f"{name}: section ran to its end", fn, rec)
    os._exit(0)  # skip atexit handlers of distributed libraries in the forked child


def environment(device: str) -> dict:
    import importlib.metadata as md

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "machine": f"{platform.node()}, {os.cpu_count()} CPUs", "device": device}  # fmt: skip
    for pkg in ("accelerate", "transformers", "deepspeed"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    if device.startswith("cuda"):
        try:
            import pynvml  # NVML: no CUDA context in the orchestrator

            pynvml.nvmlInit()
            env["gpu"] = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
        except Exception as e:  # noqa: BLE001 -- only the name is missing then
            env["gpu"] = f"(NVML: {e})"
    with contextlib.suppress(OSError):
        env["load_average"] = os.getloadavg()
    return env


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [(f"# gpu_check ({'tiny, ' if report['tiny'] else ''}{env['device']}"
             f"{', ' + env['gpu'] if env.get('gpu') else ''})"), "",
             ", ".join(f"{k} {v}" for k, v in env.items() if k not in ("device", "gpu")), "",
             "| section | check | result | detail |", "|---|---|---|---|"]  # fmt: skip
    for s in report["sections"]:
        head = f"{s['section']} ({s['status']}, {s['seconds']:.1f} s)"
        for c in s["checks"]:
            detail = c["detail"].split("\n")[0].replace("|", "\\|")[:160]
            lines.append(f"| {head} | {c['name']} | {'ok' if c['ok'] else '**FAILED**'} "
                         f"| {detail} |")  # fmt: skip
            head = ""
        for sk in s["skipped"]:
            lines.append(f"| {head} | {sk['what']} | skipped | {sk['reason']} |")
            head = ""
        if head:
            lines.append(f"| {head} | (nothing recorded) | | |")
    lines += ["", "| measurement | values |", "|---|---|"]
    for s in report["sections"]:
        for m in s["measurements"]:
            vals = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                             for k, v in m.items() if k != "name")  # fmt: skip
            lines.append(f"| {m['name']} | {vals} |")
    lines += ["", (f"**{'FAILED' if report['failed'] else 'PASSED'}**: "
              f"{report['checks_failed']} of {report['checks']} checks failed.")]  # fmt: skip
    return "\n".join(lines) + "\n"


def write(report: dict, out: str) -> None:
    checks = [c for s in report["sections"] for c in s["checks"] if s["correctness"]]
    report["checks"] = len(checks)
    report["checks_failed"] = sum(not c["ok"] for c in checks)
    report["failed"] = report["checks_failed"] > 0 or any(
        s["correctness"] and s["status"] != "finished" for s in report["sections"]
    )
    for name, text in (("gpu_check.json", json.dumps(report, indent=1, default=str)),
                       ("gpu_check.md", markdown(report))):  # fmt: skip
        tmp = os.path.join(out, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out, name))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="gpu_check.json and .md go here")
    parser.add_argument("--device", default=None, help="cuda (default where one exists) or cpu")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="small sizes, one DeepSpeed configuration: the CPU smoke run",
    )
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument(
        "--inject_fault",
        action="store_true",
        help="run I1 with a nonzero extrap_scale: its checks must fail",
    )
    args = parser.parse_args(argv)
    device = args.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        device = "cuda:0"
    if not device.startswith(("cuda", "cpu")):
        parser.error(f"--device {device}: use cuda or cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU found here; use --device cpu --tiny")
    os.makedirs(args.output_dir, exist_ok=True)
    report = {"environment": environment(device), "tiny": args.tiny, "sections": [],
              "argv": sys.argv[1:]}  # fmt: skip
    partial = os.path.join(args.output_dir, "gpu_check_partial.json")
    ctx = multiprocessing.get_context("fork")
    start_all = time.perf_counter()
    for name in args.sections:
        _, correctness, boxes = SECTIONS[name]
        box = boxes[1] if args.tiny else boxes[0]
        config = {"device": device, "tiny": args.tiny, "inject_fault": args.inject_fault,
                  "box": box}  # fmt: skip
        assert not torch.cuda.is_initialized(), "the orchestrator must not initialise CUDA"
        start = time.perf_counter()
        proc = ctx.Process(target=_run_section, args=(name, partial, config))
        proc.start()
        proc.join(box)
        status = "finished"
        if proc.is_alive():
            proc.kill()
            proc.join()
            status = f"killed after its {box} s time box"
        elif proc.exitcode != 0:
            status = f"crashed (exit code {proc.exitcode})"
        try:
            with open(partial) as f:
                data = json.load(f)
            os.remove(partial)
        except (OSError, json.JSONDecodeError):
            data = {"section": name, "checks": [], "measurements": [], "skipped": []}
        data.update(status=status, correctness=correctness, box_s=box,
                    seconds=time.perf_counter() - start)  # fmt: skip
        report["sections"].append(data)
        report["seconds"] = time.perf_counter() - start_all
        write(report, args.output_dir)
        failed = [c["name"] for c in data["checks"] if not c["ok"]]
        print(f"[gpu_check] {name}: {status} in {data['seconds']:.1f} s, "
              f"{len(data['checks'])} checks, {len(failed)} failed"
              + (f" ({'; '.join(failed)})" if failed else ""), flush=True)  # fmt: skip
    print(markdown(report))
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
