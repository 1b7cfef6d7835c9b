"""Unit tests of recipes/common.py and of the recipes' data, models and configs (one process).

The multi-process runs of the recipes are in tests/test_recipes_vision_lm.py.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "recipes"))

import common
import language_model
import translate
import vision

import extrap_accel

Args = common.RecipeArguments
CONFIGS = os.path.join(REPO, "recipes", "configs")
CONFIG_CLASSES = {
    "vision_quick.yaml": vision.VisionArguments,
    "resnet20_cifar10.yaml": vision.VisionArguments,
    "vgg11_cifar100.yaml": vision.VisionArguments,
    "language_model_quick.yaml": language_model.LMArguments,
    "lstm_wikitext2.yaml": language_model.LMArguments,
    "translate_quick.yaml": translate.TranslateArguments,
    "translate_multi30k.yaml": translate.TranslateArguments,
}


def _records(output_dir) -> list[dict]:
    import json

    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def parse(argv, cls=Args):
    return common.parse_args(cls, argv, exit_on_error=False)


# ---------------------------------------------------------------------------- schedules


def test_scale_lr_rules():
    assert common.scale_lr(0.1, 2048, 128) == pytest.approx(1.6)
    assert common.scale_lr(0.1, 512, 128, "sqrt") == pytest.approx(0.2)
    assert common.scale_lr(0.1, 512, 128, "none") == 0.1
    with pytest.raises(common.ConfigError, match="lr_scaling"):
        common.scale_lr(0.1, 512, 128, "cubic")


def test_warmup_then_step_decay():
    lr = lambda s: common.warmup_step_decay_lr(
        s, peak_lr=1.6, total_steps=100, warmup_steps=10, warmup_init_lr=0.1
    )
    assert lr(0) == pytest.approx(0.1)
    assert lr(5) == pytest.approx(0.85)  # incremented every iteration
    assert lr(10) == lr(49) == pytest.approx(1.6)
    assert lr(50) == lr(74) == pytest.approx(0.16)  # ×0.1 at 50% of the samples
    assert lr(75) == lr(99) == pytest.approx(0.016)  # and at 75%
    no_decay = common.warmup_step_decay_lr(99, peak_lr=1.6, total_steps=100, milestones=())
    assert no_decay == 1.6


def test_inverse_sqrt():
    lr = lambda s: common.inverse_sqrt_lr(s, peak_lr=1e-3, warmup_steps=100)
    assert lr(0) == 0.0 and lr(50) == pytest.approx(5e-4)
    assert lr(100) == pytest.approx(1e-3)
    assert lr(400) == pytest.approx(5e-4)  # peak·√(100/400)


def test_lr_schedule_from_args():
    args = parse(
        [
            "--learning_rate",
            "0.1",
            "--per_device_train_batch_size",
            "128",
            "--base_batch_size",
            "128",
            "--warmup_epochs",
            "5",
        ]
    )
    lr = common.lr_schedule(args, num_processes=16, total_steps=3000, steps_per_epoch=10)
    # warmup from the one-worker (small-batch) rate to K·0.1 over 5 epochs, per iteration
    assert lr(0) == pytest.approx(0.1) and lr(50) == pytest.approx(1.6)
    assert lr(25) == pytest.approx(0.85)
    assert lr(1500) == pytest.approx(0.16) and lr(2250) == pytest.approx(0.016)
    constant = common.lr_schedule(
        parse(["--lr_scheduler_type", "constant"]),
        num_processes=2,
        total_steps=10,
        steps_per_epoch=5,
    )
    assert constant(9) == pytest.approx(0.1 * 64 / 128)
    inv = common.lr_schedule(
        parse(["--lr_scheduler_type", "inverse_sqrt", "--warmup_steps", "4"]),
        num_processes=1,
        total_steps=100,
        steps_per_epoch=5,
    )
    assert inv(0) == 0.0 and inv(16) == pytest.approx(0.025 * 0.5)


# ---------------------------------------------------------------------------- configuration


def test_defaults_yaml_and_command_line_precedence(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("optim: sgd\nlearning_rate: 0.5\nlars: true\nextrap_until: 7\n")
    args = parse(
        [
            "--config",
            str(cfg),
            "--learning_rate",
            "0.2",
            "--lars",
            "false",
            "--lr_decay_milestones",
            "0.3",
            "0.6",
            "--max_grad_norm",
            "none",
        ]
    )
    assert args.optim == "sgd"  # from the yaml
    assert args.learning_rate == 0.2 and args.lars is False  # the command line wins
    assert args.extrap_until == 7 and args.lr_decay_milestones == [0.3, 0.6]
    assert args.max_grad_norm is None and args.momentum == 0.9  # a default
    assert parse(["--log_smoothness"]).log_smoothness is True  # a bare flag is true
    assert parse(["--lars"]).lars is True and parse(["--no_nesterov"]).nesterov is False


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("learning_rat: 0.1\n", "unknown key 'learning_rat'.*did you mean 'learning_rate'"),
        ("max_steps: ten\n", "max_steps must be int"),
        ("max_steps: 1.5\n", "max_steps must be int"),
        ("lars: maybe\n", "lars must be true or false"),
        ("report_to: mlflow\n", r"report_to \['mlflow'\]: choose none, all, or of wandb"),
        ("- a list\n", "must hold a mapping"),
        ("optim: [unclosed\n", "not valid yaml"),
        ("optim: lamb\n", "unknown optim 'lamb'; choose one of"),
        ("save_total_limit: 0\n", "save_total_limit must be >= 1"),
        ("gradient_accumulation_steps: 0\n", "gradient_accumulation_steps must be > 0"),
        ("optim: extrap_sgd_fresh\ngradient_accumulation_steps: 2\n", "closure"),
        ("warmup_steps: 5\nwarmup_epochs: 1\n", "warmup_steps or warmup_epochs, not both"),
        ("lr_decay_milestones: [0.75, 0.5]\n", "increasing fractions"),
        ("local_period: 1\n", "local_period must be >= 2"),
        ("optim: extrap_sgd_fresh\nlars: true\n", "cannot wrap extrap_sgd_fresh"),
        ("optim: extrap_adam\nlars: true\n", "extrap_adam is Adam-type"),
        ("optim: adamw\nlars: true\n", "adamw is Adam-type"),
    ],
)
def test_config_errors(tmp_path, yaml_text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(common.ConfigError, match=message):
        parse(["--config", str(cfg)])


def test_command_line_errors(capsys):
    with pytest.raises(common.ConfigError, match="unrecognized arguments: --nope"):
        parse(["--nope", "1"])
    with pytest.raises(common.ConfigError, match="did you mean --learning_rate"):
        parse(["--learning_rat", "0.1"])
    with pytest.raises(common.ConfigError, match="per_device_train_batch_size.*invalid int value"):
        parse(["--per_device_train_batch_size", "big"])
    with pytest.raises(common.ConfigError, match="does not exist"):
        parse(["--config", "/nonexistent.yaml"])
    with pytest.raises(SystemExit) as exit_info:  # what a user sees: a message, status 2
        common.parse_args(Args, ["--optim", "lamb"])
    assert exit_info.value.code == 2
    assert "unknown optim 'lamb'" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(CONFIG_CLASSES))
def test_shipped_configs_parse(name):
    """Every key of every shipped config is a field of its recipe's dataclass."""
    cls = CONFIG_CLASSES[name]
    path = os.path.join(CONFIGS, name)
    keys = common.load_yaml_config(cls, path)
    assert set(keys) <= {f.name for f in dataclasses.fields(cls)}
    args = parse(["--config", path], cls)
    if name.endswith("_quick.yaml"):  # the quick configs are the recipes' defaults, written out
        assert args == cls()


