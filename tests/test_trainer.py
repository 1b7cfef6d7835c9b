"""The Hugging Face Trainer integration: ``extrap_accel.attach(trainer)``.

End-to-end checks run in tests/distributed/trainer_worker.py, once on one process and once
under ``torchrun --nproc_per_node 2`` (CPU, gloo), each writing JSON per rank; the tests here
assert on it. The setup errors are checked directly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch

from launch import REPO, cpu_env, free_port, load_results, run

transformers = pytest.importorskip("transformers")

import extrap_accel  # noqa: E402
from extrap_accel import ExtrapAdam, ExtrapSGD  # noqa: E402
from extrap_accel.integrations.transformers import _check_backend  # noqa: E402

WORKER = "tests/distributed/trainer_worker.py"
MODES = ["optimizers", "cls_and_kwargs", "optimizers_gaussian"]
SETUPS = ["single", "ddp"]
TRAIN_MODE_CKPT, EVAL_MODE_CKPT = "4", "6"  # see the worker's docstring


# ---------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer_single")
    run([[sys.executable, WORKER, "--out", str(out)]])
    return load_results(str(out), "trainer", 1)


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer_ddp")
    run([[sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
          "--master_addr", "127.0.0.1", "--master_port", str(free_port()), WORKER,
          "--out", str(out)]])  # fmt: skip
    return load_results(str(out), "trainer", 2)


@pytest.fixture(params=[pytest.param((setup, mode), marks=pytest.mark.slow, id=f"{setup}-{mode}")
                        for setup in SETUPS for mode in MODES])  # fmt: skip
def case(request) -> types.SimpleNamespace:
    """One way of passing the optimizer under one launch: its results, one dict per rank."""
    setup, mode = request.param
    results = request.getfixturevalue(setup)
    assert [r["rank"] for r in results] == list(range(len(results)))
    ranks = [r[mode] for r in results]
    for r in ranks:
        assert r["world_size"] == len(results)
    return types.SimpleNamespace(setup=setup, mode=mode, ranks=ranks, main=ranks[0])


def test_every_checkpoint_holds_the_anchor(case):
    """model.safetensors of every checkpoint is the anchor, also one saved at a step without
    evaluation (train mode: the parameters hold x̃ there, so the check can fail)."""
    main = case.main
    assert main["checkpoints"][TRAIN_MODE_CKPT]["training_at_save"]
    assert not main["checkpoints"][EVAL_MODE_CKPT]["training_at_save"]
    for step, c in main["checkpoints"].items():
        assert c["weights_are_anchor"] and c["weights_differ_from_point"], step


def test_every_rank_saves_its_own_local_state(case):
    for rank, r in enumerate(case.ranks):
        for step, c in r["checkpoints"].items():
            assert c["local_file"] and c["local_rank"] == rank, (rank, step)
            assert c["local_point_is_live_point"], (rank, step)


@pytest.mark.parametrize("when", ["mid_training", "after_training"])
def test_save_model_and_push_to_hub_write_the_anchor(case, when):
    """At step 5 (train mode, called from a callback) and after train() (transformers 5
    evaluates at the last step, so the parameters hold the anchor there; 4.x does not)."""
    if when == "mid_training":
        assert case.main[when]["training"]
    for r in case.ranks:
        assert r[when]["params_untouched"]
    s = case.main[when]
    assert s["save_model_is_anchor"] and s["save_model_differs_from_point"]
    assert s["push_to_hub_is_anchor"] and s["push_to_hub_differs_from_point"]


@pytest.mark.parametrize("step", [TRAIN_MODE_CKPT, EVAL_MODE_CKPT])
def test_resume_from_checkpoint_is_bit_identical_on_every_rank(case, step):
    for rank, r in enumerate(case.ranks):
        assert r["resume"][step] == {"params_bit_identical": True, "anchors_bit_identical": True,
                                     "points_bit_identical": True}, rank  # fmt: skip


@pytest.mark.slow
def test_resume_with_a_per_rank_file_missing_is_refused_on_every_rank(ddp):
    for r in ddp:
        message = r["cls_and_kwargs"]["resume_without_local_files"]
        assert "per-rank state for 1 of 2 ranks" in message
        assert "resume with the number of processes that saved it" in message


def test_local_gradients_and_points(case):
    """Under DDP each rank's gᵏ is its own (mean over ranks = the averaged .grad, I6, with
    gradient accumulation in cls_and_kwargs) and the ranks sit at different points around one
    anchor; no variant perturbs at step 0 (the noise variant draws after each step)."""
    distributed = case.setup == "ddp"
    for r in case.ranks:
        assert r["captures_local_grads"] == distributed
        assert len(r["i6_rel_err"]) == 8 and max(r["i6_rel_err"]) <= 1e-6
        assert r["gradient_accumulation_steps"] == (2 if case.mode == "cls_and_kwargs" else 1)
        assert r["final_displaced"]
        assert r["anchors_equal_across_ranks"]
        assert r["points_equal_across_ranks"] == (not distributed)
        start = r["start"]  # x̃₀ = x₀ for every variant
        assert start["anchors_equal_across_ranks"]
        assert not start["displaced"] and start["points_equal_across_ranks"]


@pytest.mark.slow
def test_attach_returns_one_callback_per_trainer(single):
    for mode in MODES:
        assert single[0][mode]["attach_returns_callback"] and single[0][mode]["attach_idempotent"]


# ---------------------------------------------------------------------- setup errors
def _tiny_model():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=1,
                                     n_head=2, bos_token_id=0, eos_token_id=0)  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def _trainer(tmp_path, auto_find_batch_size=False, **kwargs):
    args = transformers.TrainingArguments(str(tmp_path), use_cpu=True, report_to="none",
                                          auto_find_batch_size=auto_find_batch_size)  # fmt: skip
    return transformers.Trainer(model=kwargs.pop("model", None) or _tiny_model(), args=args,
                                **kwargs)  # fmt: skip


@pytest.mark.parametrize("how", ["optimizers", "cls_and_kwargs"])
def test_training_a_trainer_that_was_not_attached_fails_at_the_first_step(tmp_path, how):
    """Without attach(trainer) every checkpoint would hold x̃: refused, not silently saved."""
    ids = torch.randint(0, 16, (4, 8), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": x, "labels": x} for x in ids]
    model = _tiny_model()
    kwargs = ({"optimizers": (ExtrapAdam(model.parameters(), lr=1e-3), None)} if how ==
              "optimizers" else {"optimizer_cls_and_kwargs": (ExtrapAdam, {"lr": 1e-3})})
    trainer = _trainer(tmp_path, model=model, train_dataset=data, **kwargs)
    trainer.args.max_steps = 1
    with pytest.raises(RuntimeError, match=r"not made anchor-safe.*extrap_accel.attach\(trainer\)"):
        trainer.train()
    attached = _trainer(tmp_path, model=_tiny_model(), train_dataset=data,
                        optimizer_cls_and_kwargs=(ExtrapAdam, {"lr": 1e-3}))  # fmt: skip
    attached.args.max_steps = 1
    extrap_accel.attach(attached)
    attached.train()  # the same setup, attached: trains


def test_the_private_trainer_hooks_extrap_accel_wraps_still_exist_and_are_called():
    """The only private Trainer methods extrap_accel relies on (PRIVATE_HOOKS): fails loudly
    here when transformers renames one, changes its parameters or stops calling it."""
    import inspect

    from extrap_accel.integrations.transformers import PRIVATE_HOOKS, check_private_hooks

    check_private_hooks(transformers.Trainer)
    source = inspect.getsource(transformers.Trainer)
    for name in PRIVATE_HOOKS:
        assert f"self.{name}(" in source, name

    class Renamed(transformers.Trainer):
        _load_optimizer_and_scheduler = None

    with pytest.raises(RuntimeError, match="no Trainer._load_optimizer_and_scheduler"):
        check_private_hooks(Renamed)


def test_extrap_trainer_with_a_registry_name_trains_and_checkpoints_the_anchor(tmp_path):
    """ExtrapTrainer (attach built in) + trainer_optimizer("extrap_sgd_gaussian", ...)."""
    from safetensors.torch import load_file

    ids = torch.randint(0, 16, (8, 8), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": x, "labels": x} for x in ids]
    cls_and_kwargs = extrap_accel.trainer_optimizer(
        "extrap_sgd_gaussian", lr=0.1, momentum=0.9, weight_decay=0.0, noise_scale=1e-2
    )
    assert cls_and_kwargs == (ExtrapSGD, {"extrapolation": "gaussian", "lr": 0.1,
                                          "momentum": 0.9, "weight_decay": 0.0,
                                          "noise_scale": 1e-2})  # fmt: skip
    args = transformers.TrainingArguments(str(tmp_path), use_cpu=True, report_to="none",
                                          max_steps=2, save_steps=2, per_device_train_batch_size=4)
    trainer = extrap_accel.ExtrapTrainer(model=_tiny_model(), args=args, train_dataset=data,
                                         optimizer_cls_and_kwargs=cls_and_kwargs)  # fmt: skip
    assert extrap_accel.attach(trainer) is trainer.extrap_callback  # already attached
    trainer.train()
    opt = trainer.extrap_callback.optimizer
    assert isinstance(opt, ExtrapSGD) and opt.param_groups[0]["extrapolation"] == "gaussian"
    saved = load_file(str(tmp_path / "checkpoint-2" / "model.safetensors"))
    params = dict(trainer.model.named_parameters())
    assert all(torch.equal(saved[n], opt.anchor(params[n])) for n in saved if n in params)
    assert any(not torch.equal(p, opt.anchor(p)) for p in params.values())  # x̃ in training
    assert (tmp_path / "checkpoint-2" / "extrap_accel_rank0.pt").is_file()


def test_trainer_optimizer_refuses_what_would_fail_later():
    with pytest.raises(TypeError, match="give lr"):
        extrap_accel.trainer_optimizer("extrap_adam")
    with pytest.raises(ValueError, match="not an extrap_accel optimizer.*ExtrapSGD, ExtrapAdam"):
        extrap_accel.trainer_optimizer("adamw", lr=1e-3)
    with pytest.raises(ValueError, match="needs noise_scale"):
        extrap_accel.trainer_optimizer("extrap_sgd_uniform", lr=0.1)
    with pytest.raises(ValueError):  # the class's own check, now rather than at train()
        extrap_accel.trainer_optimizer("ExtrapSGD", lr=-1.0)
    assert extrap_accel.trainer_optimizer("ExtrapAdam", lr=1e-3) == (ExtrapAdam, {"lr": 1e-3})


def test_resuming_a_save_only_model_checkpoint_warns_that_the_optimizer_starts_afresh(tmp_path):
    """No optimizer state in the checkpoint (save_only_model): no per-rank files either, and
    that is not a missing file — every rank starts the optimizer afresh, with a warning."""
    ids = torch.randint(0, 16, (8, 8), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": x, "labels": x} for x in ids]

    def trainer(out, steps):
        t = _trainer(out, model=_tiny_model(), train_dataset=data,
                     optimizer_cls_and_kwargs=(ExtrapAdam, {"lr": 1e-3}))  # fmt: skip
        t.args.max_steps, t.args.save_steps, t.args.save_only_model = steps, 2, True
        t.args.per_device_train_batch_size = 4
        extrap_accel.attach(t)
        return t

    trainer(tmp_path / "a", 2).train()
    assert not (tmp_path / "a" / "checkpoint-2" / "optimizer.pt").exists()
    with pytest.warns(UserWarning, match="holds no optimizer state .*starts afresh on every"):
        trainer(tmp_path / "b", 4).train(resume_from_checkpoint=str(tmp_path / "a/checkpoint-2"))


def test_attach_refuses_an_optimizer_class_that_is_not_extrap(tmp_path):
    trainer = _trainer(tmp_path, optimizer_cls_and_kwargs=(torch.optim.AdamW, {"lr": 1e-3}))
    with pytest.raises(TypeError, match="AdamW.*not an extrap_accel optimizer class"):
        extrap_accel.attach(trainer)


def test_attach_refuses_an_optimizer_that_is_not_extrap(tmp_path):
    model = _tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = _trainer(tmp_path, model=model, optimizers=(opt, None))
    with pytest.raises(TypeError, match="extrap_accel optimizer"):
        extrap_accel.attach(trainer)


def test_attach_refuses_the_trainers_default_optimizer(tmp_path):
    with pytest.raises(TypeError, match="default optimizer.*optimizer_cls_and_kwargs"):
        extrap_accel.attach(_trainer(tmp_path))


def test_attach_trainer_takes_no_optimizer(tmp_path):
    model = _tiny_model()
    opt = ExtrapAdam(model.parameters())
    trainer = _trainer(tmp_path, model=model, optimizers=(opt, None))
    with pytest.raises(TypeError, match="takes no optimizer"):
        extrap_accel.attach(trainer, opt)


def test_attach_hands_over_the_fp16_scaler_and_remove_undoes_everything(tmp_path):
    model = _tiny_model()
    opt = ExtrapSGD(model.parameters(), lr=0.1)
    trainer = _trainer(tmp_path, model=model, optimizers=(opt, None))
    scaler = torch.amp.GradScaler("cpu")  # accelerate creates none on CPU
    trainer.accelerator.scaler = scaler
    callback = extrap_accel.attach(trainer)
    assert opt.grad_scaler is scaler
    assert callback.handle is not None and callback.handle.module is model  # attached at once
    assert "_save_checkpoint" in vars(trainer)
    callback.remove()
    assert "_save_checkpoint" not in vars(trainer)
    assert "_load_optimizer_and_scheduler" not in vars(trainer)
    assert callback not in trainer.callback_handler.callbacks
    assert not hasattr(model, "_extrap_accel_handle")
    assert extrap_accel.attach(trainer) is not callback  # can be attached again


def test_optimizer_cls_and_kwargs_is_attached_when_the_trainer_builds_it(tmp_path):
    trainer = _trainer(tmp_path, optimizer_cls_and_kwargs=(ExtrapAdam, {"lr": 1e-3}))
    callback = extrap_accel.attach(trainer)
    assert callback.handle is None and trainer.optimizer is None
    trainer.create_optimizer()
    callback.on_train_begin(trainer.args, trainer.state, trainer.control)
    assert callback.handle is not None and callback.handle.optimizer is trainer.optimizer


def _stub_trainer(optimizer=None, deepspeed=None, enabled=True, cls_and_kwargs=None, bf16=False):
    return types.SimpleNamespace(
        is_deepspeed_enabled=enabled, is_fsdp_enabled=False, optimizer=optimizer,
        args=types.SimpleNamespace(deepspeed=deepspeed, bf16=bf16, fp16=False),
        optimizer_cls_and_kwargs=cls_and_kwargs,
    )  # fmt: skip


def test_deepspeed_setups_that_cannot_work_fail_loudly():
    zero1 = {"zero_optimization": {"stage": 1}}
    opt = ExtrapAdam(torch.nn.Linear(2, 2).parameters())
    with pytest.raises(ValueError, match="discards.*optimizer_cls_and_kwargs=\\(ExtrapAdam"):
        _check_backend(_stub_trainer(opt, zero1))
    named = dict(zero1, optimizer={"type": "AdamW", "params": {"lr": 1e-3}})
    with pytest.raises(ValueError, match="names an optimizer \\('AdamW'\\).*remove that section"):
        _check_backend(_stub_trainer(None, named, cls_and_kwargs=(ExtrapAdam, {})))
    stochastic = (ExtrapSGD, {"lr": 0.1, "extrapolation": "stochastic"})
    with pytest.raises(NotImplementedError, match="'stochastic' is not correct.*needs the whole averaged gradient"):
        _check_backend(_stub_trainer(None, zero1, cls_and_kwargs=stochastic))
    zero0_auto = {"zero_optimization": {"stage": 0}, "bf16": {"enabled": "auto"}}
    _check_backend(_stub_trainer(None, zero0_auto, cls_and_kwargs=stochastic))  # fp32: direct
    with pytest.raises(NotImplementedError, match="only at ZeRO-0 in fp32"):  # auto -> bf16
        _check_backend(_stub_trainer(None, zero0_auto, cls_and_kwargs=stochastic, bf16=True))
    filterwise = (ExtrapSGD, {"lr": 0.1, "extrapolation": "gaussian", "filterwise": True})
    with pytest.raises(NotImplementedError, match="'filterwise' is not correct at .* stage 3"):
        _check_backend(_stub_trainer(None, {"zero_optimization": {"stage": 3}},
                                     cls_and_kwargs=filterwise))  # fmt: skip
    _check_backend(_stub_trainer(None, zero1, cls_and_kwargs=(ExtrapAdam, {})))  # supported
    _check_backend(_stub_trainer(opt, None, enabled=False))  # no DeepSpeed: fine


_DEEPSPEED_SCRIPT = r"""
import json, os, sys, torch, transformers, extrap_accel
from accelerate.state import AcceleratorState
from safetensors.torch import load_file
from extrap_accel import ExtrapAdam
out = sys.argv[1]
config = transformers.GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2,
                                 bos_token_id=0, eos_token_id=0)
