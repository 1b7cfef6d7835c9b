"""Translation with extrap-Adam: a down-scaled Transformer on English→German (Lin et al. 2020, §5).

Offline default (a few hundred short en–de pairs written for this recipe, recipes/data/en_de/,
no download; `translate_quick.yaml` is the same settings written out)::

    ACCELERATE_USE_CPU=1 accelerate launch --config_file accelerate_configs/cpu_2proc.yaml recipes/translate.py
    ACCELERATE_USE_CPU=1 accelerate launch --config_file accelerate_configs/cpu_2proc.yaml recipes/translate.py --optim adamw
    accelerate launch recipes/translate.py
    OMP_NUM_THREADS=1 python recipes/translate.py --report_to wandb   # W&B offline without a key
    accelerate launch --config_file accelerate_configs/cpu_2proc_deepspeed.yaml recipes/translate.py

Multi30k (from the Hub, or a local directory of the same files)::

    accelerate launch --num_processes 8 recipes/translate.py --config recipes/configs/translate_multi30k.yaml   # one machine, 8 GPUs
    accelerate launch recipes/translate.py --config recipes/configs/translate_multi30k.yaml --dataset_name /data/multi30k

Options shared with the other recipes: ``--optim`` (any of extrap_accel.list_optimizers();
``adamw`` is the baseline), ``--post_local_from STEP --local_period H`` (multi-process only),
``--extrap_until STEP``, ``--log_smoothness``, ``--save_steps N``,
``--resume_from_checkpoint latest``, ``--report_to wandb``, ``--gradient_accumulation_steps N``,
``--save_total_limit N``, ``--push_to_hub --hub_model_id USER/NAME``, ``--restart_extrapolation``;
``--help`` lists every option. Outputs: a transformers model folder (the anchor) that
``AutoModelForSeq2SeqLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load.

Data: ``--dataset_name default``, ``bentrevett/multi30k``, or a local directory of files (jsonl,
csv, parquet, ...) with columns ``en`` and ``de`` and splits ``train`` and ``test``
(``validation`` optional), as bentrevett/multi30k on the Hub.

Model and training: a Marian-style Transformer encoder–decoder (``transformers.MarianMTModel``
from a ``MarianConfig``: sinusoidal positions, shared source/target embeddings tied to the
output layer, no pretrained weights) and one BPE vocabulary trained with ``tokenizers`` on the
source and target sides of the training split. Adam(W) — or extrap-Adam — with the inverse
square-root schedule: linear warmup to the peak rate (learning_rate scaled from
base_batch_size to the global batch K·b by lr_scaling), then peak·√(warmup/step). The warmup
is given in epochs (samples), so its length in steps is scaled down by the global batch:
warmup steps = warmup_epochs·N/(K·b). Loss: cross-entropy with label smoothing, averaged over
the target tokens of the batch on each worker. Metric: corpus BLEU (sacrebleu, default 13a
tokenization) of greedy translations (``--num_beams`` for beam search), evaluated at the
anchor; ``test_source_copy_bleu`` is the BLEU of copying the English source, the floor any
trained model must beat. Batches are counted in sentence pairs.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Literal

import common
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader, Dataset

import extrap_accel

SCHEMA = (
    "files with columns 'en' and 'de' (one sentence per row, strings) and splits 'train' and "
    "'test' ('validation' optional), as bentrevett/multi30k on the Hub"
)
EMBEDDED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "en_de")
PAD, UNK, EOS = "<pad>", "<unk>", "</s>"  # ids 0, 1, 2; the decoder starts from <pad> (Marian)


@dataclass
class TranslateArguments(common.RecipeArguments):
    """Defaults: the offline quick run (embedded pairs, about 2 minutes on 2 CPU cores)."""

    output_dir: str = common.default("output_dir", "outputs/translate")
    source_lang: str = common.arg("en", "source column / language")
    target_lang: str = common.arg("de", "target column / language")
    vocab_size: int = common.arg(
        2000, "BPE vocabulary size (merges stop earlier on a small corpus)"
    )
    max_length: int = common.arg(
        64,
        "tokens per sentence, </s> included (longer ones are truncated); also the generation limit",
    )
    d_model: int = common.arg(128, "Transformer width")
    layers: int = common.arg(2, "encoder layers = decoder layers")
    attention_heads: int = common.arg(4, "attention heads")
    ffn_dim: int = common.arg(256, "feed-forward width")
    dropout: float = common.arg(0.1, "dropout")
    label_smoothing: float = common.arg(0.1, "label smoothing of the training loss")
    num_beams: int = common.arg(1, "beam search width (1: greedy decoding)")
    num_train_epochs: float = common.default("num_train_epochs", 30.0)
    per_device_train_batch_size: int = common.default("per_device_train_batch_size", 32)
    per_device_eval_batch_size: int = common.default("per_device_eval_batch_size", 50)
    optim: str = common.default("optim", "extrap_adam")
    learning_rate: float = common.default("learning_rate", 2e-3)
    base_batch_size: int = common.default("base_batch_size", 64)
    lr_scaling: Literal["linear", "sqrt", "none"] = common.default("lr_scaling", "sqrt")
    adam_beta2: float = common.default("adam_beta2", 0.98)
    adam_epsilon: float = common.default("adam_epsilon", 1e-9)
    weight_decay: float = common.default("weight_decay", 0.0)
    lr_scheduler_type: Literal["step", "constant", "inverse_sqrt"] = common.default(
        "lr_scheduler_type", "inverse_sqrt"
    )
    warmup_epochs: float = common.default("warmup_epochs", 4.0)
    logging_steps: int = common.default("logging_steps", 10)
    eval_steps: int = common.default("eval_steps", 60)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in (
            "vocab_size",
            "max_length",
            "d_model",
            "layers",
            "attention_heads",
            "ffn_dim",
            "num_beams",
        ):
            if getattr(self, name) <= 0:
                raise common.ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.d_model % self.attention_heads:
            raise common.ConfigError(
                f"d_model ({self.d_model}) must be divisible by attention_heads "
                f"({self.attention_heads})"
            )
        if not 0.0 <= self.label_smoothing < 1.0:
            raise common.ConfigError(
                f"label_smoothing must be in [0, 1), got {self.label_smoothing}"
            )
        if self.source_lang == self.target_lang:
            raise common.ConfigError("source_lang and target_lang must differ")


# ---------------------------------------------------------------------------- data


def _read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _columns(rows, name: str, split: str, columns: list[str], src: str, tgt: str):
    missing = [c for c in (src, tgt) if c not in columns]
    if missing:
        raise common.DataError(
            f"{name!r} split {split!r} has columns {columns}, missing {missing}; expected {SCHEMA}"
        )
    sources, targets = list(rows[src]), list(rows[tgt])
    bad = next(
        (
            i
            for i, (s, t) in enumerate(zip(sources, targets))
            if not isinstance(s, str) or not isinstance(t, str)
        ),
        None,
    )
    if bad is not None:
        raise common.DataError(
            f"{name!r} split {split!r} row {bad}: {src!r} and {tgt!r} must hold strings, got "
            f"{sources[bad]!r} and {targets[bad]!r}; expected {SCHEMA}"
        )
    return sources, targets


def get_pairs(args: TranslateArguments) -> dict[str, tuple[list[str], list[str]]]:
    """{'train', 'test'[, 'validation']} → (source sentences, target sentences)."""
    src, tgt = args.source_lang, args.target_lang
    if args.dataset_name == "default":
        out = {}
        for split in ("train", "validation", "test"):
            path = os.path.join(EMBEDDED, f"{split}.jsonl")
            if not os.path.exists(path):
                raise common.DataError(
                    f"the embedded data {path} is missing (regenerate it with "
                    f"`python recipes/data/make_en_de.py`); expected {SCHEMA}"
                )
            rows = _read_jsonl(path)
            columns = sorted({k for r in rows for k in r})
            table = {c: [r.get(c) for r in rows] for c in columns}
            out[split] = _columns(table, "default", split, columns, src, tgt)
    else:
        ds = common.load_dataset_dict(
            args.dataset_name, args.dataset_config_name, schema=SCHEMA, splits=("train", "test")
        )
        if "validation" not in ds:
            for alias in ("valid", "val", "dev"):
                if alias in ds:
                    ds["validation"] = ds.pop(alias)
        out = {
            split: _columns(ds[split], args.dataset_name, split, ds[split].column_names, src, tgt)
            for split in ("train", "validation", "test")
            if split in ds
        }
    if not out["train"][0]:
        raise common.DataError(
            f"{args.dataset_name!r}: the training split is empty; expected {SCHEMA}"
        )
    if not out["test"][0]:
        raise common.DataError(f"{args.dataset_name!r}: the test split is empty; expected {SCHEMA}")
    return out


def train_tokenizer(texts: list[str], vocab_size: int, max_length: int | None = None):
    """A BPE ``tokenizers.Tokenizer`` trained on ``texts`` (source and target: one vocabulary).

    Words are split at spaces (Metaspace ``▁``) and punctuation, so decoding restores the
    spacing exactly; encoding appends ``</s>``. Ids: <pad> 0, <unk> 1, </s> 2. Deterministic:
    every rank trains the same tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer

    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation()]
    )
    tokenizer.decoder = decoders.Metaspace()
    trainer = BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, UNK, EOS], show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", special_tokens=[(EOS, tokenizer.token_to_id(EOS))]
    )
    if max_length is not None:
        tokenizer.enable_truncation(max_length)
    return tokenizer


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tokenizer.encode_batch(texts)]


