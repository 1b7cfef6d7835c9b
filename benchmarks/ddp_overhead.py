"""Overhead of extrap-SGD against mini-batch SGD in a real 2-process DDP run (gloo, CPU).

One launch, both optimizers in the same processes, interleaved step by step (SGD, extrap-SGD,
SGD, ...) after a warm-up, so that the ratios share the machine's conditions:

* time per training step (forward, backward with the gradient all-reduce, ``optimizer.step()``,
  ``zero_grad``): median over ``--steps`` steps, per rank; ratio extrap / SGD;
* optimizer-state bytes: every tensor in the optimizer's state plus extrap_accel's captured local
  gradients as held at the step (``local_grad_nbytes(at_step=True)``; on a CUDA device they are
  released between steps), per parameter and as a ratio to SGD's momentum buffer;
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
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (REPO, os.path.join(REPO, "recipes")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch
import torch.nn.functional as F
from _multiprocess import free_port, interleaved_times, report, run_ranks

from extrap_accel.diagnostics import count_collectives

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
    capture = base.local_grad_nbytes(at_step=True) if hasattr(base, "local_grad_nbytes") else 0
    return state, capture


# task: (baseline registry name, ours, keyword arguments of both); the translation task uses
# the recipe's optimizer settings (Adam β₂ 0.98, ε 1e-9, no weight decay)
PAIRS = {
    "resnet20": ("sgd", "extrap_sgd", {"lr": 0.05, "momentum": MOMENTUM, "nesterov": True,
                                       "weight_decay": 1e-4}),
    "lstm": ("sgd", "extrap_sgd", {"lr": 0.05, "momentum": MOMENTUM, "nesterov": True,
                                   "weight_decay": 0.0}),
    "translate": ("adamw", "extrap_adam", {"lr": 2e-3, "betas": (0.9, 0.98), "eps": 1e-9,
                                           "weight_decay": 0.0}),
}  # fmt: skip


def cpu_load() -> dict:
    """The machine's load average and CPU pressure (PSI 'some avg10': % of time a runnable
    task waited for a CPU), to record how busy the shared machine was."""
    out = {"loadavg": list(os.getloadavg())}
    try:
        with open("/proc/pressure/cpu") as f:
            out["psi_some_avg10"] = float(f.readline().split()[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        pass
    return out


def worker(args) -> None:
    from accelerate import Accelerator

    import extrap_accel

    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    out = {"world_size": accelerator.num_processes, "tasks": {}}
    for task in args.tasks:
        base_name, ours_name, kwargs = PAIRS[task]
        runs = {}
        for name in (base_name, ours_name):
            model, batch, loss_fn = make(task)
            opt = extrap_accel.create_optimizer(name, model.parameters(), **kwargs)
            if name == base_name:
                model, opt = accelerator.prepare(model, opt)
            else:
                model, opt = extrap_accel.prepare(accelerator, model, opt)
            runs[name] = (model, opt, batch, loss_fn)

        step_phase = {name: [] for name in runs}  # optimizer.step() + zero_grad alone

        def one_step(name, t, runs=runs, step_phase=step_phase):
            model, opt, batch, loss_fn = runs[name]
            accelerator.backward(loss_fn(model, batch(rank, t)))
            start = time.perf_counter()
            opt.step()
            opt.zero_grad()
            step_phase[name].append(time.perf_counter() - start)

        # (the warm-up covers DDP rebuilding its buckets after the first iteration)
        load = [cpu_load()]
        times = {name: [] for name in runs}
        phases = {name: [] for name in runs}
        for _ in range(args.repeats):  # each repetition: its own interleaved A/B steps
            rep = interleaved_times(one_step, runs, args.steps, warmup=1)
            for name in runs:
                times[name].append(rep[name])
                phases[name].append(step_phase[name][-args.steps :])
            load.append(cpu_load())
        collectives = {name: count_collectives(lambda name=name: one_step(name, 99))
                       for name in runs}  # fmt: skip
        res = {"numel": sum(p.numel() for p in runs[base_name][0].parameters()),
               "baseline": base_name, "ours": ours_name, "load": load}  # fmt: skip
        for name in runs:
            state, capture = state_bytes(runs[name][1])
            res[name] = {"medians_s": [statistics.median(r) for r in times[name]],
                         "step_phase_medians_s": [statistics.median(r) for r in phases[name]],
                         "times_s": times[name], "state_bytes": state, "capture_bytes": capture,
                         "collectives": collectives[name]}  # fmt: skip
        out["tasks"][task] = res
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)


def summary(ranks: list[dict], task: str) -> dict:
    """Per repetition the slower rank's median step time (a step is as slow as its slowest
    rank) of each optimizer, and the ratio ours / baseline per repetition."""
    per = [r["tasks"][task] for r in ranks]
    b, o = per[0]["baseline"], per[0]["ours"]
    base = [max(p[b]["medians_s"][i] for p in per) for i in range(len(per[0][b]["medians_s"]))]
    ours = [max(p[o]["medians_s"][i] for p in per) for i in range(len(per[0][o]["medians_s"]))]
    ratios = [x / y for x, y in zip(ours, base)]
    phase = {k: statistics.median(max(p[k]["step_phase_medians_s"][i] for p in per)
                                  for i in range(len(per[0][k]["step_phase_medians_s"])))
             for k in (b, o)}  # fmt: skip
    loads = [entry["loadavg"][0] for entry in per[0]["load"]]
    psi = [entry["psi_some_avg10"] for entry in per[0]["load"] if "psi_some_avg10" in entry]
    return {"baseline_s": statistics.median(base), "ours_s": statistics.median(ours),
            "ratio": statistics.median(ratios), "ratios": ratios,
            "baseline_step_phase_s": phase[b], "ours_step_phase_s": phase[o],
            "load1": (min(loads), max(loads)), "psi": (min(psi), max(psi)) if psi else None}


def table(ranks: list[dict], steps: int, repeats: int) -> str:
    lines = [("| model | params | optimizers | baseline s/step | ours s/step | time ratio (median "
             "of repetitions) | ratio min–max | of which step() + zero_grad, baseline → ours | load avg (1 min) | CPU pressure % | baseline "
             "state B/param | ours state B/param (of which captured gᵏ) | collectives/step "
             "baseline → ours (elements) |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for task in ranks[0]["tasks"]:
        p0 = ranks[0]["tasks"][task]
        b, o, n = p0["baseline"], p0["ours"], p0["numel"]
        s = summary(ranks, task)
        sb = p0[b]["state_bytes"] + p0[b]["capture_bytes"]
        ob = p0[o]["state_bytes"] + p0[o]["capture_bytes"]
        cb, co = p0[b]["collectives"], p0[o]["collectives"]
        psi = f"{s['psi'][0]:.0f}–{s['psi'][1]:.0f}" if s["psi"] else "n/a"
        lines.append(
            f"| {task} | {n:,} | {b} → {o} | {s['baseline_s'] * 1e3:.1f} ms "
            f"| {s['ours_s'] * 1e3:.1f} ms | {s['ratio']:.3f} | {min(s['ratios']):.3f}–"
            f"{max(s['ratios']):.3f} | {s['baseline_step_phase_s'] * 1e3:.1f} → "
            f"{s['ours_step_phase_s'] * 1e3:.1f} ms | {s['load1'][0]:.1f}–{s['load1'][1]:.1f} | {psi} "
            f"| {sb / n:.1f} | {ob / n:.1f} ({p0[o]['capture_bytes'] / n:.1f}) "
            f"| {cb['calls']} ({cb['elements']:,}) → {co['calls']} ({co['elements']:,}) |"
        )
    return "\n".join(lines) + (
        f"\n\n{repeats} repetitions of {steps} interleaved steps (baseline, ours, baseline, ...) "
        "after a warm-up; per repetition the slower rank's median; 2 processes, gloo, "
        "OMP_NUM_THREADS=1. Load average and CPU pressure: range over the repetitions.\n"
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repetition")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved A/B repetitions")
    parser.add_argument("--tasks", nargs="+", default=["resnet20", "lstm", "translate"],
                        choices=list(PAIRS))
    parser.add_argument("--json", default=None, help="also write the per-rank results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.steps < 1:
        parser.error("--repeats and --steps must be >= 1")
    if args.worker:
        return worker(args)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(REPO, "accelerate_configs", "cpu_2proc.yaml"), "--main_process_port",
           str(free_port()), os.path.abspath(__file__), "--worker", "--steps", str(args.steps),
           "--repeats", str(args.repeats), "--tasks", *args.tasks]  # fmt: skip
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    ranks = run_ranks(cmd, env)
    return report(ranks, table(ranks, args.steps, args.repeats), args.json)


if __name__ == "__main__":
    main()
