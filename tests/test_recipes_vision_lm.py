"""recipes/vision.py and recipes/language_model.py under `accelerate launch` with 2 CPU processes.

Each recipe runs twice on its embedded default with a tiny model: once without interruption
(checkpoints at the midpoint and at the end), once resumed from the midpoint checkpoint. The
resumed run must continue exactly: the same losses, metrics and final weights, bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
from launch import accelerate_cmd, free_port, run
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

VISION = [
    "recipes/vision.py",
    "--width",
    "0.25",
    "--max_steps",
    "20",
    "--save_steps",
    "10",
    "--logging_steps",
    "1",
    "--eval_steps",
    "10",
    "--per_device_train_batch_size",
    "32",
    "--learning_rate",
    "0.4",
    "--lr_scheduler_type",
    "constant",
    "--warmup_epochs",
    "0",
    "--lars",
    "--log_smoothness",
    "--extrap_until",
    "15",
]
LM = [
    "recipes/language_model.py",
    "--emsize",
    "32",
    "--nhid",
    "32",
    "--max_steps",
    "16",
    "--save_steps",
    "8",
    "--logging_steps",
    "1",
    "--eval_steps",
    "8",
    "--warmup_epochs",
    "0",
    "--post_local_from",
    "12",
    "--local_period",
    "2",
    "--log_smoothness",
]


def _launch(*args: str) -> None:
    run([accelerate_cmd("cpu_2proc.yaml", "--main_process_port", str(free_port()), *args)])


def _records(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _runs(tmp_path_factory, name: str, argv: list[str], resume_latest: bool):
    full = tmp_path_factory.mktemp(f"{name}_full")
    _launch(*argv, "--output_dir", str(full))
    resumed = tmp_path_factory.mktemp(f"{name}_resumed")
    middle = [d for d in os.listdir(full) if d.startswith("checkpoint-")]
    middle = min(middle, key=lambda d: int(d.split("-")[1]))
    if resume_latest:  # the midpoint checkpoint is the latest one in the new output_dir
        shutil.copytree(full / middle, resumed / middle)
        spec = "latest"
    else:
        spec = str(full / middle)
    _launch(*argv, "--output_dir", str(resumed), "--resume_from_checkpoint", spec)
    return full, resumed, int(middle.split("-")[1])


@pytest.fixture(scope="module")
def vision_runs(tmp_path_factory):
    return _runs(tmp_path_factory, "vision", VISION, resume_latest=False)


@pytest.fixture(scope="module")
def lm_runs(tmp_path_factory):
    return _runs(tmp_path_factory, "lm", LM, resume_latest=True)


def _assert_resumed_exactly(full, resumed, middle: int, final: int) -> None:
    after = [r for r in _records(full) if r["step"] > middle]
    assert len(after) >= final - middle
    assert _records(resumed) == after  # every logged loss, metric and rate, bit for bit
    for checkpoint in (f"checkpoint-{final}",):
        a = load_file(os.path.join(full, checkpoint, "model.safetensors"))
        b = load_file(os.path.join(resumed, checkpoint, "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        for rank in (0, 1):  # each rank's x̃ and local moments
            name = f"extrap_accel_rank{rank}.pt"
            la = torch.load(os.path.join(full, checkpoint, name), weights_only=True)
            lb = torch.load(os.path.join(resumed, checkpoint, name), weights_only=True)
            assert la["world_size"] == 2 and la["rank"] == rank
            la, lb = la["optimizers"][0], lb["optimizers"][0]
            for idx, entry in la["state"].items():
                assert all(torch.equal(v, lb["state"][idx][k]) for k, v in entry.items())


def _train_losses(output_dir) -> list[float]:
    return [r["train_loss"] for r in _records(output_dir) if "train_loss" in r]


def test_vision_trains_and_reports_accuracy(vision_runs):
    full, _, _ = vision_runs
    losses = _train_losses(full)
    assert len(losses) == 20
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, losses
    results = json.loads((full / "results.json").read_text())
    assert 0.0 <= results["eval_accuracy"] <= 1.0 and math.isfinite(results["eval_loss"])
    assert results["step"] == 20
    records = _records(full)
    assert all(r["lr"] == pytest.approx(0.2) for r in records if "lr" in r)  # 0.4 · 64/128
    assert all("smoothness" in r for r in records if "train_loss" in r and r["step"] > 1)
    for name in ("curves.png", "config.yaml", "model.safetensors"):
        assert (full / name).exists(), name
    for rank in (0, 1):  # the per-rank state is in every checkpoint
        assert (full / "checkpoint-10" / f"extrap_accel_rank{rank}.pt").exists()
        assert (full / "checkpoint-10" / f"smoothness_rank{rank}.pt").exists()


def test_vision_resumes_exactly(vision_runs):
    _assert_resumed_exactly(*vision_runs, final=20)


def test_language_model_trains_and_reports_perplexity(lm_runs):
    full, _, _ = lm_runs
    losses = _train_losses(full)
    assert len(losses) == 16
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses
    results = json.loads((full / "results.json").read_text())
    vocab = len(json.loads((full / "vocab.json").read_text())["itos"])
    for key in ("eval_perplexity", "test_perplexity"):
        assert 1.0 < results[key] < vocab, results  # better than uniform over the vocabulary
    records = [r for r in _records(full) if "local_sgd" in r]
    assert [r["local_sgd"] for r in records] == [float(r["step"] >= 12) for r in records]
    for rank in (0, 1):
        assert (full / "checkpoint-8" / f"lstm_hidden_rank{rank}.pt").exists()


def test_language_model_resumes_exactly(lm_runs):
    """Also across the switch to post-local SGD at step 12 (the resume is at step 8)."""
    _assert_resumed_exactly(*lm_runs, final=16)


def test_torch_sgd_baseline_resumes_exactly_inside_post_local_sgd(tmp_path):
    """--optim sgd (the paper's baseline) with post-local SGD, saved at step 4 while the
    ranks' weights and momenta differ (phase 2 from step 2, averaged after step 5): each rank
    saves and restores its own, and the resumed run continues bit for bit. Steps 6 and 7 are
    local: the run ends by averaging once more, so both ranks end on one model."""
    argv = [
        "recipes/language_model.py",
        "--emsize",
        "16",
        "--nhid",
        "16",
        "--max_steps",
        "7",
        "--save_steps",
        "4",
        "--logging_steps",
        "1",
        "--eval_steps",
        "0",
        "--warmup_epochs",
        "0",
        "--optim",
        "sgd",
        "--post_local_from",
        "2",
        "--local_period",
        "3",
    ]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _launch(*argv, "--output_dir", str(full))
    _launch(
        *argv, "--output_dir", str(resumed), "--resume_from_checkpoint", str(full / "checkpoint-4")
    )
    for rank in (0, 1):
        assert (full / "checkpoint-4" / f"post_local_baseline_rank{rank}.pt").exists()
    assert _records(resumed) == [r for r in _records(full) if r["step"] > 4]
    a = load_file(str(full / "checkpoint-7" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoint-7" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ranks = [
        torch.load(full / "checkpoint-7" / f"post_local_baseline_rank{r}.pt", weights_only=True)[
            "model"
        ]
        for r in (0, 1)
    ]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    mid = [
        torch.load(full / "checkpoint-4" / f"post_local_baseline_rank{r}.pt", weights_only=True)[
            "model"
        ]
        for r in (0, 1)
    ]
    assert not all(torch.equal(mid[0][k], mid[1][k]) for k in mid[0])  # the check can fail


def _vision():
    import sys

    sys.path.insert(
        0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")
    )
    import common
    import vision

    return common, vision


def test_vision_load_model_reproduces_the_test_accuracy(vision_runs):
    """load_model(output_dir) rebuilds the network and its preprocessing from config.json and
    model.safetensors (the anchor): on the test images it scores what the run reported."""
    from types import SimpleNamespace

    from torch.utils.data import DataLoader, TensorDataset

    _, vision = _vision()
    full, _, _ = vision_runs
    model, preprocess = vision.load_model(str(full))
    _, _, test_x, test_y, _ = vision._digits()
    loader = DataLoader(TensorDataset(test_x, test_y), batch_size=250)  # the run's batches
    one_process = SimpleNamespace(gather_for_metrics=lambda t: t)
    scores = vision.evaluate(one_process, model, preprocess, loader)
    results = json.loads((full / "results.json").read_text())
    assert scores["eval_accuracy"] == results["eval_accuracy"]
    assert scores["eval_loss"] == pytest.approx(results["eval_loss"], rel=1e-5)


def test_resume_on_another_number_of_processes_needs_restart_extrapolation(vision_runs, tmp_path):
    """checkpoint-10 was saved by 2 processes. One process refuses it, naming the flag; with
    --restart_extrapolation it loads the anchor (and the base optimizer state), restarts the
    local extrapolation state and trains on."""
    import torch

    common, vision = _vision()
    full, _, _ = vision_runs
    argv = [*VISION[1:], "--resume_from_checkpoint", str(full / "checkpoint-10")]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(common.ConfigError, match="saved by 2 processes.*--restart_extrap"):
            vision.main([*argv, "--output_dir", str(tmp_path / "refused")])
        at_anchor = tmp_path / "at_anchor"  # no step left: the final model is what was loaded
        vision.main(
            [*argv, "--restart_extrapolation", "--max_steps", "10", "--output_dir", str(at_anchor)]
        )
        a = load_file(str(at_anchor / "model.safetensors"))
        b = load_file(str(full / "checkpoint-10" / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        results = vision.main(
            [
                *argv,
                "--restart_extrapolation",
                "--max_steps",
                "12",
                "--output_dir",
                str(tmp_path / "on"),
            ]
        )
    finally:
        torch.set_num_threads(threads)
    assert results["step"] == 12
    losses = [r["train_loss"] for r in _records(tmp_path / "on") if "train_loss" in r]
    assert [r["step"] for r in _records(tmp_path / "on") if "train_loss" in r] == [11, 12]
    assert all(math.isfinite(v) for v in losses)
