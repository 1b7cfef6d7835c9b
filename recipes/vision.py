"""Image classification with extrap-SGD: ResNet-20 / VGG-11 on CIFAR-10/100 (Lin et al. 2020, §5).

Offline default (scikit-learn's bundled handwritten digits, resized to 32×32, no download;
`vision_quick.yaml` is the same settings written out)::

    accelerate launch recipes/vision.py
    ACCELERATE_USE_CPU=1 accelerate launch --config_file accelerate_configs/cpu_2proc.yaml recipes/vision.py
    python recipes/vision.py --optim sgd                      # the mini-batch SGD baseline

The paper's setting (CIFAR-10 from the Hub, or a local directory of the same parquet files)::

    accelerate launch --num_processes 8 recipes/vision.py --config recipes/configs/resnet20_cifar10.yaml   # one machine, 8 GPUs
    accelerate launch recipes/vision.py --config recipes/configs/resnet20_cifar10.yaml --dataset_name /data/cifar10
    accelerate launch recipes/vision.py --config recipes/configs/vgg11_cifar100.yaml

Large-batch options: ``--optim`` (any of extrap_accel.list_optimizers(), e.g.
extrap_sgd_gaussian --noise_scale 1e-3), ``--lars``, ``--post_local_from STEP --local_period H``
(multi-process only), ``--extrap_until STEP``, ``--log_smoothness``; checkpoints with
``--save_steps N`` and ``--resume_from_checkpoint latest``. ``--help`` lists every option.
Also ``--gradient_accumulation_steps N``, ``--save_total_limit N``, ``--report_to wandb``,
``--push_to_hub --hub_model_id USER/NAME``, and ``--restart_extrapolation`` to resume on another
number of processes. Outputs: model.safetensors (the anchor) and config.json, which
``load_model(output_dir)`` rebuilds with its preprocessing.

Data: ``--dataset_name default`` (the digits), ``uoft-cs/cifar10``, ``uoft-cs/cifar100``, or a
local directory with splits ``train`` and ``test`` and columns ``img`` (PIL image) and
``label`` (CIFAR-10) or ``fine_label`` (CIFAR-100).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Literal

import common
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import extrap_accel

SCHEMA = (
    "splits 'train' and 'test' with columns 'img' (PIL image, RGB, e.g. 32×32) and 'label' "
    "(CIFAR-10) or 'fine_label' (CIFAR-100) (int class ids), as uoft-cs/cifar10 and "
    "uoft-cs/cifar100 on the Hub"
)


@dataclass
class VisionArguments(common.RecipeArguments):
    """Defaults: the offline quick run (digits, a few minutes on 2 CPU cores)."""

    output_dir: str = common.default("output_dir", "outputs/vision")
    model: Literal["resnet20", "vgg11"] = common.arg("resnet20", "the network")
    width: float = common.arg(1.0, "channel multiplier (ResNet-20: 16·width base channels)")
    augment: bool = common.arg(True, "pad-4 random crop (+ horizontal flip)")
    hflip: bool = common.arg(
        False, "random horizontal flips (true for CIFAR; digits are not mirror-symmetric)"
    )
    num_train_epochs: float = common.default("num_train_epochs", 6.0)
    per_device_train_batch_size: int = common.default("per_device_train_batch_size", 64)
    per_device_eval_batch_size: int = common.default("per_device_eval_batch_size", 250)
    learning_rate: float = common.default("learning_rate", 0.1)
    base_batch_size: int = common.default("base_batch_size", 128)
    weight_decay: float = common.default("weight_decay", 1e-4)
    warmup_epochs: float = common.default("warmup_epochs", 1.0)
    logging_steps: int = common.default("logging_steps", 5)
    eval_steps: int = common.default("eval_steps", 20)


# ---------------------------------------------------------------------------- data


def _digits() -> tuple[torch.Tensor, ...]:
    """scikit-learn's 1797 handwritten digits (8×8, 0..16) as uint8 32×32 RGB; 1497/300 split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1497], perm[1497:]
    return x[train], y[train], x[test], y[test], 10


