"""Every Hugging Face Trainer check, on one process or on each rank of a real DDP launch.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 tests/distributed/trainer_worker.py --out /tmp/r

Each rank writes ``<out>/trainer_rank<r>.json`` with measured quantities; tests/test_trainer.py
asserts on them (and imports ``run_checks`` to run the same checks in one process).

For each way of giving the Trainer an extrap_accel optimizer (``optimizers=`` with ExtrapAdam,
``optimizer_cls_and_kwargs`` with ExtrapAdam and 2 gradient-accumulation steps, ``optimizers=``
with gaussian-noise ExtrapSGD) a tiny GPT-2 (tied embeddings) trains 8 steps, saving every 2
steps and evaluating every 3 (and at the end), so checkpoint-4 is saved in train mode (no
evaluation at that step) and checkpoint-6 right after an evaluation. ``save_model`` and
``push_to_hub`` (the Hub faked) run at step 5 from a callback, in train mode, and after
training. Then two fresh runs resume from checkpoint-4 and checkpoint-6.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.utils.data import Dataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import extrap_accel  # noqa: E402
from extrap_accel import ExtrapAdam, ExtrapSGD  # noqa: E402

MAX_STEPS, SAVE_STEPS, EVAL_STEPS = 8, 2, 3
TRAIN_MODE_CKPT, EVAL_MODE_CKPT = 4, 6  # saved without / right after an evaluation
MID_SAVE_STEP = 5  # save_model and push_to_hub from a callback: no checkpoint or evaluation
MODES = ("optimizers", "cls_and_kwargs", "optimizers_gaussian")
ADAM_KWARGS = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=1e-2)


class TokenData(Dataset):
    """Random token sequences for causal LM (labels = inputs)."""

    def __init__(self, n: int, seed: int, length: int = 8, vocab: int = 64):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def make_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0)  # fmt: skip
    return GPT2LMHeadModel(config)


def make_args(output_dir: str, **overrides):
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=output_dir, use_cpu=True, report_to="none", seed=0,
        max_steps=MAX_STEPS, per_device_train_batch_size=4, per_device_eval_batch_size=4,
        save_strategy="steps", save_steps=SAVE_STEPS, eval_strategy="steps",
        eval_steps=EVAL_STEPS, logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, max_grad_norm=0.0,  # no clipping: I6 compares .grad as is
    )  # fmt: skip
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        kwargs["ddp_backend"] = "gloo"  # torchrun on CPU
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def make_trainer(mode: str, output_dir: str, callbacks=(), **arg_overrides):
    from transformers import Trainer, get_linear_schedule_with_warmup

    model = make_model()
    if mode == "cls_and_kwargs":  # also covers gradient accumulation
        arg_overrides.setdefault("gradient_accumulation_steps", 2)
    args = make_args(output_dir, **arg_overrides)
    kwargs = dict(model=model, args=args, train_dataset=TokenData(64, seed=1),
                  eval_dataset=TokenData(8, seed=2), callbacks=list(callbacks))  # fmt: skip
    if mode == "optimizers":
        opt = ExtrapAdam(model.parameters(), **ADAM_KWARGS)
        kwargs["optimizers"] = (opt, get_linear_schedule_with_warmup(opt, 2, MAX_STEPS))
    elif mode == "optimizers_gaussian":
        opt = ExtrapSGD(model.parameters(), lr=0.1, momentum=0.9, extrapolation="gaussian",
                        noise_scale=1e-2, seed=3)  # fmt: skip
        kwargs["optimizers"] = (opt, None)  # the Trainer builds its linear schedule
    elif mode == "cls_and_kwargs":
        kwargs["optimizer_cls_and_kwargs"] = (ExtrapAdam, dict(ADAM_KWARGS))
    else:
        raise ValueError(mode)
    return Trainer(**kwargs)


def extrap_optimizer(trainer):
    opt = trainer.optimizer
    while not isinstance(opt, extrap_accel.ExtrapOptimizer):
        opt = opt.optimizer
    return opt


def snapshot(trainer) -> dict:
    """name -> (anchor, this rank's x̃, what the parameter holds now), cloned."""
    opt = extrap_optimizer(trainer)
    return {
        "training": opt.training,
        "anchor": {n: opt.anchor(p).clone() for n, p in trainer.model.named_parameters()},
        "point": {n: opt.extrapolated(p).clone() for n, p in trainer.model.named_parameters()},
        "param": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
    }


def _recorder_class():
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        """Snapshots the live optimizer at every save (on_save runs right after the save)."""

        def __init__(self, trainer_ref: list):
            self.trainer_ref = trainer_ref
            self.saves: dict[int, dict] = {}

            self.i6_err: list[float] = []
            self.mid: dict = {}
            self.start: dict = {}

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 0:  # x̃₀: x₀ + this rank's noise for the noise variants
                first = snapshot(self.trainer_ref[0])
                self.start = {
                    "displaced": differs(first["anchor"], first["point"]),
                    "anchors_equal_across_ranks": equal_across_ranks(first["anchor"]),
                    "points_equal_across_ranks": equal_across_ranks(first["point"]),
                }

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == MID_SAVE_STEP:
                trainer = self.trainer_ref[0]
                self.mid = save_and_push(trainer, os.path.join(args.output_dir, "mid_saved"))

        def on_save(self, args, state, control, **kwargs):
            self.saves[state.global_step] = snapshot(self.trainer_ref[0])

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            """I6: the mean over ranks of this rank's gᵏ is the averaged .grad of the step."""
            opt = extrap_optimizer(self.trainer_ref[0])
            params = [p for p in opt.managed_params() if p.grad is not None]
            local = torch.cat([opt.local_grad(p).reshape(-1) for p in params])
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(local)
                local /= dist.get_world_size()
            grad = torch.cat([p.grad.reshape(-1) for p in params])
            self.i6_err.append(float((local - grad).abs().max() / grad.abs().max()))

    return Recorder


def same(a: dict, b: dict) -> bool:
    """Every tensor of ``a`` equals (bit for bit) the one of the same name in ``b``."""
    return all(torch.equal(a[n], b[n]) for n in a)


def differs(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[n], b[n]) for n in a)


