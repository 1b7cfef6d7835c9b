"""``extrap_accel.ExtrapTrainer`` / ``attach(trainer)``: extrap-SGD / extrap-Adam in the Hugging
Face Trainer.

    import extrap_accel

    trainer = extrap_accel.ExtrapTrainer(   # or attach(Trainer(...)) before trainer.train()
        model, args, train_dataset=train, eval_dataset=val,
        optimizer_cls_and_kwargs=extrap_accel.trainer_optimizer("extrap_adam", lr=1e-3))
    # or: optimizers=(ExtrapAdam(model.parameters(), lr=1e-3), scheduler)
    trainer.train()               # also trainer.train(resume_from_checkpoint=...)

``ExtrapTrainerMixin`` gives a Trainer subclass of your own the same (``class
MyTrainer(ExtrapTrainerMixin, Trainer)``).

Single process, DDP (``torchrun``; on CPU ``TrainingArguments(use_cpu=True,
ddp_backend="gloo")``) and DeepSpeed ZeRO-0/1/2/3 (``TrainingArguments(deepspeed=...)`` with
``optimizer_cls_and_kwargs``) are supported.

Why ``attach`` is needed: the Trainer calls ``optimizer.train()`` in every training step and
``optimizer.eval()`` in the evaluation loop, but never before it saves. A checkpoint saved at a
step without evaluation, ``save_model`` and ``push_to_hub`` would write this rank's
extrapolated point x̃ instead of the anchor x, and the Trainer saves the optimizer from the
main process only, so the other ranks' local state (x̃, local moments, noise generators) would
be lost and a resumed run would not continue the same trajectory.

What ``attach(trainer)`` installs (tested with transformers 5.25 on one process, under DDP and
DeepSpeed, and 4.47.1 on one process and DeepSpeed: ``.ci/transformers_oldest``;
``optimizer_cls_and_kwargs`` needs transformers >= 4.47). The two private Trainer methods it
wraps are listed in :data:`PRIVATE_HOOKS`; everything else is a callback:

- ``attach(trainer.model, optimizer)`` (see ``extrap_accel.attach``), so that
  ``model.state_dict()`` — which ``save_model``, every checkpoint and ``push_to_hub`` go
  through — and every no-grad forward see the anchor. An optimizer passed with ``optimizers=``
  is attached at once. One built by the Trainer (``optimizer_cls_and_kwargs``) does not exist
  yet: it is attached in ``TrainerCallback.on_train_begin``, or, when resuming, just before the
  checkpoint's optimizer state is loaded. (No variant perturbs before the first step, so
  nothing depends on when the Trainer broadcasts rank 0's weights.)
- The optimizer gets ``trainer.accelerator.scaler`` (fp16 loss scaling), as with
  ``extrap_accel.prepare``.
- ``on_step_begin`` calls the optimizer's ``zero_grad``: the Trainer only calls
  ``model.zero_grad()``, and the optimizer's is what restarts the accumulation of this rank's
  local gradient gᵏ for the next step.
- ``trainer._save_checkpoint`` is wrapped: after the Trainer has written the checkpoint, every
  rank writes its ``optimizer.local_state_dict()`` to ``checkpoint-N/extrap_accel_rank{r}.pt``
  (``extrap_accel.checkpoint``). (Not ``on_save``: the Trainer's
  just-in-time checkpoint on SIGTERM calls ``_save_checkpoint`` without ``on_save``, and the
  folder of a hyperparameter-search trial is only known there.)
- ``trainer._load_optimizer_and_scheduler(checkpoint)`` is wrapped: each rank reads its own
  file and stages it (``optimizer.stage_local_state``); ``load_state_dict`` applies it after
  the main process's optimizer state, so every rank continues bit for bit from its own x̃.
  Every rank or none must have its file (``extrap_accel.checkpoint``: none restarts the local
  state from the anchor with a warning; some raises on every rank). The model weights in the
  checkpoint are the anchor; the Trainer loads them before the optimizer.

Under DeepSpeed (``TrainingArguments(deepspeed=...)``) the Trainer builds the optimizer from
``optimizer_cls_and_kwargs`` and hands it to DeepSpeed; ``attach(trainer)`` then installs
extrap_accel's engine adapter (``extrap_accel.integrations.deepspeed``, the same one
``extrap_accel.prepare`` uses under accelerate) on ``trainer.model_wrapped`` when training
begins, or, when resuming, right after the Trainer has loaded the DeepSpeed checkpoint into the
engine (before any step; the adapter then puts this rank's x̃ back from its own file). Every
checkpoint goes through ``engine.save_checkpoint`` (called on every rank), which writes the
anchor and ``checkpoint-N/global_stepN/extrap_accel_rank{r}.pt``; ``save_model`` and
``push_to_hub`` write the anchor (ZeRO-3: set ``stage3_gather_16bit_weights_on_model_save``, or
the Trainer saves only a DeepSpeed checkpoint). Which variant works at which ZeRO stage is the
README's DeepSpeed table; the rest is refused at ``attach``. DeepSpeed may come from
``TrainingArguments(deepspeed=...)`` or from accelerate's plugin (``accelerate launch
--use_deepspeed``). A resume needs every rank's own file, saved with the same number of
processes; otherwise every rank raises at the load (a checkpoint without any extrap_accel files
resumes from the anchor, with a warning). As with any optimizer the Trainer builds, its
``args.weight_decay`` replaces the ``weight_decay`` in ``optimizer_cls_and_kwargs`` (0 for
biases and norms), and a DeepSpeed ``"scheduler"`` with ``"auto"`` values takes
``args.learning_rate``.

Not supported (``attach`` raises):

- Under DeepSpeed, an optimizer passed with ``optimizers=``: the Trainer discards it and builds
  its own (``transformers.integrations.deepspeed.deepspeed_init`` sets ``trainer.optimizer =
  None``); likewise a DeepSpeed config whose ``"optimizer"`` section names DeepSpeed's own
  optimizer, or names one while ``optimizer_cls_and_kwargs`` names another. A section that
  names ours (``ExtrapSGD``, ``ExtrapAdam``, an ``extrap_*`` registry name) is taken instead:
  it becomes ``optimizer_cls_and_kwargs`` ("auto": ``learning_rate``, ``adam_beta1/2``,
  ``adam_epsilon``, ``weight_decay``; betas and eps do not apply to SGD) and leaves the config
  DeepSpeed sees.
- The Trainer's FSDP (FSDP2 is supported outside the Trainer: ``attach(model, optimizer)`` on
  a ``fully_shard`` model, ``extrap_accel.integrations.fsdp2``).
- Any optimizer that is not an extrap_accel optimizer (TypeError), including the Trainer's
  default when neither ``optimizers`` nor ``optimizer_cls_and_kwargs`` is given.
- ``auto_find_batch_size``: after an out-of-memory error the Trainer rebuilds the optimizer
  (and engine) from a model that holds this rank's x̃.
- ``train()`` twice on one Trainer under DeepSpeed (the Trainer keeps the engine but builds a
  new optimizer; it fails upstream too): create a new Trainer.
- ``model_init`` with more than one ``train()`` (hyperparameter search) is untested.

Trainer + DeepSpeed on CPU (tests, laptops): the Trainer's DeepSpeed setup passes no backend to
accelerate and counts one process. Create the process group first and let the Trainer use it:
``os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"; PartialState(backend="gloo")`` and
``TrainingArguments(..., use_cpu=True, accelerator_config={"use_configured_state": True})``
(``tests/distributed/trainer_deepspeed_worker.py``). On GPUs nothing of this is needed.

With ``hub_strategy="checkpoint"`` the per-rank files are written after the Trainer started
uploading the checkpoint folder, so the uploaded copy may lack them; the local folder has them.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from transformers import Trainer, TrainerCallback

from .. import checkpoint
from ..handle import AttachHandle, attach_module, unwrap_optimizer
from ..optim.base import ExtrapOptimizer
from ..optim.registry import check_deepspeed_variant, optimizer_cls_and_kwargs, variant_info
from .optimizer_spec import check_type, names_ours, registry_name, resolve

__all__ = ["ExtrapTrainer", "ExtrapTrainerCallback", "ExtrapTrainerMixin", "attach_trainer"]

_ATTR = "_extrap_accel_trainer_callback"
_CHECKPOINT_PREFIX = "checkpoint"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR


def attach_trainer(trainer) -> ExtrapTrainerCallback:
    """Make a ``transformers.Trainer`` train, save and resume an extrap_accel optimizer correctly.

    Call once, before ``trainer.train()``; ``extrap_accel.attach(trainer)`` calls this. Returns
    the installed callback (``callback.remove()`` undoes everything).
    """
    existing = getattr(trainer, _ATTR, None)
    if existing is not None:
        return existing
    check_private_hooks(type(trainer))
    _adopt_config_optimizer(trainer)
    _check_backend(trainer)
    _check_optimizer(trainer)
    callback = ExtrapTrainerCallback(trainer)
    trainer.add_callback(callback)
    setattr(trainer, _ATTR, callback)
    if trainer.optimizer is not None:
        callback.attach_model()
    return callback


class ExtrapTrainerMixin:
    """``attach(trainer)`` built in: ``class MyTrainer(ExtrapTrainerMixin, Trainer)`` (the mixin
    first). Every instance is attached when it is constructed; ``trainer.extrap_callback`` is
    the callback ``attach`` returns."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.extrap_callback = attach_trainer(self)


