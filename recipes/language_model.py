"""Language modeling with extrap-SGD: a 2-layer LSTM on WikiText-2 (Lin et al. 2020, §5).

Offline default (the English documentation prose of CPython's ``pydoc_data.topics``, about
465k characters, no download; `language_model_quick.yaml` is the same settings written out)::

    accelerate launch recipes/language_model.py
    ACCELERATE_USE_CPU=1 accelerate launch --config_file accelerate_configs/cpu_2proc.yaml recipes/language_model.py
    python recipes/language_model.py --optim sgd --tokenizer char

The paper's setting (WikiText-2 from the Hub, or a local copy)::

    accelerate launch --num_processes 8 recipes/language_model.py --config recipes/configs/lstm_wikitext2.yaml   # one machine, 8 GPUs
    accelerate launch recipes/language_model.py --config recipes/configs/lstm_wikitext2.yaml --dataset_name /data/wikitext-2-raw

Options shared with the other recipes: ``--optim`` (any of extrap_accel.list_optimizers()),
``--post_local_from STEP --local_period H`` (multi-process only), ``--extrap_until STEP``,
``--log_smoothness``, ``--save_steps N``, ``--resume_from_checkpoint latest``,
``--gradient_accumulation_steps N`` (the rows of a window in N micro-batches), ``--save_total_limit``,
``--push_to_hub``, ``--restart_extrapolation``; ``--help``. Outputs: model.safetensors (the
anchor), vocab.json and config.json, which ``load_model(output_dir)`` rebuilds.

Data: ``--dataset_name default``, ``Salesforce/wikitext`` (``--dataset_config_name wikitext-2-raw-v1``,
the default for that id), or a local directory holding either text files named after their
split (``train.txt``/``valid.txt``/``test.txt``, or WikiText's ``wiki.train.raw``, ...) or
data files with a ``text`` column and splits ``train`` and ``validation`` (``test`` optional).
Training: truncated BPTT over contiguous streams (the hidden state is carried from window to
window and saved per rank in checkpoints), gradient-norm clipping of the averaged gradient and
— ``extrap_max_norm``, the same value — of the local extrapolation direction, dropout,
cross-entropy averaged over examples and time steps; perplexity = exp(mean token loss).
"""

from __future__ import annotations

import collections
import glob
import json
import math
import os
import re
import time
from dataclasses import dataclass
from typing import Literal

import common
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

import extrap_accel

SCHEMA = (
    "a 'text' column (one line of text per row) with splits 'train' and 'validation' (or "
    "'valid'; 'test' optional), as Salesforce/wikitext on the Hub, or text files named "
    "train/valid/test (.txt, .raw, .tokens)"
)
HUB_DEFAULT_CONFIGS = {"Salesforce/wikitext": "wikitext-2-raw-v1", "wikitext": "wikitext-2-raw-v1"}


@dataclass
class LMArguments(common.RecipeArguments):
    """Defaults: the offline quick run (pydoc prose, word level, a few minutes on 2 CPU cores)."""

    output_dir: str = common.default("output_dir", "outputs/language_model")
    tokenizer: Literal["word", "whitespace", "char"] = common.arg(
        "word", "word: words and punctuation runs; whitespace: WikiText's tokens; char"
    )
    max_vocab: int | None = common.arg(
        None, "keep the most frequent training tokens (with <unk>, <eos>)"
    )
    min_freq: int = common.arg(1, "drop tokens seen fewer times (they become <unk>)")
    emsize: int = common.arg(200, "embedding size")
    nhid: int = common.arg(200, "LSTM hidden size")
    nlayers: int = common.arg(2, "LSTM layers")
    dropout: float = common.arg(0.2, "dropout on embeddings, between layers and on outputs")
    tie_weights: bool = common.arg(
        True, "share the embedding and the output layer (emsize == nhid)"
    )
    bptt: int = common.arg(35, "truncated-BPTT window (tokens per optimizer step and row)")
    num_train_epochs: float = common.default("num_train_epochs", 8.0)
    per_device_train_batch_size: int = common.default("per_device_train_batch_size", 20)
    per_device_eval_batch_size: int = common.default("per_device_eval_batch_size", 10)
    learning_rate: float = common.default("learning_rate", 2.5)
    base_batch_size: int = common.default("base_batch_size", 20)
    momentum: float = common.default("momentum", 0.9)
    max_grad_norm: float | None = common.default("max_grad_norm", 0.25)
    warmup_epochs: float = common.default("warmup_epochs", 0.5)
    logging_steps: int = common.default("logging_steps", 10)
    eval_steps: int = common.default("eval_steps", 50)