def decode(tokenizer, ids) -> list[str]:
    """Token ids (a list of lists or a 2-D tensor) → sentences, stopping at the first </s>."""
    eos = tokenizer.token_to_id(EOS)
    rows = ids.tolist() if torch.is_tensor(ids) else ids
    cut = [row[: row.index(eos)] if eos in row else row for row in rows]
    return tokenizer.decode_batch(cut, skip_special_tokens=True)


def corpus_bleu(hypotheses: list[str], references: list[str]) -> float:
    import sacrebleu

    return sacrebleu.corpus_bleu(hypotheses, [references]).score


def source_copy_bleu(sources: list[str], references: list[str]) -> float:
    """The baseline of copying the source sentence as its translation."""
    return corpus_bleu(sources, references)


class PairDataset(Dataset):
    def __init__(self, sources: list[list[int]], targets: list[list[int]]):
        self.sources, self.targets = sources, targets

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int):
        return i, self.sources[i], self.targets[i]


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    out = torch.full((len(rows), max(map(len, rows))), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def collate(batch, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Padded source ids and mask; labels (-100 at padding); decoder inputs <pad> + labels[:-1]."""
    index, sources, targets = zip(*batch)
    input_ids = _pad(sources, pad_id)
    labels = _pad(targets, -100)
    shifted = labels[:, :-1].masked_fill(labels[:, :-1] == -100, pad_id)
    decoder_input_ids = torch.cat(
        [torch.full((len(batch), 1), pad_id, dtype=torch.long), shifted], dim=1
    )
    return {
        "index": torch.tensor(index, dtype=torch.long),
        "input_ids": input_ids,
        "attention_mask": (input_ids != pad_id).long(),
        "decoder_input_ids": decoder_input_ids,
        "labels": labels,
    }


def get_dataloaders(args: TranslateArguments, tokenizer, pairs):
    """The training loader (shuffled, whole global batches) and one evaluation loader per split."""
    pad_id = tokenizer.token_to_id(PAD)

    def loader(split, batch_size, train):
        sources, targets = pairs[split]
        dataset = PairDataset(encode(tokenizer, sources), encode(tokenizer, targets))
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train,
            drop_last=train,
            collate_fn=functools.partial(collate, pad_id=pad_id),
        )

    train = loader("train", args.per_device_train_batch_size, True)
    evals = {
        s: loader(s, args.per_device_eval_batch_size, False)
        for s in ("validation", "test")
        if s in pairs
    }
    return train, evals


# ---------------------------------------------------------------------------- model


def build_model(args: TranslateArguments, tokenizer):
    """A Marian-style Transformer encoder–decoder from scratch (no pretrained weights)."""
    from transformers import MarianConfig, MarianMTModel

    pad_id, eos_id = tokenizer.token_to_id(PAD), tokenizer.token_to_id(EOS)
    config = MarianConfig(
        vocab_size=tokenizer.get_vocab_size(),
        decoder_vocab_size=tokenizer.get_vocab_size(),
        d_model=args.d_model,
        encoder_layers=args.layers,
        decoder_layers=args.layers,
        encoder_attention_heads=args.attention_heads,
        decoder_attention_heads=args.attention_heads,
        encoder_ffn_dim=args.ffn_dim,
        decoder_ffn_dim=args.ffn_dim,
        activation_function="relu",
        dropout=args.dropout,
        attention_dropout=0.0,
        activation_dropout=0.0,
        max_position_embeddings=max(args.max_length + 1, 64),
        scale_embedding=True,
        share_encoder_decoder_embeddings=True,
        tie_word_embeddings=True,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        decoder_start_token_id=pad_id,
        forced_eos_token_id=None,
    )
    return MarianMTModel(config)


def generation_config(args: TranslateArguments, tokenizer):
    from transformers import GenerationConfig

    pad_id, eos_id = tokenizer.token_to_id(PAD), tokenizer.token_to_id(EOS)
    return GenerationConfig(
        max_new_tokens=args.max_length,
        num_beams=args.num_beams,
        do_sample=False,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        decoder_start_token_id=pad_id,
    )


def smoothed_loss(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Label-smoothed cross-entropy, averaged over the (non-padding) target tokens."""
    return F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, label_smoothing=smoothing
    )


# ---------------------------------------------------------------------------- training


@torch.no_grad()
def evaluate(
    accelerator, model, optimizer, loader, tokenizer, gen_config, references, prefix: str
) -> tuple[dict[str, float], list[str]]:
    """BLEU of the translations of this split and the per-token loss (no smoothing), both at the
    anchor (``optimizer.eval()`` puts it into the weights for the whole of generation)."""
    optimizer.eval()
    model.eval()
    net = accelerator.unwrap_model(model)
    pad_id = tokenizer.token_to_id(PAD)
    found: dict[int, list[int]] = {}
    nll_sum = tokens = 0.0
    for batch in loader:
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            decoder_input_ids=batch["decoder_input_ids"],
        ).logits
        labels = batch["labels"]
        nll = (
            F.cross_entropy(
                logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="none"
            )
            .view(labels.shape)
            .sum(1)
        )
        count = (labels != -100).sum(1)
        # the saved generation_config.json: from_pretrained reproduces these translations
        out = net.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            generation_config=gen_config,
        )
        out = accelerator.pad_across_processes(out, dim=1, pad_index=pad_id)
        index, out, nll, count = accelerator.gather_for_metrics((batch["index"], out, nll, count))
        nll_sum += float(nll.sum())
        tokens += float(count.sum())
        for i, row in zip(index.tolist(), out[:, 1:].tolist()):  # drop the decoder start
            found[i] = row
    optimizer.train()
    model.train()
    hypotheses = decode(tokenizer, [found[i] for i in range(len(found))])
    metrics = {
        f"{prefix}_bleu": corpus_bleu(hypotheses, references),
        f"{prefix}_loss": nll_sum / max(tokens, 1.0),
    }
    return metrics, hypotheses