class ExtrapTrainer(ExtrapTrainerMixin, Trainer):
    """A ``transformers.Trainer`` that trains, saves and resumes an extrap_accel optimizer
    correctly: the same as ``extrap_accel.attach(Trainer(...))``. Pass the optimizer as for the
    Trainer (``optimizer_cls_and_kwargs=extrap_accel.trainer_optimizer(...)``, ``optimizers=``,
    or under DeepSpeed a config whose ``"optimizer"`` names ``ExtrapSGD`` / ``ExtrapAdam``)."""


# The Trainer's private methods extrap_accel wraps, with the parameters it passes on: the only
# private names of transformers it relies on, all here. attach(trainer) refuses when one is
# missing or takes other parameters, and tests/test_trainer.py fails loudly (the end-to-end
# runs also fail when transformers stops calling them).
PRIVATE_HOOKS = {
    "_save_checkpoint": ("model", "trial"),  # after the Trainer wrote checkpoint-N: each rank's file
    "_load_optimizer_and_scheduler": ("checkpoint",),  # stage each rank's file before the load
}


def check_private_hooks(trainer_cls: type) -> None:
    """Refuse a Trainer class whose private hooks (:data:`PRIVATE_HOOKS`) changed."""
    import inspect

    for name, expected in PRIVATE_HOOKS.items():
        method = getattr(trainer_cls, name, None)
        params = None
        if callable(method):
            params = tuple(inspect.signature(method).parameters)[1:len(expected) + 1]
        if params != expected:
            import transformers

            raise RuntimeError(
                f"attach(trainer): transformers {transformers.__version__} has no "
                f"Trainer.{name}({', '.join(expected)}, ...), which extrap_accel wraps to save "
                "and restore each rank's extrapolation state; use a transformers version the "
                "extrap_accel release supports (pyproject.toml)"
            )


