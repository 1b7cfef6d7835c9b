"""Data parallelism through accelerate on 2 real CPU processes (gloo).

One launch per configuration runs every check of that configuration
(tests/distributed/ddp_worker.py) and writes JSON per rank; these tests assert on it.
"""

from __future__ import annotations

import pytest

import sys

from launch import accelerate_cmd, free_port, load_results, run

pytestmark = pytest.mark.slow
WORKER = "tests/distributed/ddp_worker.py"
TOL = 1e-6  # float32 training vs the float64 oracle


def _launch(tmp_path_factory, config: str, config_file: str = "cpu_2proc.yaml") -> list[dict]:
    out = tmp_path_factory.mktemp(config)
    run([accelerate_cmd(config_file, "--main_process_port", str(free_port()), WORKER,
                        "--config", config, "--out", str(out))])
    return load_results(str(out), config, 2)


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    return _launch(tmp_path_factory, "fp32")


@pytest.fixture(scope="module")
def ga(tmp_path_factory):
    return _launch(tmp_path_factory, "ga")


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    results = _launch(tmp_path_factory, "bf16", "cpu_2proc_bf16.yaml")
    assert all(r["mixed_precision"] == "bf16" for r in results)
    return results


@pytest.fixture(scope="module")
def fp16(tmp_path_factory):
    return _launch(tmp_path_factory, "fp16")


@pytest.fixture(scope="module")
def post_local(tmp_path_factory):
    return _launch(tmp_path_factory, "post_local")


@pytest.fixture(scope="module")
def multinode(tmp_path_factory):
    """accelerate_configs/multi_node.yaml, two launches (machine_rank 0 and 1) on 127.0.0.1."""
    out = tmp_path_factory.mktemp("multinode")
    port = str(free_port())
    run([accelerate_cmd("multi_node.yaml", "--machine_rank", str(rank), "--num_processes", "2",
                        "--main_process_ip", "127.0.0.1", "--main_process_port", port, WORKER,
                        "--config", "multinode", "--out", str(out)) for rank in (0, 1)])
    return load_results(str(out), "multinode", 2)


CONFIGS = ["fp32", "ga", "bf16", "fp16", "multinode"]


@pytest.mark.parametrize("config", CONFIGS)
def test_local_extrapolation_matches_the_k_worker_oracle(config, request):
    """Each rank's x̃ and the anchor follow docs/algorithms.md with K = 2 (I4, I6, anchors equal)."""
    for rank, res in enumerate(request.getfixturevalue(config)):
        r = res["extrap"]
        assert res["world_size"] == 2
        steps = [i for i, s in enumerate(r["skipped"]) if not s]
        assert len(steps) >= 3
        # gᵏ is this rank's own pre-all-reduce gradient (vs a plain module at the same x̃) ...
        assert max(r["capture_err"]) <= 1e-7, (config, rank)
        # ... whose mean over ranks is the averaged .grad of the base update (I6).
        assert max(r["i6_err"]) <= 1e-7, (config, rank)
        assert max(r["point_err"]) <= TOL and max(r["anchor_err"]) <= TOL, (config, rank)
        # I4: x̃⁰ − x̃¹ = −γ̃(d⁰ − d¹), and the ranks really sit at different points.
        assert max(r["i4_err"]) <= TOL and min(r["i4_norm"]) > 1e-2, (config, rank)
        assert all(r["anchors_equal"]), (config, rank)