ids = torch.randint(0, 16, (8, 8), generator=torch.Generator().manual_seed(0))
data = [{"input_ids": x, "labels": x} for x in ids]
AUTO = ("lr", "betas", "eps", "weight_decay")


def model():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def shipped(name):
    with open(os.path.join("accelerate_configs", name)) as f:
        return json.load(f)


def trainer(ds, folder, cls=transformers.Trainer, args=None, **kwargs):
    AcceleratorState._reset_state(True)  # one DeepSpeed Accelerator per process otherwise
    args = transformers.TrainingArguments(
        os.path.join(out, folder), use_cpu=True, report_to="none", deepspeed=ds,
        per_device_train_batch_size=4, max_steps=2, save_steps=2, **(args or {}))
    return cls(model=model(), args=args, train_dataset=data, **kwargs)


def error(fn):
    try:
        fn()
        return None
    except Exception as e:
        return [type(e).__name__, str(e)]


r = {}
zero1 = shipped("ds_zero1_auto.json")
t = trainer(zero1, "a", optimizers=(ExtrapAdam(model().parameters(), lr=1e-3), None))
r["optimizers"] = error(lambda: extrap_accel.attach(t)) + [t.is_deepspeed_enabled]
both = dict(zero1, optimizer={"type": "ExtrapAdam", "params": {"lr": 1e-3}})
t = trainer(both, "b", optimizer_cls_and_kwargs=(ExtrapAdam, {"lr": 1e-3}))
r["config_optimizer"] = error(lambda: extrap_accel.attach(t)) + [t.is_deepspeed_enabled]
sgd = dict(zero1, optimizer={"type": "extrap_sgd_gaussian",
                             "params": dict({k: "auto" for k in AUTO}, noise_scale=1e-3)})