class ExtrapTrainerCallback(TrainerCallback):
    """Installed by ``attach(trainer)``; see the module docstring for what it does."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.handle: AttachHandle | None = None
        self.adapter = None  # the DeepSpeed engine adapter, under DeepSpeed
        # Instance attributes shadow the class's methods (and a subclass's overrides) for this
        # trainer only.
        self._originals = {name: getattr(trainer, name) for name in PRIVATE_HOOKS}
        for name in PRIVATE_HOOKS:
            setattr(trainer, name, getattr(self, name))

    def remove(self) -> None:
        """Take off the hooks, the method wrappers and the model's attach handle."""
        for name in self._originals:
            self.trainer.__dict__.pop(name, None)
        self._originals = {}
        if self in self.trainer.callback_handler.callbacks:
            self.trainer.remove_callback(self)
        if getattr(self.trainer, _ATTR, None) is self:
            delattr(self.trainer, _ATTR)
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    # ------------------------------------------------------------------ the optimizer
    @property
    def optimizer(self) -> ExtrapOptimizer | None:
        """The Trainer's extrap_accel optimizer (unwrapped), or None before it is created."""
        optimizer = self.trainer.optimizer
        if optimizer is None:
            return None
        try:
            return unwrap_optimizer(optimizer)
        except TypeError:
            raise TypeError(
                f"attach(trainer): the Trainer's optimizer is a {type(optimizer).__name__}, not "
                "an extrap_accel optimizer; pass optimizers=(ExtrapAdam(...), scheduler) or "
                "optimizer_cls_and_kwargs=(ExtrapAdam, {...})"
            ) from None

    @property
    def deepspeed(self) -> bool:
        return _deepspeed_enabled(self.trainer)

    def attach_model(self) -> AttachHandle | None:
        """``attach(trainer.model, optimizer)`` once the optimizer exists (idempotent); under
        DeepSpeed, ``attach(engine, optimizer)`` once the Trainer has built the engine."""
        opt = self.optimizer
        if opt is None:
            return None
        if self.deepspeed:
            return self._attach_engine(opt)
        if self.handle is None or self.handle.optimizer is not opt:
            self.handle = attach_module(self.trainer.model, opt)
        scaler = getattr(self.trainer.accelerator, "scaler", None)
        if scaler is not None:
            opt.set_grad_scaler(scaler)
        return self.handle

    def _attach_engine(self, opt: ExtrapOptimizer) -> AttachHandle | None:
        from deepspeed import DeepSpeedEngine

        from .deepspeed import attach_engine

        engine = self.trainer.model_wrapped
        if not isinstance(engine, DeepSpeedEngine):
            return None  # not built yet (train() builds it)
        existing = getattr(engine, "_extrap_accel_adapter", None)
        if existing is not None and existing.optimizer is not opt:
            raise RuntimeError(
                "attach(trainer): this Trainer's DeepSpeed engine was already trained with "
                "another extrap_accel optimizer (train() called again on the same Trainer, which "
                "rebuilds the optimizer but keeps the engine); create a new Trainer, or resume "
                "with resume_from_checkpoint"
            )
        self.adapter = attach_engine(engine, opt)
        self.handle = self.adapter.handle
        return self.handle

    # ------------------------------------------------------------------ callback events
    def on_train_begin(self, args, state, control, **kwargs):
        # The Trainer has created the optimizer (optimizer_cls_and_kwargs) and wrapped the model.
        if self.attach_model() is None and self.deepspeed:
            raise RuntimeError(
                "attach(trainer): the Trainer runs DeepSpeed but trainer.model_wrapped is a "
                f"{type(self.trainer.model_wrapped).__name__}, not a DeepSpeedEngine; "
                "extrap_accel cannot install its DeepSpeed adapter"
            )

    def on_step_begin(self, args, state, control, **kwargs):
        # The Trainer clears gradients with model.zero_grad(), never optimizer.zero_grad(), which
        # is what starts a new accumulation of this rank's local gradient gᵏ: without this, gᵏ
        # would sum every step's local gradient under DDP. Called before the first micro-batch
        # of each optimizer step, where the Trainer has already set the gradients to None.
        opt = self.optimizer
        if opt is not None and not self.deepspeed:  # (DeepSpeed: the adapter restarts gᵏ)
            opt.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model, trial, *args: Any, **kwargs: Any):
        out = self._originals["_save_checkpoint"](model, trial, *args, **kwargs)
        opt = self.optimizer
        # (DeepSpeed: engine.save_checkpoint, which the Trainer calls on every rank, writes each
        # rank's file through the engine adapter)
        if opt is not None and not self.trainer.args.save_only_model and not self.deepspeed:
            folder = os.path.join(
                self.trainer._get_output_dir(trial=trial),
                f"{_CHECKPOINT_PREFIX}-{self.trainer.state.global_step}",
            )
            checkpoint.save(folder, [opt], self.trainer.args.process_index)
        return out

    def _load_optimizer_and_scheduler(self, checkpoint_dir, *args: Any, **kwargs: Any):
        load = self._originals["_load_optimizer_and_scheduler"]
        opt = self.optimizer
        if checkpoint_dir is None or opt is None:
            return load(checkpoint_dir, *args, **kwargs)
        if self.deepspeed:
            self._restore_deepspeed(checkpoint_dir)
            return load(checkpoint_dir, *args, **kwargs)
        self.attach_model()
        if not any(os.path.isfile(os.path.join(checkpoint_dir, name))
                   for name in ("optimizer.pt", "optimizer.bin")):  # fmt: skip
            warnings.warn(
                f"extrap_accel: {checkpoint_dir} holds no optimizer state (save_only_model?); the "
                "optimizer starts afresh on every rank",
                stacklevel=2,
            )
            return load(checkpoint_dir, *args, **kwargs)
        states = checkpoint.read(checkpoint_dir, self.trainer.args.process_index)
        # (one process: the optimizer's own state dict holds x̃ and its local state)
        decision = checkpoint.agree(states, checkpoint_dir,
                                    optional=self.trainer.args.world_size == 1)  # fmt: skip
        checkpoint.apply(decision, [opt], states, staged=True)
        try:
            return load(checkpoint_dir, *args, **kwargs)
        finally:
            opt.stage_local_state(None)  # consumed by the optimizer's load_state_dict

    def _restore_deepspeed(self, checkpoint: str) -> None:
        """The Trainer has just loaded ``checkpoint`` into the engine (``deepspeed_load_checkpoint``,
        before any step, so the weights hold the saved anchor): attach the engine adapter now
        and put this rank's x̃ and local state back from its own file, deciding the same way on
        every rank (``DeepSpeedExtrapolation.restore``)."""
        if self.attach_model() is None:
            raise RuntimeError(
                "attach(trainer): the Trainer resumed a DeepSpeed checkpoint before building "
                "the engine; extrap_accel cannot restore the extrapolation state"
            )
        self.adapter.restore(self.adapter.read_local_state(checkpoint), checkpoint)