def _to_tensors(split, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np

    columns = split.column_names
    image_col = next((c for c in ("img", "image") if c in columns), None)
    label_col = next((c for c in ("label", "fine_label") if c in columns), None)
    if image_col is None or label_col is None:
        raise common.DataError(f"{name!r} has columns {columns}; expected {SCHEMA}")
    try:
        images = [np.asarray(img.convert("RGB"), dtype=np.uint8) for img in split[image_col]]
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
        y = torch.tensor(split[label_col], dtype=torch.long)
    except (AttributeError, ValueError, TypeError) as e:
        raise common.DataError(
            f"{name!r}: column {image_col!r} does not hold images of one size ({e}); "
            f"expected {SCHEMA}"
        ) from None
    return x, y


def get_datasets(args: VisionArguments):
    """(train_x, train_y, test_x, test_y, num_classes); images as uint8 [N, 3, H, W]."""
    if args.dataset_name == "default":
        return _digits()
    ds = common.load_dataset_dict(
        args.dataset_name, args.dataset_config_name, schema=SCHEMA, splits=("train", "test")
    )
    train_x, train_y = _to_tensors(ds["train"], args.dataset_name)
    test_x, test_y = _to_tensors(ds["test"], args.dataset_name)
    label_col = "label" if "label" in ds["train"].column_names else "fine_label"
    names = getattr(ds["train"].features[label_col], "names", None)
    num_classes = len(names) if names else int(train_y.max()) + 1
    return train_x, train_y, test_x, test_y, num_classes


def get_dataloaders(args: VisionArguments, train_x, train_y, test_x, test_y):
    train = DataLoader(
        TensorDataset(train_x, train_y),
        batch_size=args.per_device_train_batch_size,
        shuffle=True,
        drop_last=True,
    )
    test = DataLoader(TensorDataset(test_x, test_y), batch_size=args.per_device_eval_batch_size)
    return train, test


class Preprocess(nn.Module):
    """uint8 images → normalized floats; in training the standard CIFAR augmentation in plain
    torch: zero-pad 4 and random 32×32 crop, random horizontal flip (from a given generator)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, pad: int = 4, hflip: bool = True):
        super().__init__()
        self.register_buffer("mean", mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, -1, 1, 1), persistent=False)
        self.pad, self.hflip = pad, hflip

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = x.float().div_(255)
        if generator is not None:
            x = self.augment(x, generator)
        return (x - self.mean) / self.std

    def augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, _, h, w = x.shape
        padded = F.pad(x, (self.pad,) * 4)
        top = torch.randint(0, 2 * self.pad + 1, (n, 1, 1), generator=generator)
        left = torch.randint(0, 2 * self.pad + 1, (n, 1, 1), generator=generator)
        rows = (top + torch.arange(h).view(1, h, 1)).expand(n, h, w)
        cols = (left + torch.arange(w).view(1, 1, w)).expand(n, h, w)
        batch = torch.arange(n).view(n, 1, 1).expand(n, h, w)
        x = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
        if self.hflip:
            flip = torch.rand(n, generator=generator) < 0.5
            x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
        return x.contiguous()


# ---------------------------------------------------------------------------- models


class BasicBlock(nn.Module):
    """He et al. (2016) CIFAR block; option A shortcut (stride-2 subsampling, zero channels)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride, self.extra = stride, cout - cin

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        if self.extra:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.extra))
        return F.relu(out + shortcut)


