"""Helpers the recipes share (vision.py, language_model.py, translate.py). They never own the loop.

Each recipe is one top-to-bottom script: arguments, data, model, optimizer, ``extrap_accel.
prepare``, then its own visible loop (accumulate, forward, backward, clip, step, zero_grad),
evaluation and checkpoints at visible points. This module holds only pieces that must behave
the same in every recipe and are tested once (tests/test_recipes_common.py); none of them
decides the order of a recipe's steps.

Configuration
    RecipeArguments        the shared options (HF names: optim, lr_scheduler_type, dataset_name,
                           gradient_accumulation_steps, save_total_limit, report_to, ...)
    arg(default, help)     a dataclass field with its --help text; default(name, value): a
                           shared field with a recipe's own default
    parse_args(cls, argv)  transformers.HfArgumentParser; ``--config file.yaml`` sets defaults
                           (command line > yaml > dataclass defaults)
Data, optimizers, schedules
    load_dataset_dict, step_generator, param_groups_weight_decay, create_optimizer,
    uses_closure, lr_schedule (pure function of the optimizer step), plan_steps, set_lr,
    apply_extrap_until, wrap_lars
Accelerator arguments (passed visibly by each recipe)
    trackers(args), deepspeed_plugin(args), process_group_kwargs(), check_launch(...)
Checkpoints
    TrainState, register_rank_state, resume, save_checkpoint (rotation: save_total_limit),
    find_latest_checkpoint
Logging and outputs
    init_trackers (W&B online/offline, the run continued on resume), wandb_mode, MetricsLogger,
    train_metrics, is_due, write_results, push_to_hub, SmoothnessMeter
"""

from __future__ import annotations

import argparse
import configparser
import dataclasses
import difflib
import functools
import json
import math
import netrc
import os
import re
import shutil
import sys
import tempfile
import types
import typing
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

import torch
from torch import nn

import extrap_accel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "recipes", "configs")

# ============================================================================ configuration


class ConfigError(ValueError):
    """A configuration mistake: an unknown key, a wrong type or value, or options that clash."""


class DataError(ValueError):
    """Data that is missing or does not have the schema the recipe expects."""


