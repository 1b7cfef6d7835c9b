"""Hugging Face Trainer + DeepSpeed checks on each rank of one real launch, several configs.

    OMP_NUM_THREADS=1 deepspeed --num_gpus 2 --no_local_rank \
        tests/distributed/trainer_deepspeed_worker.py --configs z2-bf16-ga2 ... --out /tmp/r

Each configuration trains a tiny GPT-2 with ``Trainer(..., optimizer_cls_and_kwargs=
(ExtrapAdam, {...}), args=TrainingArguments(deepspeed={...}))`` and ``extrap_accel.attach
(trainer)`` for 8 steps, saving every 2 and evaluating every 3 steps (checkpoint-4 is saved
without an evaluation, checkpoint-6 right after one), ``save_model`` + ``push_to_hub`` (the Hub
faked) from a callback at step 5; then fresh Trainers resume from checkpoint-4 and -6. Tags:
``z<stage>-<fp32|bf16|fp16>[-ga2]`` (ZeRO-3 with DeepSpeed's default persistence threshold: the
tiny model's parameters all stay gathered); ``i1`` compares ExtrapAdam(extrap_scale=0) with torch's
AdamW through the same Trainer + ZeRO-2. Each rank writes
``<out>/trainer_ds_<tag>_rank<r>.json``; tests/test_trainer.py asserts on it.

On CPU the Trainer's DeepSpeed setup sees one process unless the process group is set up
first: a ``PartialState`` with the gloo backend created for DeepSpeed, which the Trainer then
uses (``accelerator_config={"use_configured_state": True}``). fp16 runs through DeepSpeed's CPU
switch (DESIGN.md). On a GPU machine neither is needed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import extrap_accel  # noqa: E402
from trainer_worker import (  # noqa: E402
    TokenData,
    differs,
    equal_across_ranks,
    fake_push_to_hub,
    make_model,
    same,
    saved_weights,
)

MAX_STEPS, SAVE_STEPS, EVAL_STEPS = 8, 2, 3
TRAIN_MODE_CKPT, EVAL_MODE_CKPT = 4, 6
MID_SAVE_STEP = 5
ADAM_KWARGS = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=1e-2)
CUDA = torch.cuda.is_available()


def ds_config(stage: int, threshold: int | None = None) -> dict:
    zero = {"stage": stage}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # save_model writes weights
        if threshold is not None:
            zero["stage3_param_persistence_threshold"] = threshold
    return {
        "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "zero_optimization": zero, "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto", "initial_scale_power": 10, "hysteresis": 1},
    }  # fmt: skip


# DeepSpeed from accelerate's plugin, as `accelerate launch --use_deepspeed --zero_stage 2` sets
# it: no deepspeed= in the TrainingArguments, offload sections with device "none"
PLUGIN_ENV = {
    "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
    "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "none",
    "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "none", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "1",
}  # fmt: skip


def make_trainer(tag: str, output_dir: str, callbacks=(), optimizer=None):
    """``z<stage>-<precision>[-ga2|-t0|-gaussian|-plugin]``: ``t0`` sets ZeRO-3's persistence
    threshold to 0 (every parameter sharded), ``gaussian`` trains ExtrapSGD with gaussian noise,
    ``plugin`` takes DeepSpeed from accelerate's plugin instead of ``TrainingArguments``."""
    from accelerate.state import AcceleratorState
    from transformers import Trainer, TrainingArguments

    stage, precision, *rest = tag.split("-")
    AcceleratorState._reset_state()  # one Accelerator per Trainer; keeps the process group
    model = make_model()
    deepspeed = ds_config(int(stage[1:]), threshold=0 if "t0" in rest else None)
    args = TrainingArguments(
        output_dir=output_dir, report_to="none", seed=0, max_steps=MAX_STEPS,
        per_device_train_batch_size=4, per_device_eval_batch_size=4,
        gradient_accumulation_steps=2 if "ga2" in rest else 1,
        save_strategy="steps", save_steps=SAVE_STEPS, eval_strategy="steps",
        eval_steps=EVAL_STEPS, logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, max_grad_norm=0.0,
        deepspeed=None if "plugin" in rest else deepspeed,
        bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=not CUDA,
        accelerator_config={"use_configured_state": True},
    )  # fmt: skip
    if optimizer is None and "gaussian" in rest:
        optimizer = (extrap_accel.ExtrapSGD, dict(lr=0.1, momentum=0.9, extrapolation="gaussian",
                                                  noise_scale=1e-2, seed=3))  # fmt: skip
    optimizer = optimizer or (extrap_accel.ExtrapAdam, dict(ADAM_KWARGS))
    saved_env = {k: os.environ.get(k) for k in PLUGIN_ENV}
    if "plugin" in rest:
        os.environ.update(PLUGIN_ENV)
    try:
        return Trainer(model=model, args=args, train_dataset=TokenData(64, seed=1),
                       eval_dataset=TokenData(8, seed=2), callbacks=list(callbacks),
                       optimizer_cls_and_kwargs=optimizer)  # fmt: skip
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _whole(p, shard: torch.Tensor) -> torch.Tensor:
    """ZeRO-3: the full tensor from every rank's piece ``shard`` of ``p`` (a collective)."""
    if not hasattr(p, "ds_tensor"):
        return shard.detach().clone()
    padded = torch.zeros(p.ds_tensor.ds_numel, dtype=shard.dtype, device=shard.device)
    padded[: shard.numel()] = shard.reshape(-1)
    pieces = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
    dist.all_gather(pieces, padded)
    return torch.cat(pieces)[: p.ds_numel].view(p.ds_shape).clone()