def saved_weights(folder: str, names) -> dict | None:
    path = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(path):
        return None
    weights = load_file(path)
    missing = [n for n in names if n not in weights]
    if missing:
        raise AssertionError(f"{path} lacks {missing}")
    return {n: weights[n] for n in names}


def equal_across_ranks(tensors: dict) -> bool:
    if not (dist.is_available() and dist.is_initialized()):
        return True
    flat = torch.cat([t.float().reshape(-1) for t in tensors.values()])  # (bf16: gloo)
    out = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(out, flat)
    return all(torch.equal(o, out[0]) for o in out)


def fake_push_to_hub(trainer) -> dict:
    """trainer.push_to_hub() with the Hub replaced by a recorder of the folder it uploads."""
    import transformers.trainer as trainer_module

    uploaded = {}

    def upload_folder(folder_path, **kwargs):
        uploaded.update(load_file(os.path.join(folder_path, "model.safetensors")))

    def init_hf_repo(*args, **kwargs):
        trainer.hub_model_id = "local/extrap-test"

    # transformers 5 calls hf_api().upload_folder, 4.x huggingface_hub.upload_folder
    name, fake = (("hf_api", lambda: types.SimpleNamespace(upload_folder=upload_folder))
                  if hasattr(trainer_module, "hf_api") else ("upload_folder", upload_folder))
    original = getattr(trainer_module, name)
    setattr(trainer_module, name, fake)
    trainer.init_hf_repo = init_hf_repo
    trainer.create_model_card = lambda **kwargs: None
    try:
        trainer.push_to_hub()
    finally:
        setattr(trainer_module, name, original)
    return uploaded


def save_and_push(trainer, save_dir: str) -> dict:
    """trainer.save_model and push_to_hub write the anchor (checked on the main process)."""
    live = snapshot(trainer)
    names = list(live["anchor"])
    trainer.save_model(save_dir)
    pushed = fake_push_to_hub(trainer)
    res = {"training": live["training"],
           "params_untouched": same(snapshot(trainer)["param"], live["param"])}  # fmt: skip
    if trainer.args.process_index == 0:
        weights = saved_weights(save_dir, names)
        pushed = {n: pushed[n] for n in names}
        res["save_model_is_anchor"] = same(weights, live["anchor"])
        res["save_model_differs_from_point"] = differs(weights, live["point"])
        res["push_to_hub_is_anchor"] = same(pushed, live["anchor"])
        res["push_to_hub_differs_from_point"] = differs(pushed, live["point"])
    return res