def arg(default: Any, help: str, **metadata: Any):
    """A dataclass field with its ``--help`` text (and HfArgumentParser metadata: aliases)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


TRACKERS = ("wandb", "tensorboard")
# Old flag (and yaml key) -> HF's name; the old names are read for one more version.
RENAMED = {
    "optimizer": "optim",
    "lr_schedule": "lr_scheduler_type",
    "dataset": "dataset_name",
    "dataset_config": "dataset_config_name",
}


def _alias(name: str) -> dict[str, list[str]]:
    old = [k for k, v in RENAMED.items() if v == name]
    return {"aliases": [f"--{o}" for o in old]} if old else {}


@dataclass
class RecipeArguments:
    """The options every recipe shares. Names follow transformers' TrainingArguments."""

    # ---- data and run
    dataset_name: str = arg(
        "default",
        "'default' (the embedded offline data), a Hub dataset "
        "id, or a local directory of files in the Hub's schema",
        **_alias("dataset_name"),
    )
    dataset_config_name: str | None = arg(
        None, "the Hub configuration, e.g. wikitext-2-raw-v1", **_alias("dataset_config_name")
    )
    output_dir: str = arg("outputs/run", "checkpoints, metrics, curves and the final model")
    run_name: str | None = arg(None, "the tracker run's name (default: output_dir's basename)")
    seed: int = arg(0, "seed of the model, the data order, augmentation and noise")
    # ---- length
    max_steps: int = arg(-1, "optimizer steps; > 0 overrides num_train_epochs")
    num_train_epochs: float = arg(1.0, "epochs (passes over the training data)")
    per_device_train_batch_size: int = arg(
        32,
        "b: samples per process and micro-step; the "
        "global batch is K·b·gradient_accumulation_steps",
    )
    per_device_eval_batch_size: int = arg(100, "samples per process in evaluation")
    gradient_accumulation_steps: int = arg(
        1, "micro-steps per optimizer step (K stays the number of processes)"
    )
    # ---- optimizer
    optim: str = arg(
        "extrap_sgd",
        "any name of extrap_accel.list_optimizers() (sgd, adamw: the baselines)",
        **_alias("optim"),
    )
    learning_rate: float = arg(0.1, "γ₀ for base_batch_size samples, scaled by lr_scaling")
    base_batch_size: int = arg(128, "the global batch learning_rate is given for")
    lr_scaling: Literal["linear", "sqrt", "none"] = arg(
        "linear", "rule from base_batch_size to the global batch"
    )
    momentum: float = arg(0.9, "SGD-type momentum")
    nesterov: bool = arg(True, "Nesterov momentum (SGD-type)")
    weight_decay: float = arg(0.0, "weight decay (not on 1-D tensors: norms, biases)")
    adam_beta1: float = arg(0.9, "Adam-type β₁")
    adam_beta2: float = arg(0.999, "Adam-type β₂")
    adam_epsilon: float = arg(1e-8, "Adam-type ε")
    max_grad_norm: float | None = arg(
        None,
        "clip the averaged gradient at this norm (none: "
        "off); also extrap_max_norm of the 'past' direction",
    )
    # ---- schedule (per optimizer step)
    lr_scheduler_type: Literal["step", "constant", "inverse_sqrt"] = arg(
        "step",
        "step: ×lr_decay_factor at lr_decay_milestones; constant; inverse_sqrt",
        **_alias("lr_scheduler_type"),
    )
    warmup_epochs: float = arg(0.0, "linear warmup length in epochs (samples)")
    warmup_steps: int = arg(0, "linear warmup length in optimizer steps (instead of epochs)")
    warmup_init_lr: float | None = arg(
        None,
        "warmup start (none: the rate of one worker's batch, Goyal et al.; 0 for inverse_sqrt)",
    )
    lr_decay_milestones: list[float] = arg(  # noqa: RUF009 (a field with a default_factory)
        [0.5, 0.75], "fractions of training where the step schedule decays"
    )
    lr_decay_factor: float = arg(0.1, "the step schedule's factor")
    # ---- extrapolation
    extrap_scale: float = arg(1.0, "γ̃ = extrap_scale·lr/K")
    extrap_lr: float | None = arg(None, "an absolute γ̃ instead of extrap_scale")
    noise_scale: float | None = arg(None, "the gaussian/uniform/filterwise variants' noise")
    extrap_until: int | None = arg(None, "from this optimizer step on: no extrapolation")
    post_local_from: int | None = arg(None, "Algorithm 2: post-local SGD from this step (K>1)")
    local_period: int = arg(4, "H: local steps between anchor averagings")
    # ---- LARS on the base update
    lars: bool = arg(False, "LARS trust ratios on the base update (SGD-type)")
    lars_trust_coefficient: float = arg(0.02, "LARS η")
    lars_clip: bool = arg(True, "clip LARS ratios at 1 (LARC)")
    # ---- logging, checkpoints, outputs
    logging_steps: int = arg(10, "log the training loss every N optimizer steps")
    eval_steps: int = arg(0, "evaluate every N steps (0: at the end only)")
    save_steps: int = arg(0, "checkpoint every N steps (0: at the end only)")
    save_total_limit: int | None = arg(
        None, "keep at most N checkpoint-<step> folders (the newest; never the one resumed from)"
    )
    report_to: list[str] = arg(  # noqa: RUF009 (a field with a default_factory)
        ["none"], "trackers: none, all, wandb, tensorboard (several allowed)"
    )
    tracker_project_name: str | None = arg(
        None, "W&B project / TensorBoard subfolder (default: $WANDB_PROJECT, else the recipe's)"
    )
    resume_from_checkpoint: str | None = arg(
        None, "a checkpoint-<step> folder, or 'latest' in output_dir"
    )
    restart_extrapolation: bool = arg(
        False,
        "resume on another number of processes: restart "
        "every rank's local extrapolation state from the anchor",
    )
    push_to_hub: bool = arg(False, "upload the final model (the anchor) to the Hub")
    hub_model_id: str | None = arg(None, "the Hub repository (default: output_dir's basename)")
    log_smoothness: bool = arg(False, "log ‖g_t − g_{t−1}‖ / ‖x̃_t − x̃_{t−1}‖ on each rank")

    def __post_init__(self) -> None:
        names = extrap_accel.list_optimizers()
        if self.optim not in names:
            raise ConfigError(f"unknown optim {self.optim!r}; choose one of {', '.join(names)}")
        positive = (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "base_batch_size",
            "logging_steps",
            "gradient_accumulation_steps",
        )
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
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ConfigError(f"save_total_limit must be >= 1, got {self.save_total_limit}")
        milestones = list(self.lr_decay_milestones)
        if sorted(milestones) != milestones or not all(0 < m < 1 for m in milestones):
            raise ConfigError(
                f"lr_decay_milestones are increasing fractions of training in (0, 1), got "
                f"{milestones}"
            )
        closure = extrap_accel.get_optimizer_info(self.optim).needs_closure
        if self.lars and closure:
            raise ConfigError(f"--lars cannot wrap {self.optim} (its step takes a closure)")
        if self.lars and extrap_accel.get_optimizer_info(self.optim).family == "adam":
            raise ConfigError(
                f"--lars rescales an SGD-type update; {self.optim} is Adam-type: "
                "use --lars with sgd or an extrap_sgd* optimizer"
            )
        if closure and self.log_smoothness:
            raise ConfigError(f"--log_smoothness is not defined for {self.optim}")
        if closure and self.gradient_accumulation_steps > 1:
            raise ConfigError(
                f"{self.optim} steps with a closure (a second forward/backward): "
                "use --gradient_accumulation_steps 1"
            )
        self.report_to = _resolve_report_to(self.report_to)


def _resolve_report_to(values: list[str]) -> list[str]:
    """HF's vocabulary: 'none', 'all' (every installed tracker) or names, also comma-separated."""
    import importlib.util

    names = [v.strip() for value in values for v in str(value).split(",") if v.strip()]
    unknown = sorted(set(names) - {"none", "all", *TRACKERS})
    if unknown:
        raise ConfigError(f"report_to {unknown}: choose none, all, or of {', '.join(TRACKERS)}")
    if "all" in names:
        names = [t for t in TRACKERS if importlib.util.find_spec(t)]
    names = [n for n in dict.fromkeys(names) if n != "none"]
    if "tensorboard" in names and not any(
        importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")
    ):
        raise ConfigError("--report_to tensorboard needs `pip install tensorboard`")
    return names or ["none"]


def default(name: str, value: Any):
    """The shared field ``name`` of RecipeArguments with a recipe's own default (same help)."""
    base = next(f for f in dataclasses.fields(RecipeArguments) if f.name == name)
    return arg(
        value, base.metadata["help"], **{k: v for k, v in base.metadata.items() if k != "help"}
    )


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def _parser(cls, description: str | None):
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        def error(self, message):  # a ConfigError: parse_args prints it and exits with 2
            raise ConfigError(message)

    parser = Parser(
        cls, description=description, formatter_class=_HelpFormatter, allow_abbrev=False
    )
    parser.add_argument(
        "--config",
        help="a yaml file of options (a path, or the name of a "
        "file in recipes/configs); the command line overrides it",
    )
    hints = typing.get_type_hints(cls)
    for action in parser._actions:  # Optional numbers: `--max_grad_norm none` means None
        hint = hints.get(action.dest)
        if hint is not None and type(None) in typing.get_args(hint) and action.type is not None:
            action.type = _or_none(action.type)
    return parser