def test_every_shipped_config_is_checked():
    assert {os.path.basename(p) for p in glob.glob(os.path.join(CONFIGS, "*.yaml"))} == set(
        CONFIG_CLASSES
    )


# ---------------------------------------------------------------------------- optimizers


def _model():
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def test_param_groups_weight_decay_skips_norms_and_biases():
    model = _model()
    decay, no_decay = common.param_groups_weight_decay(model, 5e-4)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert len(no_decay["params"]) == 4  # two biases, BatchNorm weight and bias


@pytest.mark.parametrize("name", extrap_accel.list_optimizers())
def test_create_optimizer_for_every_registry_entry(name):
    info = extrap_accel.get_optimizer_info(name)
    argv = ["--optim", name, "--weight_decay", "1e-4"]
    if "noise_scale" in info.required:
        argv += ["--noise_scale", "1e-3"]
    args = parse(argv)
    optimizer = common.create_optimizer(args, _model().parameters(), extrap_max_norm=0.25)
    assert isinstance(optimizer, info.cls)
    group = optimizer.param_groups[0]
    assert group["lr"] == 0.1 and group["weight_decay"] == 1e-4
    if "momentum" in group:
        assert group["momentum"] == 0.9 and group["nesterov"] is True
    else:
        assert group["betas"] == (0.9, 0.999)
    if info.extrapolates:
        assert group["extrap_scale"] == 1.0
        past = info.defaults.get("extrapolation", "past") == "past"
        assert group["extrap_max_norm"] == (0.25 if past else None)


def test_create_optimizer_errors():
    with pytest.raises(common.ConfigError, match="needs noise_scale"):
        common.create_optimizer(parse(["--optim", "extrap_sgd_gaussian"]), _model().parameters())
    with pytest.raises(common.ConfigError, match="noise_scale applies to the noise variants"):
        common.create_optimizer(parse(["--noise_scale", "0.1"]), _model().parameters())
    with pytest.raises(common.ConfigError, match="sgd does not extrapolate"):
        common.create_optimizer(
            parse(["--optim", "sgd", "--extrap_lr", "0.1"]), _model().parameters()
        )


def _run_steps(optimizer, model, steps=4, disable_at=None):
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        if disable_at is not None:
            common.apply_extrap_until(optimizer, SimpleNamespace(extrap_until=disable_at), step)
        x = torch.randn(16, 4, generator=gen)
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()


