"""Load the v0.1 checkpoints in tests/fixtures/v0_1 and continue them, on each rank of a launch.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 tests/distributed/legacy_checkpoint_worker.py \
        --fixtures tests/fixtures/v0_1 --out /tmp/r

For each case (accelerate + DDP with ExtrapSGD, DeepSpeed ZeRO-2 fp32 with ExtrapSGD, the HF
Trainer + DDP with ExtrapAdam) this copies the fixture into ``<out>/work``, builds a fresh model
(initialised with another seed than the one that wrote the checkpoint, so nothing passes unless
the load restores it) and optimizer, loads the checkpoint through the public API only
(``accelerator.load_state`` after ``extrap_accel.prepare``; ``engine.load_checkpoint`` after
``extrap_accel.attach(engine, optimizer)``; ``trainer.train(resume_from_checkpoint=...)`` after
``extrap_accel.attach(trainer)``) and trains the same 2 more steps on the same batches as the
run that wrote the expected values. It records this rank's anchor and x̃ (``optimizer.anchor``
/ ``optimizer.extrapolated``; under DeepSpeed ``adapter.anchor`` / ``adapter.point``) right
after the load and after the 2 steps, in ``<out>/legacy_<case>_rank<r>.json``;
tests/test_legacy_checkpoints.py compares them with tests/fixtures/v0_1/expected.json.

Everything below the imports (model, data, hyper-parameters) is what wrote the fixtures
(tests/fixtures/make_legacy_checkpoints.py imports it): changing any of it invalidates them.

``EXTRAP_ACCEL_SRC=<dir>`` puts ``<dir>`` first on ``sys.path`` (tests/launch.py puts this
checkout first), e.g. to run this against the release that wrote the fixtures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import traceback

_SRC = os.environ.get("EXTRAP_ACCEL_SRC")
if _SRC:
    sys.path.insert(0, os.path.abspath(_SRC))
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # fixtures were written on the CPU

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

import extrap_accel  # noqa: E402

# ---------------------------------------------------------------------- what wrote the fixtures
WORLD_SIZE = 2
SAVED_STEPS = 3  # steps 0, 1, 2 before the checkpoint
CONTINUED_STEPS = 2  # steps 3, 4 after it
BATCH = 4  # per rank and step
MODEL_SEED = 0  # the model that wrote the checkpoint
FRESH_SEED = 1  # the model a checkpoint is loaded into
SGD_KWARGS = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)  # extrapolation: past
ADAM_KWARGS = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=1e-2)  # extrapolation: past
PARAMETERS = ["0.weight", "0.bias", "2.weight", "2.bias"]

# case -> folder inside the fixture directory that the public API loads
CASES = {
    "accelerate_ddp": "accelerate_ddp",  # accelerator.save_state / load_state
    "deepspeed_zero2": "deepspeed_zero2",  # engine.save_checkpoint / load_checkpoint
    "trainer_ddp": "trainer_ddp/checkpoint-3",  # Trainer checkpoint / resume_from_checkpoint
}


def make_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s inputs and targets at training step ``step`` (0-based), every case."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(BATCH, 4, generator=g), torch.randn(BATCH, 3, generator=g)


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out, y)


def ds_config() -> dict:
    return {
        "train_micro_batch_size_per_gpu": BATCH,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # DeepSpeed 0.19 defaults it to 1.0
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": 2},
        "steps_per_print": 10**9,
    }


class RegressionModel(nn.Module):
    """The Trainer's model: the same network, ``forward`` returns ``{"loss": ...}``. Records
    the inputs of every training forward (to check the Trainer fed the expected batches)."""

    def __init__(self, seed: int):
        super().__init__()
        self.net = make_net(seed)
        self.seen: list[torch.Tensor] = []

    def forward(self, x, labels=None):
        if torch.is_grad_enabled():
            self.seen.append(x.detach().clone())
        out = self.net(x)
        return {"loss": loss_fn(out, labels), "logits": out}


class Samples(torch.utils.data.Dataset):
    """Global batch 2t + r is ``batch(r, t)``: a sequential loader sharded by accelerate (batch
    i to rank i mod 2) gives rank r at step t exactly ``batch(r, t)``."""

    def __init__(self, steps: int = SAVED_STEPS + CONTINUED_STEPS):
        xs, ys = [], []
        for t in range(steps):
            for r in range(WORLD_SIZE):
                x, y = batch(r, t)
                xs.append(x)
                ys.append(y)
        self.x, self.y = torch.cat(xs), torch.cat(ys)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def make_trainer(model: RegressionModel, optimizer, output_dir: str, callbacks=()):
    """``Trainer(optimizers=(optimizer, None))`` (the Trainer builds its linear schedule over
    5 steps), 2 gloo ranks on the CPU, no clipping, batches in a fixed order."""
    from torch.utils.data import DataLoader
    from transformers import Trainer, TrainingArguments

    class SequentialTrainer(Trainer):
        def get_train_dataloader(self):  # documented override point; no shuffling
            loader = DataLoader(self.train_dataset, shuffle=False, collate_fn=self.data_collator,
                                batch_size=self.args.per_device_train_batch_size)
            return self.accelerator.prepare(loader)

    args = TrainingArguments(
        output_dir=output_dir, use_cpu=True, ddp_backend="gloo", report_to="none", seed=0,
        max_steps=SAVED_STEPS + CONTINUED_STEPS, per_device_train_batch_size=BATCH,
        save_strategy="steps", save_steps=SAVED_STEPS, logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, max_grad_norm=0.0,
    )  # fmt: skip
    return SequentialTrainer(model=model, args=args, train_dataset=Samples(),
                             optimizers=(optimizer, None), callbacks=list(callbacks))  # fmt: skip


def flat(tensors) -> list[float]:
    """float32 values as Python floats (exact; JSON round-trips them)."""
    return torch.cat([t.detach().float().reshape(-1).cpu() for t in tensors]).tolist()


def snapshot(anchor, point, params) -> dict:
    return {"anchor": flat(anchor(p) for p in params), "point": flat(point(p) for p in params)}


def seen_as_expected(seen: list[torch.Tensor], rank: int, steps) -> bool:
    return len(seen) == len(steps) and all(torch.equal(x, batch(rank, t)[0])
                                           for x, t in zip(seen, steps))  # fmt: skip


def package_info() -> dict:
    return {"version": getattr(extrap_accel, "__version__", None),
            "file": os.path.abspath(extrap_accel.__file__)}  # fmt: skip


def init_process_group() -> None:
    if not dist.is_initialized():  # short timeout: a rank that failed must not hang the other
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=90))


# ---------------------------------------------------------------------- continuing each case
def continue_accelerate(folder: str, work: str) -> dict:
    from accelerate import Accelerator

    rank = dist.get_rank()
    accelerator = Accelerator(cpu=True)
    net = make_net(FRESH_SEED)
    opt = extrap_accel.ExtrapSGD(net.parameters(), **SGD_KWARGS)
    model, optimizer = extrap_accel.prepare(accelerator, net, opt)
    accelerator.load_state(folder)
    params = list(net.parameters())
    res = {"after_load": snapshot(opt.anchor, opt.extrapolated, params)}
    steps = range(SAVED_STEPS, SAVED_STEPS + CONTINUED_STEPS)
    for t in steps:
        x, y = batch(rank, t)
        accelerator.backward(loss_fn(model(x), y))
        optimizer.step()
        optimizer.zero_grad()
    res["after_continue"] = snapshot(opt.anchor, opt.extrapolated, params)
    res["batches_as_expected"] = True
    return res


def continue_deepspeed(folder: str, work: str) -> dict:
    import deepspeed

    rank = dist.get_rank()
    net = make_net(FRESH_SEED)
    opt = extrap_accel.ExtrapSGD(net.parameters(), **SGD_KWARGS)
    engine, *_ = deepspeed.initialize(model=net, optimizer=opt, config=ds_config())
    adapter = extrap_accel.attach(engine, opt)
    path, _ = engine.load_checkpoint(folder)
    if path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint in {folder}")
    params = list(engine.module.parameters())
    res = {"after_load": snapshot(adapter.anchor, adapter.point, params)}
    for t in range(SAVED_STEPS, SAVED_STEPS + CONTINUED_STEPS):
        x, y = batch(rank, t)
        engine.backward(loss_fn(engine(x), y))
        engine.step()
    res["after_continue"] = snapshot(adapter.anchor, adapter.point, params)
    res["batches_as_expected"] = True
    return res


def continue_trainer(folder: str, work: str) -> dict:
    from transformers import TrainerCallback

    rank = dist.get_rank()
    model = RegressionModel(FRESH_SEED)
    opt = extrap_accel.ExtrapAdam(model.parameters(), **ADAM_KWARGS)
    params = list(model.parameters())
    res: dict = {}

    class AfterLoad(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if "after_load" not in res:  # the first step after the resume, before its forward
                res["after_load"] = snapshot(opt.anchor, opt.extrapolated, params)
                res["resumed_at_step"] = state.global_step

    trainer = make_trainer(model, opt, os.path.join(work, "trainer_run"), [AfterLoad()])
    extrap_accel.attach(trainer)
    trainer.train(resume_from_checkpoint=folder)
    res["after_continue"] = snapshot(opt.anchor, opt.extrapolated, params)
    res["final_global_step"] = trainer.state.global_step
    res["batches_as_expected"] = seen_as_expected(
        model.seen, rank, range(SAVED_STEPS, SAVED_STEPS + CONTINUED_STEPS))
    return res


CONTINUE = {"accelerate_ddp": continue_accelerate, "deepspeed_zero2": continue_deepspeed,
            "trainer_ddp": continue_trainer}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fixtures", required=True, help="e.g. tests/fixtures/v0_1")
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    cli = parser.parse_args()
    init_process_group()
    rank = dist.get_rank()
    for case in cli.cases:
        work = os.path.join(cli.out, "work", case)
        if rank == 0:  # a private copy: loading must not depend on (or change) the fixture
            shutil.rmtree(work, ignore_errors=True)  # (a retried launch reuses it)
            shutil.copytree(os.path.join(cli.fixtures, case), os.path.join(work, "fixture"))
        dist.barrier()
        folder = os.path.join(work, "fixture", os.path.relpath(CASES[case], case))
        try:
            res = CONTINUE[case](os.path.normpath(folder), work)
        except Exception:
            res = {"error": traceback.format_exc()}
        res.update(rank=rank, world_size=dist.get_world_size(), extrap_accel=package_info())
        with open(os.path.join(cli.out, f"legacy_{case}_rank{rank}.json"), "w") as f:
            json.dump(res, f)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