def _or_none(convert):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def resolve_config_path(path: str) -> str:
    """``path`` from the working directory, else from the repository root, else the name of a
    shipped config (recipes/configs/NAME.yaml): the commands in the docs work from anywhere."""
    candidates = [path]
    if not os.path.isabs(path):
        candidates += [os.path.join(REPO, path), os.path.join(CONFIGS, path)]
    found = next((c for c in candidates if os.path.isfile(c)), None)
    if found is None:
        raise ConfigError(f"config file {path!r} does not exist (nor in {REPO} or {CONFIGS})")
    return found


def _check_value(name: str, hint: Any, value: Any) -> Any:
    """A yaml value of the type ``hint`` says (yaml has types already: no string coercion)."""
    options = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in options:
            return None
        hint = next(a for a in options if a is not type(None))
        options = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value not in options:
            raise ConfigError(
                f"{name} must be one of {', '.join(map(str, options))}, got {value!r}"
            )
        return value
    if origin is list:
        values = value if isinstance(value, list) else [value]
        return [_check_value(name, options[0], v) for v in values]
    ok = {
        bool: lambda v: isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    }[hint]
    if not ok(value):
        kind = "true or false" if hint is bool else hint.__name__
        raise ConfigError(f"{name} must be {kind}, got {value!r}")
    return float(value) if hint is float else value


def load_yaml_config(cls, path: str) -> dict[str, Any]:
    """The keys of the yaml file ``path``, each checked against the fields of ``cls``."""
    import yaml

    path = resolve_config_path(path)
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r} is not valid yaml: {e}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in raw.items():
        if key in RENAMED:
            warnings.warn(
                f"{path}: '{key}' is now '{RENAMED[key]}' (the old name goes in the next version)",
                FutureWarning,
                stacklevel=2,
            )
            key = RENAMED[key]
        if key not in hints:
            close = difflib.get_close_matches(key, list(hints), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"unknown key {key!r} in {path}{hint}; {cls.__name__} has no such field"
            )
        out[key] = _check_value(key, hints[key], value)
    return out


def parse_args(
    cls,
    argv: list[str] | None = None,
    *,
    description: str | None = None,
    exit_on_error: bool = True,
):
    """``cls`` from the command line through ``transformers.HfArgumentParser``.

    ``--config FILE.yaml`` becomes the parser's defaults (``set_defaults``), so the precedence is
    command line > yaml > dataclass defaults. Unknown yaml keys and flags are errors. Raises
    ConfigError, or with ``exit_on_error`` prints it and exits with status 2.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = _parser(cls, description)
        for flag in argv:
            old = flag[2:].split("=")[0] if flag.startswith("--") else None
            if old in RENAMED:
                warnings.warn(
                    f"--{old} is now --{RENAMED[old]} (the old name goes in the next version)",
                    FutureWarning,
                    stacklevel=2,
                )
        known, _ = parser.parse_known_args(argv)
        yaml_values = load_yaml_config(cls, known.config) if known.config else {}
        given = {
            a.dest for a in parser._actions for f in argv if f.split("=")[0] in a.option_strings
        }
        # warmup in steps or in epochs: the one given replaces the other's default
        pair = ("warmup_steps", "warmup_epochs")
        for source in (given, set(yaml_values)):
            chosen = [k for k in pair if k in source]
            if len(chosen) == 1:
                other = pair[1 - pair.index(chosen[0])]
                if other not in given:
                    yaml_values[other] = 0
            if chosen:
                break
        parser.set_defaults(**yaml_values)
        args, *_, unknown = parser.parse_args_into_dataclasses(
            argv, return_remaining_strings=True, look_for_args_file=False
        )
        if unknown:
            flags = [f"--{a.dest}" for a in parser._actions if a.option_strings]
            close = difflib.get_close_matches(unknown[0].split("=")[0], flags, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"unrecognized arguments: {' '.join(unknown)}{hint}")
        return args
    except ConfigError as e:
        if not exit_on_error:
            raise e from None
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def run_main(main: Callable[[], Any]) -> None:
    """Run a recipe's ``main``: a configuration or data mistake found after parsing ends with
    its message and exit status 2, as a parsing error does, not with a traceback."""
    try:
        main()
    except (ConfigError, DataError) as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


# ============================================================================ data


def load_dataset_dict(
    name: str, config_name: str | None = None, *, schema: str, splits: Iterable[str] = ("train",)
):
    """A ``datasets.DatasetDict`` from the Hub or from a local directory of the same schema.

    ``name``: a Hub id (``uoft-cs/cifar10``) or an existing local directory that holds either a
    ``save_to_disk`` dataset or data files (parquet, arrow, csv, json, txt) whose names give the
    split, optionally in a subdirectory named after ``config_name`` as in the Hub repositories.
    ``schema`` describes the expected columns for the error messages.
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
    except Exception as e:
        where = f"the local directory {name!r}" if local else f"the Hub dataset {name!r}"
        hint = (
            ""
            if local
            else (
                " (the Hub may be unreachable: pass --dataset_name default for the embedded data, "
                "or --dataset_name <local dir> holding files of that schema)"
            )
        )
        raise DataError(
            f"could not load {where}: {type(e).__name__}: {e}. Expected {schema}{hint}"
        ) from e
    if not isinstance(ds, datasets.DatasetDict):
        ds = datasets.DatasetDict({"train": ds})
    missing = [s for s in splits if s not in ds]
    if missing:
        raise DataError(f"{name!r} has splits {sorted(ds)}, missing {missing}; expected {schema}")
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


