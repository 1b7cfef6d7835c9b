"""Image classification with extrap-SGD: ResNet-20 / VGG-11 on CIFAR-10/100 (Lin et al. 2020, §5).

Offline default (scikit-learn's bundled handwritten digits, resized to 32×32, no download;
`vision_quick.yaml` is the same settings written out)::

    accelerate launch recipes/vision.py
    ACCELERATE_USE_CPU=1 accelerate launch --config_file accelerate_configs/cpu_2proc.yaml recipes/vision.py
    python recipes/vision.py --optimizer sgd                      # the mini-batch SGD baseline

The paper's setting (CIFAR-10 from the Hub, or a local directory of the same parquet files)::

    accelerate launch --num_processes 8 recipes/vision.py --config recipes/configs/resnet20_cifar10.yaml
    accelerate launch recipes/vision.py --config recipes/configs/resnet20_cifar10.yaml --dataset /data/cifar10
    accelerate launch recipes/vision.py --config recipes/configs/vgg11_cifar100.yaml

Large-batch options: ``--optimizer`` (any of extrap_accel.list_optimizers(), e.g.
extrap_sgd_gaussian --noise_scale 1e-3), ``--lars``, ``--post_local_from STEP --local_period H``
(multi-process only), ``--extrap_until STEP``, ``--log_smoothness``; checkpoints with
``--save_steps N`` and ``--resume_from_checkpoint latest``. ``--help`` lists every option.

Data: ``--dataset default`` (the digits), ``uoft-cs/cifar10``, ``uoft-cs/cifar100``, or a
local directory with splits ``train`` and ``test`` and columns ``img`` (PIL image) and
``label`` (CIFAR-10) or ``fine_label`` (CIFAR-100).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import common
import extrap_accel

SCHEMA = (
    "splits 'train' and 'test' with columns 'img' (PIL image, RGB, e.g. 32×32) and 'label' "
    "(CIFAR-10) or 'fine_label' (CIFAR-100) (int class ids), as uoft-cs/cifar10 and "
    "uoft-cs/cifar100 on the Hub"
)


@dataclass
class VisionArguments(common.TrainingArguments):
    """Defaults: the offline quick run (digits, a few minutes on 2 CPU cores)."""

    output_dir: str = "outputs/vision"
    model: Literal["resnet20", "vgg11"] = "resnet20"
    width: float = 1.0  # channel multiplier (ResNet-20: 16·width base channels)
    augment: bool = True  # pad-4 random crop (+ horizontal flip)
    hflip: bool = False  # digits are not mirror-symmetric; true for CIFAR
    num_train_epochs: float = 6.0
    per_device_train_batch_size: int = 64
    per_device_eval_batch_size: int = 250
    learning_rate: float = 0.1
    base_batch_size: int = 128
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    logging_steps: int = 5
    eval_steps: int = 20


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
    if args.dataset == "default":
        return _digits()
    ds = common.load_dataset_dict(args.dataset, args.dataset_config, schema=SCHEMA,
                                  splits=("train", "test"))  # fmt: skip
    train_x, train_y = _to_tensors(ds["train"], args.dataset)
    test_x, test_y = _to_tensors(ds["test"], args.dataset)
    label_col = "label" if "label" in ds["train"].column_names else "fine_label"
    names = getattr(ds["train"].features[label_col], "names", None)
    num_classes = len(names) if names else int(train_y.max()) + 1
    return train_x, train_y, test_x, test_y, num_classes


def get_dataloaders(args: VisionArguments, train_x, train_y, test_x, test_y):
    train = DataLoader(TensorDataset(train_x, train_y), batch_size=args.per_device_train_batch_size,
                       shuffle=True, drop_last=True)  # fmt: skip
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
                layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                           nn.ReLU(inplace=True)]  # fmt: skip
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


def build_model(args: VisionArguments, num_classes: int) -> nn.Module:
    if args.model == "resnet20":
        return ResNetCifar(20, num_classes, args.width)
    return VGG(num_classes, args.width)


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
    accelerator = common.make_accelerator(args)
    with accelerator.main_process_first():  # the main process downloads, the others read the cache
        train_x, train_y, test_x, test_y, num_classes = get_datasets(args)
    train_dl, test_dl = get_dataloaders(args, train_x, train_y, test_x, test_y)
    mean = train_x.float().div(255).mean(dim=(0, 2, 3))
    std = train_x.float().div(255).std(dim=(0, 2, 3))
    preprocess = Preprocess(mean, std, hflip=args.hflip).to(accelerator.device)

    model = build_model(args, num_classes)
    groups = common.param_groups_weight_decay(model, args.weight_decay)  # none on BN and biases
    optimizer = common.create_optimizer(args, groups)
    model, optimizer, train_dl, test_dl = extrap_accel.prepare(
        accelerator, model, optimizer, train_dl, test_dl
    )
    optimizer = common.wrap_lars(args, optimizer)  # rescales the base update only

    world = accelerator.num_processes
    global_batch = args.per_device_train_batch_size * world
    steps_per_epoch = len(train_dl)
    max_steps, lr_at = common.plan_steps(
        args, steps_per_epoch, world,
        too_small=f"{len(train_x)} training images are fewer than one global batch "
        f"({global_batch})",
    )  # fmt: skip

    state = common.TrainState()
    accelerator.register_for_checkpointing(state)
    meter, post_local, logger = common.start_run(accelerator, args, model, optimizer, state,
                                                 "extrap_accel_vision")  # fmt: skip
    accelerator.print(
        f"{args.model} ×{args.width} on {args.dataset}: {len(train_x)} train / {len(test_x)} test "
        f"images, {num_classes} classes; K={world}, global batch {global_batch}, lr "
        f"{lr_at(0):g} -> {lr_at.keywords['peak_lr']:g}, {max_steps} steps ({steps_per_epoch}/epoch), "
        f"optimizer {args.optimizer}"
    )

    def clip():  # the averaged gradient of the base update
        if args.max_grad_norm is not None:
            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    bar = common.progress_bar(accelerator, max_steps, state.step)
    model.train()
    start, metrics = time.perf_counter(), {}
    while state.step < max_steps:
        epoch, done = divmod(state.step, steps_per_epoch)
        train_dl.set_epoch(epoch)  # the seeded sampler: the same order after a resume
        batches = accelerator.skip_first_batches(train_dl, done) if done else train_dl
        for images, labels in batches:
            common.set_lr(optimizer, lr_at(state.step))
            common.apply_extrap_until(optimizer, args, state.step)
            gen = common.step_generator(args.seed, state.step, accelerator.process_index)

            def forward_backward(images=images, labels=labels, gen=gen):
                inputs = preprocess(images, gen if args.augment else None)
                loss = F.cross_entropy(model(inputs), labels)
                accelerator.backward(loss)
                return loss.detach()

            loss = common.train_step(optimizer, forward_backward, clip=clip, meter=meter)
            state.step += 1
            bar.update(1)
            if post_local is not None and state.step >= max_steps:
                post_local.finish()  # end on one model: average a last local step

            if common.is_due(state.step, args.logging_steps, max_steps):
                metrics = common.train_metrics(accelerator, loss, optimizer, meter, post_local)
                bar.set_postfix(loss=f"{metrics['train_loss']:.4f}")
                logger.log(metrics, state.step)
            if common.is_due(state.step, args.eval_steps, max_steps):
                logger.log(evaluate(accelerator, model, preprocess, test_dl), state.step)
            if common.is_due(state.step, args.save_steps, max_steps):
                common.save_checkpoint(accelerator, args, state.step)
            if state.step >= max_steps:
                break
    bar.close()

    results = logger.latest("eval_")
    results.update(step=state.step, seconds=time.perf_counter() - start,
                   train_loss=metrics.get("train_loss"))  # fmt: skip
    logger.finish(model, results)  # saves the anchor
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