# ---------------------------------------------------------------------------- data


def _pydoc_topics() -> dict[str, str]:
    """CPython's documentation topics, joined; split 90/5/5 at line boundaries."""
    from pydoc_data.topics import topics

    lines = "\n".join(topics[k] for k in sorted(topics)).split("\n")
    total = sum(len(line) + 1 for line in lines)
    splits: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
    seen = 0
    for line in lines:
        frac = seen / total
        splits["train" if frac < 0.9 else "validation" if frac < 0.95 else "test"].append(line)
        seen += len(line) + 1
    return {k: "\n".join(v) for k, v in splits.items()}


_SPLIT_NAMES = {
    "train": "train",
    "valid": "validation",
    "validation": "validation",
    "dev": "validation",
    "test": "test",
}


def _raw_text_files(path: str) -> dict[str, list[str]]:
    """WikiText's own layout (wiki.train.raw, wiki.valid.tokens, ...): files by split."""
    files: dict[str, list[str]] = {}
    for file in sorted(
        glob.glob(os.path.join(path, "*.raw")) + glob.glob(os.path.join(path, "*.tokens"))
    ):
        parts = re.split(r"[._\-]", os.path.basename(file))
        split = next((_SPLIT_NAMES[p] for p in parts if p in _SPLIT_NAMES), None)
        if split:
            files.setdefault(split, []).append(file)
    return files


def get_text_splits(args: LMArguments) -> dict[str, str]:
    """{'train', 'validation'[, 'test']} → the text of that split."""
    if args.dataset_name == "default":
        return _pydoc_topics()
    files = _raw_text_files(args.dataset_name) if os.path.isdir(args.dataset_name) else {}
    if files:
        import datasets

        ds = datasets.load_dataset("text", data_files=files)
    else:
        config = args.dataset_config_name or HUB_DEFAULT_CONFIGS.get(args.dataset_name)
        ds = common.load_dataset_dict(args.dataset_name, config, schema=SCHEMA, splits=("train",))
    if "validation" not in ds and "valid" in ds:
        ds["validation"] = ds.pop("valid")
    if "validation" not in ds:
        raise common.DataError(f"{args.dataset_name!r} has splits {sorted(ds)}; expected {SCHEMA}")
    out = {}
    for split in ("train", "validation", "test"):
        if split not in ds:
            continue
        if "text" not in ds[split].column_names:
            raise common.DataError(
                f"{args.dataset_name!r} split {split!r} has columns {ds[split].column_names}; "
                f"expected {SCHEMA}"
            )
        rows = ds[split]["text"]
        if not all(isinstance(r, str) for r in rows[:100]):
            raise common.DataError(f"{args.dataset_name!r}: the 'text' column must hold strings")
        out[split] = "\n".join(r.rstrip("\n") for r in rows)
    if not out["train"].strip():
        raise common.DataError(f"{args.dataset_name!r}: the training split is empty")
    return out