t = trainer(sgd, "c", args={"learning_rate": 0.02, "weight_decay": 0.01})
extrap_accel.attach(t)
r["sgd"] = [t.optimizer_cls_and_kwargs[0].__name__, t.optimizer_cls_and_kwargs[1],
            "optimizer" in t.args.hf_deepspeed_config.config]
unknown = dict(zero1, optimizer={"type": "extrap_sgd_nosuch", "params": {"lr": 0.1}})
r["unknown"] = error(lambda: extrap_accel.attach(trainer(unknown, "d")))
# the shipped JSONs with default TrainingArguments: the Trainer's mismatch check
for name in ("ds_zero0_auto.json", "ds_zero1_auto.json", "ds_zero2_auto.json",
             "ds_zero3_auto.json", "ds_zero2_bf16.json"):
    t = trainer(os.path.join("accelerate_configs", name), name,
                optimizer_cls_and_kwargs=(ExtrapAdam, {"lr": 1e-3}))
    r[name] = error(lambda: t.args.hf_deepspeed_config.trainer_config_finalize(t.args, t.model, 8))
# ExtrapTrainer trains from the ZeRO-2 "auto" JSON naming ExtrapAdam, every value "auto"
named = dict(shipped("ds_zero2_auto.json"),
             optimizer={"type": "ExtrapAdam", "params": {k: "auto" for k in AUTO}})
