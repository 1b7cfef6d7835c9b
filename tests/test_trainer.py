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
    with pytest.raises(ValueError, match="names an optimizer \\('AdamW'\\).*Remove"):
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
import json, sys, torch, transformers, extrap_accel
from accelerate.state import AcceleratorState
from extrap_accel import ExtrapAdam
torch.manual_seed(0)
config = transformers.GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2,
                                 bos_token_id=0, eos_token_id=0)
ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
      "zero_optimization": {"stage": 1}, "gradient_clipping": 1.0}
errors = {}
for way in ("optimizers", "config_optimizer"):
    AcceleratorState._reset_state(True)  # one DeepSpeed Accelerator per process otherwise
    model = transformers.GPT2LMHeadModel(config)
    if way == "optimizers":
        kwargs = {"optimizers": (ExtrapAdam(model.parameters()), None)}
        cfg = ds
    else:
        kwargs = {"optimizer_cls_and_kwargs": (ExtrapAdam, {"lr": 1e-3})}
        cfg = dict(ds, optimizer={"type": "ExtrapAdam", "params": {"lr": 1e-3}})
    args = transformers.TrainingArguments(sys.argv[1], use_cpu=True, report_to="none",
                                          deepspeed=cfg)
    trainer = transformers.Trainer(model=model, args=args, **kwargs)
    try:
        extrap_accel.attach(trainer)
        errors[way] = None
    except Exception as e:
        errors[way] = [type(e).__name__, str(e), trainer.is_deepspeed_enabled]
print("RESULT " + json.dumps(errors))
"""


def test_a_real_deepspeed_trainer_that_would_drop_the_optimizer_is_refused(tmp_path):
    """TrainingArguments(deepspeed=...) + Trainer(...): an optimizer passed with optimizers=
    (the Trainer would discard it) and a DeepSpeed config naming an optimizer (the Trainer
    would hand that to DeepSpeed) fail at attach, never train with another optimizer.
    In a subprocess: the DeepSpeed setup leaves process-wide accelerate state behind."""
    pytest.importorskip("deepspeed")
    env = cpu_env()
    env.pop("ACCELERATE_USE_CPU")  # with it, accelerate would drop the DeepSpeed plugin
    proc = subprocess.run([sys.executable, "-c", _DEEPSPEED_SCRIPT, str(tmp_path)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    errors = json.loads(lines[0][len("RESULT "):])
    name, message, enabled = errors["optimizers"]
    assert enabled and name == "ValueError" and "optimizer_cls_and_kwargs" in message
    name, message, enabled = errors["config_optimizer"]
    assert enabled and name == "ValueError" and "'ExtrapAdam'" in message


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