@pytest.mark.parametrize("name", ["extrap_sgd", "extrap_sgd_gaussian", "extrap_adam"])
def test_extrap_until_turns_extrapolation_off(name):
    """After extrap_until, x̃ = x and the step is the base optimizer's (footnote 9)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))
    argv = ["--optim", name] + (["--noise_scale", "0.01"] if "gaussian" in name else [])
    optimizer = common.create_optimizer(parse(argv), model.parameters())
    _run_steps(optimizer, model, steps=3, disable_at=1)
    for p, anchor in optimizer.displaced():
        assert torch.equal(p, anchor)  # the parameters hold the anchor
    for group in optimizer.param_groups:
        assert group["extrap_scale"] == 0.0


# ---------------------------------------------------------------------------- smoothness


def test_smoothness_meter_on_a_quadratic():
    """f(x) = a/2·‖x‖²: g = a·x, so ‖Δg‖/‖Δx‖ = a exactly."""
    a = 3.0
    x = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    for name in ("sgd", "extrap_sgd"):
        x.data = torch.tensor([1.0, -2.0, 0.5])
        optimizer = common.create_optimizer(
            parse(["--optim", name, "--learning_rate", "0.05"]), [x]
        )
        meter = common.SmoothnessMeter(optimizer)
        values = []
        for _ in range(4):
            optimizer.zero_grad()
            (0.5 * a * x.square().sum()).backward()
            values.append(meter.update())
            optimizer.step()
        assert values[0] is None
        assert values[1:] == pytest.approx([a] * 3, rel=1e-5)
        restored = common.SmoothnessMeter(optimizer)
        restored.load_state_dict(meter.state_dict())
        assert torch.equal(restored._prev[0], meter._prev[0])


def test_uses_closure_only_for_fresh():
    model = nn.Linear(3, 1)
    fresh = common.create_optimizer(parse(["--optim", "extrap_sgd_fresh"]), model.parameters())
    past = common.create_optimizer(parse(["--optim", "extrap_sgd"]), model.parameters())
    assert common.uses_closure(fresh) and not common.uses_closure(past)


# ---------------------------------------------------------------------------- HF vocabulary


RECIPE_CLASSES = [vision.VisionArguments, language_model.LMArguments, translate.TranslateArguments]


@pytest.mark.parametrize("cls", RECIPE_CLASSES, ids=lambda c: c.__name__)
def test_help_describes_every_option(cls):
    """Every option of --help has a description (HfArgumentParser with help= on every field)."""
    parser = common._parser(cls, "recipe")
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert {a.dest for a in options} >= {f.name for f in dataclasses.fields(cls)}
    missing = [a.option_strings[0] for a in options if not (a.help or "").strip()]
    assert missing == []
    text = parser.format_help()
    assert "--gradient_accumulation_steps" in text and "micro-steps per optimizer step" in text


def test_hf_names_and_old_aliases(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec  # tensorboard "installed", wandb as it is
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: (
            object() if name in ("tensorboard", "tensorboardX") else find_spec(name, *a)
        ),
    )
    args = parse(["--optim", "sgd", "--lr_scheduler_type", "constant", "--dataset_name", "x/y"])
    assert (args.optim, args.lr_scheduler_type, args.dataset_name) == ("sgd", "constant", "x/y")
    with pytest.warns(FutureWarning, match="--optimizer is now --optim"):
        old = parse(["--optimizer", "sgd", "--lr_schedule", "constant", "--dataset", "x/y"])
    assert old == args
    assert parse(["--report_to", "none"]).report_to == ["none"]
    assert parse(["--report_to", "wandb", "tensorboard"]).report_to == ["wandb", "tensorboard"]
    assert parse(["--report_to", "wandb,tensorboard"]).report_to == ["wandb", "tensorboard"]
    installed = [t for t in common.TRACKERS if importlib.util.find_spec(t)]
    assert "tensorboard" in installed
    assert parse(["--report_to", "all"]).report_to == installed
    assert common.trackers(parse([])) is None


def test_config_file_from_another_working_directory(tmp_path, monkeypatch):
    """--config and the DeepSpeed file of an accelerate yaml are found from any directory."""
    monkeypatch.chdir(tmp_path)
    shipped = parse(["--config", "recipes/configs/vision_quick.yaml"], vision.VisionArguments)
    assert shipped == vision.VisionArguments()
    assert parse(["--config", "vision_quick.yaml"], vision.VisionArguments) == shipped
    (tmp_path / "mine.yaml").write_text("learning_rate: 0.3\n")
    assert parse(["--config", "mine.yaml", "--max_steps", "5"]).learning_rate == 0.3
    with pytest.raises(common.ConfigError, match="'nope.yaml' does not exist"):
        parse(["--config", "nope.yaml"])
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "accelerate_configs/ds_zero2_bf16.json")
    plugin = common.deepspeed_plugin(parse(["--max_grad_norm", "0.5"]))
    assert plugin.deepspeed_config["gradient_clipping"] == 0.5
    assert plugin.deepspeed_config["zero_optimization"]["stage"] == 2
    # an accelerate yaml with the DeepSpeed settings inline: the same rule, no silent override
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    monkeypatch.setenv("ACCELERATE_GRADIENT_CLIPPING", "1.0")
    with pytest.raises(common.ConfigError, match="clips gradients at 1.0.*--max_grad_norm 1.0"):
        common.deepspeed_plugin(parse(["--max_grad_norm", "0.5"]))
    monkeypatch.setenv("ACCELERATE_GRADIENT_CLIPPING", "none")
    assert common.deepspeed_plugin(parse(["--max_grad_norm", "0.5"])).gradient_clipping == 0.5


def _netrc(home, host="api.wandb.ai"):
    path = home / ".netrc"
    path.write_text(f"machine {host}\n  login user\n  password {'k' * 40}\n")
    path.chmod(0o600)


def test_wandb_mode_online_when_logged_in(tmp_path):
    """Online with a key in the environment, in ~/.netrc (what `wandb login` writes) or in W&B's
    settings file; offline otherwise; an explicit WANDB_MODE wins."""
    home = tmp_path / "home"
    home.mkdir()
    assert common.wandb_mode({}, str(home)) == "offline"
    assert common.wandb_mode({"WANDB_API_KEY": "k" * 40}, str(home)) == "online"
    assert common.wandb_mode({"WANDB_MODE": "disabled", "WANDB_API_KEY": "k"}, str(home)) == (
        "disabled"
    )
    _netrc(home, "example.com")  # another host's entry is not a W&B login
    assert common.wandb_mode({}, str(home)) == "offline"
    _netrc(home)
    assert common.wandb_mode({}, str(home)) == "online"
    assert common.wandb_mode({"NETRC": str(tmp_path / "none")}, str(home)) == "offline"
    other = tmp_path / "other"
    (other / ".config" / "wandb").mkdir(parents=True)
    (other / ".config" / "wandb" / "settings").write_text("[default]\napi_key = abc\n")
    assert common.wandb_mode({}, str(other)) == "online"
    custom = {"WANDB_BASE_URL": "https://wandb.example.com"}
    _netrc(other, "wandb.example.com")
    assert common.wandb_mode(custom, str(other)) == "online"


def test_rotation_keeps_the_newest_and_the_checkpoint_resumed_from(tmp_path):
    for step in (2, 4, 6, 8, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if step != 10:  # checkpoint-10: a save that did not finish, never deleted
            (tmp_path / f"checkpoint-{step}" / "checkpoint_complete.json").write_text("{}")
    resumed = str(tmp_path / "checkpoint-2")
    deleted = common.rotate_checkpoints(str(tmp_path), 2, keep=resumed)
    assert sorted(os.path.basename(d) for d in deleted) == ["checkpoint-4"]
    assert sorted(os.listdir(tmp_path)) == [
        "checkpoint-10",
        "checkpoint-2",
        "checkpoint-6",
        "checkpoint-8",
    ]
    assert common.rotate_checkpoints(str(tmp_path), None) == []
    common.rotate_checkpoints(str(tmp_path), 1)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-10", "checkpoint-8"]


# ---------------------------------------------------------------------------- checkpoints


def test_find_latest_checkpoint_and_resume_errors(tmp_path):
    assert common.find_latest_checkpoint(str(tmp_path)) is None
    for step in (5, 40, 100, 120):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if step != 120:  # checkpoint-120: a save that did not finish
            (tmp_path / f"checkpoint-{step}" / "checkpoint_complete.json").write_text(
                f'{{"step": {step}, "num_processes": 2}}'
            )
    (tmp_path / "checkpoint-final").mkdir()
    with pytest.warns(UserWarning, match="skipping checkpoint-120.*did not finish"):
        assert common.find_latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-100")
    args = parse(["--output_dir", str(tmp_path / "empty"), "--resume_from_checkpoint", "latest"])
    with pytest.raises(common.ConfigError, match="no complete checkpoint-<step> directory"):
        common.resume(None, args, common.TrainState())
    args = parse(["--resume_from_checkpoint", str(tmp_path / "missing")])
    with pytest.raises(common.ConfigError, match="is not a directory"):
        common.resume(None, args, common.TrainState())
    launch = SimpleNamespace(num_processes=2, process_index=1)
    with pytest.raises(common.ConfigError, match="save did not finish.*earlier checkpoint"):
        common.check_checkpoint(launch, str(tmp_path / "checkpoint-120"))
    with pytest.raises(common.ConfigError, match="saved by 2 processes.*resume with 2"):
        common.check_checkpoint(
            SimpleNamespace(num_processes=4, process_index=1), str(tmp_path / "checkpoint-100")
        )
    ckpt = tmp_path / "checkpoint-100"
    for name in ("optimizer.bin", "model.safetensors", "extrap_accel_rank0.pt"):
        (ckpt / name).write_bytes(b"")
    with pytest.raises(common.ConfigError, match="random_states_1.pkl, extrap_accel_rank1"):
        common.check_checkpoint(launch, str(ckpt))
    for name in ("random_states_1.pkl", "extrap_accel_rank1.pt"):
        (ckpt / name).write_bytes(b"")
    common.check_checkpoint(launch, str(ckpt))


def test_post_local_sgd_needs_several_processes():
    args = parse(["--post_local_from", "10"])
    with pytest.raises(common.ConfigError, match="needs data parallelism"):
        common.enable_post_local_sgd(SimpleNamespace(num_processes=1), None, None, args)
    assert common.enable_post_local_sgd(None, None, None, parse([])) is None


def test_report_to_tensorboard_needs_tensorboard(monkeypatch):
    """A clear error at parse time (tensorboard hidden, whether or not it is installed)."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("tensorboard", "tensorboardX") else find_spec(name, *a),
    )
    with pytest.raises(common.ConfigError, match="pip install tensorboard"):
        parse(["--report_to", "tensorboard"])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    assert parse(["--report_to", "tensorboard"]).report_to == ["tensorboard"]