def _base_optimizer(optimizer):
    """The torch optimizer under LARS and accelerate's AcceleratedOptimizer."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def uses_closure(optimizer) -> bool:
    """The optimizer's step takes a closure (extrap_sgd_fresh: a second forward/backward)."""
    base = _base_optimizer(optimizer)
    return any(
        "extrapolation" in g
        and extrap_accel.variant_info(g["extrapolation"], bool(g.get("filterwise"))).needs_closure
        for g in base.param_groups
    )


def create_optimizer(args: RecipeArguments, params, *, extrap_max_norm: float | None = None):
    """The registry entry ``args.optim``, every hyperparameter passed explicitly from ``args``.

    SGD-type entries get lr/momentum/nesterov/weight_decay, Adam-type ones lr/betas/eps/
    weight_decay (decoupled); extrapolating entries also get extrap_scale or extrap_lr, the seed,
    noise_scale (noise variants) and ``extrap_max_norm`` (the 'past' direction only).
    """
    info = extrap_accel.get_optimizer_info(args.optim)
    kwargs: dict[str, Any] = {"lr": args.learning_rate, "weight_decay": args.weight_decay}
    if info.family == "adam":
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
            raise ConfigError(f"noise_scale applies to the noise variants, not {args.optim}")
        if info.variant.name == "past" and extrap_max_norm is not None:
            kwargs["extrap_max_norm"] = extrap_max_norm
    elif args.noise_scale is not None or args.extrap_lr is not None:
        raise ConfigError(f"{args.optim} does not extrapolate: remove noise_scale/extrap_lr")
    try:
        return extrap_accel.create_optimizer(args.optim, params, **kwargs)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def wrap_lars(args: RecipeArguments, optimizer):
    """``extrap_accel.LARS`` around the prepared optimizer when ``--lars`` (base update only)."""
    if not args.lars:
        return optimizer
    try:
        return extrap_accel.LARS(
            optimizer, trust_coefficient=args.lars_trust_coefficient, clip=args.lars_clip
        )
    except NotImplementedError as e:  # under DeepSpeed
        raise ConfigError(f"--lars: {e}") from None


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


def warmup_step_decay_lr(
    step: int,
    *,
    peak_lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_init_lr: float | None = None,
    milestones: Iterable[float] = (0.5, 0.75),
    factor: float = 0.1,
) -> float:
    """The rate of optimizer step ``step`` (0-based): per-iteration linear warmup from
    ``warmup_init_lr`` to ``peak_lr``, then ×``factor`` at each milestone (fractions of
    ``total_steps``); ``milestones=()`` is no decay."""
    if step < warmup_steps:
        start = peak_lr if warmup_init_lr is None else warmup_init_lr
        return start + (peak_lr - start) * step / warmup_steps
    passed = sum(step >= round(m * total_steps) for m in milestones)
    return peak_lr * factor**passed


def inverse_sqrt_lr(
    step: int, *, peak_lr: float, warmup_steps: int, warmup_init_lr: float = 0.0
) -> float:
    """fairseq's inverse square root: linear warmup to ``peak_lr``, then peak·√(warmup/step)."""
    if step < warmup_steps:
        return warmup_init_lr + (peak_lr - warmup_init_lr) * step / warmup_steps
    return peak_lr * math.sqrt(max(warmup_steps, 1) / max(step, 1))


def resolve_warmup_steps(args: RecipeArguments, steps_per_epoch: int) -> int:
    if args.warmup_steps:
        return args.warmup_steps
    return round(args.warmup_epochs * steps_per_epoch)


def global_batch(args: RecipeArguments, num_processes: int) -> int:
    """K·b·gradient_accumulation_steps: the samples of one optimizer step."""
    return num_processes * args.per_device_train_batch_size * args.gradient_accumulation_steps


def lr_schedule(
    args: RecipeArguments, *, num_processes: int, total_steps: int, steps_per_epoch: int
) -> Callable[[int], float]:
    """``args``' schedule as a pure function of the optimizer step.

    The peak rate is learning_rate scaled (lr_scaling) from base_batch_size to the global batch.
    Warmup starts from warmup_init_lr, by default the same rule's rate for one worker's batch
    (Goyal et al. 2017), or 0 for inverse_sqrt.
    """
    batch = global_batch(args, num_processes)
    peak = scale_lr(args.learning_rate, batch, args.base_batch_size, args.lr_scaling)
    warmup = resolve_warmup_steps(args, steps_per_epoch)
    init = args.warmup_init_lr
    if args.lr_scheduler_type == "inverse_sqrt":
        return functools.partial(
            inverse_sqrt_lr,
            peak_lr=peak,
            warmup_steps=warmup,
            warmup_init_lr=0.0 if init is None else init,
        )
    if init is None:
        init = scale_lr(
            args.learning_rate, batch // num_processes, args.base_batch_size, args.lr_scaling
        )
    milestones = args.lr_decay_milestones if args.lr_scheduler_type == "step" else ()
    return functools.partial(
        warmup_step_decay_lr,
        peak_lr=peak,
        total_steps=total_steps,
        warmup_steps=warmup,
        warmup_init_lr=init,
        milestones=tuple(milestones),
        factor=args.lr_decay_factor,
    )