# ---------------------------------------------------------------------- setup checks
def _deepspeed_enabled(trainer) -> bool:
    return bool(getattr(trainer, "is_deepspeed_enabled", False) or trainer.args.deepspeed)


def _deepspeed_config(trainer) -> dict:
    """The DeepSpeed config the Trainer will use: accelerate's plugin (also when DeepSpeed comes
    from ``accelerate launch --use_deepspeed`` rather than ``TrainingArguments(deepspeed=...)``),
    else the TrainingArguments' one."""
    state = getattr(getattr(trainer, "accelerator", None), "state", None)
    plugin = getattr(state, "deepspeed_plugin", None)
    if plugin is not None and isinstance(getattr(plugin, "deepspeed_config", None), dict):
        return plugin.deepspeed_config
    hf_config = getattr(trainer.args, "hf_deepspeed_config", None)
    if hf_config is not None:
        return hf_config.config
    config = trainer.args.deepspeed
    if isinstance(config, dict):
        return config
    if config is None:
        return {}
    import json

    with open(config) as f:
        return json.load(f)


def _check_backend(trainer) -> None:
    if getattr(trainer.args, "auto_find_batch_size", False):
        raise NotImplementedError(
            "attach(trainer) does not support auto_find_batch_size: after an out-of-memory "
            "error the Trainer rebuilds the optimizer (and the DeepSpeed engine) from a model "
            "that holds this rank's x̃, not the anchor; set per_device_train_batch_size "
            "explicitly"
        )
    if getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_fsdp_xla_enabled", False):
        raise NotImplementedError(
            "attach(trainer) does not support the Trainer's FSDP yet: use DDP or DeepSpeed with "
            "the Trainer, or a loop of your own with FSDP2 (torch.distributed.fsdp.fully_shard) "
            "and extrap_accel.attach(model, optimizer)"
        )
    if not _deepspeed_enabled(trainer):
        return
    if trainer.optimizer is not None:
        raise ValueError(
            "attach(trainer): under DeepSpeed the Trainer discards an optimizer passed with "
            f"optimizers=({type(trainer.optimizer).__name__}(...), ...) and trains with its own "
            "(AdamW or the DeepSpeed config's). Pass the class instead: "
            "Trainer(..., optimizer_cls_and_kwargs=(ExtrapAdam, {'lr': ...}))"
        )
    named = _deepspeed_config(trainer).get("optimizer")
    if named is not None:
        from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

        check_type(named.get("type"), DEEPSPEED_OPTIMIZERS)
        ours = registry_name(named.get("type")) is not None
        raise ValueError(
            "attach(trainer): the DeepSpeed config names an optimizer "
            f"({named.get('type')!r})"
            + (" and so does optimizer_cls_and_kwargs" if ours else
               ", which the Trainer would hand to DeepSpeed instead of an extrap_accel one")
            + ". Name it in one place: either \"optimizer\": {\"type\": \"ExtrapAdam\", "
            "\"params\": {...}} in the DeepSpeed config (ExtrapSGD, ExtrapAdam or an extrap_* "
            "registry name), or remove that section and pass "
            "Trainer(..., optimizer_cls_and_kwargs=(ExtrapAdam, {'lr': ...}))"
        )
    # the variant against the ZeRO stage now, not after the Trainer has built the engine
    config = _deepspeed_config(trainer)
    stage = config.get("zero_optimization", {}).get("stage", 0)
    kwargs = (getattr(trainer, "optimizer_cls_and_kwargs", None) or (None, {}))[1]

    def enabled(precision: str) -> bool:  # "auto" follows TrainingArguments(bf16=/fp16=)
        value = config.get(precision, {}).get("enabled", False)
        return bool(getattr(trainer.args, precision, False) if value == "auto" else value)

    if isinstance(stage, int):
        direct = stage == 0 and not (enabled("bf16") or enabled("fp16"))
        info = variant_info(kwargs.get("extrapolation", "past"), bool(kwargs.get("filterwise")))
        check_deepspeed_variant(info, stage, direct)