def test_simulator_matches_the_real_two_process_run(fp32):
    """extrap_accel.VirtualWorkers with K = 2 in one process follows the real gloo run (same
    model, data and hyperparameters) up to float rounding: anchors and each rank's x̃."""
    import os
    import sys

    import torch

    import extrap_accel

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "distributed"))
    from ddp_worker import LR, MOMENTUM, WD, batch, loss_fn, make_model

    model = make_model()
    optimizer = extrap_accel.ExtrapSGD(model.parameters(), lr=LR, momentum=MOMENTUM,
                                       nesterov=True, weight_decay=WD)
    workers = extrap_accel.VirtualWorkers(model, optimizer, num_workers=2)
    traces = [r["extrap"] for r in fp32]
    for t, real_anchor in enumerate(traces[0]["anchor_trace"]):
        workers.step(lambda k, t=t: loss_fn(model, *batch(k, t)))
        anchor = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        torch.testing.assert_close(anchor, torch.tensor(real_anchor), rtol=0, atol=1e-6)
        for k in range(2):
            point = torch.cat([x.reshape(-1) for x in workers.points[k]])
            torch.testing.assert_close(point, torch.tensor(traces[k]["point_trace"][t]),
                                       rtol=0, atol=1e-6)
    assert len(traces[0]["anchor_trace"]) >= 5


def test_i1_extrap_scale_zero_is_ddp_sgd_bit_for_bit(fp32):
    assert all(r["i1_equal"] for r in fp32)


def test_i3_same_collectives_as_ddp_sgd(fp32):
    for r in fp32:
        assert r["i3"]["sgd"]["calls"] >= 1
        assert r["i3"]["extrap_sgd"] == r["i3"]["sgd"]


def test_only_the_anchor_is_evaluated_or_saved(fp32):
    for r in fp32:
        s = r["saving"]
        assert s["displaced"] and s["params_still_extrapolated"]
        assert s["get_state_dict_is_anchor"] and s["save_model_is_anchor"]
        assert s["no_grad_forward_is_anchor"]


@pytest.mark.parametrize("key", ["resume", "resume_gaussian"])
def test_resume_from_save_state_is_bit_identical_on_every_rank(fp32, key):
    for r in fp32:
        assert r[key]["local_file"] and r[key]["optimizer_file_world_size"] == 2
        assert r[key]["bit_identical"]


def test_resume_without_any_per_rank_file_warns_and_restarts_from_the_anchor(fp32):
    for r in fp32:
        none = r["resume_without_local_files"]["no_files"]
        assert none["error"] == "" and none["warned"]
        assert none["at_anchor"]  # x̃ = x after the load: d = 0 on every rank
        assert none["anchors_equal_after_step"]


def test_resume_with_some_per_rank_files_missing_raises_on_every_rank(fp32):
    for r in fp32:  # (rank 0 has its file, rank 1 not: both raise, neither hangs)
        error = r["resume_without_local_files"]["rank1_missing"]["error"]
        assert "per-rank state for 1 of 2 ranks" in error
        assert "extrap_accel_rank<r>.pt" in error


@pytest.mark.parametrize("variant", ["stochastic", "gaussian", "filterwise"])
def test_variants_under_ddp(fp32, variant):
    for r in fp32:
        v = r["variants"][variant]
        assert v["anchors_equal"] and v["points_differ"]
    if variant == "stochastic":  # ξᵏ = −γ̃(gᵏ − g) is zero-mean across workers
        assert fp32[0]["variants"][variant]["mean_point_minus_anchor"] < 1e-6


def test_fresh_is_refused_under_ddp(fp32):
    for r in fp32:
        assert "not supported under data parallelism" in r["fresh_error"]


def test_plain_accelerator_prepare_stops_at_the_first_step_unless_in_manual_mode(fp32):
    """accelerator.prepare without extrap_accel.prepare would save and evaluate x̃: the first
    step refuses (naming the fix) and changes nothing; extrap_accel.manual_mode(optimizer)
    opts out, trains, extrapolates locally, and optimizer.eval() makes get_state_dict the anchor."""
    for r in fp32:
        p = r["plain_prepare"]
        assert "extrap_accel.prepare(accelerator, model, optimizer, ...)" in p["refused"]
        assert "extrap_accel.manual_mode(optimizer)" in p["refused"]
        assert p["refused_step_changed_nothing"]
        assert p["captures"] and p["anchors_equal"] and p["points_differ"]
        assert p["manual_save_is_anchor"]
        assert p["loss_last"] < p["loss_first"]