def plan_steps(
    args: RecipeArguments, steps_per_epoch: int, num_processes: int, *, too_small: str
) -> tuple[int, Callable[[int], float]]:
    """``max_steps`` (``--max_steps``, else epochs × optimizer steps per epoch) and the schedule.
    ``too_small`` is the DataError message when the data do not fill one optimizer step."""
    if steps_per_epoch == 0:
        raise DataError(too_small)
    max_steps = (
        args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    )
    return max_steps, lr_schedule(
        args, num_processes=num_processes, total_steps=max_steps, steps_per_epoch=steps_per_epoch
    )


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def disable_extrapolation(optimizer) -> None:
    """Extrapolation off from the next step on (x̃ = x for every variant; docs/algorithms.md,
    footnote 9 of the paper): extrap_scale, extrap_lr and noise_scale 0 in every group."""
    for group in _base_optimizer(optimizer).param_groups:
        if "extrap_scale" not in group:
            continue  # sgd, adamw: nothing to turn off
        group["extrap_scale"] = 0.0
        if group.get("extrap_lr") is not None:
            group["extrap_lr"] = 0.0
        if group.get("noise_scale") is not None:
            group["noise_scale"] = 0.0


def apply_extrap_until(optimizer, args: RecipeArguments, step: int) -> bool:
    """Before optimizer step ``step``: off when step >= extrap_until. True if it is off."""
    if args.extrap_until is not None and step >= args.extrap_until:
        disable_extrapolation(optimizer)
        return True
    return False


# ============================================================================ the Accelerator


def trackers(args: RecipeArguments) -> list[str] | None:
    """``Accelerator(log_with=...)`` for ``--report_to``."""
    return None if args.report_to == ["none"] else list(args.report_to)


def _deepspeed_launch() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


def deepspeed_plugin(args: RecipeArguments):
    """``Accelerator(deepspeed_plugin=...)`` under a DeepSpeed launch (else None).

    The launch's ``deepspeed_config_file`` (a path from the working directory, else from the
    repository root, so the shipped yamls work from anywhere), with ``gradient_clipping`` set to
    ``--max_grad_norm``: under DeepSpeed the engine clips, and DeepSpeed would clip at 1.0 by
    default. A config that clips at another norm is an error, not a silent choice.
    """
    if not _deepspeed_launch():
        return None
    from accelerate.utils import DeepSpeedPlugin

    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not path or path == "none":  # the settings are in the accelerate yaml itself
        given = os.environ.get("ACCELERATE_GRADIENT_CLIPPING", "auto")
        config = {"gradient_clipping": "auto" if given in ("", "none") else given}
        deepspeed_gradient_clipping(config, args.max_grad_norm)
        return DeepSpeedPlugin(gradient_clipping=config["gradient_clipping"])
    if not os.path.exists(path) and os.path.exists(os.path.join(REPO, path)):
        path = os.path.join(REPO, path)
    if not os.path.exists(path):
        raise ConfigError(
            f"deepspeed_config_file {path!r} does not exist (relative paths are "
            f"read from the working directory or from {REPO})"
        )
    with open(path) as f:
        config = json.load(f)
    deepspeed_gradient_clipping(config, args.max_grad_norm)
    return DeepSpeedPlugin(hf_ds_config=config)


def deepspeed_gradient_clipping(config: dict[str, Any], max_grad_norm: float | None) -> None:
    """``config['gradient_clipping']`` = ``max_grad_norm`` (0: none) where the config leaves it
    open ("auto", absent, 0 or the same value); another value is a ConfigError."""
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


def process_group_kwargs() -> list:
    """``Accelerator(kwargs_handlers=...)``: DeepSpeed on CPU needs a gloo process group, or
    accelerate counts one process (accelerate_configs/cpu_2proc_deepspeed.yaml)."""
    if not _deepspeed_launch() or torch.cuda.is_available():
        return []
    from accelerate.utils import InitProcessGroupKwargs

    return [InitProcessGroupKwargs(backend="gloo")]


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def check_launch(accelerator, args: RecipeArguments) -> None:
    """Options this launch cannot run fail here, before any data is read: a closure optimizer
    with several processes; under accelerate's FSDP plugin, FSDP1 and the options that need
    whole tensors or DDP."""
    if accelerator.num_processes > 1 and extrap_accel.get_optimizer_info(args.optim).needs_closure:
        raise ConfigError(
            f"{args.optim} (an extra forward/backward per step) runs on one process "
            "only; use extrap_sgd under data parallelism"
        )
    if not is_fsdp(accelerator):
        return
    if getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
        raise ConfigError(
            "the recipes support accelerate's FSDP plugin with fsdp_version: 2 (FSDP2, "
            "fully_shard) only: use accelerate_configs/fsdp2_bf16.yaml or set fsdp_version: 2"
        )
    refused = [
        (args.post_local_from is not None, "--post_local_from (a DDP communication hook)"),
        (args.lars, "--lars (LARS needs each tensor's whole norm; FSDP2 holds shards)"),
        (args.log_smoothness, "--log_smoothness (it needs whole gradients; FSDP2 holds shards)"),
    ]
    for on, what in refused:
        if on:
            raise ConfigError(
                f"{what} is not supported under FSDP2: remove it, or use DDP "
                "(accelerate_configs/multi_gpu.yaml)"
            )


def broadcast_buffers(accelerator, model) -> None:
    """Under FSDP2, every buffer (BatchNorm's running statistics) from rank 0, as DDP does before
    each training forward: FSDP2 leaves buffers to each rank and its checkpoints keep one rank's
    copy. Nothing without buffers or under other backends."""
    if not is_fsdp(accelerator) or accelerator.num_processes < 2:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def broadcast_buffers_before_training_forwards(accelerator, model) -> None:
    """Under FSDP2: ``broadcast_buffers`` in a pre-hook of every training forward."""
    if not is_fsdp(accelerator) or not any(True for _ in model.buffers()):
        return

    def hook(module, args):
        if module.training and torch.is_grad_enabled():
            broadcast_buffers(accelerator, module)

    model.register_forward_pre_hook(hook)