def test_plot_curves(tmp_path):
    history = [{"step": s, "train_loss": 2.0 / s, "lr": 0.1} for s in range(1, 6)]
    history.append({"step": 5, "eval_accuracy": 0.5})
    common.plot_curves(history, str(tmp_path / "curves.png"))
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------- vision data


def _pil_images(n, size=32, seed=0):
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n, size, size, 3), generator=gen, dtype=torch.uint8)
    return [Image.fromarray(p.numpy()) for p in pixels], pixels


@pytest.fixture(scope="module")
def cifar_like(tmp_path_factory):
    """A local copy in the Hub's layout: plain_text/{train,test}-00000-of-00001.parquet."""
    import datasets

    root = tmp_path_factory.mktemp("cifar10")
    features = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(names=[f"c{i}" for i in range(10)])}
    )
    pixels = {}
    for split, n in (("train", 24), ("test", 8)):
        images, pixels[split] = _pil_images(n, seed=len(split))
        ds = datasets.Dataset.from_dict(
            {"img": images, "label": [i % 10 for i in range(n)]}, features=features
        )
        os.makedirs(root / "plain_text", exist_ok=True)
        ds.to_parquet(str(root / "plain_text" / f"{split}-00000-of-00001.parquet"))
    return root, pixels


def test_vision_local_dataset_in_the_hub_schema(cifar_like):
    root, pixels = cifar_like
    args = parse(["--dataset_name", str(root)], vision.VisionArguments)
    train_x, train_y, test_x, _, num_classes = vision.get_datasets(args)
    assert train_x.shape == (24, 3, 32, 32) and train_x.dtype == torch.uint8
    assert torch.equal(train_x, pixels["train"].permute(0, 3, 1, 2))
    assert test_x.shape == (8, 3, 32, 32) and num_classes == 10
    assert train_y.tolist() == [i % 10 for i in range(24)]


