"""What the recipes share (vision.py, language_model.py, translate.py). It never owns the loop.

Each recipe is one top-to-bottom script with its own ``training_function``; this module holds
the pieces that must behave the same in all of them and are tested once
(tests/test_recipes_common.py).

API
---
Configuration (defaults < ``--config file.yaml`` < command line, HF TrainingArguments names)
    TrainingArguments                     dataclass of the shared vocabulary; subclass it per recipe
    parse_args(cls, argv=None, *, description=None, exit_on_error=True) -> cls instance
    load_yaml_config(cls, path) -> dict   validated keys and values of a yaml file
    ConfigError(ValueError)               every configuration mistake, with the fix in the message
    DataError(ValueError)                 missing or malformed data, naming the expected schema

Data
    load_dataset_dict(name, config_name=None, *, schema, splits) -> datasets.DatasetDict
        the Hub (``datasets.load_dataset``) or a local directory of files in the same schema
        (parquet/arrow/csv/json/text files, or a ``save_to_disk`` directory)
    step_generator(seed, step, rank, device="cpu") -> torch.Generator
        a generator that depends only on (seed, step, rank): augmentation resumes exactly

Optimizers and schedules (pure functions of the step)
    param_groups_weight_decay(model, weight_decay) -> list[dict]  no decay on 1-D tensors
    create_optimizer(args, params, *, extrap_max_norm=None) -> torch.optim.Optimizer
    uses_closure(optimizer) -> bool       extrap_sgd_fresh: step(closure)
    scale_lr(base_lr, global_batch, base_batch, rule="linear") -> float
    warmup_step_decay_lr(step, *, peak_lr, total_steps, warmup_steps=0, warmup_init_lr=None,
                         milestones=(0.5, 0.75), factor=0.1) -> float
    inverse_sqrt_lr(step, *, peak_lr, warmup_steps, warmup_init_lr=0.0) -> float
    resolve_warmup_steps(args, steps_per_epoch) -> int
    lr_schedule(args, *, num_processes, total_steps, steps_per_epoch) -> Callable[[int], float]
    plan_steps(args, steps_per_epoch, num_processes, *, too_small) -> (max_steps, lr_at)
    set_lr(optimizer, lr) -> None
    disable_extrapolation(optimizer) -> None       extrap_scale = 0 in every group (footnote 9)
    apply_extrap_until(optimizer, args, step) -> bool

Accelerate glue
    make_accelerator(args, **accelerator_kwargs) -> accelerate.Accelerator
    wrap_lars(args, optimizer) -> optimizer   extrap_accel.LARS on the prepared optimizer (--lars)
    check_fsdp(accelerator, args)          accelerate's FSDP plugin: FSDP2 only, refused options
    broadcast_buffers(accelerator, model)  FSDP2: buffers from rank 0 (as DDP; before training forwards and saves)
    enable_post_local_sgd(accelerator, model, optimizer, args, step) -> PostLocalSGD | None
    train_step(optimizer, forward_backward, *, clip=None, meter=None) -> loss
    TrainState                             the step counter in every checkpoint
    register_rank_state(accelerator, name, obj, required=True)   per-rank state (LSTM hidden)
    resume(accelerator, args, state) -> str | None   --resume_from_checkpoint DIR | latest
    start_run(accelerator, args, model, optimizer, state, project) -> (meter, post_local, logger)
    save_checkpoint(accelerator, args, step) -> str   output_dir/checkpoint-<step>
    find_latest_checkpoint(output_dir) -> str | None

Logging
    MetricsLogger(accelerator, args, project_name, resumed_step=0)
        .log(metrics, step)   trackers (accelerator.log), metrics.jsonl and the curves
        .latest(prefix="")    the last logged value of each metric
        .finish(model, results)   saves the model (anchor), results.json, curves.png (Agg)
    progress_bar(accelerator, total, initial=0) -> tqdm   main process only
    train_metrics(accelerator, loss, optimizer, meter=None, post_local=None) -> dict
    is_due(step, every, max_steps) -> bool   every N steps and at the last one
    SmoothnessMeter(optimizer, accelerator)   ‖g_t − g_{t−1}‖ / ‖x̃_t − x̃_{t−1}‖ on this rank
    smoothness_meter(accelerator, args, optimizer) -> SmoothnessMeter | None   --log_smoothness

A recipe, in outline (vision.py and language_model.py are complete examples)::

    @dataclass
    class MyArguments(common.TrainingArguments):   # recipe fields; new defaults
        label_smoothing: float = 0.1

    args = common.parse_args(MyArguments, description=__doc__)
    accelerator = common.make_accelerator(args)
    with accelerator.main_process_first():
        data = ...                                   # common.load_dataset_dict(...) or embedded
    optimizer = common.create_optimizer(args, common.param_groups_weight_decay(model, wd))
    model, optimizer, train_dl = extrap_accel.prepare(accelerator, model, optimizer, train_dl)
    optimizer = common.wrap_lars(args, optimizer)
    lr_at = common.lr_schedule(args, num_processes=..., total_steps=..., steps_per_epoch=...)
    state = common.TrainState(); accelerator.register_for_checkpointing(state)
    meter = common.smoothness_meter(accelerator, args, optimizer)
    common.resume(accelerator, args, state)        # after everything is registered
    post_local = common.enable_post_local_sgd(accelerator, model, optimizer, args, state.step)
    logger = common.MetricsLogger(accelerator, args, "project", state.step)
    while state.step < max_steps:                  # epoch = step // steps_per_epoch;
        ...                                        # skip_first_batches after a resume
        common.set_lr(optimizer, lr_at(state.step))
        common.apply_extrap_until(optimizer, args, state.step)
        loss = common.train_step(optimizer, forward_backward, clip=clip, meter=meter)
        state.step += 1
        if post_local is not None and state.step >= max_steps:
            post_local.finish()                    # end on one (averaged) model
        if common.is_due(state.step, args.logging_steps, max_steps):
            logger.log(common.train_metrics(accelerator, loss, optimizer, meter, post_local),
                       state.step)
        if common.is_due(state.step, args.save_steps, max_steps):
            common.save_checkpoint(accelerator, args, state.step)
    logger.finish(model, results)
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import importlib.util
import json
import math
import os
import re
import sys
import types
import typing
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

import extrap_accel

# ============================================================================ configuration


class ConfigError(ValueError):
    """A configuration mistake: an unknown key, a wrong type or value, or options that clash."""


class DataError(ValueError):
    """Data that is missing or does not have the schema the recipe expects."""


@dataclass
class TrainingArguments:
    """The vocabulary every recipe shares. Field names follow HF ``TrainingArguments``."""

    # ---- data and run
    dataset: str = "default"  # the embedded default, a Hub id, or a local directory
    dataset_config: str | None = None  # the Hub configuration, e.g. wikitext-2-raw-v1
    output_dir: str = "outputs/run"
    run_name: str | None = None
    seed: int = 0
    # ---- length
    max_steps: int = -1  # > 0 overrides num_train_epochs (optimizer steps)
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 32  # b; the global batch is K·b
    per_device_eval_batch_size: int = 100
    # ---- optimizer (any registry entry: extrap_accel.list_optimizers())
    optimizer: str = "extrap_sgd"
    learning_rate: float = 0.1  # γ₀ for base_batch_size samples, scaled by lr_scaling
    base_batch_size: int = 128
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = None
    # ---- schedule (per iteration)
    lr_schedule: Literal["step", "constant", "inverse_sqrt"] = "step"
    warmup_epochs: float = 0.0
    warmup_steps: int = 0
    warmup_init_lr: float | None = None  # None: the rate for one worker's batch (Goyal et al.)
    lr_decay_milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    lr_decay_factor: float = 0.1
    # ---- extrapolation
    extrap_scale: float = 1.0  # γ̃ = extrap_scale·lr/K
    extrap_lr: float | None = None  # an absolute γ̃ instead
    noise_scale: float | None = None  # the gaussian/uniform/filterwise variants
    extrap_until: int | None = None  # from this optimizer step on: extrap_scale = 0
    post_local_from: int | None = None  # Algorithm 2: post-local SGD from this step
    local_period: int = 4  # H: local steps between anchor averagings
    # ---- LARS on the base update
    lars: bool = False
    lars_trust_coefficient: float = 0.02
    lars_clip: bool = True
    # ---- logging and checkpoints
    logging_steps: int = 10
    eval_steps: int = 0  # 0: evaluate at the end only
    save_steps: int = 0  # 0: save at the end only
    report_to: Literal["none", "wandb", "tensorboard"] = "none"
    resume_from_checkpoint: str | None = None  # a checkpoint directory or "latest"
    log_smoothness: bool = False

    def __post_init__(self) -> None:
        names = extrap_accel.list_optimizers()
        if self.optimizer not in names:
            raise ConfigError(
                f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(names)}"
            )
        positive = ("per_device_train_batch_size", "per_device_eval_batch_size",
                    "base_batch_size", "logging_steps")  # fmt: skip
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ConfigError("give max_steps > 0 or num_train_epochs > 0")
        if self.warmup_steps and self.warmup_epochs:
            raise ConfigError("give warmup_steps or warmup_epochs, not both")
        if self.local_period < 2:
            raise ConfigError(f"local_period must be >= 2, got {self.local_period}")
        for name in ("extrap_until", "post_local_from"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{name} must be >= 0 (an optimizer step), got {value}")
        if sorted(self.lr_decay_milestones) != list(self.lr_decay_milestones) or not all(
            0 < m < 1 for m in self.lr_decay_milestones
        ):
            raise ConfigError(
                "lr_decay_milestones are increasing fractions of training in (0, 1), got "
                f"{self.lr_decay_milestones}"
            )
        if self.lars and uses_closure_name(self.optimizer):
            raise ConfigError(f"--lars cannot wrap {self.optimizer} (its step takes a closure)")
        if self.lars and extrap_accel.get_optimizer_info(self.optimizer).family == "adam":
            raise ConfigError(
                f"--lars rescales an SGD-type update; {self.optimizer} is Adam-type: use --lars "
                "with sgd or an extrap_sgd* optimizer"
            )
        if self.log_smoothness and uses_closure_name(self.optimizer):
            raise ConfigError(f"--log_smoothness is not defined for {self.optimizer}")
        if self.report_to == "tensorboard" and not any(
            importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")
        ):
            raise ConfigError("--report_to tensorboard needs `pip install tensorboard`")


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields(cls) -> dict[str, Any]:
    hints = _hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


_TRUE, _FALSE = {"true", "yes", "1", "on"}, {"false", "no", "0", "off"}


def _coerce(name: str, hint: Any, value: Any) -> Any:
    """``value`` (a string from the command line or a yaml value) as the type ``hint`` says."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, inner[0], value)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name} must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v for v in re.split(r"[,\s]+", value.strip()) if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return [_coerce(name, args[0], v) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool) or (hint is int and isinstance(value, float)):
            raise ConfigError(f"{name} must be {hint.__name__}, got {value!r}")
        try:
            return hint(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be {hint.__name__}, got {value!r}") from None
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint!r} for {name}")  # a bug in a dataclass