def snapshot(trainer) -> dict:
    """name -> whole bit16 (or fp32) anchor, whole point this rank computes at, fp32 master."""
    from deepspeed.utils import safe_get_full_fp32_param

    adapter = trainer.model_wrapped._extrap_accel_adapter
    named = list(trainer.model.named_parameters())
    return {
        "training": adapter.training if not adapter.direct else adapter.optimizer.training,
        "anchor": {n: _whole(p, adapter.anchor(p)) for n, p in named},
        "point": {n: _whole(p, adapter.point(p)) for n, p in named},
        "master": {n: _master(adapter, p, safe_get_full_fp32_param) for n, p in named},
    }


def _master(adapter, p, full_fp32):
    """The fp32 master of ``p`` (ZeRO-0 bf16 keeps no mapping to it: the adapter's copy)."""
    master = None if adapter.direct else full_fp32(p)
    return (adapter.anchor(p) if master is None else master).detach().float().clone()


def _recorder(trainer_ref: list):
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def __init__(self):
            self.saves: dict[int, dict] = {}
            self.mid: dict = {}

        def on_save(self, args, state, control, **kwargs):
            self.saves[state.global_step] = snapshot(trainer_ref[0])

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == MID_SAVE_STEP:
                self.mid = save_and_push(trainer_ref[0], os.path.join(args.output_dir, "mid"))

    return Recorder()


def save_and_push(trainer, save_dir: str) -> dict:
    live = snapshot(trainer)
    trainer.save_model(save_dir)
    pushed = fake_push_to_hub(trainer)
    res = {"training": live["training"], "points_untouched": same(snapshot(trainer)["point"],
                                                                   live["point"])}  # fmt: skip
    if trainer.args.process_index == 0:
        weights = saved_weights(save_dir, list(live["anchor"]))
        res["save_model_is_anchor"] = same(weights, live["anchor"])
        res["save_model_differs_from_point"] = differs(weights, live["point"])
        res["push_to_hub_is_anchor"] = same({n: pushed[n] for n in live["anchor"]}, live["anchor"])
    return res


def check_config(tag: str, root: str) -> dict:
    rank = dist.get_rank()
    ref: list = []
    recorder = _recorder(ref)
    full_dir = os.path.join(root, tag, "full")
    trainer = make_trainer(tag, full_dir, callbacks=[recorder])
    ref.append(trainer)
    extrap_accel.attach(trainer)
    trainer.train()
    engine = trainer.model_wrapped
    adapter = engine._extrap_accel_adapter
    final = snapshot(trainer)
    res = {
        "world_size": trainer.args.world_size,
        "engine": type(engine).__name__,
        "stage": engine.zero_optimization_stage(),
        "bf16": engine.bfloat16_enabled(), "fp16": engine.fp16_enabled(),
        "gradient_accumulation_steps": engine.gradient_accumulation_steps(),
        "optimizer": type(adapter.optimizer).__name__,
        "offload_sections": sorted(k for k in engine.config.get("zero_optimization", {})
                                   if k.startswith("offload")),
        "global_steps": engine.global_steps,
        "displaced": differs(final["anchor"], final["point"]),
        "anchors_equal_across_ranks": equal_across_ranks(final["anchor"]),
        "points_equal_across_ranks": equal_across_ranks(final["point"]),
        "rounded_to_zero_fraction": adapter.rounded_to_zero_fraction,
    }  # fmt: skip
    res["checkpoints"] = {}
    for step in range(SAVE_STEPS, MAX_STEPS + 1, SAVE_STEPS):
        folder = os.path.join(full_dir, f"checkpoint-{step}")
        live = recorder.saves[step]
        c = {"training_at_save": live["training"],
             "local_file": os.path.isfile(os.path.join(folder, f"global_step{step}",
                                                       f"extrap_accel_rank{rank}.pt"))}  # fmt: skip
        if rank == 0:
            weights = saved_weights(folder, list(live["anchor"]))
            c["weights_are_anchor"] = weights is not None and same(weights, live["anchor"])
            c["weights_differ_from_point"] = weights is not None and differs(weights,
                                                                              live["point"])
        res["checkpoints"][step] = c
    res["mid_training"] = recorder.mid
    res["after_training"] = save_and_push(trainer, os.path.join(root, tag, "saved"))
    res["resume"] = {}
    for step in (TRAIN_MODE_CKPT, EVAL_MODE_CKPT):
        resumed = make_trainer(tag, os.path.join(root, tag, f"resume{step}"))
        extrap_accel.attach(resumed)
        resumed.train(resume_from_checkpoint=os.path.join(full_dir, f"checkpoint-{step}"))
        got = snapshot(resumed)
        res["resume"][step] = {k: same(got[k], final[k]) for k in ("point", "anchor", "master")}
    if "ga2" in tag:
        res["resume_refusals"] = check_resume_refusals(tag, root, full_dir)
    return res


