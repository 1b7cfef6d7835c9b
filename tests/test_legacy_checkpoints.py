"""Checkpoints written by extrap_accel 0.1.0 still load and continue exactly.

tests/fixtures/v0_1 holds an accelerate ``save_state`` (DDP, ExtrapSGD), a DeepSpeed ZeRO-2
fp32 checkpoint (ExtrapSGD) and a HF Trainer checkpoint-3 (DDP, ExtrapAdam), each written by 2
ranks in train mode after 3 steps, and expected.json: every rank's anchor and x̃ right after
loading and after 2 more steps, computed by 0.1.0 (tests/fixtures/make_legacy_checkpoints.py
wrote them; tests/fixtures/v0_1/README.md). One ``torchrun`` launch of 2 CPU processes
(tests/distributed/legacy_checkpoint_worker.py) loads each through the public API with the
package under test and continues; these tests compare.

``EXTRAP_ACCEL_SRC=<dir>`` runs the workers with the extrap_accel of ``<dir>`` (e.g. the
release that wrote the fixtures) instead of this checkout's.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from launch import REPO, free_port, load_results, run

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

WORKER = "tests/distributed/legacy_checkpoint_worker.py"
FIXTURES = os.path.join(REPO, "tests", "fixtures", "v0_1")
with open(os.path.join(FIXTURES, "expected.json")) as _f:
    EXPECTED = json.load(_f)
CASES = list(EXPECTED["cases"])
TOL = 1e-6  # fp32; the fixtures hold float32 values exactly


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("legacy_checkpoints")
    run([[sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
          "--master_addr", "127.0.0.1", "--master_port", str(free_port()), WORKER,
          "--fixtures", FIXTURES, "--out", str(out)]],
        timeout=300, accelerate_use_cpu=False)  # fmt: skip
    return {case: load_results(str(out), f"legacy_{case}", 2) for case in CASES}


def _max_diff(got: list[float], expected: list[float]) -> float:
    assert len(got) == len(expected), f"{len(got)} values, expected {len(expected)}"
    return max(abs(a - b) for a, b in zip(got, expected))


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["after_load", "after_continue"])
@pytest.mark.parametrize("case", CASES)
def test_v0_1_checkpoint_continues_exactly(results, case, moment):
    """Each rank's anchor and its own x̃, right after loading the v0.1 checkpoint and after 2
    more steps, equal what 0.1.0 computed (within 1e-6)."""
    for rank, (got, expected) in enumerate(zip(results[case], EXPECTED["cases"][case]["ranks"])):
        assert "error" not in got, f"{case}, rank {rank}:\n{got['error']}"
        assert got["batches_as_expected"], f"{case}: the Trainer fed other batches than 0.1.0 saw"
        for what in ("anchor", "point"):
            err = _max_diff(got[moment][what], expected[moment][what])
            assert err <= TOL, (f"{case}, rank {rank}, {what} {moment.replace('_', ' ')}: max "
                                f"|difference| {err:.3g} from what extrap_accel 0.1.0 gives")


@pytest.mark.slow
def test_workers_ran_the_package_under_test(results):
    """The launch imported the extrap_accel it was meant to (EXTRAP_ACCEL_SRC, else this
    checkout)."""
    root = os.path.abspath(os.environ.get("EXTRAP_ACCEL_SRC") or REPO)
    for case in CASES:
        for r in results[case]:
            assert r["extrap_accel"]["file"].startswith(root + os.sep), r["extrap_accel"]


# ---------------------------------------------------------------------- the fixtures themselves
@pytest.mark.parametrize("case", CASES)
def test_fixture_holds_one_x_tilde_per_rank(case):
    """What the fixtures pin down: every rank saved its own x̃ (the ranks' points differ, the
    anchors agree), in train mode, and 0.1.0 restored it exactly."""
    ranks = EXPECTED["cases"][case]["ranks"]
    assert len(ranks) == 2
    folder = os.path.join(FIXTURES, EXPECTED["cases"][case]["folder"])
    names = [n for _, _, files in os.walk(folder) for n in files]
    per_rank = ("extrap_accel_rank{}.pt" if case == "deepspeed_zero2"  # (in global_step3/)
                else "extrap_accel_local_0_rank{}.pt")
    assert all(per_rank.format(r) in names for r in range(2)), names
    for moment in ("at_save", "after_load", "after_continue"):
        a, b = (r[moment] for r in ranks)
        assert a["anchor"] == b["anchor"]
        assert a["point"] != b["point"]
        assert a["point"] != a["anchor"]
    for r in ranks:
        assert r["after_load"] == r["at_save"]


def test_fixtures_stay_small():
    total = sum(os.path.getsize(os.path.join(d, n)) for d, _, fs in os.walk(FIXTURES) for n in fs)
    assert total < 200 * 1024, f"tests/fixtures/v0_1 is {total / 1024:.0f} KiB"