def _raw_deepspeed_config(trainer) -> dict:
    """The DeepSpeed config as the user wrote it, before the Trainer filled its "auto" values
    (it fills betas and eps for every optimizer, which do not apply to SGD)."""
    config = trainer.args.deepspeed or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if isinstance(config, dict):
        return config
    if isinstance(config, str) and os.path.isfile(config):
        import json

        with open(config) as f:
            return json.load(f)
    return _deepspeed_config(trainer)


def _adopt_config_optimizer(trainer) -> None:
    """Under DeepSpeed, a config whose ``"optimizer"`` names an extrap_accel optimizer becomes the
    Trainer's ``optimizer_cls_and_kwargs`` ("auto": ``learning_rate``, ``adam_beta1/2``,
    ``adam_epsilon``, ``weight_decay`` of the TrainingArguments, as the Trainer fills them for
    DeepSpeed's own optimizers), and the section leaves the config the Trainer hands DeepSpeed."""
    if not _deepspeed_enabled(trainer) or trainer.optimizer is not None:
        return
    config = _deepspeed_config(trainer)
    if not names_ours(config) or getattr(trainer, "optimizer_cls_and_kwargs", None) is not None:
        return  # (both: refused by _check_backend)
    raw = _raw_deepspeed_config(trainer)
    spec = raw["optimizer"] if names_ours(raw) else config["optimizer"]
    args = trainer.args
    filled = {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2),
              "eps": args.adam_epsilon, "weight_decay": args.weight_decay}  # fmt: skip
    name, kwargs = resolve(spec, "trainer", filled)
    trainer.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs(
        name, kwargs, example='"optimizer": {{"params": {{"{arg}": ...}}}} in the DeepSpeed config'
    )
    hf_config = getattr(args, "hf_deepspeed_config", None)
    for live in (config, getattr(hf_config, "config", None)):  # (usually one dict)
        if isinstance(live, dict):
            live.pop("optimizer", None)


def _check_optimizer(trainer) -> None:
    if trainer.optimizer is not None:
        unwrap_optimizer(trainer.optimizer)  # TypeError for any other optimizer
        return
    cls_and_kwargs = getattr(trainer, "optimizer_cls_and_kwargs", None)
    if cls_and_kwargs is None:
        raise TypeError(
            "attach(trainer): the Trainer would build its default optimizer "
            f"(args.optim={trainer.args.optim!r}), not an extrap_accel one; pass "
            "optimizer_cls_and_kwargs=(ExtrapAdam, {...}) or optimizers=(ExtrapAdam(...), None)"
        )
    cls = cls_and_kwargs[0]
    if not (isinstance(cls, type) and issubclass(cls, ExtrapOptimizer)):
        raise TypeError(
            f"attach(trainer): optimizer_cls_and_kwargs names {getattr(cls, '__name__', cls)!r}, "
            "not an extrap_accel optimizer class (ExtrapSGD, ExtrapAdam, ...); wrappers such as "
            "LARS(ExtrapSGD(...)) are built by hand and passed with optimizers="
        )