def test_vision_cifar100_schema_from_save_to_disk(tmp_path):
    import datasets

    images, _ = _pil_images(6)
    split = {"img": images, "fine_label": [0, 5, 99, 1, 2, 3], "coarse_label": [0] * 6}
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(split), "test": datasets.Dataset.from_dict(split)}
    ).save_to_disk(str(tmp_path / "c100"))
    args = parse(["--dataset_name", str(tmp_path / "c100")], vision.VisionArguments)
    _, train_y, _, _, num_classes = vision.get_datasets(args)
    assert train_y.tolist() == [0, 5, 99, 1, 2, 3] and num_classes == 100


def test_vision_data_errors_name_the_schema(tmp_path, monkeypatch):
    import datasets

    def load(name):
        return vision.get_datasets(parse(["--dataset_name", name], vision.VisionArguments))

    with pytest.raises(common.DataError, match="is not a directory; expected .*'img'"):
        load(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(common.DataError, match="could not load the local directory.*'img'"):
        load(str(tmp_path / "empty"))
    images, _ = _pil_images(2)
    bad = datasets.Dataset.from_dict({"picture": images, "label": [0, 1]})
    datasets.DatasetDict({"train": bad, "test": bad}).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(common.DataError, match=r"columns \['picture', 'label'\]; expected .*'img'"):
        load(str(tmp_path / "bad"))
    only_train = datasets.Dataset.from_dict({"img": images, "label": [0, 1]})
    datasets.DatasetDict({"train": only_train}).save_to_disk(str(tmp_path / "train_only"))
    with pytest.raises(common.DataError, match=r"missing \['test'\]"):
        load(str(tmp_path / "train_only"))
    # The Hub path itself: unreachable here, so it must fail with a message saying what to do.
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        common.DataError, match="Hub dataset 'uoft-cs/cifar10'.*--dataset_name default"
    ):
        load("uoft-cs/cifar10")