def pretrained_tokenizer(tokenizer, max_length: int):
    """The ``tokenizers`` BPE as a ``transformers`` fast tokenizer (what AutoTokenizer loads)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        unk_token=UNK,
        eos_token=EOS,
        model_max_length=max_length,
    )


def save_pretrained(accelerator, model, tokenizer, gen_config, args, output_dir: str) -> None:
    """A transformers model folder of the anchor (``accelerator.get_state_dict``: the model is
    attached by extrap_accel.prepare): config.json, generation_config.json, model.safetensors
    and the tokenizer, so that::

        model = AutoModelForSeq2SeqLM.from_pretrained(output_dir)
        tokenizer = AutoTokenizer.from_pretrained(output_dir)
        batch = tokenizer(sentences, return_tensors="pt", padding=True)
        translations = tokenizer.batch_decode(model.generate(**batch), skip_special_tokens=True)
    """
    state_dict = accelerator.get_state_dict(model)
    net = accelerator.unwrap_model(model)
    net.generation_config = gen_config
    net.save_pretrained(
        output_dir,
        state_dict=state_dict,
        save_function=accelerator.save,
        is_main_process=accelerator.is_main_process,
    )
    if accelerator.is_main_process:
        pretrained_tokenizer(tokenizer, args.max_length).save_pretrained(output_dir)


def training_function(args: TranslateArguments) -> dict[str, float]:
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=common.trackers(args),  # --report_to
        project_dir=args.output_dir,
        # a seeded sampler: the same data order after a resume
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        deepspeed_plugin=common.deepspeed_plugin(args),  # gradient_clipping = --max_grad_norm
        kwargs_handlers=common.process_group_kwargs(),  # gloo for DeepSpeed on CPU
    )
    common.check_launch(accelerator, args)
    set_seed(args.seed)  # the same initial model on every rank

    # ---- data and tokenizer (every rank trains the same one)
    with accelerator.main_process_first():  # the main process downloads, the others read the cache
        pairs = get_pairs(args)
    train_src, train_tgt = pairs["train"]
    tokenizer = train_tokenizer(train_src + train_tgt, args.vocab_size, args.max_length)
    train_dl, eval_dls = get_dataloaders(args, tokenizer, pairs)
    eval_split = "validation" if "validation" in eval_dls else "test"
    gen_config = generation_config(args, tokenizer)

    # ---- model and optimizer
    model = build_model(args, tokenizer)
    groups = common.param_groups_weight_decay(model, args.weight_decay)  # none on norms, biases
    optimizer = common.create_optimizer(args, groups, extrap_max_norm=args.max_grad_norm)
    model, optimizer, train_dl, *prepared = extrap_accel.prepare(
        accelerator, model, optimizer, train_dl, *eval_dls.values()
    )
    eval_dls = dict(zip(eval_dls, prepared))
    optimizer = common.wrap_lars(args, optimizer)
    fresh = common.uses_closure(optimizer)  # extrap_sgd_fresh: step(closure)

    world, accumulation = accelerator.num_processes, args.gradient_accumulation_steps
    steps_per_epoch = len(train_dl) // accumulation  # optimizer steps
    max_steps, lr_at = common.plan_steps(
        args,
        steps_per_epoch,
        world,
        too_small=f"{len(train_src)} training pairs are fewer than one global batch "
        f"({common.global_batch(args, world)})",
    )

    # ---- checkpointed state, then resume (after everything is registered), then logging
    state = common.TrainState()
    accelerator.register_for_checkpointing(state)
    meter = common.smoothness_meter(accelerator, args, optimizer)  # --log_smoothness
    restore_baseline = common.baseline_rank_state(accelerator, model, optimizer, args)
    resumed_from = common.resume(accelerator, args, state, optimizer)
    if resumed_from and restore_baseline:
        restore_baseline(resumed_from)
    post_local = common.enable_post_local_sgd(accelerator, model, optimizer, args, state.step)
    common.init_trackers(accelerator, args, state, "extrap_accel_translate")
    logger = common.MetricsLogger(accelerator, args, state.step)
    n_params = sum(p.numel() for p in model.parameters())
    warmup = common.resolve_warmup_steps(args, steps_per_epoch)
    accelerator.print(
        f"Transformer {args.layers}+{args.layers} layers, d_model {args.d_model} "
        f"({n_params / 1e6:.2f}M parameters) on {args.dataset_name} {args.source_lang}->"
        f"{args.target_lang}: {len(train_src)} training pairs, BPE vocabulary "
        f"{tokenizer.get_vocab_size()}; K={world}, global batch "
        f"{common.global_batch(args, world)}, inverse-sqrt lr peak "
        f"{lr_at.keywords['peak_lr']:g} after {warmup} warmup steps, {max_steps} steps "
        f"({steps_per_epoch}/epoch), optimizer {args.optim}"
    )

    def run_eval(split, prefix):  # prefix of the metric names: "eval" during training
        return evaluate(
            accelerator,
            model,
            optimizer,
            eval_dls[split],
            tokenizer,
            gen_config,
            pairs[split][1],
            prefix,
        )

    # ---- the loop: one optimizer step per `accumulation` micro-batches
    bar = common.progress_bar(accelerator, max_steps, state.step)
    model.train()
    start, metrics = time.perf_counter(), {}
    while state.step < max_steps:
        epoch, done = divmod(state.step, steps_per_epoch)
        train_dl.set_epoch(epoch)  # the seeded sampler: the same order after a resume
        skip = done * accumulation  # micro-batches already seen this epoch (a resume)
        batches = accelerator.skip_first_batches(train_dl, skip) if skip else train_dl
        step_loss = 0.0
        for micro, batch in enumerate(batches, start=skip):
            if micro >= steps_per_epoch * accumulation:
                break  # (a last incomplete accumulation is dropped)
            with accelerator.accumulate(model):
                common.set_lr(optimizer, lr_at(state.step))
                common.apply_extrap_until(optimizer, args, state.step)
                # Dropout draws from the global generator, which data loaders also draw from
                # when they start an epoch: reseeding it from (seed, micro-step, rank) makes a
                # resumed run exact.
                dropout_seed = common.step_generator(
                    args.seed,
                    state.step * accumulation + micro % accumulation,
                    accelerator.process_index,
                ).initial_seed()

                def forward_backward(batch=batch, dropout_seed=dropout_seed):
                    torch.manual_seed(dropout_seed)  # the same masks for both passes of fresh
                    logits = model(
                        input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"],
                        decoder_input_ids=batch["decoder_input_ids"],
                    ).logits
                    loss = smoothed_loss(logits, batch["labels"], args.label_smoothing)
                    accelerator.backward(loss)
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
                step_loss = step_loss + loss / accumulation
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            bar.update(1)
            if post_local is not None and state.step >= max_steps:
                post_local.finish()  # end on one model: average a last local step

            if common.is_due(state.step, args.logging_steps, max_steps):
                metrics = common.train_metrics(accelerator, step_loss, optimizer, meter, post_local)
                bar.set_postfix(loss=f"{metrics['train_loss']:.3f}")
                logger.log(metrics, state.step)
            step_loss = 0.0
            if common.is_due(state.step, args.eval_steps, max_steps):
                scores, _ = run_eval(eval_split, "eval")
                bar.set_postfix(
                    loss=f"{metrics.get('train_loss', math.nan):.3f}",
                    bleu=f"{scores['eval_bleu']:.1f}",
                )
                logger.log(scores, state.step)
            if common.is_due(state.step, args.save_steps, max_steps):
                common.save_checkpoint(accelerator, args, state.step, resumed_from)
            if state.step >= max_steps:
                break
    bar.close()

    # ---- outputs: test scores and translations at the anchor, the model folder; the Hub
    results = logger.latest("eval_")
    test_scores, hypotheses = run_eval("test", "test")
    test_src, test_ref = pairs["test"]
    results.update(test_scores)
    results["test_source_copy_bleu"] = source_copy_bleu(test_src, test_ref)
    results.update(
        step=state.step, seconds=time.perf_counter() - start, train_loss=metrics.get("train_loss")
    )
    accelerator.wait_for_everyone()
    save_pretrained(accelerator, model, tokenizer, gen_config, args, args.output_dir)
    if accelerator.is_main_process:
        with open(os.path.join(args.output_dir, "test_translations.jsonl"), "w") as f:
            f.writelines(
                json.dumps({"source": s, "reference": r, "translation": h}, ensure_ascii=False)
                + "\n"
                for s, r, h in zip(test_src, test_ref, hypotheses)
            )
    common.write_results(accelerator, args.output_dir, results, logger.history)
    common.push_to_hub(accelerator, args, args.output_dir)
    accelerator.end_training()
    for s, h in list(zip(test_src, hypotheses))[:3]:
        accelerator.print(f"  {s}  ->  {h}")
    accelerator.print(
        f"step {state.step}: test BLEU {results['test_bleu']:.2f} (copying the source: "
        f"{results['test_source_copy_bleu']:.2f}), test loss {results['test_loss']:.3f}, "
        f"{results['seconds']:.1f} s; outputs in {args.output_dir}"
    )
    return results


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = common.parse_args(TranslateArguments, argv, description=__doc__)
    return training_function(args)


if __name__ == "__main__":
    common.run_main(main)