def check_resume_refusals(tag: str, root: str, full_dir: str) -> dict:
    """A checkpoint with rank 1's file missing, or saved with another number of processes,
    fails on every rank (none is left waiting in a collective)."""
    import shutil

    rank = dist.get_rank()
    out = {}
    source = os.path.join(full_dir, f"checkpoint-{TRAIN_MODE_CKPT}")
    for case in ("rank1_file_missing", "other_world_size"):
        folder = os.path.join(root, tag, case)
        if rank == 0:
            shutil.rmtree(folder, ignore_errors=True)  # a retried launch reuses it
            shutil.copytree(source, folder)
            tag_dir = os.path.join(folder, f"global_step{TRAIN_MODE_CKPT}")
            if case == "rank1_file_missing":
                os.remove(os.path.join(tag_dir, "extrap_accel_rank1.pt"))
            else:
                for r in range(dist.get_world_size()):
                    path = os.path.join(tag_dir, f"extrap_accel_rank{r}.pt")
                    local = torch.load(path, weights_only=True)
                    local["optimizers"][0]["world_size"] = 4
                    torch.save(local, path)
        dist.barrier()
        trainer = make_trainer(tag, os.path.join(root, tag, case + "_run"))
        extrap_accel.attach(trainer)
        try:
            trainer.train(resume_from_checkpoint=folder)
            out[case] = ""
        except ValueError as e:
            out[case] = str(e)
        dist.barrier()
    return out


def check_i1(root: str) -> dict:
    """ExtrapAdam(extrap_scale=0) through Trainer + ZeRO-2 == torch.optim.AdamW through it."""
    from deepspeed.utils import safe_get_full_fp32_param

    masters = {}
    for name, optimizer in (("extrap", (extrap_accel.ExtrapAdam, dict(ADAM_KWARGS,
                                                                      extrap_scale=0.0))),
                            ("torch", (torch.optim.AdamW, dict(ADAM_KWARGS)))):  # fmt: skip
        trainer = make_trainer("z2-fp32", os.path.join(root, "i1", name), optimizer=optimizer)
        if name == "extrap":
            extrap_accel.attach(trainer)
        trainer.train()
        masters[name] = {n: safe_get_full_fp32_param(p).clone()
                         for n, p in trainer.model.named_parameters()}  # fmt: skip
    return {"bit_identical": same(masters["extrap"], masters["torch"]),
            "moved": differs(masters["torch"], {n: p.detach().float() for n, p in
                                                make_model().named_parameters()})}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", nargs="+", required=True)
    parser.add_argument("--out", required=True)
    cli = parser.parse_args()
    from accelerate import PartialState
    from deepspeed.accelerator import get_accelerator

    if not CUDA:
        get_accelerator().is_fp16_supported = lambda: True  # DeepSpeed's fp16 paths on CPU
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")  # else the Trainer's DeepSpeed setup sees one process
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
    else:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState()
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
    rank = dist.get_rank()
    root = [tempfile.mkdtemp(prefix="extrap_trainer_ds_")]
    dist.broadcast_object_list(root, src=0)
    os.makedirs(cli.out, exist_ok=True)
    for tag in cli.configs:
        try:
            results = check_i1(root[0]) if tag == "i1" else check_config(tag, root[0])
        except Exception:
            results = {"error": traceback.format_exc()}
        with open(os.path.join(cli.out, f"trainer_ds_{tag}_rank{rank}.json"), "w") as f:
            json.dump(results, f, indent=1)
        dist.barrier()


if __name__ == "__main__":
    main()