def enable_post_local_sgd(accelerator, model, optimizer, args: RecipeArguments, step: int = 0):
    """Algorithm 2 from optimizer step ``args.post_local_from`` (None: not used), continuing
    from ``step`` (after a resume). Needs K >= 2 processes. Anchors are averaged after steps
    post_local_from + j·local_period; call ``finish()`` after the last step."""
    if args.post_local_from is None:
        return None
    if accelerator.num_processes < 2:
        raise ConfigError(
            "--post_local_from needs data parallelism (K >= 2 processes): launch with e.g. "
            "`ACCELERATE_USE_CPU=1 accelerate launch --config_file "
            "accelerate_configs/cpu_2proc.yaml ...` or `accelerate launch --num_processes K ...`"
        )
    post_local = extrap_accel.enable_post_local_sgd(
        model,
        _base_optimizer(optimizer),
        start_step=args.post_local_from,
        period=args.local_period,
    )
    post_local.resume_at(step)  # the comm hook's and the averager's counters
    return post_local


def baseline_rank_state(accelerator, model, optimizer, args: RecipeArguments):
    """Post-local SGD with a torch optimizer (the baseline): in phase 2 its weights and momentum
    differ per rank, and accelerate saves rank 0's only. Saves each rank's own beside the
    checkpoint; returns the function that restores them after ``load_state`` (None when not
    needed: extrap_accel optimizers keep their own)."""
    base = _base_optimizer(optimizer)
    if args.post_local_from is None or isinstance(base, extrap_accel.ExtrapOptimizer):
        return None
    module = accelerator.unwrap_model(model)

    def path(directory: str) -> str:
        return os.path.join(directory, f"post_local_baseline_rank{accelerator.process_index}.pt")

    def save_hook(models, weights, output_dir):
        torch.save({"model": module.state_dict(), "optimizer": base.state_dict()}, path(output_dir))

    accelerator.register_save_state_pre_hook(save_hook)

    def restore(directory: str) -> None:
        if not os.path.exists(path(directory)):
            warnings.warn(
                f"{path(directory)} is missing: this rank continues from rank 0's "
                "weights and momentum, not an exact continuation of post-local SGD",
                stacklevel=2,
            )
            return
        saved = torch.load(path(directory), map_location="cpu", weights_only=True)
        module.load_state_dict(saved["model"])
        base.load_state_dict(saved["optimizer"])

    return restore


# ============================================================================ checkpoints


@dataclass
class TrainState:
    """What the loop needs to continue: optimizer steps taken and the trackers' run ids/dirs."""

    step: int = 0
    trackers: dict[str, str] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "trackers": dict(self.trackers)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.trackers = dict(state.get("trackers", {}))


def register_rank_state(accelerator, name: str, obj, required: bool = True) -> None:
    """Save ``obj.state_dict()`` on every rank in ``save_state`` (``<name>_rank<i>.pt``) and load
    it in ``load_state``. A missing file is an error if ``required``, else ``obj`` stays fresh."""

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
_COMPLETE = "checkpoint_complete.json"  # written by the main process once every rank saved


def _checkpoints(output_dir: str) -> list[tuple[int, str]]:
    if not os.path.isdir(output_dir):
        return []
    return sorted(
        (int(m.group(1)), os.path.join(output_dir, d))
        for d in os.listdir(output_dir)
        if (m := _CHECKPOINT.match(d))
    )


def find_latest_checkpoint(output_dir: str) -> str | None:
    """The complete ``checkpoint-<step>`` of ``output_dir`` with the largest step (a save that
    did not finish is skipped, with a warning)."""
    found = _checkpoints(output_dir)
    while found and not os.path.exists(os.path.join(found[-1][1], _COMPLETE)):
        warnings.warn(
            f"skipping {os.path.basename(found.pop()[1])} in {output_dir}: its save did not finish",
            stacklevel=2,
        )
    return found[-1][1] if found else None


def rotate_checkpoints(output_dir: str, limit: int | None, keep: str | None = None) -> list[str]:
    """Delete the oldest complete checkpoints beyond ``limit`` (never ``keep``, the checkpoint
    resumed from, nor an unfinished one); returns the deleted folders."""
    if limit is None:
        return []
    protected = {os.path.realpath(keep)} if keep else set()
    complete = [
        p for _, p in _checkpoints(output_dir) if os.path.exists(os.path.join(p, _COMPLETE))
    ]
    doomed = [
        p for p in complete[: max(0, len(complete) - limit)] if os.path.realpath(p) not in protected
    ]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def save_checkpoint(
    accelerator, args: RecipeArguments, step: int, resumed_from: str | None = None
) -> str:
    """``accelerator.save_state`` into output_dir/checkpoint-<step> (model = the anchor, optimizer,
    every rank's extrapolation state, RNG, sampler, TrainState), then, once every rank has saved,
    ``checkpoint_complete.json`` from the main process, then rotation (``save_total_limit``)."""
    path = os.path.join(args.output_dir, f"checkpoint-{step}")
    for model in accelerator._models:  # FSDP2: the checkpoint keeps one rank's buffers
        broadcast_buffers(accelerator, model)
    accelerator.save_state(path)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(path, _COMPLETE), "w") as f:
            json.dump({"step": step, "num_processes": accelerator.num_processes}, f)
        rotate_checkpoints(args.output_dir, args.save_total_limit, keep=resumed_from)
    accelerator.wait_for_everyone()
    return path