class Vocabulary:
    """A vocabulary built from the training split; unknown tokens map to <unk>.

    ``word``: words and runs of punctuation, <eos> at the end of each non-empty line (for raw
    prose); ``whitespace``: whitespace-separated tokens and <eos> (WikiText's own word level,
    its text being tokenized already); ``char``: characters, newlines included.
    """

    UNK, EOS = "<unk>", "<eos>"
    _WORD = re.compile(r"\w+|[^\w\s]+")

    def __init__(self, itos: list[str], level: str):
        self.itos, self.level = itos, level
        self.stoi = {s: i for i, s in enumerate(itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def tokens(self, text: str) -> list[str]:
        if self.level == "char":
            return list(text)
        split = str.split if self.level == "whitespace" else self._WORD.findall
        return [t for line in text.split("\n") if line.strip() for t in (*split(line), self.EOS)]

    @classmethod
    def build(cls, text: str, level: str, max_vocab: int | None = None, min_freq: int = 1):
        counts = collections.Counter(cls([], level).tokens(text))
        specials = [cls.UNK] + ([cls.EOS] if level != "char" else [])
        for s in specials:
            counts.pop(s, None)
        ranked = sorted(
            (t for t, c in counts.items() if c >= min_freq), key=lambda t: (-counts[t], t)
        )
        if max_vocab is not None:
            ranked = ranked[: max(0, max_vocab - len(specials))]
        return cls(specials + ranked, level)

    def encode(self, text: str) -> torch.Tensor:
        unk = self.stoi[self.UNK]
        return torch.tensor([self.stoi.get(t, unk) for t in self.tokens(text)], dtype=torch.long)

    def decode(self, ids) -> str:
        sep = "" if self.level == "char" else " "
        return sep.join(self.itos[int(i)] for i in ids)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump({"level": self.level, "itos": self.itos}, f)


def batchify(ids: torch.Tensor, rows: int, rank: int, num_processes: int) -> torch.Tensor:
    """The stream as K·rows contiguous rows (the global batch); this rank's ``rows`` rows."""
    total = rows * num_processes
    cols = len(ids) // total
    if cols < 2:
        raise common.DataError(
            f"{len(ids)} tokens are too few for {total} rows of at least 2 tokens each"
        )
    return ids[: total * cols].view(total, cols)[rank * rows : (rank + 1) * rows].contiguous()


# ---------------------------------------------------------------------------- model


class LSTMLanguageModel(nn.Module):
    """Embedding → dropout → LSTM (nlayers, dropout between layers) → dropout → linear."""

    def __init__(
        self,
        vocab_size: int,
        emsize: int,
        nhid: int,
        nlayers: int = 2,
        dropout: float = 0.2,
        tie_weights: bool = False,
    ):
        super().__init__()
        self.encoder = nn.Embedding(vocab_size, emsize)
        self.rnn = nn.LSTM(
            emsize, nhid, nlayers, dropout=dropout if nlayers > 1 else 0.0, batch_first=True
        )
        self.drop = nn.Dropout(dropout)
        self.decoder = nn.Linear(nhid, vocab_size)
        if tie_weights:
            if emsize != nhid:
                raise common.ConfigError(f"tie_weights needs emsize == nhid ({emsize} != {nhid})")
            self.decoder.weight = self.encoder.weight
        self.nlayers, self.nhid = nlayers, nhid
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if not tie_weights:
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def forward(self, tokens: torch.Tensor, hidden=None):
        out, hidden = self.rnn(self.drop(self.encoder(tokens)), hidden)
        return self.decoder(self.drop(out)), hidden


class HiddenState:
    """The LSTM state carried across BPTT windows; checkpointed per rank."""

    def __init__(self, device: torch.device):
        self.device = device
        self.value: tuple[torch.Tensor, torch.Tensor] | None = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.value is None else {"h": self.value[0].cpu(), "c": self.value[1].cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.value = (state["h"].to(self.device), state["c"].to(self.device)) if state else None


def _window(data: torch.Tensor, i: int, bptt: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = min(bptt, data.shape[1] - 1 - i)
    return data[:, i : i + length], data[:, i + 1 : i + 1 + length]


@torch.no_grad()  # attached by extrap_accel.prepare: a no-grad forward runs at the anchor
def evaluate(accelerator, model, data: torch.Tensor, bptt: int) -> float:
    """exp(mean token loss) over this split, every rank its rows, gathered."""
    model.eval()
    hidden, loss_sum = None, torch.zeros((), dtype=torch.float64, device=data.device)
    for i in range(0, data.shape[1] - 1, bptt):
        inputs, targets = _window(data, i, bptt)
        logits, hidden = model(inputs, hidden)
        loss_sum += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    model.train()
    count = torch.tensor(
        float(data.shape[0] * (data.shape[1] - 1)), dtype=torch.float64, device=data.device
    )
    totals = accelerator.gather_for_metrics(torch.stack([loss_sum, count]).unsqueeze(0)).sum(0)
    return math.exp(float(totals[0] / totals[1]))


def save_model(accelerator, model, vocab: Vocabulary, args: LMArguments, output_dir: str) -> None:
    """model.safetensors (the anchor: attached by extrap_accel.prepare), vocab.json and
    config.json: what ``load_model`` needs to rebuild the model."""
    accelerator.save_model(model, output_dir)
    if accelerator.is_main_process:
        vocab.save(os.path.join(output_dir, "vocab.json"))
        config = {
            "vocab_size": len(vocab),
            "emsize": args.emsize,
            "nhid": args.nhid,
            "nlayers": args.nlayers,
            "dropout": args.dropout,
            "tie_weights": args.tie_weights,
            "bptt": args.bptt,
        }
        with open(os.path.join(output_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=2)


def load_model(output_dir: str) -> tuple[LSTMLanguageModel, Vocabulary]:
    """The trained model (eval mode) and its vocabulary from a recipe's output_dir.

    >>> model, vocab = load_model("outputs/language_model")
    >>> logits, hidden = model(vocab.encode("The return statement").unsqueeze(0))
    """
    from safetensors.torch import load_file

    with open(os.path.join(output_dir, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(output_dir, "vocab.json")) as f:
        saved = json.load(f)
    vocab = Vocabulary(saved["itos"], saved["level"])
    model = LSTMLanguageModel(
        config["vocab_size"],
        config["emsize"],
        config["nhid"],
        config["nlayers"],
        config["dropout"],
        config["tie_weights"],
    )
    state = load_file(os.path.join(output_dir, "model.safetensors"))
    if config["tie_weights"]:  # safetensors keeps one copy of a shared tensor
        state.setdefault("decoder.weight", state.get("encoder.weight"))
        state.setdefault("encoder.weight", state.get("decoder.weight"))
    model.load_state_dict(state)
    return model.eval(), vocab


def training_function(args: LMArguments) -> dict[str, float]:
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=common.trackers(args),  # --report_to
        project_dir=args.output_dir,
        deepspeed_plugin=common.deepspeed_plugin(args),  # gradient_clipping = --max_grad_norm
        kwargs_handlers=common.process_group_kwargs(),  # gloo for DeepSpeed on CPU
    )
    common.check_launch(accelerator, args)
    set_seed(args.seed)  # the same initial model on every rank

    # ---- data: K·b·accumulation contiguous streams, this rank's b·accumulation rows
    with accelerator.main_process_first():  # the main process downloads, the others read the cache
        texts = get_text_splits(args)
    vocab = Vocabulary.build(texts["train"], args.tokenizer, args.max_vocab, args.min_freq)
    rank, world = accelerator.process_index, accelerator.num_processes
    b, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
    train = batchify(vocab.encode(texts["train"]), b * accumulation, rank, world)
    train = train.to(accelerator.device)
    splits = {
        s: batchify(vocab.encode(texts[s]), args.per_device_eval_batch_size, rank, world).to(
            accelerator.device
        )
        for s in ("validation", "test")
        if s in texts
    }

    # ---- model and optimizer
    model = LSTMLanguageModel(
        len(vocab), args.emsize, args.nhid, args.nlayers, args.dropout, args.tie_weights
    )
    groups = common.param_groups_weight_decay(model, args.weight_decay)
    # max_grad_norm clips the averaged gradient and, as extrap_max_norm, the local direction
    optimizer = common.create_optimizer(args, groups, extrap_max_norm=args.max_grad_norm)
    model, optimizer = extrap_accel.prepare(accelerator, model, optimizer)
    optimizer = common.wrap_lars(args, optimizer)
    fresh = common.uses_closure(optimizer)  # extrap_sgd_fresh: step(closure)

    windows = (train.shape[1] - 1) // args.bptt  # optimizer steps per epoch
    max_steps, lr_at = common.plan_steps(
        args,
        windows,
        world,
        too_small=f"the training stream is shorter than one BPTT window ({args.bptt})",
    )

    # ---- checkpointed state, then resume (after everything is registered), then logging
    state, hidden = common.TrainState(), HiddenState(accelerator.device)
    accelerator.register_for_checkpointing(state)
    # the LSTM state per rank (another number of processes: a fresh one)
    common.register_rank_state(
        accelerator, "lstm_hidden", hidden, required=not args.restart_extrapolation
    )
    meter = common.smoothness_meter(accelerator, args, optimizer)  # --log_smoothness
    restore_baseline = common.baseline_rank_state(accelerator, model, optimizer, args)
    resumed_from = common.resume(accelerator, args, state, optimizer)
    if resumed_from and restore_baseline:
        restore_baseline(resumed_from)
    post_local = common.enable_post_local_sgd(accelerator, model, optimizer, args, state.step)
    common.init_trackers(accelerator, args, state, "extrap_accel_language_model")
    logger = common.MetricsLogger(accelerator, args, state.step)
    n_params = sum(p.numel() for p in model.parameters())
    accelerator.print(
        f"{args.nlayers}-layer LSTM ({n_params / 1e6:.2f}M parameters) on {args.dataset_name}: "
        f"{args.tokenizer}-level vocabulary {len(vocab)}, {train.numel() * world} training "
        f"tokens; K={world}, global batch {common.global_batch(args, world)}×{args.bptt}, lr "
        f"{lr_at(0):g} -> {lr_at.keywords['peak_lr']:g}, {max_steps} steps ({windows}/epoch), "
        f"optimizer {args.optim}"
    )

    # ---- the loop: one BPTT window per optimizer step, its rows in `accumulation` micro-batches
    bar = common.progress_bar(accelerator, max_steps, state.step)
    model.train()
    start, metrics = time.perf_counter(), {}
    while state.step < max_steps:
        window = state.step % windows
        if window == 0:
            hidden.value = None  # a new pass over the stream
        inputs, targets = _window(train, window * args.bptt, args.bptt)
        carried, new_hidden, step_loss = hidden.value, [], 0.0
        for micro in range(accumulation):
            rows = slice(micro * b, (micro + 1) * b)
            with accelerator.accumulate(model):
                common.set_lr(optimizer, lr_at(state.step))
                common.apply_extrap_until(optimizer, args, state.step)
                h0 = None if carried is None else (carried[0][:, rows], carried[1][:, rows])

                def forward_backward(rows=rows, h0=h0, inputs=inputs, targets=targets):
                    logits, new = model(inputs[rows], h0)
                    loss = F.cross_entropy(logits.flatten(0, 1), targets[rows].flatten())
                    accelerator.backward(loss)  # (divided by `accumulation` by accelerate)
                    forward_backward.hidden = (new[0].detach(), new[1].detach())
                    return loss.detach()

                def clip():  # the averaged gradient of the base update
                    if accelerator.sync_gradients and args.max_grad_norm is not None:
                        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)

                if fresh:  # forward/backward at the anchor, then again at x̃ (one process)

                    def closure():
                        optimizer.zero_grad()
                        closure.loss = forward_backward()
                        clip()
                        return closure.loss

                    optimizer.step(closure)
                    loss = closure.loss
                else:
                    loss = forward_backward()
                    if meter is not None and accelerator.sync_gradients:
                        meter.update()  # this rank's gradient at x̃, before clipping
                    clip()
                    optimizer.step()  # (skipped by accelerate until the last micro-step)
                optimizer.zero_grad()
                new_hidden.append(forward_backward.hidden)
                step_loss = step_loss + loss / accumulation
        hidden.value = tuple(torch.cat(parts, dim=1) for parts in zip(*new_hidden))
        state.step += 1
        bar.update(1)
        if post_local is not None and state.step >= max_steps:
            post_local.finish()  # end on one model: average a last local step

        if common.is_due(state.step, args.logging_steps, max_steps):
            metrics = common.train_metrics(accelerator, step_loss, optimizer, meter, post_local)
            metrics["train_perplexity"] = math.exp(metrics["train_loss"])
            bar.set_postfix(loss=f"{metrics['train_loss']:.3f}")
            logger.log(metrics, state.step)
        if common.is_due(state.step, args.eval_steps, max_steps):
            ppl = evaluate(accelerator, model, splits["validation"], args.bptt)
            logger.log({"eval_perplexity": ppl}, state.step)
        if common.is_due(state.step, args.save_steps, max_steps):
            common.save_checkpoint(accelerator, args, state.step, resumed_from)
    bar.close()

    # ---- outputs: the anchor, its vocabulary and config, results; the Hub
    results = logger.latest("eval_")
    if "test" in splits:
        results["test_perplexity"] = evaluate(accelerator, model, splits["test"], args.bptt)
    results.update(
        step=state.step, seconds=time.perf_counter() - start, train_loss=metrics.get("train_loss")
    )
    accelerator.wait_for_everyone()
    save_model(accelerator, model, vocab, args, args.output_dir)
    common.write_results(accelerator, args.output_dir, results, logger.history)
    common.push_to_hub(accelerator, args, args.output_dir)
    accelerator.end_training()
    accelerator.print(
        f"step {state.step}: validation perplexity {results.get('eval_perplexity', math.nan):.2f}"
        f", test perplexity {results.get('test_perplexity', math.nan):.2f}, "
        f"{results['seconds']:.1f} s; outputs in {args.output_dir}"
    )
    return results


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = common.parse_args(LMArguments, argv, description=__doc__)
    return training_function(args)


if __name__ == "__main__":
    common.run_main(main)
