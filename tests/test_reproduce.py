"""benchmarks/reproduce.py on a tiny budget: table and plots come out, and resuming trains nothing."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def reproduce():
    spec = importlib.util.spec_from_file_location(
        "reproduce", os.path.join(REPO, "benchmarks", "reproduce.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ARGS = ["--quick", "--steps", "4", "--seeds", "0", "--tasks", "vision", "--jobs", "1"]


@pytest.fixture(scope="module")
def first_run(reproduce, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("reproduce"))
    return out, reproduce.main(ARGS + ["--output_dir", out])


def test_quick_run_writes_the_table_and_the_plots(reproduce, first_run):
    out, result = first_run
    text = open(os.path.join(out, "results.md")).read()
    for method in reproduce.METHODS:  # every method has a row in the table and in the grid
        assert f"| {method} |" in text
    assert "test accuracy" in text and "steps to target" in text and "s/step" in text
    for name in ("vision_curves.png", "vision_smoothness.png"):
        path = os.path.join(out, "plots", name)
        assert os.path.getsize(path) > 10_000
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    runs = os.listdir(os.path.join(out, "runs"))
    assert len(runs) == len(reproduce.METHODS)  # quick: one grid point per method, one seed
    rows = result["summary"]["vision"]["rows"]
    for method, row in rows.items():
        assert row["seconds_per_step"][0] > 0
        assert row["test_accuracy"][0] is not None, method
    record = json.load(open(os.path.join(out, "runs", runs[0])))
    assert len(record["history"]["loss"]) == 4
    # the smoothness diagnostic exists from the second step on, for the methods that extrapolate
    postlocal = next(r for r in runs if "postlocal" in r)
    smooth = json.load(open(os.path.join(out, "runs", postlocal)))["history"]["smoothness"]
    assert smooth[0] is None and all(v is not None and v > 0 for v in smooth[1:])


def test_resume_skips_finished_runs(reproduce, first_run, monkeypatch, capsys):
    out, _ = first_run

    def no_training(spec):
        raise AssertionError(f"{spec['id']} was trained again")

    monkeypatch.setattr(reproduce, "train_one", no_training)
    reproduce.main(ARGS + ["--output_dir", out])
    assert f"{len(reproduce.METHODS)} runs cached, 0 to train" in capsys.readouterr().out


def test_resume_trains_only_what_is_missing(reproduce, first_run, monkeypatch, capsys):
    out, _ = first_run
    runs_dir = os.path.join(out, "runs")
    victim = sorted(os.listdir(runs_dir))[0]
    os.remove(os.path.join(runs_dir, victim))
    trained = []
    real = reproduce.train_one

    def counting(spec):
        trained.append(spec["id"])
        return real(spec)

    monkeypatch.setattr(reproduce, "train_one", counting)
    reproduce.main(ARGS + ["--output_dir", out])
    assert trained == [victim[: -len(".json")]]
    assert os.path.exists(os.path.join(runs_dir, victim))