def check_checkpoint(accelerator, path: str, restart: bool = False) -> None:
    """Fail before loading, with the fix, if ``path`` cannot be resumed by this launch."""
    marker = os.path.join(path, _COMPLETE)
    if not os.path.exists(marker):
        raise ConfigError(
            f"{path} has no {_COMPLETE}: its save did not finish (or another program wrote it); "
            "resume from an earlier checkpoint-<step>. Multi-node: the main process writes it, "
            "so every node must see the same folder (a shared file system)"
        )
    with open(marker) as f:
        saved = json.load(f).get("num_processes")
    if restart:
        return
    if saved is not None and saved != accelerator.num_processes:
        raise ConfigError(
            f"{path} was saved by {saved} processes and this launch has "
            f"{accelerator.num_processes}: each rank's extrapolation state belongs to one worker; "
            f"resume with {saved} processes, or add --restart_extrapolation to restart it from "
            "the anchor"
        )
    rank = accelerator.process_index
    wanted = [f"random_states_{rank}.pkl"] if saved and saved > 1 else []
    if os.path.exists(os.path.join(path, "optimizer.bin")):  # (DeepSpeed keeps its own layout)
        wanted.append("model.safetensors")
        wanted += [
            f.replace("rank0.pt", f"rank{rank}.pt")
            for f in os.listdir(path)
            if f.startswith("extrap_accel_")
            and f.endswith("_rank0.pt")
            or f == "extrap_accel_rank0.pt"
        ]
    missing = [f for f in wanted if not os.path.exists(os.path.join(path, f))]
    if missing:
        raise ConfigError(
            f"{path} is incomplete: {', '.join(missing)} missing for rank {rank} (with "
            "node-local disks, copy every node's files into the checkpoint); resume from a "
            "complete checkpoint"
        )


def _without_rank_files(path: str) -> str:
    """A folder of links to ``path``'s files except the per-rank ones (restart)."""
    view = tempfile.mkdtemp(prefix="restart-")
    for name in os.listdir(path):
        if not re.match(r"^(extrap_accel_.*rank\d+\.pt|\w+_rank\d+\.pt)$", name):
            os.symlink(os.path.join(os.path.abspath(path), name), os.path.join(view, name))
    return view


def resume(accelerator, args: RecipeArguments, state: TrainState, optimizer=None) -> str | None:
    """``accelerator.load_state`` from ``--resume_from_checkpoint`` (a folder or ``latest``).

    Register everything first (``register_for_checkpointing``, ``extrap_accel.prepare``).
    With ``--restart_extrapolation`` the per-rank files are left out and every rank restarts its
    local extrapolation state from the loaded anchor (``optimizer.reset_local_state``): the way
    to resume with another number of processes. Returns the folder loaded, or None.
    """
    spec = args.resume_from_checkpoint
    if not spec:
        return None
    path = find_latest_checkpoint(args.output_dir) if spec == "latest" else spec
    if path is None:
        raise ConfigError(
            f"--resume_from_checkpoint latest: no complete checkpoint-<step> "
            f"directory in {args.output_dir}"
        )
    if not os.path.isdir(path):
        raise ConfigError(f"--resume_from_checkpoint {spec}: {path} is not a directory")
    check_checkpoint(accelerator, path, restart=args.restart_extrapolation)
    import pickle

    from safetensors import SafetensorError

    source = _without_rank_files(path) if args.restart_extrapolation else path
    try:
        with warnings.catch_warnings():
            if args.restart_extrapolation:  # (the library's "saved without" warning)
                warnings.filterwarnings("ignore", message="extrap_accel:")
            accelerator.load_state(source)
    except (
        OSError,
        RuntimeError,
        EOFError,
        ValueError,
        pickle.UnpicklingError,
        SafetensorError,
    ) as e:
        raise ConfigError(
            f"could not load {path} ({type(e).__name__}: {e}); the checkpoint is "
            "damaged: resume from an earlier checkpoint-<step>"
        ) from e
    finally:
        if source != path:
            shutil.rmtree(source, ignore_errors=True)
    base = _base_optimizer(optimizer) if optimizer is not None else None
    if args.restart_extrapolation and isinstance(base, extrap_accel.ExtrapOptimizer):
        base.reset_local_state(warn=False)
        accelerator.print("restarted every rank's local extrapolation state from the anchor")
    accelerator.print(f"resumed from {path} at step {state.step}")
    return path


# ============================================================================ logging


