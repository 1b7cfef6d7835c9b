"""Overhead of extrap-SGD against mini-batch SGD in a real 2-process DDP run (gloo, CPU).

One launch, both optimizers in the same processes, interleaved step by step (SGD, extrap-SGD,
SGD, ...) after a warm-up, so that the ratios share the machine's conditions:

* time per training step (forward, backward with the gradient all-reduce, ``optimizer.step()``,
  ``zero_grad``): median over ``--steps`` steps, per rank; ratio extrap / SGD;
* optimizer-state bytes: every tensor in the optimizer's state plus extrap_accel's captured local
  gradients (``local_grad_nbytes()``), per parameter and as a ratio to SGD's momentum buffer;
* collective calls per step: ``gloo:`` events under ``torch.profiler`` (as
  ``extrap_accel.diagnostics.count_collectives``), and the elements they move.

Models: ResNet-20 (full width, 32×32 inputs, local batch 32) and the 2-layer LSTM language model of
benchmarks/reproduce.py (vocabulary 2000, 128 units, 4 rows × 25 tokens per rank).

    python benchmarks/ddp_overhead.py --steps 30 --json outputs/ddp_overhead.json

launches itself as
``ACCELERATE_USE_CPU=1 accelerate launch --config_file accelerate_configs/cpu_2proc.yaml
benchmarks/ddp_overhead.py --worker ...`` (OMP_NUM_THREADS=1) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (REPO, os.path.join(REPO, "recipes")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _multiprocess import free_port, interleaved_times, report, run_ranks  # noqa: E402
from extrap_accel.diagnostics import count_collectives  # noqa: E402

MOMENTUM = 0.9


def make(task: str):
    """(model, batch(rank, t) -> loss closure input, loss_fn)."""
    torch.manual_seed(0)
    if task == "resnet20":
        import vision

        model = vision.ResNetCifar(20, 10, 1.0)

        def batch(rank, t):
            g = torch.Generator().manual_seed(1000 * t + rank)
            return torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)

        def loss_fn(m, b):
            return F.cross_entropy(m(b[0]), b[1])
    elif task == "translate":
        return make_translate()
    else:
        import language_model

        model = language_model.LSTMLanguageModel(2000, 128, 128, 2, dropout=0.2)

        def batch(rank, t):
            g = torch.Generator().manual_seed(1000 * t + rank)
            return torch.randint(0, 2000, (4, 26), generator=g)

        def loss_fn(m, b):
            logits, _ = m(b[:, :-1])
            return F.cross_entropy(logits.flatten(0, 1), b[:, 1:].flatten())
    return model, batch, loss_fn


def make_translate():
    """recipes/translate.py's model (Marian-style, 0.77 M parameters) and its training batches
    (embedded en–de pairs, the recipe's BPE vocabulary, 32 sentence pairs per rank), label
    smoothing 0.1; dropout masks from the global generator, reseeded per step and rank."""
    import translate

    args = translate.TranslateArguments()
    pairs = translate.get_pairs(args)
    tokenizer = translate.train_tokenizer(pairs["train"][0] + pairs["train"][1], args.vocab_size,
                                          args.max_length)  # fmt: skip
    torch.manual_seed(0)
    model = translate.build_model(args, tokenizer)
    train, _ = translate.get_dataloaders(args, tokenizer, pairs)
    torch.manual_seed(0)
    batches = [{k: v for k, v in b.items() if k != "index"} for _, b in zip(range(8), train)]

    def batch(rank, t):
        torch.manual_seed(1000 * t + rank)  # dropout
        return batches[(2 * t + rank) % len(batches)]

    def loss_fn(m, b):
        logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                   decoder_input_ids=b["decoder_input_ids"]).logits  # fmt: skip
        return translate.smoothed_loss(logits, b["labels"], args.label_smoothing)

    return model, batch, loss_fn


def state_bytes(opt) -> tuple[int, int]:
    base = opt.optimizer if hasattr(opt, "optimizer") else opt
    state = sum(v.numel() * v.element_size() for s in base.state.values()
                for v in s.values() if torch.is_tensor(v) and v.dim() > 0)  # fmt: skip
    capture = base.local_grad_nbytes() if hasattr(base, "local_grad_nbytes") else 0
    return state, capture


def worker(args) -> None:
    from accelerate import Accelerator

    import extrap_accel

    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    out = {"world_size": accelerator.num_processes, "tasks": {}}
    for task in args.tasks:
        runs = {}
        for name in ("sgd", "extrap_sgd"):
            model, batch, loss_fn = make(task)
            opt = extrap_accel.create_optimizer(name, model.parameters(), lr=0.05,
                                                momentum=MOMENTUM, nesterov=True)  # fmt: skip
            if name == "sgd":
                model, opt = accelerator.prepare(model, opt)
            else:
                model, opt = extrap_accel.prepare(accelerator, model, opt)
            runs[name] = (model, opt, batch, loss_fn)

        def one_step(name, t):
            model, opt, batch, loss_fn = runs[name]
            accelerator.backward(loss_fn(model, batch(rank, t)))
            opt.step()
            opt.zero_grad()

        # (the warm-up covers DDP rebuilding its buckets after the first iteration)
        times = interleaved_times(one_step, runs, args.steps)
        collectives = {name: count_collectives(lambda: one_step(name, 99)) for name in runs}
        numel = sum(p.numel() for p in runs["sgd"][0].parameters())
        res = {"numel": numel}
        for name in runs:
            state, capture = state_bytes(runs[name][1])
            res[name] = {"median_s": statistics.median(times[name]),
                         "mean_s": statistics.fmean(times[name]),
                         "state_bytes": state, "capture_bytes": capture,
                         "collectives": collectives[name]}  # fmt: skip
        out["tasks"][task] = res
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)


def table(ranks: list[dict], steps: int) -> str:
    lines = ["| model | params | SGD s/step | extrap-SGD s/step | time ratio | SGD state B/param "
             "| extrap state B/param (of which captured gᵏ) | memory ratio | collectives/step "
             "SGD → extrap (elements) |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for task in ranks[0]["tasks"]:
        per = [r["tasks"][task] for r in ranks]
        n = per[0]["numel"]
        s = max(p["sgd"]["median_s"] for p in per)  # a step is as slow as its slowest rank
        e = max(p["extrap_sgd"]["median_s"] for p in per)
        sb = per[0]["sgd"]["state_bytes"] + per[0]["sgd"]["capture_bytes"]
        eb = per[0]["extrap_sgd"]["state_bytes"] + per[0]["extrap_sgd"]["capture_bytes"]
        cs, ce = per[0]["sgd"]["collectives"], per[0]["extrap_sgd"]["collectives"]
        lines.append(
            f"| {task} | {n:,} | {s * 1e3:.1f} ms | {e * 1e3:.1f} ms | {e / s:.3f} | {sb / n:.1f} "
            f"| {eb / n:.1f} ({per[0]['extrap_sgd']['capture_bytes'] / n:.1f}) | {eb / sb:.2f} "
            f"| {cs['calls']} ({cs['elements']:,}) → {ce['calls']} ({ce['elements']:,}) |"
        )
    return "\n".join(lines) + (f"\n\nMedian of {steps} interleaved steps per rank, the slower "
                               "rank's median; 2 processes, gloo, OMP_NUM_THREADS=1.\n")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--tasks", nargs="+", default=["resnet20", "lstm"],
                        choices=["resnet20", "lstm"])
    parser.add_argument("--json", default=None, help="also write the per-rank results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(REPO, "accelerate_configs", "cpu_2proc.yaml"), "--main_process_port",
           str(free_port()), os.path.abspath(__file__), "--worker",
           "--steps", str(args.steps), "--tasks", *args.tasks]  # fmt: skip
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    ranks = run_ranks(cmd, env)
    return report(ranks, table(ranks, args.steps), args.json)

if __name__ == "__main__":
    main()
