"""benchmarks/batch_scaling.py --quick: table, plot, cache and data manifest; a rerun trains nothing."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bs():
    spec = importlib.util.spec_from_file_location(
        "batch_scaling", os.path.join(REPO, "benchmarks", "batch_scaling.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ARGS = ["--quick", "--jobs", "1"]


@pytest.fixture(scope="module")
def first_run(bs, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("batch_scaling"))
    return out, bs.main(ARGS + ["--output_dir", out])


def test_quick_run_writes_table_plot_and_cache(bs, first_run):
    out, result = first_run
    text = open(os.path.join(out, "results.md")).read()
    for method in bs.METHODS:
        assert method in text
    for K in bs.QUICK["rungs"]:
        assert f"| {K} | {K * bs.LOCAL_BATCH} | {bs.step_cap(K, bs.QUICK)} |" in text
    with open(result["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(result["plot"]) > 10_000
    runs = sorted(os.listdir(os.path.join(out, "runs")))
    # quick: one γ and one c per cell, one seed: one run per (method, K)
    assert len(runs) == len(bs.METHODS) * len(bs.QUICK["rungs"]) == result["runs"]
    for name in runs:
        r = json.load(open(os.path.join(out, "runs", name)))
        steps = [e[0] for e in r["evals"]]
        assert steps[0] == 0 and steps == sorted(steps) and steps[-1] <= r["cap"]
        # steps to target = the first evaluated step where the ANCHOR's subset loss is ≤ the target
        for i, split in ((1, "train"), (2, "val")):
            first = next((e[0] for e in r["evals"] if e[i] <= bs.QUICK[f"{split}_target"]), None)
            assert r[f"steps_to_{split}"] == first, (name, split)
        if r["status"] == "reached":  # stopped as soon as both targets were reached
            assert r["evals"][-1][0] == max(r["steps_to_train"], r["steps_to_val"])
    # the untrained model predicts ~uniform bytes: ln 256 ≈ 5.55 nats, and training lowers it
    r = json.load(open(os.path.join(out, "runs", runs[0])))
    assert abs(r["evals"][0][1] - 5.55) < 0.3 and r["evals"][-1][1] < r["evals"][0][1] - 1.0
    # Nesterov reaches the quick target at both rungs
    for K in bs.QUICK["rungs"]:
        assert result["rows"][f"nesterov|{K}"]["train"][0] is not None


def test_data_is_the_stdlib_split_by_file(bs, first_run):
    out, _ = first_run
    m = json.load(open(os.path.join(out, "data.json")))
    import platform

    assert m["python"] == platform.python_version() and m["files"] > 100
    names = [f for f, _, _ in m["listing"]]
    assert all(f.endswith(".py") and "site-packages" not in f for f in names)
    train = {f for f, _, s in m["listing"] if s == "train"}
    val = {f for f, _, s in m["listing"] if s == "val"}
    assert train and val and not train & val and len(train) + len(val) == m["files"]
    assert m["val_files"] == round(bs.VAL_FRACTION * m["files"])
    assert (
        m == {**bs.manifest(), "listing": m["listing"]} and m["listing"] == bs.manifest()["listing"]
    )


def test_rerun_trains_nothing(bs, first_run, monkeypatch, capsys):
    out, _ = first_run

    def no_training(spec):
        raise AssertionError(f"{spec['id']} was trained again")

    monkeypatch.setattr(bs, "train_one", no_training)
    bs.main(ARGS + ["--output_dir", out])
    log = capsys.readouterr().out
    assert "to train" in log and all(
        line.endswith(" 0 to train")
        for line in log.splitlines()
        if line.rstrip().endswith("to train")
    )