def wandb_mode(environ: Mapping[str, str] | None = None, home: str | None = None) -> str:
    """'online' when W&B has a key (WANDB_API_KEY, a netrc entry for the W&B host, or an api_key
    in W&B's settings file), else 'offline'; an explicit WANDB_MODE wins. A pure function of
    the environment and the files under ``home``."""
    env = os.environ if environ is None else environ
    home = home or env.get("HOME") or os.path.expanduser("~")
    if env.get("WANDB_MODE"):
        return env["WANDB_MODE"]
    if env.get("WANDB_API_KEY"):
        return "online"
    host = urlsplit(env.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc
    files = (
        [env["NETRC"]]
        if env.get("NETRC")
        else [os.path.join(home, n) for n in (".netrc", "_netrc")]
    )
    for file in files:
        try:
            if netrc.netrc(os.path.expanduser(file)).authenticators(host):
                return "online"
        except (OSError, netrc.NetrcParseError):
            pass
    settings = configparser.ConfigParser()
    config_dir = env.get("WANDB_CONFIG_DIR") or os.path.join(home, ".config", "wandb")
    try:
        settings.read(os.path.join(config_dir, "settings"))
    except configparser.Error:
        return "offline"
    return "online" if settings.get("default", "api_key", fallback=None) else "offline"


def init_trackers(accelerator, args: RecipeArguments, state: TrainState, project: str) -> None:
    """``accelerator.init_trackers`` with the run name and the config; a resumed run continues
    the same W&B run (its id is in the checkpoint: ``resume="allow"``) and TensorBoard writes to
    the same folder. The project is --tracker_project_name, else $WANDB_PROJECT, else
    ``project``. W&B is online with a key (``wandb_mode``), offline otherwise."""
    if trackers(args) is None:
        return
    project = args.tracker_project_name or os.environ.get("WANDB_PROJECT") or project
    name = args.run_name or os.path.basename(os.path.normpath(args.output_dir))
    init_kwargs: dict[str, dict[str, Any]] = {}
    if "wandb" in args.report_to:
        mode = wandb_mode()
        accelerator.print(
            f"W&B {mode}"
            + (
                ""
                if mode == "online"
                else " (no API key: `wandb "
                "login` or WANDB_API_KEY to go online; `wandb sync` later)"
            )
        )
        init_kwargs["wandb"] = {
            "name": name,
            "dir": args.output_dir,
            "mode": mode,
            "id": state.trackers.get("wandb_id"),
            "resume": "allow",
        }
    if "tensorboard" in args.report_to:
        accelerator.project_configuration.logging_dir = state.trackers.get(
            "tensorboard_dir", os.path.join(args.output_dir, "runs")
        )
    os.makedirs(args.output_dir, exist_ok=True)
    config = {
        k: (",".join(map(str, v)) if isinstance(v, list) else v)
        for k, v in dataclasses.asdict(args).items()
    }
    accelerator.init_trackers(project, config=config, init_kwargs=init_kwargs)
    if "wandb" in args.report_to and accelerator.is_main_process:
        state.trackers["wandb_id"] = accelerator.get_tracker("wandb", unwrap=True).id
    if "tensorboard" in args.report_to:
        state.trackers["tensorboard_dir"] = accelerator.project_configuration.logging_dir


class MetricsLogger:
    """Metrics to the trackers (``accelerator.log``) and to output_dir/metrics.jsonl (main
    process). A resumed run keeps the records up to its step and continues the file."""

    def __init__(self, accelerator, args: RecipeArguments, resumed_step: int = 0):
        self.accelerator = accelerator
        self.path = os.path.join(args.output_dir, "metrics.jsonl")
        self.history: list[dict[str, Any]] = []
        if accelerator.is_main_process:
            os.makedirs(args.output_dir, exist_ok=True)
            if resumed_step and os.path.exists(self.path):
                with open(self.path) as f:
                    self.history = [r for r in map(json.loads, f) if r["step"] <= resumed_step]
            with open(self.path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.history)
            import yaml

            with open(os.path.join(args.output_dir, "config.yaml"), "w") as f:
                yaml.safe_dump(dataclasses.asdict(args), f, sort_keys=False)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.accelerator.log(metrics, step=step)
        record = {"step": step, **metrics}
        self.history.append(record)
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def latest(self, prefix: str = "") -> dict[str, float]:
        """The last logged value of every metric whose name starts with ``prefix``."""
        return {
            k: v for r in self.history for k, v in r.items() if k.startswith(prefix) and k != "step"
        }


def write_results(
    accelerator, output_dir: str, results: dict[str, Any], history: list[dict[str, Any]]
) -> None:
    """results.json and curves.png (main process)."""
    if accelerator.is_main_process:
        with open(os.path.join(output_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        plot_curves(history, os.path.join(output_dir, "curves.png"))


def push_to_hub(accelerator, args: RecipeArguments, folder: str) -> str | None:
    """Upload ``folder`` (the final model: the anchor) to ``--hub_model_id`` (default: the
    output_dir's name) when ``--push_to_hub``; main process. Returns the repository id."""
    if not args.push_to_hub:
        return None
    repo_id = args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir))
    if accelerator.is_main_process:
        import huggingface_hub

        huggingface_hub.create_repo(repo_id, exist_ok=True)
        huggingface_hub.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            ignore_patterns=["checkpoint-*", "wandb/*", "runs/*"],
            commit_message="extrap_accel recipe: final model (anchor)",
        )
    accelerator.wait_for_everyone()
    return repo_id


def progress_bar(accelerator, total: int, initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        disable=not accelerator.is_local_main_process,
        dynamic_ncols=True,
    )


def is_due(step: int, every: int, max_steps: int) -> bool:
    """Log/evaluate/save now: every ``every`` steps (0: never) and at the last step."""
    return (every > 0 and step % every == 0) or step == max_steps


def train_metrics(
    accelerator,
    loss: torch.Tensor,
    optimizer,
    meter: SmoothnessMeter | None = None,
    post_local=None,
) -> dict[str, float]:
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
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class SmoothnessMeter:
    """The paper's smoothness diagnostic on this rank: L̂_t = ‖g_t − g_{t−1}‖ / ‖x̃_t − x̃_{t−1}‖.

    g is this rank's local gradient (``optimizer.local_grad(p)`` of an extrap_accel optimizer,
    ``.grad`` of a baseline) and x̃ the point it was taken at. Call ``update()`` after the
    backward of an optimizer step, before clipping; ``value`` is None until two steps were seen.
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


def smoothness_meter(accelerator, args: RecipeArguments, optimizer) -> SmoothnessMeter | None:
    """A SmoothnessMeter when ``--log_smoothness``, checkpointed per rank (call before resume)."""
    if not args.log_smoothness:
        return None
    meter = SmoothnessMeter(optimizer, accelerator)
    register_rank_state(accelerator, "smoothness", meter, required=False)
    return meter