def _unknown_key(cls, key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(_fields(cls)), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown key {key!r} in {where}{hint}; {cls.__name__} has no such field")


def load_yaml_config(cls, path: str) -> dict[str, Any]:
    """The keys of the yaml file ``path``, each checked against the fields of ``cls``."""
    import yaml

    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r} is not valid yaml: {e}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of keys to values")
    hints = _fields(cls)
    out = {}
    for key, value in raw.items():
        if key not in hints:
            raise _unknown_key(cls, key, path)
        out[key] = _coerce(key, hints[key], value)
    return out


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ConfigError(message)


def _build_parser(cls, description: str | None) -> _Parser:
    parser = _Parser(
        description=description,
        argument_default=argparse.SUPPRESS,  # only what was given overrides the yaml
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--config", help="a yaml file of fields (the command line overrides it)")
    defaults = {f.name: f for f in dataclasses.fields(cls)}
    for name, hint in _fields(cls).items():
        f = defaults[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kwargs: dict[str, Any] = {"help": f"(default: {default})", "metavar": name.upper()}
        bare = hint in (bool, bool | None)
        if bare:  # --lars alone means true
            kwargs.update(nargs="?", const="true")
        if typing.get_origin(hint) is list:
            kwargs.update(nargs="+")
        parser.add_argument(f"--{name}", **kwargs)
    return parser


def parse_args(cls, argv: list[str] | None = None, *, description: str | None = None,
               exit_on_error: bool = True):  # fmt: skip
    """Build ``cls`` from its defaults, then ``--config FILE.yaml``, then the other options.

    Raises ConfigError (or, with ``exit_on_error``, prints it and exits with status 2).
    """
    try:
        parser = _build_parser(cls, description)
        given = vars(parser.parse_args(argv))
        values = {}
        config = given.pop("config", None)
        if config is not None:
            values.update(load_yaml_config(cls, config))
        from_yaml = set(values)
        hints = _fields(cls)
        for key, value in given.items():
            if isinstance(value, list):  # nargs="+": "0.5 0.75" or "0.5,0.75"
                value = " ".join(value)
            values[key] = _coerce(key, hints[key], value)
        # warmup in steps or in epochs: the one given (command line over yaml) replaces the
        # other's default
        pair = ("warmup_steps", "warmup_epochs")
        for source in (set(given), from_yaml):
            chosen = [k for k in pair if k in source]
            if chosen:
                if len(chosen) == 1:
                    other = pair[1 - pair.index(chosen[0])]
                    if other not in given:
                        values[other] = _coerce(other, hints[other], 0)
                break
        return cls(**values)
    except ConfigError as e:
        if not exit_on_error:
            raise
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def run_main(main: Callable[[], Any]) -> None:
    """Run a recipe's ``main`` from the command line: a configuration or data mistake found
    after parsing (one process for post-local SGD, a malformed dataset, a missing checkpoint)
    ends with its message and exit status 2, as a parsing error does, not with a traceback."""
    try:
        main()
    except (ConfigError, DataError) as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def config_to_dict(args) -> dict[str, Any]:
    return dataclasses.asdict(args)


# ============================================================================ data


def load_dataset_dict(name: str, config_name: str | None = None, *, schema: str,
                      splits: Iterable[str] = ("train",)):  # fmt: skip
    """A ``datasets.DatasetDict`` from the Hub or from a local directory of the same schema.

    ``name``: a Hub id (``uoft-cs/cifar10``) or an existing local directory that holds either a
    ``save_to_disk`` dataset or data files (parquet, arrow, csv, json, txt) whose names give the
    split (``train-*.parquet``, ``test.csv``, ...), optionally in a subdirectory named after
    ``config_name`` as in the Hub repositories. ``schema`` describes the expected columns for
    the error messages; every split in ``splits`` must exist.
    """
    import datasets

    local = os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1
    try:
        if local:
            path = os.path.expanduser(name)
            if not os.path.isdir(path):
                raise DataError(f"{name!r} is not a directory; expected a directory of {schema}")
            if config_name and os.path.isdir(os.path.join(path, config_name)):
                path = os.path.join(path, config_name)
            if os.path.exists(os.path.join(path, "dataset_dict.json")):
                ds = datasets.load_from_disk(path)
            else:
                ds = datasets.load_dataset(path)
        else:
            ds = datasets.load_dataset(name, config_name)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types; the message says why
        where = f"the local directory {name!r}" if local else f"the Hub dataset {name!r}"
        hint = "" if local else (
            " (the Hub may be unreachable: pass --dataset default for the embedded data, or "
            "--dataset <local dir> holding files of that schema)"
        )  # fmt: skip
        raise DataError(
            f"could not load {where}: {type(e).__name__}: {e}. Expected {schema}{hint}"
        ) from e
    if not isinstance(ds, datasets.DatasetDict):
        ds = datasets.DatasetDict({"train": ds})
    missing = [s for s in splits if s not in ds]
    if missing:
        raise DataError(
            f"{name!r} has splits {sorted(ds)}, missing {missing}; expected {schema}"
        )
    return ds


def step_generator(seed: int, step: int, rank: int, device: str | torch.device = "cpu"):
    """A ``torch.Generator`` seeded from (seed, step, rank) only, so randomness resumes exactly."""
    gen = torch.Generator(device=device)
    gen.manual_seed(((seed * 1_000_003 + step) * 10_007 + rank) % (2**63 - 1))
    return gen


# ============================================================================ optimizers


def param_groups_weight_decay(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: weight decay on weights, none on 1-D tensors (BatchNorm, LayerNorm, biases)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.dim() <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def uses_closure_name(name: str) -> bool:
    return extrap_accel.get_optimizer_info(name).needs_closure


def _base_optimizer(optimizer):
    """The torch optimizer under LARS and accelerate's AcceleratedOptimizer."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def uses_closure(optimizer) -> bool:
    base = _base_optimizer(optimizer)
    return any("extrapolation" in g and extrap_accel.variant_info(
        g["extrapolation"], bool(g.get("filterwise"))).needs_closure for g in base.param_groups)


def create_optimizer(args: TrainingArguments, params, *, extrap_max_norm: float | None = None):
    """The registry entry ``args.optimizer`` with the arguments it takes from ``args``.

    SGD-type entries get lr/momentum/nesterov/weight_decay, Adam-type ones lr/betas/eps/
    weight_decay (decoupled); extrapolating entries also get extrap_scale or extrap_lr, the seed,
    noise_scale (noise variants) and ``extrap_max_norm`` (the 'past' direction only).
    """
    info = extrap_accel.get_optimizer_info(args.optimizer)
    adam = info.family == "adam"
    kwargs: dict[str, Any] = {"lr": args.learning_rate, "weight_decay": args.weight_decay}
    if adam:
        kwargs.update(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    else:
        kwargs.update(momentum=args.momentum, nesterov=args.nesterov and args.momentum > 0)
    if info.extrapolates:
        kwargs["seed"] = args.seed
        if args.extrap_lr is not None:
            kwargs["extrap_lr"] = args.extrap_lr
        else:
            kwargs["extrap_scale"] = args.extrap_scale
        if info.variant.noise:
            kwargs["noise_scale"] = args.noise_scale
        elif args.noise_scale is not None:
            raise ConfigError(f"noise_scale applies to the noise variants, not {args.optimizer}")
        if info.variant.name == "past" and extrap_max_norm is not None:
            kwargs["extrap_max_norm"] = extrap_max_norm
    elif args.noise_scale is not None or args.extrap_lr is not None:
        raise ConfigError(f"{args.optimizer} does not extrapolate: remove noise_scale/extrap_lr")
    try:
        return extrap_accel.create_optimizer(args.optimizer, params, **kwargs)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def scale_lr(base_lr: float, global_batch: int, base_batch: int, rule: str = "linear") -> float:
    """γ = γ₀·B/B₀ (linear), γ₀·√(B/B₀) (sqrt) or γ₀ (none), B = K·b the global batch."""
    ratio = global_batch / base_batch
    if rule == "linear":
        return base_lr * ratio
    if rule == "sqrt":
        return base_lr * math.sqrt(ratio)
    if rule == "none":
        return base_lr
    raise ConfigError(f"lr_scaling must be linear, sqrt or none, got {rule!r}")


def warmup_step_decay_lr(step: int, *, peak_lr: float, total_steps: int, warmup_steps: int = 0,
                         warmup_init_lr: float | None = None,
                         milestones: Iterable[float] = (0.5, 0.75), factor: float = 0.1) -> float:  # fmt: skip
    """The rate of optimizer step ``step`` (0-based): per-iteration linear warmup, then step decay.

    Warmup: from ``warmup_init_lr`` (default peak_lr, i.e. none) at step 0 to ``peak_lr`` at step
    ``warmup_steps``. Decay: ×``factor`` at each milestone, a fraction of ``total_steps`` (so of
    the training samples seen); ``milestones=()`` is no decay.
    """
    if step < warmup_steps:
        start = peak_lr if warmup_init_lr is None else warmup_init_lr
        return start + (peak_lr - start) * step / warmup_steps
    passed = sum(step >= round(m * total_steps) for m in milestones)
    return peak_lr * factor**passed


def inverse_sqrt_lr(step: int, *, peak_lr: float, warmup_steps: int,
                    warmup_init_lr: float = 0.0) -> float:  # fmt: skip
    """fairseq's inverse square root: linear warmup to ``peak_lr``, then peak·√(warmup/step).

    Step ``warmup_steps`` has ``peak_lr``; with ``warmup_steps = 0`` it is peak/√(step+1).
    """
    if step < warmup_steps:
        return warmup_init_lr + (peak_lr - warmup_init_lr) * step / warmup_steps
    return peak_lr * math.sqrt(max(warmup_steps, 1) / max(step, 1))


def resolve_warmup_steps(args: TrainingArguments, steps_per_epoch: int) -> int:
    if args.warmup_steps:
        return args.warmup_steps
    return round(args.warmup_epochs * steps_per_epoch)


def lr_schedule(args: TrainingArguments, *, num_processes: int, total_steps: int,
                steps_per_epoch: int) -> Callable[[int], float]:  # fmt: skip
    """``args``' schedule as a pure function of the optimizer step.

    The peak rate is learning_rate scaled (lr_scaling) from base_batch_size to the global batch
    K·b. Warmup (per iteration) starts from warmup_init_lr, by default the same rule's rate for
    one worker's batch b — the small-batch rate, as in Goyal et al. (2017) — or from 0 for
    inverse_sqrt. ``step``: ×lr_decay_factor at lr_decay_milestones; ``constant``: no decay.
    """
    b = args.per_device_train_batch_size
    peak = scale_lr(args.learning_rate, b * num_processes, args.base_batch_size, args.lr_scaling)
    warmup = resolve_warmup_steps(args, steps_per_epoch)
    init = args.warmup_init_lr
    if args.lr_schedule == "inverse_sqrt":
        return functools.partial(inverse_sqrt_lr, peak_lr=peak, warmup_steps=warmup,
                                 warmup_init_lr=0.0 if init is None else init)  # fmt: skip
    if init is None:
        init = scale_lr(args.learning_rate, b, args.base_batch_size, args.lr_scaling)
    milestones = args.lr_decay_milestones if args.lr_schedule == "step" else ()
    return functools.partial(
        warmup_step_decay_lr, peak_lr=peak, total_steps=total_steps, warmup_steps=warmup,
        warmup_init_lr=init, milestones=tuple(milestones), factor=args.lr_decay_factor,
    )  # fmt: skip


def plan_steps(args: TrainingArguments, steps_per_epoch: int, num_processes: int, *,
               too_small: str) -> tuple[int, Callable[[int], float]]:
    """``max_steps`` (``--max_steps``, else epochs × steps per epoch) and the LR schedule.

    ``too_small`` is the DataError message when the data do not fill one optimizer step.
    """
    if steps_per_epoch == 0:
        raise DataError(too_small)
    max_steps = args.max_steps if args.max_steps > 0 else math.ceil(
        args.num_train_epochs * steps_per_epoch
    )
    return max_steps, lr_schedule(args, num_processes=num_processes, total_steps=max_steps,
                                  steps_per_epoch=steps_per_epoch)  # fmt: skip


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def disable_extrapolation(optimizer) -> None:
    """Turn extrapolation off from the next step on: extrap_scale = 0 in every group.

    Groups with an absolute ``extrap_lr`` get 0 there too, and the noise variants noise_scale
    0, so that x̃ = x for every variant (ALGORITHMS.md, footnote 9 of the paper).
    """
    for group in _base_optimizer(optimizer).param_groups:
        if "extrap_scale" not in group:
            continue  # sgd, adamw: nothing to turn off
        group["extrap_scale"] = 0.0
        if group.get("extrap_lr") is not None:
            group["extrap_lr"] = 0.0
        if group.get("noise_scale") is not None:
            group["noise_scale"] = 0.0


def apply_extrap_until(optimizer, args: TrainingArguments, step: int) -> bool:
    """Before optimizer step ``step``: off when step >= extrap_until. True if it is off."""
    if args.extrap_until is not None and step >= args.extrap_until:
        disable_extrapolation(optimizer)
        return True
    return False


# ============================================================================ accelerate


def make_accelerator(args: TrainingArguments, **kwargs):
    """An Accelerator with the trackers of ``--report_to`` and a seeded sampler (exact resume).

    W&B without WANDB_API_KEY runs offline (WANDB_MODE=offline) and writes under output_dir.
    Options that need a number of processes the launch does not have fail here, early.
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, is_tensorboard_available, set_seed

    log_with = None
    if args.report_to == "wandb":
        if not os.environ.get("WANDB_API_KEY"):
            os.environ.setdefault("WANDB_MODE", "offline")
        log_with = "wandb"
    elif args.report_to == "tensorboard":
        if not is_tensorboard_available():
            raise ConfigError("--report_to tensorboard needs `pip install tensorboard`")
        log_with = "tensorboard"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and not (
        torch.cuda.is_available() or "kwargs_handlers" in kwargs
    ):  # DeepSpeed on CPU (accelerate_configs/cpu_2proc_deepspeed.yaml): accelerate would
        # count one process without a gloo group
        from accelerate.utils import InitProcessGroupKwargs

        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    accelerator = Accelerator(
        log_with=log_with,
        project_dir=args.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        **kwargs,
    )
    if accelerator.num_processes > 1 and uses_closure_name(args.optimizer):
        raise ConfigError(
            f"{args.optimizer} (an extra forward/backward per step) runs on one process only; "
            "use extrap_sgd under data parallelism"
        )
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        deepspeed_gradient_clipping(plugin.deepspeed_config, args.max_grad_norm)
    check_fsdp(accelerator, args)
    set_seed(args.seed)  # the same initial model on every rank
    return accelerator


def is_fsdp(accelerator) -> bool:
    """accelerate's FSDP plugin is in use (only FSDP2, fsdp_version: 2, gets past make_accelerator)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def check_fsdp(accelerator, args: TrainingArguments) -> None:
    """Under accelerate's FSDP plugin: FSDP2 only, and none of the options that need whole
    tensors or DDP (extrap_accel.prepare attaches the FSDP2 adapter; README, "FSDP2")."""
    if not is_fsdp(accelerator):
        return
    version = getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1)
    if version != 2:
        raise ConfigError(
            "the recipes support accelerate's FSDP plugin with fsdp_version: 2 (FSDP2, "
            "fully_shard) only: use accelerate_configs/fsdp2_bf16.yaml or set fsdp_version: 2"
        )
    refused = [(args.post_local_from is not None, "--post_local_from (post-local SGD is a DDP "
                "communication hook)"),
               (args.lars, "--lars (LARS needs each tensor's whole norm; FSDP2 holds shards)"),
               (args.log_smoothness, "--log_smoothness (it concatenates whole gradients and "
                "points; FSDP2 holds shards)")]  # fmt: skip
    for on, what in refused:
        if on:
            raise ConfigError(f"{what} is not supported under FSDP2: remove it, or use DDP "
                              "(accelerate_configs/multi_gpu.yaml)")


def broadcast_buffers(accelerator, model) -> None:
    """Under FSDP2, every buffer (BatchNorm's running statistics) from rank 0, as DDP does before
    each training forward (broadcast_buffers=True). FSDP2 leaves buffers to each rank and its
    checkpoints keep one rank's copy; this keeps the ranks alike, so a resume is exact. One
    broadcast per buffer; nothing without buffers or under other backends."""
    if not is_fsdp(accelerator) or accelerator.num_processes < 2:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def _broadcast_buffers_before_training_forwards(accelerator, model) -> None:
    if not is_fsdp(accelerator) or not any(True for _ in model.buffers()):
        return

    def hook(module, args):
        if module.training and torch.is_grad_enabled():
            broadcast_buffers(accelerator, module)

    model.register_forward_pre_hook(hook)


def deepspeed_gradient_clipping(config: dict[str, Any], max_grad_norm: float | None) -> None:
    """Under DeepSpeed the engine clips (``accelerator.clip_grad_norm_`` only measures), so
    ``--max_grad_norm`` becomes the config's ``gradient_clipping`` (0: none). A config that
    clips at another norm is a conflict, not something to choose silently."""
    wanted = float(max_grad_norm or 0.0)
    current = config.get("gradient_clipping", "auto")
    if current == "auto" or float(current) in (0.0, wanted):
        config["gradient_clipping"] = wanted
        return
    raise ConfigError(
        f"the DeepSpeed config clips gradients at {current} (gradient_clipping) but "
        f"--max_grad_norm is {max_grad_norm}: pass --max_grad_norm {current}, or set "
        f"gradient_clipping to {wanted} (or 0) in the DeepSpeed config"
    )


def wrap_lars(args: TrainingArguments, optimizer):
    """``extrap_accel.LARS`` around the prepared optimizer when ``--lars`` (base update only)."""
    if not args.lars:
        return optimizer
    try:
        return extrap_accel.LARS(
            optimizer, trust_coefficient=args.lars_trust_coefficient, clip=args.lars_clip
        )
    except NotImplementedError as e:  # under DeepSpeed
        raise ConfigError(f"--lars: {e}") from None


def enable_post_local_sgd(accelerator, model, optimizer, args: TrainingArguments, step: int = 0):
    """Algorithm 2 from optimizer step ``args.post_local_from`` (None: not used).

    ``step`` is the step the run starts from (after a resume): the switch and the averaging
    schedule continue from it. Needs a multi-process launch (the DDP-wrapped model).
    The anchors are averaged after steps post_local_from + j·local_period (j = 1, 2, ...);
    in between they differ per rank, and an evaluation gathers each rank's predictions from
    its own anchor: evaluate at those steps to see the averaged model. The recipes call
    ``post_local.finish()`` after the last step, so training ends on one averaged model.
    """
    if args.post_local_from is None:
        return None
    if accelerator.num_processes < 2:
        raise ConfigError(
            "--post_local_from needs data parallelism (K >= 2 processes): launch with e.g. "
            "`ACCELERATE_USE_CPU=1 accelerate launch --config_file "
            "accelerate_configs/cpu_2proc.yaml ...` or `accelerate launch --num_processes K ...`"
        )
    base = _base_optimizer(optimizer)
    post_local = extrap_accel.enable_post_local_sgd(
        model, base, start_step=args.post_local_from, period=args.local_period,
    )  # fmt: skip
    post_local.resume_at(step)  # the comm hook's and the averager's counters
    return post_local


def _baseline_rank_state(accelerator, model, optimizer, args: TrainingArguments):
    """Post-local SGD with a torch optimizer (the baseline): in phase 2 its weights and momentum
    differ per rank, and accelerate saves rank 0's only. Save each rank's own beside the
    checkpoint (``post_local_baseline_rank<r>.pt``); returns the function that restores them
    after ``load_state`` (None when not needed: extrap_accel optimizers keep their own)."""
    base = _base_optimizer(optimizer)
    if args.post_local_from is None or isinstance(base, extrap_accel.ExtrapOptimizer):
        return None
    module = accelerator.unwrap_model(model)

    def path(directory: str) -> str:
        return os.path.join(directory, f"post_local_baseline_rank{accelerator.process_index}.pt")

    def save_hook(models, weights, output_dir):
        torch.save({"model": module.state_dict(), "optimizer": base.state_dict()},
                   path(output_dir))  # fmt: skip

    accelerator.register_save_state_pre_hook(save_hook)

    def restore(directory: str) -> None:
        if not os.path.exists(path(directory)):
            warnings.warn(
                f"{path(directory)} is missing: this rank continues from rank 0's weights and "
                "momentum, not an exact continuation of post-local SGD",
                stacklevel=2,
            )
            return
        saved = torch.load(path(directory), map_location="cpu", weights_only=True)
        module.load_state_dict(saved["model"])
        base.load_state_dict(saved["optimizer"])

    return restore


def train_step(optimizer, forward_backward: Callable[[], torch.Tensor], *,
               clip: Callable[[], Any] | None = None,
               meter: SmoothnessMeter | None = None) -> torch.Tensor:  # fmt: skip
    """One optimizer step: zero_grad, ``forward_backward()`` (returns the loss), the smoothness
    meter, ``clip()`` (gradient clipping of the averaged gradient) and ``optimizer.step()``.

    ``extrap_sgd_fresh`` takes the same sequence as a closure (it runs it twice: at the anchor
    and at x̃); its loss is the one at x̃.
    """

    losses = []

    def closure():
        optimizer.zero_grad()
        losses.append(forward_backward())
        if clip is not None:
            clip()
        return losses[-1]

    if uses_closure(optimizer):
        optimizer.step(closure)  # accelerate's wrapper does not return the loss
        return losses[-1]
    optimizer.zero_grad()
    loss = forward_backward()
    if meter is not None:
        meter.update()
    if clip is not None:
        clip()
    optimizer.step()
    return loss


@dataclass
class TrainState:
    """What the loop needs to continue: the number of optimizer steps taken."""

    step: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])


def register_rank_state(accelerator, name: str, obj, required: bool = True) -> None:
    """Save ``obj.state_dict()`` on every rank in ``save_state`` and load it in ``load_state``.

    accelerate saves registered objects from the main process only; per-rank state (an LSTM's
    hidden state, rank-specific buffers) goes to ``<checkpoint>/<name>_rank<i>.pt``. A file
    missing at load time is an error if ``required``, else ``obj`` keeps its fresh state.
    """

    def path(directory: str) -> str:
        return os.path.join(directory, f"{name}_rank{accelerator.process_index}.pt")

    def save_hook(models, weights, output_dir):
        torch.save(obj.state_dict(), path(output_dir))

    def load_hook(models, input_dir):
        file = path(input_dir)
        if not os.path.exists(file):
            if not required:
                return
            raise FileNotFoundError(
                f"{file} is missing: the checkpoint was saved by fewer processes, or without {name}"
            )
        obj.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


_COMPLETE = "checkpoint_complete.json"  # written once every rank has saved


def find_latest_checkpoint(output_dir: str) -> str | None:
    """The complete ``checkpoint-<step>`` directory of ``output_dir`` with the largest step
    (a save that was interrupted is skipped, with a warning)."""
    if not os.path.isdir(output_dir):
        return None
    found = sorted((int(m.group(1)), d) for d in os.listdir(output_dir)
                   if (m := _CHECKPOINT.match(d)))  # fmt: skip
    while found and not os.path.exists(os.path.join(output_dir, found[-1][1], _COMPLETE)):
        warnings.warn(f"skipping {found.pop()[1]} in {output_dir}: its save did not finish",
                      stacklevel=2)  # fmt: skip
    return os.path.join(output_dir, found[-1][1]) if found else None


def save_checkpoint(accelerator, args: TrainingArguments, step: int) -> str:
    """``accelerator.save_state`` into output_dir/checkpoint-<step>: model (the anchor),
    optimizer, per-rank extrapolation state, RNG, sampler and the registered TrainState; then,
    once every rank has saved, ``checkpoint_complete.json``."""
    path = os.path.join(args.output_dir, f"checkpoint-{step}")
    for model in accelerator._models:  # FSDP2: the checkpoint keeps one rank's buffers
        broadcast_buffers(accelerator, model)
    accelerator.save_state(path)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(path, _COMPLETE), "w") as f:
            json.dump({"step": step, "num_processes": accelerator.num_processes}, f)
    return path


def check_checkpoint(accelerator, path: str) -> None:
    """Fail before loading, with the fix, if ``path`` cannot be resumed by this launch."""
    marker = os.path.join(path, _COMPLETE)
    if not os.path.exists(marker):
        raise ConfigError(
            f"{path} has no {_COMPLETE}: its save did not finish (or another program wrote it); "
            "resume from an earlier checkpoint-<step>"
        )
    with open(marker) as f:
        saved = json.load(f).get("num_processes")
    if saved is not None and saved != accelerator.num_processes:
        raise ConfigError(
            f"{path} was saved by {saved} processes and this launch has "
            f"{accelerator.num_processes}: each rank's extrapolation state belongs to one worker; "
            f"resume with {saved} processes"
        )
    rank = accelerator.process_index
    wanted = [f"random_states_{rank}.pkl"] if saved and saved > 1 else []
    if os.path.exists(os.path.join(path, "optimizer.bin")):  # (DeepSpeed keeps its own layout)
        wanted.append("model.safetensors")
        wanted += [f for f in os.listdir(path) if f.startswith("extrap_accel_")
                   and f.endswith("_rank0.pt") or f == "extrap_accel_rank0.pt"]  # fmt: skip
        wanted = [f.replace("rank0.pt", f"rank{rank}.pt") for f in wanted]
    missing = [f for f in wanted if not os.path.exists(os.path.join(path, f))]
    if missing:
        raise ConfigError(
            f"{path} is incomplete: {', '.join(missing)} missing for rank {rank} (with "
            "node-local disks, copy every node's files into the checkpoint); resume from a "
            "complete checkpoint"
        )


def resume(accelerator, args: TrainingArguments, state: TrainState) -> str | None:
    """``accelerator.load_state`` from ``--resume_from_checkpoint`` (a directory or ``latest``).

    Register TrainState (``accelerator.register_for_checkpointing``) and prepare everything with
    ``extrap_accel.prepare`` first. Returns the directory loaded, or None.
    """
    spec = args.resume_from_checkpoint
    if not spec:
        return None
    path = find_latest_checkpoint(args.output_dir) if spec == "latest" else spec
    if path is None:
        raise ConfigError(
            f"--resume_from_checkpoint latest: no complete checkpoint-<step> directory in "
            f"{args.output_dir}"
        )
    if not os.path.isdir(path):
        raise ConfigError(f"--resume_from_checkpoint {spec}: {path} is not a directory")
    check_checkpoint(accelerator, path)
    import pickle

    from safetensors import SafetensorError

    try:
        accelerator.load_state(path)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError,
            SafetensorError) as e:  # fmt: skip
        raise ConfigError(
            f"could not load {path} ({type(e).__name__}: {e}); the checkpoint is damaged: "
            "resume from an earlier checkpoint-<step>"
        ) from e
    accelerator.print(f"resumed from {path} at step {state.step}")
    return path


# ============================================================================ logging


def start_run(accelerator, args: TrainingArguments, model, optimizer, state: TrainState,
              project: str):
    """Once everything is registered for checkpointing: the smoothness meter, the resume (which
    moves ``state.step``), post-local SGD from that step, and the logger. Returns
    ``(meter, post_local, logger)``."""
    meter = smoothness_meter(accelerator, args, optimizer)
    _broadcast_buffers_before_training_forwards(accelerator, model)
    baseline = _baseline_rank_state(accelerator, model, optimizer, args)
    path = resume(accelerator, args, state)
    if path is not None and baseline is not None:
        baseline(path)
    post_local = enable_post_local_sgd(accelerator, model, optimizer, args, state.step)
    logger = MetricsLogger(accelerator, args, project, state.step)
    return meter, post_local, logger


def progress_bar(accelerator, total: int, initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not accelerator.is_local_main_process,
                dynamic_ncols=True)  # fmt: skip


def is_due(step: int, every: int, max_steps: int) -> bool:
    """Log/evaluate/save now: every ``every`` steps (0: never) and at the last step."""
    return (every > 0 and step % every == 0) or step == max_steps


def train_metrics(accelerator, loss: torch.Tensor, optimizer,
                  meter: SmoothnessMeter | None = None, post_local=None) -> dict[str, float]:  # fmt: skip
    """This step's loss and smoothness averaged over the ranks (one all-reduce), the rate, and
    with post-local SGD ``local_sgd``: 1 once the steps are local (phase 2), else 0."""
    values = [loss.detach().float().reshape(())]
    if meter is not None:
        values.append(torch.tensor(math.nan if meter.value is None else meter.value))
    mean = accelerator.reduce(torch.stack(values).to(accelerator.device), "mean")
    metrics = {"train_loss": float(mean[0]), "lr": float(optimizer.param_groups[0]["lr"])}
    if meter is not None and not math.isnan(float(mean[1])):
        metrics["smoothness"] = float(mean[1])
    if post_local is not None:
        metrics["local_sgd"] = float(post_local.local)
    return metrics


class MetricsLogger:
    """Metrics to the trackers (``accelerator.log``), to output_dir/metrics.jsonl, and at the end
    to output_dir/curves.png. Files are written by the main process only."""

    def __init__(self, accelerator, args: TrainingArguments, project_name: str,
                 resumed_step: int = 0):  # fmt: skip
        self.accelerator = accelerator
        self.output_dir = args.output_dir
        self.path = os.path.join(args.output_dir, "metrics.jsonl")
        self.history: list[dict[str, Any]] = []
        init_kwargs = {"wandb": {"dir": args.output_dir, "name": args.run_name}}
        accelerator.init_trackers(project_name, config=_flat(config_to_dict(args)),
                                  init_kwargs=init_kwargs)  # fmt: skip
        self._start(resumed_step, config_to_dict(args))

    def _start(self, resumed_step: int, config: dict[str, Any]) -> None:
        @self.accelerator.on_main_process
        def start():
            os.makedirs(self.output_dir, exist_ok=True)
            kept = []
            if resumed_step and os.path.exists(self.path):  # the curve so far, up to the resume
                with open(self.path) as f:
                    kept = [r for r in map(json.loads, f) if r["step"] <= resumed_step]
            self.history = kept
            with open(self.path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            import yaml

            with open(os.path.join(self.output_dir, "config.yaml"), "w") as f:
                yaml.safe_dump(config, f, sort_keys=False)

        start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.accelerator.log(metrics, step=step)
        record = {"step": step, **metrics}
        self.history.append(record)
        self._append(record)

    def _append(self, record):
        @self.accelerator.on_main_process
        def append():
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

        append()

    def latest(self, prefix: str = "") -> dict[str, float]:
        """The last logged value of every metric whose name starts with ``prefix``."""
        return {k: v for r in self.history for k, v in r.items() if k.startswith(prefix)
                and k != "step"}  # fmt: skip

    def finish(self, model, results: dict[str, Any]) -> None:
        """Save ``model`` (the anchor: attached by extrap_accel.prepare) to output_dir, end the
        trackers, and write results.json and curves.png."""
        self.accelerator.wait_for_everyone()
        self.accelerator.save_model(model, self.output_dir)
        self.accelerator.end_training()

        @self.accelerator.on_main_process
        def write():
            with open(os.path.join(self.output_dir, "results.json"), "w") as f:
                json.dump(results, f, indent=2)
            plot_curves(self.history, os.path.join(self.output_dir, "curves.png"))

        write()


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    return {k: (",".join(map(str, v)) if isinstance(v, list) else v) for k, v in config.items()}


def plot_curves(history: list[dict[str, Any]], path: str) -> None:
    """One panel per metric against the optimizer step (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for r in history for k in r if k != "step"})
    if not keys:
        return
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        points = [(r["step"], r[key]) for r in history if r.get(key) is not None]
        ax.plot(*zip(*points), marker="." if len(points) < 30 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        log_scale = re.search(r"loss|perplexity|lr|smoothness", key)
        if log_scale and all(v > 0 for _, v in points):
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class SmoothnessMeter:
    """The paper's smoothness diagnostic on this rank: L̂_t = ‖g_t − g_{t−1}‖ / ‖x̃_t − x̃_{t−1}‖.

    g is this rank's local gradient (``optimizer.local_grad(p)`` of an extrap_accel optimizer,
    ``.grad`` of a baseline — the averaged one under data parallelism) and x̃ the point the
    gradient was taken at (the parameters during training). Call ``update()`` after backward and
    before clipping and ``step()``; ``value`` is None until two steps were seen.
    """

    def __init__(self, optimizer, accelerator=None):
        self.optimizer = _base_optimizer(optimizer)
        self.extrap = isinstance(self.optimizer, extrap_accel.ExtrapOptimizer)
        self.scaler = getattr(accelerator, "scaler", None)
        self._prev: tuple[torch.Tensor, torch.Tensor] | None = None
        self.value: float | None = None

    @torch.no_grad()
    def update(self) -> float | None:
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        grads = [self.optimizer.local_grad(p) if self.extrap else p.grad for p in params]
        g = torch.cat([t.detach().reshape(-1).float() for t in grads])
        if self.scaler is not None:  # fp16: the gradients still carry the loss scale
            g.div_(self.scaler.get_scale())
        x = torch.cat([p.detach().reshape(-1).float() for p in params])
        if self._prev is not None and self._prev[0].shape == g.shape:
            dx = float((x - self._prev[1]).norm())
            self.value = float((g - self._prev[0]).norm()) / dx if dx > 0 else None
        self._prev = (g, x)
        return self.value

    def state_dict(self) -> dict[str, torch.Tensor]:  # for register_rank_state
        return {} if self._prev is None else {"grad": self._prev[0], "point": self._prev[1]}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        device = next(iter(self.optimizer.param_groups[0]["params"])).device
        self._prev = (state["grad"].to(device), state["point"].to(device)) if state else None


def smoothness_meter(accelerator, args: TrainingArguments, optimizer) -> SmoothnessMeter | None:
    """A SmoothnessMeter when ``--log_smoothness``, checkpointed per rank (call before resume)."""
    if not args.log_smoothness:
        return None
    meter = SmoothnessMeter(optimizer, accelerator)
    register_rank_state(accelerator, "smoothness", meter, required=False)
    return meter