def test_digits_default_and_augmentation():
    train_x, train_y, test_x, _, num_classes = vision._digits()
    assert train_x.shape == (1497, 3, 32, 32) and test_x.shape == (300, 3, 32, 32)
    assert num_classes == 10 and set(train_y.tolist()) == set(range(10))
    pre = vision.Preprocess(torch.zeros(3), torch.ones(3), hflip=True)
    x = train_x[:8]
    a = pre(x, common.step_generator(0, 3, 0))
    b = pre(x, common.step_generator(0, 3, 0))
    c = pre(x, common.step_generator(0, 3, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)  # a function of (seed, step, rank)
    assert a.shape == (8, 3, 32, 32)
    assert torch.equal(pre(x), x.float() / 255)  # no generator: no augmentation
    # each output is a (possibly mirrored) 32×32 window of the zero-padded image
    padded = torch.nn.functional.pad(x.float() / 255, (4, 4, 4, 4))
    for img, out in zip(padded, a):
        windows = img.unfold(1, 32, 1).unfold(2, 32, 1).permute(1, 2, 0, 3, 4)
        match = (windows == out).flatten(2).all(-1) | (windows == out.flip(2)).flatten(2).all(-1)
        assert match.any()


def test_models():
    resnet = vision.ResNetCifar(20, 10)
    assert sum(p.numel() for p in resnet.parameters()) == 269_722  # ResNet-20, option A: 0.27M
    vgg = vision.VGG(100, width=0.125)
    assert vgg(torch.zeros(2, 3, 32, 32)).shape == (2, 100)
    assert vgg.fc.in_features == 64  # 512 × 0.125


# ---------------------------------------------------------------------------- language model data


def test_pydoc_default_and_vocabulary():
    texts = language_model._pydoc_topics()
    assert set(texts) == {"train", "validation", "test"}
    total = sum(len(t) for t in texts.values())
    assert 400_000 < total < 600_000 and len(texts["validation"]) > 10_000
    vocab = language_model.Vocabulary.build("the cat. the dog\n\nthe end", "word")
    assert vocab.itos[:3] == ["<unk>", "<eos>", "the"]
    ids = vocab.encode("the cow.\n")
    assert vocab.decode(ids) == "the <unk> . <eos>"
    small = language_model.Vocabulary.build("a a a b b c", "whitespace", max_vocab=3)
    assert small.itos == ["<unk>", "<eos>", "a"]
    chars = language_model.Vocabulary.build("ab\nba", "char")
    assert chars.decode(chars.encode("ab\nz")) == "ab\n<unk>"


def test_batchify_splits_the_global_batch_by_rank():
    ids = torch.arange(100)
    full = language_model.batchify(ids, 4, 0, 1)
    parts = [language_model.batchify(ids, 2, r, 2) for r in range(2)]
    assert torch.equal(torch.cat(parts), full)  # K·b contiguous streams, b per rank
    assert full.shape == (4, 25) and torch.equal(full[1], torch.arange(25, 50))
    with pytest.raises(common.DataError, match="too few"):
        language_model.batchify(torch.arange(10), 8, 0, 1)


def _lm_texts(name):
    return language_model.get_text_splits(
        parse(["--dataset_name", name], language_model.LMArguments)
    )


def test_language_model_local_text_files(tmp_path):
    (tmp_path / "txt").mkdir()
    for split, text in (("train", "a b\n\n = T = \nc d"), ("valid", "e f"), ("test", "g")):
        (tmp_path / "txt" / f"{split}.txt").write_text(text + "\n")
    texts = _lm_texts(str(tmp_path / "txt"))
    assert texts["train"] == "a b\n\n = T = \nc d" and texts["validation"] == "e f"
    (tmp_path / "raw").mkdir()  # WikiText's own file names
    for split in ("train", "valid", "test"):
        (tmp_path / "raw" / f"wiki.{split}.raw").write_text(f" = {split} = \n\n words here \n")
    texts = _lm_texts(str(tmp_path / "raw"))
    assert texts["validation"] == " = valid = \n\n words here "


def test_language_model_hub_schema_and_errors(tmp_path):
    import datasets

    rows = {"text": [" = Title = \n", "", " some words here \n"]}
    # the Hub's layout: <config>/<split>-00000-of-00001.parquet
    for split in ("train", "validation", "test"):
        os.makedirs(tmp_path / "wt" / "wikitext-2-raw-v1", exist_ok=True)
        datasets.Dataset.from_dict(rows).to_parquet(
            str(tmp_path / "wt" / "wikitext-2-raw-v1" / f"{split}-00000-of-00001.parquet")
        )
    args = parse(
        ["--dataset_name", str(tmp_path / "wt"), "--dataset_config_name", "wikitext-2-raw-v1"],
        language_model.LMArguments,
    )
    texts = language_model.get_text_splits(args)
    assert texts["test"] == " = Title = \n\n some words here "
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"body": ["x"]}),
            "validation": datasets.Dataset.from_dict({"body": ["y"]}),
        }
    ).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(common.DataError, match=r"columns \['body'\]; expected a 'text' column"):
        _lm_texts(str(tmp_path / "bad"))
    (tmp_path / "notrain").mkdir()
    (tmp_path / "notrain" / "train.txt").write_text("only training text\n")
    with pytest.raises(common.DataError, match=r"splits \['train'\]; expected .*'validation'"):
        _lm_texts(str(tmp_path / "notrain"))


# ---------------------------------------------------------------------------- recipes in-process