t = trainer(named, "train", cls=extrap_accel.ExtrapTrainer,
            args={"learning_rate": 3e-3, "adam_beta1": 0.8, "adam_epsilon": 1e-7,
                  "weight_decay": 0.05})
t.train()
adapter = t.model_wrapped._extrap_accel_adapter
ckpt = os.path.join(out, "train", "checkpoint-2")
saved = load_file(os.path.join(ckpt, "model.safetensors"))
params = dict(t.model_wrapped.module.named_parameters())
r["trained"] = {
    "kwargs": t.optimizer_cls_and_kwargs[1], "engine": type(t.model_wrapped).__name__,
    "optimizer": type(adapter.optimizer).__name__,
    "lr": adapter.optimizer.param_groups[0]["initial_lr"],
    "local_file": os.path.isfile(os.path.join(ckpt, "global_step2", "extrap_accel_rank0.pt")),
    "saved": sorted(n for n in saved if n in params),
    "saved_is_anchor": all(torch.equal(saved[n], adapter.anchor(params[n]))
                           for n in saved if n in params),
    "point_differs": any(not torch.equal(adapter.point(p), adapter.anchor(p))
                         for p in params.values()),
}
print("RESULT " + json.dumps(r))
"""


@pytest.fixture(scope="module")
def deepspeed_single(tmp_path_factory):
    """One subprocess (a DeepSpeed Accelerator leaves process-wide state behind), one rank."""
    pytest.importorskip("deepspeed")
    env = cpu_env()
    env.pop("ACCELERATE_USE_CPU")  # with it, accelerate would drop the DeepSpeed plugin
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
               LOCAL_RANK="0")  # fmt: skip
    out = tmp_path_factory.mktemp("trainer_deepspeed_single")
    proc = subprocess.run([sys.executable, "-c", _DEEPSPEED_SCRIPT, str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[0][len("RESULT "):])


def test_a_real_deepspeed_trainer_that_would_drop_the_optimizer_is_refused(deepspeed_single):
    """TrainingArguments(deepspeed=...) + Trainer(...): an optimizer passed with optimizers=
    (the Trainer would discard it) and an optimizer named both in the DeepSpeed config and in
    optimizer_cls_and_kwargs fail at attach, never train with another optimizer."""
    name, message, enabled = deepspeed_single["optimizers"]
    assert enabled and name == "ValueError" and "optimizer_cls_and_kwargs" in message
    name, message, enabled = deepspeed_single["config_optimizer"]
    assert enabled and name == "ValueError" and "'ExtrapAdam'" in message
    assert "Name it in one place" in message


def test_a_deepspeed_config_naming_our_optimizer_trains_with_the_trainer(deepspeed_single):
    """"optimizer": {"type": "ExtrapAdam", "params": {every value "auto"}} with the ZeRO-2
    "auto" JSON as shipped: ExtrapTrainer fills lr, betas, eps and weight_decay from the
    TrainingArguments (as the Trainer does for DeepSpeed's own optimizers), the engine steps
    ExtrapAdam through the adapter, the checkpoint holds the anchor and this rank's file."""
    r = deepspeed_single["trained"]
    assert r["kwargs"] == {"lr": 3e-3, "betas": [0.8, 0.999], "eps": 1e-7, "weight_decay": 0.05}
    assert r["engine"] == "DeepSpeedEngine" and r["optimizer"] == "ExtrapAdam"
    assert r["lr"] == 3e-3 and r["local_file"]
    assert r["saved"] and r["saved_is_anchor"] and r["point_differs"]


def test_a_deepspeed_sgd_config_drops_auto_betas_and_eps_and_unknown_types_list_names(
    deepspeed_single,
):
    cls, kwargs, still_in_config = deepspeed_single["sgd"]
    assert cls == "ExtrapSGD" and not still_in_config  # DeepSpeed never sees our type
    assert kwargs == {"extrapolation": "gaussian", "lr": 0.02, "weight_decay": 0.01,
                      "noise_scale": 1e-3}  # fmt: skip
    name, message = deepspeed_single["unknown"]
    assert "'extrap_sgd_nosuch'" in message and "ExtrapSGD, ExtrapAdam, extrap_adam" in message


def test_the_auto_deepspeed_configs_work_with_default_training_arguments(deepspeed_single):
    """ds_zero*_auto.json pass the Trainer's mismatch check as given; the explicit ones (for
    accelerate launch) do not, without bf16=True and max_grad_norm=0."""
    for stage in range(4):
        assert deepspeed_single[f"ds_zero{stage}_auto.json"] is None
    name, message = deepspeed_single["ds_zero2_bf16.json"]
    assert "mismatch" in message.lower() and "gradient_clipping" in message


# ---------------------------------------------------------------------- Trainer + DeepSpeed
DS_WORKER = "tests/distributed/trainer_deepspeed_worker.py"
# ZeRO-0..3 × fp32/bf16/fp16, gradient accumulation (ga2), ZeRO-3 with the default persistence
# threshold (z3-bf16: every parameter of the tiny model stays gathered) and 0 (t0: all sharded),
# a noise variant, and DeepSpeed from accelerate's plugin (no deepspeed= in the arguments)
# (z0-fp32-gaussian: a checkpoint saved in eval mode must not get a second x̃₀ placed on resume)
DS_CONFIGS = ["z0-fp32", "z0-fp32-gaussian", "z0-bf16", "z1-fp16", "z1-bf16-gaussian",
              "z2-bf16-ga2", "z2-fp32-plugin", "z3-bf16", "z3-fp16-t0"]


def _deepspeed_trainer_cmd(out, configs, n=2):
    launcher = shutil.which("deepspeed") or os.path.join(os.path.dirname(sys.executable),
                                                          "deepspeed")
    return [launcher, "--num_gpus", str(n), "--no_local_rank", "--master_port", str(free_port()),
            DS_WORKER, "--configs", *configs, "--out", str(out)]


@pytest.fixture(scope="module")
def deepspeed_trainer(tmp_path_factory):
    """One `deepspeed` launch (2 CPU processes, gloo) over every configuration and I1."""
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("trainer_deepspeed")
    run([_deepspeed_trainer_cmd(out, DS_CONFIGS + ["i1"])], accelerate_use_cpu=False)
    loaded = {c: load_results(str(out), f"trainer_ds_{c}", 2) for c in DS_CONFIGS + ["i1"]}
    for config, ranks in loaded.items():
        for r in ranks:
            assert "error" not in r, f"{config}:\n{r['error']}"
    return loaded


@pytest.mark.slow
@pytest.mark.parametrize("config", DS_CONFIGS)
def test_trainer_with_deepspeed_trains_saves_and_resumes_the_anchor(deepspeed_trainer, config):
    """optimizer_cls_and_kwargs + TrainingArguments(deepspeed=...) + attach(trainer): the engine
    steps ExtrapAdam through the adapter, ranks sit at their own x̃ (ZeRO-3: one mixed point),
    every checkpoint (also checkpoint-4, saved without an evaluation), save_model and
    push_to_hub hold the anchor, every rank saves its own state, and resume is bit-identical."""
    stage = int(config[1])
    precision = config.split("-")[1]
    for rank, r in enumerate(deepspeed_trainer[config]):
        assert r["world_size"] == 2 and r["engine"] == "DeepSpeedEngine" and r["stage"] == stage
        assert (r["bf16"], r["fp16"]) == (precision == "bf16", precision == "fp16")
        assert r["gradient_accumulation_steps"] == (2 if config.endswith("ga2") else 1)
        assert r["optimizer"] == ("ExtrapSGD" if "gaussian" in config else "ExtrapAdam")
        assert r["global_steps"] == 8
        if "plugin" in config:  # accelerate writes {"device": "none"} sections: not offload
            assert r["offload_sections"] == ["offload_optimizer", "offload_param"]
        assert r["displaced"] and r["anchors_equal_across_ranks"]
        assert r["points_equal_across_ranks"] == (stage == 3)
        for step, c in r["checkpoints"].items():
            assert c["local_file"], (rank, step)
        for when in ("mid_training", "after_training"):
            assert r[when]["points_untouched"], (rank, when)
        for step, resumed in r["resume"].items():
            assert resumed == {"point": True, "anchor": True, "master": True}, (rank, step)
    main = deepspeed_trainer[config][0]
    assert main["checkpoints"][TRAIN_MODE_CKPT]["training_at_save"]
    for step, c in main["checkpoints"].items():
        assert c["weights_are_anchor"] and c["weights_differ_from_point"], step
    assert main["mid_training"]["training"]
    for when in ("mid_training", "after_training"):
        s = main[when]
        assert s["save_model_is_anchor"] and s["save_model_differs_from_point"], when
        assert s["push_to_hub_is_anchor"], when


@pytest.mark.slow
def test_trainer_with_deepspeed_refuses_a_resume_it_cannot_continue_on_every_rank(
    deepspeed_trainer,
):
    """A checkpoint lacking rank 1's file, or saved by 4 processes, raises on both ranks
    (one rank raising alone would leave the other waiting in a collective)."""
    for r in deepspeed_trainer["z2-bf16-ga2"]:
        refusals = r["resume_refusals"]
        assert "per-rank state for 1 of 2 ranks" in refusals["rank1_file_missing"]
        assert "saved with 4 processes" in refusals["other_world_size"]
        for message in refusals.values():
            assert "resume with the number of processes that saved it" in message


@pytest.mark.slow
def test_trainer_with_deepspeed_i1_extrap_scale_zero_is_torch_adamw(deepspeed_trainer):
    for r in deepspeed_trainer["i1"]:
        assert r["moved"] and r["bit_identical"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (NCCL, fp16 kernels)")
def test_trainer_with_deepspeed_on_gpu(tmp_path):  # pragma: no cover - run on a GPU machine
    """The same worker on CUDA devices (NCCL), where the Trainer needs no CPU workaround."""
    n = min(2, torch.cuda.device_count())
    run([_deepspeed_trainer_cmd(tmp_path, ["z2-bf16-ga2", "z1-fp16"], n)],
        accelerate_use_cpu=False)
    for config in ("z2-bf16-ga2", "z1-fp16"):
        for r in load_results(str(tmp_path), f"trainer_ds_{config}", n):
            assert "error" not in r, r.get("error")
            assert all(v == {"point": True, "anchor": True, "master": True}
                       for v in r["resume"].values())


def test_attach_refuses_auto_find_batch_size(tmp_path):
    """An out-of-memory retry rebuilds the optimizer from a model holding x̃."""
    trainer = _trainer(tmp_path, optimizer_cls_and_kwargs=(ExtrapAdam, {"lr": 1e-3}),
                       auto_find_batch_size=True)  # fmt: skip
    with pytest.raises(NotImplementedError, match="auto_find_batch_size.*per_device_train_batch"):
        extrap_accel.attach(trainer)


def test_import_extrap_accel_does_not_import_transformers():
    code = "import sys, extrap_accel; sys.exit('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cpu_env()).returncode == 0