def test_extra_memory_per_parameter_under_ddp(fp32):
    """extrap-SGD: anchor + local momentum + captured local gradient (3 fp32 buffers);
    extrap-Adam: anchor + two local moments + captured local gradient (4)."""
    for r in fp32:
        m = r["memory"]
        assert m["extrap_sgd"]["extra_bytes_per_param"] == 3 * 4
        assert m["extrap_adam"]["extra_bytes_per_param"] == 4 * 4
        assert m["extrap_sgd"]["capture_bytes_per_param"] == 4


def test_fp16_overflow_step_changes_nothing(fp16):
    for r in fp16:
        assert r["extrap"]["skipped"].count(True) == 1
        assert r["extrap"]["unchanged_after_skip"] == [True]
        assert r["scale_after"] == 2.0**9  # GradScaler backed off once


@pytest.mark.parametrize("config", ["ga", "fp16"])
def test_transient_capture_is_bit_identical_and_released_between_steps(config, request):
    """The capture's buffers forced transient (released after each step, as on CUDA): the
    same trajectory bit for bit as the persistent default on CPU, through 2 accumulated
    micro-steps (ga) and an fp16 overflow skip; the buffers are held at the step only."""
    for r in request.getfixturevalue(config):
        kept, freed = r["extrap"], r["transient_extrap"]
        assert freed["skipped"] == kept["skipped"]
        assert freed["anchor_trace"] == kept["anchor_trace"]
        assert freed["point_trace"] == kept["point_trace"]
        size = kept["capture_bytes_between_steps"][0]
        assert size == 4 * (6 * 16 + 16 + 16 * 3 + 3)  # one fp32 gᵏ per parameter
        assert set(kept["capture_bytes_between_steps"]) == {size}
        assert set(freed["capture_bytes_between_steps"]) == {0}
        assert set(freed["capture_bytes_before_step"]) == {size}  # every micro-step: held


def test_fp16_without_prepare_fails_loudly(fp16):
    for r in fp16:
        assert "extrap_accel.prepare" in r["unknown_scaler_error"]


def test_post_local_sgd_averages_anchors_every_period(post_local):
    for r in post_local:
        p = r["post_local"]
        start, period = p["start_step"], p["period"]
        for t, (equal, calls) in enumerate(zip(p["anchors_equal"], p["collectives"])):
            averaged = t >= start and (t - start + 1) % period == 0
            if t < start:  # phase 1: all-reduced gradients, identical anchors every step
                assert equal and calls >= 1, t
            elif averaged:  # one parameter all-reduce, anchors identical right after it
                assert equal and calls == 1, t
            else:  # local steps: no communication at all, anchors drift apart
                assert not equal and calls == 0, t
        # torch SGD's own parameters are averaged too (equal exactly when the anchors are)
        assert p["sgd_params_equal"] == p["anchors_equal"]
        finish = p["finish"]
        did, calls = finish["after_averaging"]
        assert not did and calls["calls"] == 0  # the last step averaged already
        before, calls, after = finish["after_local_step"]
        assert finish["averaged"] and not before and calls == 1 and after


def test_post_local_sgd_resumes_exactly_inside_phase_two(post_local):
    """Anchors and momenta differ per rank in phase 2: each rank saves and restores its own."""
    for r in post_local:
        resume = r["post_local_resume"]
        assert resume["anchors_differed_at_save"] and resume["bit_identical"]
        # saved after an averaging: every weight is in model.safetensors, and it is the anchor
        assert resume["saved_keys_complete"] and resume["saved_is_anchor"]


def test_plain_torchrun_ddp_with_attach(tmp_path):
    """No accelerate: torchrun + DistributedDataParallel + attach(ddp_model, optimizer)."""
    run([[sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
          "--master_port", str(free_port()), "tests/distributed/torchrun_worker.py", "--out",
          str(tmp_path)]])
    for r in load_results(str(tmp_path), "torchrun", 2):
        assert r["i6_err"] <= 1e-7
        assert r["anchors_equal"] and r["points_differ"] and r["state_dict_is_anchor"]