class ResNetCifar(nn.Module):
    """ResNet-(6n+2) for 32×32 inputs: 3 stages of n blocks, 16/32/64 channels (× width)."""

    def __init__(self, depth: int = 20, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        widths = [max(1, round(c * width)) for c in (16, 32, 64)]
        self.conv = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        blocks, cin = [], widths[0]
        for i, cout in enumerate(widths):
            for j in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if i > 0 and j == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)
        _init(self)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class VGG(nn.Module):
    """VGG-11 with BatchNorm for 32×32 inputs, channels × width, one linear classifier."""

    CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")

    def __init__(self, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        layers, cin = [], 3
        for v in self.CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                cout = max(1, round(v * width))
                layers += [
                    nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                    nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True),
                ]
                cin = cout
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        _init(self)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


def _init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def build_model(name: str, num_classes: int, width: float = 1.0) -> nn.Module:
    if name == "resnet20":
        return ResNetCifar(20, num_classes, width)
    return VGG(num_classes, width)


def save_model(
    accelerator,
    model,
    preprocess: Preprocess,
    args: VisionArguments,
    num_classes: int,
    output_dir: str,
) -> None:
    """model.safetensors (the anchor: the model is attached by extrap_accel.prepare) and
    config.json with what ``load_model`` needs to rebuild the network and its preprocessing."""
    accelerator.save_model(model, output_dir)
    if accelerator.is_main_process:
        config = {
            "model": args.model,
            "width": args.width,
            "num_classes": num_classes,
            "mean": preprocess.mean.flatten().tolist(),
            "std": preprocess.std.flatten().tolist(),
        }
        with open(os.path.join(output_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=2)


def load_model(output_dir: str) -> tuple[nn.Module, Preprocess]:
    """The trained network (eval mode) and its preprocessing from a recipe's output_dir.

    >>> model, preprocess = load_model("outputs/vision")
    >>> logits = model(preprocess(uint8_images))  # [N, 3, 32, 32] uint8
    """
    from safetensors.torch import load_file

    with open(os.path.join(output_dir, "config.json")) as f:
        config = json.load(f)
    model = build_model(config["model"], config["num_classes"], config["width"])
    model.load_state_dict(load_file(os.path.join(output_dir, "model.safetensors")))
    preprocess = Preprocess(torch.tensor(config["mean"]), torch.tensor(config["std"]))
    return model.eval(), preprocess


# ---------------------------------------------------------------------------- training


@torch.no_grad()  # attached by extrap_accel.prepare: a no-grad forward runs at the anchor
def evaluate(accelerator, model, preprocess, test_dl) -> dict[str, float]:
    model.eval()
    correct = total = loss_sum = 0.0
    for images, labels in test_dl:
        logits = model(preprocess(images))
        loss = F.cross_entropy(logits, labels, reduction="none")
        preds, labels, loss = accelerator.gather_for_metrics((logits.argmax(-1), labels, loss))
        correct += float((preds == labels).sum())
        total += labels.numel()
        loss_sum += float(loss.sum())
    model.train()
    return {"eval_accuracy": correct / total, "eval_loss": loss_sum / total}


def training_function(args: VisionArguments) -> dict[str, float]:
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

    # ---- data
    with accelerator.main_process_first():  # the main process downloads, the others read the cache
        train_x, train_y, test_x, test_y, num_classes = get_datasets(args)
    train_dl, test_dl = get_dataloaders(args, train_x, train_y, test_x, test_y)
    mean = train_x.float().div(255).mean(dim=(0, 2, 3))
    std = train_x.float().div(255).std(dim=(0, 2, 3))
    preprocess = Preprocess(mean, std, hflip=args.hflip).to(accelerator.device)

    # ---- model and optimizer
    model = build_model(args.model, num_classes, args.width)
    groups = common.param_groups_weight_decay(model, args.weight_decay)  # none on BN and biases
    optimizer = common.create_optimizer(args, groups)
    model, optimizer, train_dl, test_dl = extrap_accel.prepare(
        accelerator, model, optimizer, train_dl, test_dl
    )
    optimizer = common.wrap_lars(args, optimizer)  # rescales the base update only
    fresh = common.uses_closure(optimizer)  # extrap_sgd_fresh: step(closure)

    world, accumulation = accelerator.num_processes, args.gradient_accumulation_steps
    steps_per_epoch = len(train_dl) // accumulation  # optimizer steps
    max_steps, lr_at = common.plan_steps(
        args,
        steps_per_epoch,
        world,
        too_small=f"{len(train_x)} training images are fewer than one global batch "
        f"({common.global_batch(args, world)})",
    )

    # ---- checkpointed state, then resume (after everything is registered), then logging
    state = common.TrainState()
    accelerator.register_for_checkpointing(state)
    meter = common.smoothness_meter(accelerator, args, optimizer)  # --log_smoothness
    common.broadcast_buffers_before_training_forwards(accelerator, model)  # FSDP2 only
    restore_baseline = common.baseline_rank_state(accelerator, model, optimizer, args)
    resumed_from = common.resume(accelerator, args, state, optimizer)
    if resumed_from and restore_baseline:
        restore_baseline(resumed_from)
    post_local = common.enable_post_local_sgd(accelerator, model, optimizer, args, state.step)
    common.init_trackers(accelerator, args, state, "extrap_accel_vision")
    logger = common.MetricsLogger(accelerator, args, state.step)
    accelerator.print(
        f"{args.model} ×{args.width} on {args.dataset_name}: {len(train_x)} train / "
        f"{len(test_x)} test images, {num_classes} classes; K={world}, global batch "
        f"{common.global_batch(args, world)}, lr {lr_at(0):g} -> {lr_at.keywords['peak_lr']:g}, "
        f"{max_steps} steps ({steps_per_epoch}/epoch), optimizer {args.optim}"
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
        for micro, (images, labels) in enumerate(batches, start=skip):
            if micro >= steps_per_epoch * accumulation:
                break  # (a last incomplete accumulation is dropped)
            with accelerator.accumulate(model):
                common.set_lr(optimizer, lr_at(state.step))
                common.apply_extrap_until(optimizer, args, state.step)
                # augmentation from (seed, micro-step, rank): a resumed run draws the same crops
                gen = common.step_generator(
                    args.seed,
                    state.step * accumulation + micro % accumulation,
                    accelerator.process_index,
                )

                def forward_backward(images=images, labels=labels, gen=gen):
                    inputs = preprocess(images, gen if args.augment else None)
                    loss = F.cross_entropy(model(inputs), labels)
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
                bar.set_postfix(loss=f"{metrics['train_loss']:.4f}")
                logger.log(metrics, state.step)
            step_loss = 0.0
            if common.is_due(state.step, args.eval_steps, max_steps):
                logger.log(evaluate(accelerator, model, preprocess, test_dl), state.step)
            if common.is_due(state.step, args.save_steps, max_steps):
                common.save_checkpoint(accelerator, args, state.step, resumed_from)
            if state.step >= max_steps:
                break
    bar.close()

    # ---- outputs: the anchor, its config, results; the Hub
    results = logger.latest("eval_")
    results.update(
        step=state.step, seconds=time.perf_counter() - start, train_loss=metrics.get("train_loss")
    )
    accelerator.wait_for_everyone()
    save_model(accelerator, model, preprocess, args, num_classes, args.output_dir)
    common.write_results(accelerator, args.output_dir, results, logger.history)
    common.push_to_hub(accelerator, args, args.output_dir)
    accelerator.end_training()
    accelerator.print(
        f"step {state.step}: test accuracy {results.get('eval_accuracy', float('nan')):.4f}, "
        f"test loss {results.get('eval_loss', float('nan')):.4f}, "
        f"{results['seconds']:.1f} s; outputs in {args.output_dir}"
    )
    return results


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = common.parse_args(VisionArguments, argv, description=__doc__)
    return training_function(args)


if __name__ == "__main__":
    common.run_main(main)