@pytest.fixture
def one_thread():
    """Tiny LSTMs are much faster on one thread (and a busy machine makes 2 threads crawl)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["sgd", "extrap_sgd_fresh", "extrap_sgd_uniform", "extrap_adam"])
def test_language_model_runs_with_registry_entries(tmp_path, name, one_thread):
    """One process, a tiny model: any registry entry trains (fresh through its closure)."""
    argv = [
        "--optim",
        name,
        "--output_dir",
        str(tmp_path),
        "--max_steps",
        "3",
        "--emsize",
        "16",
        "--nhid",
        "16",
        "--logging_steps",
        "1",
        "--eval_steps",
        "0",
    ]
    if name == "extrap_sgd_uniform":
        argv += ["--noise_scale", "1e-3"]
    if name == "extrap_adam":
        argv += ["--learning_rate", "1e-3"]
    results = language_model.main(argv)
    assert results["step"] == 3 and math.isfinite(results["eval_perplexity"])
    assert os.path.exists(tmp_path / "curves.png") and os.path.exists(tmp_path / "checkpoint-3")


def _lm_test_perplexity(output_dir) -> float:
    """The test perplexity of the model that load_model rebuilds from ``output_dir``."""
    model, vocab = language_model.load_model(str(output_dir))
    text = language_model._pydoc_topics()["test"]
    data = language_model.batchify(vocab.encode(text), 10, 0, 1)  # per_device_eval_batch_size
    one_process = SimpleNamespace(gather_for_metrics=lambda t: t)
    return language_model.evaluate(one_process, model, data, 35)


def test_language_model_outputs_load_rotate_and_push(tmp_path, monkeypatch, one_thread):
    """extrap-Adam, one process: load_model(out) rebuilds the saved anchor (its test perplexity
    is the recipe's own); --save_total_limit keeps the newest checkpoints; --push_to_hub uploads
    the output folder holding the final model, to --hub_model_id (no network: the upload is
    recorded)."""
    import huggingface_hub

    pushed = []
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: repo_id)

    def upload_folder(*, repo_id, folder_path, **kw):
        pushed.append((repo_id, folder_path, sorted(os.listdir(folder_path))))

    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    out = tmp_path / "lm"
    results = language_model.main(
        [
            "--optim",
            "extrap_adam",
            "--learning_rate",
            "1e-2",
            "--output_dir",
            str(out),
            "--max_steps",
            "4",
            "--emsize",
            "16",
            "--nhid",
            "16",
            "--eval_steps",
            "0",
            "--save_steps",
            "1",
            "--save_total_limit",
            "2",
            "--push_to_hub",
            "--hub_model_id",
            "me/tiny-lstm",
        ]
    )
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint-")) == [
        "checkpoint-3",
        "checkpoint-4",
    ]
    assert _lm_test_perplexity(out) == pytest.approx(results["test_perplexity"], rel=1e-9)
    [(repo_id, folder, files)] = pushed
    assert repo_id == "me/tiny-lstm" and folder == str(out)
    assert {"model.safetensors", "config.json", "vocab.json"} <= set(files)


def test_gradient_accumulation_equals_the_full_batch(tmp_path, one_thread):
    """K = 1 fixed: 2 micro-batches of 2 rows accumulate to the step of one batch of 4 rows
    (no dropout: the rows are independent), within float rounding."""
    common_argv = [
        "--emsize",
        "16",
        "--nhid",
        "16",
        "--dropout",
        "0",
        "--max_steps",
        "4",
        "--eval_steps",
        "0",
        "--logging_steps",
        "1",
        "--max_vocab",
        "300",
    ]
    full, accumulated = tmp_path / "full", tmp_path / "accumulated"
    language_model.main(
        [*common_argv, "--per_device_train_batch_size", "4", "--output_dir", str(full)]
    )
    language_model.main(
        [
            *common_argv,
            "--per_device_train_batch_size",
            "2",
            "--gradient_accumulation_steps",
            "2",
            "--output_dir",
            str(accumulated),
        ]
    )
    a = load_file(str(full / "model.safetensors"))
    b = load_file(str(accumulated / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)
    losses = [
        [r["train_loss"] for r in _records(d) if "train_loss" in r] for d in (full, accumulated)
    ]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert len(losses[0]) == 4 and losses[0][-1] < losses[0][0]


def test_post_local_sgd_with_one_process_is_a_clear_error(tmp_path, one_thread):
    with pytest.raises(common.ConfigError, match="needs data parallelism"):
        language_model.main(
            [
                "--post_local_from",
                "2",
                "--output_dir",
                str(tmp_path),
                "--max_steps",
                "3",
                "--emsize",
                "8",
                "--nhid",
                "8",
            ]
        )


def test_warmup_in_steps_or_epochs_whichever_is_given(tmp_path):
    """A recipe's default warmup is in epochs: --warmup_steps alone replaces it (command line
    over yaml); both at once is an error."""
    args = parse(["--warmup_steps", "7"], vision.VisionArguments)
    assert (args.warmup_steps, args.warmup_epochs) == (7, 0.0)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("warmup_epochs: 3\n")
    args = parse(["--config", str(cfg), "--warmup_steps", "5"], vision.VisionArguments)
    assert (args.warmup_steps, args.warmup_epochs) == (5, 0.0)
    cfg.write_text("warmup_steps: 4\n")
    args = parse(["--config", str(cfg)], vision.VisionArguments)
    assert (args.warmup_steps, args.warmup_epochs) == (4, 0.0)
    with pytest.raises(common.ConfigError, match="not both"):
        parse(["--warmup_steps", "3", "--warmup_epochs", "1"], vision.VisionArguments)


def test_mistakes_found_after_parsing_end_without_a_traceback(tmp_path):
    """From the command line, a ConfigError/DataError raised while setting up (here: post-local
    SGD on one process; a dataset directory that does not exist) prints one line, exit 2."""
    import subprocess

    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    for args, message in (
        (["--post_local_from", "2"], "needs data parallelism"),
        (["--dataset_name", str(tmp_path / "nowhere")], "nowhere"),
    ):
        proc = subprocess.run(
            [
                sys.executable,
                "recipes/language_model.py",
                *args,
                "--max_steps",
                "2",
                "--output_dir",
                str(tmp_path / "out"),
            ],
            check=False,
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "language_model.py: error:" in proc.stderr and message in proc.stderr
        assert "Traceback" not in proc.stderr


def test_a_damaged_checkpoint_is_a_clear_error(tmp_path, one_thread):
    """A truncated file in a checkpoint: ConfigError naming the checkpoint and the way out."""
    argv = [
        "--output_dir",
        str(tmp_path),
        "--max_steps",
        "2",
        "--emsize",
        "8",
        "--nhid",
        "8",
        "--eval_steps",
        "0",
        "--save_steps",
        "2",
    ]
    language_model.main(argv)
    ckpt = tmp_path / "checkpoint-2"
    assert (ckpt / "checkpoint_complete.json").exists()
    optimizer = ckpt / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    with pytest.raises(common.ConfigError, match="could not load .*checkpoint-2.*damaged"):
        language_model.main(
            argv[:-1] + ["0", "--max_steps", "4", "--resume_from_checkpoint", str(ckpt)]
        )


def test_max_grad_norm_becomes_deepspeeds_gradient_clipping():
    """Under DeepSpeed accelerator.clip_grad_norm_ clips nothing: the engine must do it."""
    for given, max_norm, expected in (
        ("auto", 0.25, 0.25),
        (0.0, 0.25, 0.25),
        (0.0, None, 0.0),
        (1.0, 1.0, 1.0),
    ):
        config = {"gradient_clipping": given}
        common.deepspeed_gradient_clipping(config, max_norm)
        assert config["gradient_clipping"] == expected
    config = {}  # absent: DeepSpeed would clip at 1.0
    common.deepspeed_gradient_clipping(config, None)
    assert config["gradient_clipping"] == 0.0
    with pytest.raises(common.ConfigError, match="clips gradients at 1.0.*--max_grad_norm 1.0"):
        common.deepspeed_gradient_clipping({"gradient_clipping": 1.0}, 0.25)
    with pytest.raises(common.ConfigError, match="clips gradients at 1.0"):
        common.deepspeed_gradient_clipping({"gradient_clipping": 1.0}, None)


# ---------------------------------------------------------------- accelerate's FSDP plugin
def _fsdp_accelerator(version):
    from accelerate.utils import DistributedType

    return SimpleNamespace(
        distributed_type=DistributedType.FSDP,
        num_processes=2,
        state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=version)),
    )


def test_fsdp2_accepted_with_the_same_flags():
    common.check_launch(_fsdp_accelerator(2), Args())


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"post_local_from": 3}, "--post_local_from"),
        ({"lars": True}, "--lars"),
        ({"log_smoothness": True}, "--log_smoothness"),
    ],
)
def test_fsdp2_refuses_options_that_need_whole_tensors_or_ddp(flags, message):
    with pytest.raises(common.ConfigError, match=f"{message}.*not supported under FSDP2"):
        common.check_launch(_fsdp_accelerator(2), Args(**flags))


def test_fsdp1_is_refused_naming_fsdp_version_2():
    with pytest.raises(common.ConfigError, match="fsdp_version: 2"):
        common.check_launch(_fsdp_accelerator(1), Args())


def test_broadcast_buffers_does_nothing_outside_fsdp():
    from accelerate.utils import DistributedType

    model = nn.BatchNorm1d(3)
    model.running_mean.fill_(2.0)
    common.broadcast_buffers(
        SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, num_processes=2), model
    )
    assert torch.equal(model.running_mean, torch.full((3,), 2.0))


def test_multi_node_deepspeed_config():
    """accelerate_configs/deepspeed_zero2_bf16_multinode.yaml: two machines, accelerate's own
    launcher on each, a DeepSpeed file that exists, every setting commented."""
    from accelerate.commands.config.config_args import ClusterConfig

    path = os.path.join(REPO, "accelerate_configs", "deepspeed_zero2_bf16_multinode.yaml")
    config = ClusterConfig.from_yaml_file(path)
    assert config.num_machines == 2 and config.num_processes == 16
    assert config.deepspeed_config["deepspeed_multinode_launcher"] == "standard"
    assert os.path.isfile(os.path.join(REPO, config.deepspeed_config["deepspeed_config_file"]))
    with open(path) as f:
        lines = [ln for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    machines = ("num_machines", "num_processes", "machine_rank", "main_process", "rdzv", "same_net")
    explained = [ln for ln in lines if ln.startswith("  ") or ln.startswith(machines)]
    assert len(explained) == 10 and all("#" in ln for ln in explained)


def test_tensorboard_resume_writes_to_the_stored_folder(tmp_path, monkeypatch):
    """TensorBoard (not installed here, so the tracker list is given): a first run stores its log
    folder in the checkpointed TrainState; a resumed run under another output_dir or cwd writes
    to that folder, not to a new one."""
    import types

    class RecordingAccelerator:
        is_main_process = True

        def __init__(self):
            self.project_configuration = types.SimpleNamespace(logging_dir=None)
            self.calls = []

        def print(self, *args):
            pass

        def init_trackers(self, project, config=None, init_kwargs=None):
            self.calls.append((project, self.project_configuration.logging_dir, config))

    monkeypatch.setattr(common, "trackers", lambda args: ["tensorboard"])
    args = parse(["--output_dir", str(tmp_path / "first"), "--report_to", "none"])
    args.report_to = ["tensorboard"]
    first, state = RecordingAccelerator(), common.TrainState()
    common.init_trackers(first, args, state, "extrap_accel_test")
    stored = state.state_dict()
    assert stored["trackers"]["tensorboard_dir"] == str(tmp_path / "first" / "runs")

    args.output_dir = str(tmp_path / "elsewhere")  # e.g. resumed with another output_dir
    resumed, state2 = RecordingAccelerator(), common.TrainState()
    state2.load_state_dict(stored)
    common.init_trackers(resumed, args, state2, "extrap_accel_test")
    assert resumed.calls[0][1] == str(tmp_path / "first" / "runs")
    assert resumed.calls[0][2]["output_dir"] == args.output_dir  # the config is logged
    fresh = RecordingAccelerator()
    common.init_trackers(fresh, args, common.TrainState(), "extrap_accel_test")
    assert fresh.calls[0][1] == str(tmp_path / "elsewhere" / "runs")