def run_mode(mode: str, root: str) -> dict:
    Recorder = _recorder_class()
    rank = int(os.environ.get("RANK", "0"))
    main = rank == 0
    res: dict = {}

    # ---- uninterrupted run
    ref: list = []
    recorder = Recorder(ref)
    full_dir = os.path.join(root, mode, "full")
    trainer = make_trainer(mode, full_dir, callbacks=[recorder])
    ref.append(trainer)
    handle = extrap_accel.attach(trainer)
    res["attach_returns_callback"] = type(handle).__name__ == "ExtrapTrainerCallback"
    res["attach_idempotent"] = extrap_accel.attach(trainer) is handle
    trainer.train()
    names = [n for n, _ in trainer.model.named_parameters()]
    final = snapshot(trainer)
    res["world_size"] = trainer.args.world_size
    res["gradient_accumulation_steps"] = trainer.args.gradient_accumulation_steps
    res["captures_local_grads"] = extrap_optimizer(trainer).captures_local_grads
    res["i6_rel_err"] = recorder.i6_err
    res["start"] = recorder.start
    res["final_displaced"] = differs(final["anchor"], final["point"])
    res["anchors_equal_across_ranks"] = equal_across_ranks(final["anchor"])
    res["points_equal_across_ranks"] = equal_across_ranks(final["point"])

    res["checkpoints"] = {}
    for step in range(SAVE_STEPS, MAX_STEPS + 1, SAVE_STEPS):
        folder = os.path.join(full_dir, f"checkpoint-{step}")
        live = recorder.saves[step]
        c = {"training_at_save": live["training"]}
        local_path = os.path.join(folder, f"extrap_accel_rank{rank}.pt")
        c["local_file"] = os.path.isfile(local_path)
        if c["local_file"]:
            local = torch.load(local_path, weights_only=True)["optimizers"][0]
            opt = extrap_optimizer(trainer)
            index = {i: n for i, p in enumerate(opt.managed_params())
                     for n, q in trainer.model.named_parameters() if q is p}  # fmt: skip
            points = {index[i]: e["extrapolated"] for i, e in local["state"].items()}
            c["local_rank"] = local["rank"]
            c["local_point_is_live_point"] = set(points) == set(names) and same(
                points, live["point"]
            )
        if main:
            weights = saved_weights(folder, names)
            c["weights_are_anchor"] = same(weights, live["anchor"])
            c["weights_differ_from_point"] = differs(weights, live["point"])
        res["checkpoints"][step] = c

    # save_model and push_to_hub: at step 5 from the recorder (train mode, no evaluation or
    # checkpoint at that step) and after training (the Trainer evaluates at the last step)
    res["mid_training"] = recorder.mid
    res["after_training"] = save_and_push(trainer, os.path.join(root, mode, "saved"))

    # ---- resumed runs: bit-identical final parameters (x̃) and anchors on every rank
    res["resume"] = {}
    for step in (TRAIN_MODE_CKPT, EVAL_MODE_CKPT):
        resumed = make_trainer(mode, os.path.join(root, mode, f"resume{step}"))
        extrap_accel.attach(resumed)
        resumed.train(resume_from_checkpoint=os.path.join(full_dir, f"checkpoint-{step}"))
        got = snapshot(resumed)
        res["resume"][step] = {
            "params_bit_identical": same(got["param"], final["param"]),
            "anchors_bit_identical": same(got["anchor"], final["anchor"]),
            "points_bit_identical": same(got["point"], final["point"]),
        }
    if mode == "cls_and_kwargs" and dist.is_available() and dist.is_initialized():
        res["resume_without_local_files"] = resume_without_local_files(mode, root, full_dir)
    return res


def resume_without_local_files(mode: str, root: str, full_dir: str) -> str:
    """Resuming a checkpoint in which rank 1's file is gone raises on every rank (no rank may
    continue from the main process's x̃, and none may hang); returns the error message."""
    import shutil

    folder = os.path.join(root, mode, "no_local_files")
    if dist.get_rank() == 0:
        shutil.rmtree(folder, ignore_errors=True)  # a retried launch reuses it
        shutil.copytree(os.path.join(full_dir, f"checkpoint-{TRAIN_MODE_CKPT}"), folder)
        os.remove(os.path.join(folder, "extrap_accel_rank1.pt"))
    dist.barrier()
    resumed = make_trainer(mode, os.path.join(root, mode, "no_local_files_run"))
    extrap_accel.attach(resumed)
    try:
        resumed.train(resume_from_checkpoint=folder)
        return ""
    except ValueError as e:
        return str(e)


def run_checks(root: str, modes=MODES) -> dict:
    return {mode: run_mode(mode, root) for mode in modes}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--modes", default=",".join(MODES))
    cli = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    root = os.path.join(cli.out, "runs")  # shared by the ranks, as an output_dir must be
    results = run_checks(root, cli.modes.split(","))
    results["rank"] = rank
    with open(os.path.join(cli.out, f"trainer_rank{rank}.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
